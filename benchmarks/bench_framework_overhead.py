"""The training framework's overhead: `afb-scale train` against a bare megatron-core loop.

Both loops run in the same processes, in alternating windows of 10 steps, so that the machine's
speed -- which on a shared host drifts by 20-30% over minutes -- is nearly the same for the two
halves of every pair:

- afb_scale: the real command, `afb_scale.cli.main(["train", ...])` under torchrun (DeepSpeed
  engine, LR schedule, gradient clipping, the non-finite and preemption all-reduce,
  metrics.jsonl, TensorBoard, the stdout progress line and its memory collective -- everything a
  step does), with evaluation and checkpoints set beyond the run (their cost is not per step)
  and the layer metrics off. Its windows are measured from a `trainer.Callback`, the hook point
  the Trainer offers any user: `on_step_begin` of every 10th step closes an afb_scale window and
  runs the bare windows due.
- bare: written here: a megatron-core GPTModel from the same layer spec, seed and shapes,
  torch.optim.AdamW with the same parameter groups, forward / backward / gradient clipping to
  train.clip_grad / step / the same LR schedule, its batches built inline from the same prepared
  dataset, the loss read back once a window. Clipping does what afb_scale's does: the norm summed
  over TP by megatron's rule (each TP-duplicated parameter counted once; one all-reduce per step
  at TP=2, as any TP loop needs for the update not to depend on the layout), and no multiply
  when the norm is under the limit. Both take the cross-entropy on megatron's [b, s, v] logits
  where they lie, without a copy.

Window order alternates (afb, bare, bare, afb, afb, bare, ...) and pair i is windows 2i, 2i+1,
so a speed trend within a pair favours each side equally often. Statistic per layout: the
per-pair ratio afb_scale tokens/s / bare tokens/s, its median, a bootstrap 95% CI of that median
and min..max. One afb_scale window holds one progress line (log_interval 10), as in a real run.
(TensorBoard's writer thread may write that line's scalars during the next bare window: a few
hundred bytes.) An earlier version compared whole `afb-scale train` runs with whole bare runs one
after the other; the pair ratios then spread from 0.77 to 1.12 on a noisy day and could not
decide 3%.

    DS_ACCELERATOR=cpu python benchmarks/bench_framework_overhead.py --malloc-cache   # 9-11 min on 2 cores
    ... --layouts tp1 --reps 4                                                       # quick look

Last line: `framework_overhead_ratio=<median pair ratio>`, the lowest over the layouts run.
Default shape: 4 layers, hidden 256, 4 heads, seq 256, vocab 8192, micro batch 4, GELU FFN, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_afb_overhead import bootstrap_median_ci
from malloc_cache import MALLOC_CACHE  # benchmarks/malloc_cache.py: why and what

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"tp1": 1, "tp2": 2}
SHAPE = {"model.num_layers": 4, "model.hidden_size": 256, "model.num_attention_heads": 4,
         "model.seq_length": 256, "model.vocab_size": 8192, "model.ffn_kind": "gelu",
         "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.precision": "fp32"}
WINDOW = 10  # steps per window, = train.log_interval
WARMUP_WINDOWS = 2  # per variant, untimed
RESULT = "bench-result "  # rank 0's stdout line with the window timings


def schedule(pairs: int) -> list[str]:
    """afb, bare, bare, afb, afb, bare, ...: pair i is windows (2i, 2i+1), its order alternating."""
    out = []
    for i in range(pairs):
        out += ["afb", "bare"] if i % 2 == 0 else ["bare", "afb"]
    return out


def overrides(args, tp: int, run_dir: Path) -> list[str]:
    data = Path(args.data)
    # + 1: the last window closes at on_step_begin of that step, which itself runs untimed
    steps = (WARMUP_WINDOWS + args.reps) * WINDOW + 1
    o = dict(SHAPE)
    o.update({"parallel.tensor": tp, "parallel.pipeline": 1, "parallel.zero_stage": 0,
              "train.steps": steps, "train.warmup_steps": 5, "train.log_interval": WINDOW,
              "train.eval_interval": 10 * steps, "train.eval_iters": 1, "train.save_interval": 10 * steps,
              "train.run_dir": str(run_dir), "metrics.layer_metrics_interval": 0,
              "data.tokenizer": str(data / "tokenizer.model"),
              "data.datasets": f"[{{prefix: {data / 'stdlib_text_document'}, weight: 1.0}}]",
              "data.cache_dir": str(data / "cache")})
    return [f"{k}={v}" for k, v in o.items()]


# ----------------------------------------------------------------------------------------------
# The worker (every rank, under torchrun)


class BareLoop:
    """The bare megatron-core loop, built once the Trainer has set up megatron's parallel state."""

    def __init__(self, cfg, dataset):
        import torch
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate, vocab_parallel_cross_entropy

        from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for
        from afb_scale.training.engine import lr_at, param_groups

        t = cfg.train
        self.torch, self.cross_entropy, self.position_ids_for = torch, vocab_parallel_cross_entropy, position_ids_for
        self.cfg, self.dataset, self.sample = cfg, dataset, 0
        self.model = build_gpt_model(cfg.model, cfg.parallel, "fp32", t.seed)
        self.opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                     betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_at(s, cfg) / t.lr)
        self.mask = causal_attention_mask(cfg.model.seq_length)
        self.params = list(self.model.parameters())
        self.unique = [p for p in self.params if param_is_not_tensor_parallel_duplicate(p)]
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

    def clip(self) -> None:
        """clip_grad_norm_ with the norm over the whole model (squares summed over TP)."""
        torch, dist = self.torch, self.torch.distributed
        grads = [p.grad for p in self.unique if p.grad is not None]
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        total = local.pow(2)
        dist.all_reduce(total, group=self.tp_group)
        norm, max_norm = total.sqrt(), self.cfg.train.clip_grad
        if float(norm) + 1e-6 > max_norm:  # as afb_scale: no multiply by 1.0 (compat/deepspeed.py)
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm, foreach=True)

    def window(self) -> float:
        """WINDOW steps; returns the loss of the last (read back once, as a loop that logs would)."""
        torch, mb = self.torch, self.cfg.train.micro_batch_size
        for _ in range(WINDOW):
            samples = [self.dataset[i] for i in range(self.sample, self.sample + mb)]
            self.sample += mb
            tokens, labels, loss_mask = (torch.stack([torch.as_tensor(s[k]) for s in samples])
                                         for k in ("tokens", "labels", "loss_mask"))
            logits = self.model(tokens, self.position_ids_for(tokens), self.mask)  # [b, s, v / TP]
            losses = self.cross_entropy(logits.float(), labels)
            loss = (losses * loss_mask).sum() / loss_mask.sum()
            loss.backward()
            self.clip()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.item()


def worker(argv: list[str]) -> int:
    import torch.distributed as dist

    from afb_scale import cli
    from afb_scale.training.trainer import Callback

    pairs, config_overrides = int(argv[0]), argv[1:]

    class Interleave(Callback):
        """Times afb_scale's windows and runs the bare windows between them."""

        def __init__(self):
            self.todo = schedule(pairs)
            self.seconds = {"afb": [], "bare": []}
            self.bare = self.started = None

        def on_start(self, trainer):
            self.bare = BareLoop(trainer.cfg, trainer.batches.dataset)
            for _ in range(WARMUP_WINDOWS):
                self.bare.window()

        def on_step_begin(self, trainer):
            if trainer.step % WINDOW or trainer.step < WARMUP_WINDOWS * WINDOW:
                return
            if self.started is not None:  # an afb_scale window ends here
                self.seconds["afb"].append(time.perf_counter() - self.started)
                assert self.todo.pop(0) == "afb"
            while self.todo and self.todo[0] == "bare":
                dist.barrier()  # both loops start their windows with every rank here
                t0 = time.perf_counter()
                self.bare.window()
                self.seconds["bare"].append(time.perf_counter() - t0)
                self.todo.pop(0)
            dist.barrier()
            self.started = time.perf_counter() if self.todo else None

    timer = Interleave()
    status = cli.main(["train", "--config", str(REPO / "configs/quickstart.yaml"), *config_overrides],
                      callbacks=[timer])
    if status == 0 and dist.get_rank() == 0:
        print(RESULT + json.dumps(timer.seconds), flush=True)
    return status


# ----------------------------------------------------------------------------------------------


def run_layout(args, tp: int, scratch: Path) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'benchmarks'}{os.pathsep}"
               f"{os.environ.get('PYTHONPATH', '')}", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS=str(max(1, args.threads // tp)), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}", __file__,
           "--worker", str(args.reps), *overrides(args, tp, scratch / f"tp{tp}")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"error: the tp{tp} worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="tp1,tp2", help="comma-separated: tp1, tp2")
    p.add_argument("--reps", type=int, default=30, help="pairs of 10-step windows per layout")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the ranks")
    p.add_argument("--malloc-cache", action="store_true",
                   help="glibc keeps freed memory for reuse (see benchmarks/malloc_cache.py)")
    p.add_argument("--data", default=str(REPO / "data/default"), help="prepared built-in corpus (made if absent)")
    a = p.parse_args()
    for name in a.layouts.split(","):
        if name not in LAYOUTS:
            p.error(f"--layouts: {name!r} is not one of {', '.join(LAYOUTS)}")
    if a.reps < 2:
        p.error(f"--reps={a.reps} must be >= 2 (one pair in each order)")
    return a


def main() -> int:
    if "--worker" in sys.argv:
        return worker(sys.argv[sys.argv.index("--worker") + 1:])
    args = parse_args()
    if args.malloc_cache:  # inherited by the ranks torchrun starts
        os.environ.update(MALLOC_CACHE)
    if not (Path(args.data) / "tokenizer.model").is_file():
        subprocess.run([sys.executable, "-m", "data_prep.default_corpus", "--out", args.data, "--no-progress"],
                       cwd=REPO, check=True)
    tokens_per_window = WINDOW * SHAPE["train.global_batch_size"] * SHAPE["model.seq_length"]
    print(f"# afb-scale train vs a bare megatron-core loop, in one run: {args.reps} pairs of {WINDOW}-step windows "
          f"per layout, {args.threads} threads, malloc cache {'on' if args.malloc_cache else 'off'}, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="afb_overhead_") as tmp:
        for name in args.layouts.split(","):
            t0 = time.perf_counter()
            seconds = run_layout(args, LAYOUTS[name], Path(tmp))
            afb, bare = ([tokens_per_window / s for s in seconds[k]] for k in ("afb", "bare"))
            ratios = [a / b for a, b in zip(afb, bare)]
            lo, hi = bootstrap_median_ci(ratios, seed=0)
            rows.append((name, afb, bare, ratios, lo, hi))
            print(f"  {name}: {len(ratios)} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    span = lambda xs: f"{statistics.median(xs):,.0f} ({min(xs):,.0f}..{max(xs):,.0f})"  # noqa: E731
    print()
    print("| layout | afb_scale tokens/s (median, min..max) | bare tokens/s (median, min..max) "
          "| ratio, median of pairs | 95% CI | min..max |")
    print("|---|---|---|---|---|---|")
    for name, afb, bare, ratios, lo, hi in rows:
        print(f"| {name} | {span(afb)} | {span(bare)} | {statistics.median(ratios):.3f} | {lo:.3f}..{hi:.3f} "
              f"| {min(ratios):.3f}..{max(ratios):.3f} |")
    print(f"\nLoad average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}. Target: ratio >= 0.97.")
    print(f"framework_overhead_ratio={min(statistics.median(r[3]) for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
