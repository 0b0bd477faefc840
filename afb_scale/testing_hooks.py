"""Fault injection for the checkpoint tests, driven by environment variables.

Inert unless a variable below is set; nothing in a normal run reads or sets them. They exist
so real multi-process runs can be crashed or poisoned at exact, reproducible points:

    AFB_TEST_KILL_AT=step:N    after optimizer step N (before its checkpoint, if any), rank 0
                               SIGKILLs every rank, itself last: a crash, nothing flushed.
    AFB_TEST_KILL_AT=save:N    the same, in the middle of writing checkpoint N: every rank's
                               DeepSpeed files are written, the COMPLETE marker is not.
    AFB_TEST_INJECT_NAN=5,6    the training loss of steps 5 and 6 is NaN (on every rank).
    AFB_TEST_SAVE_DELAY=S      sleep S seconds inside every checkpoint save, after
                               "saving checkpoint" is printed: a window for a second signal.
"""

from __future__ import annotations

import os
import signal
import time

_pids: list[int] | None = None


def _kill_spec() -> tuple[str, int] | None:
    spec = os.environ.get("AFB_TEST_KILL_AT")
    if not spec:
        return None
    where, _, n = spec.partition(":")
    if where not in ("step", "save") or not n.isdigit():
        raise ValueError(f"AFB_TEST_KILL_AT={spec!r}: expected step:N or save:N")
    return where, int(n)


def setup() -> None:
    """Collective when AFB_TEST_KILL_AT is set (every rank sees the same environment): rank 0
    learns every rank's process id, so it can kill them all at once."""
    global _pids
    if _kill_spec() is None:
        return
    import torch.distributed as dist

    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    _pids = pids


def kill_point(where: str, step: int) -> None:
    spec = _kill_spec()
    if spec != (where, step) or _pids is None:
        return
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return
    print(f"AFB_TEST_KILL_AT={where}:{step}: killing every rank with SIGKILL", flush=True)
    for pid in _pids:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(step: int) -> bool:
    spec = os.environ.get("AFB_TEST_INJECT_NAN", "")
    return str(step) in {s.strip() for s in spec.split(",") if s.strip()}


def save_delay() -> None:
    delay = float(os.environ.get("AFB_TEST_SAVE_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)
