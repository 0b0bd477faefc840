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

    kind = "model.ffn_kind=blockdense-gelu"
    for bad in (["parallel.zero_stage=3"], ["parallel.zero_stage=3", "train.precision=bf16"]):
        with pytest.raises(ConfigError, match="model.self_guided=true"):
            validate(load_config("configs/quickstart.yaml", [kind, *bad]), 2, cuda_available=False)
    for ok in (["parallel.zero_stage=2"], ["parallel.zero_stage=1", "train.precision=bf16"],
               ["parallel.zero_stage=3", "model.self_guided=false"]):
        validate(load_config("configs/quickstart.yaml", [kind, *ok]), 2, cuda_available=False)


def _full_state(engine, zero: int) -> dict[str, tuple]:
    """name -> (fp32 weight, exp_avg, exp_avg_sq, the model's working copy) of this rank's
    (TP-sharded) parameters, whole over data parallelism: torch's optimizer at ZeRO 0, DeepSpeed's
    public getters at ZeRO 1/2."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from afb_scale.compat.deepspeed import link_optimizer_state

    opt = engine.engine.optimizer
    if zero:
        link_optimizer_state(opt)
    out = {}
    for name, p in engine.module.named_parameters():
        if zero == 0:
            out[name] = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
        else:
            out[name] = (safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                         safe_get_full_optimizer_state(p, "exp_avg_sq"))
        out[name] += (p.detach().clone(),)
    return out


def _optimizer_steps(engine, zero: int) -> list[float]:
    opt = engine.engine.optimizer if zero == 0 else engine.engine.optimizer.optimizer
    return sorted({float(s["step"]) for s in opt.state.values()})


def _state_across_removal(rank, world, zero, tensor, precision):
    from megatron.core import parallel_state

    from engine_cases import rank_micro_batches, text_batches, tiny_config
    from afb_scale.config import validate
    from afb_scale.model.self_guided import SelfGuidedSchedule, has_guide
    from afb_scale.parallel.groups import init_distributed
    from afb_scale.training.engine import Engine

    cfg = tiny_config(**{"model.ffn_kind": "blockdense-gelu", "model.structured_blocks": 2, "parallel.tensor": tensor,
                         "parallel.zero_stage": zero, "train.precision": precision,
                         "train.steps": 6})  # guided for 3 steps
    validate(cfg, world)
    layout = init_distributed(cfg.parallel)
    schedule = SelfGuidedSchedule(cfg, layout)
    engine = Engine(schedule.engine_config(None), layout)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = [rank_micro_batches(b, cfg.train.micro_batch_size, dp_rank, dp)
               for b in text_batches(cfg.train.steps, cfg.train.global_batch_size)]
    for step in range(3):
        engine = schedule.on_step(engine, step)
        engine.train_batch(batches[step])
    before, steps_before, lr_before = _full_state(engine, zero), _optimizer_steps(engine, zero), engine.scheduler.get_last_lr()
    counters = lambda e: (e.engine.global_steps, e.engine.global_samples)  # noqa: E731
    counters_before = counters(engine)
    removed = schedule.on_step(engine, 3)
    assert removed is not engine and has_guide(engine.module) and not has_guide(removed.module)
    after = _full_state(removed, zero)
    assert set(before) - set(after) == {n for n in before if ".guide." in n} and set(after) <= set(before)
    for name, tensors in after.items():
        for what, got, want in zip(("weight", "exp_avg", "exp_avg_sq", "working weight"), tensors, before[name]):
            assert torch.equal(got, want), f"{name} {what} changed across the guide's removal"
        assert before[name][2].abs().sum() > 0, f"{name}: no second moment to carry"
    assert (_optimizer_steps(removed, zero), removed.scheduler.get_last_lr(), counters(removed)) == \
        (steps_before, lr_before, counters_before) and steps_before == [3.0]
    result = removed.train_batch(batches[3])  # and it trains on
    assert math.isfinite(result.loss)
    return len(after), len(before) - len(after)


@pytest.mark.parametrize("zero, tensor, world, precision", [(0, 2, 2, "fp32"), (1, 1, 2, "fp32"), (2, 1, 2, "fp32"),
                                                            (1, 1, 2, "bf16")],
                         ids=["zero0-tp2", "zero1-dp2", "zero2-dp2", "bf16-zero1-dp2"])
def test_removal_carries_weights_and_adam_moments_exactly(zero, tensor, world, precision):
    from multiproc import run_ranks

    for kept, dropped in run_ranks(_state_across_removal, world, zero, tensor, precision):
        assert dropped == 4 and kept > 10  # fc1 and fc2 guides of 2 layers


STEPS, GUIDED = 12, 6  # guide_fraction 0.5; checkpoints every 3 steps


def _args(run_dir):
    # DP = 2 under ZeRO 1: the guide's removal moves partitioned optimizer state, also right
    # after a resume at the removal step (TP = 2 / ZeRO 0 is checked state by state above).
    return overrides(corpus(), run_dir, **{"model.ffn_kind": "blockdense-gelu", "model.structured_blocks": 2,
                                           "parallel.tensor": 1, "parallel.zero_stage": 1, "train.keep_checkpoints": 0})


def _guide_names(tag_dir):
    from safetensors.torch import load_file

    names = [n for f in glob.glob(str(tag_dir / "consolidated" / "*.safetensors")) for n in load_file(f)]
    assert names
    return [n for n in names if ".guide." in n]


def _module_state(tag_dir):
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _optimizer_elements(tag_dir) -> tuple[int, int]:
    """(fp32 elements, Adam-moment elements) the ZeRO-1 optimizer files hold over all ranks."""
    weights = moments = 0
    for path in glob.glob(str(tag_dir / "zero_pp_rank_*_optim_states.pt")):
        opt = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        weights += sum(p.numel() - pad for p, pad in zip(opt["single_partition_of_fp32_groups"], opt["group_paddings"]))
        moments += sum(s["exp_avg"].numel() for s in opt["base_optimizer_state"]["state"].values())
    return weights, moments


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
    module6, module12 = _module_state(ckpt / "step00000006"), _module_state(ckpt / "step00000012")
    for tag in ("step00000009", "step00000012"):
        assert _guide_names(ckpt / tag) == []
    guides6 = [k for k in module6 if k.endswith(".guide.weight")]
    assert [k for k in module12 if ".guide." in k] == [] and len(guides6) == 4
    (weights6, moments6), (weights12, moments12) = _optimizer_elements(ckpt / "step00000006"), \
        _optimizer_elements(ckpt / "step00000012")
    guide_elements = sum(module6[k].numel() for k in guides6)
    assert weights6 - weights12 == guide_elements and moments6 - moments12 == guide_elements
    assert weights12 == sum(t.numel() for t in module12.values() if torch.is_tensor(t))

    # Killed after step 7 (resumes from 6, the removal step, with the guide) and after step 11
    # (resumes from 9, built without it): every step equals the uninterrupted run's.
    run_dir = tmp_path / "run"
    for kill in (7, 11):
        out = torchrun(2, _args(run_dir), env={"AFB_TEST_KILL_AT": f"step:{kill}"})
        assert out.returncode != 0 and f"AFB_TEST_KILL_AT=step:{kill}" in out.stdout, out.stdout[-4000:]
    final = torchrun(2, _args(run_dir))
    assert final.returncode == 0 and "resuming from" in final.stdout, final.stdout[-4000:]
    assert losses(run_dir) == expected
