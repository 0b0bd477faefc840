"""Running a study: one run after another on this machine, or one Slurm array job.

Local runs are resumable: a run whose directory shows it finished (its last training step is
the configured one) or stopped on non-finite losses (the trainer's exit 3: a diverged run, which
is a result, not a failure) is skipped; any other run is started with the same command, and the
trainer resumes it from its newest complete checkpoint. Progress lines give runs done/left and an
ETA from this session's runs: their wall time fitted as start-up + seconds x work (tokens x
FLOPs/token), so a large run counts for more than a small one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from afb_scale.metrics.run_logger import format_duration
from afb_scale.studies.collect import run_state
from afb_scale.studies.spec import Study, StudyRun, validate_runs, write_study_files

STATUS_FILE = "study_status.json"
EXIT_NON_FINITE = 3  # afb_scale.training.trainer.EXIT_NON_FINITE (not imported: that pulls in the training stack)


def train_command(train_args: list[str], nproc: int) -> list[str]:
    """`afb-scale train ARGS` as this machine runs it: plainly for one process, else under torchrun."""
    if nproc == 1:  # a world of one needs no launcher (afb-scale train sets it up itself)
        return [sys.executable, "-m", "afb_scale.cli", "train", *train_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "afb_scale.cli", "train", *train_args]


def _work(run: StudyRun) -> float:
    return run.meta["tokens"] * run.meta["flops_per_token"]


def eta_seconds(history: list[tuple[float, float]], left: list[float]) -> float:
    """Seconds for the runs left (their work), from this session's (work, wall seconds) so far.

    wall = a + b x work, fitted by least squares (a: start-up, the same for every run; b: seconds
    per unit of work), so neither a study of many small runs nor one of a few large ones is
    misjudged; with one run, or runs of equal work, wall is taken as proportional to work."""
    if not history:
        return 0.0
    works = [w for w, _ in history]
    walls = [t for _, t in history]
    n = len(history)
    mw, mt = sum(works) / n, sum(walls) / n
    var = sum((w - mw) ** 2 for w in works)
    if n >= 2 and var > 0:
        b = max(sum((w - mw) * (t - mt) for w, t in history) / var, 0.0)
        a = max(mt - b * mw, 0.0)
        return sum(a + b * w for w in left)
    return mt / mw * sum(left) if mw else mt * len(left)


def run_locally(study: Study, out=sys.stdout) -> int:
    """Run every run not yet finished, in order; 0 when all are finished (diverged ones included)."""
    validate_runs(study, study.nproc)
    write_study_files(study)
    runs = study.runs
    states = {r.name: run_state(r.run_dir) for r in runs}
    finished = sum(s in ("done", "diverged") for s in states.values())
    print(f"[study {study.kind}] {len(runs)} runs under {study.run_root}: {finished} finished, "
          f"{len(runs) - finished} to run", file=out, flush=True)
    start = time.monotonic()
    history: list[tuple[float, float]] = []
    left = {r.name: _work(r) for r in runs if states[r.name] not in ("done", "diverged")}
    done = finished
    for i, run in enumerate(runs, 1):
        if states[run.name] in ("done", "diverged"):
            continue
        cmd = train_command(run.train_args, study.nproc)
        verb = "resuming" if states[run.name] == "partial" else "starting"
        print(f"[study {study.kind}] {verb} {i}/{len(runs)} {run.name}", file=out, flush=True)
        log = Path(run.run_dir) / "train.log"
        env = dict(os.environ)
        if study.threads:  # torch's intra-op pool; on a shared machine 2 threads can be far slower than 1
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(study.threads)
        t0 = time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ {'OMP_NUM_THREADS=' + str(study.threads) + ' ' if study.threads else ''}{shlex.join(cmd)}\n")
            f.flush()
            status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.monotonic() - t0
        if status not in (0, EXIT_NON_FINITE):
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(f"{tail}[study {study.kind}] {run.name} exited with {status} (log {log}); stopping. "
                  "Run the same command again to resume.", file=sys.stderr, flush=True)
            return status
        Path(run.run_dir, STATUS_FILE).write_text(json.dumps({"exit": status, "wall_s": round(wall, 1)}))
        done += 1
        history.append((left.pop(run.name), wall))
        elapsed = time.monotonic() - start
        eta = eta_seconds(history, list(left.values()))
        note = " (stopped: non-finite loss, counted as diverged)" if status == EXIT_NON_FINITE else ""
        print(f"[study {study.kind}] {run.name} finished in {wall:.0f} s{note} | {done}/{len(runs)} done, "
              f"{len(runs) - done} left | elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}", file=out, flush=True)
    return 0


def submit_array(study: Study, cluster_config: str, dry_run: bool, extra: list[str] = ()) -> int:
    """One Slurm array job, a task per run, rendered by afb-scale submit (afb_scale/cluster/submit.py).

    Each task's overrides carry its own train.run_dir (append_run_dir=false), so the array's run
    directories are the study's, a requeued or retried task resumes its own run, and
    `afb-scale study report RUN_ROOT` reads them as it reads local ones."""
    from afb_scale.cluster import submit

    job = submit.load_job(cluster_config, list(extra))
    validate_runs(study, job.nodes * submit.nproc_per_node(job))
    argv = [cluster_config, *extra, "append_run_dir=false",
            "sweep=" + json.dumps([r.overrides for r in study.runs]),
            "command=" + json.dumps(["afb-scale", "train", "--config", study.runs[0].config])]
    if dry_run:
        return submit.main(argv + ["--dry-run"])
    write_study_files(study)  # the report's metadata, before any task starts
    return submit.main(argv)
