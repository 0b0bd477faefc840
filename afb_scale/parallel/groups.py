"""Process groups: torch.distributed + megatron-core parallel_state, set up in one place.

Ranks are ordered as megatron-core's default `tp-cp-ep-dp-pp` (TP fastest), which is also the
order of DeepSpeed's PipeModelDataParallelTopology; engine.py asserts that the two agree.
`init_distributed` returns the rank's `ParallelLayout` (layout.py); this module and layout.py
are the only ones outside model/ that read megatron-core's parallel_state.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from afb_scale import device
from afb_scale.config import ParallelConfig
from afb_scale.parallel.layout import ParallelLayout


def init_distributed(parallel: ParallelConfig = ParallelConfig(), seed: int = 1234,
                     timeout_minutes: int = 30) -> ParallelLayout:
    """Initialise torch.distributed from the torchrun environment, then megatron's groups, then
    the model-parallel RNG (megatron's attention forks it on CUDA, device.py says why). Returns
    this rank's layout: sizes, coordinates and groups.

    Call only after the config has been validated: nothing here checks user input.
    """
    tensor, pipeline = parallel.tensor, parallel.pipeline
    device.setup()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=device.backend(), timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    import deepspeed

    # DeepSpeed's comm layer wraps the existing torch.distributed group (no second init).
    deepspeed.init_distributed(dist_backend=device.backend(), auto_mpi_discovery=False)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )
    device.seed_model_parallel_rng(seed)
    return ParallelLayout.of(parallel, dist.get_world_size()).placed()


def any_rank(device, *flags: bool) -> list[bool]:
    """For each flag, whether it is set on any rank: one all-reduce (and one host sync) for all
    of them, so the loop pays one round trip per step however many conditions it agrees on."""
    if dist.get_world_size() == 1:  # nobody to agree with
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def destroy_distributed() -> None:
    """Undo init_distributed (megatron's groups, then torch's), for a process that goes on
    afterwards: benchmarks that build several layouts in turn, test workers."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """The `mpu` object DeepSpeed expects, answered from megatron-core's parallel_state.

    DeepSpeed's "model parallel" means the tensor-parallel group (it reduces norms and keeps
    non-duplicated parameters over it); megatron-core's `get_model_parallel_group` is TP x PP,
    and it lacks `get_model_parallel_rank/world_size`. This adapter supplies those and forwards
    everything else. It is used for the non-pipelined engine; the pipeline engine brings its
    own grid from the topology, which `check_topology_agrees` compares with megatron's groups.
    """

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    def get_pipe_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    def __getattr__(self, name):
        return getattr(parallel_state, name)


def deepspeed_topology(layout: ParallelLayout):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)


def check_topology_agrees(topology, layout: ParallelLayout) -> None:
    """DeepSpeed's grid and megatron-core's groups must put this rank with the same peers."""
    rank = layout.rank
    coord = topology.get_coord(rank)
    expected = {
        "tensor": (coord.model, layout.tensor_rank),
        "pipeline": (coord.pipe, layout.pipeline_rank),
        "data": (coord.data, layout.data_rank),
    }
    for axis, (ds_rank, mcore_rank) in expected.items():
        if ds_rank != mcore_rank:
            raise RuntimeError(
                f"rank {rank}: DeepSpeed topology puts it at {axis} rank {ds_rank}, "
                f"megatron-core at {mcore_rank}; the rank orders disagree"
            )


def sum_sequence_parallel_grads_over_tp(module: torch.nn.Module) -> int:
    """Sum, over the TP group, the gradients of parameters replicated across a sequence-parallel
    region (norm weights, biases added after a reduce-scatter: megatron marks them
    `sequence_parallel`). Each TP rank only sees its slice of the sequence, so its gradient is
    partial; megatron's own loop sums them in finalize_model_grads, which DeepSpeed does not
    call. A gradient hook does it as each gradient is produced, before any ZeRO stage reduces
    or partitions it. Returns the number of parameters hooked.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return 0

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]
    for p in hooked:
        p.register_hook(all_reduce)
    return len(hooked)
