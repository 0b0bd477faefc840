"""Tokenize text, JSONL or gzip inputs into a megatron-core indexed dataset (.bin/.idx).

    python -m data_prep.tokenize --input corpus/ --tokenizer data/tok/tokenizer.model \
        --out data/corpus_text_document --workers 2

One document per dataset entry, each followed by the end-of-document token; documents in input
order whatever the number of workers (so 1 and N workers write byte-identical files). Writes
`<out>.bin`, `<out>.idx` (through megatron-core's IndexedDatasetBuilder) and `<out>.meta.json`
(tokenizer, its vocabulary size and sha256, the inputs, the counts).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from data_prep.encode import DocumentEncoder, encode_in_worker, init_worker
from data_prep.errors import ArgumentParser, DataError, run_command
from data_prep.inputs import Document, find_input_files, read_documents
from data_prep.outputs import file_sha256, metadata_path, refuse_existing, staged_outputs, write_json
from data_prep.tokenizer import add_input_arguments, load_tokenizer

# A batch of documents is one task for a worker: large enough to amortise the inter-process
# transfer, small enough that workers finish together (a 1 MB batch made the standard
# library's few large files leave one worker alone at the end) and memory stays flat.
BATCH_BYTES = 1 << 18
BATCH_DOCS = 512


@dataclass(frozen=True)
class Summary:
    documents: int
    skipped_empty: int
    tokens: int
    text_bytes: int
    bin_bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        return (
            f"{self.documents} documents ({self.skipped_empty} empty skipped), {self.tokens} tokens, "
            f"{self.text_bytes / 1e6:.1f} MB text -> {self.bin_bytes / 1e6:.1f} MB .bin "
            f"in {self.seconds:.1f} s ({rate / 1e3:.0f}k tokens/s)"
        )


@dataclass
class _Batch:
    texts: list[str]
    text_bytes: int
    input_bytes: int
    skipped_empty: int


def _batches(documents: Iterable[Document]) -> Iterator[_Batch]:
    batch = _Batch([], 0, 0, 0)
    for doc in documents:
        batch.input_bytes += doc.input_bytes
        if not doc.text.strip():
            batch.skipped_empty += 1
            continue
        batch.texts.append(doc.text)
        batch.text_bytes += len(doc.text.encode("utf-8"))
        if batch.text_bytes >= BATCH_BYTES or len(batch.texts) >= BATCH_DOCS:
            yield batch
            batch = _Batch([], 0, 0, 0)
    if batch.texts or batch.skipped_empty:
        yield batch


def _encoded_in_order(
    batches: Iterable[_Batch], tokenizer: Path, dtype: str, workers: int
) -> Iterator[tuple[_Batch, np.ndarray, np.ndarray]]:
    """(batch, tokens, lengths) in input order; with several workers, a bounded window of
    batches is in flight so memory stays flat however large the inputs."""
    if workers == 1:
        encode: Callable = DocumentEncoder(str(tokenizer), dtype)
        for batch in batches:
            yield (batch, *encode(batch.texts))
        return
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=(str(tokenizer), dtype)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(encode_in_worker, (batch.texts,))))
            if len(pending) >= 4 * workers:
                done, result = pending.popleft()
                yield (done, *result.get())
        while pending:
            done, result = pending.popleft()
            yield (done, *result.get())


def dataset_paths(output_prefix: Path) -> list[Path]:
    """The outputs of one run, in the order they are renamed into place."""
    return [Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx"), metadata_path(output_prefix)]


def tokenize_to_indexed_dataset(
    files: Sequence[Path],
    tokenizer: str | Path,
    output_prefix: str | Path,
    workers: int = 1,
    overwrite: bool = False,
    text_field: str = "text",
    encoding_errors: str = "strict",
    text_docs: str = "file",
    progress: bool = True,
) -> Summary:
    """Write `<output_prefix>.bin/.idx/.meta.json` from the documents of `files`."""
    # megatron-core's import takes seconds; importing it here keeps worker processes light.
    # Its warnings about absent GPU libraries (Apex, Transformer Engine) say nothing about data.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if workers < 1:
        raise DataError(f"workers={workers} must be >= 1")
    tokenizer = Path(tokenizer)
    processor = load_tokenizer(tokenizer)
    vocab_size = processor.get_piece_size()
    dtype = np.dtype(DType.optimal_dtype(vocab_size)).name
    output_prefix = Path(output_prefix)
    final = dataset_paths(output_prefix)
    refuse_existing(final, overwrite)

    start = time.perf_counter()
    documents = skipped = tokens = text_bytes = 0
    bar = tqdm(
        total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, unit_divisor=1024,
        desc="tokenize", disable=not progress, file=sys.stderr,
    )
    with bar, staged_outputs(final) as (tmp_bin, tmp_idx, tmp_meta):
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=np.dtype(dtype).type)
        batches = _batches(read_documents(files, text_field, encoding_errors, text_docs))
        for batch, batch_tokens, lengths in _encoded_in_order(batches, tokenizer, dtype, workers):
            offset = 0
            for length in lengths.tolist():
                builder.add_document(batch_tokens[offset : offset + length], [length])
                offset += length
            documents += len(lengths)
            skipped += batch.skipped_empty
            tokens += offset
            text_bytes += batch.text_bytes
            bar.update(batch.input_bytes)
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{documents} docs, {rate / 1e3:.0f}k tok/s", refresh=False)
        if documents == 0:
            raise DataError("the inputs hold no non-empty documents to tokenize")
        builder.finalize(str(tmp_idx))
        summary = Summary(documents, skipped, tokens, text_bytes, tmp_bin.stat().st_size,
                          round(time.perf_counter() - start, 3))
        write_json(tmp_meta, {
            "format": "megatron-core indexed dataset (.bin/.idx), one document per entry, eod-terminated",
            "created_by": "data_prep.tokenize",
            "dtype": dtype,
            "tokenizer": {
                "path": str(tokenizer.resolve()),
                "sha256": file_sha256(tokenizer),
                "vocab_size": vocab_size,
                "eod_id": processor.eos_id(),
                "pad_id": processor.pad_id(),
            },
            "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files],
            "options": {"text_field": text_field, "encoding_errors": encoding_errors, "text_docs": text_docs},
            **asdict(summary),
        })
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = ArgumentParser(prog="python -m data_prep.tokenize", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, type=Path, help="sentencepiece .model")
    parser.add_argument("--out", required=True, type=Path, help="output prefix, e.g. data/corpus_text_document")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    files = find_input_files(args.input, args.pattern)
    summary = tokenize_to_indexed_dataset(
        files, args.tokenizer, args.out, args.workers, args.overwrite, args.text_field,
        args.encoding_errors, args.text_docs, progress=not args.no_progress,
    )
    print(f"dataset: {args.out}.bin/.idx  {summary.line()}")


if __name__ == "__main__":
    raise SystemExit(run_command(main))
