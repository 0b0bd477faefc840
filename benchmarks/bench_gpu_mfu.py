"""Training throughput and MFU of the real engine on one GPU: base FFN vs AFB-FFN, per size.

For each size (configs/size/<name>.yaml), FFN kind and activation-checkpointing setting, this
builds the training engine a run uses (`afb_scale.training.engine.Engine`, DeepSpeed, bf16 at ZeRO-1 on
GPU), feeds it synthetic random tokens at the config's sequence length, one micro-batch per
optimizer step (global batch = micro batch), and times --steps steps after --warmup. MFU is
`afb_scale.cost.mfu` (model FLOPs: full s x s attention, no recompute counted) against --peak.

Micro batch: within one size and checkpointing setting every FFN kind runs at the same micro
batch -- the largest of --micro-batches that all of them fit (tried from the largest down,
catching CUDA out-of-memory) -- so the AFB/base ratio compares the same step. AFB kinds are
tried first (they hold more activations); a kind that fitted a larger micro batch than a later
one is measured again at the smaller one.

Prints one progress line per configuration, a markdown table, the AFB/base step-time ratio per
size and checkpointing setting, and as its last line `afb_base_step_ratio_1.3b=<ratio>` when
1.3b was measured (first AFB kind of --ffn against its base, checkpointing off if measured),
else `mfu=<best MFU>`.

    python3 benchmarks/bench_gpu_mfu.py --json runs/mfu.json          # on one GPU
    python3 benchmarks/bench_gpu_mfu.py --sizes 1.3b --ckpt off       # one size
    DS_ACCELERATOR=cpu python3 benchmarks/bench_gpu_mfu.py --quick    # CPU smoke test (tiny, fp32)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from afb_scale.cost import H100_BF16_DENSE_PEAK, flops_per_token, mfu  # noqa: E402

GIB = 2**30


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="125m,350m,1.3b", help="names of configs/size/<name>.yaml")
    p.add_argument("--ffn", default="gelu,afb-gelu", help="FFN kinds (an AFB kind is compared with its base)")
    p.add_argument("--ckpt", default="both", choices=["both", "on", "off"], help="activation checkpointing")
    p.add_argument("--micro-batches", default="16,8,4,2,1", help="candidates, tried from the largest down")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak", type=float, default=H100_BF16_DENSE_PEAK, help="peak FLOP/s for MFU")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="also write the rows here as JSON")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: tiny, ckpt off, micro batches 2,1, 1 warm-up, 2 steps")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.ckpt, a.micro_batches, a.warmup, a.steps = "tiny", "off", "2,1", 1, 2
    return a


LAYOUT = None


def init_one_process():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    return init_distributed(ParallelConfig(), seed=ARGS.seed)


def make_config(size: str, ffn: str, ckpt: bool, micro: int):
    from afb_scale.config import load_config, validate

    gpu = torch.cuda.is_available()
    cfg = load_config(REPO / "configs" / "size" / f"{size}.yaml", [
        f"model.ffn_kind={ffn}",
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro}",
        f"train.precision={'bf16' if gpu else 'fp32'}",
        f"parallel.zero_stage={1 if gpu else 0}",
        f"train.activation_checkpointing={'true' if ckpt else 'false'}",
        f"train.seed={ARGS.seed}",
    ])
    validate(cfg, 1)
    return cfg


def synthetic_batch(cfg) -> list[dict]:
    """One micro-batch of random tokens, as the training loop hands them to Engine.train_batch."""
    m, micro = cfg.model, cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(ARGS.seed)
    w = torch.randint(0, m.vocab_size, (micro, m.seq_length + 1), generator=gen)
    return [{"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
             "loss_mask": torch.ones(micro, m.seq_length)}]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_engine(cfg) -> dict:
    """Build the engine, run warm-up + timed steps; raises torch.OutOfMemoryError if it does not fit."""
    from afb_scale.training.engine import Engine

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's bf16 optimizer prints memory stats
        engine = Engine(cfg, LAYOUT)
    try:
        batch = synthetic_batch(cfg)
        times = []
        for i in range(ARGS.warmup + ARGS.steps):
            sync()
            t0 = time.perf_counter()
            result = engine.train_batch(batch)
            sync()
            if i >= ARGS.warmup:
                times.append(time.perf_counter() - t0)
        return {"times": times, "loss": result.loss}
    finally:
        free_engine(engine)
        del engine


def free_engine(engine) -> None:
    """Let an Engine's memory go when the last reference to it does.

    DeepSpeed's bf16 optimizer binds methods to every parameter (`p.get_full_hp_grad =
    MethodType(..., p)`, utils/mixed_precision_linkage.py): a cycle through the tensor's __dict__
    that Python's collector cannot break while autograd also holds the tensor. Without this the
    weights and the fp32 master copy of every engine outlived it (7.4 GiB after a 1.3B engine).
    """
    engine.engine.destroy()  # removes the gradient hooks and the parameters' fp32 mappings
    for p in engine.module.parameters():
        for name in [k for k, v in vars(p).items() if isinstance(v, types.MethodType) and v.__self__ is p]:
            delattr(p, name)


def fmt_gib(gib: float | None) -> str:
    return "-" if gib is None else f"{gib:.2f}"


def release_memory() -> float:
    """Free what the last engine held; returns the GiB still allocated (should be ~0)."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / GIB


def measure(size: str, ffn: str, ckpt: bool, micro_batches: list[int]) -> dict | None:
    """The row of the largest micro batch of `micro_batches` that fits, or None if none does."""
    for micro in sorted(micro_batches, reverse=True):
        cfg = make_config(size, ffn, ckpt, micro)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        oom = None
        try:
            t0 = time.perf_counter()
            timed = time_engine(cfg)
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0]
        # Freed outside the except clause: the exception's traceback pins the engine's frames.
        peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
        left = release_memory()
        if oom:
            print(f"  {size} {ffn} ckpt={'on' if ckpt else 'off'} micro_batch={micro}: out of memory "
                  f"({left:.2f} GiB still allocated after freeing)", flush=True)
            continue
        m = cfg.model
        step_s = statistics.median(timed["times"])
        tokens_per_s = micro * m.seq_length / step_s
        row = dict(size=size, ffn=ffn, ckpt=ckpt, micro_batch=micro, seq_length=m.seq_length,
                   precision=cfg.train.precision, zero_stage=cfg.parallel.zero_stage,
                   step_ms=1e3 * step_s, step_ms_min=1e3 * min(timed["times"]),
                   step_ms_max=1e3 * max(timed["times"]), tokens_per_s=tokens_per_s,
                   flops_per_token=flops_per_token(m), mfu=mfu(tokens_per_s, m, ARGS.peak),
                   max_mem_gib=peak, leftover_gib=left, loss=timed["loss"],
                   wall_s=time.perf_counter() - t0)
        print(f"  {size} {ffn} ckpt={'on' if ckpt else 'off'} micro_batch={micro}: "
              f"{row['step_ms']:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, MFU {100 * row['mfu']:.3g}%, "
              f"max mem {fmt_gib(peak)} GiB ({left:.2f} left after freeing), loss {row['loss']:.3f} "
              f"({row['wall_s']:.0f} s)", flush=True)
        return row
    return None


def measure_group(size: str, kinds: list[str], ckpt: bool, micro_batches: list[int]) -> list[dict]:
    """Every kind at one micro batch: the largest that all of them fit (AFB kinds tried first)."""
    rows, cap = {}, max(micro_batches)
    for ffn in sorted(kinds, key=lambda k: not k.startswith("afb-")):
        row = measure(size, ffn, ckpt, [m for m in micro_batches if m <= cap])
        if row is None:
            print(f"  {size} {ffn} ckpt={'on' if ckpt else 'off'}: no micro batch fits", flush=True)
            return list(rows.values())
        rows[ffn], cap = row, row["micro_batch"]
    for ffn, row in rows.items():
        if row["micro_batch"] > cap:
            print(f"  {size} {ffn}: measured again at the group's micro batch {cap}", flush=True)
            rows[ffn] = measure(size, ffn, ckpt, [cap])
    return [rows[k] for k in kinds if rows.get(k)]


def ratios(rows: list[dict]) -> list[dict]:
    """AFB/base step-time ratio for each AFB row whose base was measured at the same micro batch."""
    out = []
    for afb in (r for r in rows if r["ffn"].startswith("afb-")):
        base_kind = afb["ffn"][len("afb-"):]
        for base in rows:
            if (base["size"], base["ffn"], base["ckpt"], base["micro_batch"]) == (
                    afb["size"], base_kind, afb["ckpt"], afb["micro_batch"]):
                out.append(dict(size=afb["size"], ckpt=afb["ckpt"], afb=afb["ffn"], base=base_kind,
                                micro_batch=afb["micro_batch"], ratio=afb["step_ms"] / base["step_ms"]))
    return out


def write_json(rows: list[dict]) -> None:
    if ARGS.json:
        Path(ARGS.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.json).write_text(json.dumps({"rows": rows, "ratios": ratios(rows)}, indent=1) + "\n")


def main():
    warnings.filterwarnings("ignore")  # megatron's "Apex/TE not installed" fallbacks
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # "Unknown MLP type" for the AFB kinds' MLP: megatron then passes its default kwargs, as intended.
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    gpu = torch.cuda.is_available()
    sizes, kinds = ARGS.sizes.split(","), ARGS.ffn.split(",")
    micro_batches = [int(m) for m in ARGS.micro_batches.split(",")]
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[ARGS.ckpt]
    global LAYOUT
    LAYOUT = init_one_process()  # TP = PP = DP = 1: every config here runs on it
    dev = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# Training MFU on {dev}: torch {torch.__version__}, "
          f"{'bf16, ZeRO-1' if gpu else 'fp32, ZeRO-0'}, peak {ARGS.peak / 1e12:.0f} TFLOP/s, "
          f"warmup {ARGS.warmup}, {ARGS.steps} timed steps (median), 1 micro-batch per step\n", flush=True)

    rows = []
    for size in sizes:
        for ckpt in ckpts:
            rows += measure_group(size, kinds, ckpt, micro_batches)
            write_json(rows)  # after each group, so a run cut short keeps what it measured

    print("\n| size | ffn | ckpt | micro batch | step ms (median) | tokens/s | MFU | max mem GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['ffn']} | {'on' if r['ckpt'] else 'off'} | {r['micro_batch']} "
              f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.3g}% "
              f"| {fmt_gib(r['max_mem_gib'])} |")
    rs = ratios(rows)
    print("\nAFB/base step-time ratio (same size, checkpointing and micro batch):")
    for r in rs:
        print(f"- {r['size']} ckpt={'on' if r['ckpt'] else 'off'} micro_batch={r['micro_batch']}: "
              f"{r['afb']}/{r['base']} = {r['ratio']:.3f}")
    if ARGS.json:
        write_json(rows)
        print(f"\nrows written to {ARGS.json}")
    headline = [r for r in rs if r["size"] == "1.3b"]
    if headline:
        r = min(headline, key=lambda r: r["ckpt"])  # checkpointing off if measured
        print(f"afb_base_step_ratio_1.3b={r['ratio']:.4f}")
    else:
        print(f"mfu={max((r['mfu'] for r in rows), default=float('nan')):.4g}")


if __name__ == "__main__":
    ARGS = parse_args()
    try:
        main()
    finally:
        from afb_scale.parallel.groups import destroy_distributed

        destroy_distributed()
