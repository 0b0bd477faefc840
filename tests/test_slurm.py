"""The project's batch scripts on a real two-node Slurm (slurmctld + slurmd node1/node2 here).

Needs slurm-wlm and munge (launch/ci/install_slurm.sh) and root. Without them the tests skip,
unless AFB_REQUIRE_SLURM=1 (CI), where they fail. The daemons are stopped at the end of the
module, pass or fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import pytest

from afb_scale.cluster import submit
from launch_support import (  # noqa: F401  (tiny_training is a fixture)
    REPO,
    assert_run_dir_complete,
    job_env,
    tiny_training,
    wait_for_text,
)
from slurm_cluster import SlurmCluster, require_slurm

TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
LOCAL_CPU = REPO / "configs" / "cluster" / "local-cpu.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    with c:
        yield c


def job_log(log_dir: Path, name: str, job_id: str) -> Path:
    return log_dir / f"{name}-{job_id}.out"


def test_cluster_has_two_nodes(cluster):
    r = cluster.run(["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME"])
    assert sorted(r.stdout.split()) == ["node1", "node2"]


def test_submitted_two_node_training_job(cluster, tiny_training, tmp_path, monkeypatch):
    """`afb-scale submit` renders the job, sbatch runs it on node1+node2, training finishes."""
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SBATCH_")):
            monkeypatch.delenv(k)
    for k, v in job_env(SLURM_CONF=cluster.env["SLURM_CONF"]).items():
        monkeypatch.setenv(k, v)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = submit.main([str(LOCAL_CPU), "--repo", str(REPO), f"log_dir={logs}", f"run_root={runs}",
                          "command=" + json.dumps(tiny_training)])
    assert rc == 0, out.getvalue()
    job_id = out.getvalue().split()[2]
    info = cluster.wait_job(job_id, timeout=400)
    log = job_log(logs, "afb-tiny-cpu", job_id)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    # Both nodes took part: one torchrun agent per node, one rank on each.
    assert "afb-launch node=node1" in text and "afb-launch node=node2" in text, text[-6000:]
    assert "afb-scale rank 0/2" in text and "afb-scale rank 1/2" in text
    assert "nodes=node[1-2] nnodes=2" in text
    assert "training finished" in text
    assert_run_dir_complete(runs / f"afb-tiny-cpu-{job_id}")


def test_preempted_job_checkpoints_requeues_and_completes(cluster, tiny_training, tmp_path):
    """SIGUSR1 to the batch shell, as `--signal=B:USR1@N` sends it before the time limit:
    the trainers checkpoint and exit 75, the script requeues, the second run resumes and finishes."""
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    env = job_env(SLURM_CONF=cluster.env["SLURM_CONF"], AFB_RUN_ROOT=str(runs))
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_")) and k != "SLURM_CONF"]:
        del env[k]
    # Enough steps that the first run is still going when the signal lands (it is sent as soon as
    # both ranks are up; the rerun then trains the rest), few enough to keep the test short.
    command = [*tiny_training, "train.steps=40", "train.save_interval=1000"]
    job_id = cluster.sbatch(["--nodes=2", "--job-name=afb-preempt", f"--chdir={REPO}",
                             f"--output={logs}/%x-%j.out", str(TRAIN_SBATCH), *command], env=env)
    log = job_log(logs, "afb-preempt", job_id)
    wait_for_text(log, ["afb-scale rank 0/2", "afb-scale rank 1/2"], timeout=300,
                  proc_alive=lambda: cluster.job_info(job_id).get("JobState") in ("PENDING", "RUNNING"))
    # The trainer installs its handler around the time it prints its rank line, and until then the
    # signal is ignored (launch/torchrun.sh), not fatal: send it until the batch shell has passed it
    # on and the job has gone back to the queue. Never after that, or the rerun would get it too.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        info = cluster.job_info(job_id)
        if info.get("Restarts", "0") != "0" or info.get("JobState") not in ("RUNNING",):
            break
        cluster.run(["scancel", "--batch", "--signal=USR1", job_id], check=False)
        time.sleep(3)
    info = cluster.wait_job(job_id, timeout=600)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert info.get("Restarts") == "1", f"{info}\n{text[-6000:]}"
    first, _, second = text.partition("afb-slurm: requeueing job")
    assert second, f"the job was not requeued by the script:\n{text[-6000:]}"
    assert "got SIGUSR1" in first and "training step exited 75" in first
    assert "training finished" not in first, "the first run finished before the signal: raise train.steps"
    assert "restart=1" in second and "training finished" in second
    assert "afb-launch node=node1" in second and "afb-launch node=node2" in second
    assert_run_dir_complete(runs / f"afb-preempt-{job_id}")
