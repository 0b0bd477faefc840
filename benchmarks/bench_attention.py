"""Core attention: torch's fused SDPA (model.attention=sdpa, the default) vs megatron-core's local
DotProductAttention, one GPT training step (forward + backward + AdamW), side by side.

The local attention materialises [b, heads, s, s] scores and probabilities; SDPA does not. Both
models are built from the same seed (attention has no parameters, so they are the same model),
fed the same tokens and timed interleaved (local, sdpa, local, sdpa, ...) after warm-up; the
table reports the median step. Shapes: the quickstart model (d=128, 4 heads, s=128, batch 8, 2
layers) and one 125M layer (d=768, 12 heads) at s=1024 and s=2048.

    PYTHONPATH=. DS_ACCELERATOR=cpu python benchmarks/bench_attention.py          # ~2 min on 2 cores
    ... --quick                                                                    # quickstart only
    ... --device cuda --bf16                                                       # on a GPU

Last line: `sdpa_speedup_quickstart=<local ms / sdpa ms>`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import warnings

import torch

from bench_afb_overhead import Variant, init_one_process_group

# name -> (layers, hidden, heads, seq_length, micro batch)
SHAPES = {"quickstart": (2, 128, 4, 128, 8), "125M-layer-s1024": (1, 768, 12, 1024, 1),
          "125M-layer-s2048": (1, 768, 12, 2048, 1)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true", help="quickstart shape, 1 warm-up, 3 reps")
    a = p.parse_args()
    if a.quick:
        a.shapes, a.warmup, a.reps = "quickstart", 1, 3
    return a


def measure(args, shape):
    from afb_scale.config import ModelConfig

    layers, d, heads, s, mb = SHAPES[shape]
    vocab = 1024
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (mb, s + 1), generator=gen)
    tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    variants = {}
    for attention in ("local", "sdpa"):
        cfg = ModelConfig(num_layers=layers, hidden_size=d, num_attention_heads=heads, ffn_kind="afb-gelu",
                          seq_length=s, vocab_size=vocab, attention=attention)
        variants[attention] = Variant(args, cfg, tokens, labels)
    gc.collect()
    gc.disable()
    try:
        for i in range(args.warmup + args.reps):
            for v in variants.values():
                v.step(record=i >= args.warmup)
    finally:
        gc.enable()
    row = {k: v.median_ms for k, v in variants.items()}
    row["tokens"] = mb * s
    for v in variants.values():
        v.release()
    return row


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)  # "Unknown MLP type"
    torch.set_num_threads(args.threads)
    init_one_process_group(args.device)
    print(f"# core attention: local (megatron) vs SDPA, one training step, afb-gelu\n\ndevice={args.device} "
          f"({'bf16 autocast' if args.bf16 else 'fp32'}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"warmup={args.warmup}, reps={args.reps} (median), interleaved\n")
    print("| shape | local ms | SDPA ms | local tokens/s | SDPA tokens/s | speed-up (local/SDPA) |")
    print("|---|---|---|---|---|---|")
    speedups = {}
    for shape in args.shapes.split(","):
        row = measure(args, shape)
        speedups[shape] = row["local"] / row["sdpa"]
        print(f"| {shape} | {row['local']:.1f} | {row['sdpa']:.1f} | {1e3 * row['tokens'] / row['local']:,.0f} "
              f"| {1e3 * row['tokens'] / row['sdpa']:,.0f} | {speedups[shape]:.3f} |", flush=True)
    print(f"sdpa_speedup_quickstart={speedups.get('quickstart', float('nan')):.3f}")


if __name__ == "__main__":
    main()
