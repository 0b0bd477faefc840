"""The built-in default corpus: the Python standard library's own sources, in one command.

    python -m data_prep.default_corpus --out data/default

Real text (code, comments, docstrings) that every machine with Python has, so a fresh machine
can train without downloading anything. One document per source file; test folders and
installed packages (site-packages) are left out. Files are taken in sorted order, so machines
with the same Python version produce byte-identical outputs.

Writes `<out>/tokenizer.model` (+ .vocab, .meta.json) and `<out>/stdlib_text_document.bin/.idx`
(+ .meta.json).
"""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path
from typing import Optional, Sequence

from data_prep.errors import ArgumentParser, DataError, run_command
from data_prep.outputs import refuse_existing
from data_prep.tokenize import dataset_paths, tokenize_to_indexed_dataset
from data_prep.tokenizer import tokenizer_paths, train_tokenizer

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
TOKENIZER_NAME = "tokenizer"
DATASET_NAME = "stdlib_text_document"


def stdlib_sources(root: Optional[Path] = None) -> list[Path]:
    """Non-empty `*.py` files of the standard library, sorted by path, without tests/packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith(".")]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"no Python sources found under {str(root)!r}")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = ArgumentParser(prog="python -m data_prep.default_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/default"), help="output directory")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tokenizer_prefix, dataset_prefix = args.out / TOKENIZER_NAME, args.out / DATASET_NAME
    refuse_existing([*tokenizer_paths(tokenizer_prefix), *dataset_paths(dataset_prefix)], args.overwrite)
    files = stdlib_sources()
    print(f"corpus: {len(files)} Python standard library files, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    meta = train_tokenizer(files, tokenizer_prefix, vocab_size=args.vocab_size, overwrite=args.overwrite)
    print(f"tokenizer: {tokenizer_prefix}.model ({meta['vocab_size']} pieces, trained in {meta['seconds']:.1f} s)")
    summary = tokenize_to_indexed_dataset(
        files, f"{tokenizer_prefix}.model", dataset_prefix, workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"dataset: {dataset_prefix}.bin/.idx  {summary.line()}")
    print(f"done in {time.perf_counter() - start:.1f} s; use in a config as:")
    print(f"  model:\n    vocab_size: {meta['vocab_size']}")
    print(f"  data:\n    tokenizer: {tokenizer_prefix}.model\n    datasets:\n"
          f"      - {{prefix: {dataset_prefix}, weight: 1.0}}")


if __name__ == "__main__":
    raise SystemExit(run_command(main))
