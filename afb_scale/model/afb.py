"""AFB-FFN on one device, in plain torch: the readable statement of the math.

See ../shared/design/afb-ffn.md. Per token, with x the input after the pre-norm:

    h   = W1 x (+ b1)                 # SwiGLU also u = W3 x
    z   = gelu(V h + c)               # feedback read, rank r
    db  = Ub z                        # bias correction (Ub zero-initialised)
    g   = 2 * sigmoid(Ug z)           # per-unit gate in (0, 2), 1 at init (Ug zero-initialised)
    a   = g * act(h + db)             # SwiGLU: g * silu(h + db) * u
    y   = W2 a (+ b2)

The tensor-parallel layer (parallel_afb.py) calls `feedback_hidden` and `feedback_statistics`
below, so the hidden-unit math is written once; it is checked against `ReferenceAFBFFN` in the
tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BASES = ("gelu", "swiglu")
FEEDBACK = ("none", "afb")


def base_activation(h: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """GELU when there is no linear branch `u`, SwiGLU (silu(h) * u) when there is."""
    return F.gelu(h) if u is None else F.silu(h) * u


def feedback_hidden(
    h: torch.Tensor, u: torch.Tensor | None, db: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    """a = 2 sigmoid(Ug z) * act(h + db): the bias correction and the per-unit gate.

    With db = 0 and gate_logits = 0 this is exactly act(h) (2 * 0.5 == 1 in floating point),
    which is what makes AFB-FFN the base FFN bit for bit at initialisation.
    """
    return 2.0 * torch.sigmoid(gate_logits) * base_activation(h + db, u)


@torch.no_grad()
def feedback_statistics(
    h: torch.Tensor, db: torch.Tensor, gate_logits: torch.Tensor, a: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over the tokens and the hidden units this device holds (reduced over TP by the caller).

    - entropy_bits: sum of the binary entropy of s = sigmoid(gate_logits), in bits, so that the
      mean is 1 when every gate sits at its initial value and 0 when saturated.
    - db_sq, h_sq: sums of squares, for the bias-correction ratio rms(db) / rms(h).
    - a_sum: per-unit sum of the hidden activation over tokens, for activation drift.
    """
    logits = gate_logits.float()
    s = torch.sigmoid(logits)
    # H(s) = -s log s - (1-s) log(1-s), written with softplus to stay finite when saturated.
    entropy = s * F.softplus(-logits) + (1.0 - s) * F.softplus(logits)
    units = h.shape[-1]
    count = lambda n: torch.tensor(float(n), device=h.device)  # noqa: E731  (stacked with the sums)
    return {
        "entropy_bits": entropy.sum() / math.log(2.0),
        "elements": count(h.numel()),
        "db_sq": db.float().pow(2).sum(),
        "h_sq": h.float().pow(2).sum(),
        "a_sum": a.float().reshape(-1, units).sum(0),
        "tokens": count(h.numel() // units),
    }


class ReferenceAFBFFN(nn.Module):
    """Single-device AFB-FFN (or the plain base FFN with feedback='none').

    Parameter names follow the design page: W1, b1, W3, V, c, Ub, Ug, W2, b2 (weights stored
    as [out, in], like torch.nn.Linear).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        base: str = "gelu",
        feedback: str = "afb",
        feedback_rank: int = 64,
        bias: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"base={base!r} is not allowed; choose one of {', '.join(BASES)}")
        if feedback not in FEEDBACK:
            raise ValueError(f"feedback={feedback!r} is not allowed; choose one of {', '.join(FEEDBACK)}")
        if feedback_rank < 1:
            raise ValueError(f"feedback_rank={feedback_rank} must be >= 1")
        d, f, r = hidden_size, ffn_hidden_size, feedback_rank
        self.base, self.feedback = base, feedback

        def normal(*shape, std):
            return nn.Parameter(torch.randn(*shape) * std)

        self.W1 = normal(f, d, std=init_std)
        self.b1 = nn.Parameter(torch.zeros(f)) if bias else None
        self.W3 = normal(f, d, std=init_std) if base == "swiglu" else None
        self.W2 = normal(d, f, std=init_std)
        self.b2 = nn.Parameter(torch.zeros(d)) if bias else None
        if feedback == "afb":
            self.V = normal(r, f, std=1.0 / math.sqrt(f))  # fan-in normal
            self.c = nn.Parameter(torch.zeros(r))
            self.Ub = nn.Parameter(torch.zeros(f, r))
            self.Ug = nn.Parameter(torch.zeros(f, r))
        self.last_stats: dict[str, torch.Tensor] | None = None
        self.collect_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.W1, self.b1)
        u = F.linear(x, self.W3) if self.W3 is not None else None
        if self.feedback == "none":
            a = base_activation(h, u)
        else:
            z = F.gelu(F.linear(h, self.V, self.c))
            db = F.linear(z, self.Ub)
            gate_logits = F.linear(z, self.Ug)
            a = feedback_hidden(h, u, db, gate_logits)
            if self.collect_stats:
                self.last_stats = feedback_statistics(h, db, gate_logits, a)
        return F.linear(a, self.W2, self.b2)
