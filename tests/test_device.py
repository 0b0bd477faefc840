"""GPU readiness, checked on CPU: the decisions afb_scale/device.py makes, the device arguments of
metric tensors, the precision x ZeRO rules, DeepSpeed config generation, the norms and the fused
attention. (The same paths on a GPU: tests/test_cuda.py and launch/gpu_smoke.sh.)"""

import pytest
import torch

from multiproc import run_ranks


@pytest.mark.parametrize("local_rank,count,expected", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (0, 1, 0)])
def test_device_index_for_a_local_rank(local_rank, count, expected):
    from afb_scale.device import local_device_index

    # srun --gpu-bind shows each task one GPU while LOCAL_RANK counts the node's tasks.
    assert local_device_index(local_rank, count) == expected


def test_device_index_refuses_a_rank_without_a_gpu(monkeypatch):
    from afb_scale.device import local_device_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=3 but only 2 CUDA devices are visible \(CUDA_VISIBLE_DEVICES=0,1\)"):
        local_device_index(3, 2)


def test_feedback_statistics_stay_on_the_activations_device():
    # On CUDA the counts were made on the CPU and then stacked with CUDA sums. The meta device
    # catches the same mistake here: stacking a CPU tensor with meta tensors raises.
    from afb_scale.model.afb import feedback_statistics

    h = torch.empty(3, 5, 16, device="meta")
    stats = feedback_statistics(h, h, h, h)
    assert {t.device.type for t in stats.values()} == {"meta"}
    torch.stack([stats[k] for k in ("entropy_bits", "elements", "db_sq", "h_sq")])


def test_rng_state_on_cpu_has_no_cuda_part():
    from afb_scale import device

    state = device.rng_state()
    assert set(state) == {"torch"}
    a = torch.rand(3)
    device.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def _ds_config(*overrides, world=4):
    from afb_scale.config import load_config, validate
    from afb_scale.parallel.layout import ParallelLayout
    from afb_scale.training.engine import deepspeed_config

    cfg = load_config("configs/quickstart.yaml", list(overrides))
    validate(cfg, world, cuda_available=True)
    return deepspeed_config(cfg, ParallelLayout.of(cfg.parallel, world))


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    ds = _ds_config("train.precision=bf16", "parallel.zero_stage=1")
    assert ds["bf16"]["enabled"] and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    assert "data_types" not in _ds_config("train.precision=fp16", "parallel.zero_stage=1")


def test_pipeline_sends_sequence_parallel_activations_whole():
    sp = _ds_config("parallel.pipeline=2", "parallel.zero_stage=1", "parallel.sequence_parallel=true")
    assert sp["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    plain = _ds_config("parallel.pipeline=2", "parallel.zero_stage=1")
    assert plain["pipeline"] == {"pipe_partitioned": True, "grad_partitioned": True}


@pytest.mark.parametrize("zero_stage,ok", [(0, False), (1, True), (2, False), (3, True)])
def test_supported_bf16_zero_stages(zero_stage, ok):
    from afb_scale.config import ConfigError

    if ok:
        _ds_config("train.precision=bf16", f"parallel.zero_stage={zero_stage}")
    else:
        with pytest.raises(ConfigError, match=f"train.precision=bf16 with parallel.zero_stage={zero_stage}"):
            _ds_config("train.precision=bf16", f"parallel.zero_stage={zero_stage}")


def _model_norms(rank, world, normalization, sequence_parallel):
    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.model.gpt import build_gpt_model
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig(tensor=world))
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
                      normalization=normalization)
    model = build_gpt_model(cfg, ParallelConfig(tensor=world, sequence_parallel=sequence_parallel))
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    marks = {getattr(p, "sequence_parallel", None) for m in norms for p in m.parameters()}
    return type(model.decoder.final_layernorm).__name__, len(norms), marks


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_norms_are_torch_and_marked_for_sequence_parallel(normalization):
    # The final norm is named explicitly (model/norm.py): with Transformer Engine or Apex
    # importable megatron-core would otherwise pick theirs for GPTModel but not the pipeline.
    final, count, marks = run_ranks(_model_norms, 2, normalization, True)[0]
    assert final == normalization and count == 2 * 2 + 1
    assert marks == {True}  # their gradients get summed over TP (parallel.py)
    assert run_ranks(_model_norms, 1, normalization, False)[0][2] == {False}


def _sdpa_vs_local(rank, world, dropout):
    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig(tensor=world))
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    out = {}
    for attention in ("sdpa", "local"):
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
                          attention=attention, attention_dropout=dropout)
        model = build_gpt_model(cfg, ParallelConfig(tensor=world), seed=9)
        torch.manual_seed(0)
        loss = model(tokens, position_ids_for(tokens), causal_attention_mask(16), labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        out[attention] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_sdpa_attention_matches_megatron_attention(world):
    for out in run_ranks(_sdpa_vs_local, world, 0.0):
        (loss_s, grads_s), (loss_l, grads_l) = out["sdpa"], out["local"]
        assert grads_s.keys() == grads_l.keys()  # no parameters of its own: checkpoints interchange
        assert loss_s == pytest.approx(loss_l, rel=1e-5)
        for name in grads_l:
            torch.testing.assert_close(grads_s[name], grads_l[name], rtol=1e-5, atol=1e-6, msg=name)


def _any_rank(rank, world):
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import any_rank, init_distributed

    init_distributed(ParallelConfig())
    return any_rank(torch.device("cpu"), rank == 1, False, rank == 0)


def test_flags_agreed_in_one_all_reduce():
    assert run_ranks(_any_rank, 2) == [[True, False, True]] * 2
