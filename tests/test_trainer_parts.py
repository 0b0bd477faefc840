"""The Trainer's parts on their own: the non-finite policy, the prefetching batch stream and the
stateful components a checkpoint carries (each must come back equal from its state_dict)."""

import math

import numpy as np
import pytest
import torch

from afb_scale.data.batches import TrainBatches, rank_micro_batches
from afb_scale.metrics.layer_metrics import ActivationDrift, LayerStats
from afb_scale.metrics.stability import StabilityTracker
from afb_scale.training.engine import StepResult
from afb_scale.training.trainer import NonFinitePolicy


class Samples:
    """Sample i is the tokens i*10 .. i*10+3: a dataset whose batches name their own indices."""

    def __getitem__(self, i):
        tokens = np.arange(i * 10, i * 10 + 4)
        return {"tokens": tokens, "labels": tokens + 1, "loss_mask": np.ones(4, dtype=np.float32)}


def _firsts(batch):
    return [int(mb["tokens"][j, 0]) // 10 for mb in batch for j in range(mb["tokens"].shape[0])]


def test_rank_micro_batches_cut_the_global_batch_by_data_parallel_rank():
    # global batch 8 from sample 16, DP 2, micro batch 2: rank 1 takes samples 20..23
    batch = rank_micro_batches(Samples(), 16, 8, 2, dp_rank=1, dp_size=2)
    assert _firsts(batch) == [20, 21, 22, 23] and len(batch) == 2


@pytest.mark.parametrize("prefetch", [True, False])
def test_batches_resume_where_they_were_handed_out(prefetch):
    stream = TrainBatches(Samples(), 4, 2, 0, 1, prefetch=prefetch)
    seen = [_firsts(stream.next()) for _ in range(3)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    state = stream.state_dict()
    assert state == {"consumed_samples": 12}  # not 16: the prefetched batch is not consumed
    after = _firsts(stream.next())
    stream.close()

    resumed = TrainBatches(Samples(), 4, 2, 0, 1, prefetch=not prefetch)
    resumed.load_state_dict(state)
    assert _firsts(resumed.next()) == after == [12, 13, 14, 15]
    resumed.close()


def test_loading_a_position_drops_the_prefetched_batch():
    stream = TrainBatches(Samples(), 4, 2, 0, 1)
    stream.next()  # prefetches samples 4..7
    stream.load_state_dict({"consumed_samples": 40})
    assert _firsts(stream.next()) == [40, 41, 42, 43]
    stream.close()


def _result(loss, applied=True):
    return StepResult(loss=loss, grad_norm=1.0, lr=1e-3, loss_scale=None, applied=applied)


def test_non_finite_policy_skips_then_stops_after_max_in_a_row():
    policy = NonFinitePolicy(max_bad=2, precision="fp32")
    nan = _result(math.nan, applied=False)
    assert policy.is_bad(nan) and not policy.is_bad(_result(2.0))
    assert policy.verdict(5, True, nan) is None and policy.in_bad_run
    assert policy.verdict(6, False, _result(2.0)) is None and not policy.in_bad_run
    assert policy.verdict(7, True, nan) is None
    assert policy.verdict(8, True, nan) == "2 consecutive non-finite steps (7, 8; train.max_bad_steps=2)"


def test_non_finite_policy_stops_at_once_when_the_optimizer_applied_it():
    policy = NonFinitePolicy(max_bad=5, precision="fp32")
    assert "was applied by the optimizer" in policy.verdict(3, True, _result(math.inf, applied=True))


def test_fp16_overflow_skip_is_not_a_bad_step():
    policy = NonFinitePolicy(max_bad=2, precision="fp16")
    assert not policy.is_bad(_result(3.0, applied=False))  # the loss scaler's overflow
    assert policy.is_bad(_result(math.nan, applied=False))


def test_stability_tracker_continues_from_its_state():
    losses = [5.0, 4.8, 4.7, 4.6, 4.5, 12.0, 4.4, 4.3]
    whole = StabilityTracker(window=4)
    for i, loss in enumerate(losses):
        last = whole.update(loss, 1.0 + 0.1 * i)
    first = StabilityTracker(window=4)
    for i, loss in enumerate(losses[:5]):
        first.update(loss, 1.0 + 0.1 * i)
    second = StabilityTracker(window=4)
    second.load_state_dict(first.state_dict())
    for i, loss in enumerate(losses[5:], start=5):
        resumed = second.update(loss, 1.0 + 0.1 * i)
    assert resumed == last and second.spikes == whole.spikes


def test_activation_drift_compares_with_the_probe_before_the_checkpoint():
    def stats(v):
        return {"layer0": LayerStats(gate_entropy=0.0, bias_correction_ratio=0.0, mean_activation=torch.full((3,), v))}

    whole = ActivationDrift()
    whole.update(stats(1.0))
    expected = whole.update(stats(1.5))
    before = ActivationDrift()
    before.update(stats(1.0))
    after = ActivationDrift()
    after.load_state_dict(before.state_dict())
    assert after.update(stats(1.5)) == expected == {"layer0": pytest.approx(0.5)}
