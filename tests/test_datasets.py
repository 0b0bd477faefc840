"""afb_scale.data.datasets: megatron-core GPT datasets over prepared corpora, blends, and bad data."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import torch.distributed as dist

from afb_scale.config import Config, ConfigError, DatasetEntry
from afb_scale.data.datasets import (
    SentencePieceGPTTokenizer,
    build_datasets,
    check_tokenizer_vocab,
    single_process_group,
    validate_prepared_dataset,
)
from data_prep.default_corpus import stdlib_sources
from data_prep.tokenize import tokenize_to_indexed_dataset
from data_prep.tokenizer import train_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """Two corpora of standard-library sources, one tokenizer, two indexed datasets."""
    root = tmp_path_factory.mktemp("prepared")
    small = [f for f in stdlib_sources() if 2_000 < f.stat().st_size < 15_000]
    corpus_a, corpus_b = small[0:240:8], small[4:244:8]
    train_tokenizer(corpus_a + corpus_b, root / "tok", vocab_size=512)
    for name, files in (("a", corpus_a), ("b", corpus_b)):
        tokenize_to_indexed_dataset(files, root / "tok.model", root / name, progress=False)
    return {"root": root, "tokenizer": root / "tok.model", "a": root / "a", "b": root / "b", "corpus_a": corpus_a}


def make_config(prepared: dict, cache: Path, blend: list[tuple[Path, float]], split: str = "949,50,1",
                seed: int = 1234) -> Config:
    cfg = Config()
    cfg.model.vocab_size = 512
    cfg.model.seq_length = SEQ
    cfg.train.seed = seed
    cfg.data.tokenizer = str(prepared["tokenizer"])
    cfg.data.datasets = [DatasetEntry(str(prefix), weight) for prefix, weight in blend]
    cfg.data.split = split
    cfg.data.cache_dir = str(cache)
    return cfg


def copy_dataset(prefix: Path, to: Path) -> Path:
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{prefix}{suffix}", f"{to}{suffix}")
    return to


def test_tokenizer_wrapper(prepared):
    tok = SentencePieceGPTTokenizer(prepared["tokenizer"])
    assert (tok.vocab_size, tok.eod, tok.pad) == (512, 2, 0)
    assert tok.vocab["<|endoftext|>"] == 2 and len(tok.vocab) == 512
    text = "def f(x):\n    return x  # ünï 🙂\n"
    assert tok.detokenize(np.array(tok.tokenize(text))) == text
    assert tok.unique_identifiers["sha256"] == tok.sha256 and len(tok.sha256) == 64


def test_round_trip_through_the_training_dataset(prepared, tmp_path):
    cfg = make_config(prepared, tmp_path / "cache", [(prepared["a"], 1.0)], split="1,0,0")
    train, valid, test = build_datasets(cfg, (300, 0, 0))
    assert valid is None and test is None and len(train) >= 300

    # The documents, in input order, decode to the source files; each ends with one eod.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(prepared["tokenizer"]))
    docs = [np.asarray(train.dataset[i]) for i in range(len(train.dataset))]
    assert len(docs) == len(prepared["corpus_a"])
    for doc, path in zip(docs, prepared["corpus_a"]):
        assert doc[-1] == sp.eos_id() and (doc[:-1] != sp.eos_id()).all()
        assert sp.decode(doc[:-1].tolist()) == path.read_text()

    # Every training sample is a window of the documents packed in megatron-core's order.
    order = train.document_index
    stream = np.concatenate([docs[d] for d in order])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in order])])
    assert (stream[starts[1:] - 1] == sp.eos_id()).all() and (stream == sp.eos_id()).sum() == len(order)
    for k in range(len(train)):
        position, offset = train.sample_index[train.shuffle_index[k]]
        begin = starts[position] + offset
        sample = train[k]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert torch.equal(sample["tokens"], torch.from_numpy(stream[begin : begin + SEQ]).long())
        assert torch.equal(sample["labels"], torch.from_numpy(stream[begin + 1 : begin + SEQ + 1]).long())
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert bool((sample["loss_mask"] == 1).all())


def _tokens(dataset, count: int) -> list[list[int]]:
    return [dataset[k]["tokens"].tolist() for k in range(count)]


def test_blend_follows_the_weights_and_is_reproducible(prepared, tmp_path):
    blend = [(prepared["a"], 1.0), (prepared["b"], 3.0)]
    with single_process_group():
        assert dist.is_initialized() and dist.get_world_size() == 1
        train, valid, test = build_datasets(make_config(prepared, tmp_path / "c1", blend, "90,10,0"), (4000, 400, 0))
    assert not dist.is_initialized()
    assert test is None and len(train) == 4000 and len(valid) == 400
    for dataset in (train, valid):
        share_b = float(np.mean(np.asarray(dataset.dataset_index) == 1))
        assert share_b == pytest.approx(0.75, abs=0.01)
    ids = [train[k]["dataset_id"] for k in range(200)]
    assert 0.6 < np.mean(ids) < 0.9

    # Same seed, fresh cache (indices rebuilt, not loaded): the same samples in the same order.
    # build_datasets makes its own one-process group when none exists.
    again, _, _ = build_datasets(make_config(prepared, tmp_path / "c2", blend, "90,10,0"), (4000, 400, 0))
    assert not dist.is_initialized()
    assert np.array_equal(train.dataset_index, again.dataset_index)
    assert _tokens(train, 50) == _tokens(again, 50)
    other, _, _ = build_datasets(make_config(prepared, tmp_path / "c3", blend, "90,10,0", seed=7), (4000, 400, 0))
    assert _tokens(other, 50) != _tokens(train, 50)


def _build_on_rank(rank: int, store: str, cfg: Config, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        train, _, _ = build_datasets(cfg, (500, 50, 0))
        results.put((rank, len(train), _tokens(train, 20)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_the_same_blend_through_the_shared_cache(prepared, tmp_path):
    """megatron-core builds on rank 0, caches, and rank 1 loads after a barrier."""
    cfg = make_config(prepared, tmp_path / "cache", [(prepared["a"], 1.0), (prepared["b"], 1.0)], "90,10,0")
    context = multiprocessing.get_context("fork")  # inherits the imports: ~1 s instead of ~10
    results = context.Queue()
    ranks = [context.Process(target=_build_on_rank, args=(r, str(tmp_path / "store"), cfg, results)) for r in (0, 1)]
    for process in ranks:
        process.start()
    by_rank = dict((rank, rest) for rank, *rest in (results.get(timeout=120) for _ in ranks))
    for process in ranks:
        process.join(timeout=30)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert by_rank[0] == by_rank[1] and by_rank[0][0] == 500
    assert len(list((tmp_path / "cache").glob("*BlendedDataset-train-dataset_index.npy"))) == 1


def test_single_process_group_leaves_an_existing_group_alone(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        with single_process_group():
            assert dist.group.WORLD is group
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_tokenizer_vocabulary_must_match_the_model(prepared):
    assert check_tokenizer_vocab(prepared["tokenizer"], 512) == 512
    with pytest.raises(ConfigError, match=r"has 512 pieces but model.vocab_size=8192; set model.vocab_size=512"):
        check_tokenizer_vocab(prepared["tokenizer"], 8192)
    with pytest.raises(ConfigError, match="does not exist"):
        check_tokenizer_vocab(prepared["root"] / "missing.model", 512)
    cfg = make_config(prepared, prepared["root"] / "cache", [(prepared["a"], 1.0)])
    cfg.model.vocab_size = 1024
    with pytest.raises(ConfigError, match="model.vocab_size=1024"):
        build_datasets(cfg, (10, 1, 1))


def _truncate(path: Path, nbytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p, b: _truncate(Path(f"{p}.bin"), 2), r"x\.bin' has \d+ bytes but x\.idx indexes \d+"),
        (lambda p, b: _truncate(Path(f"{p}.idx"), 8), r"x\.idx' is truncated or corrupt"),
        (lambda p, b: shutil.copy(f"{b}.idx", f"{p}.idx"), r"x\.bin' has \d+ bytes but x\.idx indexes"),
        (lambda p, b: Path(f"{p}.idx").unlink(), r"x\.idx' does not exist"),
        (lambda p, b: Path(f"{p}.bin").unlink(), r"x\.bin' does not exist"),
        (lambda p, b: Path(f"{p}.idx").write_bytes(b"garbage"), r"x\.idx' is not a megatron-core index"),
    ],
    ids=["truncated bin", "truncated idx", "mismatched pair", "missing idx", "missing bin", "not an index"],
)
def test_damaged_datasets_are_refused_at_training_time(damage, message, prepared, tmp_path):
    prefix = copy_dataset(prepared["a"], tmp_path / "x")
    assert validate_prepared_dataset(prefix) == len(prepared["corpus_a"])
    damage(prefix, prepared["b"])
    with pytest.raises(ConfigError, match=message) as error:
        build_datasets(make_config(prepared, tmp_path / "cache", [(prefix, 1.0)]), (10, 1, 1))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_dataset_made_with_another_tokenizer_is_refused(prepared, tmp_path):
    other = tmp_path / "other"
    train_tokenizer(prepared["corpus_a"], other, vocab_size=512, model_type="unigram")
    tokenize_to_indexed_dataset(prepared["corpus_a"], f"{other}.model", tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match=r"x\.bin' was tokenized with a different tokenizer than data.tokenizer"):
        build_datasets(make_config(prepared, tmp_path / "cache", [(tmp_path / "x", 1.0)]), (10, 1, 1))


def test_split_without_documents_for_a_needed_split_is_refused(prepared, tmp_path):
    cfg = make_config(prepared, tmp_path / "cache", [(prepared["a"], 1.0)], split="99,1,0")
    with pytest.raises(ConfigError, match=r"gives the valid split 0 of the 30 documents"):
        build_datasets(cfg, (10, 10, 0))
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,1"):
        cfg.data.split = bad
        with pytest.raises(ConfigError, match=r"data\.split="):
            build_datasets(cfg, (10, 10, 0))


def test_no_datasets_configured(prepared):
    cfg = make_config(prepared, prepared["root"] / "cache", [])
    with pytest.raises(ConfigError, match="data.datasets is empty"):
        build_datasets(cfg, (10, 1, 1))
