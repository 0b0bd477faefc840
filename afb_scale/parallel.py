"""Process groups: torch.distributed + megatron-core parallel_state, set up in one place.

Ranks are ordered as megatron-core's default `tp-cp-ep-dp-pp` (TP fastest), which is also the
order of DeepSpeed's PipeModelDataParallelTopology; engine.py asserts that the two agree.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from afb_scale import cpu_shims


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(tensor: int = 1, pipeline: int = 1, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from the torchrun environment, then megatron's groups.

    Call only after the config has been validated: nothing here checks user input.
    """
    cpu_shims.apply()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            backend=default_backend(), timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
