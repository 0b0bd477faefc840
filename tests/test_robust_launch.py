"""Robustness of the launch path: submit's time limits, and torchrun.sh's last word on bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from afb_scale.cluster import submit
from afb_scale.config import ConfigError
from launch_support import REPO, job_env, wait_for_text

EXAMPLE = REPO / "configs" / "cluster" / "example.yaml"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
TIME_FORMATS = "use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S"


# ----------------------------------------------------------------------------------------------
# A. Slurm time limits


@pytest.mark.parametrize("value, problem", [
    ("25:99:99", "minutes 99 is out of range 0-59"),
    ("1:00:60", "seconds 60 is out of range 0-59"),
    ("90:60", "seconds 60 is out of range 0-59"),
    ("1-24", "hours 24 is out of range 0-23"),
    ("2-23:60", "minutes 60 is out of range 0-59"),
    ("0-1:00:75", "seconds 75 is out of range 0-59"),
])
def test_out_of_range_time_fields_are_rejected(value, problem):
    with pytest.raises(ConfigError) as e:
        submit.load_job(EXAMPLE, [f"time={value}"])
    msg = str(e.value)
    assert msg.startswith(f"time={value!r} is not a Slurm time limit: {problem}"), msg
    assert TIME_FORMATS in msg and "\n" not in msg


@pytest.mark.parametrize("value", ["1 hour", "1:2:3:4", "2-", "-5", "1h", "UNLIMITED", ""])
def test_malformed_times_are_rejected(value):
    with pytest.raises(ConfigError) as e:
        submit.load_job(EXAMPLE, [f"time={value}"])
    assert f"time={value!r} is not a Slurm time limit; {TIME_FORMATS}" in str(e.value)


@pytest.mark.parametrize("value", ["90", "30:00", "1:30:00", "12:00:00", "100:59:59", "2-0", "1-23",
                                   "1-23:59", "0-00:30:59", "7-00:00:00", "'1:30:00'"])
def test_every_slurm_time_format_renders_as_typed(value):
    """Valid limits pass, and reach #SBATCH --time as typed: YAML would read an unquoted 1:30:00
    as the number 5400 (base 60), which is not what the user wrote."""
    cfg = submit.load_job(EXAMPLE, [f"time={value}"])
    assert cfg.time == value.strip("'")
    assert f"#SBATCH --time={value.strip(chr(39))}\n" in submit.render(cfg, REPO)


def test_an_unquoted_time_in_a_config_file_is_an_error_not_seconds(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"include: [{EXAMPLE}]\ntime: 4:00:00\n")
    with pytest.raises(ConfigError) as e:
        submit.load_job(cfg, [])
    assert "time=14400" in str(e.value) and 'quote it, e.g. time: "04:00:00"' in str(e.value)


def test_submit_main_rejects_a_bad_time_in_one_line_and_writes_nothing(tmp_path, capsys):
    rc = submit.main([str(EXAMPLE), "time=25:99:99", f"log_dir={tmp_path}/logs", "--repo", str(REPO)])
    assert rc == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("error: time='25:99:99' is not a Slurm time limit"), err
    assert "\n" not in err and "Traceback" not in err and cap.out == ""
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------------
# B. Bad input under launch/torchrun.sh: the worker's `error:` line is the last thing printed


def torchrun_sh(command: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = job_env(NPROC_PER_NODE=str(nproc), AFB_PYTHON=sys.executable)
    for k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RDZV_ID", "RDZV_BACKEND", "SLURM_JOB_ID",
              "SLURM_STEP_ID", "SLURM_NODEID"):
        env.pop(k, None)
    # stdout and stderr in one stream, as a terminal or a Slurm log shows them.
    return subprocess.run(["bash", str(TORCHRUN_SH), *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def train(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml", *overrides]


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=-1", "error: model.hidden_size=-1 must be >= 1"),
    ("parallel.tensor=3", "error: world size 2 is not a multiple of parallel.tensor"),
])
def test_bad_override_ends_with_the_error_line_and_status_2(override, message):
    r = torchrun_sh(train(override))
    lines = r.stdout.rstrip("\n").splitlines()
    assert r.returncode == 2, r.stdout[-4000:]
    assert lines[-1].startswith(message), r.stdout[-4000:]
    # torchrun's own report is still there, before it.
    assert "ChildFailedError" in r.stdout


# A worker that exits with a given status (after an `error:` line for 2), or dies of SIGKILL.
WORKER = r"""
import os, signal, sys
how = sys.argv[1]
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "2":
    print("error: probe.value=7 must be < 5", file=sys.stderr, flush=True)
sys.exit(int(how))
"""


@pytest.mark.parametrize("how, status", [("2", 2), ("3", 3), ("kill", 1)])
def test_worker_status_is_the_launchers_status(how, status):
    """The first failed worker's status is the launcher's (torchrun itself says 1 for any failure);
    a worker killed by a signal leaves torchrun's 1."""
    r = torchrun_sh([sys.executable, "-c", WORKER, how], nproc=1, timeout=120)
    assert r.returncode == status, r.stdout[-4000:]
    last = r.stdout.rstrip("\n").splitlines()[-1]
    if how == "2":
        assert last == "error: probe.value=7 must be < 5"
    else:
        assert not last.startswith("error:")


def test_stderr_still_streams_through_the_launcher(tmp_path):
    """The filter copies stderr as it comes: a worker's stderr line is readable before it exits."""
    marker = tmp_path / "seen"
    code = ("import sys, time, pathlib\nprint('progress line', file=sys.stderr, flush=True)\n"
            f"p = pathlib.Path({str(marker)!r})\n"
            "deadline = time.time() + 60\n"
            "while not p.exists() and time.time() < deadline: time.sleep(0.1)\n"
            "sys.exit(0 if p.exists() else 1)\n")
    env = job_env(NPROC_PER_NODE="1", AFB_PYTHON=sys.executable)
    for k in ("MASTER_ADDR", "NNODES", "NODE_RANK", "RDZV_ID", "RDZV_BACKEND", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        env.pop(k, None)
    log = tmp_path / "log"
    with open(log, "w") as f:
        p = subprocess.Popen(["bash", str(TORCHRUN_SH), sys.executable, "-c", code], cwd=REPO, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_text(log, ["progress line"], timeout=60, proc_alive=lambda: p.poll() is None)
        marker.touch()
        assert p.wait(timeout=60) == 0, log.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_launcher_survives_its_file_changing_while_it_runs(tmp_path):
    """A checkout updated (git pull) while agents run: bash reads a script as it goes, unless the
    script is one compound command. Here the launcher's file is rewritten mid-run."""
    script = tmp_path / "torchrun.sh"
    original = TORCHRUN_SH.read_text()
    script.write_text(original)
    started = tmp_path / "started"
    code = (f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(3)\n")
    env = job_env(NPROC_PER_NODE="1", AFB_PYTHON=sys.executable)
    for k in ("MASTER_ADDR", "NNODES", "NODE_RANK", "RDZV_ID", "RDZV_BACKEND", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        env.pop(k, None)
    p = subprocess.Popen(["bash", str(script), sys.executable, "-c", code], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        # Same file, more comment lines near the top: every later byte moves.
        lines = original.splitlines(keepends=True)
        script.write_text("".join(lines[:3] + ["# an added comment line\n"] * 7 + lines[3:]))
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out[-3000:]
    assert "syntax error" not in out
