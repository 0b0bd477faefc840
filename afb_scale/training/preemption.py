"""Preemption: a signal asks the run to finish its step, checkpoint and exit for requeue.

Slurm sends SIGUSR1 (`--signal=B:USR1@N`, forwarded by launch/slurm/train.sbatch) or SIGTERM
before killing a job. The handler only
sets a flag; the training loop checks it between optimizer steps, agreed across ranks with one
all-reduce, because a signal may reach ranks at different moments. A second signal during the
save changes nothing: the flag is already set and the save runs to completion (and a save is
atomic anyway: a checkpoint without its COMPLETE marker is never loaded, checkpoint.py).

Under torchrun, a signal sent to torchrun itself is forwarded to the workers as SIGTERM, and
torchrun SIGKILLs them 30 s later: the step plus the save must fit in that window (Slurm's
`--signal=...@N` lead time should cover a step and a save). The worker's status 75 is then
reported by torchrun as a failure; launch/torchrun.sh maps that back to 75.
"""

from __future__ import annotations

import signal

from afb_scale.cluster.launch_env import REQUEUE_EXIT_CODE  # noqa: F401  (the status callers exit with)


class PreemptionFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.count = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Only bookkeeping: the loop acts at the next step boundary; repeats change nothing.
        if self.received is None:
            self.received = signum
        self.count += 1

    def received_name(self) -> str:
        if self.received is None:
            return "on another rank"
        name = signal.Signals(self.received).name
        return name if self.count == 1 else f"{name} (and {self.count - 1} more)"

    @property
    def is_set(self) -> bool:
        """This rank's view; the loop agrees on it across ranks (parallel.any_rank), because a
        signal may reach ranks at different moments."""
        return self.received is not None
