"""Sentencepiece tokenizers: training one on text, JSONL or gzip inputs, and loading one.

    python -m data_prep.tokenizer --input corpus/ --out data/tok/tokenizer --vocab-size 8192

writes `tokenizer.model` (what training and `data_prep.tokenize` load), `tokenizer.vocab`
(pieces and scores, for reading) and `tokenizer.meta.json` (how it was trained, on what).

Choices and why:
- Sentences are the non-empty lines of the documents; sentencepiece's length limit and unseen
  characters are handled by byte fallback, so every input string round-trips exactly.
- `identity` normalisation and kept whitespace runs: source code and text keep their
  indentation and characters through encode/decode (the round-trip tests rely on it).
- Fixed special ids: <pad>=0, <unk>=1, end-of-document=2 (sentencepiece's eos slot), no <bos>.
  Readers take the ids from the model file (`eos_id()` is the end-of-document id), never from
  constants, so a model trained elsewhere works if it has an eos piece.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import sentencepiece

from data_prep.errors import ArgumentParser, DataError, run_command
from data_prep.inputs import ENCODING_ERRORS, TEXT_DOCS, find_input_files, read_documents
from data_prep.outputs import (
    file_sha256,
    metadata_path,
    refuse_existing,
    staged_outputs,
    write_json,
)

MODEL_TYPES = ("bpe", "unigram")
PAD_PIECE, UNK_PIECE, EOD_PIECE = "<pad>", "<unk>", "<|endoftext|>"


class _Sentences:
    """The non-empty lines of the documents, up to a byte budget, counted as they are read.

    sentencepiece turns an exception raised by the iterator into a RuntimeError; the DataError
    is kept here so the caller can re-raise it with its own message.
    """

    def __init__(self, files: Sequence[Path], max_bytes: Optional[int], **read_options: str) -> None:
        self.files, self.max_bytes, self.read_options = files, max_bytes, read_options
        self.count = 0
        self.bytes = 0
        self.error: Optional[DataError] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for doc in read_documents(self.files, **self.read_options):
                for line in doc.text.split("\n"):
                    if not line.strip():
                        continue
                    self.count += 1
                    self.bytes += len(line.encode("utf-8"))
                    yield line
                    if self.max_bytes is not None and self.bytes >= self.max_bytes:
                        return
        except DataError as e:
            self.error = e
            raise


def tokenizer_paths(model_prefix: Path) -> list[Path]:
    """The outputs of one training run, in the order they are renamed into place."""
    return [Path(f"{model_prefix}.vocab"), metadata_path(model_prefix), Path(f"{model_prefix}.model")]


def train_tokenizer(
    files: Sequence[Path],
    model_prefix: Path,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    extra_symbols: Sequence[str] = (),
    max_train_bytes: Optional[int] = None,
    overwrite: bool = False,
    text_field: str = "text",
    encoding_errors: str = "strict",
    text_docs: str = "file",
) -> dict:
    """Train `<model_prefix>.model`/.vocab and write `<model_prefix>.meta.json`; return the metadata."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"model type {model_type!r} is not allowed; choose one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 8:
        raise DataError(f"vocabulary size {vocab_size} is too small; it must be at least 8")
    if max_train_bytes is not None and max_train_bytes < 1:
        raise DataError(f"max train bytes {max_train_bytes} must be >= 1")
    model_prefix = Path(model_prefix)
    final = tokenizer_paths(model_prefix)
    refuse_existing(final, overwrite)
    sentences = _Sentences(
        files, max_train_bytes, text_field=text_field, encoding_errors=encoding_errors, text_docs=text_docs
    )
    start = time.perf_counter()
    with staged_outputs(final) as (tmp_vocab, tmp_meta, tmp_model):
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(tmp_model.with_suffix("")),
                model_type=model_type,
                vocab_size=vocab_size,
                byte_fallback=byte_fallback,
                character_coverage=0.9999 if byte_fallback else 1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                user_defined_symbols=list(extra_symbols),
                pad_id=0, pad_piece=PAD_PIECE,
                unk_id=1, unk_piece=UNK_PIECE,
                eos_id=2, eos_piece=EOD_PIECE,
                bos_id=-1,
                shuffle_input_sentence=False,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if sentences.error is not None:
                raise sentences.error from None
            if sentences.count == 0:
                raise DataError("the inputs hold no text to train a tokenizer on") from None
            reason = str(e).splitlines()[0].split("] ", 1)[-1]
            raise DataError(f"sentencepiece cannot train a {vocab_size}-piece {model_type} tokenizer: {reason}") from None
        metadata = {
            "tokenizer": "sentencepiece",
            "sentencepiece_version": sentencepiece.__version__,
            "model_type": model_type,
            "vocab_size": vocab_size,
            "byte_fallback": byte_fallback,
            "special_ids": {PAD_PIECE: 0, UNK_PIECE: 1, EOD_PIECE: 2},
            "extra_symbols": list(extra_symbols),
            "sha256": file_sha256(tmp_model),
            "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
            "training_sentences": sentences.count,
            "training_bytes": sentences.bytes,
            "seconds": round(time.perf_counter() - start, 3),
        }
        write_json(tmp_meta, metadata)
    return metadata


def load_tokenizer(path: str | Path) -> sentencepiece.SentencePieceProcessor:
    """Load a sentencepiece model that has the end-of-document piece, or raise a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {str(path)!r} does not exist")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError):
        raise DataError(f"tokenizer {str(path)!r} is not a sentencepiece model") from None
    if processor.eos_id() < 0:
        raise DataError(f"tokenizer {str(path)!r} has no end-of-document (eos) piece; train it with data_prep.tokenizer")
    return processor


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Input options shared by the tokenizer and tokenize commands."""
    parser.add_argument("--input", "-i", nargs="+", required=True, help="files or directories")
    parser.add_argument("--pattern", default="*", help="file name pattern inside directories (default: *)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    parser.add_argument("--text-docs", choices=TEXT_DOCS, default="file",
                        help="plain text: one document per file, or per blank-line-separated paragraph")
    parser.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                        help="bytes that are not UTF-8: fail (strict) or substitute U+FFFD (replace)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = ArgumentParser(prog="python -m data_prep.tokenizer", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="output prefix, e.g. data/tok/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--extra-symbols", nargs="*", default=[], help="more special pieces, kept whole")
    parser.add_argument("--max-train-bytes", type=int, default=None,
                        help="train on the first N bytes of lines (inputs in order); default all")
    args = parser.parse_args(argv)
    files = find_input_files(args.input, args.pattern)
    meta = train_tokenizer(
        files, args.out, args.vocab_size, args.model_type, args.byte_fallback, args.extra_symbols,
        args.max_train_bytes, args.overwrite, args.text_field, args.encoding_errors, args.text_docs,
    )
    print(
        f"tokenizer: {args.out}.model ({meta['vocab_size']} pieces, {meta['model_type']}, "
        f"trained on {meta['training_sentences']} lines / {meta['training_bytes'] / 1e6:.1f} MB "
        f"in {meta['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    raise SystemExit(run_command(main))
