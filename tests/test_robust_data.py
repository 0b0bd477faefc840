"""A small real corpus and the default split: a run on it works or ends in one line, never hangs.

The corpora are made as README.md says, by the real commands (`python -m data_prep.tokenizer`,
`python -m data_prep.tokenize`), from a few dozen long standard-library sources. With the default
`data.split: "949,50,1"` such a corpus gives the test split 0 documents; megatron-core used to
build that split anyway (asked for 0 samples) and loop forever in GPTDataset._get_num_epochs.
Builds that could hang run in a subprocess under a timeout, so a hang fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afb_scale.config import Config, ConfigError, DatasetEntry
from afb_scale.data.datasets import build_datasets, check_prepared_data, samples_needed
from data_prep.default_corpus import stdlib_sources

REPO = Path(__file__).resolve().parents[1]
SEQ = 64


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1"}


def _command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """Two directories of long documents (24 and 20 files of 8-30 kB), one tokenizer, two datasets."""
    root = tmp_path_factory.mktemp("small")
    long_files = [f for f in stdlib_sources() if 8_000 < f.stat().st_size < 30_000][:44]
    for name, files in (("a", long_files[:24]), ("b", long_files[24:])):
        (root / name).mkdir()
        for i, f in enumerate(files):
            shutil.copy(f, root / name / f"doc{i:03d}.txt")
    _command("data_prep.tokenizer", "-i", str(root / "a"), str(root / "b"), "--out", str(root / "tok" / "tokenizer"),
             "--vocab-size", "512")
    for name in ("a", "b"):
        _command("data_prep.tokenize", "-i", str(root / name), "--tokenizer", str(root / "tok" / "tokenizer.model"),
                 "--out", str(root / f"{name}_text_document"), "--no-progress")
    return {"root": root, "tokenizer": root / "tok" / "tokenizer.model",
            "a": root / "a_text_document", "b": root / "b_text_document"}


def make_config(small: dict, cache: Path, blend: list[tuple[str, float]], split: str = "949,50,1") -> Config:
    cfg = Config()  # the default data.split, 949,50,1
    cfg.model.vocab_size = 512
    cfg.model.seq_length = SEQ
    cfg.train.steps, cfg.train.global_batch_size, cfg.train.eval_iters = 4, 8, 4
    cfg.data.tokenizer = str(small["tokenizer"])
    cfg.data.datasets = [DatasetEntry(str(small[name]), weight) for name, weight in blend]
    cfg.data.split = split
    cfg.data.cache_dir = str(cache)
    return cfg


_BUILD = """
import sys
from afb_scale.config import Config, DatasetEntry
from afb_scale.data.datasets import build_datasets, samples_needed
tokenizer, cache, *blend = sys.argv[1:]
cfg = Config()
cfg.model.vocab_size, cfg.model.seq_length = 512, 64
cfg.train.steps, cfg.train.global_batch_size, cfg.train.eval_iters = 4, 8, 4
cfg.data.tokenizer, cfg.data.cache_dir = tokenizer, cache
cfg.data.datasets = [DatasetEntry(p, float(w)) for p, w in (b.split("=") for b in blend)]
train, valid, test = build_datasets(cfg, samples_needed(cfg))
print("built", cfg.data.split, len(train), len(valid), test)
"""


@pytest.mark.parametrize("blend", [["a"], ["a", "b"]], ids=["one dataset", "weighted blend"])
def test_default_split_on_a_few_dozen_documents_builds_without_hanging(blend, small, tmp_path):
    # 24 (and 20) documents: the test split's 0.1% rounds to 0 documents; training asks it for 0 samples.
    args = [f"{small[name]}={i + 1}" for i, name in enumerate(blend)]
    try:
        proc = subprocess.run([sys.executable, "-c", _BUILD, str(small["tokenizer"]), str(tmp_path / "cache"), *args],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("building the datasets hung (megatron-core building a split of 0 documents)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("built 949,50,1 ") and line.endswith(" None"), line
    n_train, n_valid = map(int, line.split()[2:4])
    assert n_train >= 32 and n_valid >= 32
    assert not list((tmp_path / "cache").glob("*-test-*"))  # the unused split is not built at all


def test_training_on_it_with_the_default_split_finishes(small, tmp_path):
    """The issue's run: the real CLI, one process, the default split, a small corpus."""
    run_dir = tmp_path / "run"
    overrides = [
        "parallel.tensor=1", "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.feedback_rank=8", "model.vocab_size=512", f"model.seq_length={SEQ}",
        "train.steps=2", "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=2", "train.eval_iters=1", "train.save_interval=2", "train.startup_timeout_s=150",
        "metrics.layer_metrics_interval=0", "metrics.tensorboard=false", f"train.run_dir={run_dir}",
        f"data.tokenizer={small['tokenizer']}", f"data.datasets=[{{prefix: {small['a']}, weight: 1.0}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    try:
        proc = subprocess.run([sys.executable, "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml",
                               *overrides], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("training on a small corpus with the default split hung at start-up")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training finished: 2 steps" in proc.stdout


def test_valid_split_without_documents_ends_in_one_line(small, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml", "parallel.tensor=1",
         "model.vocab_size=512", "data.split=99,1,0", f"train.run_dir={run_dir}", f"data.tokenizer={small['tokenizer']}",
         f"data.datasets=[{{prefix: {small['a']}, weight: 1.0}}]", f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.split='99,1,0' gives the valid split 0 of the 24 documents in '{small['a']}'; "
        "use a corpus with more documents or a larger valid share")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_split_whose_documents_hold_less_than_one_sample_is_refused(small, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # 96,4,0 of 24 documents: the valid split is the last document alone.
    index = IndexedDataset(str(small["a"]))  # (held: its arrays are views of its memory map)
    tokens = int(index.sequence_lengths[-1])
    del index
    cfg = make_config(small, tmp_path / "cache", [("a", 1.0)], split="96,4,0")
    cfg.model.seq_length = tokens  # a sample needs seq_length + 1 tokens
    with pytest.raises(ConfigError) as error:
        check_prepared_data(cfg)
    assert str(error.value) == (
        f"data.split='96,4,0' gives the valid split 1 of the 24 documents in '{small['a']}', holding {tokens} tokens, "
        f"fewer than the {tokens + 1} one sample needs (model.seq_length={tokens} + 1); use a larger valid share, "
        "more data or a smaller model.seq_length")
    cfg.model.seq_length = tokens - 1
    check_prepared_data(cfg)


def test_split_with_no_share_for_needed_samples_is_refused(small, tmp_path):
    cfg = make_config(small, tmp_path / "cache", [("a", 1.0)], split="1,0,0")
    with pytest.raises(ConfigError, match=r"^data\.split='1,0,0' gives the valid split no share but 32 valid samples "
                                          r"are needed; give the valid split a share, e\.g\. data\.split='949,50,1'$"):
        check_prepared_data(cfg)
    assert check_prepared_data(cfg, (32, 0, 0)) is not None


def test_skipping_an_unused_split_leaves_the_other_splits_samples_alone(small, tmp_path):
    # 80,10,10: every split has documents; asking the test split for 0 samples or for some must
    # not move a train or valid document or sample (bounds come from the whole split string).
    cfg = make_config(small, tmp_path / "c1", [("a", 1.0)], split="80,10,10")
    train, valid, test = build_datasets(cfg, (64, 16, 0))
    assert test is None
    cfg.data.cache_dir = str(tmp_path / "c2")
    train2, valid2, test2 = build_datasets(cfg, (64, 16, 8))
    assert test2 is not None and len(test2) >= 8
    for a, b in ((train, train2), (valid, valid2)):
        assert np.array_equal(a.indices, b.indices) and len(a) == len(b)
        assert all(np.array_equal(a[k]["tokens"], b[k]["tokens"]) for k in range(len(a)))
