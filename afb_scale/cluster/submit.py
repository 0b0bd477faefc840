"""`afb-scale submit`: render a Slurm batch script from a cluster-job config, and submit it.

    afb-scale submit configs/cluster/example.yaml [key=value ...] [--dry-run] [--output PATH]

The config (see configs/cluster/example.yaml) says where and how a job runs: nodes, GPUs per node,
time, partition, account, container, environment, GPU/NCCL settings, sweep. Every value is
checked before anything is written: values that end up in `#SBATCH` lines must match Slurm's own
syntax (so a partition like `gpu;rm -rf ~` is an error, not a surprise), everything that reaches
the shell is quoted with `shlex.quote`, and a typo in a key is an error naming the allowed keys.

The rendered script is a header (`#SBATCH` lines and the settings below) followed by the body of
launch/slurm/train.sbatch, the same body that runs when that file is submitted by hand, so both
ways of launching share one tested code path. `--dry-run` prints the script; otherwise it is
written under `log_dir` and passed to `sbatch`.

The repository must be reachable from every node at the same path (a shared filesystem, or a
container mount): the job runs launch/torchrun.sh from it, and relative paths in the command and
config (configs/..., runs/, logs/) are relative to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from afb_scale.config import ConfigError, _from_dict, read_with_overrides
from data_prep.errors import ArgumentParser

BODY_MARKER = "# ---- afb-scale body"
TEMPLATE = Path("launch") / "slurm" / "train.sbatch"


@dataclass
class ContainerConfig:
    # none: run on the host's Python. pyxis: srun --container-image (Pyxis/Enroot plugin).
    # apptainer: `apptainer exec` around each task.
    runtime: Literal["none", "pyxis", "apptainer"] = "none"
    # pyxis: a registry image (nvcr.io#nvidia/pytorch:25.01-py3) or a .sqsh file;
    # apptainer: a .sif file or a docker:// reference.
    image: str = ""
    # SRC[:DST[:FLAGS]] entries; absolute paths.
    mounts: list[str] = field(default_factory=list)
    # Mount the repository at its own path, so launch/ and relative paths work inside.
    mount_repo: bool = True


@dataclass
class GpuConfig:
    # Settings a GPU cluster needs; written as environment variables / srun options. On CPU
    # they are harmless. null (None) leaves a variable to the cluster's default.
    # 1 keeps megatron-core's TP/SP communication kernels ordered before dependent compute.
    cuda_device_max_connections: Optional[int] = 1
    # NCCL_SOCKET_IFNAME, e.g. "ib0", "^lo,docker0" (exclude), "=eth0" (exact).
    nccl_socket_ifname: str = ""
    # NCCL_IB_HCA, e.g. "mlx5_0:1,mlx5_1:1" or "^mlx5_4".
    nccl_ib_hca: str = ""
    nccl_debug: Literal["", "VERSION", "WARN", "INFO", "TRACE"] = "WARN"
    # TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a hung or failed collective ends the job.
    nccl_async_error_handling: bool = True
    # srun --gpu-bind / --cpu-bind for the training step, e.g. "closest", "none", "map_gpu:0,1".
    gpu_bind: str = ""
    cpu_bind: str = ""


@dataclass
class ClusterJobConfig:
    job_name: str = "afb-scale"
    nodes: int = 1
    # 0: a CPU job (gloo); otherwise --gpus-per-node and, by default, one worker per GPU.
    gpus_per_node: int = 0
    # Training processes per node; default gpus_per_node, or 1 without GPUs.
    nproc_per_node: Optional[int] = None
    # CPUs of each srun task (torchrun: one task per node, shared by its workers).
    cpus_per_task: int = 8
    mem: str = ""
    time: str = "01:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    # torchrun: one task per node, each a torchrun agent (the common pattern).
    # srun: one task per GPU/process, no torchrun.
    launcher: Literal["torchrun", "srun"] = "torchrun"
    rendezvous: Literal["c10d", "static"] = "c10d"
    # None: 20000 + job id % 20000.
    master_port: Optional[int] = None
    # Seconds before the time limit at which the batch shell gets SIGUSR1 (checkpoint and exit
    # 75); 0 turns the warning signal off.
    signal_seconds: int = 300
    requeue: bool = True
    max_requeues: int = 50
    # Re-run a failed training step in the same allocation up to this many times when the run
    # directory has a complete checkpoint (the trainer resumes from it); 0: never.
    step_retries: int = 3
    # Seconds the other tasks of the step get once one has ended (srun --wait).
    step_wait: int = 120
    log_dir: str = "logs"
    run_root: str = "runs"
    # Append train.run_dir=<run_root>/<job_name> (sweeps: <job_name>_<task>) to the command: the
    # same directory for every job of this name, so submitting the job again continues its run,
    # and #SBATCH --dependency=singleton keeps two such jobs from running at once.
    append_run_dir: bool = True
    # true: <run_root>/<job_name>-<job id> instead, a fresh run for every job (no singleton).
    run_dir_per_job: bool = False
    command: list[str] = field(default_factory=lambda: ["afb-scale", "train", "--config", "configs/quickstart.yaml"])
    # A sweep: one list of config overrides per array task (e.g. [["train.lr=1e-3"], ...]).
    sweep: list[list[str]] = field(default_factory=list)
    # Most array tasks running at once (the %N of --array); None: no limit.
    array_parallel: Optional[int] = None
    container: ContainerConfig = field(default_factory=ContainerConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    # Extra environment of the job (NCCL_*, HF_HOME, ...): exported, quoted, in the script.
    env: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Validation

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
_PATH_CHARS = r"[A-Za-z0-9_./+@-]"
_RULES = {
    "job_name": (rf"{_NAME}", "letters, digits and _ . + - (starting with a letter or digit)"),
    "partition": (rf"{_NAME}(,{_NAME})*", "a Slurm partition name or a comma-separated list of them"),
    "account": (rf"{_NAME}", "a Slurm account name: letters, digits and _ . + -"),
    "qos": (rf"{_NAME}", "a Slurm QOS name: letters, digits and _ . + -"),
    "constraint": (r"[A-Za-z0-9_.,&|\[\]*]+", "Slurm feature syntax: names joined by & | , [ ] *"),
    "mem": (r"[0-9]+[KMGT]?", "a size like 480G or 0 (all of the node's memory)"),
    "log_dir": (rf"{_PATH_CHARS}+", "a path of letters, digits and _ . / + @ - (no spaces)"),
    "run_root": (rf"{_PATH_CHARS}+", "a path of letters, digits and _ . / + @ - (no spaces)"),
    "container.image": (r"[A-Za-z0-9_./:@#+-]+", "an image reference or path (no spaces or shell characters)"),
    "gpu.nccl_socket_ifname": (r"[\^=]?[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*",
                               "interface names like ib0 or ^lo,docker0"),
    "gpu.nccl_ib_hca": (r"[\^=]?[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*", "HCA names like mlx5_0:1,mlx5_1:1"),
    "gpu.gpu_bind": (r"(verbose,)?[a-z_]+(:[0-9A-Fa-fx,*]+)?", "an srun --gpu-bind value like closest"),
    "gpu.cpu_bind": (r"(verbose,)?[a-z_]+(:[0-9A-Fa-fx,*]+)?", "an srun --cpu-bind value like cores"),
}
# Slurm's time formats (sbatch --time): the leading field is unbounded, the ones after it must be
# in range. Each entry: the shape, and the names of its fields in order.
_TIME_FORMATS = (
    (re.compile(r"(\d+)"), ("minutes",)),
    (re.compile(r"(\d+):(\d+)"), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)"), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("days", "hours", "minutes", "seconds")),
)
_TIME_LIMITS = {"hours": 23, "minutes": 59, "seconds": 59}
_TIME_HELP = ("use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S (days-hours:minutes:seconds; the first field "
              "has no upper bound, later minutes and seconds are 0-59 and hours after a day part 0-23)")
_MOUNT_RE = re.compile(rf"/{_PATH_CHARS}*(:/{_PATH_CHARS}*(:[a-z,+]+)?)?")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OVERRIDE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]-]*=.*", re.S)
# Set by the launch scripts themselves; a job config must not fight them.
_RESERVED_ENV = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "NODE_RANK", "NNODES", "NPROC_PER_NODE", "RDZV_ID", "RDZV_BACKEND", "GROUP_RANK"}


def _get(cfg: ClusterJobConfig, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _no_control(key: str, value: str) -> None:
    if any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{key}={value!r} must not contain a newline or NUL character")


def _check_time(value: str) -> None:
    for pattern, names in _TIME_FORMATS:
        m = pattern.fullmatch(value)
        if m:
            break
    else:
        raise ConfigError(f"time={value!r} is not a Slurm time limit; {_TIME_HELP}")
    fields = [int(n) for n in m.groups()]
    for name, n in list(zip(names, fields))[1:]:  # the leading field is unbounded
        if n > _TIME_LIMITS[name]:
            raise ConfigError(f"time={value!r} is not a Slurm time limit: {name} {n} is out of range "
                              f"0-{_TIME_LIMITS[name]}; {_TIME_HELP}")
    if not any(fields):
        raise ConfigError(f"time={value!r} must be longer than zero")


def validate_job(cfg: ClusterJobConfig) -> None:
    """Every rule of a cluster job, checked before a script is written. Raises ConfigError."""
    for key, lo in (("nodes", 1), ("cpus_per_task", 1), ("gpus_per_node", 0), ("signal_seconds", 0),
                    ("max_requeues", 0), ("step_wait", 0), ("step_retries", 0)):
        if _get(cfg, key) < lo:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= {lo}")
    if cfg.nproc_per_node is not None and cfg.nproc_per_node < 1:
        raise ConfigError(f"nproc_per_node={cfg.nproc_per_node} must be >= 1")
    if cfg.signal_seconds > 65535:
        raise ConfigError(f"signal_seconds={cfg.signal_seconds} must be at most 65535 (Slurm's limit)")
    if cfg.master_port is not None and not 1024 <= cfg.master_port <= 65535:
        raise ConfigError(f"master_port={cfg.master_port} must be between 1024 and 65535")
    if cfg.array_parallel is not None and cfg.array_parallel < 1:
        raise ConfigError(f"array_parallel={cfg.array_parallel} must be >= 1")
    if cfg.array_parallel is not None and not cfg.sweep:
        raise ConfigError("array_parallel is set but sweep is empty; array jobs come from sweep entries")
    if cfg.gpu.cuda_device_max_connections is not None and cfg.gpu.cuda_device_max_connections < 1:
        raise ConfigError(f"gpu.cuda_device_max_connections={cfg.gpu.cuda_device_max_connections} must be >= 1")
    _check_time(cfg.time)
    for key, (pattern, rule) in _RULES.items():
        value = _get(cfg, key)
        if value and not re.fullmatch(pattern, value):
            raise ConfigError(f"{key}={value!r} is not allowed: must be {rule}")
    if not cfg.job_name:
        raise ConfigError("job_name must not be empty")
    if not cfg.command:
        raise ConfigError("command must name the program to run, e.g. [afb-scale, train, --config, X]")
    for i, arg in enumerate(cfg.command):
        _no_control(f"command[{i}]", arg)
    for i, overrides in enumerate(cfg.sweep):
        for j, ov in enumerate(overrides):
            _no_control(f"sweep[{i}][{j}]", ov)
            if not _OVERRIDE_RE.fullmatch(ov):
                raise ConfigError(f"sweep[{i}][{j}]={ov!r} must look like section.key=value")
    c = cfg.container
    if c.runtime == "none" and (c.image or c.mounts):
        raise ConfigError("container.image/mounts are set but container.runtime is none; "
                          "choose container.runtime=pyxis or apptainer")
    if c.runtime != "none" and not c.image:
        raise ConfigError(f"container.runtime={c.runtime} needs container.image")
    for i, m in enumerate(c.mounts):
        if not _MOUNT_RE.fullmatch(m):
            raise ConfigError(
                f"container.mounts[{i}]={m!r} is not allowed: must be /SRC[:/DST[:FLAGS]] with absolute "
                "paths of letters, digits and _ . / + @ - (no spaces, commas or shell characters)"
            )
    if cfg.launcher == "srun" and cfg.gpus_per_node == 0 and cfg.nproc_per_node is None:
        raise ConfigError("launcher=srun without GPUs needs nproc_per_node (tasks per node)")
    if cfg.gpus_per_node and cfg.nproc_per_node and cfg.nproc_per_node > cfg.gpus_per_node:
        raise ConfigError(f"nproc_per_node={cfg.nproc_per_node} is more than gpus_per_node={cfg.gpus_per_node}")
    for k, v in cfg.env.items():
        if not isinstance(k, str) or not _ENV_KEY_RE.fullmatch(k):
            raise ConfigError(f"env key {k!r} is not a valid environment variable name")
        if k in _RESERVED_ENV or k.startswith(("SLURM_", "AFB_")):
            raise ConfigError(f"env.{k} is set by the launch scripts and cannot be set in the job config")
        _no_control(f"env.{k}", _env_value(k, v))


def _env_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"env.{key}={value!r} must be a string or a number")


def load_job(path: str | os.PathLike | None, overrides: list[str] = ()) -> ClusterJobConfig:
    """Load a cluster-job config (YAML with `include:`), apply key=value overrides, validate."""
    # YAML 1.1 reads an unquoted 1:30:00 as a base-60 number (5400) and 90 as an integer, so a
    # time given on the command line is kept as the text that was typed.
    raw_time, rest = None, []
    for ov in overrides:
        key, sep, raw = ov.partition("=")
        if sep and key.strip() == "time":
            raw_time = raw.strip()
        else:
            rest.append(ov)
    data = read_with_overrides(path, rest)
    if raw_time is not None:
        try:
            typed = yaml.safe_load(raw_time)
        except yaml.YAMLError:
            typed = None
        data["time"] = typed if isinstance(typed, str) else raw_time
    elif isinstance(data.get("time"), (int, float)) and not isinstance(data["time"], bool):
        raise ConfigError(f"time={data['time']} in {path} is a number, not a Slurm time limit: quote it, "
                          'e.g. time: "04:00:00" (YAML reads an unquoted 4:00:00 as 14400 seconds)')
    # `env` is a free mapping, which the typed loader does not handle: checked here instead.
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"env={env!r} must be a mapping of NAME: value")
    cfg = _from_dict(ClusterJobConfig, data)
    cfg.env = {str(k): _env_value(str(k), v) for k, v in env.items()}
    validate_job(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# Rendering

def _q(value: Any) -> str:
    quoted = shlex.quote(str(value))
    if "," in quoted and not quoted.startswith("'"):
        # Same string; quoted so that shellcheck does not take commas for array separators.
        quoted = f"'{quoted}'"
    return quoted


def _array(name: str, items: list[str]) -> str:
    if not items:
        return f"{name}=()"
    return f"{name}=(" + " ".join(_q(i) for i in items) + ")"


def nproc_per_node(cfg: ClusterJobConfig) -> int:
    return cfg.nproc_per_node or cfg.gpus_per_node or 1


def shared_run_dir(cfg: ClusterJobConfig) -> bool:
    """Whether every job of this name appends the same run directory to its command."""
    return cfg.append_run_dir and not cfg.run_dir_per_job


def sbatch_options(cfg: ClusterJobConfig, repo: Path) -> list[str]:
    """The #SBATCH options; every value has passed validate_job's syntax rules."""
    opts = [f"--job-name={cfg.job_name}", f"--nodes={cfg.nodes}",
            f"--ntasks-per-node={1 if cfg.launcher == 'torchrun' else nproc_per_node(cfg)}",
            f"--cpus-per-task={cfg.cpus_per_task}", f"--time={cfg.time}"]
    if cfg.gpus_per_node:
        opts.append(f"--gpus-per-node={cfg.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(cfg, key):
            opts.append(f"--{key}={getattr(cfg, key)}")
    if cfg.exclusive:
        opts.append("--exclusive")
    opts.append(f"--chdir={repo}")
    pattern = "%x-%A_%a.out" if cfg.sweep else "%x-%j.out"
    opts.append(f"--output={cfg.log_dir.rstrip('/')}/{pattern}")
    # Requeued attempts append to the same log instead of truncating it.
    opts.append("--open-mode=append")
    if cfg.signal_seconds:
        # B: only the batch shell gets the signal; its trap forwards it to the training step.
        opts.append(f"--signal=B:USR1@{cfg.signal_seconds}")
    opts.append("--requeue" if cfg.requeue else "--no-requeue")
    if shared_run_dir(cfg) and not cfg.sweep:
        # One run directory per job name: a job submitted again waits for the previous one.
        opts.append("--dependency=singleton")
    if cfg.sweep:
        spec = f"0-{len(cfg.sweep) - 1}"
        if cfg.array_parallel:
            spec += f"%{cfg.array_parallel}"
        opts.append(f"--array={spec}")
    return opts


def _srun_args(cfg: ClusterJobConfig, repo: Path) -> list[str]:
    args = []
    if cfg.gpu.gpu_bind:
        args.append(f"--gpu-bind={cfg.gpu.gpu_bind}")
    if cfg.gpu.cpu_bind:
        args.append(f"--cpu-bind={cfg.gpu.cpu_bind}")
    c = cfg.container
    mounts = list(c.mounts) + ([f"{repo}:{repo}"] if c.mount_repo else [])
    if c.runtime == "pyxis":
        args.append(f"--container-image={c.image}")
        if mounts:
            args.append(f"--container-mounts={','.join(mounts)}")
        args.append(f"--container-workdir={repo}")
    return args


def _container_wrap(cfg: ClusterJobConfig, repo: Path) -> list[str]:
    c = cfg.container
    if c.runtime != "apptainer":
        return []
    mounts = list(c.mounts) + ([f"{repo}:{repo}"] if c.mount_repo else [])
    wrap = ["apptainer", "exec"]
    if cfg.gpus_per_node:
        wrap.append("--nv")  # bind the host's NVIDIA driver and devices
    if mounts:
        wrap.append(f"--bind={','.join(mounts)}")
    wrap += [f"--pwd={repo}", c.image]
    return wrap


def _gpu_env(cfg: ClusterJobConfig) -> dict[str, str]:
    g = cfg.gpu
    env = {}
    if g.cuda_device_max_connections is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = str(g.cuda_device_max_connections)
    env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1" if g.nccl_async_error_handling else "0"
    if g.nccl_debug:
        env["NCCL_DEBUG"] = g.nccl_debug
    if g.nccl_socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = g.nccl_socket_ifname
        # Gloo (the CPU backend, also used for some DeepSpeed/megatron side groups) takes a plain
        # comma-separated list: give it the same interfaces unless NCCL's value is an exclusion.
        if not g.nccl_socket_ifname.startswith("^"):
            env["GLOO_SOCKET_IFNAME"] = g.nccl_socket_ifname.lstrip("=")
    if g.nccl_ib_hca:
        env["NCCL_IB_HCA"] = g.nccl_ib_hca
    return env


def template_body(repo: Path) -> str:
    path = repo / TEMPLATE
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the afb_scale repository root or pass --repo")
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(BODY_MARKER):
            return "".join(lines[i + 1:])
    raise ConfigError(f"{path} has no line starting {BODY_MARKER!r}")


def render(cfg: ClusterJobConfig, repo: str | os.PathLike, source: str = "") -> str:
    """The complete batch script for `cfg` (validated again here, so no caller can skip it)."""
    validate_job(cfg)
    repo = Path(repo).resolve()
    if not re.fullmatch(rf"{_PATH_CHARS}+", str(repo)):
        raise ConfigError(f"repository path {str(repo)!r} must not contain spaces or shell characters "
                          "(it appears in #SBATCH --chdir)")
    out = ["#!/usr/bin/env bash",
           f"# Rendered by `afb-scale submit`{' from ' + source if source else ''}: edit the config",
           "# and render again rather than editing this file. The body below the settings is",
           "# launch/slurm/train.sbatch's; see that file for how it works."]
    out += [f"#SBATCH {o}" for o in sbatch_options(cfg, repo)]
    out += ["", "# ---- settings from the job config ----"]
    settings = {
        "AFB_REPO": str(repo),
        "AFB_LAUNCHER": cfg.launcher,
        "AFB_NPROC_PER_NODE": str(nproc_per_node(cfg)),
        "AFB_RDZV": cfg.rendezvous,
        "AFB_RUN_ROOT": cfg.run_root,
        "AFB_APPEND_RUN_DIR": "1" if cfg.append_run_dir else "0",
        "AFB_RUN_DIR_PER_JOB": "1" if cfg.run_dir_per_job else "0",
        "AFB_STEP_RETRIES": str(cfg.step_retries),
        "AFB_REQUEUE": "1" if cfg.requeue else "0",
        "AFB_MAX_REQUEUES": str(cfg.max_requeues),
        "AFB_STEP_WAIT": str(cfg.step_wait),
    }
    if cfg.master_port is not None:
        settings["AFB_MASTER_PORT"] = str(cfg.master_port)
    out += [f"{k}={_q(v)}" for k, v in settings.items()]
    out.append(_array("AFB_TRAIN_CMD", cfg.command))
    out.append(_array("AFB_SRUN_ARGS", _srun_args(cfg, repo)))
    out.append(_array("AFB_CONTAINER_WRAP", _container_wrap(cfg, repo)))
    if cfg.sweep:
        out.append("# One set of config overrides per array task.")
        out.append("afb_sweep_args() {")
        out.append('    case "$1" in')
        for i, overrides in enumerate(cfg.sweep):
            out.append(f"        {i}) {_array('AFB_SWEEP_ARGS', overrides)} ;;")
        out.append('        *) echo "afb-slurm: no sweep entry for array task $1" >&2; exit 2 ;;')
        out.append("    esac")
        out.append("}")
    env = {**_gpu_env(cfg), **cfg.env}
    if env:
        out.append("# GPU/NCCL settings (gpu: section) and the job's env: section.")
        out += [f"export {k}={_q(v)}" for k, v in env.items()]
    out.append("# ---- end of settings ----")
    return "\n".join(out) + "\n" + template_body(repo)


# ----------------------------------------------------------------------------------------------
# Command line

def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="afb-scale submit",
        description="Render a Slurm batch script from a cluster-job config and submit it with sbatch.",
    )
    p.add_argument("config", help="cluster-job YAML, e.g. configs/cluster/example.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config values, e.g. nodes=4 container.image=...")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.add_argument("--output", "-o", help="where to write the script (default: LOG_DIR/JOB_NAME-TIME.sbatch)")
    p.add_argument("--repo", default=".", help="repository root as the nodes see it (default: current directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = load_job(args.config, args.overrides)
        repo = Path(args.repo).resolve()
        script = render(cfg, repo, source=args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    log_dir = repo / cfg.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create --output's directory
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.output) if args.output else log_dir / f"{cfg.job_name}-{stamp}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        r = subprocess.run(["sbatch", "--parsable", str(path)], cwd=repo, capture_output=True, text=True)
    except FileNotFoundError:
        print(f"error: sbatch not found; the script is at {path}", file=sys.stderr)
        return 1
    if r.returncode != 0:
        print(f"error: sbatch failed: {r.stderr.strip()} (script: {path})", file=sys.stderr)
        return r.returncode or 1
    job_id = r.stdout.strip().split(";")[0]
    where = f"script {path}; log {cfg.log_dir}/{cfg.job_name}-{job_id}.out"
    if shared_run_dir(cfg):
        # Named after the job, not its id: a job submitted again under this name continues it.
        run_dir = f"{cfg.run_root.rstrip('/')}/{cfg.job_name}" + ("_<task>" if cfg.sweep else "")
        where += f"; run directory {run_dir}"
    print(f"submitted job {job_id} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
