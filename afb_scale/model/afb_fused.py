"""The AFB hidden-unit path as one fused autograd op that recomputes in backward.

    a = 2 sigmoid(gl) * act(h + db)          act = gelu, or SwiGLU's silu(.) * u

is `afb.feedback_hidden` (the readable statement, which this module calls for its forward).
Written as plain torch ops under autograd, that chain materialises six tokens x f tensors in
forward (h + db, gelu, sigmoid, 2 s, their product, ...) and keeps four of them for backward;
each is a full pass over memory, and on CPU each fresh tokens x f buffer is also page faults.
`FusedFeedbackHidden` (which also holds the [Ub; Ug] write GEMM) instead keeps only its inputs
(h, u, the feedback z, the write weight), recomputes [db; gl] = z W^T and every gradient from
them in backward, so with `torch.compile` the elementwise part is one loop each way (inductor's
C++ backend on CPU, Triton on GPU) and the layer keeps the base FFN's tensors plus O(r).

Modes (`model.afb_fused`):
- `off`:  the write GEMM and the unfused `afb.feedback_hidden` under autograd (the reference; bit-exact with the
  base FFN at initialisation).
- `on`:   the fused op with compiled bodies; a compile failure is an error.
- `auto`: the fused op, compiled where compile works; where it does not (no C++ compiler for
  inductor, dynamo unsupported or disabled with TORCHDYNAMO_DISABLE=1) the same op with eager
  bodies, which is slower than `off` per step but still keeps only the inputs for backward.

Numerics: the compiled kernels evaluate erf / exp with inductor's vectorised code, which differs
from ATen's eager kernels by an ulp or so (|diff| <= ~2e-6 on values of order 1 in fp32), so
with a compiled body AFB at initialisation equals the base FFN to that tolerance rather than
bit for bit; `off` and the eager bodies keep bit-exactness.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from afb_scale.model.afb import feedback_hidden

MODES = ("auto", "on", "off")

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _forward_body(h: torch.Tensor, u: torch.Tensor | None, db_gl: torch.Tensor) -> torch.Tensor:
    f = h.shape[-1]
    return feedback_hidden(h, u, db_gl[..., :f], db_gl[..., f:])


def _backward_body(da: torch.Tensor, h: torch.Tensor, u: torch.Tensor | None, db_gl: torch.Tensor):
    """d/d(h, u, [db; gl]) of feedback_hidden, recomputed from the inputs in one pass.

    With p = h + db, s = sigmoid(gl), g = 2 s, a = g * act(p) (* u):
        dp  = da * g * act'(p) (* u)     -- also dh: h and db enter only through p
        dgl = da * act(p) (* u) * 2 s (1 - s)
        du  = da * g * silu(p)
    Returns (du or None, dp, dgl). Not concatenated: a [dp; dgl] buffer would be one more
    tokens x 2f write and read per layer (measured 35 ms a step at the 1.3B shape, seq 1024, on
    CPU); the caller uses the halves of the write weight instead.
    """
    f = h.shape[-1]
    p = h + db_gl[..., :f]
    s = torch.sigmoid(db_gl[..., f:])
    g = 2.0 * s
    if u is None:
        cdf = 0.5 * (1.0 + torch.erf(p * _SQRT1_2))
        act = p * cdf
        dact = cdf + p * torch.exp(-0.5 * p * p) * _INV_SQRT_2PI
        du = None
    else:
        sp = torch.sigmoid(p)
        silu = p * sp
        act = silu * u
        dact = sp * (1.0 + p * (1.0 - sp)) * u
        du = da * g * silu
    dp = da * g * dact
    dgl = da * act * (g * (1.0 - s))
    return du, dp, dgl


@functools.cache
def _compiled():
    # dynamic=False: a training run has one shape per rank; each new shape (the benchmark's) is a
    # recompile of a few seconds, and static shapes give inductor the simplest loops.
    return (torch.compile(_forward_body, dynamic=False), torch.compile(_backward_body, dynamic=False))


# Device types on which compiling failed in this process, with the reason (auto then runs eager).
_compile_failed: dict[str, str] = {}


def _run(which: int, mode: str, device_type: str, *args):
    eager = (_forward_body, _backward_body)[which]
    if device_type in _compile_failed:
        return eager(*args)
    try:
        return _compiled()[which](*args)
    except Exception as err:  # BackendCompilerFailed, a missing compiler, an unsupported Python
        if mode == "on":
            raise RuntimeError(f"model.afb_fused=on: torch.compile failed on {device_type} ({err}); "
                               "use model.afb_fused=auto to fall back to eager bodies") from err
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        _compile_failed[device_type] = reason
        warnings.warn(f"model.afb_fused=auto: torch.compile failed on {device_type} ({reason}); "
                      "the fused AFB path runs its eager bodies")
        return eager(*args)


class FusedFeedbackHidden(torch.autograd.Function):
    """a = feedback_hidden(h, u, db, gl) with [db; gl] = z W^T, W the [Ub; Ug] write weight shard.

    The write matmul is inside the op so that its tokens x 2f output need not be kept: backward
    recomputes it from z (tokens x r) -- one small GEMM, 2 f r multiply-adds per token -- and
    then gets every gradient in one elementwise pass. Saved: h (which the feedback read's weight
    gradient keeps anyway), u, z and W; so the layer keeps the base FFN's tensors plus O(r).
    """

    @staticmethod
    def forward(ctx, h, u, z, weight, mode):
        ctx.mode = mode
        ctx.autocast = (torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type))
        ctx.save_for_backward(h, u, z, weight)
        return _run(0, mode, h.device.type, h, u, torch.nn.functional.linear(z, weight))

    @staticmethod
    def backward(ctx, da):
        h, u, z, weight = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):  # the forward's db_gl exactly
            db_gl = torch.nn.functional.linear(z, weight)
        du, dp, dgl = _run(1, ctx.mode, h.device.type, da.contiguous(), h, u, db_gl)
        f = h.shape[-1]
        # d[db; gl] = [dp; dgl] (dh == d(db) == dp: both enter only through h + db), taken
        # through the write weight's two halves [Ub; Ug] so that no tokens x 2f buffer is formed.
        dp2, dgl2 = dp.reshape(-1, f), dgl.reshape(-1, f)
        w = weight.to(dp2.dtype)
        dz = torch.addmm(dp2 @ w[:f], dgl2, w[f:]).view(z.shape).to(z.dtype)
        z2 = z.reshape(-1, z.shape[-1]).to(dp2.dtype)
        dweight = torch.cat([dp2.t() @ z2, dgl2.t() @ z2]).to(weight.dtype)  # 2f x r: small
        return dp, du, dz, dweight, None


def fused_feedback_hidden(
    h: torch.Tensor, u: torch.Tensor | None, z: torch.Tensor, write_weight: torch.Tensor, mode: str = "auto"
) -> torch.Tensor:
    """The hidden activation a of AFB-FFN from h, u (SwiGLU), the feedback z and the [Ub; Ug] weight.

    z must already be the write's input as megatron's ColumnParallelLinear would use it (all-
    gathered under sequence parallelism, with the backward all-reduce / reduce-scatter of dz):
    parallel_afb.AFBMLP applies those region ops.
    """
    if mode not in MODES:
        raise ValueError(f"afb_fused={mode!r} is not allowed; choose one of {', '.join(MODES)}")
    if mode == "off":
        db, gate_logits = torch.chunk(torch.nn.functional.linear(z, write_weight), 2, dim=-1)
        return feedback_hidden(h, u, db, gate_logits)
    return FusedFeedbackHidden.apply(h, u, z, write_weight, mode)
