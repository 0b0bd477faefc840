"""`afb-scale study ...`: the argument parsing and dispatch (kept out of afb_scale/cli.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

from afb_scale.config import ConfigError


def add_arguments(p) -> None:
    p.add_argument("what", choices=["stability", "lr-sweep", "scaling", "report"],
                   help="a study to expand/run/submit, or `report` to regenerate a study's report")
    p.add_argument("target", help="the study file (configs/studies/*.yaml), or with `report` the run root")
    p.add_argument("--run", action="store_true", help="run every unfinished run here, one after another, then report")
    p.add_argument("--submit", metavar="CLUSTER_YAML", help="render one Slurm array job, a task per run, and sbatch it")
    p.add_argument("--dry-run", action="store_true", help="with --submit: print the batch script only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --submit: override a cluster-job value (repeatable), e.g. --set nodes=1")
    p.add_argument("--out", help="report directory (default RUN_ROOT/report)")


def run_study_command(args) -> int:
    if args.what == "report":
        from afb_scale.studies import study_report as report

        if args.run or args.submit:
            raise ConfigError("study report takes a run root only (no --run/--submit)")
        path = report.write_study_report(args.target, args.out)
        print(path.read_text())
        print(f"written: {path} (+ PNG plots beside it)")
        return 0
    from afb_scale.studies import runner
    from afb_scale.studies.spec import load_study

    if args.run and args.submit:
        raise ConfigError("--run and --submit exclude each other: run here or submit to Slurm")
    study = load_study(args.target)
    if study.kind != args.what:
        raise ConfigError(f"{args.target} is a {study.kind} study (study: {study.kind}), not {args.what}; "
                          f"use afb-scale study {study.kind} {args.target}")
    if args.submit:
        return runner.submit_array(study, args.submit, args.dry_run, args.set)
    if not args.run:
        for i, run in enumerate(study.runs):
            print(f"{i:3d} {run.name}: {shlex.join(run.overrides)}")
        print(f"{len(study.runs)} runs; --run runs them here, --submit CLUSTER_YAML as one Slurm array job")
        return 0
    status = runner.run_locally(study)
    if status == 0:
        from afb_scale.studies import study_report as report

        path = report.write_study_report(study.run_root, args.out)
        print(f"report: {path}")
    return status
