"""Fused causal core attention: torch's scaled_dot_product_attention as a megatron-core submodule.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] scores (in fp32
for softmax) and a second [b, heads, s, s] tensor of probabilities; at 125M and seq 2048 that
costs several times the attention matmuls. `F.scaled_dot_product_attention(..., is_causal=True)`
computes the same function with flash / memory-efficient kernels on GPU and a fused kernel on
CPU, so the CPU tests run the code GPU jobs run. It has no parameters, so checkpoints keep
their names and either attention loads the other's checkpoints.

Causal masking only: every sample is `seq_length` long and attends causally (the model always
passes the full causal mask, which this module does not need to read).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's `DotProductAttention` (the `core_attention` submodule):
    q, k, v [s, b, heads/t, head_dim] -> context [s, b, heads/t * head_dim]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **kwargs,  # cp_comm_type, pg_collection, and what newer megatron-core versions pass
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla" or config.window_size:
            raise ValueError("SDPAttention supports plain causal softmax attention only")
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        t = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, t)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, t)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes neither packed sequences nor an attention bias")
        s, b = query.shape[0], query.shape[1]
        repeat = self.heads_per_partition // self.groups_per_partition
        if repeat > 1:  # grouped-query attention: each key/value head serves `repeat` query heads
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        # [s, b, h, d] -> [b, h, s, d], the layout SDPA's kernels take.
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Heads are split over TP ranks: draw their dropout from megatron's model-parallel
            # RNG, as DotProductAttention does (a no-op tracker without CUDA, compat/megatron.py).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                         scale=self.softmax_scale)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax_scale)
        # [b, h, s, d] -> [s, b, h * d]
        return context.permute(2, 0, 1, 3).reshape(s, b, -1)
