"""Fault injection for the checkpoint tests, from outside the product.

`python -m fault_injection train --config ... [key=value ...]` (with tests/ on PYTHONPATH) is
`afb-scale train` with faults at exact, reproducible points, set by environment variables:

    AFB_TEST_KILL_AT=step:N    after optimizer step N (before its checkpoint, if any), rank 0
                               SIGKILLs every rank, itself last: a crash, nothing flushed.
    AFB_TEST_KILL_AT=save:N    the same, in the middle of writing checkpoint N: every rank's
                               DeepSpeed files are written, the COMPLETE marker is not.
    AFB_TEST_INJECT_NAN=5,6    the training loss of steps 5 and 6 is NaN (on every rank).
    AFB_TEST_SAVE_DELAY=S      sleep S seconds inside every checkpoint save, after
                               "saving checkpoint" is printed: a window for a second signal.

Steps are reached through the Trainer's public callbacks; the loss and the checkpoint seal are
patched in this process only (`poisoned_loss`, `_patch_seal`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import torch.distributed as dist

from afb_scale.training.trainer import Callback

_poison = {"on": False}


def _install_loss_poison() -> None:
    """LMLoss returns NaN while `_poison["on"]`; GuardedLMLoss (the engine's) calls it."""
    from afb_scale.model.lm_loss import LMLoss

    if getattr(LMLoss.__call__, "_fault_injection", False):
        return
    original = LMLoss.__call__

    def call(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if _poison["on"] else loss

    call._fault_injection = True
    LMLoss.__call__ = call


@contextlib.contextmanager
def poisoned_loss():
    """Every training loss computed inside is NaN (for engine-level tests in one process)."""
    _install_loss_poison()
    _poison["on"] = True
    try:
        yield
    finally:
        _poison["on"] = False


def _kill_spec() -> tuple[str, int] | None:
    spec = os.environ.get("AFB_TEST_KILL_AT")
    if not spec:
        return None
    where, _, n = spec.partition(":")
    if where not in ("step", "save") or not n.isdigit():
        raise ValueError(f"AFB_TEST_KILL_AT={spec!r}: expected step:N or save:N")
    return where, int(n)


class Faults(Callback):
    def __init__(self):
        self.kill = _kill_spec()
        self.nan_steps = {int(s) for s in os.environ.get("AFB_TEST_INJECT_NAN", "").split(",") if s.strip()}
        self.delay = float(os.environ.get("AFB_TEST_SAVE_DELAY", "0") or 0)
        self.pids: list[int] = []
        if self.nan_steps:
            _install_loss_poison()
        if self.kill and self.kill[0] == "save" or self.delay:
            self._patch_seal()

    def on_start(self, trainer) -> None:
        if self.kill is not None:  # collective: rank 0 learns every rank's pid
            self.pids = [None] * dist.get_world_size()
            dist.all_gather_object(self.pids, os.getpid())

    def on_step_begin(self, trainer) -> None:
        _poison["on"] = trainer.step + 1 in self.nan_steps

    def on_step_end(self, trainer, result) -> None:
        _poison["on"] = False
        if self.kill == ("step", trainer.step):
            self.kill_all()

    def kill_all(self) -> None:
        if dist.get_rank() != 0:
            return
        where, n = self.kill
        print(f"AFB_TEST_KILL_AT={where}:{n}: killing every rank with SIGKILL", flush=True)
        for pid in self.pids:
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def _patch_seal(self) -> None:
        """Run the delay / kill where checkpoint.save seals a checkpoint (files written, marker not)."""
        from afb_scale.training import checkpoint

        seal = checkpoint._seal

        def delayed_seal(engine, ckpt, tag_dir, step, consumed_samples):
            if self.delay > 0:
                time.sleep(self.delay)
            if self.kill == ("save", step):
                self.kill_all()
            return seal(engine, ckpt, tag_dir, step, consumed_samples)

        checkpoint._seal = delayed_seal


if __name__ == "__main__":
    from afb_scale import cli

    sys.exit(cli.main(sys.argv[1:], callbacks=[Faults()]))
