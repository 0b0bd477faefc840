"""Structured FFN projections on one device (Wei et al., NeurIPS 2024): the readable math.

Each FFN projection `y = W x` (fc1: d -> f, or 2f for SwiGLU's [W1; W3]; fc2: f -> d) is
replaced by two factors, `first` then `second`:

- lowrank:      y = U (V x)              first V (r x n), second U (m x r)
- blockdense:   y = L (B x)              first B block-diagonal (nb blocks of r/nb x n/nb), second L (m x r)
- blockshuffle: y = B2 shuffle(B1 x)     first B1 (nb blocks of q x n/nb), second B2 (nb blocks of m/nb x q),
                                         q = min(n, m) / nb; `shuffle` is Monarch's transpose: block j of
                                         the second stage reads elements j, j+nb, j+2nb, ... of B1 x

Output units are block-contiguous (block j of B2 writes outputs j*m/nb ...), so a contiguous
tensor-parallel shard of the output is a contiguous range of blocks (parallel_structured.py).

Self-guided training: o = alpha * G x + (1 - alpha) * structured(x), G a dense guide that starts
as the product of the factors (`dense_equivalent`); alpha goes 1 -> 0 (self_guided.py), after
which the guide is not built at all.

Initialisation: lowrank from the SVD of a dense Gaussian with the dense layer's std
(V = sqrt(S) Vh[:r], U = U[:, :r] sqrt(S)); block and dense factors of the block kinds are
orthonormal (the paper's "ortho" post-init: U Vh of a Gaussian's SVD). Everything is drawn as full
tensors from torch's global RNG, so every tensor-parallel degree starts from the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRUCTURES = ("lowrank", "blockdense", "blockshuffle")
# Paper default for BlockDense's block count: small, and divisible by TP up to 4.
DEFAULT_DENSE_BLOCKS = 4
DEFAULT_SHARE = 0.63


# ----------------------------------------------------------------------------------------------
# The maps


def block_diagonal(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [..., nb * in_b] times a block-diagonal matrix given as blocks [nb, out_b, in_b]."""
    nb, out_b, in_b = blocks.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, nb, in_b).transpose(0, 1)  # [nb, tokens, in_b]: one batched matmul
    ys = torch.bmm(xs, blocks.transpose(1, 2))  # [nb, tokens, out_b]
    return ys.transpose(0, 1).reshape(*lead, nb * out_b)


def shuffle(z: torch.Tensor, nb: int) -> torch.Tensor:
    """[..., nb*q] -> [..., nb, q]: row j holds elements j, j+nb, j+2nb, ... of z (Monarch's
    transpose between the two block-diagonal stages)."""
    q = z.shape[-1] // nb
    return z.reshape(*z.shape[:-1], q, nb).transpose(-1, -2)


def shuffled_blocks(z: torch.Tensor, blocks: torch.Tensor, block_ids: torch.Tensor | None, nb: int) -> torch.Tensor:
    """The second BlockShuffle stage for the blocks `block_ids` of nb (all when None)."""
    zs = shuffle(z, nb)  # [..., nb, q]
    if block_ids is not None:
        zs = zs.index_select(-2, block_ids)
    lead = zs.shape[:-2]
    k, q = zs.shape[-2:]
    ys = torch.bmm(zs.reshape(-1, k, q).transpose(0, 1), blocks.transpose(1, 2))  # [k, tokens, out_b]
    return ys.transpose(0, 1).reshape(*lead, k * blocks.shape[1])


def structured_apply(structure: str, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The full (single-device) structured map."""
    if structure == "lowrank":
        return F.linear(F.linear(x, first), second)
    if structure == "blockdense":
        return F.linear(block_diagonal(x, first), second)
    if structure == "blockshuffle":
        return shuffled_blocks(block_diagonal(x, first), second, None, first.shape[0])
    raise ValueError(f"structure={structure!r} is not one of {', '.join(STRUCTURES)}")


@torch.no_grad()
def dense_equivalent(structure: str, first: torch.Tensor, second: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense [out, in] matrix of the map: the self-guided guide's initial value."""
    eye = torch.eye(in_features, dtype=torch.float64)
    return structured_apply(structure, eye, first.double(), second.double()).T.contiguous().to(first.dtype)


# ----------------------------------------------------------------------------------------------
# Shapes, sizes, initialisation


def factor_shapes(structure: str, n: int, m: int, rank: int, blocks: int) -> tuple[tuple, tuple]:
    """Full shapes of (first, second) for a projection n -> m."""
    if structure == "lowrank":
        return (rank, n), (m, rank)
    if structure == "blockdense":
        return (blocks, rank // blocks, n // blocks), (m, rank)
    if structure == "blockshuffle":
        q = min(n, m) // blocks
        return (blocks, q, n // blocks), (blocks, m // blocks, q)
    raise ValueError(f"structure={structure!r} is not one of {', '.join(STRUCTURES)}")


def projection_params(structure: str, n: int, m: int, rank: int, blocks: int) -> int:
    return sum(math.prod(s) for s in factor_shapes(structure, n, m, rank, blocks))


@dataclass(frozen=True)
class StructuredSize:
    structure: str
    rank: int  # lowrank / blockdense; 0 for blockshuffle
    blocks: int  # blockdense / blockshuffle; 1 for lowrank
    params: int  # weights of fc1 + fc2 (no biases, no guide)
    dense_params: int  # the dense FFN's weights it replaces

    @property
    def share(self) -> float:
        return self.params / self.dense_params


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, multiple * round(x / multiple))


def resolve_size(structure: str, d: int, f: int, gated: bool, share: float | None = None,
                 rank: int | None = None, blocks: int | None = None) -> StructuredSize:
    """Rank / block count for a parameter share of the dense FFN (explicit rank / blocks win).

    The share counts weights of fc1 (d -> f, or 2f gated) and fc2 (f -> d). Ranks are rounded
    to multiples of 8 (and of the block count), block counts to the nearest integer, so the
    achieved share is close to, not exactly, the requested one (`StructuredSize.share`).
    """
    m1 = 2 * f if gated else f
    dense = d * m1 + f * d
    share = DEFAULT_SHARE if share is None else share

    def total(r: int, nb: int) -> int:
        return projection_params(structure, d, m1, r, nb) + projection_params(structure, f, d, r, nb)

    if structure == "lowrank":
        r = rank if rank is not None else _round_to(share * dense / total(1, 1), 8)
        nb = 1
    elif structure == "blockdense":
        nb = blocks if blocks is not None else DEFAULT_DENSE_BLOCKS
        # total(r, nb) is linear in r for r a multiple of nb
        r = rank if rank is not None else _round_to(share * dense / (total(nb, nb) / nb), math.lcm(8, nb))
    elif structure == "blockshuffle":
        r = 0
        nb = blocks if blocks is not None else max(1, round(total(0, 1) / (share * dense)))
    else:
        raise ValueError(f"structure={structure!r} is not one of {', '.join(STRUCTURES)}")
    return StructuredSize(structure, r, nb, total(r, nb), dense)


def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    """U Vh of a Gaussian's SVD: orthonormal rows or columns (whichever are fewer)."""
    u, _, vh = torch.linalg.svd(torch.randn(rows, cols, dtype=torch.float64), full_matrices=False)
    return (u @ vh).float()


@torch.no_grad()
def init_factors(structure: str, n: int, m: int, rank: int, blocks: int, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 (first, second) for a projection n -> m, drawn from torch's global RNG."""
    s1, s2 = factor_shapes(structure, n, m, rank, blocks)
    if structure == "lowrank":
        dense = torch.randn(m, n, dtype=torch.float64) * std
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        root = s[:rank].sqrt()
        first = root[:, None] * vh[:rank]
        second = u[:, :rank] * root[None, :]
        if rank > min(n, m):  # more rank than the matrix has: the rest starts at zero
            first = torch.cat([first, first.new_zeros(rank - first.shape[0], n)])
            second = torch.cat([second, second.new_zeros(m, rank - second.shape[1])], dim=1)
        return first.float().contiguous(), second.float().contiguous()
    blocks1 = torch.stack([_orthonormal(*s1[1:]) for _ in range(s1[0])])
    if structure == "blockdense":
        return blocks1, _orthonormal(*s2)
    return blocks1, torch.stack([_orthonormal(*s2[1:]) for _ in range(s2[0])])


# ----------------------------------------------------------------------------------------------
# The single-device reference FFN


class Factor(nn.Module):
    """Holds one factor as `.weight`, so parameter names read `first.weight`, `second.weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class ReferenceStructuredLinear(nn.Module):
    """o = alpha * guide x + (1 - alpha) * structured(x) (+ bias); the guide only if `guide`."""

    def __init__(self, structure: str, n: int, m: int, rank: int, blocks: int, std: float,
                 bias: bool, guide: bool):
        super().__init__()
        self.structure, self.in_features = structure, n
        first, second = init_factors(structure, n, m, rank, blocks, std)
        self.first, self.second = Factor(first), Factor(second)
        self.guide = Factor(dense_equivalent(structure, first, second, n)) if guide else None
        self.bias = nn.Parameter(torch.zeros(m)) if bias else None
        self.alpha = 1.0 if guide else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = structured_apply(self.structure, x, self.first.weight, self.second.weight)
        if self.guide is not None and self.alpha != 0.0:
            out = self.alpha * F.linear(x, self.guide.weight) + (1.0 - self.alpha) * out
        return out if self.bias is None else out + self.bias


class ReferenceStructuredFFN(nn.Module):
    """The structured FFN on one device; parameter names match megatron's MLP with the
    tensor-parallel structured linears (linear_fc1.first.weight, ...), so full states load
    into either. SwiGLU's fc1 maps d -> 2f, output [gate; up]."""

    def __init__(self, structure: str, hidden_size: int, ffn_hidden_size: int, gated: bool, rank: int,
                 blocks: int, bias: bool = True, guide: bool = True, init_std: float = 0.02, num_layers: int = 1):
        super().__init__()
        d, f = hidden_size, ffn_hidden_size
        self.gated = gated
        self.linear_fc1 = ReferenceStructuredLinear(structure, d, 2 * f if gated else f, rank, blocks, init_std, bias, guide)
        # megatron's output-layer init: std / sqrt(2 * layers)
        self.linear_fc2 = ReferenceStructuredLinear(structure, f, d, rank, blocks, init_std / math.sqrt(2 * num_layers),
                                                    bias, guide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = torch.chunk(h, 2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(h)
        return self.linear_fc2(a)
