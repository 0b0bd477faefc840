"""The planner's memory model (afb_scale/cost.py) against measured peak memory per rank.

For each case (a model size, FFN kind, layout, precision, micro batch, checkpointing) this
builds the real training engine (`afb_scale.training.engine.Engine`: megatron-core GPTModel under
DeepSpeed) on `world` CPU ranks (forked, gloo), trains a few steps on random tokens and
measures on every rank:

- *model states*: live tensor bytes as the optimizer step of the last step starts (after
  backward: weights, every gradient and the optimizer states exist, activations are gone),
  counted from the storages of the tensors Python holds;
- *peak*: the largest live tensor bytes during the last step (steady state: the optimizer
  states exist from the first step on).

and prints them beside the estimate of `cost.memory_per_device` for that rank's stage.

How memory is measured, and why. On a GPU the reference is torch.cuda.max_memory_allocated:
bytes of live tensors. torch keeps no such statistic for CPU tensors, and the process's
resident set size is a poor stand-in: glibc keeps freed blocks (and its mmap threshold moves
after large frees), the imported libraries are hundreds of MB, and the peak RSS includes the
model build's transients. So each rank runs under torch's profiler with `profile_memory=True`,
which records every CPU tensor allocation and free with its size and time; summing them in
order gives the live tensor bytes at every moment, the CPU analogue of the CUDA allocator's
counters (without its block rounding). Counting starts before the engine is built, so the
weights, optimizer states and DeepSpeed's buffers are all seen being allocated. The count is
checked against Python's view of live tensors before and after the measured step; where the
profiler missed a free inside the step (it does, now and then; the RSS stays flat) the last
column shows by how much the peak may be overstated. The RSS growth over the last step (VmHWM
after clearing it) is printed for comparison, not judged.

The estimate is for `device="cpu"`: torch's AdamW takes its per-tensor path on CPU (its
foreach path, which keeps one more temporary of the optimizer states, only on GPUs). The
GPU comparison (bf16, ZeRO-1, one H100) is in docs/cost.md.

Bounds (the cost-model issue): weights + gradients + optimizer states within 5% of the
measured model states, total within 10% of the measured peak. Last line:
`memory_model_max_error=<largest |estimate - measured| / measured over all ranks and cases>`.

    python3 benchmarks/bench_memory_model.py            # every case, up to d=2048, f=8192 (minutes)
    python3 benchmarks/bench_memory_model.py --quick    # five small cases, 1-2 minutes on 2 cores
    python3 benchmarks/bench_memory_model.py --cases 1.3bw-afb-tp2-z3 --detail --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

MIB = 2**20


@dataclass
class Case:
    name: str
    overrides: list  # config overrides on top of configs/size/tiny.yaml
    world: int
    quick: bool = False  # part of --quick

    def config(self):
        from afb_scale.config import load_config

        return load_config(REPO / "configs" / "size" / "tiny.yaml", [*BASE, *self.overrides])


# Every case: random tokens, vocabulary 8192, no data files; a step is one global batch.
BASE = ["train.steps=10", "train.warmup_steps=1", "model.vocab_size=8192"]


def _case(name, world, quick=False, *, d, f, layers, heads, seq, micro, gas=1, ffn="afb-gelu", tp=1, pp=1, zero=0,
          precision="fp32", ckpt=False, sp=False):
    dp = world // (tp * pp)
    over = [f"model.hidden_size={d}", f"model.ffn_hidden_size={f}", f"model.num_layers={layers}",
            f"model.num_attention_heads={heads}", f"model.seq_length={seq}", f"model.ffn_kind={ffn}",
            f"train.micro_batch_size={micro}", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
            f"parallel.zero_stage={zero}", f"train.precision={precision}",
            f"train.activation_checkpointing={'true' if ckpt else 'false'}",
            f"parallel.sequence_parallel={'true' if sp else 'false'}", f"train.global_batch_size={micro * dp * gas}"]
    return Case(name, over, world, quick)


# "1.3bw": the 1.3B preset's width (d=2048, f=8192, 16 heads) with 2 layers.
W13 = dict(d=2048, f=8192, heads=16, layers=2)
SMALL = dict(d=256, f=1024, heads=4, layers=2)
MID = dict(d=512, f=2048, heads=8, layers=2)
CASES = [
    # activations dominate: long sequences, several micro-batch samples
    _case("small-afb-z0", 1, True, **SMALL, seq=512, micro=8),
    _case("small-gelu-z0", 1, False, **SMALL, seq=512, micro=8, ffn="gelu"),
    _case("small-afbswiglu-z0-ckpt", 1, True, **SMALL, seq=512, micro=8, ffn="afb-swiglu", ckpt=True),
    _case("small-swiglu-tp2-z0", 2, True, **SMALL, seq=512, micro=8, ffn="swiglu", tp=2),
    _case("small-afb-dp2-z1", 2, False, **SMALL, seq=256, micro=4, zero=1),
    _case("small-afb-dp2-z2", 2, False, **SMALL, seq=256, micro=4, zero=2),
    _case("small-afb-dp2-z3", 2, True, **SMALL, seq=256, micro=4, zero=3),
    _case("small-afb-bf16-z1", 1, True, **SMALL, seq=256, micro=4, precision="bf16", zero=1),
    _case("small-afb-pp2-z1", 2, False, **SMALL, seq=256, micro=4, gas=4, pp=2, zero=1),
    _case("mid-afb-z0-gas2", 1, False, **MID, seq=512, micro=4, gas=2),
    _case("mid-afb-tp2-sp-z0", 2, False, **MID, seq=512, micro=4, tp=2, sp=True),
    _case("mid-afb-bf16-z3", 1, False, **MID, seq=256, micro=4, precision="bf16", zero=3),
    # the 1.3B width: model states dominate
    _case("1.3bw-afb-tp2-z0", 2, False, **W13, seq=256, micro=2, tp=2),
    _case("1.3bw-afb-tp2-z3", 2, False, **W13, seq=256, micro=2, tp=2, zero=3),
    _case("1.3bw-gelu-tp2-z3-ckpt", 2, False, **{**W13, "layers": 4}, seq=256, micro=2, ffn="gelu", tp=2, zero=3,
          ckpt=True),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the small cases")
    p.add_argument("--cases", help="comma-separated case names (default: all, or the quick ones)")
    p.add_argument("--steps", type=int, default=3, help="steps per case (>= 2); the last is measured")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--detail", action="store_true", help="print the estimate's terms and both sides' phase peaks")
    a = p.parse_args()
    if a.steps < 2:
        p.error("--steps must be >= 2: the optimizer states appear in the first step")
    return a


# ----------------------------------------------------------------------------------------------
# One rank: train `steps` steps under the profiler and measure the last one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _synthetic(cfg, dp: int, dp_rank: int, step: int) -> list[dict]:
    """This rank's micro-batches of random tokens, as the training loop hands them to the engine."""
    import torch

    m, t = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    out = []
    for _ in range(t.global_batch_size // (t.micro_batch_size * dp)):
        w = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=gen)
        out.append({"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
                    "loss_mask": torch.ones(t.micro_batch_size, m.seq_length)})
    return out


def gc_live_bytes() -> int:
    """Bytes of the distinct storages of every CPU tensor Python holds (or has not collected)."""
    import gc

    import torch

    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _marked(fn, name: str):
    from torch.profiler import record_function

    def marked(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return marked


def _mark_phases(engine) -> None:
    """Profiler ranges around forward, backward and the optimizer step of DeepSpeed's engine
    (the pipeline engine runs its instructions through a class-level map)."""
    ds = engine.engine
    for method, label in (("_take_model_step", "optimizer_step"), ("forward", "forward"), ("backward", "backward")):
        ds.__dict__[method] = _marked(getattr(ds, method), f"bench::{label}")
    if hasattr(ds, "_INSTRUCTION_MAP"):
        from deepspeed.runtime.pipe import schedule

        names = {schedule.ForwardPass: "bench::forward", schedule.BackwardPass: "bench::backward"}
        ds._INSTRUCTION_MAP = {kind: _marked(fn, names[kind]) if kind in names else fn
                               for kind, fn in ds._INSTRUCTION_MAP.items()}


class Timeline:
    """Live CPU tensor bytes over time, from the profiler's allocation and free events."""

    def __init__(self, prof):
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self.times, self.live = [], []
        live = 0
        for t, n in mem:
            live += n
            self.times.append(t)
            self.live.append(live)
        self.marks: dict[str, list[tuple[int, int]]] = {}
        for e in events:
            if e.name().startswith("bench::"):
                self.marks.setdefault(e.name(), []).append((e.start_ns(), e.end_ns()))
        for v in self.marks.values():
            v.sort()

    def at(self, t: int) -> int:
        import bisect

        i = bisect.bisect_right(self.times, t) - 1
        return self.live[i] if i >= 0 else 0

    def peak(self, a: int, b: int) -> int:
        import bisect

        lo, hi = bisect.bisect_left(self.times, a), bisect.bisect_right(self.times, b)
        return max(self.live[lo:hi], default=self.at(a))


def rank_main(rank: int, world: int, port: int, case: Case, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        cfg = case.config()
        from afb_scale.config import data_parallel_size, validate

        validate(cfg, world)
        from afb_scale.parallel.groups import init_distributed

        layout = init_distributed(cfg.parallel, seed=cfg.train.seed)
        from megatron.core import parallel_state

        from afb_scale.training.engine import Engine

        dp, dp_rank = data_parallel_size(cfg, world), parallel_state.get_data_parallel_rank()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        gc_at: dict[str, int] = {}
        rss: dict[str, int] = {}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("bench::start"):
                gc_at["start"] = gc_live_bytes()
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's start-up chatter
                engine = Engine(cfg, layout)
            _mark_phases(engine)
            inner_step = engine.engine._take_model_step

            def probed_step(*args, **kwargs):  # Python's view of live tensors as the step starts
                gc_at["optimizer_step"] = gc_live_bytes()
                return inner_step(*args, **kwargs)

            engine.engine.__dict__["_take_model_step"] = probed_step
            for step in range(steps):
                batch = _synthetic(cfg, dp, dp_rank, step)
                last = step == steps - 1
                if last:
                    with record_function("bench::before"):
                        gc_at["before"] = gc_live_bytes()
                    rss["reset"] = _reset_peak_rss()
                    rss["start"] = _vm("VmRSS")
                with record_function(f"bench::step{step}"):
                    result = engine.train_batch(batch)
                if last:
                    rss["peak"] = _vm("VmHWM")
                    with record_function("bench::after"):
                        gc_at["after"] = gc_live_bytes()
        tl = Timeline(prof)
        start = tl.marks["bench::start"][0][0]
        s0, s1 = tl.marks[f"bench::step{steps - 1}"][0]

        # The profiler's count against Python's view of live tensors before and after the
        # measured step. The profiler misses a free now and then (seen: one step's gradients,
        # in about one run in ten; and a few MiB every step with ZeRO-3 and activation
        # checkpointing together, while the process's RSS stayed flat over 12 steps: the count
        # drifts, the memory does not). A difference from before the step is subtracted; one
        # that appears inside it is reported, and the case measured again if it matters.
        def drift(mark):
            return (tl.at(tl.marks[f"bench::{mark}"][0][0]) - tl.at(start)) - (gc_at[mark] - gc_at["start"])

        base = tl.at(start) + drift("before")
        phases = {}
        for label in ("forward", "backward", "optimizer_step"):
            for a, b in tl.marks.get(f"bench::{label}", []):
                if s0 <= a <= s1:
                    phases[label] = max(phases.get(label, 0), tl.peak(a, b) - base)
        queue.put((rank, "ok", dict(
            # model states: Python's view at the last optimizer step (no activation is alive
            # then, so nothing is held only by autograd's C++ side)
            rank=rank, stage=stage, dp_rank=dp_rank, peak=tl.peak(s0, s1) - base,
            states=gc_at["optimizer_step"] - gc_at["start"],
            phases=phases, drift_in_step=drift("after") - drift("before"), loss=result.loss,
            rss_growth=(rss["peak"] - rss["start"]) if rss["reset"] else None)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from afb_scale.parallel.groups import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def run_case(case: Case, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(r, case.world, port, case, steps, queue)) for r in range(case.world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, status, payload = queue.get(timeout=1800)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}: {payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 120)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in sorted(results)]


# ----------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    import torch

    from afb_scale.config import data_parallel_size
    from afb_scale.cost import Layout, memory_per_device

    # Import megatron-core and DeepSpeed once here: every forked rank inherits them.
    import afb_scale.training.engine  # noqa: F401, E402

    cases = [c for c in CASES if c.quick or not args.quick]
    if args.cases:
        names = args.cases.split(",")
        unknown = sorted(set(names) - {c.name for c in CASES})
        if unknown:
            print(f"error: unknown case(s) {', '.join(unknown)}; known: {', '.join(c.name for c in CASES)}",
                  file=sys.stderr)
            return 2
        cases = [c for c in CASES if c.name in names]
    print(f"# Memory model vs measured peak live tensor bytes per rank (CPU, torch {torch.__version__}, "
          f"{os.cpu_count()} cores); {args.steps} steps per case, the last measured\n", flush=True)
    print("| case | rank | params | est. states MiB | meas. states MiB | err | est. peak MiB | meas. peak MiB "
          "| err | peak phase (est.) | RSS growth MiB | count drift MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows, worst = [], 0.0
    for case in cases:
        cfg = case.config()
        t0 = time.perf_counter()
        for attempt in range(3):
            measured = run_case(case, args.steps)
            # A count that drifted inside the measured step overstates the peak by at most the
            # drift: below 0.5% of the peak it is reported (last column), above it measured again.
            if all(abs(m["drift_in_step"]) <= 0.005 * m["peak"] for m in measured):
                break
            print(f"  ({case.name}: the profiler's count drifted inside the measured step; measuring again)",
                  flush=True)
        else:
            print(f"  ({case.name}: the count drifted in 3 attempts; the rows below overstate the measured peak "
                  "by up to the drift shown)", flush=True)
        layout = Layout.from_config(cfg, case.world, device="cpu")
        for m in measured:
            est = memory_per_device(cfg.model, layout, stage=m["stage"], dp_rank=m["dp_rank"])
            e_states, e_peak = est.at_step, est.total
            err_s = (e_states - m["states"]) / m["states"]
            err_p = (e_peak - m["peak"]) / m["peak"]
            worst = max(worst, abs(err_s), abs(err_p))
            row = dict(case=case.name, rank=m["rank"], stage=m["stage"], params=est.params,
                       est_states=e_states, meas_states=m["states"], err_states=err_s,
                       est_peak=e_peak, meas_peak=m["peak"], err_peak=err_p, phase=est.phase,
                       rss_growth=m["rss_growth"], count_drift=m["drift_in_step"], seconds=time.perf_counter() - t0,
                       layout=dict(tp=layout.tensor, pp=layout.pipeline, dp=data_parallel_size(cfg, case.world),
                                   zero=layout.zero_stage, precision=layout.precision, micro=layout.micro_batch,
                                   gas=layout.grad_accum, ckpt=layout.checkpointing))
            rows.append(row)
            rss = "-" if m["rss_growth"] is None else f"{m['rss_growth'] / MIB:.0f}"
            print(f"| {case.name} | {m['rank']} | {est.params / 1e6:.1f}M | {e_states / MIB:.1f} "
                  f"| {m['states'] / MIB:.1f} | {100 * err_s:+.1f}% | {e_peak / MIB:.1f} | {m['peak'] / MIB:.1f} "
                  f"| {100 * err_p:+.1f}% | {est.phase} | {rss} | {m['drift_in_step'] / MIB:.1f} |", flush=True)
            if args.detail:
                print("    estimated peak by phase: " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in est.phases.items()))
                print("    measured peak by phase: " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in m["phases"].items()))
                for k, v in est.detail.items():
                    print(f"    {k}: {v / MIB:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    within = all(abs(r["err_states"]) <= 0.05 and abs(r["err_peak"]) <= 0.10 for r in rows)
    print(f"\nbounds (model states 5%, peak 10%): {'met' if within else 'NOT met'} on every rank")
    print(f"memory_model_max_error={worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
