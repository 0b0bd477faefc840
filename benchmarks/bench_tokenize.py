"""Tokenisation throughput on the default corpus (the Python standard library's sources).

    python benchmarks/bench_tokenize.py [--tokenizer data/default/tokenizer.model] [--repeats 3]

Compares, in one run and on the same documents and tokenizer:
- baseline: a plain single-process loop that encodes line by line and appends ids to a list;
- data_prep.tokenize with 1 and 2 workers, writing the real .bin/.idx/.meta.json outputs.
Each is timed end to end (reading files included), best of `--repeats` rounds in which the
methods take turns; prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import sentencepiece

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.default_corpus import stdlib_sources  # noqa: E402
from data_prep.tokenize import tokenize_to_indexed_dataset  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402


def baseline(files: list[Path], tokenizer: Path) -> tuple[int, int]:
    """(documents, tokens) the naive way: one encode call per line, ids appended to a list."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    ids: list[int] = []
    for path in files:
        for line in path.read_text(encoding="utf-8").split("\n"):
            ids.extend(sp.encode(line))
        ids.append(sp.eos_id())
    return len(files), len(ids)


def best_of(repeats: int, runs: list[Callable[[], tuple[int, int]]]) -> list[tuple[int, int, float]]:
    """(docs, tokens, best seconds) per run; the runs take turns, so a change in the machine's
    load during the benchmark touches all of them alike."""
    best = [(0, 0, float("inf"))] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            docs, tokens = run()
            best[i] = (docs, tokens, min(best[i][2], time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="sentencepiece model (default: train the default 8192-piece BPE one first)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    files = stdlib_sources()
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            train_tokenizer(files, Path(tmp, "tokenizer"))
            tokenizer = Path(tmp, "tokenizer.model")

        def data_prep(workers: int) -> Callable[[], tuple[int, int]]:
            def run() -> tuple[int, int]:
                summary = tokenize_to_indexed_dataset(
                    files, tokenizer, Path(tmp, "ds"), workers=workers, overwrite=True, progress=False
                )
                return summary.documents, summary.tokens
            return run

        data_prep(1)()  # warm-up: megatron-core import, page cache
        methods = [("baseline: line-by-line loop into a list", 1), ("data_prep.tokenize", 1), ("data_prep.tokenize", 2)]
        results = best_of(args.repeats, [lambda: baseline(files, tokenizer), data_prep(1), data_prep(2)])
        rows = [(*method, *result) for method, result in zip(methods, results)]

    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} stdlib files, {size / 1e6:.1f} MB; tokenizer: "
          f"{args.tokenizer or 'default 8192-piece BPE'}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"best of {args.repeats}\n")
    print("| method | workers | docs | tokens | seconds | tokens/s | ratio vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_rate = rows[0][3] / rows[0][4]
    for method, workers, docs, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"| {method} | {workers} | {docs} | {tokens} | {seconds:.2f} | {rate / 1e3:.0f}k | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
