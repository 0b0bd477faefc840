"""DeepSpeed engine layouts against a single-process run: same seed, same global batch.

The loss after each of 6 optimizer steps (and the gradient norm that clipping used) must
match the single-process sequence to 1e-5 relative, for data parallelism under every ZeRO
stage, tensor parallelism, pipeline parallelism, both together, and gradient accumulation.
Clipping at 1.0 is active in these steps, so a wrong gradient norm would show.
"""

import functools

import pytest
import torch

from engine_cases import run_engine
from multiproc import run_ranks

RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def reference():
    [(losses, norms)] = run_ranks(run_engine, 1, {})
    assert losses[-1] < losses[0] - 0.2  # it trains
    assert max(norms) > 1.0  # clipping is active at 1.0
    return losses, norms


def assert_matches(results):
    ref_losses, ref_norms = reference()
    for rank, (losses, norms) in enumerate(results):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=0,
                                   msg=lambda m: f"rank {rank} losses: {m}")
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL, atol=0,
                                   msg=lambda m: f"rank {rank} grad norms: {m}")


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_data_parallel_zero(zero_stage):
    assert_matches(run_ranks(run_engine, 2, {"parallel.zero_stage": zero_stage}))


def test_tensor_parallel():
    assert_matches(run_ranks(run_engine, 2, {"parallel.tensor": 2}))


def test_tensor_parallel_with_activation_recompute():
    # PP = 1 recomputes through megatron-core's own CheckpointFunction (CPU-shimmed RNG states).
    assert_matches(run_ranks(run_engine, 2, {"parallel.tensor": 2, "train.activation_checkpointing": True}))


def test_pipeline_parallel():
    assert_matches(run_ranks(run_engine, 2, {"parallel.pipeline": 2}))


def test_tensor_and_pipeline_parallel():
    assert_matches(run_ranks(run_engine, 4, {"parallel.tensor": 2, "parallel.pipeline": 2}))


def test_tensor_parallel_with_zero2_and_data_parallel():
    assert_matches(run_ranks(run_engine, 4, {"parallel.tensor": 2, "parallel.zero_stage": 2}))


def test_gradient_accumulation_matches_larger_micro_batch():
    # Reference: micro 2 x 4 accumulation steps. Here: one micro-batch of 8, and 4 x 2.
    assert_matches(run_ranks(run_engine, 1, {"train.micro_batch_size": 8}))
    assert_matches(run_ranks(run_engine, 1, {"train.micro_batch_size": 4}))


def test_swiglu_pipeline_with_activation_checkpointing():
    ref = run_ranks(run_engine, 1, {"model.ffn_kind": "afb-swiglu"})
    got = run_ranks(run_engine, 2, {"model.ffn_kind": "afb-swiglu", "parallel.pipeline": 2,
                                    "train.activation_checkpointing": True})
    for losses, _ in got:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[0][0]), rtol=RTOL, atol=0)


# Sequence parallelism on CPU (the norms support it everywhere now, model/norm.py): the whole
# model, its norms' gradients summed over TP, and under the pipeline engine, whose stage outputs
# must then travel whole (engine.deepspeed_config sets pipe/grad_partitioned off).
def test_sequence_parallel_whole_model():
    assert_matches(run_ranks(run_engine, 2, {"parallel.tensor": 2, "parallel.sequence_parallel": True}))


def test_sequence_parallel_with_pipeline():
    assert_matches(run_ranks(run_engine, 4, {"parallel.tensor": 2, "parallel.pipeline": 2,
                                             "parallel.sequence_parallel": True}))


def test_sequence_parallel_rmsnorm_swiglu():
    ref = run_ranks(run_engine, 1, {"model.ffn_kind": "afb-swiglu", "model.normalization": "RMSNorm"})
    got = run_ranks(run_engine, 2, {"model.ffn_kind": "afb-swiglu", "model.normalization": "RMSNorm",
                                    "parallel.tensor": 2, "parallel.sequence_parallel": True})
    for losses, _ in got:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[0][0]), rtol=RTOL, atol=0)


def test_megatron_local_attention_matches_sdpa():
    # model.attention=local is megatron-core's DotProductAttention; sdpa (the default) is fused.
    assert_matches(run_ranks(run_engine, 2, {"parallel.tensor": 2, "model.attention": "local"}))


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_bf16_tracks_fp32(zero_stage):
    # bf16 runs on CPU through the same DeepSpeed optimizers a GPU uses (BF16_Optimizer at ZeRO-1,
    # fp32 partitions at ZeRO-3), with fp32 gradient accumulation over the 4 micro-batches.
    ref_losses, _ = reference()
    [(losses, norms)] = run_ranks(run_engine, 1, {"train.precision": "bf16", "parallel.zero_stage": zero_stage})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=0)
    assert losses != ref_losses  # it really ran in bf16: rounding shows
