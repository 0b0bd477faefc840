"""A checkpoint loads into other layouts, and exports to one process without DeepSpeed.

The TP = 2 x PP = 2 reference run (checkpoint_cases.reference_run, shared with the resume test)
recorded its final validation loss. Its last checkpoint is loaded the way `afb-scale train`
would resume it in another layout (checkpoint.resume_plan -> Engine(initial_weights) ->
checkpoint.load) at TP = 1 x PP = 1, at TP = 2 x PP = 1 and at DP = 2 under ZeRO-3, on real
gloo ranks; each must report the same step, LR and validation loss. The DP = 2 ZeRO-3 run's
checkpoint (partitioned parameters, gathered at save) goes to TP = 2. Then `afb_scale.export`
writes the model and a fresh Python process loads it with `load_exported`, without importing
DeepSpeed, and gets the same validation loss.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from checkpoint_cases import REPO, STEPS, final_val_loss, reference_run
from multiproc import run_ranks

RTOL = 2e-6  # another TP/PP layout sums in another order; a wrong weight moves the loss by >1e-2


def _resume_elsewhere(rank, world, run_dir, parallel):
    import math

    from afb_scale.training import checkpoint
    from afb_scale.config import load_config, validate
    from afb_scale.data.datasets import build_datasets, samples_needed
    from afb_scale.training.engine import Engine, lr_at
    from afb_scale.parallel.groups import init_distributed
    from afb_scale.data.batches import rank_micro_batches

    cfg = load_config(run_dir / "config.yaml", [f"parallel.{k}={v}" for k, v in parallel.items()])
    validate(cfg, world)
    layout = init_distributed(cfg.parallel)
    plan = checkpoint.resume_plan(cfg, layout, run_dir)
    assert plan is not None and not plan.same_layout
    engine = Engine(cfg, layout, initial_weights=plan.weights)
    restored = checkpoint.load(engine, plan)
    _, valid, _ = build_datasets(cfg, samples_needed(cfg))
    G, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    losses = [engine.evaluate(rank_micro_batches(valid, i * G, G, mb, layout.data_rank, layout.data))[0]
              for i in range(cfg.train.eval_iters)]
    lr = engine.scheduler.get_last_lr()[0]
    assert math.isclose(lr, lr_at(STEPS, cfg), rel_tol=1e-12), (lr, lr_at(STEPS, cfg))
    return restored.step, restored.consumed_samples, sum(losses) / len(losses)


@pytest.mark.parametrize("source, world, parallel", [
    ("tp2-pp2", 1, {"tensor": 1, "pipeline": 1, "zero_stage": 0}),
    ("tp2-pp2", 2, {"tensor": 2, "pipeline": 1, "zero_stage": 0}),
    ("tp2-pp2", 2, {"tensor": 1, "pipeline": 1, "zero_stage": 3}),
    ("dp2-zero3", 2, {"tensor": 2, "pipeline": 1, "zero_stage": 0}),
], ids=["tp2pp2-to-tp1pp1", "tp2pp2-to-tp2pp1", "tp2pp2-to-dp2zero3", "dp2zero3-to-tp2"])
def test_checkpoint_loads_into_another_layout(source, world, parallel):
    run_dir = reference_run(source)
    expected = final_val_loss(run_dir)
    for step, consumed, val_loss in run_ranks(_resume_elsewhere, world, run_dir, parallel):
        assert (step, consumed) == (STEPS, STEPS * 8)
        assert val_loss == pytest.approx(expected, rel=RTOL, abs=0)


_LOAD_IN_FRESH_PROCESS = """
import json, sys
from afb_scale.export import load_exported, validation_loss
model, cfg = load_exported(sys.argv[1])
print(json.dumps({"val_loss": validation_loss(model, cfg), "deepspeed": "deepspeed" in sys.modules,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def test_export_loads_in_one_process_without_deepspeed(tmp_path):
    from afb_scale.export import export_model

    run_dir = reference_run("tp2-pp2")
    out = export_model(run_dir, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors", "tokenizer.model"]
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == STEPS and info["trained_layout"]["pipeline"] == 2 and info["tokenizer"]["sha256"]
    with pytest.raises(SystemExit, match="exists"):
        export_model(run_dir, out)

    proc = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["deepspeed"] is False
    assert got["params"] == info["parameters"]
    assert got["val_loss"] == pytest.approx(final_val_loss(run_dir), rel=RTOL, abs=0)


def test_export_refuses_a_damaged_checkpoint(tmp_path):
    import shutil

    from afb_scale.export import export_model

    src = reference_run("dp2-zero1") / "checkpoints" / f"step{STEPS:08d}"
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    with open(copy / "consolidated" / "model-stage000.safetensors", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SystemExit, match="checksum mismatch in consolidated/model-stage000.safetensors"):
        export_model(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
