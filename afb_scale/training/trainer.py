"""The training loop: `afb-scale train --config ...` on every rank under torchrun.

`run` starts a `Trainer` (process groups, checkpoint discovery, engine, datasets, checkpoint
load: each a watched start-up phase) and trains. Per step: this rank's micro-batches of the
global batch -> one DeepSpeed step; every `log_interval` a stdout line and TensorBoard scalars;
every `eval_interval` validation loss, perplexity and token accuracy, plus the AFB layer metrics
on a fixed probe batch; every `save_interval` (and at the end, and on preemption) a checkpoint.

Every step also appends one JSON line to `<run_dir>/metrics.jsonl` (rank 0) with the loss,
gradient norm and LR at full precision; a resumed run appends a `{"event": "resume"}` line and
then the steps after its checkpoint again, so the last record of each step is the run's history
(metrics/metrics_file.py `read_metrics`).

What survives a resume is `Trainer.components()` -- the data position, the stability window and
the activation-drift reference, each with `state_dict()` / `load_state_dict()` -- plus
DeepSpeed's state and every rank's RNG (checkpoint.py). Callbacks (`Callback`) are the hook
point for code that is not the framework's: logging elsewhere, custom stopping, fault injection.

Exit status: 0 done; 75 (REQUEUE_EXIT_CODE) checkpointed after SIGTERM/SIGUSR1, requeue me;
3 (EXIT_NON_FINITE) stopped after `train.max_bad_steps` consecutive non-finite steps (or one
that the optimizer applied); 4 (watchdog.EXIT_STARTUP_TIMEOUT) a start-up phase took too long.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from afb_scale.config import Config, dump_config
from afb_scale.data.batches import TrainBatches, rank_micro_batches
from afb_scale.metrics.layer_metrics import ActivationDrift, collect_layer_stats, reduce_layer_stats
from afb_scale.metrics.metrics_file import MetricsFile
from afb_scale.metrics.run_logger import RunLogger, Throughput, format_duration
from afb_scale.metrics.spectral import probe_spectral_metrics, spectral_due
from afb_scale.metrics.stability import StabilityTracker
from afb_scale.metrics.throughput import RunPerformance
from afb_scale.model.self_guided import SelfGuidedSchedule
from afb_scale.parallel.groups import any_rank, init_distributed
from afb_scale.parallel.layout import ParallelLayout
from afb_scale.training import checkpoint
from afb_scale.training.engine import Engine, StepResult
from afb_scale.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from afb_scale.training.watchdog import StartupWatchdog

EXIT_NON_FINITE = 3


class Callback:
    """Override any of these; each is called on every rank, at the same point of every step.

    on_start: after the checkpoint (if any) is loaded, before the first step (collectives allowed).
    on_step_begin: before step `trainer.step + 1` runs. on_step_end: after it (its result; the
    metrics record is written, logging, evaluation and checkpointing for it have not run yet).
    """

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_step_begin(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None: ...


class NonFinitePolicy:
    """Skip non-finite steps (the optimizer already did), stop after `max_bad` in a row, or at
    once if one was applied. No checkpoint is taken inside a run of bad steps."""

    def __init__(self, max_bad: int, precision: str):
        self.max_bad, self.precision = max_bad, precision
        self.run: list[int] = []  # the current run of consecutive non-finite steps

    def is_bad(self, result: StepResult) -> bool:
        # fp16: a skipped step with a finite loss is the loss scaler's overflow, part of normal training.
        return not math.isfinite(result.loss) or (not result.applied and self.precision != "fp16")

    def verdict(self, step: int, bad: bool, result: StepResult) -> Optional[str]:
        """None: go on. Otherwise the reason to stop (bad is agreed across ranks)."""
        if not bad:
            self.run = []
            return None
        self.run.append(step)
        if result.applied:
            return f"non-finite loss {result.loss} was applied by the optimizer (precision {self.precision})"
        if len(self.run) >= self.max_bad:
            return (f"{len(self.run)} consecutive non-finite steps ({', '.join(map(str, self.run))}; "
                    f"train.max_bad_steps={self.max_bad})")
        return None

    @property
    def in_bad_run(self) -> bool:
        return bool(self.run)


@dataclass
class Startup:
    """What `Trainer.start` set up before the trainer exists."""

    preemption: PreemptionFlag  # installed first: a signal during start-up must not kill the job
    watchdog: StartupWatchdog  # its last phase is the first step
    guide: SelfGuidedSchedule  # self-guided alpha and the guide's removal (a no-op for other kinds)
    plan: Optional[checkpoint.ResumePlan]  # what the run resumes from (None: fresh)
    restored: Optional[checkpoint.Restored]


class Trainer:
    """One training run on this rank; build it with `Trainer.start`."""

    def __init__(self, cfg: Config, layout: ParallelLayout, engine: Engine, batches: TrainBatches,
                 valid_ds, startup: Startup, callbacks: Sequence[Callback] = ()):
        t = cfg.train
        self.cfg, self.layout, self.engine, self.batches = cfg, layout, engine, batches
        self.startup, self.callbacks = startup, list(callbacks)
        self.run_dir = Path(t.run_dir)
        self.step = startup.restored.step if startup.restored else 0
        self.valid_batches = [rank_micro_batches(valid_ds, i * t.global_batch_size, t.global_batch_size,
                                                 t.micro_batch_size, layout.data_rank, layout.data)
                              for i in range(t.eval_iters)]
        self.probe = [self.valid_batches[0][0]]  # the same tokens every time, so drift measures the model
        self.stability = StabilityTracker(cfg.metrics.grad_norm_window, cfg.metrics.loss_spike_factor)
        self.drift = ActivationDrift()
        self.non_finite = NonFinitePolicy(t.max_bad_steps, t.precision)
        logging_rank = layout.rank == 0
        self.log = RunLogger(self.run_dir, enabled=logging_rank, tensorboard=cfg.metrics.tensorboard,
                             start_step=self.step)
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", enabled=logging_rank)
        self.speed = Throughput(t.global_batch_size * cfg.model.seq_length, t.steps, self.step)
        self.perf = RunPerformance(cfg, layout.world_size, engine.device, logging_rank=logging_rank)
        self.last_saved = self.step
        self.first_val: Optional[float] = None
        self.val_loss: Optional[float] = None

    # -- what a checkpoint carries besides DeepSpeed's state and the RNG ---------------------

    def components(self) -> dict:
        return {"data": self.batches, "stability": self.stability, "drift": self.drift}

    def load_components(self, states: dict) -> None:
        for name, component in self.components().items():
            if name in states:
                component.load_state_dict(states[name])

    # -- start-up ---------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: Config, world_size: int, callbacks: Sequence[Callback] = ()) -> "Trainer":
        """Every start-up phase under the watchdog; returns a trainer at its resume point."""
        preemption = PreemptionFlag()  # first: a signal during start-up must not kill the job
        watchdog = StartupWatchdog(cfg.train.startup_timeout_s)
        with watchdog.phase("rendezvous"):
            layout = init_distributed(cfg.parallel, seed=cfg.train.seed)
            dist.barrier()  # every rank is here: the groups work
        print(f"afb-scale rank {layout.rank}/{world_size} host={socket.gethostname()} "
              f"local_rank={os.environ.get('LOCAL_RANK', 0)}", flush=True)
        from afb_scale.data.datasets import build_datasets, samples_needed

        if layout.rank == 0:
            Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
            dump_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
        with watchdog.phase("checkpoint discovery"):
            dist.barrier()
            plan = checkpoint.resume_plan(cfg, layout, cfg.train.run_dir)
        guide = SelfGuidedSchedule(cfg, layout)  # structured kinds: the guide exists until its step
        with watchdog.phase("engine build"):
            engine = Engine(guide.engine_config(plan), layout, initial_weights=plan.weights if plan else None)
        with watchdog.phase("dataset build"):
            train_ds, valid_ds, _ = build_datasets(cfg, samples_needed(cfg))
        with watchdog.phase("checkpoint load"):
            restored = checkpoint.load(engine, plan) if plan else None
        t = cfg.train
        batches = TrainBatches(train_ds, t.global_batch_size, t.micro_batch_size, layout.data_rank, layout.data,
                               consumed_samples=restored.consumed_samples if restored else 0)
        return cls(cfg, layout, engine, batches, valid_ds, Startup(preemption, watchdog, guide, plan, restored),
                   callbacks)

    def _announce(self) -> None:
        cfg, plan = self.cfg, self.startup.plan
        self.metrics.write({"event": "resume" if plan else "start", "step": self.step,
                            "consumed_samples": self.batches.consumed_samples,
                            **({"checkpoint": plan.dir.name} if plan else {})})
        n_params = sum(p.numel() for p in self.engine.module.parameters())
        self.log.print(f"model: {cfg.model.ffn_kind}, {n_params:,} parameters on rank 0 ({self.layout.describe()}); "
                       f"run dir {self.run_dir}")
        self.log.print(f"MFU against: {self.perf.peak.label}")

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> int:
        """Train to `train.steps`; returns the process exit status."""
        self._announce()
        if self.startup.restored is not None:
            self.load_components(self.startup.restored.components)
        for cb in self.callbacks:
            cb.on_start(self)
        first_step = contextlib.ExitStack()  # closed once the first step's collectives completed
        first_step.enter_context(self.startup.watchdog.phase("first step"))
        if self.step == 0:
            self.first_val = self.val_loss = self.evaluate()
        if self.startup.restored is not None and self.startup.restored.rng is not None:
            checkpoint.set_rng_state(self.startup.restored.rng)  # last, so nothing above draws from them
        try:
            while self.step < self.cfg.train.steps:
                status = self.train_step(first_step)
                if status is not None:
                    return status
            return self._finish()
        finally:
            self.batches.close()
            self.log.close()
            self.metrics.close()

    def train_step(self, first_step: contextlib.ExitStack) -> Optional[int]:
        """One step and everything due after it; an exit status when the run must stop."""
        for cb in self.callbacks:
            cb.on_step_begin(self)
        # self-guided alpha; a new engine at the step the guide goes
        self.engine = self.startup.guide.on_step(self.engine, self.step)
        result = self.engine.train_batch(self.batches.next())
        self.step += 1
        # The one per-step host decision: both flags in one all-reduce (a bad step anywhere, a
        # signal on any rank). loss/applied were already read back by train_batch.
        bad, preempted = any_rank(self.engine.device, self.non_finite.is_bad(result),
                                  self.startup.preemption.is_set)
        first_step.close()
        self.metrics.write({"step": self.step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                            "loss_scale": result.loss_scale, "applied": result.applied,
                            "consumed_samples": self.batches.consumed_samples})
        for cb in self.callbacks:
            cb.on_step_end(self, result)
        stop = self.non_finite.verdict(self.step, bad, result)
        if bad and not result.applied:
            self.log.print(f"step {self.step}: non-finite loss or gradient norm (loss {result.loss}, grad norm "
                           f"{result.grad_norm}); optimizer step skipped "
                           f"({len(self.non_finite.run)}/{self.non_finite.max_bad} in a row)")
        if stop is not None:
            self.log.print(f"stopping at step {self.step}: {stop}. Last good checkpoint: {self._last_good()}")
            self.metrics.flush()
            return EXIT_NON_FINITE
        if not bad:
            self._record_stability(result)
        self._after_step(result)
        if preempted:
            return self._preempt()
        return None

    def _record_stability(self, result: StepResult) -> None:
        snap = self.stability.update(result.loss, result.grad_norm)
        self.log.scalars(self.step, {
            "train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
            "train/loss_scale": result.loss_scale, "stability/grad_norm_variance": snap.grad_norm_variance,
            "stability/grad_norm_cv": snap.grad_norm_cv, "stability/loss_spikes": snap.loss_spikes_total})

    def _after_step(self, result: StepResult) -> None:
        """The cadences: progress line, layer and spectral probes, evaluation, checkpoint."""
        t, m, step = self.cfg.train, self.cfg.metrics, self.step
        last = step == t.steps
        if step % t.log_interval == 0 or last:
            self._log_progress(result)
        if m.layer_metrics_interval and self.cfg.model.is_afb and step % m.layer_metrics_interval == 0 \
                and step % t.eval_interval != 0:
            self.log.scalars(step, self._layer_metrics())
        if spectral_due(step, m.spectral_interval, t.eval_interval):
            self.log.scalars(step, probe_spectral_metrics(self.engine, self.probe))
        if step % t.eval_interval == 0 or last:
            self.val_loss = self.evaluate()
        if not self.non_finite.in_bad_run and (step % t.save_interval == 0 or last):
            self.save()

    def _log_progress(self, result: StepResult) -> None:
        tokens_per_s, eta = self.speed.tick(self.step)
        perf_scalars, perf_text = self.perf.interval(tokens_per_s)  # a collective: every rank's memory
        self.log.scalars(self.step, {"train/tokens_per_s": tokens_per_s, **perf_scalars})
        norm = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
        self.log.print(f"step {self.step:6d}/{self.cfg.train.steps} | loss {result.loss:.4f} | lr {result.lr:.3e} "
                       f"| grad norm {norm} | {tokens_per_s:,.0f} tokens/s | {perf_text} | ETA {format_duration(eta)}")
        self.metrics.flush()

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Validation loss / perplexity / token accuracy, and the probes due with it (collective)."""
        losses, accs = zip(*(self.engine.evaluate(b) for b in self.valid_batches))
        val_loss, acc = sum(losses) / len(losses), sum(accs) / len(accs)
        ppl = math.exp(min(val_loss, 50))
        self.log.print(f"step {self.step:6d} | validation loss {val_loss:.4f} | perplexity {ppl:.2f} "
                       f"| token accuracy {acc:.4f}")
        self.log.scalars(self.step, {"val/loss": val_loss, "val/perplexity": ppl, "val/token_accuracy": acc})
        self.metrics.write({"step": self.step, "val_loss": val_loss, "val_token_accuracy": acc})
        if self.cfg.model.is_afb and self.cfg.metrics.layer_metrics_interval:
            self.log.scalars(self.step, self._layer_metrics())
        if self.step == 0 and spectral_due(0, self.cfg.metrics.spectral_interval, self.cfg.train.eval_interval):
            self.log.scalars(self.step, probe_spectral_metrics(self.engine, self.probe))
        return val_loss

    def _layer_metrics(self) -> dict[str, float]:
        """AFB layer metrics on the probe batch, gathered from every pipeline stage (collective)."""
        with collect_layer_stats(self.engine.module):
            self.engine.evaluate(self.probe)
        stats = reduce_layer_stats(self.engine.module, self.layout.groups.tensor)
        gathered = [None] * self.layout.world_size
        dist.all_gather_object(gathered, stats if self.layout.tensor_rank == 0 else {})
        merged = {k: v for part in gathered for k, v in part.items()}
        out = {f"afb/{name}/activation_drift": moved for name, moved in self.drift.update(merged).items()}
        for name, st in merged.items():
            out[f"afb/{name}/gate_entropy"] = st.gate_entropy
            out[f"afb/{name}/bias_correction_ratio"] = st.bias_correction_ratio
        return out

    # -- checkpoints and endings ------------------------------------------------------------

    def save(self) -> None:
        self.metrics.flush()  # the records up to this checkpoint are on disk before it is
        checkpoint.save(self.engine, self.run_dir, self.step, self.batches.consumed_samples, self.components())
        self.last_saved = self.step

    def _preempt(self) -> int:
        if self.last_saved != self.step and not self.non_finite.in_bad_run:
            self.save()
        signal_name = self.startup.preemption.received_name()
        self.log.print(f"preempted by signal {signal_name}: checkpoint at step {self.last_saved} "
                       f"saved, exiting with {REQUEUE_EXIT_CODE} for requeue")
        return REQUEUE_EXIT_CODE

    def _finish(self) -> int:
        summary = f"training finished: {self.step} steps"
        if self.val_loss is not None:
            summary += f", validation loss {self.val_loss:.4f}"
        if self.first_val is not None:
            summary += f" (from {self.first_val:.4f} at step 0)"
        self.log.print(summary)
        self.log.print(f"TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}")
        self.log.print(f"checkpoint: {checkpoint.checkpoint_dir(self.run_dir) / checkpoint.tag_for(self.last_saved)}")
        return 0

    def _last_good(self) -> str:
        latest = checkpoint.checkpoint_dir(self.run_dir) / checkpoint.LATEST
        return str(latest.parent / latest.read_text().strip()) if latest.is_file() else "none"


def run(cfg: Config, world_size: int, callbacks: Sequence[Callback] = ()) -> int:
    """Train according to a validated config; returns the process exit status."""
    return Trainer.start(cfg, world_size, callbacks).train()
