"""How the launch scripts size a job to the GPUs and CPUs they are given.

- launch/torchrun.sh: one worker per GPU this process may use (CUDA_VISIBLE_DEVICES before
  `nvidia-smi`), observed through its AFB_DRY_RUN=1 output and through a real torchrun start.
  A fake `nvidia-smi` on PATH stands in for an 8-GPU node.
- launch/quickstart.sh: CPU unless torch sees 2 GPUs; its real CPU run still trains.
- launch/slurm/train.sbatch: each srun step gets the job's --cpus-per-task, on a real two-node
  Slurm (tests/slurm_cluster.py) that binds tasks to CPUs (task/affinity), for both launchers.
- launch/srun_task.sh: LOCAL_RANK stays SLURM_LOCALID under GPU binding.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch_support import REPO, TINY_OVERRIDES, job_env, tiny_training  # noqa: F401  (tiny_training: fixture)
from slurm_cluster import SlurmCluster, require_slurm

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
QUICKSTART = REPO / "launch" / "quickstart.sh"
SRUN_TASK = REPO / "launch" / "srun_task.sh"
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
PYBIN = str(Path(sys.executable).parent)

FAKE_NVIDIA_SMI = """#!/bin/sh
# Stand-in for nvidia-smi on an 8-GPU node: it lists every GPU of the machine, whatever
# CUDA_VISIBLE_DEVICES says (as the real one does).
if [ "$1" = "--list-gpus" ] || [ "$1" = "-L" ]; then
    for i in 0 1 2 3 4 5 6 7; do
        echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-00000000000$i)"
    done
    exit 0
fi
echo "fake nvidia-smi: unsupported arguments: $*" >&2
exit 2
"""


@pytest.fixture
def eight_gpu_path(tmp_path) -> str:
    """PATH with a fake 8-GPU nvidia-smi first (then this interpreter, then the usual PATH)."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    return os.pathsep.join([str(bindir), PYBIN, os.environ.get("PATH", "")])


def torchrun_env(path: str, cvd: str | None, **extra: str) -> dict:
    env = job_env(PATH=path, **extra)
    for k in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_BACKEND", "RDZV_ID",
              "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NODEID", "CUDA_VISIBLE_DEVICES", "AFB_DRY_RUN"):
        if k not in extra:
            env.pop(k, None)
    if cvd is not None:
        env["CUDA_VISIBLE_DEVICES"] = cvd
    return env


def dry_run(env: dict, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TORCHRUN_SH), *(command or ("true",))], cwd=REPO,
                          env=dict(env, AFB_DRY_RUN="1"), capture_output=True, text=True, timeout=60)


# ---- launch/torchrun.sh -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "cvd, expected",
    [
        (None, 8),                     # nothing set: every GPU nvidia-smi lists
        ("0,3", 2),                    # the GPUs this process may use, not the machine's 8
        ("5", 1),
        ("GPU-aaaa,GPU-bbbb,MIG-cccc", 3),  # UUIDs count like indices
        ("0,1,-1,2", 2),               # CUDA stops reading at the first invalid entry
        ("", 1),                       # no GPU visible: one (CPU) worker
        ("-1", 1),
        ("NoDevFiles", 1),             # what Slurm sets for a job without GPUs
    ],
    ids=lambda v: repr(v),
)
def test_nproc_per_node_counts_the_visible_gpus(eight_gpu_path, cvd, expected):
    r = dry_run(torchrun_env(eight_gpu_path, cvd))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"nproc_per_node={expected} " in r.stdout, r.stdout
    assert f"--nproc-per-node={expected} " in r.stdout, r.stdout
    assert "would run:" in r.stdout


def test_explicit_nproc_per_node_wins(eight_gpu_path):
    r = dry_run(torchrun_env(eight_gpu_path, "0,3", NPROC_PER_NODE="3"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nproc_per_node=3 " in r.stdout and "--nproc-per-node=3 " in r.stdout, r.stdout


def test_dry_run_prints_the_command_quoted_and_starts_nothing(eight_gpu_path, tmp_path):
    marker = tmp_path / "ran"
    r = dry_run(torchrun_env(eight_gpu_path, "0,3"), "touch", str(marker), "two words")
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if "would run:" in line)
    argv = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + line.split("would run:", 1)[1]],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert argv[-4:] == ["--no-python", "touch", str(marker), "two words"]
    assert not marker.exists()


PROBE = r"""
import os
import torch.distributed as dist
dist.init_process_group("gloo")
# One os.write per line: both workers share torchrun's stdout pipe, and print() may split text and
# newline into two writes that interleave ("cvd=0,3probe rank 0/2 ..."); a write under PIPE_BUF is atomic.
os.write(1, (f"probe rank {dist.get_rank()}/{dist.get_world_size()} local_world_size={os.environ['LOCAL_WORLD_SIZE']} "
             f"cvd={os.environ.get('CUDA_VISIBLE_DEVICES')}\n").encode())
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_starts_one_worker_per_visible_gpu(eight_gpu_path):
    """Not only the printed count: torchrun really spawns 2 workers for CUDA_VISIBLE_DEVICES=0,3 on
    an "8-GPU" node (gloo; the workers find no CUDA here, which the probe does not need)."""
    env = torchrun_env(eight_gpu_path, "0,3", AFB_PYTHON=sys.executable)
    r = subprocess.run(["bash", str(TORCHRUN_SH), sys.executable, "-c", PROBE], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = sorted(re.findall(r"probe rank (\d+/\d+) local_world_size=(\d+) cvd=(\S+)", r.stdout))
    assert ranks == [("0/2", "2", "0,3"), ("1/2", "2", "0,3")], r.stdout + r.stderr


# ---- launch/quickstart.sh ---------------------------------------------------------------------

def quickstart_env(**extra: str) -> dict:
    env = job_env(PATH=os.pathsep.join([PYBIN, os.environ.get("PATH", "")]), **extra)
    if "DS_ACCELERATOR" not in extra:
        env.pop("DS_ACCELERATOR", None)  # job_env defaults it to cpu; the script must decide
    return env


def quickstart_dry_run(env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(QUICKSTART), *overrides], cwd=REPO, env=dict(env, AFB_DRY_RUN="1"),
                          capture_output=True, text=True, timeout=120)


def torch_gpus(env: dict) -> int:
    """CUDA GPUs torch sees under `env` (asked in a child, as the script asks)."""
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count() "
                        "if torch.cuda.is_available() else 0)"], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1])


def test_quickstart_picks_the_device_from_the_gpus_torch_sees():
    env = quickstart_env()
    gpus = torch_gpus(env)
    r = quickstart_dry_run(env, "train.steps=5")
    assert r.returncode == 0, r.stdout + r.stderr
    # The command itself is the same everywhere: 2 processes, the quickstart config, the overrides.
    assert ("would run: torchrun --standalone --nproc_per_node 2 -m afb_scale.cli train "
            "--config configs/quickstart.yaml train.steps=5") in r.stdout, r.stdout
    cvd_before = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    if gpus == 0:
        assert f"DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES={cvd_before}\n" in r.stdout, r.stdout
        assert "running on CPU" not in r.stdout
    elif gpus == 1:
        assert "DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=\n" in r.stdout, r.stdout
        assert "1 CUDA GPU visible" in r.stdout and "running on CPU" in r.stdout, r.stdout
    else:
        assert f"DS_ACCELERATOR= CUDA_VISIBLE_DEVICES={cvd_before}\n" in r.stdout, r.stdout


def test_quickstart_runs_on_cpu_when_every_gpu_is_hidden():
    r = quickstart_dry_run(quickstart_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=\n" in r.stdout, r.stdout
    assert "running on CPU" not in r.stdout  # no GPU at all is the ordinary CPU path, no message


def test_quickstart_keeps_a_callers_accelerator():
    r = quickstart_dry_run(quickstart_env(DS_ACCELERATOR="cuda"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DS_ACCELERATOR=cuda " in r.stdout, r.stdout


GPUS_HERE = torch_gpus(dict(os.environ))


@pytest.mark.skipif(GPUS_HERE < 1, reason="needs a CUDA GPU")
def test_quickstart_falls_back_to_cpu_with_one_gpu():
    """TP = 2 as 2 NCCL ranks on one GPU cannot work: CPU, with the GPU hidden, and one line why."""
    r = quickstart_dry_run(quickstart_env(CUDA_VISIBLE_DEVICES="0"))
    assert r.returncode == 0, r.stdout + r.stderr
    notes = [line for line in r.stdout.splitlines() if "running on CPU" in line]
    assert len(notes) == 1 and "1 CUDA GPU visible" in notes[0], r.stdout
    assert "DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=\n" in r.stdout, r.stdout


@pytest.mark.skipif(GPUS_HERE > 0, reason="checks the CPU path of a CPU machine")
def test_quickstart_still_trains_on_cpu(tiny_training, tmp_path):
    """The real quickstart on this CPU machine, shortened by overrides (setup is already done)."""
    run_dir = tmp_path / "run"
    r = subprocess.run(["bash", str(QUICKSTART), *TINY_OVERRIDES, f"train.run_dir={run_dir}"],
                       cwd=REPO, env=quickstart_env(AFB_SKIP_SETUP="1"), capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "afb-scale rank 0/2" in out and "afb-scale rank 1/2" in out, out[-6000:]
    assert "training finished" in out, out[-6000:]
    assert (run_dir / "checkpoints" / "latest").is_file()


# ---- launch/srun_task.sh ----------------------------------------------------------------------

def test_srun_task_keeps_local_rank_the_slurm_local_id():
    """With GPU binding a task sees one GPU, yet LOCAL_RANK stays its index on the node (what
    torch.distributed expects); the trainer, not this script, maps it to a device."""
    env = dict(os.environ, SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_TASKS_PER_NODE="4(x2)",
               SLURM_NODEID="1", MASTER_ADDR="node1", MASTER_PORT="29500", CUDA_VISIBLE_DEVICES="1")
    r = subprocess.run(["bash", str(SRUN_TASK), "env"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert got["CUDA_VISIBLE_DEVICES"] == "1"


# ---- launch/slurm/train.sbatch: --cpus-per-task on the step, real Slurm ------------------------

class AffinityCluster(SlurmCluster):
    """The test cluster with CPU binding on (task/affinity, cores), as production clusters bind:
    a task's CPU mask then shows how many CPUs its step gave it."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.conf.read_text()
        assert "TaskPlugin=task/none\n" in text
        self.conf.write_text(text.replace("TaskPlugin=task/none\n", "TaskPlugin=task/affinity\nTaskPluginParam=Cores\n"))


CPU_PROBE = ("import os; print(f\"afb-cpus node={os.environ.get('SLURMD_NODENAME')} rank={os.environ.get('RANK')} "
             "cpus={len(os.sched_getaffinity(0))}\", flush=True)")


def slurm_version(env: dict) -> tuple[int, int]:
    out = subprocess.run(["srun", "--version"], env=env, capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def probe_cpus(cluster: SlurmCluster, *srun_args: str) -> list[int]:
    r = cluster.run(["srun", "--nodes=1", "--ntasks=1", *srun_args, sys.executable, "-c", CPU_PROBE],
                    timeout=120)
    return [int(c) for c in re.findall(r"cpus=(\d+)", r.stdout)]


@pytest.fixture(scope="module")
def affinity_cluster(tmp_path_factory):
    require_slurm()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell a 1-CPU step from a 2-CPU one")
    c = AffinityCluster(tmp_path_factory.mktemp("slurm-affinity"))
    with c:
        # The cluster must really bind, or the job test below would pass whatever srun was given.
        one, two = probe_cpus(c, "--cpus-per-task=1"), probe_cpus(c, "--cpus-per-task=2")
        if (one, two) != ([1], [2]):
            pytest.skip(f"task/affinity does not bind CPUs here (1 CPU -> {one}, 2 CPUs -> {two})")
        yield c


def test_the_cluster_reproduces_the_missing_cpus_per_task(affinity_cluster, tmp_path):
    """Without the fix's explicit --cpus-per-task, srun inside a -c 2 job gives its task one CPU on
    Slurm 22.05 to 23.02: the defect, reproduced (so the next test can tell fixed from not)."""
    if not (22, 5) <= slurm_version(affinity_cluster.env) <= (23, 2):
        pytest.skip("srun reads the job's cpus-per-task in this Slurm version")
    r = affinity_cluster.run(["salloc", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2",
                              "srun", "--ntasks=1", sys.executable, "-c", CPU_PROBE], timeout=120)
    assert re.findall(r"cpus=(\d+)", r.stdout) == ["1"], r.stdout + r.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_training_step_gets_the_jobs_cpus_per_task(affinity_cluster, tmp_path, launcher):
    logs = tmp_path / "logs"
    logs.mkdir()
    env = job_env(SLURM_CONF=affinity_cluster.env["SLURM_CONF"], AFB_LAUNCHER=launcher, AFB_APPEND_RUN_DIR="0",
                  AFB_REQUEUE="0", AFB_RUN_ROOT=str(tmp_path / "runs"), AFB_PYTHON=sys.executable)
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]
    name = f"afb-cpus-{launcher}"
    job_id = affinity_cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--job-name={name}",
                                      f"--chdir={REPO}", f"--output={logs}/%x-%j.out", str(TRAIN_SBATCH),
                                      sys.executable, "-c", CPU_PROBE], env=env)
    info = affinity_cluster.wait_job(job_id, timeout=300)
    log = logs / f"{name}-{job_id}.out"
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert f"launcher={launcher}" in text
    # One process per node (ranks 0 and 1 in either order under torchrun's c10d), each with 2 CPUs.
    found = re.findall(r"afb-cpus node=(\w+) rank=(\d) cpus=(\d+)", text)
    assert sorted((node, cpus) for node, _, cpus in found) == [("node1", "2"), ("node2", "2")], text[-4000:]
    assert sorted(rank for _, rank, _ in found) == ["0", "1"], text[-4000:]
