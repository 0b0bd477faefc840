"""The parallel layout of a run, as one value computed once and passed to whoever needs it.

`ParallelLayout.of(parallel_config, world_size)` gives the sizes (TP x PP x DP = world), usable
before any process group exists (config validation, the planner, checkpoint markers).
`groups.init_distributed` returns the same value `placed`: this rank's coordinates and its
process groups, read once from megatron-core's parallel_state, so no other module has to ask
megatron's globals where it stands.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Groups:
    """This rank's torch.distributed process groups (megatron-core's)."""

    tensor: Any
    pipeline: Any
    data: Any
    model: Any  # tensor x pipeline: where a gradient norm's squares are summed


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor: int
    pipeline: int
    data: int
    zero_stage: int = 0
    sequence_parallel: bool = False
    # This rank's place; the defaults describe a world of one (or a layout not yet placed).
    rank: int = 0
    tensor_rank: int = 0
    pipeline_rank: int = 0
    data_rank: int = 0
    groups: Optional[Groups] = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, parallel, world_size: int) -> "ParallelLayout":
        """The sizes of a validated `parallel` config section on `world_size` ranks (the one
        place DP = world / (TP x PP) is computed; config.validate checks the division)."""
        return cls(world_size=world_size, tensor=parallel.tensor, pipeline=parallel.pipeline,
                   data=world_size // (parallel.tensor * parallel.pipeline), zero_stage=parallel.zero_stage,
                   sequence_parallel=parallel.sequence_parallel)

    def placed(self) -> "ParallelLayout":
        """This layout with the calling rank's coordinates and groups (after init_distributed)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        return dataclasses.replace(
            self, rank=dist.get_rank(), tensor_rank=ps.get_tensor_model_parallel_rank(),
            pipeline_rank=ps.get_pipeline_model_parallel_rank(), data_rank=ps.get_data_parallel_rank(),
            groups=Groups(tensor=ps.get_tensor_model_parallel_group(), pipeline=ps.get_pipeline_model_parallel_group(),
                          data=ps.get_data_parallel_group(), model=ps.get_model_parallel_group()))

    def describe(self) -> str:
        return f"TP={self.tensor} PP={self.pipeline} DP={self.data} ZeRO={self.zero_stage}"
