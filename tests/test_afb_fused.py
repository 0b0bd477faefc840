"""The fused AFB feedback op (afb_scale/model/afb_fused.py) against the unfused math.

Forward and every gradient must equal the reference under autograd (the read, gelu, the write
and afb.feedback_hidden as plain torch ops) to 1e-6 in fp32 (relative to each tensor's largest
value), for the compiled bodies (inductor, compiled here once: conftest disables dynamo
elsewhere) and the eager ones; the op must keep only h, u, two tokens x r tensors and the
weights; a compile failure must fall back (auto) or fail loudly (on). Tensor-parallel ranks
(the all-reduces, c's gradient under sequence parallelism) are held to the single-device
reference in test_afb_tensor_parallel.py.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from afb_scale.model import afb_fused
from afb_scale.model.afb import feedback_hidden
from afb_scale.model.afb_fused import fused_feedback

SEQ, BATCH, F_UNITS, R = 6, 2, 40, 8


def _inputs(base, seed=0):
    """h and u as the two halves of one fc1 output (non-contiguous views, as in AFBMLP), the
    read's V and c, the [Ub; Ug] write weight and a probe for the loss."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * F_UNITS if base == "swiglu" else F_UNITS
    fc1 = torch.randn(SEQ, BATCH, width, generator=g).requires_grad_()
    read_weight = (torch.randn(R, F_UNITS, generator=g) / F_UNITS**0.5).requires_grad_()
    read_bias = (0.3 * torch.randn(R, generator=g)).requires_grad_()
    weight = (0.4 * torch.randn(2 * F_UNITS, R, generator=g)).requires_grad_()
    probe = torch.randn(SEQ, BATCH, F_UNITS, generator=g)
    return fc1, read_weight, read_bias, weight, probe


def _run(base, mode):
    fc1, read_weight, read_bias, weight, probe = _inputs(base)
    h, u = torch.chunk(fc1, 2, dim=-1) if base == "swiglu" else (fc1, None)
    if mode == "reference":
        z = F.gelu(F.linear(h, read_weight, read_bias))
        db, gl = torch.chunk(F.linear(z, weight), 2, dim=-1)
        a = feedback_hidden(h, u, db, gl)
    else:
        a, z = fused_feedback(h, u, read_weight, read_bias, weight, mode)
        assert not z.requires_grad
    # a second consumer of h, so dh from the op is accumulated with another gradient
    (a * probe).sum().add_((h * h).sum() * 0.1).backward()
    return a.detach(), z.detach(), fc1.grad, read_weight.grad, read_bias.grad, weight.grad


def _assert_matches_reference(base, mode):
    names = ("a", "z", "d fc1", "dV", "dc", "d [Ub; Ug]")
    for (name, got), want in zip(zip(names, _run(base, mode)), _run(base, "reference")):
        assert got.abs().sum() > 0, name
        # 1e-6 relative to each tensor's scale: the compiled erf differs from ATen's by a few ulp
        # (measured: 1.4e-6 absolute on a = -0.0067, where 1 + erf(p / sqrt 2) cancels)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale, msg=f"{name} ({base}, {mode})")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    afb_fused._compiled.cache_clear()
    yield
    afb_fused._compiled.cache_clear()


def test_compiled_bodies_match_reference(compiled):
    for base in ("gelu", "swiglu"):
        _assert_matches_reference(base, "on")
    fwd, bwd = afb_fused._compiled()
    assert fwd is not afb_fused._forward_body and bwd is not afb_fused._backward_body
    assert not afb_fused._compile_failed


@pytest.mark.parametrize("base", ["gelu", "swiglu"])
def test_eager_bodies_match_reference_and_are_exact_at_init(base):
    _assert_matches_reference(base, "auto")
    h = torch.randn(SEQ, BATCH, F_UNITS)
    u = torch.randn(SEQ, BATCH, F_UNITS) if base == "swiglu" else None
    a, _ = fused_feedback(h, u, torch.randn(R, F_UNITS), torch.randn(R), torch.zeros(2 * F_UNITS, R), "auto")
    assert torch.equal(a, F.gelu(h) if u is None else F.silu(h) * u)  # Ub = Ug = 0: the base FFN


def _saved_bytes(base, fused):
    fc1, read_weight, read_bias, weight, _ = _inputs(base)
    h, u = torch.chunk(fc1, 2, dim=-1) if base == "swiglu" else (fc1, None)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fused:
            fused_feedback(h, u, read_weight, read_bias, weight, "auto")
        else:
            z = F.gelu(F.linear(h, read_weight, read_bias))
            feedback_hidden(h, u, *torch.chunk(F.linear(z, weight), 2, dim=-1))
    return sum(storages.values())


@pytest.mark.parametrize("base", ["gelu", "swiglu"])
def test_fused_op_keeps_only_its_inputs_and_tokens_x_r(base):
    # the fc1 output (h, u), vh and z (tokens x r each) and the weights: no tokens x f tensor of its own
    floats = SEQ * BATCH * ((2 if base == "swiglu" else 1) * F_UNITS + 2 * R) + 3 * F_UNITS * R
    assert _saved_bytes(base, fused=True) == 4 * floats
    assert _saved_bytes(base, fused=False) > _saved_bytes(base, fused=True)


def test_compile_failure_falls_back_under_auto_and_fails_under_on(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(afb_fused, "_compiled", lambda: (broken, broken))
    monkeypatch.setattr(afb_fused, "_compile_failed", {})
    with pytest.raises(RuntimeError, match="afb_fused=on: torch.compile failed"):
        _run("gelu", "on")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_matches_reference("gelu", "auto")
    assert "no C++ compiler" in afb_fused._compile_failed["cpu"]
    assert any("runs its eager bodies" in str(w.message) for w in caught)


def test_bad_mode_is_rejected():
    from afb_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.afb_fused='fast' is not allowed; choose one of auto, on, off"):
        load_config(None, ["model.afb_fused=fast"])
    with pytest.raises(ValueError, match="afb_fused='fast' is not allowed"):
        fused_feedback(torch.zeros(1, 2), None, torch.zeros(3, 2), torch.zeros(3), torch.zeros(4, 3), "fast")
