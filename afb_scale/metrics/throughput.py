"""Achieved TFLOP/s, MFU and memory of a training run, and the peak FLOP/s they are measured against.

MFU is model FLOPs (afb_scale.cost.flops_per_token: no recompute counted) per second and
device over the device's *dense* peak at the run's precision. Data sheets quote bf16/fp16
tensor-core peaks with 2:4 structured sparsity as well (H100 SXM: 1979 TFLOP/s); dividing by
that halves MFU, and dividing by a peak at another precision makes it meaningless, so the
table below holds dense peaks per (device, precision). `metrics.peak_tflops` overrides it.

On CPU there is no data sheet to trust (the same core differs by clock, SIMD width and
thread count): the peak is a measured fp32 matrix-multiply rate of this process's threads,
measured once per machine, thread count and torch version, cached, and labelled as measured.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIB = 2**30

# Dense peak TFLOP/s per device and precision, from the vendors' data sheets (the figure
# without sparsity). fp32 is the non-tensor-core rate: torch does not use TF32 for matmuls
# unless told to (torch.backends.cuda.matmul.allow_tf32 is False by default).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100-SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100-PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100-NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4},
}


def device_kind(name: str) -> Optional[str]:
    """The PEAK_TFLOPS key for a device name as torch.cuda.get_device_name() reports it
    ("NVIDIA H100 80GB HBM3" -> "H100-SXM"), or None when the table does not know it."""
    n = name.upper().replace(" ", "").replace("_", "-")
    if "GH200" in n:
        return "GH200"
    if "H100" in n:
        return "H100-PCIe" if "PCIE" in n else "H100-NVL" if "NVL" in n else "H100-SXM"
    for key in ("H200", "B200", "A100", "L40S", "V100", "MI250X", "MI300X"):
        if key in n:
            return key
    if "L4" in n and "L40" not in n:
        return "L4"
    return None


def table_peak(kind: str, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of a PEAK_TFLOPS entry at a precision, or None."""
    tflops = PEAK_TFLOPS.get(kind, {}).get(precision)
    return None if tflops is None else tflops * 1e12


@dataclass
class Peak:
    flops: Optional[float]  # per device; None: unknown, MFU is not reported
    label: str  # where the number comes from, for the logs


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_matmul_peak(size: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of `size` x `size` matrix multiplications with this process's torch
    threads, over about `seconds` after a warm-up."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up (thread pool, caches)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def cpu_peak(cache_dir: Optional[os.PathLike] = None) -> Peak:
    """The measured fp32 matmul peak of this machine at this process's thread count, from the
    cache when it was measured before (~/.cache/afb_scale/cpu_peak.json)."""
    import torch

    threads = torch.get_num_threads()
    key = f"{_cpu_name()} | {threads} threads | torch {torch.__version__}"
    path = Path(cache_dir or Path.home() / ".cache" / "afb_scale") / "cpu_peak.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    flops = cache.get(key)
    if not isinstance(flops, (int, float)) or flops <= 0:
        flops = measure_cpu_matmul_peak()
        cache[key] = flops
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)  # atomic: ranks measuring at once never see half a file
        except OSError:
            pass  # an unwritable home only costs a measurement per run
    return Peak(flops, f"measured fp32 matmul peak of this CPU, {threads} thread(s)")


def peak_flops(precision: str, configured_tflops: Optional[float] = None, device_name: Optional[str] = None,
               cuda: Optional[bool] = None) -> Peak:
    """The per-device peak MFU is measured against: `metrics.peak_tflops` when set, else the
    dense table entry of this GPU at `precision`, else (on CPU) the measured matmul peak."""
    if configured_tflops is not None:
        return Peak(configured_tflops * 1e12, f"metrics.peak_tflops = {configured_tflops:g}")
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return cpu_peak()
    name = device_name or torch.cuda.get_device_name()
    kind = device_kind(name)
    flops = table_peak(kind, precision) if kind else None
    if flops is None:
        return Peak(None, f"no dense {precision} peak known for {name!r}; set metrics.peak_tflops to report MFU")
    return Peak(flops, f"{kind} dense {precision} peak {flops / 1e12:g} TFLOP/s")


def local_memory(device) -> dict[str, float]:
    """This process's peak memory in GiB: torch.cuda.max_memory_allocated / max_memory_reserved
    on a GPU, the peak resident set size on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gib": rss * (1 if platform.system() == "Darwin" else 1024) / GIB}


def gather_memory(device) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Every rank's `local_memory` (a collective: all ranks call it together). Returns the
    TensorBoard scalars -- `memory/<name>` the largest over ranks, `memory/<name>_min` the
    smallest -- and the per-rank values in rank order."""
    import torch
    import torch.distributed as dist

    mine = local_memory(device)
    names = sorted(mine)
    t = torch.tensor([mine[n] for n in names], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
    else:
        parts = [t]
    per_rank = [dict(zip(names, p.tolist())) for p in parts]
    scalars = {}
    for n in names:
        values = [r[n] for r in per_rank]
        scalars[f"memory/{n}"] = max(values)
        scalars[f"memory/{n}_min"] = min(values)
    return scalars, per_rank


@dataclass
class Utilisation:
    tflops_per_device: float  # achieved model TFLOP/s per device
    mfu: Optional[float]  # over the peak; None when the peak is unknown
    hfu: Optional[float]  # hardware FLOPs (recompute counted) over the peak


def utilisation(tokens_per_second: float, model_flops_per_token: float, hardware_flops_per_token: float,
                devices: int, peak: Optional[float]) -> Utilisation:
    """TFLOP/s per device and MFU / HFU of `devices` devices processing `tokens_per_second`."""
    per_device = tokens_per_second * model_flops_per_token / devices
    hw = tokens_per_second * hardware_flops_per_token / devices
    return Utilisation(per_device / 1e12, per_device / peak if peak else None, hw / peak if peak else None)


class RunPerformance:
    """What the training loop logs each interval beside tokens/s: achieved model TFLOP/s per
    device, MFU against `peak` (and HFU, recompute included, under activation checkpointing),
    and every rank's peak memory."""

    def __init__(self, cfg, world_size: int, device, logging_rank: bool):
        from afb_scale.cost import flops_per_token

        self.model_flops = flops_per_token(cfg.model)
        self.recompute = cfg.train.activation_checkpointing
        self.hardware_flops = flops_per_token(cfg.model, recompute=self.recompute)
        self.world_size = world_size
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        # Only the logging rank needs the peak (on CPU it is measured: once, by one process).
        self.peak = peak_flops(cfg.train.precision, cfg.metrics.peak_tflops, cuda=self.cuda) if logging_rank \
            else Peak(None, "not needed on this rank")

    def interval(self, tokens_per_second: float) -> tuple[dict[str, Optional[float]], str]:
        """(TensorBoard scalars, text for the stdout line). A collective: every rank calls it."""
        u = utilisation(tokens_per_second, self.model_flops, self.hardware_flops, self.world_size, self.peak.flops)
        scalars: dict[str, Optional[float]] = {"train/tflops_per_device": u.tflops_per_device, "train/mfu": u.mfu}
        if self.recompute:
            scalars["train/hfu"] = u.hfu
        memory, per_rank = gather_memory(self.device)
        scalars.update(memory)
        for r, values in enumerate(per_rank):
            scalars.update({f"memory_per_rank/rank{r:03d}/{k}": v for k, v in values.items()})
        text = f"{u.tflops_per_device:.3g} TFLOP/s/device"
        if u.mfu is not None:
            text += f" | MFU {100 * u.mfu:.1f}%"
        if self.cuda:
            text += f" | max mem {memory['memory/max_allocated_gib']:.2f} GiB"
        else:
            text += f" | peak RSS {memory['memory/peak_rss_gib']:.2f} GiB"
        return scalars, text
