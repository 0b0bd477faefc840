"""Start-up watchdog: no phase of a run's start may block forever.

Every phase that waits on other ranks or on a data build -- rendezvous and process groups,
checkpoint discovery, the engine build (DeepSpeed's collectives), the dataset index build and its
cache barrier, the checkpoint load, the first evaluation and step -- runs inside
`watchdog.phase(name, likely_cause)`. If it has not finished after `train.startup_timeout_s`, a
timer thread prints one line naming the phase and the likely cause, and ends the process with
`EXIT_STARTUP_TIMEOUT`. Every rank has its own timer, so every rank ends, also the ones stuck
in a collective or in C code (os._exit needs no cooperation from the main thread); torchrun or
Slurm then sees the failure instead of a job that sits at 100% CPU until its time limit.

Once training runs, collectives are bounded by the process groups' own timeout (parallel.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

EXIT_STARTUP_TIMEOUT = 4

# The phases of a run's start, in order, with what usually makes each one hang.
PHASES = {
    "rendezvous": "another rank did not start, or cannot reach MASTER_ADDR:MASTER_PORT",
    "checkpoint discovery": "a rank cannot read the run directory (is train.run_dir on storage every node shares?)",
    "engine build": "another rank failed or is stuck while building the model and DeepSpeed engine",
    "dataset build": "rank 0's index build is slow or stuck, or data.cache_dir is not on storage every node shares",
    "checkpoint load": "a rank cannot read the checkpoint, or another rank failed while loading it",
    "first step": "a collective did not complete: a rank died, or the network between nodes fails",
}


class StartupWatchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def phase(self, name: str):
        """Run the body under the timeout; `name` is one of PHASES."""
        cause = PHASES[name]
        start = time.monotonic()

        def expire() -> None:
            rank = os.environ.get("RANK", "0")
            sys.stderr.write(
                f"error: start-up phase '{name}' did not finish within {time.monotonic() - start:.0f} s on rank "
                f"{rank}: {cause} (train.startup_timeout_s={self.timeout_s:g})\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_STARTUP_TIMEOUT)

        timer = threading.Timer(self.timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
