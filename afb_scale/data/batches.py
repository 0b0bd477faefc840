"""This rank's batches, as a resumable stream over megatron-core's GPTDataset.

The global batch of step k is samples [k G, (k+1) G) in the dataset's (seeded, shuffled)
order; data-parallel rank d takes the d-th contiguous 1/DP of it, cut into micro-batches. The
number of samples consumed is therefore the whole data state: resuming at `consumed_samples`
neither repeats nor skips a sample, whatever the layout.

`TrainBatches` builds the next step's batch on a background thread while the current step
runs (the samples are a pure function of their index, so prefetching changes nothing but time),
and its `state_dict` is the position of the batches handed out, not of the one prefetched.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask")


def rank_micro_batches(dataset, first_sample: int, global_batch: int, micro_batch: int,
                       dp_rank: int, dp_size: int) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch starting at `first_sample`."""
    per_rank = global_batch // dp_size
    start = first_sample + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch):
        samples = [dataset[i] for i in range(start + m * micro_batch, start + (m + 1) * micro_batch)]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS})
    return out


class TrainBatches:
    """The training batches from `consumed_samples` on, one global batch per `next()`."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, prefetch: bool = True):
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        # One worker thread: GPTDataset indexing is numpy (it releases the GIL), and a thread
        # shares the dataset's memory maps instead of re-opening them per process.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afb-batches") if prefetch else None
        self._next: Optional[Future] = None

    def _build(self, first_sample: int) -> list[dict]:
        return rank_micro_batches(self.dataset, first_sample, self.global_batch, self.micro_batch,
                                  self.dp_rank, self.dp_size)

    def next(self) -> list[dict]:
        """This rank's micro-batches of the next global batch; starts building the one after."""
        if self._next is not None:
            batch = self._next.result()
        else:
            batch = self._build(self.consumed_samples)
        self.consumed_samples += self.global_batch
        if self._pool is not None:
            self._next = self._pool.submit(self._build, self.consumed_samples)
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._next = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        if self._next is not None:  # a prefetched batch from the old position
            self._next.cancel()
            self._next = None
        self.consumed_samples = int(state["consumed_samples"])
