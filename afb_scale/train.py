"""The training loop: `afb-scale train --config ...` on every rank under torchrun.

Per step: this rank's micro-batches of the global batch -> one DeepSpeed step; every
`log_interval` a stdout line and TensorBoard scalars; every `eval_interval` validation loss,
perplexity and token accuracy, plus the AFB layer metrics on a fixed probe batch; every
`save_interval` (and at the end, and on preemption) a checkpoint.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from afb_scale import checkpoint
from afb_scale.config import Config, data_parallel_size, dump_config
from afb_scale.engine import Engine
from afb_scale.metrics.layer_metrics import ActivationDrift, collect_layer_stats, reduce_layer_stats
from afb_scale.metrics.run_logger import RunLogger, Throughput, format_duration
from afb_scale.metrics.stability import StabilityTracker
from afb_scale.parallel import init_distributed
from afb_scale.preemption import REQUEUE_EXIT_CODE, PreemptionFlag

BATCH_KEYS = ("tokens", "labels", "loss_mask")


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
    init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline)
    rank = dist.get_rank()
    print(f"afb-scale rank {rank}/{world_size} host={socket.gethostname()} "
          f"local_rank={os.environ.get('LOCAL_RANK', 0)}", flush=True)
    from afb_scale.data import build_datasets, samples_needed

    preemption = PreemptionFlag()
    run_dir = Path(t.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    engine = Engine(cfg, world_size)
    G = t.global_batch_size
    train_ds, valid_ds, _ = build_datasets(cfg, samples_needed(cfg))
    dp_rank, dp = parallel_state.get_data_parallel_rank(), data_parallel_size(cfg, world_size)

    state = checkpoint.load_latest(engine, run_dir) or {}
    step = state.get("step", 0)
    log = RunLogger(run_dir, enabled=rank == 0, tensorboard=cfg.metrics.tensorboard)
    if step:
        log.print(f"resumed from {checkpoint.checkpoint_dir(run_dir) / checkpoint.tag_for(step)} at step {step}")
    valid_batches = [rank_micro_batches(valid_ds, i * G, cfg, dp_rank, dp) for i in range(t.eval_iters)]
    probe = [valid_batches[0][0]]  # the same tokens every time, so drift measures the model
    stability = StabilityTracker(cfg.metrics.grad_norm_window, cfg.metrics.loss_spike_factor)
    drift = ActivationDrift()
    speed = Throughput(G * cfg.model.seq_length, t.steps, step)
    n_params = sum(p.numel() for p in engine.module.parameters())
    log.print(f"model: {cfg.model.ffn_kind}, {n_params:,} parameters on rank 0 "
              f"(TP={cfg.parallel.tensor} PP={cfg.parallel.pipeline} DP={dp} ZeRO={cfg.parallel.zero_stage}); "
              f"run dir {run_dir}")

    def evaluate(step: int) -> float:
        losses, accs = zip(*(engine.evaluate(b) for b in valid_batches))
        val_loss, acc = sum(losses) / len(losses), sum(accs) / len(accs)
        log.print(f"step {step:6d} | validation loss {val_loss:.4f} | perplexity {math.exp(min(val_loss, 50)):.2f} "
                  f"| token accuracy {acc:.4f}")
        log.scalars(step, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50)), "val/token_accuracy": acc})
        if cfg.model.is_afb and cfg.metrics.layer_metrics_interval:
            log.scalars(step, _layer_metrics(engine, probe, drift))
        return val_loss

    first_val = evaluate(step) if step == 0 else None
    val_loss = first_val
    last_saved = step
    while step < t.steps:
        result = engine.train_batch(rank_micro_batches(train_ds, step * G, cfg, dp_rank, dp))
        step += 1
        snap = stability.update(result.loss, result.grad_norm)
        log.scalars(step, {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                           "train/loss_scale": result.loss_scale, "stability/grad_norm_variance": snap.grad_norm_variance,
                           "stability/grad_norm_cv": snap.grad_norm_cv, "stability/loss_spikes": snap.loss_spikes_total})
        if step % t.log_interval == 0 or step == t.steps:
            tokens_per_s, eta = speed.tick(step)
            log.scalars(step, {"train/tokens_per_s": tokens_per_s})
            norm = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
            log.print(f"step {step:6d}/{t.steps} | loss {result.loss:.4f} | lr {result.lr:.3e} | grad norm {norm} "
                      f"| {tokens_per_s:,.0f} tokens/s | ETA {format_duration(eta)}")
        if cfg.metrics.layer_metrics_interval and cfg.model.is_afb and step % cfg.metrics.layer_metrics_interval == 0 \
                and step % t.eval_interval != 0:
            log.scalars(step, _layer_metrics(engine, probe, drift))
        if step % t.eval_interval == 0 or step == t.steps:
            val_loss = evaluate(step)
        if step % t.save_interval == 0 or step == t.steps:
            checkpoint.save(engine, run_dir, step, step * G)
            last_saved = step
        if preemption.agreed(engine.device):
            if last_saved != step:
                checkpoint.save(engine, run_dir, step, step * G)
            log.print(f"preempted by signal {preemption.received}: checkpoint at step {step} saved, "
                      f"exiting with {REQUEUE_EXIT_CODE} for requeue")
            log.close()
            return REQUEUE_EXIT_CODE
    log.close()
    summary = f"training finished: {step} steps"
    if val_loss is not None:
        summary += f", validation loss {val_loss:.4f}"
    if first_val is not None:
        summary += f" (from {first_val:.4f} at step 0)"
    log.print(summary)
    log.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    log.print(f"checkpoint: {checkpoint.checkpoint_dir(run_dir) / checkpoint.tag_for(step)}")
    return 0
