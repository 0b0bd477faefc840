"""afb_scale.cost: the parameter count matches the built GPTModel exactly; FLOPs per token match
a hand computation, and AFB adds exactly its feedback matmuls."""

import itertools

from multiproc import run_ranks

from afb_scale.config import FFN_KINDS, ModelConfig
from afb_scale.cost import H100_BF16_DENSE_PEAK, flops_per_token, mfu, parameter_count

# ffn kind x normalization x biases x tied embedding, plus rope (no position embedding table).
CASES = [
    dict(ffn_kind=k, normalization=n, add_bias_linear=b, tie_embeddings=t)
    for k, n, b, t in itertools.product(FFN_KINDS, ("LayerNorm", "RMSNorm"), (True, False), (True, False))
] + [dict(ffn_kind=k, position_embedding_type="rope") for k in FFN_KINDS]


def small(**kw) -> ModelConfig:
    # vocab 1000 pads to 1024; ffn default (4h, or 2/3 of it rounded up to 64 for SwiGLU).
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, feedback_rank=8,
                       seq_length=16, vocab_size=1000, **kw)


def _built_counts(rank, world):
    from afb_scale.model.gpt import build_gpt_model
    from afb_scale.parallel import init_distributed

    init_distributed(1, 1)
    return [sum(p.numel() for p in build_gpt_model(small(**case)).parameters()) for case in CASES]


def test_parameter_count_matches_built_model():
    [built] = run_ranks(_built_counts, 1)
    for case, n in zip(CASES, built):
        assert parameter_count(small(**case)) == n, case


def test_parameter_count_by_hand():
    # h=32, f=128, r=8, V=1024, s=16, LayerNorm, biases, tied.
    h, f, r, V, s = 32, 128, 8, 1024, 16
    layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * 2 * h + (h * f + f) + (f * h + h)
    base = V * h + s * h + 2 * layer + 2 * h
    assert parameter_count(small(ffn_kind="gelu")) == base
    assert parameter_count(small(ffn_kind="afb-gelu")) == base + 2 * (r * f + r + 2 * f * r)


def test_flops_per_token_by_hand():
    # L=2, h=64, f=256, s=128, vocab 8000 -> padded 8064.
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_kind="gelu",
                      seq_length=128, vocab_size=8000)
    layer = 2 * 3 * 64 * 64 + 2 * 2 * 128 * 64 + 2 * 64 * 64 + 2 * 2 * 64 * 256  # 131072
    forward = 2 * layer + 2 * 64 * 8064  # 1294336
    assert flops_per_token(cfg, training=False) == forward == 1_294_336
    assert flops_per_token(cfg) == 3 * forward == 3_883_008


def test_afb_adds_its_feedback_flops():
    for base in ("gelu", "swiglu"):
        b, a = small(ffn_kind=base), small(ffn_kind=f"afb-{base}")
        f, r = b.resolved_ffn_hidden_size, b.feedback_rank
        assert flops_per_token(a) - flops_per_token(b) == 3 * 2 * 3 * f * r * b.num_layers
        assert flops_per_token(a, False) - flops_per_token(b, False) == 2 * 3 * f * r * b.num_layers
    # SwiGLU's MLP has three h x f matmuls.
    g, s = small(ffn_kind="gelu", ffn_hidden_size=96), small(ffn_kind="swiglu", ffn_hidden_size=96)
    assert flops_per_token(s) - flops_per_token(g) == 3 * 2 * 32 * 96 * 2


def test_mfu():
    cfg = small(ffn_kind="gelu")
    tps = 1e6
    assert mfu(tps, cfg, H100_BF16_DENSE_PEAK) == tps * flops_per_token(cfg) / 989e12
