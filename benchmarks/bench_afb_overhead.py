"""AFB-FFN overhead: one GPT training step with the base FFN vs with AFB-FFN, side by side.

Measures design invariant 4 (../shared/design/afb-ffn.md): with r = 64, a training step with
AFB-FFN costs at most 1.05x the same step with the base FFN at the 1.3B shape (d=2048, f=8192),
and the ratio is reported at the 125M shape (d=768, f=3072) too. Both bases are measured:
gelu vs afb-gelu and swiglu vs afb-swiglu (SwiGLU's f is 2/3 of 4d rounded up to a multiple of
64, the config's rule).

One step = forward + backward + torch.optim.AdamW step of a real megatron-core GPTModel built by
afb_scale.model.gpt.build_gpt_model on a one-process gloo (nccl on CUDA) group. The per-layer
shapes (d, f, r, heads) are exact; the depth, sequence length, batch and vocabulary are cut
down (--layers, --seq-length, --micro-batch, --vocab) so a CPU run takes minutes and the
step is dominated by the transformer layers. Both variants of a pair are built from the same
seed, fed the same tokens, and timed interleaved (base, afb, base, afb, ...) after warm-up; the
table reports the median of --reps steps.

    cd /work/wt-bench && PYTHONPATH=. DS_ACCELERATOR=cpu python benchmarks/bench_afb_overhead.py
    ... --quick                         # smoke run: 125M only, 1 layer, 2 reps
    ... --device cuda --bf16 --layers 24 --seq-length 2048 --micro-batch 4   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings

import torch

SHAPES = {"125M": (768, 12), "1.3B": (2048, 16)}  # name -> (hidden d, attention heads)
TARGET = 1.05


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    p.add_argument("--shapes", default="125M,1.3B")
    p.add_argument("--bases", default="gelu,swiglu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64, help="feedback rank r")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true", help="125M only, 1 layer, 1 warm-up, 2 reps")
    a = p.parse_args()
    if a.quick:
        a.shapes, a.layers, a.warmup, a.reps = "125M", 1, 1, 2
    return a


def init_one_process_group(device: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())


def model_config(args, d: int, heads: int, kind: str):
    from afb_scale.config import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=d, num_attention_heads=heads,
                       ffn_kind=kind, feedback_rank=args.rank, seq_length=args.seq_length,
                       vocab_size=args.vocab)


def layer_macs(d: int, f: int, r: int, s: int, gated: bool, afb: bool) -> int:
    """Multiply-adds per token in one transformer layer (attention + FFN, no norms)."""
    attn = 4 * d * d + 2 * s * d  # QKV + output projections, QK^T and AV (unmasked count)
    ffn = (3 if gated else 2) * d * f
    return attn + ffn + (3 * f * r if afb else 0)


class Variant:
    """One model + optimizer + the fixed batch; `step()` runs and times one training step."""

    def __init__(self, args, cfg, tokens, labels):
        from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for

        self.device = torch.device(args.device)
        self.model = build_gpt_model(cfg, seed=args.seed).to(self.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.tokens, self.labels = tokens.to(self.device), labels.to(self.device)
        self.pos = position_ids_for(self.tokens)
        self.mask = causal_attention_mask(cfg.seq_length, self.device)
        self.bf16 = args.bf16
        self.times: list[float] = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, record: bool) -> None:
        self.sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(self.tokens, self.pos, self.mask, labels=self.labels).mean()
        loss.backward()
        self.opt.step()
        self.sync()
        if record:
            self.times.append(time.perf_counter() - t0)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    def release(self):
        del self.model, self.opt


def measure_pair(args, d, heads, base):
    """Build base and AFB models from the same seed and time them interleaved."""
    cfgs = [model_config(args, d, heads, kind) for kind in (base, f"afb-{base}")]
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_length + 1), generator=gen)
    tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    variants = [Variant(args, cfg, tokens, labels) for cfg in cfgs]
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step
    try:
        for i in range(args.warmup + args.reps):
            for v in variants:  # base, afb, base, afb, ...
                v.step(record=i >= args.warmup)
    finally:
        gc.enable()
    f, r = cfgs[0].resolved_ffn_hidden_size, args.rank
    gated = cfgs[0].is_gated
    share = 3 * f * r / layer_macs(d, f, r, args.seq_length, gated, afb=False)
    row = dict(f=f, base_ms=variants[0].median_ms, afb_ms=variants[1].median_ms,
               min_ratio=min(variants[1].times) / min(variants[0].times),
               spread=[(1e3 * min(v.times), 1e3 * max(v.times)) for v in variants],
               base_params=variants[0].params, afb_params=variants[1].params, share=share)
    for v in variants:
        v.release()
    gc.collect()
    return row


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")  # megatron's "Apex/TE not installed" fallbacks
    torch.set_num_threads(args.threads)
    init_one_process_group(args.device)
    dtype = "bf16 autocast" if args.bf16 else "fp32"
    print(f"# AFB-FFN overhead: one training step (fwd + bwd + AdamW), r={args.rank}\n")
    print(f"device={args.device} ({dtype}), torch {torch.__version__}, "
          f"torch.get_num_threads()={torch.get_num_threads()}, layers={args.layers}, "
          f"seq_length={args.seq_length}, micro_batch={args.micro_batch}, vocab={args.vocab}, "
          f"warmup={args.warmup}, reps={args.reps} (median), interleaved base/afb, seed={args.seed}\n")
    print("| shape | base | base ms/step | AFB ms/step | ratio (AFB/base) | target (<= 1.05 at 1.3B) "
          "| params base | params AFB | feedback FLOPs share |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for shape in args.shapes.split(","):
        d, heads = SHAPES[shape]
        for base in args.bases.split(","):
            row = measure_pair(args, d, heads, base)
            ratio = row["afb_ms"] / row["base_ms"]
            verdict = ("PASS" if ratio <= TARGET else "FAIL") if shape == "1.3B" else "(reported)"
            print(f"| {shape} (d={d}, f={row['f']}, h={heads}) | {base} | {row['base_ms']:.1f} "
                  f"| {row['afb_ms']:.1f} | {ratio:.3f} | {verdict} | {row['base_params']:,} "
                  f"| {row['afb_params']:,} | {100 * row['share']:.2f}% |", flush=True)
            (b_lo, b_hi), (a_lo, a_hi) = row["spread"]
            notes.append(f"- {shape} {base}: base {b_lo:.1f}..{b_hi:.1f} ms, AFB {a_lo:.1f}..{a_hi:.1f} ms, "
                         f"ratio of minima {row['min_ratio']:.3f}")
    print("\nSpread over the timed reps (min..max), a check on machine noise; load average "
          f"(1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(notes))
    d, f, r = 2048, 8192, args.rank
    print(f"\nAnalytical: the feedback adds 3*f*r multiply-adds per token per layer (V, Ub, Ug) "
          f"against d*f per base projection (2*d*f FLOPs). At 1.3B GELU: 3*{f}*{r} = {3 * f * r:,} "
          f"= {100 * 3 * f * r / (2 * d * f):.1f}% of the FFN's 2*d*f = {2 * d * f:,} multiply-adds "
          f"(the design page's 3*f*r / (2*2*d*f) = {100 * 3 * f * r / (4 * d * f):.1f}% compares "
          f"them with FLOPs). The share column divides 3*f*r by the base layer's multiply-adds "
          f"(4d^2 + 2*s*d attention + 2df GELU / 3df SwiGLU) at seq_length={args.seq_length}; "
          f"it is the matmul-only lower bound on the per-layer step overhead.")


if __name__ == "__main__":
    main()
