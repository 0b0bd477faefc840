"""Language-model loss and token accuracy on vocab-parallel logits (shared by both engines)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    loss_mask = loss_mask.to(per_token.dtype)
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1)


@torch.no_grad()
def vocab_parallel_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean [same shape as labels]: does argmax over the full (sharded) vocabulary hit the label?

    Each TP rank holds a contiguous slice of the vocabulary. Ties break to the lowest index, as
    torch.argmax does, so the answer is the same at every TP degree.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    local_max, local_arg = logits.float().max(-1)
    if world == 1:
        return local_arg == labels
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    offset = dist.get_rank(group) * logits.shape[-1]
    candidate = torch.where(local_max == global_max, local_arg + offset, torch.full_like(local_arg, 2**62))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate == labels


class LMLoss:
    """Masked mean cross-entropy over megatron-layout logits [s, b, v/t] (storage either way); labels [b, s].

    When `track_accuracy` is set it also counts argmax hits (for validation), which the
    pipeline engine cannot return beside the loss.
    """

    def __init__(self):
        self.track_accuracy = False
        self.correct = 0.0
        self.counted = 0.0

    def reset_accuracy(self) -> None:
        self.correct = self.counted = 0.0

    def __call__(self, logits: torch.Tensor, labels_and_mask) -> torch.Tensor:
        labels, loss_mask = labels_and_mask
        # The logits are the step's largest activation, so they are never copied: the cross-
        # entropy runs in the layout they are stored in. GPTWithLoss hands over megatron
        # GPTModel's batch-first [b, s, v] output as an [s, b, v] view; the pipeline's last stage
        # hands over [s, b, v] storage. The labels (b x s integers) follow the logits instead.
        if logits.transpose(0, 1).is_contiguous():
            logits = logits.transpose(0, 1)  # [b, s, v/t], as stored; labels and mask are [b, s]
        else:
            logits, labels, loss_mask = logits.contiguous(), labels.t().contiguous(), loss_mask.t()
        if self.track_accuracy:  # first: megatron's cross-entropy overwrites fp32 logits with their softmax
            hits = vocab_parallel_correct(logits, labels)
            m = loss_mask.bool()
            self.correct += float(hits[m].sum())
            self.counted += float(m.sum())
        per_token = vocab_parallel_cross_entropy(logits.float(), labels)
        return masked_mean(per_token, loss_mask)
