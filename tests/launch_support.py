"""Helpers shared by the launcher tests (torchrun multi-node, real Slurm)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The quickstart model (TP = 2 across the two "nodes"), shortened for tests.
TINY_CONFIG = "configs/quickstart.yaml"
TINY_OVERRIDES = ("train.steps=20", "train.warmup_steps=2", "train.eval_interval=10", "train.save_interval=10",
                  "train.log_interval=5", "model.seq_length=64", "metrics.layer_metrics_interval=10")
DEFAULT_CORPUS = REPO / "data" / "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict:
    """Environment for training processes: this checkout on PYTHONPATH (not pip-installed), CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(extra)
    return env


def train_command(*overrides: str) -> list[str]:
    # The same interpreter as the tests, by absolute path, so every "node" runs it.
    return [sys.executable, "-m", "afb_scale.cli", "train", "--config", TINY_CONFIG, *TINY_OVERRIDES, *overrides]


@pytest.fixture(scope="session")
def tiny_training() -> list[str]:
    """The tiny CPU training command, with its corpus prepared and DeepSpeed's comm op built."""
    if not DEFAULT_CORPUS.exists():
        subprocess.run([sys.executable, "-m", "data_prep.default_corpus", "--out", str(DEFAULT_CORPUS)],
                       cwd=REPO, env=job_env(), check=True, timeout=900)
    # Two ranks JIT-building DeepSpeed's shared-memory op at once can abort a run: build it once.
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   cwd=REPO, env=job_env(), capture_output=True, timeout=600)
    return train_command()


def wait_for_text(path: Path, needles, timeout: float, proc_alive=lambda: True) -> str:
    """Wait until every needle appears in the file; returns its text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if all(n in text for n in needles):
            return text
        if not proc_alive():
            break
        time.sleep(0.3)
    raise AssertionError(f"{path}: {needles} not all seen within {timeout:.0f}s; text so far:\n{text[-4000:]}")


def assert_run_dir_complete(run_dir: Path) -> None:
    """What a finished `afb-scale train` leaves behind: a checkpoint and TensorBoard events."""
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").is_file(), f"no checkpoints/latest in {run_dir}: {sorted(run_dir.rglob('*'))[:20]}"
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert events, f"no TensorBoard event files under {run_dir / 'tensorboard'}"
