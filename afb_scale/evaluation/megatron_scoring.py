"""Scoring batches with megatron-core's model split over a torchrun job (TP x PP), for `afb-scale eval`.

The model is the training stack's own: `training.engine.Engine` builds it exactly as a run does
(GPTModel under DeepSpeedEngine at PP = 1, the DeepSpeed PipelineModule of model/pipeline.py at
PP > 1), loads the full weights sharded for this rank (training/reshard.py, the path a
checkpoint of another layout takes) and evaluates with `Engine.evaluate`, the validation step
training runs. So eval under pipeline parallelism uses the same schedule and loss as training's
validation; nothing here is a second forward.

`Engine.evaluate` returns the masked mean loss and token accuracy of its micro-batches, so each
batch goes through alone (one micro-batch of `batch_size` rows and model.seq_length tokens, the
fixed shape the pipeline's sends and attention mask need; short rows and a short last batch are
padded with masked positions) and is turned back into a summed loss and a hit count.
"""

from __future__ import annotations

import copy
import os

import torch

from afb_scale.config import ConfigError


def check_layout(model, world: int, pipeline: int) -> int:
    """The tensor-parallel degree world / pipeline, after checking the model can be split so."""
    from afb_scale.config import validate_model

    if pipeline < 1 or world % pipeline:
        raise ConfigError(f"--pipeline={pipeline} must be >= 1 and divide the number of processes ({world})")
    tensor = world // pipeline
    validate_model(model, tensor)  # heads, ffn hidden and vocabulary divisible by TP
    if model.num_layers % pipeline:
        raise ConfigError(f"--pipeline={pipeline} must divide model.num_layers={model.num_layers}")
    if pipeline > 1 and model.position_embedding_type != "learned_absolute":
        raise ConfigError(f"--pipeline={pipeline} needs model.position_embedding_type=learned_absolute "
                          f"(the pipeline stages do not compute {model.position_embedding_type} yet); use --pipeline 1")
    return tensor


def megatron_scorer(src, batch_size: int, pipeline: int = 1):
    """score(tokens, labels, mask) -> (summed nll over the masked tokens, argmax hits there), from
    megatron-core's model at TP = world / pipeline, PP = pipeline on this torchrun job's ranks.
    Every rank must call it with the same batches."""
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed
    from afb_scale.training.engine import Engine

    world = int(os.environ["WORLD_SIZE"])
    cfg = copy.deepcopy(src.cfg)
    tensor = check_layout(cfg.model, world, pipeline)
    cfg.parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)  # ZeRO 0, no sequence parallelism
    t = cfg.train
    t.precision, t.activation_checkpointing = "fp32", False  # as the one-process model
    t.micro_batch_size = batch_size
    t.global_batch_size = batch_size  # one data-parallel rank: tensor x pipeline is the whole world
    layout = init_distributed(cfg.parallel, seed=t.seed)
    engine = Engine(cfg, layout, initial_weights=src.state)
    seq = cfg.model.seq_length

    def score(tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
        b, s = tokens.shape
        padded = {k: torch.zeros((batch_size, seq), dtype=torch.long) for k in ("tokens", "labels", "loss_mask")}
        padded["tokens"][:b, :s], padded["labels"][:b, :s], padded["loss_mask"][:b, :s] = tokens, labels, mask
        counted = int(mask.sum())
        if counted == 0:
            return 0.0, 0
        loss, accuracy = engine.evaluate([padded])
        return loss * counted, round(accuracy * counted)
    return score
