"""Layer metrics: the TP=2 layer reports what the reference computes; off means off."""

import math

import pytest
import torch

from multiproc import run_ranks
from test_afb_tensor_parallel import D, F_HIDDEN, R, _reference


def _reference_stats(base):
    from afb_scale.metrics.layer_metrics import collect_layer_stats, reduce_layer_stats
    from afb_scale.model.afb import ReferenceAFBFFN

    state, x, *_ = _reference(base)
    ref = ReferenceAFBFFN(D, F_HIDDEN, base=base, feedback_rank=R, bias=base == "gelu")
    ref.load_state_dict(state)
    with collect_layer_stats(ref):
        ref(x)
    [stats] = reduce_layer_stats(ref).values()
    # Independent statement of the definitions, straight from the design page.
    with torch.no_grad():
        h = x @ state["W1"].T + (state["b1"] if "b1" in state else 0)
        z = torch.nn.functional.gelu(h @ state["V"].T + state["c"])
        db, s = z @ state["Ub"].T, torch.sigmoid(z @ state["Ug"].T)
        entropy = (-(s * s.log() + (1 - s) * (1 - s).log()) / math.log(2)).mean().item()
        ratio = (db.pow(2).mean().sqrt() / h.pow(2).mean().sqrt()).item()
    return state, x, stats, entropy, ratio


def _tp_stats(rank, world, base, state, x):
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.metrics.layer_metrics import collect_layer_stats, reduce_layer_stats
    from afb_scale.model.gpt import transformer_config
    from afb_scale.model.parallel_afb import megatron_state_from_reference
    from afb_scale.model.specs import transformer_layer_spec
    from afb_scale.model.tp_layout import load_full_state
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig(tensor=world))
    cfg = ModelConfig(hidden_size=D, num_attention_heads=4, ffn_hidden_size=F_HIDDEN, ffn_kind=f"afb-{base}", feedback_rank=R)
    mlp = build_module(transformer_layer_spec(cfg.ffn_kind, R).submodules.mlp, config=transformer_config(cfg, ParallelConfig(tensor=world)))
    load_full_state(mlp, megatron_state_from_reference(state, base == "swiglu"), rank, world)
    out_off, _ = mlp(x)
    assert mlp.last_stats is None  # off by default: nothing is computed
    with collect_layer_stats(mlp):
        out_on, _ = mlp(x)
    assert torch.equal(out_on, out_off)  # measuring does not change the computation
    [stats] = reduce_layer_stats(mlp, parallel_state.get_tensor_model_parallel_group()).values()
    return stats


@pytest.mark.parametrize("base", ["gelu", "swiglu"])
def test_layer_metrics_match_definition_at_tp2(base):
    state, x, ref_stats, entropy, ratio = _reference_stats(base)
    assert ref_stats.gate_entropy == pytest.approx(entropy, rel=1e-5)
    assert ref_stats.bias_correction_ratio == pytest.approx(ratio, rel=1e-5)
    assert 0.0 < entropy < 1.0 and ratio > 0.0  # non-trivial feedback: not the init values
    for st in run_ranks(_tp_stats, 2, base, state, x):
        assert st.gate_entropy == pytest.approx(entropy, rel=1e-5)
        assert st.bias_correction_ratio == pytest.approx(ratio, rel=1e-5)
        torch.testing.assert_close(st.mean_activation, ref_stats.mean_activation, rtol=1e-5, atol=1e-6)


def test_activation_drift():
    from afb_scale.metrics.layer_metrics import ActivationDrift, LayerStats

    drift = ActivationDrift()
    assert drift.update({"l0": LayerStats(1.0, 0.0, torch.tensor([3.0, 4.0]))}) == {}
    d = drift.update({"l0": LayerStats(1.0, 0.0, torch.tensor([3.0, 4.0 + 5.0]))})
    assert d["l0"] == pytest.approx(1.0)  # ||(0, 5)|| / ||(3, 4)||
