"""afb_scale.cost: the parameter count matches the built GPTModel exactly (per tensor-parallel
rank too); FLOPs per token match a hand computation and torch's FLOP counter on a real forward +
backward, and AFB adds exactly its feedback matmuls; the memory model matches the H100
measurements of docs/results/gpu.md and partitions, shards and checkpoints as it should."""

import dataclasses
import itertools
import json
import os
import re

import pytest
from conftest import ROOT
from multiproc import run_ranks

from afb_scale.config import FFN_KINDS, STRUCTURED_FFN_KINDS, ModelConfig
from afb_scale.cost import (GIB, H100_BF16_DENSE_PEAK, Layout, _partition_intersecting, flops_per_token,
                            layer_activation_bytes, memory_per_device, mfu, parameter_count, rank_parameters)

# ffn kind x normalization x biases x tied embedding, plus rope (no position embedding table).
CASES = [
    dict(ffn_kind=k, normalization=n, add_bias_linear=b, tie_embeddings=t)
    for k, n, b, t in itertools.product(FFN_KINDS, ("LayerNorm", "RMSNorm"), (True, False), (True, False))
] + [dict(ffn_kind=k, position_embedding_type="rope") for k in FFN_KINDS]


def small(**kw) -> ModelConfig:
    # vocab 1000 pads to 1024; ffn default (4h, or 2/3 of it rounded up to 64 for SwiGLU).
    if kw.get("ffn_kind", "").split("-")[0] in ("lowrank", "blockdense", "blockshuffle"):
        kw.setdefault("structured_share", 0.32)  # blockshuffle: 4 blocks, which shard at TP=2 for SwiGLU too
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, feedback_rank=8,
                       seq_length=16, vocab_size=1000, **kw)


def _built_counts(rank, world):
    from afb_scale.model.gpt import build_gpt_model
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())
    return [sum(p.numel() for p in build_gpt_model(small(**case)).parameters()) for case in CASES]


def test_parameter_count_matches_built_model():
    [built] = run_ranks(_built_counts, 1)
    for case, n in zip(CASES, built):
        assert parameter_count(small(**case)) == n, case


def _built_per_rank(rank, world):
    from afb_scale.config import ParallelConfig
    from afb_scale.model.gpt import build_gpt_model
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig(tensor=world))
    return [{k: p.numel() for k, p in build_gpt_model(small(**case), ParallelConfig(tensor=world)).named_parameters()}
            for case in CASES[::5]]


def test_rank_parameters_match_the_built_model_at_tp2():
    for rank, built in enumerate(run_ranks(_built_per_rank, 2)):
        for case, names in zip(CASES[::5], built):
            assert rank_parameters(small(**case), tensor=2) == names, (rank, case)


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


# ---------------------------------------------------------------------------------------------
# FLOPs counted by torch in a real forward + backward of the model (torch.utils.flop_counter)

FLOP_SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, feedback_rank=8, seq_length=64, vocab_size=1000),
    # the 125M preset's shape (hidden 768, 12 heads, seq 2048, vocabulary 32000) with one layer
    "125m-one-layer": dict(num_layers=1, hidden_size=768, num_attention_heads=12, feedback_rank=64, seq_length=2048,
                           vocab_size=32000),
}


DENSE_KINDS = [k for k in FFN_KINDS if k not in STRUCTURED_FFN_KINDS]
# Model FLOPs are counted on the unfused AFB path: the fused op (model.afb_fused) also recomputes
# its write GEMM in backward, hardware work that MFU does not count (the SDPA set runs it).
LOCAL = [ModelConfig(ffn_kind=kind, attention="local", afb_fused="off", **shape)
         for shape in FLOP_SHAPES.values() for kind in DENSE_KINDS]
SDPA = [ModelConfig(ffn_kind=kind, **FLOP_SHAPES["tiny"]) for kind in DENSE_KINDS]
# Structured kinds without their guide (the steady state the FLOP formula counts), tiny shape:
# their block-diagonal factors run as bmm, so only the total is compared.
STRUCTURED = [ModelConfig(ffn_kind=kind, attention="local", self_guided=False, structured_share=share,
                          **FLOP_SHAPES["tiny"]) for kind in STRUCTURED_FFN_KINDS for share in (0.63, 0.32)]
RECOMPUTE = [ModelConfig(ffn_kind=kind, attention="local", afb_fused="off", **FLOP_SHAPES["tiny"])
             for kind in ("gelu", "afb-swiglu")]


def _counted_flops(rank, world):
    """FLOPs FlopCounterMode counts in one forward + backward (batch 1) of each model of LOCAL,
    SDPA and RECOMPUTE (the last with megatron's full activation recompute, as Engine sets it
    for train.activation_checkpointing): (total, by op) per model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for
    from afb_scale.model.lm_loss import LMLoss
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())
    torch.set_num_threads(2)

    def count(model, recompute=False):
        gpt = build_gpt_model(model)
        if recompute:
            gpt.config.recompute_granularity, gpt.config.recompute_method = "full", "uniform"
            gpt.config.recompute_num_layers = 1
        tokens = torch.randint(0, model.vocab_size, (1, model.seq_length))
        with FlopCounterMode(display=False) as counter:
            logits = gpt(tokens, position_ids_for(tokens), causal_attention_mask(model.seq_length))
            loss = LMLoss()(logits.transpose(0, 1), (tokens, torch.ones(1, model.seq_length)))
            loss.backward()
        return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}

    return ([count(m) for m in LOCAL], [count(m) for m in SDPA], [count(m, recompute=True) for m in RECOMPUTE],
            [count(m) for m in STRUCTURED])


@pytest.fixture(scope="module")
def counted():
    # spawn: 125M-shape tensors in a child forked from this long-lived pytest process hung in
    # the weight init's OpenMP region in a full-suite run.
    [result] = run_ranks(_counted_flops, 1, timeout=900, start_method="spawn")
    return result


def test_flops_per_token_matches_torch_flop_counter(counted):
    """Every FFN kind at two shapes: torch's count of a real forward + backward equals the
    formula within 1%. megatron's local attention is used because torch counts its
    QK^T/AV matmuls (baddbmm, bmm); torch has no FLOP formula for the CPU fused SDPA kernel."""
    for model, (flops, by_op) in zip(LOCAL, counted[0]):
        expected = flops_per_token(model) * model.seq_length
        assert abs(flops - expected) <= 0.01 * expected, (model.ffn_kind, model.hidden_size, flops, expected, by_op)
        # the attention matmuls alone: QK^T and AV over the full s x s, forward and backward
        attention = by_op.get("aten.baddbmm", 0) + by_op.get("aten.bmm", 0)
        assert attention == 3 * model.num_layers * 2 * 2 * model.seq_length ** 2 * model.hidden_size, by_op
    # what AFB adds is its feedback: 3 * 2 * 3 f r per token and layer (V, Ub, Ug; forward + backward)
    by_kind = {(m.hidden_size, m.ffn_kind): flops for m, (flops, _) in zip(LOCAL, counted[0])}
    for model in LOCAL:
        if model.is_afb:
            base = by_kind[(model.hidden_size, model.ffn_kind[len("afb-"):])]
            f, r = model.resolved_ffn_hidden_size, model.feedback_rank
            assert by_kind[(model.hidden_size, model.ffn_kind)] - base == \
                3 * 2 * 3 * f * r * model.num_layers * model.seq_length


def test_structured_flops_per_token_match_torch_flop_counter(counted):
    """Structured kinds at both shares: torch's count equals the formula within 1%, and their
    MLP FLOPs are the structured weights' 2 per token (a share of the dense MLP's)."""
    for model, (flops, by_op) in zip(STRUCTURED, counted[3]):
        expected = flops_per_token(model) * model.seq_length
        assert abs(flops - expected) <= 0.01 * expected, (model.ffn_kind, model.structured_share, flops, expected, by_op)


def test_sdpa_model_counts_the_same_matmuls_outside_attention(counted):
    """The default fused attention runs the same projections, MLP and logits: torch counts the
    formula less the attention matmuls it cannot see in the CPU SDPA kernel. These models run
    the default fused AFB op, which recomputes its write [db; gl] = z [Ub; Ug]^T in backward:
    2 x 2f x r more per token and layer than the model FLOPs, and nothing else."""
    for model, (flops, by_op) in zip(SDPA, counted[1]):
        s, h = model.seq_length, model.hidden_size
        recomputed = 2 * 2 * model.resolved_ffn_hidden_size * model.feedback_rank * model.num_layers * s \
            if model.is_afb else 0
        assert flops == flops_per_token(model) * s - 3 * model.num_layers * 2 * 2 * s * s * h + recomputed, \
            (model.ffn_kind, by_op)


def test_recompute_adds_the_layers_forward(counted):
    """With megatron's full activation recompute the counted FLOPs grow by one forward of the
    transformer layers (not of the logits), as flops_per_token(recompute=True) says."""
    for model, (flops, _) in zip(RECOMPUTE, counted[2]):
        expected = flops_per_token(model, recompute=True) * model.seq_length
        assert abs(flops - expected) <= 0.01 * expected, (model.ffn_kind, flops, expected)
        assert flops > flops_per_token(model) * model.seq_length


# ---------------------------------------------------------------------------------------------
# Memory per device

def preset(size: str, **overrides) -> ModelConfig:
    from afb_scale.config import load_config

    return load_config(ROOT / "configs" / "size" / f"{size}.yaml",
                       [f"model.{k}={v}" for k, v in overrides.items()]).model


# Measured on one H100 80GB (docs/results/gpu.md; bf16, ZeRO-1, DP 1, seq 2048, one micro-batch
# per step): size, FFN kind, checkpointing, micro batch, torch.cuda.max_memory_allocated GiB.
# AFB ran unfused then (before model.afb_fused existed): the estimate is compared for that path.
H100_MEASURED = [
    ("125m", "gelu", False, 16, 20.81), ("125m", "afb-gelu", False, 16, 30.03),
    ("125m", "gelu", True, 16, 12.35), ("125m", "afb-gelu", True, 16, 12.47),
    ("350m", "gelu", False, 16, 39.67), ("350m", "afb-gelu", False, 16, 64.17),
    ("350m", "gelu", True, 16, 17.11), ("350m", "afb-gelu", True, 16, 17.43),
    ("1.3b", "gelu", False, 4, 36.02), ("1.3b", "afb-gelu", False, 4, 48.70),
    ("1.3b", "gelu", True, 16, 34.51), ("1.3b", "afb-gelu", True, 16, 35.15),
]


@pytest.mark.parametrize("size, ffn, ckpt, micro, measured_gib", H100_MEASURED)
def test_memory_estimate_matches_h100_measurements(size, ffn, ckpt, micro, measured_gib):
    est = memory_per_device(preset(size, ffn_kind=ffn, afb_fused="off"), Layout(micro_batch=micro, checkpointing=ckpt,
                                                                precision="bf16", zero_stage=1, device="cuda"))
    assert est.total / GIB == pytest.approx(measured_gib, rel=0.10)


def test_afb_activation_memory_is_its_extra_tensors():
    """Without checkpointing, unfused AFB-GELU keeps 4 more f-sized tensors per token and layer
    than GELU (sigmoid(Ug z), 2 sigmoid(.), h + db, act(h + db)) and V h, z; the fused op only
    V h and z (under ZeRO-3 it runs unfused); with checkpointing a layer keeps only its input,
    the same for both."""
    layout = Layout(micro_batch=16, precision="bf16", zero_stage=1)
    base, afb = preset("350m", ffn_kind="gelu"), preset("350m", ffn_kind="afb-gelu", afb_fused="off")
    f, r, tokens = base.resolved_ffn_hidden_size, base.feedback_rank, 16 * base.seq_length
    assert layer_activation_bytes(afb, layout) - layer_activation_bytes(base, layout) == tokens * (4 * f + 2 * r) * 2
    fused = preset("350m", ffn_kind="afb-gelu", afb_fused="auto")
    assert layer_activation_bytes(fused, layout) - layer_activation_bytes(base, layout) == tokens * 2 * r * 2
    zero3 = dataclasses.replace(layout, zero_stage=3)
    assert layer_activation_bytes(fused, zero3) == layer_activation_bytes(afb, zero3)
    ckpt = dataclasses.replace(layout, checkpointing=True)
    a, b = memory_per_device(afb, ckpt), memory_per_device(base, ckpt)
    assert a.detail["activations: layers"] == b.detail["activations: layers"] == 24 * tokens * 1024 * 2


def test_zero_partitions_what_it_should():
    model = preset("1.3b", ffn_kind="afb-swiglu")
    one = memory_per_device(model, Layout(zero_stage=1, precision="bf16", micro_batch=1))
    eight = memory_per_device(model, Layout(zero_stage=1, precision="bf16", micro_batch=1, data=8))
    assert eight.optimizer == pytest.approx(one.optimizer / 8)  # fp32 master + Adam: 12 bytes / 8
    assert eight.weights == one.weights and eight.gradients == one.gradients  # bf16 weights, grads whole
    z3 = memory_per_device(model, Layout(zero_stage=3, precision="bf16", micro_batch=1, data=8))
    assert z3.weights < one.weights / 7.5 and z3.gradients < one.gradients / 3  # weights and grads partitioned too
    # ZeRO-3 keeps its reduce bucket (5e8 elements, reduced in fp32) whatever the model's size
    assert z3.detail["buffers: reduce bucket (allocated at start-up)"] == 4 * 5e8


def test_sharding_and_checkpointing_shrink_activations():
    model = preset("1.3b", ffn_kind="afb-gelu")
    full = memory_per_device(model, Layout(micro_batch=4, zero_stage=1))
    tp = memory_per_device(model, Layout(micro_batch=4, zero_stage=1, tensor=8))
    sp = memory_per_device(model, Layout(micro_batch=4, zero_stage=1, tensor=8, sequence_parallel=True))
    ckpt = memory_per_device(model, Layout(micro_batch=4, zero_stage=1, tensor=8, sequence_parallel=True,
                                           checkpointing=True))
    assert full.activations > tp.activations > sp.activations > ckpt.activations
    # Sequence parallelism shards everything a layer keeps but the fused AFB op's V h and z
    # (2 r bf16 values per token and layer), which it all-reduces and keeps for every token.
    unsharded = 2 * model.feedback_rank * 2 * 4 * model.seq_length * model.num_layers
    assert sp.detail["activations: layers"] - unsharded == \
        pytest.approx((full.detail["activations: layers"] - unsharded) / 8, rel=0.01)


def test_pipeline_first_stage_holds_micro_batches_in_flight():
    model = preset("350m", ffn_kind="gelu")
    layout = Layout(pipeline=4, micro_batch=2, grad_accum=8, zero_stage=1)
    stages = [memory_per_device(model, layout, stage=s) for s in range(4)]
    per = [s.detail["activations: layers"] for s in stages]
    assert per == [pytest.approx(per[3] * k) for k in (4, 3, 2, 1)]  # 1F1B: p - stage in flight
    assert stages[3].detail["activations: logits and loss (forward)"] > 0 == stages[0].detail[
        "activations: logits and loss (forward)"]


def test_zero1_gradients_depend_on_the_partition():
    """ZeRO-1/2 keep the whole gradient of every parameter that meets a rank's partition: the
    rank whose partition starts inside the embedding keeps the embedding's."""
    params = {"embedding.word_embeddings.weight": 600, "decoder.layers.0.mlp.linear_fc1.weight": 400,
              "decoder.layers.0.input_layernorm.weight": 10}
    assert [_partition_intersecting(params, 2, r) for r in (0, 1)] == [600 + 10, 1000 + 10]
    assert _partition_intersecting(params, 2) == 1010
    assert _partition_intersecting(params, 1, 0) == 1010


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s, MFU and memory in the training logs (afb_scale/metrics/throughput.py)


def test_peak_table_is_dense_and_found_by_device_name():
    from afb_scale.metrics.throughput import device_kind, peak_flops, table_peak

    names = {"NVIDIA H100 80GB HBM3": "H100-SXM", "NVIDIA H100 PCIe": "H100-PCIe", "NVIDIA H100 NVL": "H100-NVL",
             "NVIDIA GH200 480GB": "GH200", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A100-PCIE-40GB": "A100",
             "NVIDIA L40S": "L40S", "NVIDIA L4": "L4", "Tesla V100-SXM2-32GB": "V100", "AMD Instinct MI300X": "MI300X",
             "NVIDIA GeForce RTX 4090": None}
    for name, kind in names.items():
        assert device_kind(name) == kind, name
    # dense, not the data sheet's 2:4-sparsity figure (1979 for H100 SXM bf16)
    assert table_peak("H100-SXM", "bf16") == H100_BF16_DENSE_PEAK == 989e12
    assert table_peak("A100", "bf16") == 312e12 and table_peak("A100", "fp32") == 19.5e12
    assert table_peak("V100", "bf16") is None  # V100 has no bf16 tensor cores
    assert peak_flops("bf16", device_name="NVIDIA H100 80GB HBM3", cuda=True).flops == 989e12
    assert peak_flops("fp32", device_name="NVIDIA H100 80GB HBM3", cuda=True).flops == 67e12
    assert peak_flops("bf16", configured_tflops=500.0).flops == 500e12
    unknown = peak_flops("bf16", device_name="NVIDIA GeForce RTX 4090", cuda=True)
    assert unknown.flops is None and "metrics.peak_tflops" in unknown.label


def test_cpu_peak_is_measured_once_and_cached(tmp_path):
    from afb_scale.metrics.throughput import cpu_peak

    first = cpu_peak(tmp_path)
    assert first.flops > 1e8 and first.label.startswith("measured fp32 matmul peak")
    cache = tmp_path / "cpu_peak.json"
    entries = json.loads(cache.read_text())
    assert len(entries) == 1
    entries[next(iter(entries))] = 123.0  # what the second call returns proves it read the cache
    cache.write_text(json.dumps(entries))
    assert cpu_peak(tmp_path).flops == 123.0


def test_utilisation_arithmetic():
    from afb_scale.metrics.throughput import utilisation

    u = utilisation(1e5, 6e9, 8e9, devices=8, peak=989e12)
    assert u.tflops_per_device == pytest.approx(75.0)
    assert u.mfu == pytest.approx(75e12 / 989e12) and u.hfu == pytest.approx(100e12 / 989e12)
    assert utilisation(1e5, 6e9, 6e9, 8, None).mfu is None


def _gathered(rank, world):
    import torch

    from afb_scale.metrics.throughput import gather_memory
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())
    keep = torch.ones(int(2e8) if rank == 1 else 1, dtype=torch.uint8) + 1  # rank 1 touches 200 MB more
    scalars, per_rank = gather_memory(torch.device("cpu"))
    return scalars, per_rank, int(keep[0])


def test_memory_of_every_rank_is_gathered():
    results = run_ranks(_gathered, 2)
    scalars, per_rank, _ = results[0]
    assert results[1][0] == scalars  # every rank gets the same answer
    assert len(per_rank) == 2 and per_rank[1]["peak_rss_gib"] > per_rank[0]["peak_rss_gib"] + 0.15
    assert scalars["memory/peak_rss_gib"] == per_rank[1]["peak_rss_gib"]
    assert scalars["memory/peak_rss_gib_min"] == per_rank[0]["peak_rss_gib"]


def test_training_logs_tflops_mfu_and_memory(default_corpus, tmp_path):
    import subprocess
    import sys

    from conftest import corpus_overrides
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml", "parallel.tensor=1",
           *corpus_overrides(default_corpus), f"train.run_dir={run_dir}", "train.steps=4", "train.warmup_steps=1",
           "train.log_interval=2", "train.eval_interval=4", "train.eval_iters=1", "train.save_interval=4",
           "metrics.layer_metrics_interval=0", "model.seq_length=64", "train.activation_checkpointing=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU against: measured fp32 matmul peak of this CPU, 1 thread(s)" in proc.stdout
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step") and "tokens/s" in line]
    assert len(steps) == 2 and all(re.search(r"TFLOP/s/device \| MFU [\d.]+% \| peak RSS [\d.]+ GiB", s)
                                   for s in steps), steps
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/tflops_per_device", "train/mfu", "train/hfu", "memory/peak_rss_gib",
                "memory/peak_rss_gib_min", "memory_per_rank/rank000/peak_rss_gib"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    mfu = [e.value for e in events.Scalars("train/mfu")]
    tflops = [e.value for e in events.Scalars("train/tflops_per_device")]
    hfu = [e.value for e in events.Scalars("train/hfu")]
    assert len(mfu) == 2 and all(0 < m < 1.5 for m in mfu)  # a measured peak can be beaten a little
    assert all(h > m for h, m in zip(hfu, mfu))  # the recomputed forward counts in HFU only
    assert all(t > 0 for t in tflops)
    assert 0.1 < events.Scalars("memory/peak_rss_gib")[-1].value < 20
