"""Build megatron-core GPT models from afb_scale's ModelConfig.

This module (with specs.py and parallel_afb.py) is the only place that touches megatron-core's
model APIs, which move fast (the MLP builder changed in 0.18, GPTModel is deprecated in 0.19).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from afb_scale.config import ModelConfig, ParallelConfig, validate_model
from afb_scale.device import DTYPES
from afb_scale.model.norm import Norm
from afb_scale.model.specs import transformer_layer_spec


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig = ParallelConfig(), precision: str = "fp32"
) -> TransformerConfig:
    validate_model(model, parallel.tensor)
    dtype = DTYPES[precision]
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.resolved_ffn_hidden_size,
        gated_linear_unit=model.is_gated,
        activation_func=F.silu if model.is_gated else F.gelu,
        add_bias_linear=model.use_bias,
        normalization=model.normalization,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        sequence_parallel=parallel.sequence_parallel,
        # The full tensor is drawn from the seed and then sliced, so every TP degree starts from
        # the same model (the GPU-side initialisation draws per-rank instead).
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Fused kernels are CUDA-only or need Apex/TE; the unfused paths compute the same math.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec_for(model: ModelConfig, seed: Optional[int]):
    structured = None
    if model.structure is not None:
        size = model.structured_size
        # self_guided here means "the guide exists in this build" (self_guided.config_at_step).
        structured = (size.rank, size.blocks, model.self_guided and model.guide_fraction > 0)
    return transformer_layer_spec(
        model.ffn_kind, model.feedback_rank, model.normalization, init_seed=seed, attention=model.attention,
        afb_fused=model.afb_fused,
        structured=structured,
    )


def block_spec_for(model: ModelConfig, config: TransformerConfig, seed: Optional[int]) -> TransformerBlockSubmodules:
    """This stage's layers and the final norm, named explicitly: given only a layer spec,
    megatron-core picks the final norm by what is importable (TE's in NGC images), so the same
    config built a different GPTModel on a GPU machine than the pipeline path does."""
    layers = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer_spec_for(model, seed)] * layers, layer_norm=Norm)


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig = ParallelConfig(),
    precision: str = "fp32",
    seed: int = 1234,
    pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:
    """A megatron-core GPTModel with the configured FFN kind, on CPU (move it afterwards).

    megatron-core's parallel_state must be initialised with the matching TP/PP sizes.
    """
    cfg = transformer_config(model, parallel, precision)
    torch.manual_seed(seed)  # embedding; each layer reseeds itself (SeededTransformerLayer)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=block_spec_for(model, cfg, seed),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding_type,
    )


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is *not* allowed.

    Always passed explicitly: megatron's default mask (transformer/utils.py:35) is made on CUDA.
    """
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
