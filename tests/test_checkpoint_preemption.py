"""Preemption: a signal mid-run gives a complete checkpoint, exit status 75, and an exact resume.

Two rank processes run the real CLI with the environment torchrun/srun gives each task (so each
process's own exit status is visible, as Slurm sees it through launch/srun_task.sh). SIGUSR1
reaches rank 1 only -- the ranks must agree to stop anyway -- and a second signal, SIGTERM to
both, arrives while the checkpoint is being written (a test hook holds the save open for a
moment). Both ranks must exit 75, the checkpoint must verify and be `latest`, and the resumed
run must reproduce the uninterrupted DP = 2 ZeRO-1 reference run bit for bit.
"""

from __future__ import annotations

import re
import signal
import time

from checkpoint_cases import LAYOUTS, STEPS, Ranks, corpus, final_val_loss, losses, overrides, reference_run, torchrun


def test_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    from afb_scale.training import checkpoint
    from afb_scale.training.preemption import REQUEUE_EXIT_CODE

    nproc, parallel = LAYOUTS["dp2-zero1"]
    run_dir = tmp_path / "run"
    args = overrides(corpus(), run_dir, **parallel)
    ranks = Ranks(nproc, args, tmp_path / "first.log", env={"AFB_TEST_SAVE_DELAY": "2"})
    ranks.wait_for("step      4/12")
    saves_before = ranks.text().count("saving checkpoint")
    ranks.procs[1].send_signal(signal.SIGUSR1)
    t0 = time.monotonic()
    while ranks.text().count("saving checkpoint") == saves_before:  # the preemption save began
        assert time.monotonic() - t0 < 120, ranks.text()[-3000:]
        time.sleep(0.05)
    ranks.signal_all(signal.SIGTERM)  # the second signal, during the save
    statuses = ranks.wait()
    out = ranks.text()
    assert statuses == [REQUEUE_EXIT_CODE] * nproc, out[-3000:]
    m = re.search(r"preempted by signal (\S+).*checkpoint at step (\d+) saved, exiting with 75", out)
    assert m, out[-3000:]
    step = int(m.group(2))
    assert 4 <= step < STEPS and "training finished" not in out
    tag_dir = run_dir / "checkpoints" / checkpoint.tag_for(step)
    assert checkpoint.verify(tag_dir)[0] is not None
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_dir.name

    resumed = torchrun(nproc, args)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {tag_dir} at step {step}" in resumed.stdout
    ref = reference_run("dp2-zero1")
    assert losses(run_dir) == losses(ref)
    assert final_val_loss(run_dir) == final_val_loss(ref)
