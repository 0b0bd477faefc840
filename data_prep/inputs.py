"""Finding input files and reading documents from them.

Formats, chosen by file name: `*.jsonl` (one JSON object per line, the document text under a
named field) and anything else as plain UTF-8 text; either may be gzip-compressed (`*.gz`).
A plain-text file is one document, or with `text_docs="paragraph"` one document per block of
lines separated by blank lines. Directories are searched recursively in sorted order, so the
same inputs always give the same documents in the same order (byte-identical outputs).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from data_prep.errors import DataError

TEXT_DOCS = ("file", "paragraph")
ENCODING_ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class Document:
    text: str
    # Input bytes (compressed bytes for *.gz) consumed since the previous document: progress.
    input_bytes: int


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def find_input_files(paths: Sequence[str | Path], pattern: str = "*") -> list[Path]:
    """Expand files and directories (recursively, sorted, hidden names skipped) into files."""
    if not paths:
        raise DataError("no inputs given; pass at least one file or directory")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob(pattern)
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"input directory {str(path)!r} holds no files matching {pattern!r}")
            files.extend(found)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise DataError(f"input file {str(path)!r} is empty")
            files.append(path)
        else:
            raise DataError(f"input {str(path)!r} does not exist")
    return files


def _decode(data: bytes, path: Path, line_number: int, encoding_errors: str) -> str:
    try:
        return data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        line = line_number + data.count(b"\n", 0, e.start)
        raise DataError(
            f"{path}:{line}: bytes are not valid UTF-8 ({e.reason}, byte 0x{data[e.start]:02x}); "
            "pass --encoding-errors replace to substitute U+FFFD"
        ) from None


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, stream to read): the raw file's position measures progress through *.gz."""
    raw = open(path, "rb")
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw)


def _read_file(path: Path, text_field: str, encoding_errors: str, text_docs: str) -> Iterator[Document]:
    raw, stream = _open(path)
    consumed = 0

    def progress() -> int:
        nonlocal consumed
        now = raw.tell()
        delta, consumed = now - consumed, now
        return delta

    try:
        if is_jsonl(path):
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(_decode(line, path, number, encoding_errors))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: line is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{number}: JSON line has no {text_field!r} field (--text-field)")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{number}: field {text_field!r} holds {type(text).__name__}, not a string"
                    )
                yield Document(text, progress())
        elif text_docs == "paragraph":
            block: list[bytes] = []
            start = 1
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    if not block:
                        start = number
                    block.append(line)
                elif block:
                    yield Document(_decode(b"".join(block), path, start, encoding_errors), progress())
                    block = []
            if block:
                yield Document(_decode(b"".join(block), path, start, encoding_errors), progress())
        else:
            yield Document(_decode(stream.read(), path, 1, encoding_errors), progress())
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt *.gz
        raise DataError(f"{path}: cannot read: {e}") from None
    finally:
        stream.close()
        raw.close()


def read_documents(
    files: Sequence[Path],
    text_field: str = "text",
    encoding_errors: str = "strict",
    text_docs: str = "file",
) -> Iterator[Document]:
    """Documents of all files, in order. Empty documents are yielded too (callers skip them)."""
    if encoding_errors not in ENCODING_ERRORS:
        raise DataError(f"encoding errors {encoding_errors!r} is not allowed; choose one of {', '.join(ENCODING_ERRORS)}")
    if text_docs not in TEXT_DOCS:
        raise DataError(f"text docs {text_docs!r} is not allowed; choose one of {', '.join(TEXT_DOCS)}")
    for path in files:
        yield from _read_file(Path(path), text_field, encoding_errors, text_docs)
