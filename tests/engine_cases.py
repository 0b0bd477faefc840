"""Shared pieces of the engine equivalence tests: a tiny config and real-text batches."""

from __future__ import annotations

import os

import torch

SEQ, VOCAB = 32, 256


def tiny_config(**overrides):
    from afb_scale.config import load_config

    base = [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.ffn_kind=afb-gelu", "model.feedback_rank=8", f"model.seq_length={SEQ}",
        f"model.vocab_size={VOCAB}", "train.steps=6", "train.warmup_steps=2", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.clip_grad=1.0",
    ]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


def text_batches(steps: int, global_batch: int) -> list[torch.Tensor]:
    """Real text as byte tokens: consecutive windows of the standard library's os.py."""
    data = torch.tensor(list(open(os.__file__, "rb").read()), dtype=torch.long)
    n = steps * global_batch
    windows = data[: n * (SEQ + 1)].view(n, SEQ + 1)
    return [windows[i * global_batch : (i + 1) * global_batch] for i in range(steps)]


def rank_micro_batches(global_batch: torch.Tensor, micro: int, dp_rank: int, dp_size: int) -> list[dict]:
    per_rank = global_batch.shape[0] // dp_size
    mine = global_batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [
        {"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(), "loss_mask": torch.ones(w.shape[0], SEQ)}
        for w in mine.split(micro)
    ]


def run_engine(rank, world, overrides):
    """Train `steps` steps on the given layout; return the loss and grad-norm sequences."""
    from megatron.core import parallel_state

    from afb_scale.config import validate
    from afb_scale.training.engine import Engine
    from afb_scale.parallel.groups import init_distributed

    cfg = tiny_config(**overrides)
    validate(cfg, world)
    layout = init_distributed(cfg.parallel)
    engine = Engine(cfg, layout)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    losses, norms = [], []
    for batch in text_batches(cfg.train.steps, cfg.train.global_batch_size):
        res = engine.train_batch(rank_micro_batches(batch, cfg.train.micro_batch_size, dp_rank, dp))
        losses.append(res.loss)
        norms.append(res.grad_norm)
    return losses, norms
