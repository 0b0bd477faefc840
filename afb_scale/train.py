"""The training loop: `afb-scale train --config ...` on every rank under torchrun.

Per step: this rank's micro-batches of the global batch -> one DeepSpeed step; every
`log_interval` a stdout line and TensorBoard scalars; every `eval_interval` validation loss,
perplexity and token accuracy, plus the AFB layer metrics on a fixed probe batch; every
`save_interval` (and at the end, and on preemption) a checkpoint.

Every step also appends one JSON line to `<run_dir>/metrics.jsonl` (rank 0) with the loss,
gradient norm and LR at full precision; a resumed run appends a `{"event": "resume"}` line and
then the steps after its checkpoint again, so the last record of each step is the run's history
(`read_metrics`).

A run directory with a checkpoint resumes from its newest complete one (checkpoint.py). Exit
status: 0 done; 75 (REQUEUE_EXIT_CODE) checkpointed after SIGTERM/SIGUSR1, requeue me;
3 (EXIT_NON_FINITE) stopped after `train.max_bad_steps` consecutive non-finite steps;
4 (watchdog.EXIT_STARTUP_TIMEOUT) a start-up phase took longer than `train.startup_timeout_s`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from afb_scale import checkpoint, testing_hooks
from afb_scale.config import Config, data_parallel_size, dump_config
from afb_scale.engine import Engine
from afb_scale.metrics.layer_metrics import ActivationDrift, collect_layer_stats, reduce_layer_stats
from afb_scale.metrics.run_logger import RunLogger, Throughput, format_duration
from afb_scale.metrics.spectral import probe_spectral_metrics, spectral_due
from afb_scale.metrics.stability import StabilityTracker
from afb_scale.metrics.throughput import RunPerformance
from afb_scale.model.self_guided import SelfGuidedSchedule
from afb_scale.parallel import any_rank, init_distributed
from afb_scale.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from afb_scale.watchdog import StartupWatchdog

BATCH_KEYS = ("tokens", "labels", "loss_mask")
EXIT_NON_FINITE = 3


class MetricsFile:
    """`<run_dir>/metrics.jsonl`: one JSON object per line, appended by rank 0 only."""

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
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


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


def rank_micro_batches(dataset, first_sample: int, cfg: Config, dp_rank: int, dp_size: int) -> list[dict]:
    """This data-parallel rank's share of the global batch starting at `first_sample`.

    The global batch is samples [first, first + G); rank d takes the d-th contiguous 1/DP of
    it, cut into micro-batches. The sample index is the whole data state: resuming at
    `consumed_samples` neither repeats nor skips a sample.
    """
    per_rank = cfg.train.global_batch_size // dp_size
    start = first_sample + dp_rank * per_rank
    mb = cfg.train.micro_batch_size
    out = []
    for m in range(per_rank // mb):
        samples = [dataset[i] for i in range(start + m * mb, start + (m + 1) * mb)]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS})
    return out


def _layer_metrics(engine: Engine, probe: list[dict], drift: ActivationDrift) -> dict[str, float]:
    """AFB layer metrics on the probe batch, gathered from every pipeline stage (collective)."""
    with collect_layer_stats(engine.module):
        engine.evaluate(probe)
    stats = reduce_layer_stats(engine.module, parallel_state.get_tensor_model_parallel_group())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats if parallel_state.get_tensor_model_parallel_rank() == 0 else {})
    merged = {k: v for part in gathered for k, v in part.items()}
    out = {}
    for name, moved in drift.update(merged).items():
        out[f"afb/{name}/activation_drift"] = moved
    for name, st in merged.items():
        out[f"afb/{name}/gate_entropy"] = st.gate_entropy
        out[f"afb/{name}/bias_correction_ratio"] = st.bias_correction_ratio
    return out


def run(cfg: Config, world_size: int) -> int:
    """Train according to a validated config; returns the process exit status."""
    t = cfg.train
    preemption = PreemptionFlag()  # first: a signal during start-up must not kill the job
    watchdog = StartupWatchdog(t.startup_timeout_s)
    with watchdog.phase("rendezvous"):
        init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline, seed=t.seed)
        dist.barrier()  # every rank is here: the groups work
    rank = dist.get_rank()
    print(f"afb-scale rank {rank}/{world_size} host={socket.gethostname()} "
          f"local_rank={os.environ.get('LOCAL_RANK', 0)}", flush=True)
    from afb_scale.data import build_datasets, samples_needed

    testing_hooks.setup()
    run_dir = Path(t.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    with watchdog.phase("checkpoint discovery"):
        dist.barrier()
        plan = checkpoint.resume_plan(cfg, world_size, run_dir)
    guide = SelfGuidedSchedule(cfg, world_size)  # structured kinds: the guide exists until its step
    with watchdog.phase("engine build"):
        engine = Engine(guide.engine_config(plan), world_size, initial_weights=plan.pop("weights", None) if plan else None)
    G = t.global_batch_size
    with watchdog.phase("dataset build"):
        train_ds, valid_ds, _ = build_datasets(cfg, samples_needed(cfg))
    dp_rank, dp = parallel_state.get_data_parallel_rank(), data_parallel_size(cfg, world_size)

    with watchdog.phase("checkpoint load"):
        state = checkpoint.load(engine, plan) if plan else {}
    step = state.get("step", 0)
    consumed = state.get("consumed_samples", 0)
    log = RunLogger(run_dir, enabled=rank == 0, tensorboard=cfg.metrics.tensorboard, start_step=step)
    metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=rank == 0)
    metrics.write({"event": "resume" if plan else "start", "step": step, "consumed_samples": consumed,
                   **({"checkpoint": plan["dir"].name} if plan else {})})
    valid_batches = [rank_micro_batches(valid_ds, i * G, cfg, dp_rank, dp) for i in range(t.eval_iters)]
    probe = [valid_batches[0][0]]  # the same tokens every time, so drift measures the model
    stability = StabilityTracker(cfg.metrics.grad_norm_window, cfg.metrics.loss_spike_factor)
    if "stability" in state:
        stability.grad_norms.extend(state["stability"]["grad_norms"])
        stability.losses.extend(state["stability"]["losses"])
        stability.spikes = state["stability"]["spikes"]
    drift = ActivationDrift()
    speed = Throughput(G * cfg.model.seq_length, t.steps, step)
    n_params = sum(p.numel() for p in engine.module.parameters())
    log.print(f"model: {cfg.model.ffn_kind}, {n_params:,} parameters on rank 0 "
              f"(TP={cfg.parallel.tensor} PP={cfg.parallel.pipeline} DP={dp} ZeRO={cfg.parallel.zero_stage}); "
              f"run dir {run_dir}")
    perf = RunPerformance(cfg, world_size, engine.device, logging_rank=rank == 0)  # TFLOP/s, MFU, memory
    log.print(f"MFU against: {perf.peak.label}")

    def evaluate(step: int) -> float:
        losses, accs = zip(*(engine.evaluate(b) for b in valid_batches))
        val_loss, acc = sum(losses) / len(losses), sum(accs) / len(accs)
        log.print(f"step {step:6d} | validation loss {val_loss:.4f} | perplexity {math.exp(min(val_loss, 50)):.2f} "
                  f"| token accuracy {acc:.4f}")
        log.scalars(step, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50)), "val/token_accuracy": acc})
        metrics.write({"step": step, "val_loss": val_loss, "val_token_accuracy": acc})
        if cfg.model.is_afb and cfg.metrics.layer_metrics_interval:
            log.scalars(step, _layer_metrics(engine, probe, drift))
        if step == 0 and spectral_due(step, cfg.metrics.spectral_interval, t.eval_interval):  # later: the loop
            log.scalars(step, probe_spectral_metrics(engine, probe))
        return val_loss

    def save() -> None:
        checkpoint.save(engine, run_dir, step, consumed, extra={"stability": {
            "grad_norms": list(stability.grad_norms), "losses": list(stability.losses), "spikes": stability.spikes}})

    def finish(status: int) -> int:
        log.close()
        metrics.close()
        return status

    first_step = contextlib.ExitStack()  # closed once the first step's collectives completed
    first_step.enter_context(watchdog.phase("first step"))
    first_val = evaluate(step) if step == 0 else None
    val_loss = first_val
    last_saved = step
    bad_steps: list[int] = []  # the current run of consecutive non-finite steps
    if "rng" in state:
        checkpoint.set_rng_state(state.pop("rng"))  # last, so nothing above draws from them
    while step < t.steps:
        engine = guide.on_step(engine, step)  # self-guided alpha; a new engine when the guide goes
        engine.loss_fn.inject_nan = testing_hooks.inject_nan(step + 1)
        result = engine.train_batch(rank_micro_batches(train_ds, consumed, cfg, dp_rank, dp))
        engine.loss_fn.inject_nan = False
        step += 1
        consumed += G
        loss_ok = math.isfinite(result.loss)
        # fp16: a skipped step with a finite loss is the loss scaler's overflow, part of normal training.
        bad = not loss_ok or (not result.applied and t.precision != "fp16")
        # One all-reduce agrees on both: a bad step anywhere, a signal on any rank.
        bad, preempted = any_rank(engine.device, bad, preemption.is_set)
        first_step.close()
        metrics.write({"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                       "loss_scale": result.loss_scale, "applied": result.applied, "consumed_samples": consumed})
        testing_hooks.kill_point("step", step)
        if bad:
            bad_steps.append(step)
            if result.applied:
                log.print(f"step {step}: non-finite loss {result.loss} was applied by the optimizer "
                          f"(precision {t.precision}); stopping. Last good checkpoint: {_last_good(run_dir)}")
                return finish(EXIT_NON_FINITE)
            log.print(f"step {step}: non-finite loss or gradient norm (loss {result.loss}, grad norm "
                      f"{result.grad_norm}); optimizer step skipped ({len(bad_steps)}/{t.max_bad_steps} in a row)")
            if len(bad_steps) >= t.max_bad_steps:
                log.print(f"stopping at step {step}: {len(bad_steps)} consecutive non-finite steps "
                          f"({', '.join(map(str, bad_steps))}; train.max_bad_steps={t.max_bad_steps}). "
                          f"Last good checkpoint: {_last_good(run_dir)}")
                return finish(EXIT_NON_FINITE)
        else:
            bad_steps = []
            snap = stability.update(result.loss, result.grad_norm)
            log.scalars(step, {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                               "train/loss_scale": result.loss_scale, "stability/grad_norm_variance": snap.grad_norm_variance,
                               "stability/grad_norm_cv": snap.grad_norm_cv, "stability/loss_spikes": snap.loss_spikes_total})
        if step % t.log_interval == 0 or step == t.steps:
            tokens_per_s, eta = speed.tick(step)
            perf_scalars, perf_text = perf.interval(tokens_per_s)  # a collective: every rank's memory
            log.scalars(step, {"train/tokens_per_s": tokens_per_s, **perf_scalars})
            norm = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
            log.print(f"step {step:6d}/{t.steps} | loss {result.loss:.4f} | lr {result.lr:.3e} | grad norm {norm} "
                      f"| {tokens_per_s:,.0f} tokens/s | {perf_text} | ETA {format_duration(eta)}")
        if cfg.metrics.layer_metrics_interval and cfg.model.is_afb and step % cfg.metrics.layer_metrics_interval == 0 \
                and step % t.eval_interval != 0:
            log.scalars(step, _layer_metrics(engine, probe, drift))
        if spectral_due(step, cfg.metrics.spectral_interval, t.eval_interval):
            log.scalars(step, probe_spectral_metrics(engine, probe))
        if step % t.eval_interval == 0 or step == t.steps:
            val_loss = evaluate(step)
        # No checkpoint inside a run of bad steps: the last good one stays the newest.
        if not bad_steps and (step % t.save_interval == 0 or step == t.steps):
            save()
            last_saved = step
        if preempted:
            if last_saved != step and not bad_steps:
                save()
                last_saved = step
            log.print(f"preempted by signal {preemption.received_name()}: checkpoint at step {last_saved} saved, "
                      f"exiting with {REQUEUE_EXIT_CODE} for requeue")
            return finish(REQUEUE_EXIT_CODE)
    finish(0)
    summary = f"training finished: {step} steps"
    if val_loss is not None:
        summary += f", validation loss {val_loss:.4f}"
    if first_val is not None:
        summary += f" (from {first_val:.4f} at step 0)"
    log.print(summary)
    log.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    log.print(f"checkpoint: {checkpoint.checkpoint_dir(run_dir) / checkpoint.tag_for(last_saved)}")
    return 0


def _last_good(run_dir: Path) -> str:
    latest = checkpoint.checkpoint_dir(run_dir) / checkpoint.LATEST
    return str(latest.parent / latest.read_text().strip()) if latest.is_file() else "none"
