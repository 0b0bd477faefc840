import os
import sys

# Tests import their helpers (multiproc.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
