"""`<run_dir>/metrics.jsonl`: every step's loss, gradient norm and LR at full precision.

One JSON object per line, appended by rank 0 only. Records are buffered and flushed at each
progress line and before each checkpoint: a crash loses at most the records since the last
flush, all of them after the newest checkpoint, which the resumed run writes again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsFile:
    def __init__(self, path: Path, enabled: bool):
        self.f = None
        if enabled:
            fresh = not path.exists() or path.stat().st_size == 0
            self.f = open(path, "a")
            if not fresh:
                with open(path, "rb") as r:  # a crash may have cut the last line short
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self.f.write("\n")

    def write(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def read_metrics(path: str | os.PathLike) -> dict[int, dict]:
    """The last training record of each step in a metrics.jsonl (records of steps redone after a
    resume replace the earlier attempt's); unreadable (cut) lines are ignored."""
    out: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out[rec["step"]] = rec
    return out
