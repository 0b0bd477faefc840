"""AFB-FFN overhead: one GPT training step with the base FFN vs with AFB-FFN, paired and interleaved.

Measures design invariant 4 (../shared/design/afb-ffn.md): with r = 64, a training step with
AFB-FFN costs at most 1.05x the same step with the base FFN at the 1.3B shape (d=2048, f=8192
GELU / 5504 SwiGLU), reported at the 125M shape (d=768) too, for both bases and at two
sequence lengths.

One step = forward + backward + torch.optim.AdamW step of a real megatron-core GPTModel built by
afb_scale.model.gpt.build_gpt_model on a one-process gloo (nccl on CUDA) group. The per-layer
shapes (d, f, r, heads) are exact; depth, batch and vocabulary are cut down (--layers,
--micro-batch, --vocab) so a CPU run takes minutes. Both variants of a pair are built from the
same seed and fed the same tokens.

Deciding 5% on a shared machine: rep i times one base step and one AFB step back to back (order
alternating base-first / AFB-first, so drift within a pair cancels over the reps), and the
statistic is the per-pair ratio AFB_i / base_i: its median, a bootstrap 95% CI of that median
(resampling the pairs), and its min..max. Load that lasts longer than a pair hits both halves.
Beside it, the median over the same pairs of the ratio without the AdamW step (fwd + bwd: where
AFB's extra work is) and each variant's AdamW time: a diagnosis of where the cost lies, not the verdict.

Also per variant: peak memory of one step (CUDA: max_memory_allocated; CPU: the rise of the
process's peak RSS over the step, measured after malloc_trim, with /proc/self/clear_refs resetting
the peak) and the bytes kept for backward per layer and token, FFN block and whole transformer
layer (saved-tensor hooks, each storage counted once, parameters excluded).

    PYTHONPATH=. DS_ACCELERATOR=cpu python benchmarks/bench_afb_overhead.py           # full table
    ... --quick                          # 1.3B only, seq 256, 1 layer, 5 reps (a smoke run)
    ... --shapes 1.3B --seq-lengths 256  # the done-criterion rows
    ... --afb-fused off                  # the unfused AFB path, for comparison
    ... --malloc-cache                   # CPU: freed memory kept for reuse (less kernel time and noise)
    ... --device cuda --bf16 --layers 24 --seq-lengths 2048 --micro-batch 4   # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import time
import warnings

import torch
from malloc_cache import MALLOC_CACHE  # benchmarks/malloc_cache.py: why and what

SHAPES = {"125M": (768, 12), "1.3B": (2048, 16)}  # name -> (hidden d, attention heads)
TARGET, CI_TARGET = 1.05, 1.07


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    p.add_argument("--shapes", default="125M,1.3B")
    p.add_argument("--bases", default="gelu,swiglu")
    p.add_argument("--seq-lengths", default="256,1024")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64, help="feedback rank r")
    p.add_argument("--afb-fused", default="auto", choices=["auto", "on", "off"], help="model.afb_fused of the AFB variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=15, help="timed pairs (>= 15 to decide 5%%)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true", help="1.3B, seq 256, 1 layer, 1 warm-up, 5 pairs")
    p.add_argument("--malloc-cache", action="store_true",
                   help="CPU: keep freed memory in glibc's heap instead of returning it to the OS (see MALLOC_CACHE)")
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.seq_lengths, a.layers, a.warmup, a.reps = "1.3B", "256", 1, 1, 5
    for key, allowed in (("shapes", SHAPES), ("bases", ("gelu", "swiglu"))):
        for value in getattr(a, key).split(","):
            if value not in allowed:
                p.error(f"--{key} {value!r} is not allowed; choose from {', '.join(allowed)}")
    for value in a.seq_lengths.split(","):
        if not value.isdigit() or int(value) < 1:
            p.error(f"--seq-lengths {value!r} is not allowed; give positive integers, comma-separated")
    for key in ("layers", "micro_batch", "vocab", "rank", "reps", "threads"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} {getattr(a, key)} is not allowed; it must be >= 1")
    return a


def init_one_process_group(device: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())


def model_config(args, d: int, heads: int, kind: str, seq: int):
    from afb_scale.config import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=d, num_attention_heads=heads, ffn_kind=kind,
                       feedback_rank=args.rank, seq_length=seq, vocab_size=args.vocab, afb_fused=args.afb_fused)


def _rss_peak_reset() -> int:
    """Give freed heap back (malloc_trim), reset the peak RSS; returns the current RSS in bytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return -1
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


class Variant:
    """One model + optimizer + the fixed batch; `step()` runs and times one training step."""

    def __init__(self, args, cfg, tokens, labels):
        from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for

        self.device = torch.device(args.device)
        self.model = build_gpt_model(cfg, seed=args.seed).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.tokens, self.labels = tokens.to(self.device), labels.to(self.device)
        self.pos = position_ids_for(self.tokens)
        self.mask = causal_attention_mask(cfg.seq_length, self.device)
        self.bf16 = args.bf16
        self.times: list[float] = []  # whole steps
        self.opt_times: list[float] = []  # their AdamW part (proportional to the parameter count)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def loss(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(self.tokens, self.pos, self.mask, labels=self.labels).mean()

    def step(self, record: bool) -> None:
        self.sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.sync()
        t1 = time.perf_counter()
        self.opt.step()
        self.sync()
        if record:
            t2 = time.perf_counter()
            self.times.append(t2 - t0)
            self.opt_times.append(t2 - t1)

    def peak_step_bytes(self) -> int:
        """Peak memory of one step above what is resident before it (-1 if not measurable)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.step(record=False)
            return torch.cuda.max_memory_allocated() - before
        before = _rss_peak_reset()
        if before < 0:
            return -1
        self.step(record=False)
        return _status_kb("VmHWM") * 1024 - before

    def saved_bytes_per_token(self) -> tuple[float, float]:
        """Bytes kept for backward per token by layer 1's FFN block and by the whole layer."""
        layer = self.model.decoder.layers[0]
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        inside = {"layer": False, "mlp": False}
        seen = {"layer": {}, "mlp": {}}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                for where, on in inside.items():
                    if on:
                        seen[where][storage.data_ptr()] = storage.nbytes()
            return t

        def flag(where, value):
            return lambda *_: inside.__setitem__(where, value)

        handles = [layer.register_forward_pre_hook(flag("layer", True)), layer.register_forward_hook(flag("layer", False)),
                   layer.mlp.register_forward_pre_hook(flag("mlp", True)), layer.mlp.register_forward_hook(flag("mlp", False))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = self.loss()
            del loss
        finally:
            for h in handles:
                h.remove()
        tokens = self.tokens.numel()
        return sum(seen["mlp"].values()) / tokens, sum(seen["layer"].values()) / tokens

    def release(self):
        del self.model, self.opt


def bootstrap_median_ci(ratios: list[float], seed: int, n: int = 4000) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def measure_pair(args, d, heads, base, seq):
    """Build base and AFB models from the same seed and time them in interleaved pairs."""
    cfgs = [model_config(args, d, heads, kind, seq) for kind in (base, f"afb-{base}")]
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, seq + 1), generator=gen)
    tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    variants = [Variant(args, cfg, tokens, labels) for cfg in cfgs]
    for _ in range(args.warmup):  # includes the AFB variant's compile on its first step
        for v in variants:
            v.step(record=False)
    saved = [v.saved_bytes_per_token() for v in variants]
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step
    try:
        for i in range(args.reps):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                v.step(record=True)
    finally:
        gc.enable()
    peaks = [v.peak_step_bytes() for v in variants]
    base_t, afb_t = variants[0].times, variants[1].times
    ratios = [a / b for a, b in zip(afb_t, base_t)]
    # the same pairs without AdamW: where AFB's extra work is (its optimizer part only tracks its 3 f r
    # extra parameters per layer)
    fwd_bwd = [(a - ao) / (b - bo) for a, ao, b, bo in zip(afb_t, variants[1].opt_times, base_t, variants[0].opt_times)]
    row = dict(f=cfgs[0].resolved_ffn_hidden_size, base_ms=1e3 * statistics.median(base_t),
               afb_ms=1e3 * statistics.median(afb_t), ratio=statistics.median(ratios),
               ci=bootstrap_median_ci(ratios, args.seed), lo=min(ratios), hi=max(ratios),
               fwd_bwd=statistics.median(fwd_bwd), opt_ms=[1e3 * statistics.median(v.opt_times) for v in variants],
               peaks=peaks, saved=saved)
    for v in variants:
        v.release()
    del variants
    gc.collect()
    return row


def kernel_path(device_type: str, mode: str) -> str:
    from afb_scale.model import afb_fused

    if mode == "off":
        return "unfused (afb.feedback_hidden under autograd)"
    if device_type in afb_fused._compile_failed:
        return f"fused, eager bodies (compile failed: {afb_fused._compile_failed[device_type]})"
    fwd, _ = afb_fused._compiled()
    return "fused, eager bodies (dynamo disabled)" if fwd is afb_fused._forward_body else "fused, torch.compile'd bodies"


def main(argv=None):
    args = parse_args(argv)
    if args.malloc_cache and args.device == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_CACHE.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **MALLOC_CACHE})
    warnings.filterwarnings("ignore")  # megatron's "Apex/TE not installed" fallbacks
    torch.set_num_threads(args.threads)
    init_one_process_group(args.device)
    dtype = "bf16 autocast" if args.bf16 else "fp32"
    print(f"# AFB-FFN overhead: one training step (fwd + bwd + AdamW), r={args.rank}\n")
    print(f"device={args.device} ({dtype}), torch {torch.__version__}, torch.get_num_threads()="
          f"{torch.get_num_threads()}, layers={args.layers}, micro_batch={args.micro_batch}, vocab={args.vocab}, "
          f"warmup={args.warmup}, pairs={args.reps} (interleaved, alternating order), seed={args.seed}, "
          f"model.afb_fused={args.afb_fused}, malloc cache {'on' if args.malloc_cache else 'off'}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| shape | base | seq | base ms | AFB ms | AFB/base median | 95% CI | min..max | fwd+bwd AFB/base "
          "| AdamW ms base / AFB | peak MiB base / AFB | saved B/token FFN base / AFB | layer base / AFB | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst_13b = None
    for shape in args.shapes.split(","):
        d, heads = SHAPES[shape]
        for base in args.bases.split(","):
            for seq in (int(s) for s in args.seq_lengths.split(",")):
                row = measure_pair(args, d, heads, base, seq)
                lo, hi = row["ci"]
                if shape == "1.3B":
                    ok = row["ratio"] <= TARGET and hi <= CI_TARGET
                    verdict = "PASS" if ok else "FAIL"
                    worst_13b = row["ratio"] if worst_13b is None else max(worst_13b, row["ratio"])
                else:
                    verdict = "(reported)"
                mib = lambda b: "n/a" if b < 0 else f"{b / 2**20:.0f}"  # noqa: E731
                (fb, lb), (fa, la) = row["saved"]
                print(f"| {shape} (d={d}, f={row['f']}) | {base} | {seq} | {row['base_ms']:.1f} | {row['afb_ms']:.1f} "
                      f"| {row['ratio']:.3f} | {lo:.3f}..{hi:.3f} | {row['lo']:.3f}..{row['hi']:.3f} | {row['fwd_bwd']:.3f} "
                      f"| {row['opt_ms'][0]:.0f} / {row['opt_ms'][1]:.0f} "
                      f"| {mib(row['peaks'][0])} / {mib(row['peaks'][1])} | {fb:,.0f} / {fa:,.0f} "
                      f"| {lb:,.0f} / {la:,.0f} | {verdict} |", flush=True)
    print(f"\nAFB path: {kernel_path(args.device, args.afb_fused)}. Load average (1, 5, 15 min) at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    print(f"Verdict at 1.3B: median <= {TARGET} and the CI's upper end <= {CI_TARGET}. The ratio is per pair "
          "(AFB step / the base step timed next to it); the CI bootstraps the median over the pairs.")
    print("fwd+bwd: the median over the same pairs of the step times less their AdamW step (AFB's extra work; "
          "its AdamW part grows only with its 3 f r extra parameters per layer).")
    print("Peak: the rise of peak memory over one step (CPU: process peak RSS after malloc_trim; includes "
          "gradients and AdamW state allocated on that step if absent before). Saved: bytes kept for backward "
          "per token in layer 1 (its FFN block; the whole transformer layer), parameters excluded.")
    r = args.rank
    print(f"Analytical: the feedback adds 3*f*r multiply-adds per token and layer; at 1.3B GELU 3*8192*{r} = "
          f"{3 * 8192 * r:,}, {100 * 3 * 8192 * r / (2 * 2048 * 8192):.1f}% of the FFN's 2*d*f.")
    if worst_13b is not None:
        print(f"afb_overhead_1.3B_max={worst_13b:.3f}")


if __name__ == "__main__":
    sys.exit(main())
