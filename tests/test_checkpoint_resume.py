"""Crash a real training run and resume it: the losses must equal an uninterrupted run's, bit for bit.

Each layout runs the real CLI under torchrun four times: once uninterrupted (the reference),
then in one run directory (1) SIGKILLed (every rank, a crash) right after a random step,
(2) resumed and SIGKILLed in the middle of writing a random later checkpoint -- its files on
disk, its COMPLETE marker not -- and (3) resumed to the end. Every step's loss, gradient norm,
LR and consumed-samples counter, and the final validation loss, must be identical to the
reference (exact float equality on CPU, fp32, dropout on). The half-written checkpoint must be
reported as skipped. Kill points come from a seeded RNG, so CI is reproducible; the module
prints how many kill points were tried and how many resumed bit-exactly. Another seed
(AFB_TEST_KILL_SEED=1, 2, ...) draws other kill points.
"""

from __future__ import annotations

import os
import random

import pytest

from checkpoint_cases import (LAYOUTS, SAVE_INTERVAL, STEPS, corpus, final_val_loss, losses, overrides,
                              reference_run, torchrun)

TALLY = {"tried": 0, "bit_exact": 0}


def check(result, *, status: int, contains: str = ""):
    assert result.returncode == status or (status != 0 and result.returncode != 0), result.stdout[-4000:]
    if contains:
        assert contains in result.stdout, result.stdout[-4000:]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_killed_runs_resume_bit_exactly(layout, tmp_path):
    nproc, parallel = LAYOUTS[layout]
    rng = random.Random(f"kill-points-{layout}-{os.environ.get('AFB_TEST_KILL_SEED', '0')}")
    kill_step = rng.randint(2, STEPS - 2)  # a step after which the run crashes (before its save)
    resumed_from = (kill_step - 1) // SAVE_INTERVAL * SAVE_INTERVAL
    kill_save = rng.choice(range(resumed_from + SAVE_INTERVAL, STEPS + 1, SAVE_INTERVAL))

    ref_dir, run_dir = reference_run(layout), tmp_path / "run"
    expected = losses(ref_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))
    # Retention: train.keep_checkpoints=2 leaves the two newest.
    assert sorted(p.name for p in (ref_dir / "checkpoints").glob("step*")) == ["step00000009", "step00000012"]

    args = overrides(corpus(), run_dir, **parallel)
    first = torchrun(nproc, args, env={"AFB_TEST_KILL_AT": f"step:{kill_step}"})
    check(first, status=-9, contains=f"AFB_TEST_KILL_AT=step:{kill_step}")
    assert "training finished" not in first.stdout

    second = torchrun(nproc, args, env={"AFB_TEST_KILL_AT": f"save:{kill_save}"})
    check(second, status=-9, contains=f"AFB_TEST_KILL_AT=save:{kill_save}")
    if resumed_from:
        assert f"resuming from {run_dir / 'checkpoints' / f'step{resumed_from:08d}'}" in second.stdout
    partial = run_dir / "checkpoints" / f"step{kill_save:08d}"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()

    third = torchrun(nproc, args)
    check(third, status=0, contains=f"skipping checkpoint step{kill_save:08d}: no COMPLETE marker")
    if kill_save > SAVE_INTERVAL:
        assert f"resuming from {run_dir / 'checkpoints' / f'step{kill_save - SAVE_INTERVAL:08d}'}" in third.stdout

    got = losses(run_dir)
    TALLY["tried"] += 2
    assert got == expected, "\n".join(f"step {s}: {got.get(s)} != {expected[s]}" for s in expected if got.get(s) != expected[s])
    assert final_val_loss(run_dir) == final_val_loss(ref_dir)
    TALLY["bit_exact"] += 2
    print(f"\n{layout}: killed after step {kill_step} and inside the save of step {kill_save}; "
          f"kill points so far {TALLY['tried']}, bit-exact resumes {TALLY['bit_exact']}")
