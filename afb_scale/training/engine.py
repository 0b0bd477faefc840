"""The DeepSpeed engine, configured from afb_scale's config.

With compat/deepspeed.py (the patches) and checkpoint.py (save/load through the engine), the
only modules that touch DeepSpeed.

Two paths, chosen by `parallel.pipeline`:
- PP = 1: megatron-core's GPTModel under DeepSpeedEngine, ZeRO 0-3 over the data-parallel
  group, megatron-core's parallel_state as DeepSpeed's `mpu` (through MegatronMPU).
- PP > 1: the same blocks as a DeepSpeed PipelineModule (model/pipeline.py) under
  PipelineEngine, which supports ZeRO 0-1 only (config validation enforces that).

DeepSpeed's JSON config is generated here from ours, so a user writes one config.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import deepspeed
import torch
import torch.distributed as dist

from afb_scale import device
from afb_scale.compat import deepspeed as ds_compat
from afb_scale.config import Config
from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for
from afb_scale.model.lm_loss import LMLoss
from afb_scale.model.pipeline import build_pipeline_model
from afb_scale.parallel.groups import (
    MegatronMPU,
    check_topology_agrees,
    deepspeed_topology,
    sum_sequence_parallel_grads_over_tp,
)
from afb_scale.parallel.layout import ParallelLayout


def deepspeed_config(cfg: Config, layout: ParallelLayout) -> dict:
    t, p = cfg.train, cfg.parallel
    dp = layout.data
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {"stage": p.zero_stage},
        # Our optimizer is torch's AdamW (the fused ones need CUDA); ZeRO wraps it as it is.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        # bf16 gradients are accumulated over micro-batches and reduced over data parallelism in
        # fp32 (ZeRO-1: DeepSpeed's BF16_Optimizer; ZeRO-3: its fp32 partitions). Without this
        # DeepSpeed sums 32 micro-batches of the 1.3B config in bf16 (8 bits of mantissa).
        # Validation allows bf16 only at ZeRO 1 and 3, where DeepSpeed honours these settings.
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if t.precision == "bf16" else {}),
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**31 - 1,  # the training loop does the logging
        "wall_clock_breakdown": False,
    }
    if p.pipeline > 1:
        # DeepSpeed's pipeline engine sends each stage output split across the TP group and
        # gathers it on the next stage, which assumes the TP ranks hold the same tensor. Under
        # sequence parallelism each holds a different slice of the sequence: send it whole.
        ds["pipeline"] = {"pipe_partitioned": not p.sequence_parallel, "grad_partitioned": not p.sequence_parallel}
    if t.activation_checkpointing and p.pipeline > 1:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return ds


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at train.steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as is usual for GPT."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GPTWithLoss(torch.nn.Module):
    """GPTModel plus the shared loss, so DeepSpeedEngine's forward returns the loss."""

    def __init__(self, gpt: torch.nn.Module, loss_fn: LMLoss, seq_length: int):
        super().__init__()
        self.gpt = gpt
        self.loss_fn = loss_fn
        self.register_buffer("mask", causal_attention_mask(seq_length), persistent=False)

    def forward(self, tokens, labels, loss_mask):
        logits = self.gpt(tokens, position_ids_for(tokens), self.mask)  # [b, s, v/t]
        return self.loss_fn(logits.transpose(0, 1), (labels, loss_mask))


def model_grad_norm(params, model_group) -> torch.Tensor:
    """Global L2 norm of the gradients, each parameter counted once across TP and PP.

    megatron-core's rule: a tensor-parallel shard counts on every TP rank, a replicated
    parameter on one of them, the pipeline's second copy of a tied embedding (marked `shared`)
    not at all; squares are summed over the TP x PP group. (megatron's get_grad_norm_fp32
    allocates on CUDA, hence these few lines.)
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [p.grad.detach() for p in params if p.grad is not None
             and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    if grads:
        # torch's multi-tensor norm (no squared copy of each gradient), accumulated in fp32.
        local = torch.nn.utils.get_total_norm([g.float() for g in grads], norm_type=2.0, foreach=True)
        total = local.double().pow(2).float().reshape(())
    else:
        total = torch.zeros((), dtype=torch.float32, device=device.current())
    dist.all_reduce(total, group=model_group)
    return total.sqrt()


class GuardedLMLoss(LMLoss):
    """LMLoss whose non-finite value always poisons the gradients with NaN.

    An infinite loss can still have finite gradients; multiplying by NaN there (a constant, no
    host sync) guarantees the optimizer's non-finite check sees the bad step and skips it.
    """

    def __call__(self, logits, labels_and_mask):
        loss = super().__call__(logits, labels_and_mask)
        poison = torch.where(torch.isfinite(loss), torch.ones_like(loss), torch.full_like(loss, float("nan")))
        return loss * poison.detach()


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: Optional[float]
    lr: float
    loss_scale: Optional[float]
    applied: bool = True  # False: the optimizer skipped this step (non-finite gradients / overflow)


class Engine:
    """Build the model and DeepSpeed engine for a validated config; one call per global batch."""

    def __init__(self, cfg: Config, layout: ParallelLayout, initial_weights: Optional[dict] = None):
        """`layout`: this rank's placed layout (groups.init_distributed). `initial_weights`: full
        tensors by GPTModel name (reshard.py) loaded into the model before DeepSpeed wraps it --
        how a checkpoint from another layout is loaded."""
        self.cfg = cfg
        self.layout = layout
        self.pipelined = cfg.parallel.pipeline > 1
        self.loss_fn = GuardedLMLoss()
        t, p = cfg.train, cfg.parallel
        self.device = device.current()
        if self.pipelined:
            topology = deepspeed_topology(layout)
            check_topology_agrees(topology, layout)
            model = build_pipeline_model(cfg.model, p, topology, t.precision, t.seed, self.loss_fn,
                                         t.activation_checkpointing)
            mpu = None  # PipelineEngine uses the module's own grid
        else:
            gpt = build_gpt_model(cfg.model, p, t.precision, t.seed)
            if t.activation_checkpointing:
                gpt.config.recompute_granularity = "full"
                gpt.config.recompute_method = "uniform"
                gpt.config.recompute_num_layers = 1
            model = GPTWithLoss(gpt, self.loss_fn, cfg.model.seq_length)
            mpu = MegatronMPU()
        if initial_weights is not None:
            from afb_scale.training.reshard import load_into_module

            load_into_module(model, initial_weights, cfg.model.num_layers, self.pipelined, layout)
        model.to(self.device)
        if p.sequence_parallel:
            sum_sequence_parallel_grads_over_tp(model)
        optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / t.lr)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
            config=deepspeed_config(cfg, layout),
        )
        grad_norm = functools.partial(model_grad_norm, model_group=layout.groups.model)
        ds_compat.clip_fp32_gradients_with(self.engine, grad_norm)
        if not (p.zero_stage or self.engine.fp16_enabled() or self.engine.bfloat16_enabled()):
            ds_compat.skip_non_finite_fp32_steps(self.engine, grad_norm)
            if layout.data == 1 and not self.pipelined:
                ds_compat.skip_allreduce_without_data_parallel_peers(self.engine)
        # Runtime randomness (dropout) differs per data-parallel rank, identical within a TP group.
        torch.manual_seed(t.seed + 100 * layout.data_rank)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _to_device(self, mb: dict) -> dict:
        return device.to_device(mb, self.device)

    def _pipe_iter(self, micro_batches: list[dict]) -> Iterable:
        for mb in micro_batches:
            mb = self._to_device(mb)
            yield mb["tokens"], (mb["labels"], mb["loss_mask"])

    def train_batch(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch."""
        if self.pipelined:
            loss = self.engine.train_batch(data_iter=iter(self._pipe_iter(micro_batches))).item()
        else:
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for mb in micro_batches:
                mb = self._to_device(mb)
                loss = self.engine(mb["tokens"], mb["labels"], mb["loss_mask"])
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().double()
            total /= len(micro_batches)
            if self.layout.data > 1:  # the mean over data-parallel ranks
                dist.all_reduce(total, group=self.layout.groups.data)
            loss = (total / self.layout.data).item()
        return StepResult(loss=loss, grad_norm=self.grad_norm(), lr=self.scheduler.get_last_lr()[0],
                          loss_scale=self.loss_scale(), applied=bool(self.engine.was_step_applied()))

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def loss_scale(self) -> Optional[float]:
        if self.cfg.train.precision != "fp16":
            return None
        return float(getattr(self.optimizer, "cur_scale", getattr(self.optimizer, "loss_scale", 0.0)))

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict]) -> tuple[float, float]:
        """(mean loss, token accuracy) over this rank's micro-batches, averaged over data-parallel ranks."""
        self.loss_fn.reset_accuracy()
        self.loss_fn.track_accuracy = True
        try:
            if self.pipelined:
                loss = self.engine.eval_batch(data_iter=iter(self._pipe_iter(micro_batches)),
                                              num_micro_batches=len(micro_batches)).item()
            else:
                self.engine.eval()
                losses = [self.engine(**self._to_device(mb)).item() for mb in micro_batches]
                self.engine.train()
                loss = sum(losses) / len(losses)
                t = torch.tensor([loss], dtype=torch.float64, device=self.device)
                dist.all_reduce(t, group=self.layout.groups.data)
                loss = t.item() / self.layout.data
            counts = torch.tensor([self.loss_fn.correct, self.loss_fn.counted], dtype=torch.float64, device=self.device)
        finally:
            self.loss_fn.track_accuracy = False
        # Only the last pipeline stage computed logits: sum its counts over DP, share over PP.
        dist.all_reduce(counts, group=self.layout.groups.data)
        if self.pipelined:
            dist.all_reduce(counts, group=self.layout.groups.pipeline)
        accuracy = (counts[0] / counts[1].clamp(min=1)).item()
        return loss, accuracy
