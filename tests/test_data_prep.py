"""data_prep: tokenizer training, tokenisation into indexed datasets, and bad input.

Inputs are real text: small files of the Python standard library (the default corpus), plus
JSONL/gzip/paragraph files made from them. Tokenizers are tiny (512 pieces) to stay fast.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

import data_prep.tokenize as tokenize_module
from data_prep import default_corpus, tokenize, tokenizer
from data_prep.default_corpus import stdlib_sources
from data_prep.encode import encode_in_worker
from data_prep.errors import DataError, run_command
from data_prep.inputs import find_input_files, read_documents
from data_prep.outputs import file_sha256
from data_prep.tokenize import tokenize_to_indexed_dataset
from data_prep.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def small_stdlib_files(count: int, stride: int = 8) -> list[Path]:
    """A deterministic handful of 2-15 kB standard-library sources."""
    small = [f for f in stdlib_sources() if 2_000 < f.stat().st_size < 15_000]
    return small[::stride][:count]


@pytest.fixture(scope="module")
def corpus() -> list[Path]:
    return small_stdlib_files(45)


@pytest.fixture(scope="module")
def tokenizer_model(corpus, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(corpus, prefix, vocab_size=512)
    return Path(f"{prefix}.model")


def read_indexed(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_has_the_special_pieces_and_round_trips_text(tokenizer_model, corpus):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert sp.get_piece_size() == 512
    assert (sp.pad_id(), sp.unk_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(2) == "<|endoftext|>"
    # identity normalisation + byte fallback: code, indentation and any character survive.
    text = corpus[0].read_text() + "\n\tünïcödé → 漢字 🙂  two  spaces\n"
    assert sp.decode(sp.encode(text)) == text
    assert sp.unk_id() not in sp.encode(text)


def test_tokenizer_metadata_records_model_hash_and_inputs(tokenizer_model, corpus):
    meta = json.loads(Path(str(tokenizer_model).removesuffix(".model") + ".meta.json").read_text())
    assert meta["sha256"] == file_sha256(tokenizer_model)
    assert meta["vocab_size"] == 512 and meta["model_type"] == "bpe" and meta["byte_fallback"]
    assert [i["path"] for i in meta["inputs"]] == [str(p) for p in corpus]
    assert meta["training_sentences"] > 1000


def test_tokenizer_max_train_bytes_stops_early(corpus, tmp_path):
    meta = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400, max_train_bytes=50_000)
    assert 50_000 <= meta["training_bytes"] < 52_000


def test_unigram_without_byte_fallback_trains(corpus, tmp_path):
    meta = train_tokenizer(corpus[:20], tmp_path / "uni", vocab_size=300, model_type="unigram", byte_fallback=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "uni.model"))
    assert meta["model_type"] == "unigram" and sp.get_piece_size() == 300
    assert not any(sp.is_byte(i) for i in range(sp.get_piece_size()))


# ---------------------------------------------------------------------------------------------
# Tokenize


def test_round_trip_plain_text_documents_in_order_with_eod(tokenizer_model, corpus, tmp_path):
    summary = tokenize_to_indexed_dataset(corpus, tokenizer_model, tmp_path / "ds", progress=False)
    docs = read_indexed(tmp_path / "ds")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert len(docs) == summary.documents == len(corpus)
    for doc, path in zip(docs, corpus):
        assert doc[-1] == sp.eos_id() and (doc[:-1] != sp.eos_id()).all()
        assert sp.decode(doc[:-1].tolist()) == path.read_text()
    assert summary.tokens == sum(len(d) for d in docs)
    assert summary.bin_bytes == (tmp_path / "ds.bin").stat().st_size == 2 * summary.tokens  # uint16


def test_jsonl_gzip_and_paragraph_inputs(tokenizer_model, corpus, tmp_path):
    texts = [p.read_text() for p in corpus[:6]] + ["", "ünïcödé → 漢字 🙂"]
    jsonl = tmp_path / "in" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)) + "\n\n")
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "compressed jsonl"}) + "\n")
    paragraphs = "first paragraph\nline two\n\n\n  second one\n\nthird\n"
    with gzip.open(tmp_path / "in" / "c.txt.gz", "wt") as f:
        f.write(paragraphs)
    files = find_input_files([tmp_path / "in"])
    assert [p.name for p in files] == ["a.jsonl", "b.jsonl.gz", "c.txt.gz"]

    summary = tokenize_to_indexed_dataset(
        files, tokenizer_model, tmp_path / "ds", text_field="body", text_docs="paragraph", progress=False
    )
    expected = [t for t in texts if t] + ["compressed jsonl", "first paragraph\nline two\n", "  second one\n", "third\n"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert [sp.decode(d[:-1].tolist()) for d in read_indexed(tmp_path / "ds")] == expected
    assert summary.skipped_empty == 1

    meta = json.loads((tmp_path / "ds.meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == file_sha256(tokenizer_model)
    assert meta["tokenizer"]["vocab_size"] == 512 and meta["tokenizer"]["eod_id"] == 2
    assert [i["path"] for i in meta["inputs"]] == [str(p.resolve()) for p in files]
    assert meta["documents"] == len(expected) and meta["tokens"] == summary.tokens


def _encode_and_record_pid(texts):
    """Stands in for the worker function: records which process encoded a batch."""
    Path(os.environ["AFB_TEST_PID_DIR"], str(os.getpid())).touch()
    time.sleep(0.02)  # let the other worker take batches too
    return encode_in_worker(texts)


def test_one_and_two_workers_write_byte_identical_files(tokenizer_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_module, "BATCH_DOCS", 3)  # many batches, spread over workers
    tokenize_to_indexed_dataset(corpus, tokenizer_model, tmp_path / "one", workers=1, progress=False)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    monkeypatch.setenv("AFB_TEST_PID_DIR", str(pid_dir))
    monkeypatch.setattr(tokenize_module, "encode_in_worker", _encode_and_record_pid)
    tokenize_to_indexed_dataset(corpus, tokenizer_model, tmp_path / "two", workers=2, progress=False)

    worker_pids = {int(p.name) for p in pid_dir.iterdir()}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_progress_bar_and_summary(tokenizer_model, corpus, tmp_path, capsys):
    rc = run_command(tokenize.main, ["-i", *map(str, corpus[:5]), "--tokenizer", str(tokenizer_model),
                                     "--out", str(tmp_path / "ds")])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "docs" in err and "tok/s" in err and "tokenize: 100%" in err
    assert "5 documents" in out and "tokens" in out and "MB text" in out and " s (" in out


def test_default_corpus_is_the_sorted_stdlib_without_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)  # sorted order is the document order
    assert "json/__init__.py" in rel and "asyncio/tasks.py" in rel
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(r.split("/")[:-1]) for r in rel)
    assert all(f.suffix == ".py" and f.stat().st_size > 0 for f in files)
    assert sum(f.stat().st_size for f in files) > 5e6


def test_default_corpus_command(tmp_path, monkeypatch, capsys):
    subset = small_stdlib_files(30)
    monkeypatch.setattr(default_corpus, "stdlib_sources", lambda: subset)
    out = tmp_path / "default"
    assert run_command(default_corpus.main, ["--out", str(out), "--vocab-size", "512", "--no-progress"]) == 0
    assert files_in(out) == [
        "stdlib_text_document.bin", "stdlib_text_document.idx", "stdlib_text_document.meta.json",
        "tokenizer.meta.json", "tokenizer.model", "tokenizer.vocab",
    ]
    assert len(read_indexed(out / "stdlib_text_document")) == 30
    printed = capsys.readouterr().out
    assert f"tokenizer: {out}/tokenizer.model" in printed and "vocab_size: 512" in printed
    # A second run refuses to replace the outputs before doing any work.
    assert run_command(default_corpus.main, ["--out", str(out), "--vocab-size", "512"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one-line error, exit status 2, no output left behind


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _good_jsonl_lines(corpus, n: int = 12) -> bytes:
    return b"".join(json.dumps({"text": p.read_text()}).encode() + b"\n" for p in corpus[:n])


BAD_INPUTS = {
    # name: (make input under tmp/in, extra CLI args, expected message fragment)
    "missing": (lambda d, c: d / "nope.txt", [], "does not exist"),
    "empty file": (lambda d, c: _write(d / "empty.txt", b""), [], "is empty"),
    "no matching files": (lambda d, c: _write(d / "x.txt", b"text").parent, ["--pattern", "*.md"], "holds no files matching"),
    "not json": (lambda d, c: _write(d / "a.jsonl", _good_jsonl_lines(c) + b"{not json\n"), [], "a.jsonl:13: line is not valid JSON"),
    "no text field": (lambda d, c: _write(d / "a.jsonl", _good_jsonl_lines(c) + b'{"txt": "x"}\n'), [], "a.jsonl:13: JSON line has no 'text' field"),
    "text not a string": (lambda d, c: _write(d / "a.jsonl", b'{"text": 3}\n'), [], "holds int, not a string"),
    "bad utf-8": (lambda d, c: _write(d / "a.txt", b"ok line\nbad \xff byte\n"), [], "a.txt:2: bytes are not valid UTF-8"),
    "bad gzip": (lambda d, c: _write(d / "a.txt.gz", b"not gzip at all"), [], "a.txt.gz: cannot read"),
    "only empty documents": (lambda d, c: _write(d / "a.jsonl", b'{"text": ""}\n'), [], "no non-empty documents"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_tokenize_bad_input(case, tokenizer_model, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tokenize_module, "BATCH_DOCS", 2)  # errors strike after output was written
    make, extra, message = BAD_INPUTS[case]
    path = make(tmp_path / "in", corpus)
    out = tmp_path / "out"
    rc = run_command(tokenize.main, ["-i", str(path), "--tokenizer", str(tokenizer_model),
                                     "--out", str(out / "ds"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert files_in(out) == []


@pytest.mark.parametrize("case", ["missing", "not json", "bad utf-8", "only empty documents"])
def test_tokenizer_bad_input(case, corpus, tmp_path, capsys):
    make, extra, message = BAD_INPUTS[case]
    path = make(tmp_path / "in", corpus)
    if case == "only empty documents":
        message = "no text to train a tokenizer on"
    rc = run_command(tokenizer.main, ["-i", str(path), "--out", str(tmp_path / "out" / "tok"), "--vocab-size", "300", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert files_in(tmp_path / "out") == []


def test_replace_option_substitutes_undecodable_bytes(tokenizer_model, tmp_path):
    path = _write(tmp_path / "a.txt", b"ok line\nbad \xff byte\n")
    tokenize_to_indexed_dataset([path], tokenizer_model, tmp_path / "ds", encoding_errors="replace", progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert sp.decode(read_indexed(tmp_path / "ds")[0][:-1].tolist()) == "ok line\nbad \ufffd byte\n"


def test_vocabulary_too_large_for_the_data(tmp_path, capsys):
    path = _write(tmp_path / "a.txt", b"a tiny corpus\n")
    rc = run_command(tokenizer.main, ["-i", str(path), "--out", str(tmp_path / "out" / "tok"), "--vocab-size", "5000"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot train a 5000-piece bpe tokenizer" in err and "Vocabulary size too high" in err
    assert files_in(tmp_path / "out") == []


def test_existing_outputs_are_refused_unless_overwrite(tokenizer_model, corpus, tmp_path, capsys):
    args = ["-i", str(corpus[0]), "--tokenizer", str(tokenizer_model), "--out", str(tmp_path / "ds"), "--no-progress"]
    assert run_command(tokenize.main, args) == 0
    before = (tmp_path / "ds.bin").read_bytes()
    args[1] = str(corpus[1])
    assert run_command(tokenize.main, args) == 2
    assert "ds.bin' exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "ds.bin").read_bytes() == before
    assert run_command(tokenize.main, [*args, "--overwrite"]) == 0
    assert (tmp_path / "ds.bin").read_bytes() != before
    assert files_in(tmp_path) == ["ds.bin", "ds.idx", "ds.meta.json"]  # no temporaries left

    tok_args = ["-i", str(corpus[0]), "--out", str(tokenizer_model.with_suffix("")), "--vocab-size", "300"]
    assert run_command(tokenizer.main, tok_args) == 2
    assert "tok.vocab' exists" in capsys.readouterr().err


def test_bad_tokenizer_file(tmp_path, corpus):
    fake = _write(tmp_path / "fake.model", b"not a model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        tokenize_to_indexed_dataset(corpus[:1], fake, tmp_path / "out" / "ds", progress=False)
    assert files_in(tmp_path / "out") == []


def test_command_line_error_is_one_line_and_exit_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.tokenize", "-i", str(tmp_path / "missing.jsonl"),
         "--tokenizer", "t.model", "--out", str(tmp_path / "ds")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: input '{tmp_path / 'missing.jsonl'}' does not exist\n"
    assert files_in(tmp_path) == []


def test_read_documents_rejects_unknown_options(corpus):
    with pytest.raises(DataError, match="choose one of strict, replace"):
        list(read_documents(corpus[:1], encoding_errors="ignore"))
