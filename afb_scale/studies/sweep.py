"""Sweeps: a base config and axes of overrides, expanded into named runs.

A sweep file (configs/studies/*.yaml):

    base: ../quickstart.yaml           # a run config, relative to this file
    run_root: runs/stability-tiny      # each run goes to <run_root>/<name>
    overrides: [train.steps=200]       # applied to every run
    axes:                              # the cross product of these
      model.ffn_kind: [gelu, afb-gelu]
      train.lr: [3.0e-3, 1.0e-2]

The same expansion serves a local sequential runner (`afb-scale sweep --run`) and a Slurm
array job, one task per run (`afb-scale sweep --submit configs/cluster/X.yaml`, through
afb_scale/cluster/submit.py, which gives each array task its own run directory).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from afb_scale.config import ConfigError, load_config, validate


@dataclass
class SweepRun:
    name: str
    config: str
    overrides: list[str]  # without the run directory, which a Slurm array job sets per task
    run_dir: str

    def train_args(self) -> list[str]:
        return ["--config", self.config, *self.overrides, f"train.run_dir={self.run_dir}"]


def _slug(value) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def expand(sweep_path: str | os.PathLike) -> list[SweepRun]:
    path = Path(sweep_path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"base", "run_root", "overrides", "axes"}
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)}; allowed: base, run_root, overrides, axes")
    if "base" not in spec or "run_root" not in spec:
        raise ConfigError(f"sweep file {str(path)!r} needs 'base' and 'run_root'")
    base = str((path.parent / spec["base"]).resolve())
    axes = spec.get("axes") or {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep axis {key!r} must be a non-empty list, not {values!r}")
    runs = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        name = "_".join(f"{k.split('.')[-1]}={_slug(v)}" for k, v in zip(axes, combo)) or "run"
        overrides = list(spec.get("overrides") or []) + [f"{k}={v}" for k, v in zip(axes, combo)]
        runs.append(SweepRun(name, base, overrides, f"{spec['run_root']}/{name}"))
    return runs


def validate_all(runs: list[SweepRun], world_size: int) -> None:
    """Every run's config, checked before the first one starts."""
    for run in runs:
        try:
            validate(load_config(run.config, run.train_args()[2:]), world_size)
        except ConfigError as e:
            raise ConfigError(f"sweep run {run.name}: {e}") from None


def run_locally(runs: list[SweepRun], nproc: int) -> int:
    """Run each variant in turn on this machine; stop at the first failure."""
    from afb_scale.studies.runner import train_command

    for i, run in enumerate(runs, 1):
        cmd = train_command(run.train_args(), nproc)
        print(f"[sweep {i}/{len(runs)}] {run.name}: {shlex.join(cmd)}", flush=True)
        status = subprocess.run(cmd).returncode
        if status != 0:
            print(f"[sweep] {run.name} exited with {status}; stopping", file=sys.stderr)
            return status
    return 0


def submit_array(runs: list[SweepRun], cluster_config: str, dry_run: bool) -> int:
    """One Slurm array job, a task per run, rendered by afb-scale submit."""
    from afb_scale.cluster import submit

    job = submit.load_job(cluster_config)
    validate_all(runs, job.nodes * submit.nproc_per_node(job))
    argv = [cluster_config, "sweep=" + json.dumps([r.overrides for r in runs]),
            "command=" + json.dumps(["afb-scale", "train", "--config", runs[0].config])]
    return submit.main(argv + (["--dry-run"] if dry_run else []))
