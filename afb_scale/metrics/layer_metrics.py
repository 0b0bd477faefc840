"""AFB layer metrics on demand: gate entropy, bias-correction ratio, activation drift.

The layers keep a flag (`collect_stats`) that is False during ordinary steps, so training pays
nothing for these metrics. `collect_layer_stats` turns it on around one forward pass (usually a
fixed probe batch); `reduce_layer_stats` combines the per-rank sums across tensor-parallel
ranks into the numbers the design page defines.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from afb_scale.model.afb import ReferenceAFBFFN
from afb_scale.model.parallel_afb import AFBMLP


@dataclass
class LayerStats:
    gate_entropy: float  # mean binary entropy of the gates, in bits (1 = all gates at init)
    bias_correction_ratio: float  # rms(db) / rms(h)
    mean_activation: torch.Tensor  # [f] on CPU, mean over tokens of the hidden activation a


# Where a transformer layer sits, as reshard.canonical_name reads parameter names: GPTModel's
# `decoder.layers.k` (0-based; GPTModel is only ever one pipeline stage here) and PipelineModule's
# `i.layer` (index i in 1..L is layer i).
_GPT_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)$")
_PIPE_LAYER = re.compile(r"^(\d+)\.layer$")


def transformer_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Transformer layers by `layerNN`, the global 1-based number, the same under any pipeline split.

    Not from `layer_number`: a pipeline stage builds its layers with global numbers
    (model/pipeline.py) and megatron-core adds its own pipeline offset on top, so layer 3 of 4 on
    stage 1 of 2 reads 5. The module path is used where it is known; the attribute otherwise.
    """
    out = {}
    for path, m in model.named_modules():
        if not hasattr(m, "layer_number") or not hasattr(m, "mlp"):
            continue
        gpt, pipe = _GPT_LAYER.search(path), _PIPE_LAYER.match(path)
        number = int(gpt.group(1)) + 1 if gpt else int(pipe.group(1)) if pipe else m.layer_number
        out[f"layer{number:02d}"] = m
    return out


def afb_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """AFB layers by name: `layerNN` (see transformer_layers) inside a transformer, else the
    module path."""
    by_layer = {name: t.mlp for name, t in transformer_layers(model).items() if isinstance(t.mlp, AFBMLP)}
    return by_layer or {n: m for n, m in model.named_modules() if isinstance(m, (AFBMLP, ReferenceAFBFFN))}


@contextlib.contextmanager
def collect_layer_stats(model: torch.nn.Module):
    layers = afb_layers(model)
    for m in layers.values():
        m.collect_stats, m.last_stats = True, None
    try:
        yield layers
    finally:
        for m in layers.values():
            m.collect_stats = False


def reduce_layer_stats(model: torch.nn.Module, tp_group=None) -> dict[str, LayerStats]:
    """Combine each AFB layer's last collected sums over the tensor-parallel group."""
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    out = {}
    for name, m in afb_layers(model).items():
        s = m.last_stats
        if s is None:
            continue
        scalars = torch.stack([s["entropy_bits"], s["elements"], s["db_sq"], s["h_sq"]]).double()
        a_sum = s["a_sum"]
        if tp > 1:
            dist.all_reduce(scalars, group=tp_group)
            parts = [torch.empty_like(a_sum) for _ in range(tp)]
            dist.all_gather(parts, a_sum.contiguous(), group=tp_group)
            a_sum = torch.cat(parts)  # rank k holds hidden units [k f/t, (k+1) f/t)
        entropy, elements, db_sq, h_sq = scalars.tolist()
        out[name] = LayerStats(
            gate_entropy=entropy / elements,
            bias_correction_ratio=math.sqrt(db_sq / h_sq) if h_sq > 0 else 0.0,
            # On the host: the loop gathers these across ranks as objects, and a pickled CUDA
            # tensor would land on every receiving rank's GPU.
            mean_activation=(a_sum.double() / s["tokens"].double()).float().cpu(),
        )
    return out


class ActivationDrift:
    """||m_t - m_prev|| / (||m_prev|| + eps) per layer, m the probe-batch mean activation."""

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.previous: dict[str, torch.Tensor] = {}

    def update(self, stats: dict[str, LayerStats]) -> dict[str, float]:
        drift = {}
        for name, st in stats.items():
            prev = self.previous.get(name)
            if prev is not None:
                drift[name] = ((st.mean_activation - prev).norm() / (prev.norm() + self.eps)).item()
            self.previous[name] = st.mean_activation.clone()
        return drift

    # Saved with every checkpoint: the first drift after a resume compares with the last probe
    # before it, as in an uninterrupted run.
    def state_dict(self) -> dict:
        return {"previous": {k: v.detach().cpu() for k, v in self.previous.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state["previous"])
