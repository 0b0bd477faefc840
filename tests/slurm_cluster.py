"""A real two-node Slurm cluster on this machine, for tests.

One slurmctld and two slurmd daemons (`slurmd -N node1`, `slurmd -N node2`) on 127.0.0.1 with
distinct ports, plus a private munged, all started from a temporary directory that holds their
configuration, state, spool, sockets and logs. `sbatch -N 2` then gives a job two "nodes" whose
tasks see SLURMD_NODENAME=node1 / node2, which is enough to exercise the project's batch scripts,
srun steps, signals and requeue end to end.

Nothing is installed here: `launch/ci/install_slurm.sh` installs slurm-wlm and munge. The daemons
run in the foreground as our own child processes, so stopping them is exact (by pid) and happens
in `stop()` / the context manager's exit even when a test fails.

Usage:
    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["-N", "2", "script.sbatch"])
        info = cluster.wait_job(job, timeout=120)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "munged")
HOSTS_MARKER = "# afb_scale test cluster"


def require_slurm() -> None:
    """In a test: skip when a real Slurm cannot be started here, or fail where it must be
    (AFB_REQUIRE_SLURM=1, set by .ci/run)."""
    import pytest

    reason = missing_prerequisites()
    if reason:
        if os.environ.get("AFB_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (AFB_REQUIRE_SLURM=1)")
        pytest.skip(reason)


def missing_prerequisites() -> str | None:
    """Why a real Slurm cannot be started here, or None when it can."""
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}); run launch/ci/install_slurm.sh"
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root (slurmd starts job steps as the submitting user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_hosts(nodes=NODES) -> None:
    """Make the node names resolve to 127.0.0.1 (appends one line to /etc/hosts if needed)."""
    unresolved = []
    for n in nodes:
        try:
            socket.gethostbyname(n)
        except OSError:
            unresolved.append(n)
    if unresolved:
        # Append in place: /etc/hosts is often a bind mount in containers and cannot be replaced.
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(unresolved)} {HOSTS_MARKER}\n")


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, workdir: str | os.PathLike, nodes=NODES, cpus_per_node: int = 2):
        self.dir = Path(workdir).resolve()
        self.nodes = tuple(nodes)
        self.cpus = cpus_per_node
        self.conf = self.dir / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Keep a user's own Slurm settings out of the test cluster.
        for k in list(self.env):
            if k.startswith(("SBATCH_", "SLURM_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF":
                del self.env[k]
        self.env["SLURM_CONF"] = str(self.conf)

    # ------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        d = self.dir
        for sub in ("etc", "state", "log", "run", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (d / "spool" / n).mkdir(parents=True, exist_ok=True)
        # munged insists on private directories.
        for sub in ("munge", "run"):
            os.chmod(d / sub, 0o700)
        key = d / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self.munge_socket = d / "run" / "munge.socket"
        self.ctld_port = _free_port()
        host = socket.gethostname().split(".")[0]
        node_lines = []
        for n in self.nodes:
            node_lines.append(
                f"NodeName={n} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} "
                f"RealMemory=1000 State=UNKNOWN"
            )
        self.conf.write_text(
            "\n".join(
                [
                    "# Written by tests/slurm_cluster.py: a throwaway two-node cluster on 127.0.0.1.",
                    "ClusterName=afbtest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={self.ctld_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire also sets how long a requeued job waits before it may start
                    # again (120 s by default); a short wait keeps the requeue test fast.
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool' / '%n'}",
                    f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'run' / 'slurmd-%n.pid'}",
                    f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    # No cgroups: they are not available (or not ours) in CI containers.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    # Trust the CPU counts below, whatever this machine has.
                    "SlurmdParameters=config_overrides",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    # Keep finished jobs visible to `scontrol show job` (there is no accounting db).
                    "MinJobAge=3600",
                    "KillWait=10",
                    "InactiveLimit=0",
                    "SchedulerType=sched/backfill",
                    # Look at the queue every few seconds (defaults: 60 s / 30 s), e.g. for requeues.
                    "SchedulerParameters=sched_interval=2,bf_interval=2",
                    *node_lines,
                    f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
                    "State=UP OverSubscribe=YES",
                    "",
                ]
            )
        )
        (d / "etc" / "cgroup.conf").write_text("# cgroups are not used by the test cluster\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        reason = missing_prerequisites()
        if reason:
            raise SlurmError(reason)
        ensure_hosts(self.nodes)
        self._write_config()
        d = self.dir
        try:
            self._spawn("munged", [
                "munged", "--foreground", "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={d / 'munge' / 'munge.key'}",
                f"--pid-file={d / 'run' / 'munged.pid'}",
                f"--log-file={d / 'log' / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ])
            self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket")
            # -i: ignore any saved state; -c: clear jobs from a previous run of this directory.
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld")
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
            self._wait_for(self._all_idle, timeout, "nodes idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _ok(self, argv, needle: str) -> bool:
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        return r.returncode == 0 and needle in r.stdout

    def _all_idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if pred():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started (by pid), newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
            # Give slurmd the chance to end the jobs' step daemons (they are not our children).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-t", "R,CG,PD,CF,S"], env=self.env, capture_output=True,
                                   text=True, timeout=30)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------
    def run(self, argv, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, args, cwd=None, env=None) -> str:
        r = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or self.env)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict:
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if r.returncode != 0:
            return {}
        info = {}
        for m in re.finditer(r"(\w+)=(\S*)", r.stdout.splitlines()[0]):
            info.setdefault(m.group(1), m.group(2))
        return info

    def wait_job(self, job_id: str, timeout: float = 120, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                     "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                                                     "BOOT_FAIL", "DEADLINE")) -> dict:
        """Wait until the job reaches one of `states`; returns its `scontrol show job` fields."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} not done after {timeout:.0f}s: {info}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for p in sorted((self.dir / "log").glob("*")):
            lines = p.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)
