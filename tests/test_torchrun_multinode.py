"""launch/torchrun.sh: two torchrun agents as two "nodes" on this machine (gloo).

One test trains the tiny model across the two agents; the others check the wrapper itself with a few lines of torch.distributed in `python -c`: rendezvous, rank layout,
and that a preemption signal becomes the requeue status 75.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afb_scale.cluster.launch_env import REQUEUE_EXIT_CODE
from launch_support import REPO, assert_run_dir_complete, free_port, job_env, tiny_training, wait_for_text  # noqa: F401

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"

# Prints its rank; with "wait", installs a SIGUSR1 handler (as the trainer does), says "ready" and
# waits for it, then exits 75 like a trainer that checkpointed.
PROBE = r"""
import os, signal, socket, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
print(f"probe rank {r}/{w} local_rank={os.environ['LOCAL_RANK']} host={socket.gethostname()}", flush=True)
if sys.argv[1:] == ["wait"]:
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    print(f"probe ready {r}", flush=True)
    deadline = time.time() + 60
    while not stop and time.time() < deadline:
        time.sleep(0.1)
    print(f"probe rank {r} stopping after signal={bool(stop)}", flush=True)
    sys.exit(75 if stop else 1)
dist.barrier()
dist.destroy_process_group()
"""


def start_agents(tmp_path: Path, command: list[str], rdzv: str, nproc: int = 1, nnodes: int = 2):
    port = free_port()
    procs, logs = [], []
    for node in range(nnodes):
        env = job_env(NNODES=str(nnodes), NPROC_PER_NODE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
        if rdzv == "static":
            env["NODE_RANK"] = str(node)
        else:
            env["RDZV_ID"] = f"test-{port}"
        for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NODEID"):
            env.pop(k, None)
        log = tmp_path / f"node{node}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen(["bash", str(TORCHRUN_SH), *command], cwd=REPO, env=env,
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    return procs, logs


def finish(procs, timeout: float) -> list[int]:
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return codes


def read(logs) -> str:
    return "\n".join(log.read_text(errors="replace") for log in logs)


def test_two_agents_rendezvous_and_train_together(tmp_path, tiny_training, rdzv="c10d"):
    # c10d, the multi-node default; static rendezvous is covered by the probe test below.
    run_dir = tmp_path / "run"
    procs, logs = start_agents(tmp_path, [*tiny_training, f"train.run_dir={run_dir}"], rdzv)
    codes = finish(procs, timeout=600)
    text = read(logs)
    assert codes == [0, 0], text[-6000:]
    assert f"rdzv={rdzv}" in text
    assert "afb-scale rank 0/2" in text and "afb-scale rank 1/2" in text, text[-6000:]
    assert "training finished" in text
    assert_run_dir_complete(run_dir)


@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_two_agents_give_one_world(tmp_path, rdzv):
    procs, logs = start_agents(tmp_path, [sys.executable, "-c", PROBE], rdzv, nproc=2)
    codes = finish(procs, timeout=180)
    text = read(logs)
    assert codes == [0, 0], text[-4000:]
    # Two workers of a node write to one log: lines may interleave, so match, don't split lines.
    ranks = sorted(re.findall(r"probe rank (\d+/\d+) local_rank", text))
    assert ranks == ["0/4", "1/4", "2/4", "3/4"], text[-4000:]
    assert text.count("afb-launch node=") == 2 and f"nnodes=2 nproc_per_node=2 rdzv={rdzv}" in text


def test_single_node_standalone(tmp_path):
    env = job_env(NPROC_PER_NODE="2")
    for k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RDZV_ID", "SLURM_JOB_ID"):
        env.pop(k, None)
    r = subprocess.run(["bash", str(TORCHRUN_SH), sys.executable, "-c", PROBE], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rdzv=standalone" in r.stdout
    assert "probe rank 0/2" in r.stdout and "probe rank 1/2" in r.stdout


def test_preemption_signal_reaches_workers_and_becomes_requeue_status(tmp_path):
    """SIGUSR1 to each wrapper (as outside Slurm): workers checkpoint-and-exit, wrappers exit 75."""
    procs, logs = start_agents(tmp_path, [sys.executable, "-c", PROBE, "wait"], "static")
    try:
        for i, log in enumerate(logs):
            wait_for_text(log, ["probe ready"], timeout=120, proc_alive=lambda p=procs[i]: p.poll() is None)
        time.sleep(0.5)
        for p in procs:
            os.kill(p.pid, signal.SIGUSR1)  # the wrapper only: it forwards to the workers
    finally:
        codes = finish(procs, timeout=120)
    text = read(logs)
    assert codes == [REQUEUE_EXIT_CODE] * 2, text[-4000:]
    assert text.count("got SIGUSR1 (preemption)") == 2
    assert text.count("stopping after signal=True") == 2
    # The torchrun agents ignored the signal (they did not die of it): they reported the workers.
    assert "exitcode: 75" in text or "exitcode  : 75" in text
