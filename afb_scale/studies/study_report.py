"""`afb-scale study report RUN_ROOT`: a study's markdown report and PNG plots, from its run
directories alone (each run's metrics.jsonl, config.yaml, TensorBoard events and study_run.json,
and the root's study.yaml).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from afb_scale.config import STRUCTURED_FFN_KINDS, ConfigError
from afb_scale.studies import collect, stats
from afb_scale.studies.spec import STUDY_COPY

# Each AFB and structured kind is compared with the dense FFN it modifies (paired differences,
# FLOPs per token at the same size).
BASE_OF = {"afb-gelu": "gelu", "afb-swiglu": "swiglu", **{k: k.split("-")[1] for k in STRUCTURED_FFN_KINDS}}
KIND_COLORS = {"gelu": "tab:blue", "afb-gelu": "tab:cyan", "swiglu": "tab:red", "afb-swiglu": "tab:orange",
               "lowrank-gelu": "tab:green", "blockdense-gelu": "tab:olive", "blockshuffle-gelu": "tab:purple",
               "lowrank-swiglu": "tab:brown", "blockdense-swiglu": "tab:pink", "blockshuffle-swiglu": "tab:gray"}
DPI = 80

DEFINITIONS = """\
**How to read this.** Intervals are 95% percentile-bootstrap intervals of the mean over seeds
(2000 resamples of the seeds with replacement, generator seed 0); with a few seeds (1-3 here) such an
interval cannot be wider than the seeds' range and is a rough guide, not a test. `n` is the number of runs
with a finite value. Definitions: validation loss / token accuracy at the last evaluation (best:
the lowest over evaluations); grad-norm variance and CV (std/mean) over all finite steps after
warm-up; loss spikes: steps whose loss exceeds the run's `metrics.loss_spike_factor` x the trailing
median (the trainer's own tracker replayed over metrics.jsonl); max grad norm: after warm-up, as
logged (`train/grad_norm`, the global norm before clipping); activation drift: mean over probe
evaluations and AFB layers of ||m_t - m_prev|| / ||m_prev|| (m: the probe batch's mean
activation); gate entropy: mean over AFB layers at the last probe (1 = every gate at its initial
value, 0 = saturated). A run is **diverged** if it stopped on non-finite losses (exit 3), logged
any non-finite loss or gradient norm, ended with a validation loss above its step-0 value, or
ended more than `divergence_margin` nats (default 1.0) above its own best validation loss.
"""


def _load(root: Path) -> tuple[dict, list[dict]]:
    spec_path = root / STUDY_COPY
    if not root.is_dir():
        raise ConfigError(f"study run root {str(root)!r} does not exist")
    if not spec_path.is_file():
        raise ConfigError(f"{str(root)!r} has no {STUDY_COPY}: not a study run root (afb-scale study ... --run "
                          "or --submit writes it)")
    spec = yaml.safe_load(spec_path.read_text()) or {}
    margin = float(spec.get("divergence_margin", 1.0))
    dirs = collect.find_runs(root)
    if not dirs:
        raise ConfigError(f"{str(root)!r} has no started runs (run directories with {collect.RUN_META} and "
                          "a metrics.jsonl)")
    return spec, [collect.summarize(d, margin) for d in dirs]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kinds(runs: list[dict]) -> list[str]:
    order = ["gelu", "afb-gelu", "swiglu", "afb-swiglu"]
    present = {r["kind"] for r in runs}
    return [k for k in order if k in present] + sorted(present - set(order))


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _states(runs: list[dict]) -> str:
    counts = defaultdict(int)
    for r in runs:
        counts[r["state"]] += 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def _band_plot(plt, groups: dict, curve: str, title: str, path: Path, logy: bool = False) -> bool:
    """groups: panel title -> kind -> [runs]; one band (min..max over seeds) and mean line per kind."""
    panels = [p for p in groups if any(r["curves"][curve] for runs in groups[p].values() for r in runs)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.4, 3.2), squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        for kind, runs in groups[panel].items():
            series = [dict(r["curves"][curve]) for r in runs if r["curves"][curve]]
            if not series:
                continue
            steps = sorted(set().union(*series))
            vals = np.array([[s.get(t, np.nan) if s.get(t) is not None else np.nan for t in steps] for s in series],
                            dtype=float)
            vals[~np.isfinite(vals)] = np.nan
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
            color = KIND_COLORS.get(kind)
            ax.plot(steps, mean, color=color, linewidth=1.1, label=f"{kind} (n={len(series)})")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if logy:
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title} (line: mean over seeds; band: min..max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# stability

STAB_COLUMNS = [("final_val_loss", "final val loss"), ("best_val_loss", "best val loss"),
                ("token_accuracy", "token acc."), ("grad_norm_variance", "grad-norm var."),
                ("grad_norm_cv", "grad-norm CV"), ("loss_spikes", "loss spikes"), ("max_grad_norm", "max grad norm"),
                ("activation_drift", "act. drift"), ("gate_entropy", "gate entropy")]


def _stability(spec: dict, runs: list[dict], out: Path) -> str:
    plt = _plt()
    kinds = _kinds(runs)
    mults = sorted({r["lr_multiplier"] for r in runs})
    cell = defaultdict(list)
    for r in runs:
        cell[(r["kind"], r["lr_multiplier"])].append(r)
    nominal = runs[0].get("lr") / runs[0]["lr_multiplier"] if runs[0].get("lr_multiplier") else None
    parts = []
    groups = {"losses": ["final_val_loss", "best_val_loss", "token_accuracy"],
              "gradients": ["grad_norm_variance", "grad_norm_cv", "loss_spikes", "max_grad_norm"],
              "AFB layer metrics": ["activation_drift", "gate_entropy"]}
    names = dict(STAB_COLUMNS)
    for title, cols in groups.items():
        rows = []
        for k in kinds:
            if title == "AFB layer metrics" and not k.startswith("afb-"):
                continue
            for m in mults:
                rs = cell[(k, m)]
                if not rs:
                    continue
                div = sum(r["diverged"] for r in rs)
                rows.append([k, f"{m:g}x ({rs[0]['lr']:.3g})", str(len(rs)), f"{div}/{len(rs)}"]
                            + [stats.bootstrap_mean([r[c] for r in rs]).fmt() for c in cols])
        parts.append(f"### Per kind and LR: {title}\n\n"
                     + _table(["kind", "LR", "runs", "diverged"] + [names[c] for c in cols], rows))
    diff_rows = []
    diff_cols = ["final_val_loss", "best_val_loss", "token_accuracy", "grad_norm_variance", "grad_norm_cv",
                 "loss_spikes", "max_grad_norm", "diverged"]
    for afb, base in BASE_OF.items():
        if afb not in kinds or base not in kinds:
            continue
        for m in mults:
            a = {r["seed"]: r for r in cell[(afb, m)]}
            b = {r["seed"]: r for r in cell[(base, m)]}
            if not (set(a) & set(b)):
                continue

            def val(r, c):
                v = r[c]
                return float(v) if v is not None else None

            diff_rows.append([f"{afb} - {base}", f"{m:g}x", str(len(set(a) & set(b)))] + [
                stats.paired_difference({s: val(r, c) for s, r in a.items()}, {s: val(r, c) for s, r in b.items()}).fmt()
                for c in diff_cols])
    if diff_rows:
        parts.append("### Paired differences, AFB minus its base (same seed: same data order)\n\n"
                     "Negative loss / variance / CV / spike / divergence differences favour AFB; a positive token "
                     "accuracy difference does. An interval that contains 0 means no difference was resolved.\n\n"
                     + _table(["pair", "LR", "seeds"] + [names.get(c, "diverged (fraction)") for c in diff_cols],
                              diff_rows))
    figs = []
    by_lr = {f"LR {m:g}x ({cell[(kinds[0], m)][0]['lr']:.3g})" if cell[(kinds[0], m)] else f"LR {m:g}x":
             {k: cell[(k, m)] for k in kinds} for m in mults}
    for fname, curve, title, logy in (("loss.png", "loss", "training loss", False),
                                      ("val_loss.png", "val_loss", "validation loss", False),
                                      ("grad_norm.png", "grad_norm", "gradient norm", True),
                                      ("gate_entropy.png", "gate_entropy", "mean gate entropy, AFB layers", False)):
        if _band_plot(plt, by_lr, curve, title, out / fname, logy):
            figs.append(f"![{title}]({fname})")
    head = (f"Kinds {', '.join(kinds)} x LR multipliers {', '.join(f'{m:g}' for m in mults)} of the nominal "
            f"{nominal:.3g} x seeds {sorted({r['seed'] for r in runs})}." if nominal else "")
    return head + "\n\n" + "\n\n".join(parts) + "\n\n## Plots\n\n" + "\n".join(figs)


# ----------------------------------------------------------------------------------------------
# lr-sweep

def _lr_sweep(spec: dict, runs: list[dict], out: Path) -> str:
    plt = _plt()
    kinds = _kinds(runs)
    lrs = sorted({r["lr"] for r in runs})
    rank_rows, grid_rows = [], []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k in kinds:
        rs = [r for r in runs if r["kind"] == k]
        initial = {r["seed"]: r["initial_val_loss"] for r in rs if r["initial_val_loss"] is not None}
        # a diverged run's loss is its initial loss (min(L, L0) caps it there anyway)
        losses = {lr: {r["seed"]: (r["initial_val_loss"] if r["diverged"] else r["final_val_loss"])
                       for r in rs if r["lr"] == lr} for lr in lrs}
        losses = {lr: by for lr, by in losses.items() if by}  # an LR not yet run is not a diverged one
        sens = stats.lr_sensitivity_interval(losses, initial)
        curve = {lr: np.mean([min(v, initial[s]) for s, v in by.items() if v is not None and s in initial])
                 for lr, by in losses.items() if by}
        best_lr = min(curve, key=curve.get)
        div = sum(r["diverged"] for r in rs)
        rank_rows.append((sens.mean, [k, sens.fmt(), f"{curve[best_lr]:.4g}", f"{best_lr:.3g}",
                                      f"{np.mean(list(initial.values())):.4g}", f"{div}/{len(rs)}"]))
        grid_rows.append([k] + [stats.bootstrap_mean([r["final_val_loss"] for r in rs if r["lr"] == lr]).fmt()
                                + (f" ({sum(r['diverged'] for r in rs if r['lr'] == lr)} div.)"
                                   if any(r["diverged"] for r in rs if r["lr"] == lr) else "") for lr in lrs])
        xs = sorted(curve)
        per_seed = np.array([[min(losses[lr].get(s, np.nan), initial[s]) for lr in xs] for s in sorted(initial)])
        color = KIND_COLORS.get(k)
        ax.plot(xs, [curve[x] for x in xs], marker="o", markersize=3, color=color, label=f"{k} (sens. {sens.mean:.3f})")
        ax.fill_between(xs, np.nanmin(per_seed, 0), np.nanmax(per_seed, 0), color=color, alpha=0.2, linewidth=0)
    l0 = np.mean([r["initial_val_loss"] for r in runs if r["initial_val_loss"] is not None])
    ax.axhline(l0, color="grey", linestyle="--", linewidth=0.8, label=f"loss at initialisation ({l0:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss, min(L, L0)")
    ax.set_title("final loss vs LR (line: mean over seeds; band: min..max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_lr.png", dpi=DPI)
    plt.close(fig)
    rank_rows.sort(key=lambda t: t[0])
    ranked = [[str(i + 1)] + row for i, (_, row) in enumerate(rank_rows)]
    return (f"Kinds {', '.join(kinds)} x {len(lrs)} LRs ({', '.join(f'{x:.3g}' for x in lrs)}) x seeds "
            f"{sorted({r['seed'] for r in runs})}.\n\n"
            "**LR sensitivity** (Wortsman et al. 2023): the mean over the LRs of [min(L(lr), L0) - L*], with L(lr) "
            "the final validation loss (mean over seeds; a diverged run counts as L0), L0 the loss at "
            "initialisation (step 0) and L* the best L(lr) of the kind. Lower is less sensitive. The interval "
            "resamples whole seeds (each seed's curve over the LRs together).\n\n"
            "### Kinds ranked by LR sensitivity\n\n"
            + _table(["rank", "kind", "LR sensitivity [95% CI]", "L* (best mean loss)", "best LR", "L0", "diverged"],
                     ranked)
            + "\n\n### Final validation loss per LR (mean [95% CI] over seeds)\n\n"
            + _table(["kind"] + [f"{x:.3g}" for x in lrs], grid_rows)
            + "\n\n## Plot\n\n![final loss vs LR](loss_vs_lr.png)")


# ----------------------------------------------------------------------------------------------
# scaling

def _scaling(spec: dict, runs: list[dict], out: Path) -> str:
    plt = _plt()
    kinds = _kinds(runs)
    targets = [float(t) for t in spec.get("extrapolate_to") or []]
    ratio = spec.get("tokens_per_parameter", 20)
    convention = "all parameters" if spec.get("count_embeddings", True) else "non-embedding parameters"
    size_rows, fit_rows, extra_rows = [], [], []
    fig_n, ax_n = plt.subplots(figsize=(5.6, 4.0))
    fig_c, ax_c = plt.subplots(figsize=(5.6, 4.0))
    base_fpt = {(r["size"], r["kind"]): r["flops_per_token"] for r in runs}
    for k in kinds:
        # finished, not diverged: a partial run's loss is not the loss of its token budget
        rs = [r for r in runs if r["kind"] == k and r["state"] == "done" and not r["diverged"]
              and r["final_val_loss"] is not None]
        by_size = defaultdict(list)
        for r in rs:
            by_size[r["size"]].append(r)
        pts_n, pts_c = {}, {}
        for size, group in sorted(by_size.items(), key=lambda t: t[1][0]["fit_params"]):
            n = float(group[0]["fit_params"])
            c = float(group[0]["flops_per_token"] * group[0]["tokens"])
            losses = [g["final_val_loss"] for g in group]
            pts_n[n], pts_c[c] = losses, losses
            base = base_fpt.get((size, BASE_OF.get(k, k)))
            size_rows.append([size, k, f"{n:.3g}", f"{group[0]['params']:.3g}", f"{group[0]['tokens']:.3g}",
                              f"{c:.3g}", f"{group[0]['flops_per_token'] / base:.3f}" if base else "-",
                              str(len(group)), stats.bootstrap_mean(losses).fmt()])
        color = KIND_COLORS.get(k)
        for ax, pts in ((ax_n, pts_n), (ax_c, pts_c)):
            xs = sorted(pts)
            ax.errorbar(xs, [np.mean(pts[x]) for x in xs],
                        yerr=[[np.mean(pts[x]) - min(pts[x]) for x in xs], [max(pts[x]) - np.mean(pts[x]) for x in xs]],
                        fmt="o", color=color, markersize=4, capsize=2, label=k)
        if len(pts_n) < 3:
            fit_rows.append([k, "-", "-", "-", "-", f"fewer than 3 sizes ({len(pts_n)})"])
            continue
        for label, pts, ax in (("L(N)", pts_n, ax_n), ("L(C)", pts_c, ax_c)):
            res = stats.bootstrap_power_law(pts, targets if label == "L(N)" else ())
            f = res.fit
            fit_rows.append([k, label, res.E.fmt(), f"{f.A:.4g}", res.alpha.fmt(), res.method])
            xs = np.geomspace(min(pts), max(pts), 50)
            ax.plot(xs, f(xs), color=color, linewidth=1.0)
            if label == "L(N)":
                for t, iv in res.predictions.items():
                    extra_rows.append([k, f"{t:.3g}", iv.fmt(), f"{t / max(pts):.3g}x"])
    for ax, fig, xl, name in ((ax_n, fig_n, f"N ({convention})", "loss_vs_params.png"),
                              (ax_c, fig_c, "training FLOPs C (afb_scale.cost, x tokens)", "loss_vs_flops.png")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("final validation loss")
        ax.set_title("points: mean (bars: min..max over seeds); lines: E + A x^-alpha", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
    text = (f"Sizes {', '.join(sorted({r['size'] for r in runs}, key=lambda s: min(r['fit_params'] for r in runs if r['size'] == s)))}"
            f" x kinds {', '.join(kinds)} x seeds {sorted({r['seed'] for r in runs})}; each run trains on "
            f"{ratio:g} tokens per parameter (N counts {convention}). C = training FLOPs per token "
            "(afb_scale/cost.py: matmuls, forward x 3) x tokens; FLOPs/token vs base: an AFB or structured kind's "
            "against its dense base at the same size (a structured kind's without its self-guided guide). Only finished, non-diverged runs enter the table and the fits.\n\n"
            "### Runs per size\n\n"
            + _table(["size", "kind", "N", "all params", "tokens", "C (FLOPs)", "FLOPs/token vs base", "runs",
                      "final val loss [95% CI]"], size_rows)
            + "\n\n### Fits L = E + A x^-alpha (least squares on the seed means; intervals: bootstrap)\n\n"
            + _table(["kind", "fit", "E [95% CI]", "A", "alpha [95% CI]", "interval method"], fit_rows))
    if extra_rows:
        text += ("\n\n### EXTRAPOLATION (beyond the fitted range; not a measurement)\n\n"
                 "The L(N) fit evaluated far outside the sizes it saw. Treat the interval as the fit's own "
                 "uncertainty only: it does not cover a change of regime between the fitted sizes and the target.\n\n"
                 + _table(["kind", "N (extrapolated to)", "predicted loss [95% CI]", "x largest fitted N"], extra_rows))
    return text + "\n\n## Plots\n\n![loss vs parameters](loss_vs_params.png)\n![loss vs FLOPs](loss_vs_flops.png)"


WRITERS = {"stability": _stability, "lr-sweep": _lr_sweep, "scaling": _scaling}


def write_study_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    root = Path(root)
    spec, runs = _load(root)
    kind = spec.get("study")
    if kind not in WRITERS:
        raise ConfigError(f"{root / STUDY_COPY}: study={kind!r} is not one of {', '.join(WRITERS)}")
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    finished = [r for r in runs if r["state"] in ("done", "diverged")]
    if not finished:
        raise ConfigError(f"{str(root)!r} has no finished runs yet")
    body = WRITERS[kind](spec, finished, out)  # a partial run's loss is not the loss of its budget
    incomplete = [r["name"] for r in runs if r["state"] not in ("done", "diverged")]
    planned = len(collect.find_runs(root, started_only=False))
    warn = (f"\n**Incomplete:** {planned - len(finished)} of {planned} runs not finished"
            + (f" ({len(incomplete)} started: {', '.join(incomplete[:6])}{', ...' if len(incomplete) > 6 else ''})"
               if incomplete else "")
            + "; the tables and plots use the finished runs only. Run the study's command again to continue.\n"
            if planned > len(finished) else "")
    text = (f"# {kind} study: {root.name}\n\nStudy file: `{spec.get('study_file', '?')}`; run root `{root}`; "
            f"{len(runs)} runs ({_states(runs)}). Regenerate with `afb-scale study report {root}`.\n{warn}\n"
            f"{body}\n\n{DEFINITIONS}")
    path = out / "report.md"
    path.write_text(text)
    return path
