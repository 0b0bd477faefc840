"""`afb-scale plan`: size a run before submitting it, on a machine without the hardware it plans for.

For a config and a cluster shape (nodes x GPUs per node, memory per GPU) the planner prints the
exact parameter count (the model built on torch's meta device: no memory, well under a second
at 1.3B), FLOPs per token, tokens per step, memory per device split into weights, gradients,
optimizer states, activations and buffers (afb_scale/cost.py, checked against measurements in
docs/cost.md), whether that fits, and the step and total time at an assumed MFU. `--search`
ranks every layout (TP, PP, DP, ZeRO stage, micro batch, activation checkpointing) that fits
by estimated throughput.

Time model (docs/cost.md): a step does tokens x hardware FLOPs per token (model FLOPs, plus
the recomputed forward under activation checkpointing) at `mfu` of the devices' dense peak,
and a pipeline idles (p - 1) / (m + p - 1) of it (1F1B, m micro-batches per step). Communication is
not priced: at equal estimated throughput the search prefers the layout that communicates
less (lower ZeRO stage, smaller TP, fewer stages) and the larger micro batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional

from afb_scale.config import Config, ConfigError, validate
from afb_scale.cost import GIB, Layout, MemoryEstimate, flops_per_token, memory_per_device, parameter_count

# Memory a GPU gives up outside torch's allocator (CUDA context, NCCL's buffers) and the share
# of the rest its caching allocator's fragmentation takes (reserved over allocated); the memory
# estimate is compared with what remains. Both are assumptions, stated with every verdict.
CUDA_CONTEXT_GIB = 1.0
FRAGMENTATION = 0.05
DEFAULT_MFU = 0.30  # AFB-GELU at 1.3B on one H100 measured 29.7% (docs/results/gpu.md)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    memory_gib: float  # per device
    peak_flops: float  # per device, dense, at the run's precision
    peak_label: str
    mfu: float = DEFAULT_MFU
    device: str = "cuda"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        """What the memory estimate may use: the device's memory less the CUDA context, less
        the allocator's fragmentation margin."""
        context = CUDA_CONTEXT_GIB if self.device == "cuda" else 0.0
        return (self.memory_gib - context) * GIB * (1 - FRAGMENTATION)


@dataclass
class Estimate:
    layout: Layout
    memory: MemoryEstimate
    tokens_per_step: int
    step_seconds: float
    tokens_per_second: float
    fits: bool
    headroom_bytes: float  # usable memory left over at the estimated peak (negative: short)


def exact_parameter_count(model) -> tuple[int, float, str]:
    """(parameters, seconds, how) of build_gpt_model(model) at TP = PP = 1, built on torch's
    meta device: tensors with shapes and no storage, so 1.3B takes well under a second and no
    memory. Needs megatron-core's parallel state; a one-process gloo group over an in-memory
    store is set up (and torn down) when none exists."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from afb_scale import device
    from afb_scale.config import ParallelConfig
    from afb_scale.model.gpt import build_gpt_model

    t0 = time.perf_counter()
    ours = not dist.is_initialized()
    if not ours and parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1):
        # A live TP/PP group would shard the model: count with the formula instead.
        return parameter_count(model), time.perf_counter() - t0, "formula (a model-parallel group is active)"
    try:
        if ours:
            device.setup()
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        made_state = not parallel_state.model_parallel_is_initialized()
        if made_state:
            parallel_state.initialize_model_parallel(1, 1)
        with torch.device("meta"):
            gpt = build_gpt_model(model, ParallelConfig())
        n = sum(p.numel() for p in gpt.parameters())
    finally:
        if ours:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return n, time.perf_counter() - t0, "GPTModel built on the meta device"


def _with(cfg: Config, **sections) -> Config:
    """A copy of cfg with fields of its sections replaced: _with(cfg, parallel={"tensor": 2})."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def estimate(cfg: Config, world_size: int, hw: Hardware) -> Estimate:
    """Memory and time of a validated config on `world_size` devices of `hw`."""
    layout = Layout.from_config(cfg, world_size, device=hw.device)
    mem = memory_per_device(cfg.model, layout)
    m = cfg.model
    tokens = cfg.train.global_batch_size * m.seq_length
    hardware_flops = flops_per_token(m, recompute=layout.checkpointing)
    # 1F1B: a pipeline of p stages idles (p - 1) of every (m + p - 1) micro-batch slots.
    bubble = layout.grad_accum / (layout.grad_accum + layout.pipeline - 1)
    step = tokens * hardware_flops / (world_size * hw.peak_flops * hw.mfu * bubble)
    usable = hw.usable_bytes
    return Estimate(layout=layout, memory=mem, tokens_per_step=tokens, step_seconds=step,
                    tokens_per_second=tokens / step, fits=mem.total <= usable, headroom_bytes=usable - mem.total)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search(cfg: Config, hw: Hardware, world_size: Optional[int] = None) -> list[Estimate]:
    """Every layout of `world_size` devices that validates and fits, best estimated throughput
    first. TP stays within a node (its all-reduces run every layer); sequence parallelism goes
    with TP > 1 (same compute, 1/t of the norms' and dropouts' activations)."""
    world = world_size or hw.world_size
    m, t = cfg.model, cfg.train
    out = []
    for tp in _divisors(min(hw.gpus_per_node, world)):
        for pp in _divisors(m.num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for micro in MICRO_BATCHES:
                if t.global_batch_size % (micro * dp):
                    continue
                for zero in (0, 1, 2, 3):
                    for ckpt in (False, True):
                        c = _with(cfg, parallel={"tensor": tp, "pipeline": pp, "zero_stage": zero,
                                                 "sequence_parallel": tp > 1},
                                  train={"micro_batch_size": micro, "activation_checkpointing": ckpt})
                        try:
                            validate(c, world, cuda_available=hw.device == "cuda")
                        except ConfigError:
                            continue
                        e = estimate(c, world, hw)
                        if e.fits:
                            out.append(e)
    out.sort(key=lambda e: (-round(e.tokens_per_second, 6), e.layout.zero_stage, e.layout.tensor,
                            e.layout.pipeline, e.layout.checkpointing, -e.layout.micro_batch))
    return out


# ----------------------------------------------------------------------------------------------
# Rendering


def gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    days, rem = divmod(int(round(seconds)), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def _describe_states(layout: Layout) -> tuple[str, str, str]:
    z, d, prec = layout.zero_stage, layout.data, layout.precision
    part = f"1/{d} (ZeRO-{z} over DP {d})" if d > 1 else f"whole (DP 1, ZeRO-{z})"
    if z == 3:
        weights = f"{prec}, 1/{d} of each parameter (ZeRO-3); small ones whole"
        grads = "partitions (fp32 for bf16) " + ("1/" + str(d) if d > 1 else "whole")
    elif z == 1 and prec == "bf16":
        weights = "bf16"
        grads = "bf16 .grad + full fp32 accumulation buffer"
    elif z == 0:
        weights, grads = prec, "fp32 .grad"
    else:
        weights, grads = prec, "whole .grads of the parameters meeting this rank's partition"
    opt = "Adam moments, whole" if z == 0 else f"fp32 master + Adam moments, {part}"
    return weights, grads, opt


def render_memory(e: Estimate, hw: Hardware) -> str:
    m, L = e.memory, e.layout
    w, g, o = _describe_states(L)
    act = f"micro batch {L.micro_batch}" + (", sequence parallel" if L.sequence_parallel and L.tensor > 1 else "") \
        + (", activation checkpointing" if L.checkpointing else ", no checkpointing") \
        + (f", {min(L.pipeline - m.stage, L.grad_accum)} micro-batch(es) in flight" if L.pipeline > 1 else "")
    buf = ", ".join(k.removeprefix("buffers: ") for k, v in m.detail.items() if k.startswith("buffers:") and v > 0)
    stage = f"pipeline stage {m.stage} of {L.pipeline} (the busiest), " if L.pipeline > 1 else ""
    usable = hw.usable_bytes
    verdict = ("fits" if e.fits else "does NOT fit") + \
        f": headroom {gib(e.headroom_bytes)} GiB ({100 * e.headroom_bytes / usable:+.0f}% of usable)"
    rows = [
        ("weights", m.weights, w),
        ("gradients", m.gradients, g),
        ("optimizer states", m.optimizer, o),
        ("activations", m.activations, act),
        ("buffers", m.buffers, buf or "-"),
        ("total (peak)", m.total, f"the largest phase of a step: {m.phase}; not the sum of the rows"),
        ("usable", usable, f"{hw.memory_gib:g} GiB - {CUDA_CONTEXT_GIB if hw.device == 'cuda' else 0:g} GiB context, "
                           f"less {100 * FRAGMENTATION:.0f}% for allocator fragmentation"),
    ]
    lines = [f"memory per device (GiB), {stage}{m.params:,} parameters on this rank before ZeRO:"]
    lines += [f"  {name:<17} {gib(v):>9}   {note}" for name, v, note in rows]
    lines.append(f"  verdict           {verdict}")
    return "\n".join(lines)


def render_plan(cfg: Config, world_size: int, hw: Hardware, params: tuple[int, float, str]) -> str:
    m, t = cfg.model, cfg.train
    e = estimate(cfg, world_size, hw)
    n, seconds, how = params
    fwd = flops_per_token(m, training=False)
    train_flops = flops_per_token(m)
    lines = [
        f"parameters: {n:,} ({how}, {seconds:.2f} s)",
        f"FLOPs per token: {train_flops / 1e9:,.2f} GFLOP per training token (3 x {fwd / 1e9:,.3f} GFLOP forward"
        + (f"; {flops_per_token(m, recompute=True) / 1e9:,.2f} with the recomputed forward"
           if t.activation_checkpointing else "") + ")",
        f"tokens per step: {e.tokens_per_step:,} (global batch {t.global_batch_size} x seq {m.seq_length}; "
        f"{e.layout.grad_accum} micro-batch(es) of {t.micro_batch_size} per data-parallel rank); "
        f"{t.steps:,} steps = {e.tokens_per_step * t.steps / 1e9:,.1f}B tokens",
        render_memory(e, hw),
        f"time: at {100 * hw.mfu:.0f}% MFU of {hw.peak_flops / 1e12:g} TFLOP/s per device ({hw.peak_label}): "
        f"step {e.step_seconds:,.2f} s, {e.tokens_per_second:,.0f} tokens/s; {t.steps:,} steps "
        f"{duration(e.step_seconds * t.steps)} ({e.step_seconds * t.steps * world_size / 3600:,.0f} device-hours)",
    ]
    return "\n".join(lines)


def render_search(results: list[Estimate], hw: Hardware, top: int) -> str:
    if not results:
        return "search: no layout fits (every candidate validated and estimated above the usable memory)"
    lines = [f"search: {len(results)} layouts fit {hw.nodes} x {hw.gpus_per_node} devices of {hw.memory_gib:g} GiB; "
             f"best {min(top, len(results))} by estimated throughput:",
             "| # | TP | PP | DP | ZeRO | micro | ckpt | SP | GiB | headroom GiB | tokens/s | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(results[:top], 1):
        L = e.layout
        sp = L.sequence_parallel and L.tensor > 1
        lines.append(f"| {i} | {L.tensor} | {L.pipeline} | {L.data} | {L.zero_stage} | {L.micro_batch} "
                     f"| {'on' if L.checkpointing else 'off'} | {'on' if sp else 'off'} "
                     f"| {gib(e.memory.total)} | {gib(e.headroom_bytes)} | {e.tokens_per_second:,.0f} "
                     f"| {e.step_seconds:,.2f} |")
    return "\n".join(lines)
