"""AFB-FFN's feedback path as one fused autograd op that recomputes in backward.

    z = gelu(V h + c),   [db; gl] = [Ub; Ug] z,   a = 2 sigmoid(gl) * act(h + db)

(act = gelu, or SwiGLU's silu(.) * u; the last step is `afb.feedback_hidden`, the readable
statement, which this module calls for its forward). Written as plain torch ops under autograd,
the hidden-unit chain materialises six tokens x f tensors in forward (h + db, gelu, sigmoid,
2 s, their product, ...) and keeps four of them for backward; each is a full pass over memory,
and on CPU each fresh tokens x f buffer is also page faults. `FusedFeedback` (the read, the write
and the hidden-unit chain of one tensor-parallel rank) instead keeps only h, u, the feedback's
tokens x r tensors and the weights, recomputes [db; gl] and every gradient from them in
backward, so with `torch.compile` the elementwise part is one loop each way (inductor's C++
backend on CPU, Triton on GPU) and the layer keeps the base FFN's tensors plus O(r).

Modes (`model.afb_fused`):
- `off`:  megatron's parallel linears for the read and the write and the unfused
  `afb.feedback_hidden` under autograd (the reference; bit-exact with the base FFN at initialisation).
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


def _tp_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


class FusedFeedback(torch.autograd.Function):
    """a = feedback_hidden(h, u, db, gl): the whole feedback path of one tensor-parallel rank.

        vh = all_reduce(h V_k^T) + c       the read, row-parallel over this rank's units
        z  = gelu(vh)                      replicated over TP
        [db; gl] = z W_k^T                 the write, column-parallel (W_k = [Ub_k; Ug_k])

    Why the read is inside the op and not megatron's RowParallelLinear: h has two consumers,
    the read and the hidden-unit path. Apart, autograd adds their two tokens x f gradients in
    one more pass over memory; here dh = dp + dvh V_k is one GEMM accumulating into dp.
    Backward recomputes [db; gl] from z (2 f r multiply-adds per token) instead of keeping it,
    so the op keeps h, u, vh, z and the weights: the base FFN's tensors plus 2r per token.

    Under sequence parallelism megatron reduce-scatters vh, adds c and applies gelu on the
    sequence shard, and all-gathers z for the write (the reverse in backward); one all-reduce of
    tokens x r here moves the same data and gives the same z. The one difference kept: c's
    gradient sums only this rank's shard of the sequence, as megatron's does, because the
    engine then sums `sequence_parallel` parameters' gradients over TP.
    """

    @staticmethod
    def forward(ctx, h, u, read_weight, read_bias, write_weight, mode, tp_group, sequence_parallel):
        f = h.shape[-1]
        h2 = h.reshape(-1, f)  # a view, also for SwiGLU's strided half of fc1's output
        vh = torch.nn.functional.linear(h2, read_weight)
        if _tp_size(tp_group) > 1:
            torch.distributed.all_reduce(vh, group=tp_group)
        vh = vh + read_bias
        z = torch.nn.functional.gelu(vh)
        ctx.mode, ctx.tp_group, ctx.sequence_parallel = mode, tp_group, sequence_parallel
        ctx.read_bias_dtype = read_bias.dtype
        ctx.autocast = (torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type))
        ctx.save_for_backward(h, u, read_weight, write_weight, vh, z)
        db_gl = torch.nn.functional.linear(z, write_weight).view(*h.shape[:-1], 2 * f)
        z_out = z.view(*h.shape[:-1], -1)
        ctx.mark_non_differentiable(z_out)
        return _run(0, mode, h.device.type, h, u, db_gl), z_out

    @staticmethod
    def backward(ctx, da, _z_grad):
        h, u, read_weight, weight, vh, z = ctx.saved_tensors
        f = h.shape[-1]
        enabled, dtype = ctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):  # the forward's db_gl exactly
            db_gl = torch.nn.functional.linear(z, weight).view(*h.shape[:-1], 2 * f)
        du, dp, dgl = _run(1, ctx.mode, h.device.type, da.contiguous(), h, u, db_gl)
        # d[db; gl] = [dp; dgl] (dh == d(db) == dp: both enter only through h + db), taken
        # through the write weight's two halves [Ub; Ug] so that no tokens x 2f buffer is formed.
        dp2, dgl2 = dp.view(-1, f), dgl.view(-1, f)
        w = weight.to(dp2.dtype)
        dz = torch.addmm(dp2 @ w[:f], dgl2, w[f:])
        z2 = z.to(dp2.dtype)
        dweight = torch.cat([dp2.t() @ z2, dgl2.t() @ z2]).to(weight.dtype)  # 2f x r: small
        size = _tp_size(ctx.tp_group)
        if size > 1:  # each rank's units gave part of dz
            torch.distributed.all_reduce(dz, group=ctx.tp_group)
        # gelu's gradient in vh's dtype (fp32 under autocast, as autograd takes it), the GEMMs in
        # the dtype the forward's autocast ran them in
        dvh = torch.ops.aten.gelu_backward(dz.to(vh.dtype), vh)
        if ctx.sequence_parallel and size > 1:
            rank = torch.distributed.get_rank(ctx.tp_group)
            dvh_shard = dvh.view(size, -1, dvh.shape[-1])[rank]  # tokens run sequence-major
        else:
            dvh_shard = dvh
        dbias = dvh_shard.sum(0).to(ctx.read_bias_dtype)
        dvh = dvh.to(dp2.dtype)
        # (h^T dvh)^T, not dvh^T h: the same GEMM, 10-25% faster in MKL at r = 64 (tokens as K).
        dread = (h.reshape(-1, f).t() @ dvh).t().to(read_weight.dtype)
        # into dp, this op's own buffer; out= rather than addmm_, which torch's FLOP counter misses
        dh = torch.addmm(dp2, dvh, read_weight.to(dvh.dtype), out=dp2)
        return dh.view(dp.shape), du, dread, dbias, dweight, None, None, None


def fused_feedback(
    h: torch.Tensor,
    u: torch.Tensor | None,
    read_weight: torch.Tensor,
    read_bias: torch.Tensor,
    write_weight: torch.Tensor,
    mode: str = "auto",
    tp_group=None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, z): AFB-FFN's hidden activation from fc1's output h (u: SwiGLU's linear branch), and the
    feedback z (detached; for the layer metrics).

    h is this rank's slice of hidden units for all tokens of the micro-batch (under sequence
    parallelism fc1 has already all-gathered the sequence); the weights are this rank's shards
    of V (r x f_k), c (r) and [Ub_k; Ug_k] (2 f_k x r). For mode "off" use the modules instead:
    parallel_afb.AFBMLP does.
    """
    if mode not in ("auto", "on"):
        raise ValueError(f"afb_fused={mode!r} is not allowed here; choose one of auto, on")
    return FusedFeedback.apply(h, u, read_weight, read_bias, write_weight, mode, tp_group, sequence_parallel)
