import os
import sys

# Tests import their helpers (multiproc.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# torch.compile costs 10-40 s per process on a 2-core machine, and every rank of every training
# test would pay it: the suite runs the fused AFB op (model.afb_fused=auto) with its eager bodies,
# and tests/test_afb_fused.py compiles the bodies once and holds them to the reference.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory) -> Path:
    """The built-in corpus (stdlib sources), prepared once per test session by the real command."""
    out = tmp_path_factory.mktemp("corpus") / "default"
    subprocess.run([sys.executable, "-m", "data_prep.default_corpus", "--out", str(out), "--no-progress"],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def corpus_overrides(corpus: Path) -> list[str]:
    return [f"data.tokenizer={corpus / 'tokenizer.model'}",
            f"data.datasets=[{{prefix: {corpus / 'stdlib_text_document'}, weight: 1.0}}]",
            f"data.cache_dir={corpus.parent / 'cache'}"]
