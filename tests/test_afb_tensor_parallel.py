"""Tensor-parallel AFB MLP against the single-device reference, on real gloo ranks.

Forward outputs and the gradients of the input and of every parameter (shards gathered to
full tensors) must match the reference to 1e-5 at TP = 1, 2, 4, with and without sequence
parallelism, after the feedback weights are set to non-zero values -- with the fused hidden-unit
op (model.afb_fused=auto; its eager bodies here, as conftest disables dynamo) and without it
(off), both in the same ranks.
"""

import pytest
import torch

from multiproc import run_ranks
from reference_cases import reference_step

D, F_HIDDEN, R, SEQ, BATCH = 16, 32, 8, 8, 3


def _reference(base, seed=0):
    from afb_scale.model.afb import ReferenceAFBFFN

    torch.manual_seed(seed)
    ref = ReferenceAFBFFN(D, F_HIDDEN, base=base, feedback="afb", feedback_rank=R, bias=base == "gelu", init_std=0.2)
    with torch.no_grad():  # non-zero feedback, so every path through the layer matters
        ref.Ub.normal_(0, 0.3)
        ref.Ug.normal_(0, 0.3)
        ref.c.normal_(0, 0.3)
        if ref.b1 is not None:
            ref.b1.normal_(0, 0.1)
            ref.b2.normal_(0, 0.1)
    return reference_step(ref, SEQ, BATCH, D)


def _tp_rank(rank, world, base, sequence_parallel, state, x, probe):
    from megatron.core.transformer.spec_utils import build_module

    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.model.gpt import transformer_config
    from afb_scale.model.parallel_afb import AFBMLP, megatron_state_from_reference
    from afb_scale.model.specs import transformer_layer_spec
    from afb_scale.model.tp_layout import load_full_state
    from afb_scale.parallel.groups import init_distributed, sum_sequence_parallel_grads_over_tp

    init_distributed(ParallelConfig(tensor=world))
    model_cfg = ModelConfig(hidden_size=D, num_attention_heads=4, ffn_hidden_size=F_HIDDEN,
                            ffn_kind=f"afb-{base}", feedback_rank=R)
    tc = transformer_config(model_cfg, ParallelConfig(tensor=world, sequence_parallel=sequence_parallel))
    spec = transformer_layer_spec(model_cfg.ffn_kind, R).submodules.mlp
    mlp = build_module(spec, config=tc)
    assert isinstance(mlp, AFBMLP)
    full = megatron_state_from_reference(state, gated=base == "swiglu")
    load_full_state(mlp, full, rank, world)

    chunk = SEQ // world
    seq_slice = slice(rank * chunk, (rank + 1) * chunk) if sequence_parallel else slice(None)
    if sequence_parallel:
        # Replicated parameters see only their rank's tokens: the engine's hook sums them over TP.
        assert sum_sequence_parallel_grads_over_tp(mlp) > 0
    return {fused: _tp_step(mlp, fused, x, probe, seq_slice, sequence_parallel, world) for fused in ("auto", "off")}


def _tp_step(mlp, fused, x, probe, seq_slice, sequence_parallel, world):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from afb_scale.model.tp_layout import gather_full_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    mlp.fused = fused
    mlp.zero_grad(set_to_none=True)
    x_local = x[seq_slice].clone().requires_grad_()
    out, bias = mlp(x_local)
    if bias is not None:
        out = out + bias
    (out * probe[seq_slice]).sum().backward()

    params = dict(mlp.named_parameters())
    grads = {n: p.grad for n, p in params.items()}
    full_grads = gather_full_state(grads, params, tp_group)
    if sequence_parallel:
        outs = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(outs, out.detach().contiguous(), group=tp_group)
        xg = [torch.empty_like(x_local) for _ in range(world)]
        dist.all_gather(xg, x_local.grad.contiguous(), group=tp_group)
        out_full, x_grad = torch.cat(outs), torch.cat(xg)
    else:
        out_full, x_grad = out.detach(), x_local.grad
    return out_full, x_grad, full_grads


@pytest.mark.parametrize("base", ["gelu", "swiglu"])
@pytest.mark.parametrize(
    "world,sequence_parallel", [(1, False), (2, False), (4, False), (2, True), (4, True)]
)
def test_tensor_parallel_matches_reference(base, world, sequence_parallel):
    from afb_scale.model.parallel_afb import megatron_state_from_reference

    state, x, probe, y_ref, x_grad_ref, grads_ref = _reference(base)
    expected = megatron_state_from_reference(grads_ref, gated=base == "swiglu")
    results = run_ranks(_tp_rank, world, base, sequence_parallel, state, x, probe)
    for rank, by_mode in enumerate(results):
        assert set(by_mode) == {"auto", "off"}
        for fused, (y, x_grad, grads) in by_mode.items():
            where = f"rank {rank}, afb_fused={fused}"
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=f"output, {where}")
            torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-5, atol=1e-5, msg=f"input grad, {where}")
            assert set(grads) == set(expected)
            for name, g in grads.items():
                assert g.abs().sum() > 0, f"{name} got no gradient ({where})"
                torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-5, msg=f"grad {name}, {where}")


def _identity_rank(rank, world, base):
    """At TP=1, AFBMLP with zero feedback equals megatron's own MLP bit for bit."""
    from megatron.core.transformer.spec_utils import build_module

    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.model.gpt import transformer_config
    from afb_scale.model.specs import transformer_layer_spec
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())
    out = {}
    for kind in (base, f"afb-{base}"):
        cfg = ModelConfig(hidden_size=D, num_attention_heads=4, ffn_hidden_size=F_HIDDEN, ffn_kind=kind, feedback_rank=R)
        tc = transformer_config(cfg, ParallelConfig())
        torch.manual_seed(3)
        out[kind] = build_module(transformer_layer_spec(kind, R).submodules.mlp, config=tc, ffn_hidden_size=F_HIDDEN)
    afb, plain = out[f"afb-{base}"], out[base]
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(afb.named_parameters())[name]), name
    x = torch.randn(SEQ, BATCH, D)
    y_plain, b_plain = plain(x)
    y_afb, b_afb = afb(x)
    return torch.equal(y_plain, y_afb) and (b_plain is None or torch.equal(b_plain, b_afb))


@pytest.mark.parametrize("base", ["gelu", "swiglu"])
def test_afb_mlp_is_megatron_mlp_at_init(base):
    assert run_ranks(_identity_rank, 1, base) == [True]
