"""The layer norms of every model: torch's LayerNorm / RMSNorm, the same on every machine.

megatron-core picks its norm by what is importable: Transformer Engine's where TE is installed
(NGC images), Apex's fused one where Apex is, torch's otherwise -- and torch's wrapper refuses
sequence parallelism (transformer/torch_norm.py), as does its RMSNorm everywhere. The same
config then built different models on different machines, and GPTModel's final norm differed
from the pipeline path's. This norm is always torch's, keeps the parameter names `weight` /
`bias` (checkpoints load across machines), and supports sequence parallelism: its parameters are
marked `sequence_parallel`, so their partial gradients are summed over the TP group
(parallel.sum_sequence_parallel_grads_over_tp), as megatron's own loop does for its norms.
"""

from __future__ import annotations

import torch


class Norm:
    """`Norm(config, hidden_size, eps)` -> torch.nn.LayerNorm or torch.nn.RMSNorm, per
    `config.normalization`; the signature megatron-core uses to build its norm submodules."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("Norm does not implement zero-centred gamma")
        # In the model's dtype, like megatron's own modules (DeepSpeed casts the rest anyway).
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: choose LayerNorm or RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
