"""The single-device AFB-FFN: identity at init, gradients, and config errors."""

import pytest
import torch

from afb_scale.config import ConfigError, ModelConfig, validate_model
from afb_scale.model.afb import ReferenceAFBFFN


def _pair(base, bias):
    torch.manual_seed(0)
    afb = ReferenceAFBFFN(16, 48, base=base, feedback="afb", feedback_rank=8, bias=bias)
    plain = ReferenceAFBFFN(16, 48, base=base, feedback="none", bias=bias)
    plain.load_state_dict({k: v for k, v in afb.state_dict().items() if k in plain.state_dict()})
    return afb, plain


@pytest.mark.parametrize("base,bias", [("gelu", True), ("swiglu", False)])
def test_identity_at_init_is_bit_exact(base, bias):
    afb, plain = _pair(base, bias)
    x = torch.randn(5, 7, 16)
    assert torch.equal(afb(x), plain(x))
    # ...and only because Ub = Ug = 0: any feedback changes the output.
    with torch.no_grad():
        afb.Ug.normal_()
    assert not torch.allclose(afb(x), plain(x))


@pytest.mark.parametrize("base", ["gelu", "swiglu"])
def test_gradcheck_float64(base):
    torch.manual_seed(1)
    layer = ReferenceAFBFFN(6, 10, base=base, feedback="afb", feedback_rank=3, init_std=0.5).double()
    with torch.no_grad():
        layer.Ub.normal_(0, 0.5)
        layer.Ug.normal_(0, 0.5)
        layer.c.normal_(0, 0.5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_reference_stats_at_init():
    afb, _ = _pair("gelu", True)
    afb.collect_stats = True
    afb(torch.randn(3, 16))
    s = afb.last_stats
    # All gates at their initial value 1 (s = 0.5): one bit of entropy per unit, no correction.
    assert torch.isclose(s["entropy_bits"] / s["elements"], torch.tensor(1.0))
    assert s["db_sq"].item() == 0.0


@pytest.mark.parametrize(
    "changes,tp,message",
    [
        (dict(ffn_hidden_size=100), 3, "model.ffn_hidden_size=100 must be divisible by parallel.tensor=3"),
        (dict(feedback_rank=0), 1, "model.feedback_rank=0 must be >= 1"),
        (dict(ffn_kind="relu"), 1, "model.ffn_kind='relu' is not allowed; choose one of gelu, swiglu, afb-gelu, "
                                   "afb-swiglu, lowrank-gelu, lowrank-swiglu, blockdense-gelu, blockdense-swiglu, "
                                   "blockshuffle-gelu, blockshuffle-swiglu"),
        (dict(num_attention_heads=6, hidden_size=96), 4, "model.num_attention_heads=6 must be divisible by parallel.tensor=4"),
    ],
)
def test_bad_layer_configs(changes, tp, message):
    with pytest.raises(ConfigError) as e:
        validate_model(ModelConfig(**changes), tp)
    assert str(e.value) == message


def test_reference_rejects_bad_arguments():
    with pytest.raises(ValueError, match="feedback_rank=0 must be >= 1"):
        ReferenceAFBFFN(8, 16, feedback_rank=0)
    with pytest.raises(ValueError, match="base='relu' is not allowed"):
        ReferenceAFBFFN(8, 16, base="relu")
