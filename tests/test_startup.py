"""Start-up without a launcher, and the start-up watchdog: a run either starts or ends in one line.

Real processes: `python -m afb_scale.cli train` on the built-in corpus, with and without the
environment torchrun would give it.
"""

import os
import subprocess
import sys

from conftest import ROOT, corpus_overrides
from multiproc import free_port

QUICKSTART = "configs/quickstart.yaml"
TINY = ["train.steps=2", "train.warmup_steps=1", "train.eval_interval=2", "train.eval_iters=1", "train.save_interval=2",
        "metrics.layer_metrics_interval=0"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _train(overrides, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "afb_scale.cli", "train", "--config", QUICKSTART, *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_one_process_without_torchrun(default_corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(["parallel.tensor=1", *TINY, f"train.run_dir={run_dir}", *corpus_overrides(default_corpus)], _env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "afb-scale rank 0/1" in proc.stdout
    assert "training finished: 2 steps" in proc.stdout
    assert (run_dir / "checkpoints").is_dir()


def test_layout_that_needs_ranks_says_how_to_launch(default_corpus, tmp_path):
    proc = _train([*TINY, f"train.run_dir={tmp_path / 'run'}", *corpus_overrides(default_corpus)], _env())
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: parallel.tensor x parallel.pipeline = 2 x 1 needs at least 2 processes; "
                           "launch it with torchrun --nproc_per_node 2"), last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_rendezvous_that_never_completes_ends_in_one_line(default_corpus, tmp_path):
    # Rank 0 of 2 whose partner never starts: the watchdog ends it after train.startup_timeout_s.
    env = _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = _train([*TINY, "train.startup_timeout_s=8", f"train.run_dir={tmp_path / 'run'}",
                   *corpus_overrides(default_corpus)], env, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: start-up phase 'rendezvous' did not finish within 8 s on rank 0: "
                           "another rank did not start"), last


def test_watchdog_phase_that_blocks(tmp_path):
    code = ("import time; from afb_scale.training.watchdog import StartupWatchdog\n"
            "w = StartupWatchdog(1.0)\n"
            "with w.phase('checkpoint discovery'): pass\n"  # a phase that ends disarms its timer
            "time.sleep(1.5)\n"
            "with w.phase('dataset build'): time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines() == [
        "error: start-up phase 'dataset build' did not finish within 1 s on rank 0: rank 0's index build is slow "
        "or stuck, or data.cache_dir is not on storage every node shares (train.startup_timeout_s=1)"]
