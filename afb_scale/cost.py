"""Parameter count and training FLOPs per token of a ModelConfig, for MFU.

Notation: h = hidden_size, f = resolved_ffn_hidden_size, r = feedback_rank, s = seq_length,
L = num_layers, V = padded_vocab_size (what the embedding and output layer hold), b = 1 where
the linears have biases (`use_bias`), else 0.

Parameters (the GPTModel of model/gpt.py at TP = 1, exactly):

    embedding           V*h  (+ s*h learned position embedding for learned_absolute)
    per layer           qkv 3h*h + 3h*b,  proj h*h + h*b,  two norms 2 * n
                        fc1 h*f + f*b (gated: 2*h*f + 2*f*b),  fc2 f*h + h*b
                        AFB only: V r*f + c r + [Ub; Ug] 2*f*r (no bias)
    final norm          n
    output layer        V*h, only when the embedding is not tied

with n = 2h for LayerNorm (weight and bias) and h for RMSNorm (weight).

FLOPs per token (matmuls only, 2 FLOPs per multiply-add; norms, softmax, activations and the
loss are left out):

    per layer   qkv 2*3h^2 + attention 2*2*s*h + proj 2*h^2 + MLP 2*(2 or 3 gated)*h*f
                + AFB feedback 2*3*f*r
    logits      2*h*V
    training    3 x forward (backward = 2 x forward)

Conventions, the ones Megatron-LM and nanotron use and the MFU figures of llm-foundry and
nanotron are quoted with: attention scores (QK^T) and context (AV) are counted over the full
s x s matrix, not halved for causality; and these are *model* FLOPs, so activation
checkpointing's recomputed forward is not counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

from afb_scale.config import ModelConfig

# NVIDIA H100 SXM, dense bf16 tensor-core peak (the 1979 TFLOP/s of the data sheet is with sparsity).
H100_BF16_DENSE_PEAK = 989e12


def parameter_count(model: ModelConfig) -> int:
    """Exact number of parameters of build_gpt_model(model) at tensor-parallel degree 1."""
    h, f, r, V = model.hidden_size, model.resolved_ffn_hidden_size, model.feedback_rank, model.padded_vocab_size
    b = 1 if model.use_bias else 0
    norm = 2 * h if model.normalization == "LayerNorm" else h
    up = 2 if model.is_gated else 1
    layer = (
        3 * h * h + 3 * h * b  # qkv
        + h * h + h * b  # attention output projection
        + 2 * norm  # input and pre-MLP norms
        + up * (h * f + f * b)  # fc1 (W1, and W3 when gated)
        + f * h + h * b  # fc2
    )
    if model.is_afb:
        layer += r * f + r + 2 * f * r  # V, c, [Ub; Ug]
    total = V * h + model.num_layers * layer + norm
    if model.position_embedding_type == "learned_absolute":
        total += model.seq_length * h
    if not model.tie_embeddings:
        total += V * h
    return total


def flops_per_token(model: ModelConfig, training: bool = True) -> float:
    """Matmul FLOPs per token at sequence length model.seq_length (module docstring has the
    formula and its conventions: full s x s attention, no recompute); forward x 3 if training."""
    h, f, r, s = model.hidden_size, model.resolved_ffn_hidden_size, model.feedback_rank, model.seq_length
    layer = (
        2 * 3 * h * h  # qkv
        + 2 * 2 * s * h  # QK^T and AV over the full s x s
        + 2 * h * h  # output projection
        + 2 * (3 if model.is_gated else 2) * h * f  # MLP
    )
    if model.is_afb:
        layer += 2 * 3 * f * r  # V, Ub, Ug
    forward = model.num_layers * layer + 2 * h * model.padded_vocab_size
    return float(3 * forward if training else forward)


def mfu(tokens_per_second: float, model: ModelConfig, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak."""
    return tokens_per_second * flops_per_token(model, training=True) / peak_flops
