"""The submit helper: validation with one-line errors, quoting, and the scripts it renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from afb_scale.cluster import submit
from afb_scale.config import ConfigError
from afb_scale.cluster.launch_env import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "cluster" / "example.yaml"
LOCAL_CPU = REPO / "configs" / "cluster" / "local-cpu.yaml"


def render(overrides=(), config=EXAMPLE) -> str:
    return submit.render(submit.load_job(config, list(overrides)), REPO)


def bash_n(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("nodes=-1", "nodes=-1 must be >= 1"),
        ("nodes=0", "nodes=0 must be >= 1"),
        ("nodes=two", "nodes='two' must be an integer"),
        ("gpus_per_node=-8", "gpus_per_node=-8 must be >= 0"),
        ("cpus_per_task=0", "cpus_per_task=0 must be >= 1"),
        ("partition=gpu;rm -rf ~", "partition='gpu;rm -rf ~' is not allowed: must be a Slurm partition name"),
        ("partition=gpu partition", "partition='gpu partition' is not allowed"),
        ("partition=,gpu", "partition=',gpu' is not allowed"),
        ("job_name=x$(reboot)", "job_name='x$(reboot)' is not allowed"),
        ("account=`id`", "account='`id`' is not allowed"),
        ("qos=normal&&ls", "qos='normal&&ls' is not allowed"),
        ("mem=lots", "mem='lots' is not allowed"),
        ("time=1 hour", "time='1 hour' is not a Slurm time limit"),
        ("time=00:00:00", "time='00:00:00' must be longer than zero"),
        ("log_dir=logs dir", "log_dir='logs dir' is not allowed"),
        ("container.image=img;ls", "container.image='img;ls' is not allowed"),
        ("container.mounts=['/data:/data,/etc:/x']", "container.mounts[0]='/data:/data,/etc:/x' is not allowed"),
        ("container.mounts=[relative:/x]", "container.mounts[0]='relative:/x' is not allowed"),
        ("container.runtime=docker", "container.runtime='docker' is not allowed; choose one of none, pyxis, apptainer"),
        ("gpu.nccl_socket_ifname=eth0 $(x)", "gpu.nccl_socket_ifname='eth0 $(x)' is not allowed"),
        ("gpu.cuda_device_max_connections=0", "gpu.cuda_device_max_connections=0 must be >= 1"),
        ("signal_seconds=-5", "signal_seconds=-5 must be >= 0"),
        ("signal_seconds=70000", "signal_seconds=70000 must be at most 65535"),
        ("master_port=80", "master_port=80 must be between 1024 and 65535"),
        ("partitoin=gpu", "unknown config key 'partitoin'; allowed: account,"),
        ("container.imgae=x", "unknown config key 'container.imgae'"),
        ("env={MASTER_ADDR: node9}", "env.MASTER_ADDR is set by the launch scripts"),
        ("env={SLURM_JOB_ID: 1}", "env.SLURM_JOB_ID is set by the launch scripts"),
        ("env={'BAD KEY': 1}", "env key 'BAD KEY' is not a valid environment variable name"),
        ("env={NCCL_X: [1, 2]}", "env.NCCL_X=[1, 2] must be a string or a number"),
        ("command=[]", "command must name the program to run"),
        ("sweep=[[notanoverride]]", "sweep[0][0]='notanoverride' must look like section.key=value"),
        ("array_parallel=2", "array_parallel is set but sweep is empty"),
    ],
)
def test_bad_values_are_rejected_with_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        submit.load_job(EXAMPLE, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_container_settings_must_agree():
    with pytest.raises(ConfigError, match="container.runtime=pyxis needs container.image"):
        submit.load_job(EXAMPLE, ["container.image="])
    with pytest.raises(ConfigError, match="container.runtime is none"):
        submit.load_job(EXAMPLE, ["container.runtime=none"])


def test_newlines_are_rejected_everywhere_they_could_break_a_line():
    with pytest.raises(ConfigError, match="must not contain a newline"):
        submit.load_job(EXAMPLE, ["env={NCCL_X: \"a\\nb\"}"])
    with pytest.raises(ConfigError, match="must not contain a newline"):
        submit.load_job(EXAMPLE, ['command=[python, "-c", "1\\n2"]'])


def test_main_prints_a_clear_error_and_exits_2(capsys):
    assert submit.main([str(EXAMPLE), "nodes=-3", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: nodes=-3 must be >= 1"


def test_dry_run_prints_a_script_that_passes_bash_n(capsys):
    assert submit.main([str(EXAMPLE), "--dry-run", "--repo", str(REPO)]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/usr/bin/env bash\n")
    r = bash_n(script)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["launcher=srun", "gpu.gpu_bind=closest", "gpu.cpu_bind=cores"],
        ["container.runtime=apptainer", "container.image=/images/afb.sif"],
        ["container.runtime=none", "container.image=", "container.mounts=[]", "gpus_per_node=0"],
        ["sweep=[[train.lr=1e-3], [train.lr=3e-3, train.seed=7]]", "array_parallel=1"],
        ["rendezvous=static", "master_port=29400", "requeue=false", "signal_seconds=0"],
    ],
)
def test_rendered_variants_pass_bash_n_and_shellcheck(overrides):
    script = render(overrides)
    r = bash_n(script)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-"], input=script, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_torchrun_layout_one_task_per_node():
    script = render()
    opts = sbatch_lines(script)
    for want in ("--job-name=afb-125m", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                 "--cpus-per-task=64", "--time=04:00:00", "--partition=gpu", "--exclusive",
                 "--output=logs/%x-%j.out", "--open-mode=append", "--signal=B:USR1@300", "--requeue",
                 f"--chdir={REPO}"):
        assert want in opts, (want, opts)
    assert "AFB_LAUNCHER=torchrun" in script
    assert "AFB_NPROC_PER_NODE=8" in script
    assert "AFB_TRAIN_CMD=(afb-scale train --config configs/experiments/125m-afb-gelu.yaml)" in script
    # The body that runs: one srun task per node starting torchrun.sh, master from the allocation.
    assert 'STEP=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1' in script
    assert 'bash "$AFB_REPO/launch/torchrun.sh" "${CMD[@]}"' in script
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # Pyxis options go on the srun step, with the repository mounted at its own path.
    assert "--container-image=registry.example.org#afb-scale/afb-scale:gpu" in script
    assert f"--container-mounts=/scratch:/scratch,{REPO}:{REPO}" in script
    # GPU settings come from the config.
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
    assert "export NCCL_DEBUG=WARN" in script
    assert "export NCCL_IB_TIMEOUT=22" in script
    # #SBATCH lines must all come before the first command, or sbatch ignores them.
    first_command = next(i for i, line in enumerate(script.splitlines())
                         if line.strip() and not line.startswith("#"))
    last_sbatch = max(i for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))
    assert last_sbatch < first_command


def test_srun_layout_one_task_per_gpu():
    script = render(["launcher=srun", "gpu.gpu_bind=closest"])
    assert "--ntasks-per-node=8" in sbatch_lines(script)
    assert "AFB_LAUNCHER=srun" in script
    assert "AFB_SRUN_ARGS=(--gpu-bind=closest" in script
    assert 'bash "$AFB_REPO/launch/srun_task.sh" "${CMD[@]}"' in script


def test_apptainer_wraps_each_task():
    script = render(["container.runtime=apptainer", "container.image=/images/afb.sif"])
    assert (f"AFB_CONTAINER_WRAP=(apptainer exec --nv '--bind=/scratch:/scratch,{REPO}:{REPO}' "
            f"--pwd={REPO} /images/afb.sif)") in script
    assert "--container-image" not in script


def test_sweep_becomes_an_array_job():
    script = render(["sweep=[[train.lr=1e-3], [train.lr=3e-3, train.seed=7]]", "array_parallel=1"])
    opts = sbatch_lines(script)
    assert "--array=0-1%1" in opts
    assert "--output=logs/%x-%A_%a.out" in opts
    assert "0) AFB_SWEEP_ARGS=(train.lr=1e-3) ;;" in script
    assert "1) AFB_SWEEP_ARGS=(train.lr=3e-3 train.seed=7) ;;" in script


def test_free_form_values_are_quoted_not_pasted(tmp_path):
    """Values the shell sees (command, env) may hold anything printable: they stay literal."""
    nasty = "$(touch " + str(tmp_path / "pwned") + ")'\"; echo hi"
    # JSON is YAML: the overrides carry the exact strings.
    script = render([f"env={{NCCL_ALGO: {json.dumps(nasty)}}}",
                     "command=[python, -c, " + json.dumps("print('$HOME')") + "]"])
    assert bash_n(script).returncode == 0
    # Execute just the settings block and read the values back.
    settings = script[script.index("# ---- settings"):script.index("# ---- end of settings")]
    probe = settings + '\nprintf "%s\\n" "$NCCL_ALGO" "${AFB_TRAIN_CMD[@]}"\n'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [nasty, "python", "-c", "print('$HOME')"]
    assert not (tmp_path / "pwned").exists()


def test_local_cpu_config_renders():
    script = render(config=LOCAL_CPU)
    assert "--gpus-per-node" not in script
    assert "CUDA_DEVICE_MAX_CONNECTIONS=" not in script.split("# ---- end of settings")[0]
    assert bash_n(script).returncode == 0


def test_submit_writes_the_script_and_calls_sbatch(tmp_path, monkeypatch, capsys):
    """Without --dry-run: the script lands under log_dir and sbatch gets it (a fake sbatch here)."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    rc = submit.main([str(LOCAL_CPU), f"log_dir={tmp_path}/logs", "--repo", str(REPO)])
    assert rc == 0
    assert "submitted job 4242" in capsys.readouterr().out
    scripts = list((tmp_path / "logs").glob("afb-tiny-cpu-*.sbatch"))
    assert len(scripts) == 1
    assert (fake.parent / "args").read_text().split() == ["--parsable", str(scripts[0])]


def test_scripts_agree_with_launch_env():
    """The shell scripts carry the requeue status as a literal; it must be launch_env's."""
    for rel in ("launch/slurm/train.sbatch", "launch/torchrun.sh"):
        text = (REPO / rel).read_text()
        codes = set(re.findall(r"AFB_REQUEUE_EXIT_CODE(?:=|:-)(\d+)", text))
        assert codes == {str(REQUEUE_EXIT_CODE)}, (rel, codes)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_launch_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in (REPO / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 4
    r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
