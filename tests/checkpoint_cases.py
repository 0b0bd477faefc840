"""Shared pieces of the checkpoint tests: a small prepared corpus and real CLI runs.

Runs go through the real command line (`python -m afb_scale.cli train`), either under torchrun
or as N plain processes with the torchrun/srun environment, each in its own session so a test
can signal or kill exactly its own processes. Settings are tiny (a few seconds of training);
dropout is on so that a resume which forgot the RNG states would show in the losses.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multiproc import free_port

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_INTERVAL, GLOBAL_BATCH = 12, 3, 8


def prepare_corpus(root: Path) -> dict:
    """A 512-piece tokenizer and one indexed dataset from small standard-library files."""
    from data_prep.default_corpus import stdlib_sources
    from data_prep.tokenize import tokenize_to_indexed_dataset
    from data_prep.tokenizer import train_tokenizer

    small = [f for f in stdlib_sources() if 2_000 < f.stat().st_size < 20_000][:160:2]
    train_tokenizer(small, root / "tok", vocab_size=512)
    tokenize_to_indexed_dataset(small, root / "tok.model", root / "text", progress=False)
    return {"tokenizer": root / "tok.model", "prefix": root / "text", "cache": root / "cache"}


LAYOUTS = {
    "dp2-zero1": (2, {"parallel.tensor": 1, "parallel.pipeline": 1, "parallel.zero_stage": 1}),
    "dp2-zero3": (2, {"parallel.tensor": 1, "parallel.pipeline": 1, "parallel.zero_stage": 3}),
    "tp2-pp2": (4, {"parallel.tensor": 2, "parallel.pipeline": 2, "parallel.zero_stage": 1}),
}


@functools.lru_cache(maxsize=None)
def scratch() -> Path:
    """One temporary directory for the whole session: the corpus and the reference runs are
    shared by the checkpoint test modules (each costs seconds of CPU to make)."""
    root = Path(tempfile.mkdtemp(prefix="afb_ckpt_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=None)
def corpus() -> dict:
    root = scratch() / "corpus"
    root.mkdir()
    return prepare_corpus(root)


@functools.lru_cache(maxsize=None)
def reference_run(layout: str) -> Path:
    """An uninterrupted run of the layout to the end (checkpoints every 3 steps, keep 2)."""
    nproc, parallel = LAYOUTS[layout]
    run_dir = scratch() / f"reference-{layout}"
    result = torchrun(nproc, overrides(corpus(), run_dir, **parallel))
    assert result.returncode == 0 and f"training finished: {STEPS} steps" in result.stdout, result.stdout[-4000:]
    return run_dir


def overrides(corpus: dict, run_dir: Path, **extra) -> list[str]:
    base = {
        "model.hidden_size": 64, "model.num_attention_heads": 4, "model.num_layers": 2,
        "model.seq_length": 32, "model.feedback_rank": 8, "model.vocab_size": 512,
        "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
        "model.afb_fused": "auto",  # the fused AFB op (eager bodies here: conftest) under resume
        "train.steps": STEPS, "train.warmup_steps": 2, "train.save_interval": SAVE_INTERVAL,
        "train.micro_batch_size": 2, "train.global_batch_size": GLOBAL_BATCH,
        "train.eval_interval": 1000, "train.eval_iters": 2, "train.log_interval": 1,
        "train.keep_checkpoints": 2, "train.run_dir": str(run_dir),
        "metrics.layer_metrics_interval": 0, "metrics.tensorboard": False,
        "data.tokenizer": str(corpus["tokenizer"]), "data.split": "90,10,0",
        "data.datasets": f"[{{prefix: {corpus['prefix']}, weight: 1.0}}]",
        "data.cache_dir": str(corpus["cache"]),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


FAULTS = ("AFB_TEST_KILL_AT", "AFB_TEST_INJECT_NAN", "AFB_TEST_SAVE_DELAY")


def _env(extra_env: dict | None) -> dict:
    env = dict(os.environ)
    for k in FAULTS:
        env.pop(k, None)
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}{os.pathsep}{env.get('PYTHONPATH', '')}",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    return env


def _entry(extra_env: dict | None) -> list[str]:
    """The real command line, or -- when the test asks for faults -- the same command run by
    tests/fault_injection.py, which adds them through the Trainer's callbacks."""
    return ["-m", "fault_injection" if set(extra_env or {}) & set(FAULTS) else "afb_scale.cli"]


def torchrun(nproc: int, args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone -m afb_scale.cli train --config configs/quickstart.yaml ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *_entry(env), "train", "--config", "configs/quickstart.yaml", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_session(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Ranks:
    """N plain rank processes (the environment torchrun or srun gives each task), output merged
    into one file; each is its own session, so signals reach exactly one rank."""

    def __init__(self, nproc: int, args: list[str], log: Path, env: dict | None = None):
        port = free_port()
        self.log = log
        self.out = open(log, "w")
        self.procs = []
        for rank in range(nproc):
            e = _env(env)
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                     WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
            self.procs.append(subprocess.Popen(
                [sys.executable, *_entry(env), "train", "--config", "configs/quickstart.yaml", *args],
                cwd=REPO, env=e, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True))

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                raise AssertionError(f"never saw {needle!r}; output:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)

    def wait(self, timeout: float = 180) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            for p in self.procs:
                _kill_session(p)
            self.out.close()


def losses(run_dir: Path) -> dict[int, tuple]:
    """step -> (loss, grad_norm, lr, consumed_samples), the last record of each step."""
    from afb_scale.metrics.metrics_file import read_metrics

    return {s: (r["loss"], r["grad_norm"], r["lr"], r["consumed_samples"])
            for s, r in read_metrics(run_dir / "metrics.jsonl").items()}


def final_val_loss(run_dir: Path) -> float:
    import json

    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"val_loss"' in line]
    return vals[-1]["val_loss"]
