"""Preemption: a signal asks the run to finish its step, checkpoint and exit for requeue.

Slurm sends SIGUSR1 (`--signal=USR1@N`) or SIGTERM before killing a job. The handler only
sets a flag; the training loop checks it between optimizer steps, agreed across ranks with one
all-reduce, because a signal may reach ranks at different moments. A second signal during the
save changes nothing: the flag is already set and the save runs to completion.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later". launch/slurm/*.sbatch requeues the job on this status.
REQUEUE_EXIT_CODE = 75


class PreemptionFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device) -> bool:
        """True on every rank if any rank has received a signal (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
