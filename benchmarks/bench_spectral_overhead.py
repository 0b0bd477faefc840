"""Cost of the NerVE spectral diagnostics (afb_scale/metrics/spectral.py, docs/spectral.md).

1. One layer-side's work, per FFN width D: the fp32 covariance of N probe tokens (N x D -> D x D)
   and `eigvalsh` of it, median of --reps, with the memory it needs (X and S in fp32; LAPACK's
   values-only workspace is O(D) more). The time grows as D^3 (tridiagonalisation) once D is in
   the thousands; the table extrapolates the largest measured width to D = 8192.
2. The quickstart (configs/quickstart.yaml: TP = 2 on 2 processes, 300 steps) with the metric
   off (`metrics.spectral_interval=0`) and at its default stride (every train.eval_interval, so
   steps 0, 50, ..., 300), run interleaved (off/on, then on/off, ...). Training time is taken
   from the run's own output: from the `model:` line (just before the first evaluation) to
   `training finished`, so start-up (imports, process groups, dataset build) is left out.
   On a shared machine the run-to-run spread of that time (tens of %) swamps a 1% effect, so each
   "on" run also states its own cost: the sum of its `spectral/seconds` scalars (wall time each
   evaluation held the loop: probe forward, gather, decompositions) over its training time
   minus that sum. Both are printed; the last line is the in-run figure. The table's "steps
   tokens/s" (median over the 10-step log windows that contain no evaluation) separates the two:
   if it differs between "on" and "off" runs as much as the training time does, the difference
   is in the training steps themselves, i.e. the machine, not in the evaluations. A direct estimate from
   part 1 is printed too: evaluations x 2 decompositions per rank (each TP rank owns one of the
   2 layers) at the quickstart's D and N.

    DS_ACCELERATOR=cpu python benchmarks/bench_spectral_overhead.py              # 10-20 min on 2 cores
    ... --pairs 1 --dims 512,1024                                                 # quicker
    ... --skip-quickstart --dims 512,1024,2048,4096,8192                          # part 1 only

Ends with `spectral_overhead_pct=X`: the median over the "on" runs of
100 x sum(spectral/seconds) / (training time - sum(spectral/seconds)).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICKSTART_D, QUICKSTART_N = 512, 8 * 128  # 4 x hidden 128; micro batch 8 x seq 128 (configs/size/tiny.yaml)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="512,1024,2048,4096", help="FFN widths D for part 1")
    p.add_argument("--tokens", type=int, default=QUICKSTART_N, help="probe tokens N for part 1")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where part 1 runs (cuda: cuSOLVER, where a GPU run decomposes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for part 1 (1: what each quickstart rank uses, OMP_NUM_THREADS=1)")
    p.add_argument("--pairs", type=int, default=2, help="interleaved off/on quickstart pairs")
    p.add_argument("--skip-quickstart", action="store_true")
    p.add_argument("--keep-runs", help="write the quickstart runs here (default: a temporary directory)")
    return p.parse_args()


def time_layer_side(d: int, n: int, reps: int, device: str) -> float:
    from afb_scale.metrics.spectral import covariance_spectrum

    x = torch.randn(n, d, device=device) @ torch.randn(d, d, device=device) / d**0.5  # correlated columns
    covariance_spectrum(x)  # warm-up (LAPACK / cuSOLVER workspace, allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        covariance_spectrum(x)  # ends with .cpu() of the eigenvalues: synchronised
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part1(args) -> dict[int, float]:
    torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",")]
    where = f"{args.threads} CPU thread(s)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"## 1. covariance + eigvalsh (fp32) per layer side, N = {args.tokens} tokens, {where}\n")
    print("| D | time (s) | X fp32 (MiB) | S fp32 (MiB) |")
    print("|---:|---:|---:|---:|")
    measured = {}
    for d in dims:
        reps = args.reps if d <= 2048 else max(1, args.reps // 3)
        measured[d] = time_layer_side(d, args.tokens, reps, args.device)
        print(f"| {d} | {measured[d]:.4f} | {args.tokens * d * 4 / 2**20:.1f} | {d * d * 4 / 2**20:.1f} |", flush=True)
    top = max(measured)
    if top < 8192:
        est = measured[top] * (8192 / top) ** 3
        print(f"| 8192 (extrapolated as D^3 from {top}) | ~{est:.0f} | {args.tokens * 8192 * 4 / 2**20:.1f} "
              f"| {8192 * 8192 * 4 / 2**20:.1f} |")
    print()
    return measured


def steps_tokens_per_s(log: Path, eval_interval: int = 50, log_interval: int = 10) -> float:
    """Median tokens/s of the log windows without an evaluation (the one after step k*eval_interval
    ends at k*eval_interval + log_interval)."""
    rates = []
    for line in log.read_text().splitlines():
        m = re.match(r"step\s+(\d+)/\d+ .*\| ([\d,]+) tokens/s", line)
        if m and int(m.group(1)) % eval_interval != log_interval % eval_interval:
            rates.append(float(m.group(2).replace(",", "")))
    return statistics.median(rates) if rates else math.nan


def run_quickstart(run_dir: Path, spectral: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml", f"train.run_dir={run_dir}"]
    if not spectral:
        cmd.append("metrics.spectral_interval=0")  # on: the default stride, no override
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    t0 = time.perf_counter()
    start = end = None
    log = run_dir.with_suffix(".log")  # the whole output, beside the run
    log.parent.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            open(log, "w") as out:
        for line in proc.stdout:
            now = time.perf_counter()
            out.write(line)
            if line.startswith("model:"):
                start = now
            elif line.startswith("training finished"):
                end = now
    if proc.returncode != 0 or start is None or end is None:
        errors = [l for l in log.read_text().splitlines() if "rror" in l][:10]
        raise SystemExit(f"quickstart run failed (exit {proc.returncode}), output in {log}:\n" + "\n".join(errors))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("spectral/")]
    evaluations = len(events.Scalars(tags[0])) if tags else 0
    spent = sum(e.value for e in events.Scalars("spectral/seconds")) if "spectral/seconds" in tags else 0.0
    return {"train_s": end - start, "wall_s": time.perf_counter() - t0, "tags": len(tags),
            "evaluations": evaluations, "spectral_s": spent, "steps_tps": steps_tokens_per_s(log)}


def part2(args, measured: dict[int, float]) -> float:
    root = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="bench_spectral_"))
    print(f"## 2. quickstart (TP = 2, 2 processes, 300 steps), metric off vs default stride; runs in {root}\n")
    print("| pair | variant | training (s) | wall (s) | steps tokens/s | spectral tags | evaluations "
          "| in spectral (s) | in-run overhead |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios, on_runs, off_s = [], [], []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        res = {}
        for spectral in order:
            name = "on" if spectral else "off"
            res[spectral] = r = run_quickstart(root / f"pair{i}_{name}", spectral)
            r["in_run_pct"] = 100 * r["spectral_s"] / (r["train_s"] - r["spectral_s"])
            print(f"| {i} | {name} | {r['train_s']:.1f} | {r['wall_s']:.1f} | {r['steps_tps']:,.0f} | {r['tags']} "
                  f"| {r['evaluations']} "
                  f"| {r['spectral_s']:.2f} | {r['in_run_pct']:.2f}% |", flush=True)
        if res[True]["tags"] == 0 or res[False]["tags"] != 0:
            raise SystemExit("the 'on' run wrote no spectral scalars, or the 'off' run wrote some")
        ratios.append(res[True]["train_s"] / res[False]["train_s"])
        on_runs.append(res[True])
        off_s.append(res[False]["train_s"])
    overhead = statistics.median(r["in_run_pct"] for r in on_runs)
    print()
    print(f"interleaved on/off training-time ratios: {', '.join(f'{r:.4f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.4f}; run-to-run spread on this machine included)")
    shares = ", ".join(f"{r['in_run_pct']:.2f}%" for r in on_runs)
    print(f"in-run: {shares} of training time spent in the "
          f"spectral evaluations (median {overhead:.2f}%)")
    if QUICKSTART_D in measured and args.tokens == QUICKSTART_N and args.device == "cpu":
        evaluations = on_runs[0]["evaluations"]
        direct = evaluations * 2 * measured[QUICKSTART_D] / statistics.median(off_s) * 100
        print(f"direct estimate: {evaluations} evaluations x 2 decompositions per rank x "
              f"{measured[QUICKSTART_D]:.4f} s = {evaluations * 2 * measured[QUICKSTART_D]:.2f} s of "
              f"{statistics.median(off_s):.1f} s training = {direct:.2f}% (leaves out the probe forward and the gather)")
    return overhead


def main() -> None:
    args = parse_args()
    measured = part1(args)
    if args.skip_quickstart:
        print("spectral_overhead_pct=nan")
        return
    overhead = part2(args, measured)
    print(f"spectral_overhead_pct={overhead:.2f}")


if __name__ == "__main__":
    main()
