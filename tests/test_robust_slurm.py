"""Recovery by default in the Slurm batch script: one run directory per job name (a job submitted
again continues its run), and a failed training step retried in place from the newest complete
checkpoint.

The first tests run launch/slurm/train.sbatch's body with a fake `srun` and `scontrol` (no Slurm
needed, seconds). The last one runs on the real two-node test Slurm (tests/slurm_cluster.py):
a training worker is SIGKILLed after the first checkpoint, the job retries the step, completes,
and its per-step losses equal an uninterrupted job's; the uninterrupted job, submitted again,
continues its run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from afb_scale.cluster import submit
from afb_scale.config import ConfigError
from afb_scale.metrics.metrics_file import read_metrics
from launch_support import REPO, job_env, tiny_training  # noqa: F401  (tiny_training: fixture)
from slurm_cluster import SlurmCluster, require_slurm

TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
EXAMPLE = REPO / "configs" / "cluster" / "example.yaml"
LOCAL_CPU = REPO / "configs" / "cluster" / "local-cpu.yaml"

# srun: counts its calls and logs their arguments; FAKE_PLAN says, per call, the exit status and
# whether to leave a complete checkpoint (ckpt:STATUS) in the command's train.run_dir first.
FAKE_SRUN = r"""#!/usr/bin/env bash
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_DIR/count"
printf '%s\n' "$*" >> "$FAKE_DIR/calls"
IFS=, read -r -a plan <<<"$FAKE_PLAN"
entry=${plan[$((n - 1))]:-0}
for a in "$@"; do case "$a" in train.run_dir=*) run_dir=${a#train.run_dir=} ;; esac; done
case "$entry" in
    ckpt:*) tag=$(printf 'step%08d' "$((n * 10))")
            if [ -n "${run_dir:-}" ]; then
                mkdir -p "$run_dir/checkpoints/$tag" && echo '{}' > "$run_dir/checkpoints/$tag/COMPLETE"
            fi
            entry=${entry#ckpt:} ;;
esac
exit "$entry"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
printf 'scontrol %s\n' "$*" >> "$FAKE_DIR/calls"
if [ "$1 $2" = "show hostnames" ]; then echo node1; fi
"""


class FakeSlurm:
    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.runs = tmp_path / "runs"

    def run(self, plan: str, job_id: int = 123, name: str = "job", args=("x=1",),
            **env: str) -> subprocess.CompletedProcess:
        (self.dir / "count").unlink(missing_ok=True)
        (self.dir / "calls").unlink(missing_ok=True)
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "AFB_"))}
        e.update(PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_DIR=str(self.dir), FAKE_PLAN=plan,
                 SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME=name, SLURM_JOB_NODELIST="node1",
                 SLURM_JOB_NUM_NODES="1", AFB_REPO=str(self.dir), AFB_RUN_ROOT=str(self.runs), **env)
        return subprocess.run(["bash", str(TRAIN_SBATCH), "train-cmd", *args], env=e, capture_output=True,
                              text=True, timeout=60)

    def srun_calls(self) -> list[str]:
        calls = (self.dir / "calls").read_text().splitlines() if (self.dir / "calls").exists() else []
        return [c for c in calls if not c.startswith("scontrol ")]


@pytest.fixture
def fake(tmp_path):
    return FakeSlurm(tmp_path)


def test_failed_step_after_a_checkpoint_is_retried_in_place(fake):
    r = fake.run("ckpt:1,0")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    calls = fake.srun_calls()
    assert len(calls) == 2 and all(f"train.run_dir={fake.runs}/job" in c for c in calls), calls
    assert "training step exited 1 (preempted=0, attempt 1)" in out
    assert f"retry 1 of 3 in place, resuming from {fake.runs}/job/checkpoints/step00000010" in out
    assert "training step exited 0 (preempted=0, attempt 2)" in out
    assert "requeue" not in (fake.dir / "calls").read_text()


def test_retries_are_bounded(fake):
    r = fake.run("ckpt:1,ckpt:1,ckpt:1,ckpt:1,0", AFB_STEP_RETRIES="2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(fake.srun_calls()) == 3
    assert "not retrying: the step failed 3 times (AFB_STEP_RETRIES=2)" in r.stderr


@pytest.mark.parametrize("plan, status, reason", [
    ("1", 1, "not retrying: no complete checkpoint in"),
    ("ckpt:2", 2, "not retrying: the command rejected its input (exit 2"),
    ("ckpt:3", 3, "not retrying: training stopped on non-finite steps (exit 3)"),
])
def test_no_retry_without_a_checkpoint_or_after_a_deterministic_failure(fake, plan, status, reason):
    r = fake.run(plan)
    assert r.returncode == status
    assert len(fake.srun_calls()) == 1
    assert reason in r.stdout + r.stderr


def test_no_retries_when_switched_off(fake):
    r = fake.run("ckpt:1,0", AFB_STEP_RETRIES="0")
    assert r.returncode == 1 and len(fake.srun_calls()) == 1


def test_a_job_submitted_again_continues_the_same_run_directory(fake):
    assert fake.run("ckpt:0", job_id=123).returncode == 0
    r = fake.run("0", job_id=124)
    assert r.returncode == 0
    assert f"train.run_dir={fake.runs}/job" in fake.srun_calls()[0]
    assert f"the run continues from {fake.runs}/job/checkpoints/step00000010" in r.stdout
    # Each job's id still names the run (a relative link), as its log logs/job-<id>.out does.
    for job_id in (123, 124):
        link = fake.runs / f"job-{job_id}"
        assert link.is_symlink() and os.readlink(link) == "job"
    assert sorted(p.name for p in fake.runs.iterdir()) == ["job", "job-123", "job-124"]


def test_run_directory_per_job_on_request_and_per_array_task(fake):
    assert fake.run("0", AFB_RUN_DIR_PER_JOB="1").returncode == 0
    assert f"train.run_dir={fake.runs}/job-123 " in fake.srun_calls()[0] + " "
    assert not (fake.runs / "job").exists()
    assert fake.run("0", job_id=130, SLURM_ARRAY_JOB_ID="128", SLURM_ARRAY_TASK_ID="2").returncode == 0
    assert f"train.run_dir={fake.runs}/job_2 " in fake.srun_calls()[0] + " "
    assert os.readlink(fake.runs / "job-128_2") == "job_2"


def test_a_command_with_its_own_run_directory_is_retried_from_there(fake):
    own = fake.dir / "own-run"
    r = fake.run("ckpt:1,0", AFB_APPEND_RUN_DIR="0", args=(f"train.run_dir={own}",))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {own}/checkpoints/step00000010" in r.stdout
    assert not fake.runs.exists()  # nothing made under the run root for a command that picks its own
    r = fake.run("ckpt:1,0", AFB_APPEND_RUN_DIR="0")  # no train.run_dir=: nowhere to look
    assert r.returncode == 1 and len(fake.srun_calls()) == 1
    assert "not retrying: the run directory is not known (AFB_APPEND_RUN_DIR=0)" in r.stderr


@pytest.mark.parametrize("env, message", [
    ({"AFB_STEP_RETRIES": "many"}, "afb-slurm: error: AFB_STEP_RETRIES=many must be a whole number >= 0"),
    ({"AFB_RUN_DIR_PER_JOB": "yes"}, "afb-slurm: error: AFB_RUN_DIR_PER_JOB=yes must be 0 or 1"),
])
def test_bad_settings_are_one_line_errors(fake, env, message):
    r = fake.run("0", **env)
    assert r.returncode == 2 and r.stderr.strip() == message
    assert fake.srun_calls() == [] and not fake.runs.exists()


# ----------------------------------------------------------------------------------------------
# afb-scale submit renders the same defaults


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_submit_renders_shared_run_directory_singleton_and_retries():
    script = submit.render(submit.load_job(EXAMPLE), REPO)
    assert "--dependency=singleton" in sbatch_lines(script)
    assert "AFB_RUN_DIR_PER_JOB=0" in script and "AFB_STEP_RETRIES=3" in script
    script = submit.render(submit.load_job(EXAMPLE, ["run_dir_per_job=true", "step_retries=0"]), REPO)
    assert "--dependency=singleton" not in sbatch_lines(script)
    assert "AFB_RUN_DIR_PER_JOB=1" in script and "AFB_STEP_RETRIES=0" in script
    # Array tasks have a run directory each and run side by side.
    script = submit.render(submit.load_job(EXAMPLE, ["sweep=[[train.lr=1e-3], [train.lr=3e-3]]"]), REPO)
    assert "--dependency=singleton" not in sbatch_lines(script)


def test_submit_rejects_negative_step_retries():
    with pytest.raises(ConfigError, match="step_retries=-1 must be >= 0"):
        submit.load_job(EXAMPLE, ["step_retries=-1"])


# ----------------------------------------------------------------------------------------------
# The real two-node Slurm: a worker SIGKILLed mid-run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def training_workers(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the trainer processes (not their torchrun agents) writing to run_dir."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if argv[1:3] != ["-m", "afb_scale.cli"] or f"train.run_dir={run_dir}" not in argv:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except (OSError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(proc.name)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {step: rec["loss"] for step, rec in read_metrics(run_dir / "metrics.jsonl").items()}


def events(run_dir: Path) -> list[str]:
    import json

    return [json.loads(line).get("event") for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"event"' in line]


def test_lost_worker_is_retried_in_place_and_a_resubmitted_job_continues(cluster, tiny_training, tmp_path):
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    env = job_env(SLURM_CONF=cluster.env["SLURM_CONF"], AFB_RUN_ROOT=str(runs))
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_")) and k != "SLURM_CONF"]:
        del env[k]
    steps = 50  # checkpoints every 10 steps (launch_support.TINY_OVERRIDES)
    command = [*tiny_training, f"train.steps={steps}"]

    def sbatch(name: str, *cmd: str) -> str:
        return cluster.sbatch(["--nodes=2", f"--job-name={name}", f"--chdir={REPO}", f"--output={logs}/%x-%j.out",
                               str(TRAIN_SBATCH), *cmd], env=env)

    # Both at once (the test cluster's nodes have room for both): an uninterrupted reference, and
    # the job that loses a worker.
    ref_id = sbatch("afb-ref", *command)
    job_id = sbatch("afb-lose", *command)
    run_dir, ref_dir = runs / "afb-lose", runs / "afb-ref"
    log = logs / f"afb-lose-{job_id}.out"
    alive = lambda: cluster.job_info(job_id).get("JobState") in ("PENDING", "RUNNING")  # noqa: E731
    first = run_dir / "checkpoints" / "step00000010" / "COMPLETE"
    deadline = time.monotonic() + 400
    while not first.exists():
        assert alive() and time.monotonic() < deadline, f"no first checkpoint:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    workers = training_workers(run_dir)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    killed_after = max(losses(run_dir))
    assert killed_after < steps, "the run finished before the kill: raise steps"

    info = cluster.wait_job(job_id, timeout=600)
    ref_info = cluster.wait_job(ref_id, timeout=600)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert ref_info["JobState"] == "COMPLETED", (logs / f"afb-ref-{ref_id}.out").read_text()[-4000:]
    # Retried in place (the same allocation, no requeue), from the newest complete checkpoint.
    assert info.get("Restarts") == "0", info
    before, _, after = text.partition("afb-slurm: training step failed (exit")
    assert after, f"the step was not retried:\n{text[-6000:]}"
    assert "training step exited 1 (preempted=0, attempt 1)" in before, text[-6000:]
    assert "retry 1 of 3 in place, resuming from" in after
    assert "training finished" not in before and "training finished" in after
    assert "afb-launch node=node1" in after and "afb-launch node=node2" in after
    assert events(run_dir) == ["start", "resume"]
    # The run's history: every step once, each loss bit for bit the uninterrupted run's.
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert losses(run_dir) == losses(ref_dir)
    assert os.readlink(runs / f"afb-lose-{job_id}") == "afb-lose"

    # The reference job submitted again (as after a failure that exhausted the retries) continues
    # its run directory from its last checkpoint, here for 10 more steps, instead of starting over.
    again_id = sbatch("afb-ref", *tiny_training, f"train.steps={steps + 10}")
    again = cluster.wait_job(again_id, timeout=600)
    again_log = (logs / f"afb-ref-{again_id}.out").read_text(errors="replace")
    assert again["JobState"] == "COMPLETED", again_log[-6000:]
    assert f"the run continues from {ref_dir}/checkpoints/step{steps:08d}" in again_log
    assert events(ref_dir) == ["start", "resume"]
    continued = losses(ref_dir)
    assert sorted(continued) == list(range(1, steps + 11))
    assert {s: continued[s] for s in range(1, steps + 1)} == losses(run_dir)


def test_submit_says_which_run_directory_the_job_continues(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "77;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    assert submit.main([str(LOCAL_CPU), f"log_dir={tmp_path}/logs", "run_root=runs/", "--repo", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted job 77 (") and out.rstrip().endswith("; run directory runs/afb-tiny-cpu)")
    assert submit.main([str(LOCAL_CPU), f"log_dir={tmp_path}/logs", "run_dir_per_job=true", "--repo", str(REPO)]) == 0
    assert "run directory" not in capsys.readouterr().out
