"""One forward + backward of a single-device reference FFN, the values TP tests compare against."""

import torch


def reference_step(ref: torch.nn.Module, seq: int, batch: int, hidden: int):
    """(state, x, probe, output, dL/dx, parameter grads) for L = sum(ref(x) * probe), x and probe random."""
    x = torch.randn(seq, batch, hidden, requires_grad=True)
    probe = torch.randn(seq, batch, hidden)
    (ref(x) * probe).sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    state = {n: p.detach() for n, p in ref.named_parameters()}
    return state, x.detach(), probe, ref(x).detach(), x.grad, grads
