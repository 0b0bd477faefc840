"""The training framework's overhead: `afb-scale train` against a bare megatron-core loop.

Both train the same megatron-core GPTModel (built from the same layer spec, same seed) on real
batches of the same prepared dataset, with the same process count, one after the other in
alternation, the order flipped every pair (afb, bare, bare, afb, ...):

- afb_scale: the real command, `torchrun -m afb_scale.cli train` (DeepSpeed engine, LR
  schedule, gradient clipping, non-finite and preemption checks, metrics.jsonl, TensorBoard,
  stdout progress, a checkpoint at the end -- everything a run does).
- bare: this file as a torchrun worker: megatron-core's parallel_state, the GPTModel,
  torch.optim.AdamW, forward / backward / gradient clipping to train.clip_grad / step / LR
  schedule (the same training math; clipping's norm is local here, not summed over TP), the
  loss read back every log interval.

Throughput is the median of the logged windows' tokens/s (10 steps each, the first window --
compilation and warm-up -- dropped) per run, then the median over the reps. Default shapes are the
issue's: 4 layers, hidden 256, 4 heads, seq 256, vocab 8192, micro batch 4, GELU, fp32.

    PYTHONPATH=. DS_ACCELERATOR=cpu python benchmarks/bench_framework_overhead.py            # ~8 min on 2 cores
    ... --layouts tp1 --reps 2 --steps 40                                                     # quick look
    ... --malloc-cache     # glibc keeps freed memory in both variants (benchmarks/malloc_cache.py)

Last line: `framework_overhead_ratio=<afb_scale tokens/s / bare tokens/s>`, the lowest over the
layouts run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from malloc_cache import MALLOC_CACHE  # benchmarks/malloc_cache.py: why and what

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"tp1": 1, "tp2": 2}
SHAPE = {"model.num_layers": 4, "model.hidden_size": 256, "model.num_attention_heads": 4,
         "model.seq_length": 256, "model.vocab_size": 8192, "model.ffn_kind": "gelu",
         "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.precision": "fp32"}
LOG_INTERVAL = 10
TOKENS_PER_S = re.compile(r"\|\s*([\d,]+) tokens/s")


def overrides(args, tp: int, run_dir: Path) -> list[str]:
    data = Path(args.data)
    o = dict(SHAPE)
    o.update({"parallel.tensor": tp, "parallel.pipeline": 1, "parallel.zero_stage": 0,
              "train.steps": args.steps, "train.warmup_steps": 5, "train.log_interval": LOG_INTERVAL,
              "train.eval_interval": 10 * args.steps, "train.eval_iters": 1, "train.save_interval": 10 * args.steps,
              "train.run_dir": str(run_dir), "metrics.layer_metrics_interval": 0,
              "data.tokenizer": str(data / "tokenizer.model"),
              "data.datasets": f"[{{prefix: {data / 'stdlib_text_document'}, weight: 1.0}}]",
              "data.cache_dir": str(data / "cache")})
    return [f"{k}={v}" for k, v in o.items()]


def torchrun(nproc: int, target: list[str], threads: int) -> str:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:8])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def steady_tokens_per_s(stdout: str) -> float:
    windows = [float(m.group(1).replace(",", "")) for m in TOKENS_PER_S.finditer(stdout)]
    if len(windows) < 3:
        sys.exit(f"error: expected >= 3 logged windows, got {len(windows)}:\n{stdout[-2000:]}")
    return statistics.median(windows[1:])


def run_afb(args, tp: int, scratch: Path, rep: int) -> float:
    run_dir = scratch / f"afb-tp{tp}-{rep}"
    out = torchrun(tp, ["-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml",
                        *overrides(args, tp, run_dir)], args.threads_per_rank)
    return steady_tokens_per_s(out)


def run_bare(args, tp: int, scratch: Path, rep: int) -> float:
    run_dir = scratch / f"bare-tp{tp}-{rep}"
    out = torchrun(tp, [__file__, "--worker", *overrides(args, tp, run_dir)], args.threads_per_rank)
    return steady_tokens_per_s(out)


# ----------------------------------------------------------------------------------------------
# The bare loop (a torchrun worker)


def bare_worker(override_args: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from afb_scale.compat import megatron as megatron_compat
    from afb_scale.config import load_config
    from afb_scale.data.datasets import build_datasets, samples_needed
    from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for
    from afb_scale.training.engine import lr_at

    megatron_compat.apply()
    cfg = load_config(str(REPO / "configs/quickstart.yaml"), override_args)
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tensor)
    torch.manual_seed(cfg.train.seed)
    model = build_gpt_model(cfg.model, cfg.parallel, "fp32", cfg.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.train.lr)
    train_ds, _, _ = build_datasets(cfg, samples_needed(cfg))
    mask = causal_attention_mask(cfg.model.seq_length)
    mb = cfg.train.micro_batch_size
    window_start, tokens_per_step = time.perf_counter(), mb * cfg.model.seq_length
    for step in range(1, cfg.train.steps + 1):
        samples = [train_ds[i] for i in range((step - 1) * mb, step * mb)]
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
        loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples])
        logits = model(tokens, position_ids_for(tokens), mask)  # [b, s, v / TP]
        losses = vocab_parallel_cross_entropy(logits.float(), labels)
        loss = (losses * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % LOG_INTERVAL == 0:
            value = loss.item()
            now = time.perf_counter()
            if dist.get_rank() == 0:
                print(f"step {step} | loss {value:.4f} | {tokens_per_step * LOG_INTERVAL / (now - window_start):,.0f} "
                      "tokens/s", flush=True)
            window_start = time.perf_counter()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="tp1,tp2", help="comma-separated: tp1, tp2")
    p.add_argument("--reps", type=int, default=3, help="alternating pairs per layout")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the ranks")
    p.add_argument("--malloc-cache", action="store_true",
                   help="glibc keeps freed memory for reuse in both variants' processes (see benchmarks/malloc_cache.py)")
    p.add_argument("--data", default=str(REPO / "data/default"), help="prepared built-in corpus (made if absent)")
    a = p.parse_args()
    for name in a.layouts.split(","):
        if name not in LAYOUTS:
            p.error(f"--layouts: {name!r} is not one of {', '.join(LAYOUTS)}")
    if a.steps < 4 * LOG_INTERVAL:
        p.error(f"--steps={a.steps} must be >= {4 * LOG_INTERVAL} (three measured windows after the first)")
    return a


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        return bare_worker(sys.argv[i + 1:])
    args = parse_args()
    if args.malloc_cache:  # inherited by every process torchrun starts: both variants alike
        os.environ.update(MALLOC_CACHE)
    if not (Path(args.data) / "tokenizer.model").is_file():
        subprocess.run([sys.executable, "-m", "data_prep.default_corpus", "--out", args.data, "--no-progress"],
                       cwd=REPO, check=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="afb_overhead_") as tmp:
        for name in args.layouts.split(","):
            tp = LAYOUTS[name]
            args.threads_per_rank = max(1, args.threads // tp)
            afb, bare = [], []
            for rep in range(args.reps):
                # Alternate which variant runs first: a machine that speeds up or slows down over
                # minutes would otherwise always favour the second of each pair.
                if rep % 2 == 0:
                    afb.append(run_afb(args, tp, Path(tmp), rep))
                    bare.append(run_bare(args, tp, Path(tmp), rep))
                else:
                    bare.append(run_bare(args, tp, Path(tmp), rep))
                    afb.append(run_afb(args, tp, Path(tmp), rep))
                print(f"  {name} rep {rep + 1}/{args.reps}: afb_scale {afb[-1]:,.0f} tokens/s, bare {bare[-1]:,.0f}",
                      flush=True)
            ratios = [a / b for a, b in zip(afb, bare)]
            rows.append((name, statistics.median(afb), min(afb), max(afb), statistics.median(bare), min(bare),
                         max(bare), statistics.median(ratios), min(ratios), max(ratios)))
    print()
    print("| layout | afb_scale tokens/s (median, min..max) | bare tokens/s (median, min..max) "
          "| ratio (median of pairs, min..max) |")
    print("|---|---|---|---|")
    for name, a, a0, a1, b, b0, b1, r, r0, r1 in rows:
        print(f"| {name} | {a:,.0f} ({a0:,.0f}..{a1:,.0f}) | {b:,.0f} ({b0:,.0f}..{b1:,.0f}) | {r:.3f} ({r0:.3f}..{r1:.3f}) |")
    print(f"\nshapes: {SHAPE}; {args.steps} steps, windows of {LOG_INTERVAL}, {args.reps} alternating pairs, "
          f"{args.threads} CPU threads, malloc cache {'on' if args.malloc_cache else 'off'}")
    print(f"framework_overhead_ratio={min(r[7] for r in rows):.3f}")


if __name__ == "__main__":
    main()
