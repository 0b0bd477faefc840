"""Writing outputs so that a failed or interrupted run leaves nothing half-written.

Every output is written under a hidden temporary name in its final directory and renamed into
place only when all outputs of the step are complete (a rename within one file system is
atomic). An output that already exists is refused unless the caller passes `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from data_prep.errors import DataError


def metadata_path(prefix: str | os.PathLike) -> Path:
    """The JSON metadata beside an output: `<prefix>.meta.json`."""
    return Path(f"{os.fspath(prefix)}.meta.json")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def temporary_name(path: Path) -> Path:
    """Hidden name in the same directory; the suffix is kept, so tools that append `.bin`,
    `.model` etc. to a prefix write straight to the temporary names."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise DataError(f"output {str(path)!r} exists; pass --overwrite to replace it")


@contextmanager
def staged_outputs(final_paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield one temporary path per final path; rename them all, in order, on success.

    On any exception the temporaries (and output directories this call created) are removed.
    Order the final paths so that the one readers look for first comes last.
    """
    created: list[Path] = []
    for parent in dict.fromkeys(p.parent for p in final_paths):
        missing = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        created.extend(missing)  # deepest first: the order to remove them in
    temporaries = [temporary_name(p) for p in final_paths]
    try:
        yield temporaries
        for tmp, final in zip(temporaries, final_paths):
            os.replace(tmp, final)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        for directory in created:
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        raise
