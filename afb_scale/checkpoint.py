"""Saving and resuming runs through DeepSpeed's own checkpoints.

DeepSpeed writes every rank's model, optimizer and ZeRO partitions plus the LR scheduler and the
loss scaler under `<run_dir>/checkpoints/<tag>/` and a `latest` pointer; we add a client state
with the step and the number of consumed samples, from which the data order continues.
"""

from __future__ import annotations

from pathlib import Path


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save(engine, run_dir: str | Path, step: int, consumed_samples: int, extra: dict | None = None) -> Path:
    """Collective: every rank calls it."""
    state = {"step": step, "consumed_samples": consumed_samples, **(extra or {})}
    engine.engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag_for(step), client_state=state)
    return checkpoint_dir(run_dir) / tag_for(step)


def load_latest(engine, run_dir: str | Path) -> dict | None:
    """Client state of the latest checkpoint after loading it, or None for a fresh run."""
    ckpt = checkpoint_dir(run_dir)
    if not (ckpt / "latest").is_file():
        return None
    path, state = engine.engine.load_checkpoint(str(ckpt))
    if path is None:
        raise RuntimeError(f"checkpoint named by {ckpt / 'latest'} could not be loaded")
    return state
