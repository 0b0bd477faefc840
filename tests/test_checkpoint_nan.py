"""Non-finite steps are never trained on; too many in a row stop the run with the step named.

Engine level, on real ranks: after two good steps a NaN loss is injected (tests/fault_injection.py
patches the loss in the test process); the step must report `applied=False`, leave every weight (gathered over
TP/PP/ZeRO-3) and the LR exactly as they were, and the next step must train normally -- on each
path that guards differently: ZeRO-0 (our guard in engine.py), ZeRO-1 and ZeRO-3 (DeepSpeed's
overflow check), pipeline and tensor parallel.

Run level, through the CLI: one NaN step is skipped and training goes on; two in a row with
train.max_bad_steps=2 stop with exit status 3 and a message naming the steps, and the last
good checkpoint stays the newest, complete and verifiable.
"""

from __future__ import annotations

import math

import pytest
import torch

from checkpoint_cases import Ranks, corpus, overrides
from multiproc import run_ranks


def _skip_on_nan(rank, world, overrides_):
    from engine_cases import rank_micro_batches, text_batches, tiny_config
    from fault_injection import poisoned_loss

    from afb_scale.training import reshard

    from afb_scale.config import validate
    from afb_scale.training.engine import Engine
    from afb_scale.parallel.groups import init_distributed

    cfg = tiny_config(**overrides_)
    validate(cfg, world)
    layout = init_distributed(cfg.parallel)
    engine = Engine(cfg, layout)
    batches = [rank_micro_batches(b, cfg.train.micro_batch_size, layout.data_rank, layout.data)
               for b in text_batches(4, 8)]
    out = [engine.train_batch(batches[0]), engine.train_batch(batches[1])]
    before, lr_before = reshard.gather_stage(engine), engine.scheduler.get_last_lr()[0]
    with poisoned_loss():
        out.append(engine.train_batch(batches[2]))
    after, lr_after = reshard.gather_stage(engine), engine.scheduler.get_last_lr()[0]
    out.append(engine.train_batch(batches[3]))
    unchanged = before is None or all(torch.equal(before[k], after[k]) for k in before)
    moved = reshard.gather_stage(engine)
    trained_after = moved is None or any(not torch.equal(before[k], moved[k]) for k in before)
    return [(r.loss, r.applied) for r in out], unchanged, lr_before == lr_after, trained_after


@pytest.mark.parametrize("world, overrides_", [
    (1, {}),
    (2, {"parallel.zero_stage": 1}),
    (2, {"parallel.zero_stage": 3}),
    (2, {"parallel.pipeline": 2}),
    (2, {"parallel.tensor": 2}),
], ids=["zero0", "dp2-zero1", "dp2-zero3", "pp2-zero0", "tp2-zero0"])
def test_nan_step_is_skipped_and_changes_nothing(world, overrides_):
    for steps, unchanged, same_lr, trained_after in run_ranks(_skip_on_nan, world, overrides_):
        assert [applied for _, applied in steps] == [True, True, False, True]
        assert math.isnan(steps[2][0]) and all(math.isfinite(loss) for loss, _ in steps[:2] + steps[3:])
        assert unchanged, "weights changed on the NaN step"
        assert same_lr, "the LR schedule advanced on the NaN step"
        assert trained_after


def test_run_skips_isolated_nan_and_stops_after_max_bad_steps(tmp_path):
    from afb_scale.training import checkpoint
    from afb_scale.metrics.metrics_file import read_metrics
    from afb_scale.training.trainer import EXIT_NON_FINITE

    run_dir = tmp_path / "run"
    args = overrides(corpus(), run_dir, **{"parallel.tensor": 1, "parallel.zero_stage": 0, "train.max_bad_steps": 2})
    ranks = Ranks(1, args, tmp_path / "log", env={"AFB_TEST_INJECT_NAN": "5,7,8"})
    assert ranks.wait() == [EXIT_NON_FINITE], ranks.text()[-3000:]
    out = ranks.text()
    assert "step 5: non-finite loss or gradient norm (loss nan" in out and "(1/2 in a row)" in out
    assert "stopping at step 8: 2 consecutive non-finite steps (7, 8; train.max_bad_steps=2)" in out
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step00000006'}" in out
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [metrics[s]["applied"] for s in range(1, 9)] == [True] * 4 + [False, True, False, False]
    assert math.isfinite(metrics[6]["loss"])
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert names == ["step00000003", "step00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000006"
    assert checkpoint.verify(run_dir / "checkpoints" / "step00000006")[0] is not None
