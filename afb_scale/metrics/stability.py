"""Training-level stability metrics: gradient-norm variability and loss spikes.

AFB-FFN is judged on whether it trains more stably than a plain FFN; these are the numbers the
stability studies compare (design page, "Metrics the layer exposes").
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass


@dataclass
class StabilitySnapshot:
    grad_norm_variance: float
    grad_norm_cv: float  # coefficient of variation: std / mean over the window
    loss_spike: bool
    loss_spikes_total: int


class StabilityTracker:
    """Trailing-window statistics, updated once per optimizer step (cheap: O(window))."""

    def __init__(self, window: int = 100, spike_factor: float = 2.0):
        self.grad_norms: collections.deque = collections.deque(maxlen=window)
        self.losses: collections.deque = collections.deque(maxlen=window)
        self.spike_factor = spike_factor
        self.spikes = 0

    def update(self, loss: float, grad_norm: float | None) -> StabilitySnapshot:
        # A spike: the loss exceeds the trailing median (before this step) by the set factor.
        spike = len(self.losses) >= 5 and loss > self.spike_factor * statistics.median(self.losses)
        self.spikes += spike
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        if len(self.grad_norms) >= 2:
            mean = statistics.fmean(self.grad_norms)
            var = statistics.pvariance(self.grad_norms, mu=mean)
            cv = var**0.5 / mean if mean > 0 else 0.0
        else:
            var, cv = 0.0, 0.0
        return StabilitySnapshot(var, cv, spike, self.spikes)

    # Saved with every checkpoint, so a resumed run's windows and spike count continue.
    def state_dict(self) -> dict:
        return {"grad_norms": list(self.grad_norms), "losses": list(self.losses), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.grad_norms.clear()
        self.grad_norms.extend(state["grad_norms"])
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.spikes = state["spikes"]
