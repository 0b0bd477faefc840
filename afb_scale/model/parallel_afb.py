"""Tensor-parallel AFB-FFN, built from megatron-core's parallel linears.

`AFBMLP` subclasses megatron-core's `MLP`, so the up-projection (`linear_fc1`, column-parallel,
SwiGLU's [W1; W3] fused with stride 2 exactly as megatron lays it out) and the down-projection
(`linear_fc2`, row-parallel) are megatron's own modules, initialisation and checkpoint layout
included. It adds the sharded feedback units:

- `feedback_read`  = V (r x f) and c: row-parallel over f. Each rank multiplies its slice of
  hidden units; one all-reduce of `tokens x r` (a reduce-scatter under sequence parallelism)
  gives every rank the full V h; c is added once, after the reduction.
- `feedback_write` = [Ub; Ug] (2f x r): one column-parallel weight with stride 2, so rank k
  holds [Ub rows of k; Ug rows of k] -- the same per-shard layout megatron uses for SwiGLU's fc1,
  which lets us reuse megatron's `apply_swiglu_sharded_factory` for distributed checkpoints.
  Its input z is replicated (all-gathered under sequence parallelism); megatron's
  ColumnParallelLinear all-reduces dz in backward, which a hand-rolled version would forget.

The hidden-unit math is `afb.feedback_hidden`, shared with the single-device reference; with
`fused` (model.afb_fused) other than "off" the read, the write and that math run as
afb_fused.FusedFeedback, one op on these modules' weights that keeps only h, u and tokens x r
tensors and recomputes in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP, MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from afb_scale.model.afb import feedback_hidden, feedback_statistics
from afb_scale.model.afb_fused import MODES, fused_feedback


@dataclass
class AFBMLPSubmodules(MLPSubmodules):
    feedback_read: Union[ModuleSpec, type] = None
    feedback_write: Union[ModuleSpec, type] = None


def _normal_init(std: float):
    return lambda w: torch.nn.init.normal_(w, mean=0.0, std=std) if std > 0 else torch.nn.init.zeros_(w)


class AFBMLP(MLP):
    """megatron-core MLP with AFB feedback units; returns (output, output_bias) like `MLP`.

    `feedback_out_init_std` > 0 starts Ub and Ug from a normal instead of zero (tests and
    ablations only: the design's default is zero, so step 0 equals the base FFN).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: AFBMLPSubmodules,
        feedback_rank: int = 64,
        feedback_out_init_std: float = 0.0,
        fused: str = "auto",
        ffn_hidden_size: Optional[int] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        **kwargs,  # newer megatron-core versions pass more; they do not concern this layer
    ):
        if feedback_rank < 1:
            raise ValueError(f"feedback_rank={feedback_rank} must be >= 1")
        if fused not in MODES:
            raise ValueError(f"fused={fused!r} is not allowed; choose one of {', '.join(MODES)}")
        self.fused = fused
        super().__init__(
            config,
            submodules,
            ffn_hidden_size=ffn_hidden_size or config.ffn_hidden_size,
            tp_group=tp_group,
        )
        f, r = self.config.ffn_hidden_size, feedback_rank
        self.feedback_rank = r
        self.feedback_read = build_module(
            submodules.feedback_read,
            f,
            r,
            config=self.config,
            init_method=_normal_init(1.0 / math.sqrt(f)),  # fan-in normal over the full V
            bias=True,  # c
            input_is_parallel=True,
            skip_bias_add=False,  # add c once, after the all-reduce
            is_expert=False,
            tp_comm_buffer_name="feedback_read",
            tp_group=self.tp_group,
        )
        self.feedback_write = build_module(
            submodules.feedback_write,
            r,
            2 * f,
            config=self.config,
            init_method=_normal_init(feedback_out_init_std),
            bias=False,
            gather_output=False,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="feedback_write",
            tp_group=self.tp_group,
            stride=2,  # rank k holds [Ub_k; Ug_k]
        )
        # Layer metrics are computed only while this is True (see metrics/layer_metrics.py):
        # when off, the forward pays one Python bool check.
        self.collect_stats = False
        self.last_stats: Optional[dict[str, torch.Tensor]] = None

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError("AFBMLP is a dense FFN; per_token_scale is for MoE experts")
        h, b1 = self.linear_fc1(hidden_states)
        if b1 is not None:
            h = h + b1
        u = None
        if self.config.gated_linear_unit:
            h, u = torch.chunk(h, 2, dim=-1)
        # Under ZeRO-3 DeepSpeed gathers each module's weights in that module's own forward and
        # replays a recorded fetch order; the fused op reads the feedback weights from here,
        # which breaks its trace ("tracing error at step N"), so ZeRO-3 keeps the modules' path
        # (TODO: host the op in a module whose forward owns the feedback weights).
        zero3 = any(hasattr(p, "ds_id") for p in self.feedback_write.parameters(recurse=False))
        if self.fused == "off" or zero3:
            vh, _ = self.feedback_read(h)
            z = F.gelu(vh)
            db_and_gate, _ = self.feedback_write(z)  # [db; gate logits] along the last dimension
            db, gate_logits = torch.chunk(db_and_gate, 2, dim=-1)
            a = feedback_hidden(h, u, db, gate_logits)
        else:
            a, z = fused_feedback(h, u, self.feedback_read.weight, self.feedback_read.bias,
                                  self.feedback_write.weight, self.fused, self.tp_group,
                                  self.config.sequence_parallel)
            if self.collect_stats:
                with torch.no_grad():
                    db, gate_logits = torch.chunk(F.linear(z, self.feedback_write.weight), 2, dim=-1)
        if self.collect_stats:
            self.last_stats = feedback_statistics(h, db, gate_logits, a)
        return self.linear_fc2(a)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}feedback_write.weight"
        singleton = (metadata or {}).get("singleton_local_shards", False)
        # Split [Ub_k; Ug_k] into its two halves so a checkpoint reshards to any TP degree.
        sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded


def afb_mlp_spec(feedback_rank: int, feedback_out_init_std: float = 0.0, fused: str = "auto") -> ModuleSpec:
    """The MLP spec of an AFB transformer layer, built on megatron-core's local parallel linears."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return ModuleSpec(
        module=AFBMLP,
        submodules=AFBMLPSubmodules(
            linear_fc1=ColumnParallelLinear,
            linear_fc2=RowParallelLinear,
            feedback_read=RowParallelLinear,
            feedback_write=ColumnParallelLinear,
        ),
        params={"feedback_rank": feedback_rank, "feedback_out_init_std": feedback_out_init_std, "fused": fused},
    )


def megatron_state_from_reference(ref: dict[str, torch.Tensor], gated: bool) -> dict[str, torch.Tensor]:
    """Full (TP=1) AFBMLP / MLP tensors from ReferenceAFBFFN's, by megatron-core's names.

    Public API: how weights of the single-device reference (afb.py) enter the tensor-parallel
    layer (with tp_layout.load_full_state); the TP invariance tests hold the two to each other with it.

    SwiGLU's fc1 is [W1; W3] and the feedback write is [Ub; Ug]; sharding with stride 2 (see
    tp_layout.py) then gives rank k [W1_k; W3_k] and [Ub_k; Ug_k].
    """
    out = {"linear_fc1.weight": torch.cat([ref["W1"], ref["W3"]]) if gated else ref["W1"]}
    out["linear_fc2.weight"] = ref["W2"]
    if ref.get("b1") is not None:
        out["linear_fc1.bias"] = ref["b1"]
    if ref.get("b2") is not None:
        out["linear_fc2.bias"] = ref["b2"]
    if "V" in ref:
        out["feedback_read.weight"] = ref["V"]
        out["feedback_read.bias"] = ref["c"]
        out["feedback_write.weight"] = torch.cat([ref["Ub"], ref["Ug"]])
    return out
