"""Tensor-parallel structured FFN projections, drop-in for megatron-core MLP's fc1 and fc2.

megatron-core's `MLP` builds `linear_fc1` / `linear_fc2` from the spec and handles bias,
activation and SwiGLU's [W1_k; W3_k] chunking; these two classes take the same constructor
arguments and return (output, bias) like its Column/RowParallelLinear, so the structured kinds
are megatron's own MLP with other submodules (model/specs.py).

Sharding rules (t = TP size, k = this rank; "replicated" = full copy on every rank, marked
`sequence_parallel` under sequence parallelism so its gradient is summed over TP):

fc1 (column-parallel: rank k outputs its contiguous 1/t of the hidden units, stride 2 for SwiGLU)
- lowrank / blockdense: V (or B) replicated, applied to the local tokens; U (or L) is a megatron
  ColumnParallelLinear on the r-wide result (it all-reduces dz in backward, or all-gathers the
  r values per token under sequence parallelism -- r instead of d).
- blockshuffle: B1 replicated; its output is copied into (all-gathered over) the TP region,
  shuffled, and rank k applies its B2 blocks (blocks are sharded like the output rows).
fc2 (row-parallel: rank k reads its 1/t of the hidden units, the output is reduced)
- lowrank: V is a megatron RowParallelLinear f -> r (all-reduce, or reduce-scatter, of r values
  per token instead of d); U (d x r) and the bias replicated.
- blockdense: B's blocks sharded over ranks (rank k's blocks read exactly its hidden units and
  write its r/t slice); L is a megatron RowParallelLinear r -> d.
- blockshuffle: B1's blocks sharded; the outputs are all-gathered (scattered over the sequence
  under sequence parallelism), shuffled, B2 and the bias replicated.
Block counts must be divisible by t (2t for SwiGLU's fc1 in blockshuffle); config.py checks.

Self-guided: `guide` is a megatron Column/RowParallelLinear (dense, no bias) initialised to the
product of the factors; the output is alpha * guide + (1 - alpha) * structured, and the guide is
neither built nor computed once it is gone (alpha = 0; self_guided.py).

Every factor is drawn as a full tensor (structured.init_factors, the single-device reference's
code) and sliced by tp_layout's rule, so every TP degree starts from the same model. megatron's
sublayers draw their own (discarded) initial weights inside a forked RNG, leaving the global
stream to the factors: the same seed gives the reference's weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from afb_scale.model.structured import (
    Factor,
    block_diagonal,
    dense_equivalent,
    init_factors,
    shuffled_blocks,
)
from afb_scale.model.tp_layout import shard_full_tensor


def _tp(tp_group) -> tuple[int, int]:
    group = tp_group or parallel_state.get_tensor_model_parallel_group()
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _replicated(full: torch.Tensor, config) -> Factor:
    f = Factor(full.to(config.params_dtype).clone())
    set_tensor_model_parallel_attributes(f.weight, False, -1, 1)
    f.weight.sequence_parallel = config.sequence_parallel
    return f


def _sharded(full: torch.Tensor, dim: int, stride: int, rank: int, world: int, config) -> Factor:
    f = Factor(shard_full_tensor(full, dim, stride, rank, world).to(config.params_dtype).clone())
    set_tensor_model_parallel_attributes(f.weight, True, dim, stride)
    return f


@torch.no_grad()
def _set(param: torch.nn.Parameter, full: torch.Tensor, rank: int, world: int) -> None:
    """Overwrite a megatron layer's weight with its shard of `full` (its own partition rule)."""
    if getattr(param, "tensor_model_parallel", False):
        full = shard_full_tensor(full, param.partition_dim, getattr(param, "partition_stride", 1), rank, world)
    param.copy_(full)


class _StructuredBase(torch.nn.Module):
    def __init__(self, n, m, config, structure, rank, blocks, std, guide, tp_group):
        super().__init__()
        self.config, self.structure, self.blocks = config, structure, blocks
        self.tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
        self.tp_rank, self.tp_world = _tp(self.tp_group)
        self.sequence_parallel = config.sequence_parallel and self.tp_world > 1
        self.full_first, self.full_second = init_factors(structure, n, m, rank, blocks, std)
        self.has_guide = guide
        self.alpha = 1.0 if guide else 0.0

    def _guide_full(self, n):
        return dense_equivalent(self.structure, self.full_first, self.full_second, n)

    def _megatron(self, cls, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):  # its own init is overwritten; keep the stream
            return cls(*args, config=self.config, init_method=lambda w: None, is_expert=False,
                       tp_comm_buffer_name=None, tp_group=self.tp_group, skip_bias_add=True, **kwargs)

    def _mix(self, structured: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.guide is None or self.alpha == 0.0:
            return structured
        g, _ = self.guide(x)
        return self.alpha * g + (1.0 - self.alpha) * structured

    def _finish_init(self):
        del self.full_first, self.full_second  # only needed while building


class StructuredColumnLinear(_StructuredBase):
    """fc1: input [s(/t), b, n] -> output [s, b, m/t] (this rank's hidden units), bias separate."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = True,
                 gather_output: bool = False, skip_bias_add: bool = True, is_expert: bool = False,
                 tp_comm_buffer_name=None, tp_group=None, stride: int = 1, structure: str = "lowrank",
                 rank: int = 0, blocks: int = 1, guide: bool = False, **kwargs):
        if gather_output or not skip_bias_add or is_expert:
            raise ValueError("StructuredColumnLinear is an MLP fc1: gather_output=False, skip_bias_add=True, no experts")
        super().__init__(input_size, output_size, config, structure, rank, blocks, config.init_method_std, guide, tp_group)
        r, t = self.tp_rank, self.tp_world
        self.stride = stride
        if structure == "blockshuffle":
            self.first = _replicated(self.full_first, config)
            self.second = _sharded(self.full_second, 0, stride, r, t, config)
            self.register_buffer("block_ids", shard_full_tensor(torch.arange(blocks), 0, stride, r, t), persistent=False)
        else:
            self.first = _replicated(self.full_first, config)
            self.second = self._megatron(ColumnParallelLinear, self.full_second.shape[1], output_size, bias=False,
                                         gather_output=False, stride=stride)
            _set(self.second.weight, self.full_second, r, t)
        self.guide = None
        if guide:
            self.guide = self._megatron(ColumnParallelLinear, input_size, output_size, bias=False,
                                        gather_output=False, stride=stride)
            _set(self.guide.weight, self._guide_full(input_size), r, t)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size // t, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        self._finish_init()

    def forward(self, x):
        if self.structure == "blockshuffle":
            z = block_diagonal(x, self.first.weight)
            if self.sequence_parallel:
                z = mappings.gather_from_sequence_parallel_region(z, group=self.tp_group)
            else:
                z = mappings.copy_to_tensor_model_parallel_region(z, group=self.tp_group)
            out = shuffled_blocks(z, self.second.weight, self.block_ids, self.blocks)
        else:
            z = F.linear(x, self.first.weight) if self.structure == "lowrank" else block_diagonal(x, self.first.weight)
            out, _ = self.second(z)
        return self._mix(out, x), self.bias


class StructuredRowLinear(_StructuredBase):
    """fc2: input [s, b, n/t] (this rank's hidden units) -> output [s(/t), b, m], reduced; bias separate."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = True,
                 input_is_parallel: bool = True, skip_bias_add: bool = True, is_expert: bool = False,
                 tp_comm_buffer_name=None, tp_group=None, structure: str = "lowrank", rank: int = 0,
                 blocks: int = 1, guide: bool = False, **kwargs):
        if not input_is_parallel or not skip_bias_add or is_expert:
            raise ValueError("StructuredRowLinear is an MLP fc2: input_is_parallel=True, skip_bias_add=True, no experts")
        # megatron's output-layer init std (scaled by depth), as the dense fc2 would get it.
        std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        super().__init__(input_size, output_size, config, structure, rank, blocks, std, guide, tp_group)
        r, t = self.tp_rank, self.tp_world
        if structure == "lowrank":
            self.first = self._megatron(RowParallelLinear, input_size, rank, bias=False, input_is_parallel=True)
            _set(self.first.weight, self.full_first, r, t)
            self.second = _replicated(self.full_second, config)
        elif structure == "blockdense":
            self.first = _sharded(self.full_first, 0, 1, r, t, config)
            self.second = self._megatron(RowParallelLinear, rank, output_size, bias=False, input_is_parallel=True)
            _set(self.second.weight, self.full_second, r, t)
        else:
            self.first = _sharded(self.full_first, 0, 1, r, t, config)
            self.second = _replicated(self.full_second, config)
        self.guide = None
        if guide:
            self.guide = self._megatron(RowParallelLinear, input_size, output_size, bias=False, input_is_parallel=True)
            _set(self.guide.weight, self._guide_full(input_size), r, t)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
            self.bias.sequence_parallel = config.sequence_parallel
        self._finish_init()

    def forward(self, a):
        if self.structure == "lowrank":
            z, _ = self.first(a)
            out = F.linear(z, self.second.weight)
        elif self.structure == "blockdense":
            out, _ = self.second(block_diagonal(a, self.first.weight))
        else:
            z = mappings.gather_from_tensor_model_parallel_region(block_diagonal(a, self.first.weight), group=self.tp_group)
            if self.sequence_parallel:
                z = mappings.scatter_to_sequence_parallel_region(z, group=self.tp_group)
            out = shuffled_blocks(z, self.second.weight, None, self.blocks)
        return self._mix(out, a), self.bias


def structured_linears(mlp: torch.nn.Module) -> list[_StructuredBase]:
    """Every structured projection in a module tree (for the self-guided schedule)."""
    return [m for m in mlp.modules() if isinstance(m, _StructuredBase)]


def structured_mlp_spec(structure: str, rank: int, blocks: int, guide: bool) -> ModuleSpec:
    """megatron-core's MLP with structured fc1 / fc2 (GELU or SwiGLU by the TransformerConfig)."""
    params = {"structure": structure, "rank": rank, "blocks": blocks, "guide": guide}
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=ModuleSpec(module=StructuredColumnLinear, params=params),
            linear_fc2=ModuleSpec(module=StructuredRowLinear, params=params),
        ),
    )
