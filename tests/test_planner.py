"""`afb-scale plan` on a machine without the hardware it plans for: the exact parameter count
from a meta-device model, FLOPs per token, the memory table with a verdict that agrees with what
an H100 did, the time estimate, the layout search, and one-line errors for bad arguments."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from multiproc import run_ranks

from afb_scale import cli
from afb_scale.config import load_config
from afb_scale.cost import GIB, Layout, memory_per_device, parameter_count
from afb_scale.planner import Hardware, estimate, search

EXPERIMENT = "configs/experiments/1.3b-afb-swiglu.yaml"
H100 = Hardware(nodes=1, gpus_per_node=1, memory_gib=80, peak_flops=989e12, peak_label="H100", mfu=0.3)


def plan(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "afb_scale.cli", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, "DS_ACCELERATOR": "cpu"})


def _meta_counts(rank, world, configs):
    from afb_scale.planner import exact_parameter_count

    return [exact_parameter_count(load_config(ROOT / c).model)[::2] for c in configs]


def test_meta_device_count_is_exact():
    configs = [EXPERIMENT, "configs/experiments/125m-afb-gelu.yaml", "configs/experiments/125m-gelu-baseline.yaml"]
    [counts] = run_ranks(_meta_counts, 1, configs)
    for c, (n, how) in zip(configs, counts):
        assert how == "GPTModel built on the meta device"
        assert n == parameter_count(load_config(ROOT / c).model), c
    assert counts[0][0] == 1_309_545_984


def test_plan_1_3b_on_64_gpus_from_a_cpu_machine():
    proc = plan("--config", EXPERIMENT, "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gib", "80",
                "--search", "--top", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "layout: world 64 = TP 8 x PP 1 x DP 8, ZeRO stage 1" in out
    assert "parameters: 1,309,545,984 (GPTModel built on the meta device" in out
    assert re.search(r"FLOPs per token: 9\.04 GFLOP per training token", out), out
    assert "tokens per step: 1,048,576" in out
    for row in ("weights", "gradients", "optimizer states", "activations", "buffers", "total (peak)", "usable"):
        assert re.search(rf"^  {re.escape(row)} +[\d,.]+ ", out, re.M), row
    cfg = load_config(ROOT / EXPERIMENT)
    expected = memory_per_device(cfg.model, Layout.from_config(cfg, 64))
    total = float(re.search(r"^  total \(peak\) +([\d,.]+)", out, re.M).group(1).replace(",", ""))
    assert total == pytest.approx(expected.total / GIB, abs=0.01)
    assert "verdict           fits" in out
    assert re.search(r"time: at 30% MFU of 989 TFLOP/s per device .* step [\d.]+ s", out)
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 5
    tokens_per_s = [float(r.split("|")[11].replace(",", "")) for r in rows]
    assert tokens_per_s == sorted(tokens_per_s, reverse=True)
    ds = json.loads(out[out.index("deepspeed config:") + len("deepspeed config:"):])
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 8


def test_old_interface_and_gpu_only_settings_are_planned_on_cpu():
    proc = plan("--config", "configs/experiments/125m-afb-gelu.yaml", "--world-size", "8",
                "train.precision=fp16", "parallel.zero_stage=2")  # fp16 needs a GPU to train, not to plan
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout: world 8 = TP 1 x PP 1 x DP 8, ZeRO stage 2" in proc.stdout
    assert '"fp16": {\n    "enabled": true' in proc.stdout
    assert "verdict           fits" in proc.stdout


def _cfg(size="1.3b", **train):
    return load_config(ROOT / "configs" / "size" / f"{size}.yaml", [
        "model.ffn_kind=afb-gelu", "train.precision=bf16", "parallel.zero_stage=1",
        *(f"train.{k}={v}" for k, v in train.items())])


def test_verdict_agrees_with_the_h100():
    """On one H100 80GB, 1.3B AFB-GELU without checkpointing ran at micro batch 4 (48.7 GiB)
    and ran out of memory at micro batch 8 (docs/results/gpu.md) -- unfused, before model.afb_fused."""
    four = estimate(_unfused(_cfg(micro_batch_size=4, global_batch_size=4, activation_checkpointing="false")), 1, H100)
    eight = estimate(_unfused(_cfg(micro_batch_size=8, global_batch_size=8, activation_checkpointing="false")), 1, H100)
    assert four.fits and not eight.fits
    assert four.memory.total / GIB == pytest.approx(48.70, rel=0.1)


def _unfused(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, afb_fused="off"))


def _hw(world: int, memory_gib: float = 80) -> Hardware:
    return Hardware(nodes=world // 8, gpus_per_node=8, memory_gib=memory_gib, peak_flops=989e12, peak_label="",
                    mfu=0.3)


def test_time_estimate():
    from afb_scale.cost import flops_per_token

    cfg = _cfg(micro_batch_size=16, global_batch_size=512, activation_checkpointing="false")
    e = estimate(cfg, 32, _hw(32))
    tokens = 512 * 2048
    assert e.tokens_per_step == tokens
    assert e.step_seconds == pytest.approx(tokens * flops_per_token(cfg.model) / (32 * 989e12 * 0.3))
    # recompute costs its forward again
    ckpt = estimate(_cfg(micro_batch_size=16, global_batch_size=512, activation_checkpointing="true"), 32, _hw(32))
    assert ckpt.step_seconds == pytest.approx(e.step_seconds * flops_per_token(cfg.model, recompute=True)
                                              / flops_per_token(cfg.model))
    # a pipeline of 4 stages with 4 micro-batches per step idles 3 of 7 slots
    pp = _cfg(micro_batch_size=16, global_batch_size=512, activation_checkpointing="false")
    pp.parallel.pipeline = 4
    assert estimate(pp, 32, _hw(32)).step_seconds == pytest.approx(e.step_seconds * 7 / 4)


def test_search_finds_only_layouts_that_fit_best_first():
    cfg = load_config(ROOT / EXPERIMENT)
    hw = _hw(16, memory_gib=40)
    results = search(cfg, hw)
    assert results
    assert all(r.fits and r.memory.total <= hw.usable_bytes for r in results)
    assert all(r.layout.tensor <= 8 and r.layout.world_size == 16 for r in results)
    speeds = [r.tokens_per_second for r in results]
    assert speeds == sorted(speeds, reverse=True)
    assert any(r.layout.pipeline > 1 for r in results) and any(r.layout.checkpointing for r in results)
    best = results[0].layout
    assert not best.checkpointing and best.pipeline == 1  # nothing recomputed, no pipeline bubble
    # on 16 GiB devices fewer layouts fit
    small = search(cfg, _hw(16, memory_gib=16))
    assert 0 < len(small) < len(results)


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory-gib", "0"], "--gpu-memory-gib=0 must be > 0"),
    (["--mfu", "30"], "--mfu=30 must be in (0, 1]"),
    (["--nodes", "0"], "--nodes=0 must be >= 1"),
    (["--world-size", "16", "--nodes", "1", "--gpus-per-node", "8"], "--world-size=16 is not --nodes x --gpus-per-node"),
    (["--peak-tflops", "-1"], "--peak-tflops=-1 must be > 0"),
    (["--gpu", "V100"], "--gpu=V100 has no dense bf16 peak"),
    (["metrics.peak_tflops=0"], "metrics.peak_tflops=0.0 must be > 0"),
])
def test_bad_plan_arguments_are_one_line_errors(args, message, capsys):
    assert cli.main(["plan", "--config", str(ROOT / EXPERIMENT), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
