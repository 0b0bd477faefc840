"""megatron-core layer specs for each FFN kind: gelu | swiglu | afb-gelu | afb-swiglu, and the
structured comparators lowrank- / blockdense- / blockshuffle- x gelu / swiglu.

All four start from megatron-core's local (non-Transformer-Engine) GPT layer spec: swapping the
MLP inside the TE spec would drop the pre-MLP layernorm, which TE fuses into fc1. GELU vs
SwiGLU is a TransformerConfig matter (`gated_linear_unit`, see gpt.py), so the baselines keep
megatron's own MLP and the AFB kinds swap in `AFBMLP`, which extends it; the structured kinds
keep megatron's MLP with structured fc1 / fc2 (parallel_structured.py).

Two parts of the local spec are replaced on every machine: the norms (norm.py: megatron picks
TE's, Apex's or torch's by what is importable, and torch's refuses sequence parallelism) and, with
`attention="sdpa"` (the default), the core attention (attention.py: fused, no s x s scores).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from afb_scale.config import ATTENTION_KINDS, FFN_KINDS, ConfigError
from afb_scale.model.attention import SDPAttention
from afb_scale.model.norm import Norm
from afb_scale.model.parallel_afb import afb_mlp_spec
from afb_scale.model.parallel_structured import structured_mlp_spec


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer whose initial weights depend only on (init_seed, layer_number).

    Reseeding before each layer is built makes the model independent of how layers are split
    across pipeline stages: a stage that builds layers 13..24 initialises them exactly as a
    one-stage model would. Together with megatron's CPU initialisation (full tensor from the
    seed, then sliced), every TP x PP layout starts from the same full model.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: Optional[int] = None, **kwargs):
        if init_seed is not None:
            torch.manual_seed(init_seed * 1000 + layer_number)
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def transformer_layer_spec(
    ffn_kind: str,
    feedback_rank: int = 64,
    normalization: str = "LayerNorm",
    init_seed: Optional[int] = None,
    feedback_out_init_std: float = 0.0,
    attention: str = "sdpa",
    afb_fused: str = "auto",
    structured: Optional[tuple[int, int, bool]] = None,
) -> ModuleSpec:
    """The TransformerLayer spec for one FFN kind; `structured` = (rank, blocks, guide) for the
    structured kinds (ModelConfig.structured_size; the guide's presence by self_guided.py)."""
    if ffn_kind not in FFN_KINDS:
        raise ConfigError(f"model.ffn_kind={ffn_kind!r} is not allowed; choose one of {', '.join(FFN_KINDS)}")
    if attention not in ATTENTION_KINDS:
        raise ConfigError(f"model.attention={attention!r} is not allowed; choose one of {', '.join(ATTENTION_KINDS)}")
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.module = SeededTransformerLayer
    spec.params = {**(spec.params or {}), "init_seed": init_seed}
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if ffn_kind.startswith("afb-"):
        spec.submodules.mlp = afb_mlp_spec(feedback_rank, feedback_out_init_std, afb_fused)
    elif ffn_kind.split("-")[0] in ("lowrank", "blockdense", "blockshuffle"):
        if structured is None:
            raise ValueError(f"ffn_kind={ffn_kind!r} needs structured=(rank, blocks, guide)")
        spec.submodules.mlp = structured_mlp_spec(ffn_kind.split("-")[0], *structured)
    return spec
