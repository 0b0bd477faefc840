"""One run directory -> the numbers a study compares.

Read from what `afb-scale train` writes and nothing else: `metrics.jsonl` (per-step loss,
gradient norm, LR; validation loss and token accuracy at each evaluation; the last record of a
step wins, so a resumed run reads as one history), `config.yaml`, the TensorBoard events for
the AFB layer metrics (gate entropy, activation drift), and the study's own `study_run.json`.

Definitions (stated in every report):
- grad-norm variance / CV: over every finite training step after warm-up (population variance;
  CV = std / mean). The trainer's `stability/grad_norm_*` are trailing windows; these cover the run.
- loss spikes: afb_scale.metrics.stability.StabilityTracker replayed over the steps with the
  run's own window and factor (a loss above factor x the trailing median).
- activation drift: mean over probe evaluations and AFB layers of ||m_t - m_prev|| / ||m_prev||.
- gate entropy: the last probe evaluation's mean over AFB layers (1 = gates at init, 0 = saturated).
- diverged: the run stopped on non-finite losses (train.max_bad_steps in a row, exit 3), or any
  training loss or gradient norm was non-finite, or its final validation loss is above its initial
  one (step 0), or more than `divergence_margin` nats (default 1.0) above its best.
  A diverged run's final loss is replaced by its initial loss where a loss is compared (lr-sweep).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from afb_scale.studies.spec import RUN_META

STATUS_FILE = "study_status.json"


def read_records(run_dir: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training records, validation records) by step; the last record of each step wins."""
    train, val = {}, {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return train, val
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if "loss" in rec:
            train[rec["step"]] = rec
        elif "val_loss" in rec:
            val[rec["step"]] = rec
    return train, val


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def run_state(run_dir: str | Path) -> str:
    """new | partial | done | diverged (stopped on non-finite losses)."""
    d = Path(run_dir)
    status = d / STATUS_FILE
    if status.is_file():
        code = json.loads(status.read_text()).get("exit")
        if code == 0:
            return "done"
        if code == 3:
            return "diverged"
    train, val = read_records(d)
    if not train:
        return "new"
    cfg = _config(d).get("train", {})
    steps = cfg.get("steps")
    last = max(train)
    if steps is not None and last >= steps and last in val:
        return "done"
    bad_needed = cfg.get("max_bad_steps", 3)
    tail = [train[s] for s in sorted(train)[-bad_needed:]]
    if len(tail) == bad_needed and all(not _finite(r["loss"]) or not _finite(r.get("grad_norm")) for r in tail) \
            and last != steps:
        return "diverged"
    return "partial"


def _tb_scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            by_step = {e.step: e.value for e in events.Scalars(tag)}  # a redone step: the later value
            out[tag] = sorted(by_step.items())
    return out


def _layer_mean(series: dict[str, list[tuple[int, float]]], suffix: str) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for tag, points in series.items():
        if tag.endswith(suffix):
            for step, v in points:
                by_step.setdefault(step, []).append(v)
    return sorted((s, statistics.fmean(v)) for s, v in by_step.items())


def summarize(run_dir: str | Path, divergence_margin: float = 1.0) -> dict:
    """Everything a study table needs about one run, plus its curves for the plots."""
    d = Path(run_dir)
    meta = json.loads((d / RUN_META).read_text()) if (d / RUN_META).is_file() else {}
    cfg = _config(d)
    tcfg, mcfg, metrics_cfg = cfg.get("train", {}), cfg.get("model", {}), cfg.get("metrics", {})
    train, val = read_records(d)
    state = run_state(d)
    steps = sorted(train)
    losses = [train[s]["loss"] for s in steps]
    norms = [train[s].get("grad_norm") for s in steps]
    warmup = tcfg.get("warmup_steps", 0)
    post = [n for s, n in zip(steps, norms) if s > warmup and _finite(n)]
    nonfinite = any(not _finite(x) for x in losses) or any(n is not None and not _finite(n) for n in norms)
    val_steps = sorted(val)
    val_losses = [val[s]["val_loss"] for s in val_steps]
    initial = val[0]["val_loss"] if 0 in val else None
    final = val_losses[-1] if val_losses else None
    finite_val = [v for v in val_losses if _finite(v)]
    best = min(finite_val) if finite_val else None
    if state in ("done", "diverged"):
        diverged = (state == "diverged" or nonfinite or not _finite(final)
                    or (initial is not None and final > initial)
                    or (best is not None and final > best + divergence_margin))
    else:  # unfinished: only what has already happened counts
        diverged = nonfinite
    from afb_scale.metrics.stability import StabilityTracker

    tracker = StabilityTracker(metrics_cfg.get("grad_norm_window", 100), metrics_cfg.get("loss_spike_factor", 2.0))
    for loss, norm in zip(losses, norms):
        if _finite(loss):
            tracker.update(loss, norm if _finite(norm) else None)
    afb = _tb_scalars(d, "afb/")
    entropy = _layer_mean(afb, "/gate_entropy")
    drift = _layer_mean(afb, "/activation_drift")
    mean_norm = statistics.fmean(post) if post else None
    var = statistics.pvariance(post) if len(post) > 1 else None
    return {
        "name": meta.get("name", d.name), "dir": str(d), "state": state,
        "kind": meta.get("kind", mcfg.get("ffn_kind")), "seed": meta.get("seed", tcfg.get("seed")),
        "lr": meta.get("lr", tcfg.get("lr")), "lr_multiplier": meta.get("lr_multiplier"),
        "size": meta.get("size"), "params": meta.get("params"), "fit_params": meta.get("fit_params"),
        "flops_per_token": meta.get("flops_per_token"), "tokens": meta.get("tokens"),
        "initial_val_loss": initial, "final_val_loss": final, "best_val_loss": best,
        "token_accuracy": val[val_steps[-1]]["val_token_accuracy"] if val_steps else None,
        "grad_norm_variance": var, "grad_norm_cv": (var ** 0.5 / mean_norm) if var is not None and mean_norm else None,
        "loss_spikes": tracker.spikes, "max_grad_norm": max(post) if post else None,
        "activation_drift": statistics.fmean(v for _, v in drift) if drift else None,
        "gate_entropy": entropy[-1][1] if entropy else None,
        "diverged": bool(diverged),
        "curves": {"loss": list(zip(steps, losses)), "grad_norm": list(zip(steps, norms)),
                   "val_loss": list(zip(val_steps, val_losses)), "gate_entropy": entropy},
    }


def find_runs(root: str | Path, started_only: bool = True) -> list[Path]:
    """Run directories under a study root: those with a study_run.json (and, by default, at least
    one training record), in name order."""
    dirs = sorted(p.parent for p in Path(root).glob(f"*/{RUN_META}"))
    return [d for d in dirs if not started_only or run_state(d) != "new"]
