"""The statistics of the studies: bootstrap intervals, paired differences, LR sensitivity, and the
power-law fit L(N) = E + A * N^(-alpha). numpy only; every resampling uses a fixed generator seed,
so a report regenerates to the same digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
CI_LEVEL = 0.95
BOOT_SEED = 0


@dataclass
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 4) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "-"
        if self.n == 1 or not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} [{self.lo:.{digits}g}, {self.hi:.{digits}g}]"


def bootstrap_mean(values, n_boot: int = N_BOOT, level: float = CI_LEVEL, seed: int = BOOT_SEED) -> Interval:
    """Mean and percentile-bootstrap interval of the mean (resampling the values with replacement).

    None / non-finite values are left out (n counts the rest). With n = 1 the interval is the
    point; with n = 2-3 it is coarse (it cannot be wider than the values' range), say so."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return Interval(mean, float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(x.size))


def paired_difference(a: dict, b: dict, **kw) -> Interval:
    """Mean of a[k] - b[k] over the keys (seeds) both have, with its bootstrap interval."""
    diffs = [a[k] - b[k] for k in sorted(set(a) & set(b))
             if a[k] is not None and b[k] is not None and math.isfinite(a[k]) and math.isfinite(b[k])]
    return bootstrap_mean(diffs, **kw)


def lr_sensitivity(losses_by_lr: dict[float, float], initial_loss: float) -> float:
    """Wortsman et al. (2023): mean over the LRs of [min(L(lr), L0) - L*], L* = min over LRs.

    A diverged (None or non-finite) L(lr) counts as L0."""
    capped = [min(v, initial_loss) if v is not None and math.isfinite(v) else initial_loss
              for v in losses_by_lr.values()]
    best = min(capped)
    return float(np.mean([c - best for c in capped]))


def lr_sensitivity_interval(losses: dict[float, dict[int, float]], initial: dict[int, float], n_boot: int = N_BOOT,
                            level: float = CI_LEVEL, seed: int = BOOT_SEED) -> Interval:
    """Sensitivity of the seed-mean curve L(lr), with a bootstrap over seeds: each replicate draws
    the seeds with replacement (one draw for all LRs, so a seed's curve stays together) and
    recomputes the mean curve, L0 (the mean initial loss) and the sensitivity."""
    seeds = sorted(initial)

    def value(draw: list[int]) -> float:
        curve = {}
        for lr, by_seed in losses.items():
            here = [s for s in draw if s in by_seed]  # seeds not (yet) run at this LR are left out
            if here:
                curve[lr] = float(np.mean([min(by_seed[s], initial[s]) if by_seed[s] is not None
                                           and math.isfinite(by_seed[s]) else initial[s] for s in here]))
        return lr_sensitivity(curve, float(np.mean([initial[s] for s in draw]))) if curve else math.nan

    point = value(seeds)
    if len(seeds) < 2:
        return Interval(point, point, point, len(seeds))
    rng = np.random.default_rng(seed)
    reps = [value([seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]) for _ in range(n_boot)]
    reps = [r for r in reps if math.isfinite(r)]
    a = (1 - level) / 2
    return Interval(point, float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a)), len(seeds))


# ----------------------------------------------------------------------------------------------
# L(N) = E + A * N^(-alpha)

@dataclass
class PowerLaw:
    E: float
    A: float
    alpha: float

    def __call__(self, n):
        return self.E + self.A * np.power(np.asarray(n, dtype=float), -self.alpha)


def _linear_given_alpha(x: np.ndarray, y: np.ndarray, alpha) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares for E, A at fixed alpha (E >= 0, A >= 0); returns (E, A, SSE), one per alpha.

    The closed form of a one-regressor line, evaluated for a whole grid of alphas at once: a
    bootstrap makes thousands of fits, and a per-alpha np.linalg.lstsq made a 16-run scaling report
    take over a minute."""
    z = np.power(x[None, :], -np.atleast_1d(np.asarray(alpha, dtype=float))[:, None])  # (alphas, points)
    zc = z - z.mean(axis=1, keepdims=True)
    var = (zc * zc).sum(axis=1)
    A = np.divide(zc @ (y - y.mean()), var, out=np.zeros_like(var), where=var > 0)
    E = y.mean() - A * z.mean(axis=1)
    clamped = E < 0  # the constraint binds: E = 0, A by least squares on z alone
    E = np.where(clamped, 0.0, E)
    A = np.where(clamped, (z @ y) / (z * z).sum(axis=1), A)
    flat = A < 0  # no decrease with N: a flat line
    E = np.where(flat, y.mean(), E)
    A = np.where(flat, 0.0, A)
    return E, A, ((E[:, None] + A[:, None] * z - y) ** 2).sum(axis=1)


def fit_power_law(n, loss, alpha_range: tuple[float, float] = (1e-3, 3.0)) -> PowerLaw:
    """Fit L = E + A N^-alpha by least squares in L: E and A are linear given alpha (variable
    projection), alpha is found on a log grid and refined on ever finer grids around the best
    one. N is scaled by its geometric mean first, so A is well conditioned; the returned A is for
    unscaled N."""
    x = np.asarray(n, dtype=float)
    y = np.asarray(loss, dtype=float)
    if x.size < 3 or np.unique(x).size < 3:
        raise ValueError(f"a fit of E + A N^-alpha needs at least 3 distinct N, got {np.unique(x).size}")
    scale = float(np.exp(np.log(x).mean()))
    xs = x / scale
    grid = np.geomspace(*alpha_range, 400)
    for _ in range(5):  # zoom into the bracket around the best alpha: each round narrows it ~30x
        i = int(np.argmin(_linear_given_alpha(xs, y, grid)[2]))
        grid = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)], 65)
    alpha = float(grid[grid.size // 2])  # the middle of the last bracket
    E, A, _ = _linear_given_alpha(xs, y, alpha)
    return PowerLaw(float(E[0]), float(A[0]) * scale ** alpha, alpha)


@dataclass
class FitResult:
    fit: PowerLaw
    alpha: Interval
    E: Interval
    predictions: dict  # target N -> Interval of the predicted loss
    method: str


def bootstrap_power_law(points: dict[float, list[float]], targets=(), n_boot: int = 1000, level: float = CI_LEVEL,
                        seed: int = BOOT_SEED) -> FitResult:
    """Fit the per-N mean losses; intervals by bootstrap.

    With several values (seeds) per N, each replicate resamples the seeds within each N; with one
    value per N, the residuals of the fit are resampled instead (a residual bootstrap)."""
    ns = sorted(points)
    means = np.array([np.mean(points[n]) for n in ns])
    fit = fit_power_law(ns, means)
    rng = np.random.default_rng(seed)
    multi = all(len(points[n]) > 1 for n in ns)
    resid = means - fit(ns)
    reps = []
    for _ in range(n_boot):
        if multi:
            y = np.array([np.mean(rng.choice(points[n], size=len(points[n]))) for n in ns])
        else:
            y = fit(ns) + rng.choice(resid, size=len(ns))
        try:
            reps.append(fit_power_law(ns, y))
        except ValueError:
            continue
    a = (1 - level) / 2

    def interval(values, point):
        return Interval(point, float(np.quantile(values, a)), float(np.quantile(values, 1 - a)), len(values))

    preds = {t: interval([float(r(t)) for r in reps], float(fit(t))) for t in targets}
    return FitResult(fit, interval([r.alpha for r in reps], fit.alpha), interval([r.E for r in reps], fit.E), preds,
                     "bootstrap over seeds within each size" if multi else "residual bootstrap (one run per size)")
