"""Full <-> tensor-parallel-shard conversion for any megatron-core parameter.

megatron-core marks every tensor-parallel parameter with `tensor_model_parallel`,
`partition_dim` and `partition_stride`. With stride s, the full tensor is cut into t*s chunks
along `partition_dim` and rank k holds chunks k, k+t, ..., concatenated -- exactly what
megatron's CPU initialisation (`_initialize_affine_weight_cpu`) does. That one rule covers
column- and row-parallel linears, the vocab-parallel embedding, SwiGLU's fused [W1; W3] and
AFB's fused [Ub; Ug]. Parameters without the marker are replicated.

Public API: reshard.py uses the tensor functions; `gather_full_state` / `load_full_state` are
for scripts (and the TP invariance tests) that move a module's state between TP degrees in memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def partition_of(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, stride) of a tensor-parallel parameter, None if replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def shard_full_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    chunks = torch.chunk(full, world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def gather_full_tensor(local: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    # Rank k's piece j is chunk j*world + k of the full tensor.
    pieces = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([pieces[k][j] for j in range(stride) for k in range(world)], dim=dim)


def gather_full_state(named: dict[str, torch.Tensor], params: dict[str, torch.Tensor], group) -> dict:
    """Full tensors for `named` (e.g. parameters or their gradients), shards gathered over `group`.

    `params` supplies the tensor-parallel attributes for each name (a gradient has none).
    """
    out = {}
    for name, t in named.items():
        part = partition_of(params[name])
        out[name] = t.detach().clone() if part is None else gather_full_tensor(t.detach(), *part, group)
    return out


@torch.no_grad()
def load_full_state(module: torch.nn.Module, full: dict[str, torch.Tensor], rank: int, world: int) -> None:
    """Copy full (TP=1) tensors into a module's possibly sharded parameters, by name."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"full state lacks parameters: {', '.join(missing[:5])}")
    for name, p in params.items():
        part = partition_of(p)
        src = full[name] if part is None else shard_full_tensor(full[name], *part, rank, world)
        if src.shape != p.shape:
            raise ValueError(f"{name}: full tensor {tuple(full[name].shape)} does not shard to {tuple(p.shape)}")
        p.copy_(src)
