"""The CUDA paths, on a machine with a GPU (skipped without one; their CPU twins are in
test_device.py). One process, world size 1: the checks that need no second GPU.

Run them where a GPU is: `python3 -m pytest -q tests/test_cuda.py`; `launch/gpu_smoke.sh` runs
the whole-job paths (precisions, checkpointing, resume, export).
"""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def one_rank():
    """A one-process NCCL group with megatron-core's groups and the model-parallel RNG."""
    from multiproc import free_port

    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import destroy_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    init_distributed(ParallelConfig(), seed=5)
    yield
    destroy_distributed()


def _gpt(attention, precision="fp32", ffn="afb-gelu", dropout=0.0):
    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.device import DTYPES
    from afb_scale.model.gpt import build_gpt_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_kind=ffn, feedback_rank=8,
                      seq_length=64, vocab_size=256, attention=attention, attention_dropout=dropout)
    # .to(dtype): megatron makes the position embedding in fp32; DeepSpeed casts the whole module.
    return build_gpt_model(cfg, ParallelConfig(), precision, seed=3).to("cuda", DTYPES[precision]), cfg


def _loss(model, cfg, seed=0):
    from afb_scale.model.gpt import causal_attention_mask, position_ids_for

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=g).cuda()
    mask = causal_attention_mask(cfg.seq_length, device="cuda")
    return model(tokens, position_ids_for(tokens), mask, labels=torch.roll(tokens, -1, 1)).float().mean()


def test_forward_backward_with_dropout_forks_the_seeded_rng(one_rank):
    # Item 1: megatron's attention forks "model-parallel-rng"; unseeded, this raised at step 0.
    for attention in ("sdpa", "local"):
        model, cfg = _gpt(attention, dropout=0.1)
        model.train()
        loss = _loss(model, cfg)
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("precision,tol", [("fp32", 2e-5), ("bf16", 2e-2)])
def test_sdpa_matches_local_attention_on_cuda(one_rank, precision, tol):
    losses, grads = {}, {}
    for attention in ("sdpa", "local"):
        model, cfg = _gpt(attention, precision)
        loss = _loss(model, cfg)
        loss.backward()
        losses[attention] = loss.item()
        grads[attention] = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    assert losses["sdpa"] == pytest.approx(losses["local"], rel=tol)
    for name, g in grads["local"].items():
        torch.testing.assert_close(grads["sdpa"][name], g, rtol=tol * 50, atol=tol, msg=name)


def test_layer_metrics_on_cuda(one_rank):
    # Item 2: the statistics' counts were CPU tensors stacked with CUDA sums.
    from afb_scale.metrics.layer_metrics import collect_layer_stats, reduce_layer_stats

    model, cfg = _gpt("sdpa")
    with torch.no_grad(), collect_layer_stats(model):
        _loss(model, cfg)
    stats = reduce_layer_stats(model)
    assert len(stats) == cfg.num_layers
    for st in stats.values():
        assert st.gate_entropy == pytest.approx(1.0)  # Ug = 0 at init: every gate at 1
        assert st.mean_activation.device.type == "cpu"  # gathered across ranks as objects


def test_rng_state_round_trip_is_this_device_only(one_rank):
    from afb_scale import device

    state = device.rng_state()
    assert isinstance(state["cuda"], torch.Tensor)  # this GPU's state, not a list of all of them
    a = torch.rand(4, device="cuda")
    device.set_rng_state(state)
    torch.testing.assert_close(torch.rand(4, device="cuda"), a, rtol=0, atol=0)
