"""Self-guided training of the structured kinds (model/self_guided.py): alpha per step, the
guide gone after its fraction (model, optimizer, checkpoints), and resume across the guide's
removal bit for bit, through the real CLI under torchrun (TP=2, ZeRO 0, fp32, dropout on).
"""

from __future__ import annotations

import glob
import math

import pytest
import torch

from checkpoint_cases import corpus, losses, overrides, torchrun


@pytest.mark.parametrize("schedule,step,expected", [
    ("cosine", 0, 1.0), ("cosine", 25, 0.5 * (1 + math.cos(math.pi / 4))), ("cosine", 50, 0.5),
    ("cosine", 75, 0.5 * (1 + math.cos(3 * math.pi / 4))), ("cosine", 100, 0.0), ("cosine", 170, 0.0),
    ("linear", 0, 1.0), ("linear", 25, 0.75), ("linear", 99, 0.01), ("linear", 100, 0.0),
])
def test_alpha_at_steps(schedule, step, expected):
    from afb_scale.model.self_guided import alpha_at

    assert alpha_at(step, 100, schedule) == pytest.approx(expected, abs=1e-12)


def test_guided_steps_and_the_model_for_a_step():
    from afb_scale.config import load_config
    from afb_scale.model.self_guided import SelfGuidedSchedule, guided_steps

    cfg = load_config("configs/quickstart.yaml", ["model.ffn_kind=lowrank-gelu", "train.steps=300"])
    assert guided_steps(cfg) == 150  # guide_fraction 0.5 by default
    sched = SelfGuidedSchedule(cfg, None)
    assert sched.config_at(0).model.self_guided and sched.config_at(150).model.self_guided
    assert not sched.config_at(151).model.self_guided
    off = load_config("configs/quickstart.yaml", ["model.ffn_kind=lowrank-gelu", "model.guide_fraction=0"])
    assert guided_steps(off) == 0 and not SelfGuidedSchedule(off, None).config_at(0).model.self_guided
    assert guided_steps(load_config("configs/quickstart.yaml", ["model.ffn_kind=afb-gelu"])) == 0


def test_self_guided_layouts_are_checked():
    from afb_scale.config import ConfigError, load_config, validate

    cfg = load_config("configs/quickstart.yaml", ["model.ffn_kind=blockdense-gelu", "parallel.zero_stage=1"])
    with pytest.raises(ConfigError, match="model.self_guided=true"):
        validate(cfg, 2, cuda_available=False)
    validate(load_config("configs/quickstart.yaml", ["model.ffn_kind=blockdense-gelu", "parallel.zero_stage=1",
                                                     "model.self_guided=false"]), 2, cuda_available=False)


STEPS, GUIDED = 12, 6  # guide_fraction 0.5; checkpoints every 3 steps


def _args(run_dir):
    return overrides(corpus(), run_dir, **{"model.ffn_kind": "blockdense-gelu", "model.structured_blocks": 2,
                                           "parallel.tensor": 2, "parallel.zero_stage": 0, "train.keep_checkpoints": 0})


def _guide_names(tag_dir):
    from safetensors.torch import load_file

    names = [n for f in glob.glob(str(tag_dir / "consolidated" / "*.safetensors")) for n in load_file(f)]
    assert names
    return [n for n in names if ".guide." in n]


def _deepspeed_state(tag_dir):
    (path,) = glob.glob(str(tag_dir / "mp_rank_00_model_states.pt"))
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["module"], state["optimizer"]


def test_guide_removed_and_resume_across_removal_is_bit_exact(tmp_path):
    ref_dir = tmp_path / "reference"
    ref = torchrun(2, _args(ref_dir))
    assert ref.returncode == 0 and f"training finished: {STEPS} steps" in ref.stdout, ref.stdout[-4000:]
    expected = losses(ref_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))

    ckpt = ref_dir / "checkpoints"
    # Up to its last guided step (6) the checkpoints hold the guides (fc1 and fc2 of 2 layers),
    # after it neither the model, the optimizer nor the consolidated tensors do.
    assert len(_guide_names(ckpt / "step00000006")) == 4
    module6, optim6 = _deepspeed_state(ckpt / "step00000006")
    module12, optim12 = _deepspeed_state(ckpt / "step00000012")
    for tag in ("step00000009", "step00000012"):
        assert _guide_names(ckpt / tag) == []
    assert [k for k in module12 if ".guide." in k] == [] and len([k for k in module6 if k.endswith(".guide.weight")]) == 4
    n_params = lambda opt: sum(len(g["params"]) for g in opt["param_groups"])  # noqa: E731
    assert n_params(optim6) - n_params(optim12) == 4 and len(optim12["state"]) == n_params(optim12)

    # Killed after step 7 (resumes from 6, the removal step, with the guide) and after step 11
    # (resumes from 9, built without it): every step equals the uninterrupted run's.
    run_dir = tmp_path / "run"
    for kill in (7, 11):
        out = torchrun(2, _args(run_dir), env={"AFB_TEST_KILL_AT": f"step:{kill}"})
        assert out.returncode != 0 and f"AFB_TEST_KILL_AT=step:{kill}" in out.stdout, out.stdout[-4000:]
    final = torchrun(2, _args(run_dir))
    assert final.returncode == 0 and "resuming from" in final.stdout, final.stdout[-4000:]
    assert losses(run_dir) == expected
