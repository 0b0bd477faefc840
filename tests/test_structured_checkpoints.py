"""Checkpoints of the structured kinds move between layouts and export, with and without the guide.

One TP = 2 run of blockshuffle-swiglu (the kind whose sharding rules are the most varied:
replicated B1, B2's blocks sharded with SwiGLU's stride 2, fc2's blocks sharded and its B2
replicated) trains 6 steps with the self-guided guide for the first 3, evaluating and saving
every 3 steps: the step-3 checkpoint holds the guide (alpha > 0 still mixes it in), the step-6
one does not. Each checkpoint is then
- loaded through its consolidated full tensors (the resharding path) at TP = 1 and at TP = 2,
  with the guide's alpha of that step, and must reproduce the validation loss the run printed;
- exported (`afb_scale.export`) and loaded in a fresh process without DeepSpeed, same loss.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from checkpoint_cases import REPO, corpus, overrides, scratch, torchrun
from multiproc import run_ranks

STEPS, GUIDED = 6, 3
RTOL = 2e-6  # another TP degree sums in another order; a wrong shard moves the loss by >1e-2


@functools.lru_cache(maxsize=None)
def _structured_run():
    run_dir = scratch() / "reference-structured-tp2"
    args = overrides(corpus(), run_dir, **{
        "model.ffn_kind": "blockshuffle-swiglu", "model.structured_blocks": 4, "parallel.tensor": 2,
        "parallel.zero_stage": 0, "train.steps": STEPS, "train.eval_interval": 3, "train.keep_checkpoints": 0})
    result = torchrun(2, args)
    assert result.returncode == 0 and f"training finished: {STEPS} steps" in result.stdout, result.stdout[-4000:]
    return run_dir


def _val_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}


def _tag(run_dir, step):
    return run_dir / "checkpoints" / f"step{step:08d}"


def _load_resharded(rank, world, run_dir, step, tensor):
    """Build and load the way a resume in another layout does, but from the checkpoint of `step`
    (not the newest) and always through the consolidated tensors; the validation loss."""
    from afb_scale.config import load_config, validate
    from afb_scale.data.batches import rank_micro_batches
    from afb_scale.data.datasets import build_datasets, samples_needed
    from afb_scale.model.self_guided import SelfGuidedSchedule, has_guide, set_alpha
    from afb_scale.parallel.groups import init_distributed
    from afb_scale.training import checkpoint
    from afb_scale.training.engine import Engine
    from afb_scale.training.reshard import read_consolidated

    cfg = load_config(run_dir / "config.yaml", [f"parallel.tensor={tensor}"])
    validate(cfg, world)
    layout = init_distributed(cfg.parallel)
    tag_dir = _tag(run_dir, step)
    marker, reason = checkpoint.verify(tag_dir)
    assert marker is not None, reason
    plan = checkpoint.ResumePlan(tag_dir, marker, same_layout=False, weights=read_consolidated(tag_dir))
    schedule = SelfGuidedSchedule(cfg, layout)
    engine = Engine(schedule.engine_config(plan), layout, initial_weights=plan.weights)
    restored = checkpoint.load(engine, plan)
    set_alpha(engine.module, schedule.alpha_after(step))
    _, valid, _ = build_datasets(cfg, samples_needed(cfg))
    G, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    losses = [engine.evaluate(rank_micro_batches(valid, i * G, G, mb, layout.data_rank, layout.data))[0]
              for i in range(cfg.train.eval_iters)]
    return restored.step, has_guide(engine.module), sum(losses) / len(losses)


@pytest.mark.parametrize("step, guide", [(GUIDED, True), (STEPS, False)], ids=["with-guide", "guide-removed"])
@pytest.mark.parametrize("tensor", [1, 2], ids=["tp2-to-tp1", "tp2-to-tp2-via-full-tensors"])
def test_structured_checkpoint_reshards(step, guide, tensor):
    run_dir = _structured_run()
    expected = _val_losses(run_dir)[step]
    for got_step, got_guide, val_loss in run_ranks(_load_resharded, tensor, run_dir, step, tensor):
        assert (got_step, got_guide) == (step, guide)
        assert val_loss == pytest.approx(expected, rel=RTOL, abs=0)


_LOAD_IN_FRESH_PROCESS = """
import json, sys
from afb_scale.export import load_exported, validation_loss
out = {}
for path in sys.argv[1:]:
    model, cfg = load_exported(path)
    out[path] = {"val_loss": validation_loss(model, cfg), "guides": sum(".guide." in n for n, _ in model.named_parameters()),
                 "params": sum(p.numel() for p in model.parameters())}
out["deepspeed"] = "deepspeed" in sys.modules
print(json.dumps(out))
"""


def test_structured_export_loads_in_one_process(tmp_path):
    from afb_scale.export import export_model

    run_dir = _structured_run()
    expected = _val_losses(run_dir)
    outs = {step: export_model(_tag(run_dir, step), tmp_path / f"export{step}") for step in (GUIDED, STEPS)}
    infos = {step: json.loads((out / "export.json").read_text()) for step, out in outs.items()}
    assert 0 < infos[GUIDED]["guide_alpha"] < 1 and infos[STEPS]["guide_alpha"] is None

    proc = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, *map(str, outs.values())], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["deepspeed"] is False
    # fc1 and fc2 of 2 layers carry a guide at step 3, none after the removal.
    assert [got[str(outs[s])]["guides"] for s in (GUIDED, STEPS)] == [4, 0]
    for step, out in outs.items():
        assert got[str(out)]["params"] == infos[step]["parameters"]
        assert got[str(out)]["val_loss"] == pytest.approx(expected[step], rel=RTOL, abs=0)
