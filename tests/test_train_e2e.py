"""The product end to end: `afb-scale train` under torchrun, TP = 2 on 2 processes, on the
built-in corpus. Validation loss must fall; TensorBoard events, the resolved config and a
checkpoint must be in the run directory."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, corpus_overrides


def test_train_tp2_on_default_corpus_lowers_validation_loss(default_corpus, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml",
           *corpus_overrides(default_corpus), f"train.run_dir={run_dir}",
           "train.steps=40", "train.warmup_steps=5", "train.eval_interval=20", "train.save_interval=20",
           "train.log_interval=10", "metrics.layer_metrics_interval=20", "model.seq_length=64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "afb-scale rank 0/2" in out and "afb-scale rank 1/2" in out
    val = [float(line.split("validation loss ")[1].split()[0]) for line in out.splitlines() if "validation loss" in line
           and line.startswith("step")]
    assert len(val) == 3  # steps 0, 20, 40
    assert val[-1] < val[0] - 1.0, val
    assert "tokens/s" in out and "ETA" in out

    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "step00000040").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity",
                "val/token_accuracy", "stability/grad_norm_cv", "stability/loss_spikes",
                "afb/layer01/gate_entropy", "afb/layer02/bias_correction_ratio", "afb/layer01/activation_drift"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 40 and losses[-1] < losses[0]
    entropy = [e.value for e in events.Scalars("afb/layer01/gate_entropy")]
    assert entropy[0] == pytest.approx(1.0, abs=1e-6)  # gates start at exactly 1
    assert all(0.0 < h <= 1.0 + 1e-6 for h in entropy), entropy  # entropy is at most 1 bit
    assert entropy[-1] < 1.0  # and the gates have moved
