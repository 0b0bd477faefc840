"""Structured FFN (lowrank / blockdense / blockshuffle) forward + backward time against the dense
GELU FFN, single device, at widths 768, 1536, 2048 (f = 4d) and parameter shares 63% and 32%.

Each rep times every variant once, in a shuffled order (interleaved, so machine load hits all
alike); the table shows the median per variant and its speedup over dense. The guide is off
(the steady state after self-guided training). The paper reports ~1.4x at 63% and ~2.5x at
32% for widths >= 1536 on GPU; these are CPU figures.

Activation memory: the bytes the FFN keeps for its backward per token (one layer; measured with
torch's saved-tensor hooks in one forward, every distinct non-parameter storage once: the
input, the factors' intermediate results, the pre-activation, ...), without the guide and while
the self-guided guide is still mixed in (alpha = 0.5). Exact, not timed, so free of machine noise.
`cost +B/tok` is what the cost model (afb_scale/cost.py layer_activation_bytes, fp32) adds for the
structured kind over the dense GELU layer, per token, to compare with the measured difference.

    python benchmarks/bench_structured_ffn.py [--tokens 2048] [--reps 5] [--widths 768 1536 2048]

Last line: structured_speedup_32pct_2048=<blockshuffle or best-kind speedup at d=2048, 32%>.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from afb_scale.model.structured import ReferenceStructuredFFN, resolve_size


class Dense(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, f), torch.nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def build(kind: str, d: int, share: float):
    f = 4 * d
    if kind == "dense":
        return Dense(d, f), 1.0
    size = resolve_size(kind, d, f, False, share)
    return ReferenceStructuredFFN(kind, d, f, False, size.rank, size.blocks, guide=False), size.share


def saved_bytes_per_token(model, x) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps from one forward, per token."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values()) // x.shape[0]


def cost_model_extra(kind: str, d: int, share: float) -> float:
    """Bytes per token the cost model's layer activation estimate adds for `kind` over dense GELU."""
    from afb_scale import cost
    from afb_scale.config import load_config

    def per_token(overrides: list[str]) -> float:
        m = load_config(None, [f"model.hidden_size={d}", f"model.num_attention_heads={max(1, d // 64)}",
                               "model.hidden_dropout=0", *overrides]).model
        return cost.layer_activation_bytes(m, cost.Layout(precision="fp32", micro_batch=1)) / m.seq_length

    return per_token([f"model.ffn_kind={kind}-gelu", f"model.structured_share={share}"]) - per_token(["model.ffn_kind=gelu"])


def guided(kind: str, d: int, share: float, alpha: float = 0.5):
    """The structured FFN while the self-guided guide is mixed in with weight alpha."""
    f = 4 * d
    size = resolve_size(kind, d, f, False, share)
    model = ReferenceStructuredFFN(kind, d, f, False, size.rank, size.blocks, guide=True)
    for lin in (model.linear_fc1, model.linear_fc2):
        lin.alpha = alpha
    return model


def step_time(model, x) -> float:
    t0 = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--widths", type=int, nargs="+", default=[768, 1536, 2048])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, fp32, median of {args.reps}")
    print(f"{'d':>5} {'share':>6} {'kind':>13} {'achieved':>8} {'ms':>9} {'speedup':>8} {'act B/tok':>10} "
          f"{'vs dense':>8} {'guided B/tok':>12} {'measured +B/tok':>15} {'cost +B/tok':>11}")
    headline = {}
    for d in args.widths:
        variants = {("dense", 1.0): build("dense", d, 1.0)}
        for share in (0.63, 0.32):
            for kind in ("lowrank", "blockdense", "blockshuffle"):
                variants[(kind, share)] = build(kind, d, share)
        x = torch.randn(args.tokens, d, requires_grad=True)
        times = {k: [] for k in variants}
        for k, (m, _) in variants.items():  # warm-up
            step_time(m, x)
        for _ in range(args.reps):
            order = list(variants)
            random.shuffle(order)
            for k in order:
                times[k].append(step_time(variants[k][0], x))
        dense = statistics.median(times[("dense", 1.0)])
        probe = torch.randn(256, d, requires_grad=True)  # saved bytes scale with tokens exactly
        dense_act = saved_bytes_per_token(variants[("dense", 1.0)][0], probe)
        for (kind, share), (model, achieved) in variants.items():
            med = statistics.median(times[(kind, share)])
            label = "100%" if kind == "dense" else f"{share:.0%}"
            act = saved_bytes_per_token(model, probe)
            with_guide = "-" if kind == "dense" else f"{saved_bytes_per_token(guided(kind, d, share), probe):,}"
            model_extra = "-" if kind == "dense" else f"{cost_model_extra(kind, d, share):,.0f}"
            print(f"{d:>5} {label:>6} {kind:>13} {achieved:>8.3f} {med * 1e3:>9.2f} {dense / med:>7.2f}x "
                  f"{act:>10,} {act / dense_act:>8.2f} {with_guide:>12} {act - dense_act:>15,} {model_extra:>11}")
            headline[(d, kind, share)] = dense / med
    d = max(args.widths)
    best = max(headline[(d, k, 0.32)] for k in ("lowrank", "blockdense", "blockshuffle"))
    print(f"structured_speedup_32pct_{d}={best:.2f}")


if __name__ == "__main__":
    main()
