"""Consolidated fp32 model state: any TP/PP/DP/ZeRO layout <-> one set of full tensors.

A checkpoint's DeepSpeed files only load into the layout that wrote them. Beside them each
checkpoint holds the model consolidated (`consolidated/model-stage<S>.safetensors`, one file per
pipeline stage, written by that stage's TP-rank-0 / DP-rank-0 process): full tensors, fp32,
under *canonical names*, which are megatron-core GPTModel's parameter names at PP = 1:

    embedding.word_embeddings.weight, embedding.position_embeddings.weight,
    decoder.layers.<i>.<...>, decoder.final_layernorm.<...>, output_layer.weight (untied only)

Tensor-parallel shards are gathered and cut with `model/tp_layout.py` (the rule megatron's own
CPU initialisation uses); ZeRO-3 partitions are gathered with DeepSpeed's GatheredParameters.
Loading into another layout (`load_into_module`) shards the full tensors for the new TP rank
and runs *before* DeepSpeed wraps the model, so ZeRO builds its fp32 master weights and
partitions from them.

What resharding carries: the model weights, the step and the consumed-samples counter (so the
data order continues and the LR schedule resumes at its step). What it does not: optimizer
moments and per-rank RNG states, which are tied to the layout that wrote them; after a layout
change Adam restarts from zero moments (a "warm start"). Resuming in the *same* layout restores
everything bit-exactly through DeepSpeed's files (checkpoint.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from afb_scale.model.tp_layout import gather_full_tensor, partition_of, shard_full_tensor

CONSOLIDATED_DIR = "consolidated"
_PIPE_LAYER = re.compile(r"^(\d+)\.(.*)$")


def canonical_name(name: str, num_layers: int, pipelined: bool) -> str:
    """GPTModel's name for a parameter of the training module (GPTWithLoss or PipelineModule).

    PipelineModule layer indices: 0 embedding, 1..L transformer layers, L+1 final norm,
    L+2 output layer (untied) -- the tied embedding lives under `tied_modules.embed.`.
    """
    if not pipelined:
        if not name.startswith("gpt."):
            raise ValueError(f"unexpected parameter {name!r}: not under GPTWithLoss.gpt")
        return name[len("gpt."):]
    if name.startswith("tied_modules.embed."):
        return name[len("tied_modules.embed."):]
    m = _PIPE_LAYER.match(name)
    if not m:
        raise ValueError(f"unexpected pipeline parameter {name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0 and rest.startswith("embedding."):
        return rest
    if 1 <= idx <= num_layers and rest.startswith("layer."):
        return f"decoder.layers.{idx - 1}.{rest[len('layer.'):]}"
    if idx == num_layers + 1 and rest.startswith("norm."):
        return f"decoder.final_layernorm.{rest[len('norm.'):]}"
    if idx == num_layers + 2 and rest.startswith("output_layer."):
        return rest
    raise ValueError(f"unexpected pipeline parameter {name!r} (num_layers={num_layers})")


def _named_params(module: torch.nn.Module, num_layers: int, pipelined: bool):
    return [(canonical_name(n, num_layers, pipelined), n, p) for n, p in module.named_parameters()]


def _zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


@torch.no_grad()
def gather_stage(engine) -> dict[str, torch.Tensor] | None:
    """Collective over the whole world: this pipeline stage's full fp32 tensors by canonical
    name on its (TP rank 0, DP rank 0) process, None on every other process.

    The pipeline's second copy of a tied embedding (marked `shared`) is left out: stage 0 has it.
    Under bf16/fp16 the working-precision weights are written (cast to fp32), not the master copy.
    """
    cfg, layout = engine.cfg, engine.layout
    tp_group = layout.groups.tensor
    writer = layout.tensor_rank == 0 and layout.data_rank == 0
    out: dict[str, torch.Tensor] = {}
    for canon, _, p in _named_params(engine.module, cfg.model.num_layers, engine.pipelined):
        if getattr(p, "shared", False):
            continue
        if _zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                local = p.detach().clone()
        else:
            local = p.detach()
        part = partition_of(p)
        full = local.clone() if part is None else gather_full_tensor(local, *part, tp_group)
        if writer:
            out[canon] = full.float().cpu().contiguous()
    return out if writer else None


def save_consolidated(engine, tag_dir: Path) -> None:
    """Collective: write `consolidated/model-stage<S>.safetensors` for every pipeline stage."""
    from safetensors.torch import save_file

    tensors = gather_stage(engine)
    if tensors is not None:
        out = Path(tag_dir) / CONSOLIDATED_DIR
        out.mkdir(parents=True, exist_ok=True)
        stage = engine.layout.pipeline_rank
        path = out / f"model-stage{stage:03d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "afb_scale consolidated fp32, GPTModel names"})
        os.replace(tmp, path)


class ConsolidatedState(Mapping):
    """A checkpoint's full tensors by canonical name, read from disk only when asked for.

    Every rank of a resharded resume opens the same files but reads only the tensors of its
    own pipeline stage (a 1.3B model is ~5 GB in fp32; eight ranks per node need not hold it
    eight times).
    """

    def __init__(self, tag_dir: str | Path):
        from safetensors import safe_open

        self.files = sorted((Path(tag_dir) / CONSOLIDATED_DIR).glob("model-stage*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{tag_dir} has no consolidated model (train.save_consolidated was false)")
        self._where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                self._where.update((k, f) for k in h.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as h:
            return h.get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_consolidated(tag_dir: str | Path) -> ConsolidatedState:
    """All stages' full tensors of a checkpoint, merged, by canonical name (read lazily)."""
    return ConsolidatedState(tag_dir)


@torch.no_grad()
def load_into_module(module: torch.nn.Module, full: dict[str, torch.Tensor], num_layers: int, pipelined: bool,
                     layout) -> None:
    """Copy full tensors into a freshly built (not yet DeepSpeed-wrapped) training module,
    sharding each for this process's TP rank (`layout`: its ParallelLayout). Every parameter
    must be present."""
    rank, world = layout.tensor_rank, layout.tensor
    named = _named_params(module, num_layers, pipelined)
    missing = sorted({c for c, _, _ in named} - set(full))
    if missing:
        raise KeyError(f"consolidated state lacks {len(missing)} parameters, e.g. {', '.join(missing[:3])}")
    for canon, name, p in named:
        part = partition_of(p)
        src = full[canon]
        if part is not None:
            src = shard_full_tensor(src, *part, rank, world)
        if src.shape != p.shape:
            raise ValueError(f"{name} ({canon}): consolidated {tuple(full[canon].shape)} does not fit {tuple(p.shape)}")
        p.copy_(src.to(p.dtype))
