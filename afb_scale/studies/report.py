"""Study reports: a markdown table and PNG plots from the runs' TensorBoard events.

The table holds what a stability comparison needs per run: final and best validation loss,
token accuracy, gradient-norm coefficient of variation and loss spikes, the largest
gradient norm, and for AFB runs the last mean gate entropy and bias-correction ratio; for runs
that logged the NerVE spectral diagnostics (metrics/spectral.py), the last PR gain and JS
divergence (means over layers), and one figure per spectral metric with a panel per layer.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PLOTS = {
    "loss.png": ("train/loss", "training loss"),
    "val_loss.png": ("val/loss", "validation loss"),
    "grad_norm.png": ("train/grad_norm", "gradient norm"),
    "gate_entropy.png": ("afb/*/gate_entropy", "mean gate entropy (bits), AFB layers"),
}

# `spectral/layerNN/<metric>`, plotted per layer as `spectral_<metric>.png`.
SPECTRAL_METRICS = {
    "pre_entropy": "spectral entropy of X_pre (nats)",
    "post_entropy": "spectral entropy of X_post (nats)",
    "pre_participation_ratio": "participation ratio of X_pre",
    "post_participation_ratio": "participation ratio of X_post",
    "pre_eee": "early eigenvalue enrichment of X_pre",
    "post_eee": "early eigenvalue enrichment of X_post",
    "js": "JS divergence, pre vs post spectrum (nats)",
    "pr_gain": "PR gain (PR_post / PR_pre)",
    "delta_eee": "EEE_post - EEE_pre",
}


def load_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def _series(scalars: dict, pattern: str) -> list[tuple[int, float]]:
    """A tag's series; `afb/*/x` averages layer series step by step."""
    if "*" not in pattern:
        return scalars.get(pattern, [])
    prefix, suffix = pattern.split("*")
    layers = [v for k, v in scalars.items() if k.startswith(prefix) and k.endswith(suffix)]
    if not layers:
        return []
    by_step: dict[int, list[float]] = {}
    for series in layers:
        for step, value in series:
            by_step.setdefault(step, []).append(value)
    return sorted((s, statistics.fmean(v)) for s, v in by_step.items())


def summarize(run_dir: str | Path) -> dict[str, float | None]:
    sc = load_scalars(run_dir)

    def last(tag):
        series = _series(sc, tag)
        return series[-1][1] if series else None

    val = [v for _, v in sc.get("val/loss", [])]
    norms = [v for _, v in sc.get("train/grad_norm", [])]
    return {
        "final val loss": last("val/loss"),
        "best val loss": min(val) if val else None,
        "token accuracy": last("val/token_accuracy"),
        "grad-norm CV": statistics.pstdev(norms) / statistics.fmean(norms) if len(norms) > 1 else None,
        "max grad norm": max(norms) if norms else None,
        "loss spikes": last("stability/loss_spikes"),
        "gate entropy": last("afb/*/gate_entropy"),
        "bias-corr. ratio": last("afb/*/bias_correction_ratio"),
        "PR gain": last("spectral/*/pr_gain"),
        "spectral JS": last("spectral/*/js"),
    }


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(summaries: dict[str, dict]) -> str:
    cols = list(next(iter(summaries.values())))
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(s[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    runs = {Path(r).name: Path(r) for r in run_dirs}
    missing = [str(p) for p in runs.values() if not (p / "tensorboard").is_dir()]
    if missing:  # checked before anything is written
        raise FileNotFoundError(f"no TensorBoard events under {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    scalars = {name: load_scalars(path) for name, path in runs.items()}
    summaries = {name: summarize(path) for name, path in runs.items()}
    for filename, (tag, title) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for name, sc in scalars.items():
            series = _series(sc, tag)
            if series:
                ax.plot(*zip(*series), label=name, linewidth=1.2)
                drawn += 1
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("step")
            if tag == "train/grad_norm":
                ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / filename, dpi=120)
        plt.close(fig)
    spectral = [f"![{title}]({f})" for f, title in _spectral_plots(plt, scalars, out)]
    report = out / "report.md"
    plots = "\n".join(f"![{t}]({f})" for f, (_, t) in PLOTS.items() if (out / f).exists())
    if spectral:
        plots += "\n\n## Spectral diagnostics (NerVE), per FFN layer\n\n" + "\n".join(spectral)
    report.write_text(f"# Study report\n\n{markdown_table(summaries)}\n\n{plots}\n")
    return report


def _spectral_plots(plt, scalars: dict[str, dict], out: Path) -> list[tuple[str, str]]:
    """One figure per spectral metric, one panel per layer, one line per run: (file, title) drawn."""
    drawn = []
    for metric, title in SPECTRAL_METRICS.items():
        suffix = f"/{metric}"
        layers = sorted({tag.split("/")[1] for sc in scalars.values() for tag in sc
                         if tag.startswith("spectral/") and tag.endswith(suffix) and tag.count("/") == 2})
        if not layers:
            continue
        cols = min(len(layers), 4)
        rows = math.ceil(len(layers) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.6, 2.4 * rows + 0.8), squeeze=False,
                                 sharex=True)
        for ax, layer in zip(axes.flat, layers):
            for name, sc in scalars.items():
                series = sc.get(f"spectral/{layer}{suffix}")
                if series:  # sparse points (a stride of tens to thousands of steps): mark them
                    ax.plot(*zip(*series), label=name, linewidth=1.0, marker="o", markersize=2.5)
            ax.set_title(layer, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.supxlabel("step", fontsize=9)
        fig.tight_layout()
        filename = f"spectral_{metric}.png"
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        drawn.append((filename, title))
    return drawn
