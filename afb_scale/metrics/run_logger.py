"""Where a run's numbers go: one stdout line per log interval and TensorBoard event files.

Only the logging rank (global rank 0) writes; the others hold a disabled logger, so callers
need no rank checks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, hide what a killed attempt logged after the checkpoint we resumed from,
            # so the curves show each step once.
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class Throughput:
    """Tokens per second over the last interval and an ETA from the run's average step time."""

    def __init__(self, tokens_per_step: int, total_steps: int, start_step: int):
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start_step

    def tick(self, step: int) -> tuple[float, float]:
        """(tokens/s since the last tick, seconds left) after finishing `step` steps."""
        now = time.perf_counter()
        tokens_per_s = (step - self.step_last) * self.tokens_per_step / max(now - self.t_last, 1e-9)
        per_step = (now - self.t0) / max(step - self.start_step, 1)
        self.t_last, self.step_last = now, step
        return tokens_per_s, per_step * (self.total_steps - step)
