"""NerVE spectral diagnostics: how an FFN's nonlinearity reshapes its activations' eigenspectrum.

After Jha & Reagen, "NerVE: Nonlinear Eigenspectrum Dynamics in LLM Feed-Forward Networks"
(ICLR 2026). Per FFN layer, on the fixed probe batch, with tokens flattened to N x D (D the FFN
hidden width):

- X_pre: the up-projection output h, its bias included (SwiGLU: the gated half, the one that goes
  through silu); X_post: the down-projection's input (AFB: a, after gate and bias correction).
- S = (X - mean)^T (X - mean) / (N - 1) in fp32; eigenvalues by `eigvalsh`, sorted descending,
  clamped at 1e-12; p_i = l_i / sum(l).
- spectral entropy SE = -sum p ln p; participation ratio PR = (sum l)^2 / sum l^2; early
  enrichment EEE = sum_k (C_k - k/D) / (D/2) with C_k = sum_{i<=k} l_i / sum l, clamped to
  [0, 1]; JS divergence of the sorted pre and post spectra; PR gain = PR_post / PR_pre and
  dEEE = EEE_post - EEE_pre.

Capture works for megatron's own MLP (gelu / swiglu kinds) and `AFBMLP` alike: a forward hook
on `linear_fc1` and a forward pre-hook on `linear_fc2`, installed only inside `collect_spectra`
(so ordinary steps run no hook at all). Tensor parallelism gives each rank D/t columns; the
covariance needs all D, so each layer's columns are gathered to one *owner* rank of the TP group
(layers dealt round-robin), which alone builds S and runs the eigendecompositions: the D x D
work is split over the TP ranks, and the others never hold a full N x D. Pipeline stages see
only their own layers; `probe_spectral_metrics` merges every stage's plain floats.
Costs and the schedule at large D: docs/spectral.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import torch
import torch.distributed as dist
from megatron.core.transformer.mlp import MLP

from afb_scale.metrics.layer_metrics import transformer_layers

EIG_FLOOR = 1e-12
SIDES = ("pre", "post")


# ---------------------------------------------------------------------------------------------
# The metrics on one spectrum (float64 on the host: D numbers, the eigendecomposition was the cost)


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the fp32 token covariance of x [N, D], descending, clamped; float64, CPU."""
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the covariance needs at least 2 tokens, got {n}")
    x = x.float()
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (n - 1)
    # A diagnostic must not stop a run: eigvalsh raises on non-finite input (an overflowing bf16
    # activation), so such a layer reports NaN, which the logger leaves out.
    if not bool(torch.isfinite(cov).all()):
        return torch.full((cov.shape[0],), math.nan, dtype=torch.float64)
    try:
        # Runs where the activations are (cuSOLVER on a GPU); only the D eigenvalues leave it.
        eig = torch.linalg.eigvalsh(cov)
    except torch.linalg.LinAlgError:  # no convergence
        return torch.full((cov.shape[0],), math.nan, dtype=torch.float64)
    return eig.flip(0).clamp_min(EIG_FLOOR).double().cpu()


def _probabilities(eig: torch.Tensor) -> torch.Tensor:
    return eig / eig.sum()


def spectral_entropy(eig: torch.Tensor) -> float:
    p = _probabilities(eig)
    return float(-(p * p.log()).sum())


def participation_ratio(eig: torch.Tensor) -> float:
    return float(eig.sum() ** 2 / (eig**2).sum())


def early_enrichment(eig: torch.Tensor) -> float:
    """EEE: how far the cumulative spectrum runs above the diagonal (0 isotropic, 1 - 1/D rank 1)."""
    d = eig.numel()
    cumulative = eig.cumsum(0) / eig.sum()
    k = torch.arange(1, d + 1, dtype=eig.dtype)
    return float(((cumulative - k / d).sum() / (d / 2)).clamp(0.0, 1.0))


def js_divergence(eig_p: torch.Tensor, eig_q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats, at most ln 2) of two sorted spectra of the same width."""
    if eig_p.shape != eig_q.shape:
        raise ValueError(f"spectra of different widths: {eig_p.numel()} vs {eig_q.numel()}")
    p, q = _probabilities(eig_p), _probabilities(eig_q)
    m = (p + q) / 2
    # Every term is finite: the eigenvalue floor keeps p, q and m positive.
    return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())


def spectrum_metrics(eig_pre: torch.Tensor, eig_post: torch.Tensor) -> dict[str, float]:
    """Every per-layer scalar, keyed by its TensorBoard tag suffix."""
    out = {}
    for side, eig in zip(SIDES, (eig_pre, eig_post)):
        out[f"{side}_entropy"] = spectral_entropy(eig)
        out[f"{side}_participation_ratio"] = participation_ratio(eig)
        out[f"{side}_eee"] = early_enrichment(eig)
    out["js"] = js_divergence(eig_pre, eig_post)
    out["pr_gain"] = out["post_participation_ratio"] / out["pre_participation_ratio"]
    out["delta_eee"] = out["post_eee"] - out["pre_eee"]
    return out


def layer_spectral_metrics(x_pre: torch.Tensor, x_post: torch.Tensor) -> dict[str, float]:
    """The metrics of one layer from full [N, D] activations (one device)."""
    return spectrum_metrics(covariance_spectrum(x_pre), covariance_spectrum(x_post))


# ---------------------------------------------------------------------------------------------
# Capturing X_pre / X_post from megatron MLPs


def ffn_layers(model: torch.nn.Module) -> dict[str, MLP]:
    """Every FFN (megatron `MLP`, AFB included) by name: `layerNN`, the global layer number, inside
    a transformer (the same under any pipeline split; layer_metrics.transformer_layers), else its
    module path."""
    by_layer = {name: t.mlp for name, t in transformer_layers(model).items() if isinstance(t.mlp, MLP)}
    return by_layer or {n or "mlp": m for n, m in model.named_modules() if isinstance(m, MLP)}


def _capture_pre(store: dict, gated: bool, module, args, output) -> None:
    h, bias = output
    if bias is not None:  # megatron returns fc1's bias separately (skip_bias_add)
        h = h + bias
    if gated:
        # megatron chunks [x_glu, x_linear] on the last dim, per shard (fc1 is stride-2), and
        # silu goes to the first half: that is the pre-activation.
        h = torch.chunk(h, 2, dim=-1)[0].contiguous()
    store.setdefault("pre", []).append(h.detach().reshape(-1, h.shape[-1]))


def _capture_post(store: dict, module, args) -> None:
    a = args[0]
    store.setdefault("post", []).append(a.detach().reshape(-1, a.shape[-1]))


@contextlib.contextmanager
def collect_spectra(model: torch.nn.Module, enabled: bool = True):
    """Capture every FFN's local X_pre / X_post during the forward passes inside the block.

    Yields {layer name: {"pre": [N x D/t tensors], "post": [...]}}; several forward passes append
    tokens. With enabled=False nothing is hooked (ranks whose results would be discarded).
    """
    layers = ffn_layers(model) if enabled else {}
    captured: dict[str, dict] = {name: {} for name in layers}
    handles = []
    for name, mlp in layers.items():
        gated = bool(mlp.config.gated_linear_unit)
        handles.append(mlp.linear_fc1.register_forward_hook(functools.partial(_capture_pre, captured[name], gated)))
        handles.append(mlp.linear_fc2.register_forward_pre_hook(functools.partial(_capture_post, captured[name])))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _gather_columns(local: torch.Tensor, owner: int, group, rank: int, world: int) -> torch.Tensor | None:
    """The full [N, D] on the owner (TP rank k holds columns [k D/t, (k+1) D/t)); None elsewhere."""
    if world == 1:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(world)] if rank == owner else None
    dist.gather(local, parts, dst=dist.get_global_rank(group, owner), group=group)
    return torch.cat(parts, dim=1) if rank == owner else None


def reduce_spectra(captured: dict[str, dict], tp_group=None) -> dict[str, dict[str, float]]:
    """The metrics of the layers this rank owns (collective over the TP group).

    Layer i of this stage is owned by TP rank i % t. All gathers come first, so the owners then
    run their eigendecompositions at the same time; captured activations are released as they
    are gathered (peak memory: the owned layers' full N x D, plus one D x D and its workspace).
    """
    distributed = tp_group is not None and dist.is_initialized()
    world = dist.get_world_size(tp_group) if distributed else 1
    rank = dist.get_rank(tp_group) if distributed else 0
    owned = {}
    for i, (name, store) in enumerate(captured.items()):
        if not store:
            continue  # this layer did not run (cannot differ between TP ranks: same layers)
        owner = i % world
        full = {side: _gather_columns(torch.cat(store.pop(side)), owner, tp_group, rank, world) for side in SIDES}
        if rank == owner:
            owned[name] = full
    out = {}
    for name in list(owned):
        full = owned.pop(name)
        out[name] = layer_spectral_metrics(full["pre"], full["post"])
        del full
    return out


def spectral_tags(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"spectral/{name}/{key}": value for name, metrics in per_layer.items() for key, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The training loop's entry points


def spectral_due(step: int, spectral_interval: int | None, eval_interval: int) -> bool:
    """metrics.spectral_interval: None (the default) follows train.eval_interval, 0 is off."""
    interval = eval_interval if spectral_interval is None else spectral_interval
    return bool(interval) and step % interval == 0


def probe_spectral_metrics(engine, probe: list[dict]) -> dict[str, float]:
    """Spectral scalars of every FFN layer on the probe batch, on every rank (collective).

    Every rank runs the probe forward (evaluation reduces over data-parallel ranks), but only
    data-parallel replica 0 captures and decomposes: the other replicas hold different probe
    tokens, and one probe's numbers are what the log keeps. Results travel as plain floats.

    Also `spectral/seconds`: how long this call held the loop (every rank waits for the last
    owner in the final gather), so a run states its own overhead at any scale.
    """
    t0 = time.perf_counter()
    replica0 = engine.layout.data_rank == 0
    with collect_spectra(engine.module, enabled=replica0) as captured:
        engine.evaluate(probe)
    mine = reduce_spectra(captured, engine.layout.groups.tensor) if replica0 else {}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged = {name: metrics for part in gathered for name, metrics in part.items()}
    return {**spectral_tags(dict(sorted(merged.items()))), "spectral/seconds": time.perf_counter() - t0}
