"""The cost model: parameters, training FLOPs per token, and memory per device of a layout.

Everything here is arithmetic on a ModelConfig (and a Layout): no torch, no process group, so
the planner (`afb-scale plan`, planner.py) runs on a login node. docs/cost.md states the
formulas with their sources and compares them with measurements (tests/test_cost.py,
benchmarks/bench_memory_model.py, docs/results/gpu.md).

Notation: h = hidden_size, f = resolved_ffn_hidden_size, r = feedback_rank, s = seq_length,
L = num_layers, V = padded_vocab_size (what the embedding and output layer hold), b = 1 where
the linears have biases (`use_bias`), else 0; t, p, d = tensor-, pipeline-, data-parallel degree.

Parameters (the GPTModel of model/gpt.py at TP = 1, exactly):

    embedding           V*h  (+ s*h learned position embedding for learned_absolute)
    per layer           qkv 3h*h + 3h*b,  proj h*h + h*b,  two norms 2 * n
                        fc1 h*f + f*b (gated: 2*h*f + 2*f*b),  fc2 f*h + h*b
                        AFB only: V r*f + c r + [Ub; Ug] 2*f*r (no bias)
    final norm          n
    output layer        V*h, only when the embedding is not tied

with n = 2h for LayerNorm (weight and bias) and h for RMSNorm (weight).

FLOPs per token (matmuls only, 2 FLOPs per multiply-add; norms, softmax, activations and the
loss are left out):

    per layer   qkv 2*3h^2 + attention 2*2*s*h + proj 2*h^2 + MLP 2*(2 or 3 gated)*h*f
                + AFB feedback 2*3*f*r
    logits      2*h*V
    training    3 x forward (backward = 2 x forward)
    recompute   + the layers' forward again where activation checkpointing is on

Conventions, the ones Megatron-LM and nanotron use and the MFU figures of llm-foundry and
nanotron are quoted with: attention scores (QK^T) and context (AV) are counted over the full
s x s matrix, not halved for causality; and MFU uses *model* FLOPs, so activation
checkpointing's recomputed forward is not counted there (it is in `hardware` FLOPs, HFU).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from afb_scale.config import ModelConfig

# NVIDIA H100 SXM, dense bf16 tensor-core peak (the 1979 TFLOP/s of the data sheet is with sparsity).
H100_BF16_DENSE_PEAK = 989e12

GIB = 2**30
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# DeepSpeed 0.19.8's defaults for the settings our generated config leaves alone
# (runtime/zero/config.py); the memory model reads them from here.
DS_REDUCE_BUCKET = int(5e8)  # zero_optimization.reduce_bucket_size, elements
DS_ALLREDUCE_BUCKET = int(5e8)  # engine.allreduce_gradients' bucket (MEMORY_OPT_ALLREDUCE_SIZE), elements
DS_PREFETCH_BUCKET = int(5e7)  # stage3_prefetch_bucket_size, elements
DS_PERSISTENCE_THRESHOLD = int(1e5)  # stage3_param_persistence_threshold: smaller params stay whole
DS_SUB_GROUP = int(1e9)  # sub_group_size: ZeRO-3 steps the optimizer one sub-group at a time


# ----------------------------------------------------------------------------------------------
# Parameters


def parameter_count(model: ModelConfig) -> int:
    """Exact number of parameters of build_gpt_model(model) at tensor-parallel degree 1."""
    return sum(rank_parameters(model).values())


def _layer_parameters(model: ModelConfig, t: int) -> dict[str, int]:
    """One transformer layer's parameters on one of t tensor-parallel ranks, by megatron name.

    Column-parallel weights (qkv, fc1, [Ub; Ug]) and their biases are split over t; row-parallel
    weights (proj, fc2, V) are split over their input dimension and keep a whole bias; norms
    and the feedback bias c are replicated."""
    h, f, r = model.hidden_size, model.resolved_ffn_hidden_size, model.feedback_rank
    b = model.use_bias
    up = 2 if model.is_gated else 1
    out: dict[str, int] = {}

    def norm(name):
        out[f"{name}.weight"] = h
        if model.normalization == "LayerNorm":
            out[f"{name}.bias"] = h

    norm("input_layernorm")
    out["self_attention.linear_qkv.weight"] = 3 * h * h // t
    if b:
        out["self_attention.linear_qkv.bias"] = 3 * h // t
    out["self_attention.linear_proj.weight"] = h * h // t
    if b:
        out["self_attention.linear_proj.bias"] = h
    norm("pre_mlp_layernorm")
    if model.structure is not None:
        out.update(_structured_mlp_parameters(model, t))
    else:
        out["mlp.linear_fc1.weight"] = up * f * h // t
        if b:
            out["mlp.linear_fc1.bias"] = up * f // t
        out["mlp.linear_fc2.weight"] = h * f // t
        if b:
            out["mlp.linear_fc2.bias"] = h
    if model.is_afb:
        out["mlp.feedback_read.weight"] = r * f // t
        out["mlp.feedback_read.bias"] = r
        out["mlp.feedback_write.weight"] = 2 * f * r // t
    return out


def _structured_mlp_parameters(model: ModelConfig, t: int) -> dict[str, int]:
    """A structured MLP's parameters on one of t ranks (model/parallel_structured.py's sharding
    rules): replicated first factors of fc1 and second factors of lowrank / blockshuffle fc2,
    the rest split over t; the dense guide (while it exists) like a dense fc1 / fc2."""
    from afb_scale.model.structured import factor_shapes

    h, f = model.hidden_size, model.resolved_ffn_hidden_size
    m1 = (2 if model.is_gated else 1) * f
    size, kind = model.structured_size, model.structure
    (a1, a2), (c1, c2) = (factor_shapes(kind, h, m1, size.rank, size.blocks),
                          factor_shapes(kind, f, h, size.rank, size.blocks))
    n = math.prod
    out = {"mlp.linear_fc1.first.weight": n(a1), "mlp.linear_fc1.second.weight": n(a2) // t}
    if kind == "lowrank":
        fc2 = {"first": n(c1) // t, "second": n(c2)}
    elif kind == "blockdense":
        fc2 = {"first": n(c1) // t, "second": n(c2) // t}
    else:
        fc2 = {"first": n(c1) // t, "second": n(c2)}
    out.update({f"mlp.linear_fc2.{k}.weight": v for k, v in fc2.items()})
    if model.self_guided and model.guide_fraction > 0:
        out["mlp.linear_fc1.guide.weight"] = m1 * h // t
        out["mlp.linear_fc2.guide.weight"] = h * f // t
    if model.use_bias:
        out["mlp.linear_fc1.bias"] = m1 // t
        out["mlp.linear_fc2.bias"] = h
    return out


def structured_mlp_flops(model: ModelConfig) -> int:
    """Forward matmul FLOPs per token of a structured MLP without its guide: every factor
    weight is one multiply-add per token (block-diagonal blocks included). While the guide
    exists, each guided step adds the dense MLP's 2 (2 or 3) h f on top."""
    return 2 * model.structured_size.params


def rank_parameters(model: ModelConfig, tensor: int = 1, pipeline: int = 1, stage: int = 0) -> dict[str, int]:
    """Parameters held by one rank of pipeline stage `stage`, by name (GPTModel's names; the
    pipeline path's modules hold the same tensors). Layers split evenly over the stages, as
    DeepSpeed's `type:TransformerLayerPipe` partitioning does when p divides L. The last stage
    of a pipeline holds a second copy of a tied word embedding (DeepSpeed's tied module)."""
    h, t = model.hidden_size, tensor
    out: dict[str, int] = {}
    first, last = stage == 0, stage == pipeline - 1
    if first:
        out["embedding.word_embeddings.weight"] = model.padded_vocab_size * h // t
        if model.position_embedding_type == "learned_absolute":
            out["embedding.position_embeddings.weight"] = model.seq_length * h
    per_stage = model.num_layers // pipeline
    for i in range(stage * per_stage, (stage + 1) * per_stage):
        for name, n in _layer_parameters(model, t).items():
            out[f"decoder.layers.{i}.{name}"] = n
    if last:
        out["decoder.final_layernorm.weight"] = h
        if model.normalization == "LayerNorm":
            out["decoder.final_layernorm.bias"] = h
        if not model.tie_embeddings:
            out["output_layer.weight"] = model.padded_vocab_size * h // t
        elif pipeline > 1:
            out["tied.word_embeddings.weight"] = model.padded_vocab_size * h // t
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs


def _layer_forward_flops(model: ModelConfig) -> int:
    h, f, r, s = model.hidden_size, model.resolved_ffn_hidden_size, model.feedback_rank, model.seq_length
    layer = (
        2 * 3 * h * h  # qkv
        + 2 * 2 * s * h  # QK^T and AV over the full s x s
        + 2 * h * h  # output projection
        + (2 * (3 if model.is_gated else 2) * h * f if model.structure is None else structured_mlp_flops(model))  # MLP
    )
    if model.is_afb:
        layer += 2 * 3 * f * r  # V, Ub, Ug
    return layer


def flops_per_token(model: ModelConfig, training: bool = True, recompute: bool = False) -> float:
    """Matmul FLOPs per token at sequence length model.seq_length (module docstring has the
    formula and its conventions: full s x s attention); forward x 3 if training, plus the
    layers' forward once more if `recompute` (activation checkpointing; hardware FLOPs)."""
    layers = model.num_layers * _layer_forward_flops(model)
    forward = layers + 2 * model.hidden_size * model.padded_vocab_size
    if not training:
        return float(forward)
    return float(3 * forward + (layers if recompute else 0))


def mfu(tokens_per_second: float, model: ModelConfig, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s (model FLOPs, no recompute) over the
    hardware peak. tokens_per_second and peak_flops must cover the same devices."""
    return tokens_per_second * flops_per_token(model, training=True) / peak_flops


# ----------------------------------------------------------------------------------------------
# Memory per device


@dataclass(frozen=True)
class Layout:
    """How one training run is laid out: what the memory and time estimates depend on."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero_stage: int = 0
    micro_batch: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step on each data-parallel rank
    sequence_parallel: bool = False
    checkpointing: bool = False
    precision: str = "bf16"
    # torch's AdamW takes its multi-tensor (foreach) path on GPUs, the per-tensor one on CPU;
    # they differ in the temporaries of the optimizer step.
    device: str = "cuda"

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @classmethod
    def from_config(cls, cfg, world_size: int, device: str = "cuda") -> "Layout":
        p, t = cfg.parallel, cfg.train
        from afb_scale.parallel.layout import ParallelLayout

        d = ParallelLayout.of(p, world_size).data
        return cls(tensor=p.tensor, pipeline=p.pipeline, data=d, zero_stage=p.zero_stage,
                   micro_batch=t.micro_batch_size, grad_accum=t.global_batch_size // (t.micro_batch_size * d),
                   sequence_parallel=p.sequence_parallel, checkpointing=t.activation_checkpointing,
                   precision=t.precision, device=device)


@dataclass
class MemoryEstimate:
    """Bytes on one rank (`stage`: its pipeline stage). Each part is at its own largest:
    - weights, gradients, optimizer states: as the optimizer step starts (ZeRO partitioned);
    - activations: of the micro-batches in flight, at their peak (forward at the loss, or
      backward at the logits' gradient or inside a layer);
    - buffers: DeepSpeed's reduce buckets, gathered ZeRO-3 parameters, the copies made to
      reduce gradients, the optimizer step's temporaries, pipeline buffers.
    `total` is the peak over the phases of a step (`phases`; `phase` names the largest), which
    is less than the sum of the parts: not every gradient is alive at the activations' peak,
    and no activation at the optimizer step."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    total: float
    stage: int = 0
    phase: str = ""
    params: int = 0  # parameters on this rank (before ZeRO-3 partitioning)
    detail: dict = field(default_factory=dict)  # named terms, bytes, for docs and debugging
    phases: dict = field(default_factory=dict)  # peak bytes of each phase of a step
    at_step: float = 0.0  # alive as the optimizer step starts: weights + gradients + optimizer + kept buffers

    @property
    def model_states(self) -> float:
        """Weights + gradients + optimizer states: what ZeRO partitions."""
        return self.weights + self.gradients + self.optimizer


def _act_bytes(precision: str) -> int:
    return PARAM_BYTES[precision]


def layer_activation_bytes(model: ModelConfig, layout: Layout) -> float:
    """Bytes one transformer layer saves for backward per micro-batch, on one TP rank.

    Counted tensor by tensor from the code that runs (megatron-core 0.16.1's TransformerLayer
    with the local spec, our SDPA core attention and AFB MLP), per token, in the activation
    dtype (e bytes), a = h/t under sequence parallelism else h:
      norms            input and output of both norms: 4a (the outputs are the saved inputs of
                       qkv and fc1), plus fp32 mean/rstd (LayerNorm 8, RMSNorm 4 bytes)
      attention        the fused qkv output 3h/t (q, k, v are views of it, kept by SDPA), the
                       SDPA output h/t and its [s, b, h] copy that proj saves h/t, and SDPA's
                       fp32 log-sum-exp (4 bytes x heads/t); megatron's local attention instead
                       keeps the s x s probabilities (fp32 softmax output, plus its bf16 copy)
      MLP, per f/t     gelu 2 (fc1 output + bias, gelu output); swiglu 5 (fc1's [W1 x; W3 x],
                       megatron's `x_linear + glu_linear_offset` copy, silu output, product);
                       afb-gelu 6 and afb-swiglu 8 (the base's fc1 output, then sigmoid(Ug z),
                       2 sigmoid(.), h + db, act(h + db), the product a; SwiGLU adds silu's
                       product with u) plus V h and z: 2r (per token; /t under sequence parallelism);
                       with the fused AFB op (model.afb_fused, not under ZeRO-3) afb-gelu 2 and
                       afb-swiglu 3 (h [and u], a) plus 2r, for every token also under sequence
                       parallelism (the op all-reduces V h rather than reduce-scattering it)
      dropout          a bool mask per hidden-dropout site where dropout > 0
    """
    h, f, r, s = model.hidden_size, model.resolved_ffn_hidden_size, model.feedback_rank, model.seq_length
    t, e = layout.tensor, _act_bytes(layout.precision)
    sp = layout.sequence_parallel and t > 1
    a = h / t if sp else h
    heads = model.num_attention_heads / t
    tok_sp = 1 / t if sp else 1  # fraction of the tokens whose per-token statistics a rank keeps
    per_token = 4 * a * e + 2 * (8 if model.normalization == "LayerNorm" else 4) * tok_sp
    if model.attention == "sdpa":
        per_token += 5 * h / t * e + 4 * heads
    else:
        # q, k, v (views of the qkv output) and proj's input; probabilities [heads/t, s] per
        # token: fp32 softmax output, and under 16-bit its down-cast copy that bmm saves.
        per_token += 4 * h / t * e + heads * s * (4 + (e if e < 4 else 0))
    base = "swiglu" if model.is_gated else "gelu"
    mlp = {"gelu": 2, "swiglu": 5, "afb-gelu": 6, "afb-swiglu": 8}[model.ffn_kind if model.structure is None else base]
    fused_afb = model.is_afb and model.afb_fused != "off" and layout.zero_stage != 3
    if fused_afb:
        # The fused op (model/afb_fused.py) keeps only its inputs: fc1's output(s) and, for fc2,
        # the activation a -- gelu 2, swiglu 3 per f/t (ZeRO-3 runs the unfused path).
        mlp = {"afb-gelu": 2, "afb-swiglu": 3}[model.ffn_kind]
    per_token += mlp * f / t * e
    if model.structure is not None:
        # Structured: each projection's inner activation (rank r, or blockshuffle's min(n, m)) is
        # saved for its second factor; replicated on fc1's side. Equal to the single-device
        # reference's saved tensors at d = 768-2048, shares 63% / 32% (docs/results/structured-ffn.md);
        # the tensor-parallel layers are not measured.
        size = model.structured_size
        inner = size.rank if size.rank else min(h, f)
        per_token += 2 * inner * e
    if model.is_afb:
        # V h and z: megatron's parallel linears keep their sequence shards; the fused op, which
        # all-reduces V h instead of reduce-scattering it, keeps them for every token.
        per_token += 2 * r * e * (1 if fused_afb else tok_sp)
    if model.hidden_dropout > 0:
        per_token += 2 * a  # bool masks of the two bias-dropout-adds
    return per_token * layout.micro_batch * s


def _logits_bytes(model: ModelConfig, layout: Layout) -> tuple[float, float]:
    """(forward, backward) peak bytes of the logits and loss per micro-batch on the last stage.

    Forward, GPTModel path: the output layer's [s, b, V/t] logits, GPTModel's transposed
    contiguous copy (which GPTWithLoss holds until it returns), LMLoss's `.float()` (a new
    fp32 tensor under 16-bit, the same tensor in fp32) and its `.contiguous()` fp32 copy, which
    megatron's vocab-parallel cross-entropy turns into the softmax in place and saves:
    bf16 2 + 4 + 4 = 10, fp32 4 + 4 = 8 bytes per logit. The pipeline path hands the [s, b, V/t]
    logits to the loss directly: bf16 2 + 4, fp32 4 (the softmax is formed in place).
    Backward: the cross-entropy gradient (fp32, in place of the softmax) and, under 16-bit, its
    down-cast copy: bf16 4 + 2 = 6, fp32 4. The two transposes undo each other, so the output
    layer receives a contiguous gradient and copies nothing.
    """
    logits = layout.micro_batch * model.seq_length * model.padded_vocab_size / layout.tensor
    fp32 = layout.precision == "fp32"
    if layout.pipeline > 1:
        return logits * (4 if fp32 else 6), logits * (4 if fp32 else 6)
    return logits * (8 if fp32 else 10), logits * (4 if fp32 else 6)


def _in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations a pipeline stage holds at once: DeepSpeed's 1F1B
    TrainSchedule keeps min(p - stage, micro-batches) of them."""
    return max(1, min(layout.pipeline - stage, layout.grad_accum))


def _partition_intersecting(params: dict[str, int], d: int, rank: int | None = None) -> int:
    """Elements of the parameters whose flat range meets data-parallel rank `rank`'s 1/d of
    each parameter group (ZeRO-1/2 keep those parameters' whole gradients until the step);
    the most over all ranks when `rank` is None. Groups: the weight-decayed matrices, then the
    1-D parameters (engine.param_groups), each flattened in model order."""
    import bisect
    import itertools

    ranks = range(d) if rank is None else [rank]
    totals = [0] * len(ranks)
    for group in ([n for k, n in params.items() if not _is_1d(k)], [n for k, n in params.items() if _is_1d(k)]):
        starts = [0, *itertools.accumulate(group)]  # starts[i]: flat offset of parameter i; starts[-1]: size
        size = starts[-1]
        for j, r in enumerate(ranks):
            lo, hi = r * size / d, (r + 1) * size / d
            first = bisect.bisect_right(starts, lo) - 1  # the parameter holding offset lo
            last = bisect.bisect_left(starts, hi) - 1  # the last parameter starting before hi
            if 0 <= first <= last < len(group):
                totals[j] += starts[last + 1] - starts[first]
    return max(totals)


def memory_per_device(model: ModelConfig, layout: Layout, stage: int | None = None,
                      dp_rank: int | None = None) -> MemoryEstimate:
    """Peak bytes on one rank: pipeline stage `stage`, data-parallel rank `dp_rank` (default:
    the rank that needs most; only ZeRO-1/2 differ between data-parallel ranks).

    Model states by precision x ZeRO stage as DeepSpeed 0.19.8 allocates them with torch's
    AdamW, activations from `layer_activation_bytes` and `_logits_bytes`, buffers the
    transients; docs/cost.md has the table, with the DeepSpeed source behind each term.
    """
    if stage is None:
        return max((memory_per_device(model, layout, s, dp_rank) for s in range(layout.pipeline)),
                   key=lambda m: (m.total, m.at_step))
    L = layout
    params = rank_parameters(model, L.tensor, L.pipeline, stage)
    phi = sum(params.values())
    largest = max(params.values())
    decay = sum(n for k, n in params.items() if not _is_1d(k))  # the larger of the two param groups
    d, z, e_p = L.data, L.zero_stage, PARAM_BYTES[L.precision]
    last = stage == L.pipeline - 1
    bf16_opt = z == 1 and L.precision == "bf16"  # DeepSpeed's BF16_Optimizer
    out_weight = params.get("embedding.word_embeddings.weight" if model.tie_embeddings else "output_layer.weight",
                            params.get("tied.word_embeddings.weight", 0)) if last else 0
    det: dict[str, float] = {}
    W: dict[str, float] = {}  # weights
    O: dict[str, float] = {}  # optimizer states

    # ---- model states (docs/cost.md, "Model states")
    if z == 3:
        small = sum(n for n in params.values() if n < DS_PERSISTENCE_THRESHOLD)
        W["weights: 1/d partition of each parameter"] = e_p * phi / d
        W["weights: whole small parameters (< persistence threshold)"] = e_p * small
    else:
        W["weights"] = e_p * phi
    if z == 0:
        O["Adam moments"] = 8 * phi
    else:
        O["fp32 master partition"] = 4 * phi / d  # a clone, even when the params are fp32
        O["Adam moments"] = 8 * phi / d
    comm = 2 if L.precision == "fp16" else 4  # our config reduces bf16 gradients in fp32
    G: dict[str, float] = {}  # gradients alive when the optimizer step starts
    G_late: dict[str, float] = {}  # the part of G that backward allocates (the rest lives on)
    B_keep: dict[str, float] = {}  # buffers alive throughout
    B_bwd: dict[str, float] = {}  # buffers alive while backward runs
    if z == 0:
        G_late["param.grad"] = 4 * phi  # fp32 only: validation refuses 16-bit at ZeRO 0
    elif bf16_opt:
        G["fp32 gradient accumulation buffer"] = 4 * phi
        G_late["bf16 param.grad"] = 2 * phi
    elif z in (1, 2):
        # The whole gradients of the parameters that meet this rank's partition stay until
        # the step; each .grad passes through a reduce bucket of reduce_bucket_size elements,
        # allocated as backward starts and freed at its end (the pipeline engine's
        # reduce_gradients allocates a second one).
        G_late["gradients meeting this rank's partition"] = e_p * (_partition_intersecting(params, d, dp_rank)
                                                                  if d > 1 else phi)  # dp_rank None: the most
        B_bwd["reduce bucket"] = DS_REDUCE_BUCKET * (e_p if L.precision == "fp16" else 4)
        B_bwd["param.grad in flight"] = e_p * largest
    else:
        G["gradient partitions"] = (4 if L.precision == "bf16" else e_p) * phi / d
        B_keep["reduce bucket (allocated at start-up)"] = comm * DS_REDUCE_BUCKET
        B_bwd["param.grad in flight"] = e_p * largest
    G.update(G_late)
    grads_held = {k: v for k, v in G.items() if k not in G_late or L.grad_accum > 1}
    # (with gradient accumulation, the earlier micro-batches' gradients stay through the next forward)
    weights, optimizer, gradients = sum(W.values()), sum(O.values()), sum(G.values())
    det.update(W)
    det.update(O)
    det.update({f"gradients: {k}": v for k, v in G.items()})

    # ---- activations of one micro-batch, times the micro-batches in flight
    layers = model.num_layers // L.pipeline
    e = _act_bytes(L.precision)
    tokens = L.micro_batch * model.seq_length
    a_layer = layer_activation_bytes(model, L)
    sp = L.sequence_parallel and L.tensor > 1
    h_shard = model.hidden_size / (L.tensor if sp else 1)
    layer_input = tokens * h_shard * e  # what a checkpointed layer keeps
    flight = _in_flight(L, stage)
    saved = flight * layers * (layer_input if L.checkpointing else a_layer)
    det["activations: layers"] = saved
    # the last stage: the final norm's input and output; the others: the output they send on
    # and the gradient they receive for it
    final = 2 * tokens * h_shard * e
    det["activations: final norm / stage output"] = final
    logits_fwd, logits_bwd = _logits_bytes(model, L) if last else (0.0, 0.0)
    det["activations: logits and loss (forward)"] = logits_fwd
    det["activations: logits gradient (backward)"] = logits_bwd
    # Inside a layer's backward: the gradient of its widest intermediate (f/t, 2f/t gated),
    # and with checkpointing its recomputed activations (freed again as backward goes down).
    up = 2 if model.is_gated else 1
    inner = tokens * up * model.resolved_ffn_hidden_size / L.tensor * e
    if model.attention == "local":
        # megatron's DotProductAttention takes baddbmm's (beta = 0) input from its global
        # memory buffer: one [b * heads/t, s, s] tensor, allocated once and kept.
        B_keep["local attention score buffer"] = \
            L.micro_batch * model.num_attention_heads / L.tensor * model.seq_length ** 2 * e
    if sp:
        # megatron's sequence-parallel linears all-gather their input into its global memory
        # buffer (tensor_parallel/layers.py): one [s, b, h] tensor, allocated once and kept.
        B_keep["sequence-parallel all-gather buffer"] = tokens * model.hidden_size * e
    if L.pipeline > 1:
        # DeepSpeed's pipeline engine keeps its max(2, in flight) buffers between steps (seen
        # at PP = 2): the last stage its outputs (logits), its received inputs with their
        # gradients and a receive buffer; earlier stages the buffer they receive gradients in.
        n_buf = max(2, flight)
        act = tokens * h_shard * e
        kept = act  # gradient receive buffer / activation receive buffer
        if last:
            kept = n_buf * tokens * model.padded_vocab_size / L.tensor * e + (2 * n_buf + 1) * act
        elif stage > 0:
            kept = (2 * n_buf + 2) * act
        B_keep["pipeline buffers"] = kept
    recompute = a_layer if L.checkpointing else 0.0

    # ---- transients (buffers)
    if z == 3 and d > 1:
        # Gathered whole parameters: the module being run plus DeepSpeed's prefetch bucket.
        module = max(_module_sizes(params).values())
        B_bwd["gathered parameters (ZeRO-3)"] = e_p * (module + min(DS_PREFETCH_BUCKET, phi))
    B_step: dict[str, float] = {}
    if L.device == "cuda":
        B_step["AdamW foreach temporary"] = 4 * (phi / d if z else phi)
    else:
        B_step["AdamW temporaries"] = 2 * 4 * (decay / d if z else largest)
    # At the end of backward the gradients are reduced over data parallelism, through copies
    # (made even at d = 1): DeepSpeed's engine flattens ZeRO-0's .grads in buckets of up to
    # 5e8 elements and BF16_Optimizer's fp32 buffer group by group; ZeRO-3 concatenates the
    # bucket's gradients and reduce-scatters them into another buffer.
    B_reduce: dict[str, float] = {}
    if z == 0:
        B_reduce["flattened gradients (all-reduce)"] = 4 * min(phi, DS_ALLREDUCE_BUCKET)
        B_step["gradient norm temporary"] = 4 * largest
    elif bf16_opt:
        B_reduce["copy of the fp32 gradient buffer (all-reduce)"] = 4 * decay
    elif z in (1, 2):
        B_step["flattened fp32 gradient partition"] = 4 * phi / d
    else:
        B_reduce["concatenated and reduce-scattered gradients"] = comm * min(phi, DS_REDUCE_BUCKET) * (1 + 1 / d)
        B_step["flattened fp32 gradients of a sub-group"] = 4 * min(decay / d, DS_SUB_GROUP)

    det.update({f"buffers: {k}": v for k, v in {**B_keep, **B_bwd, **B_reduce, **B_step}.items()})

    # ---- phases of a step
    keep = sum(B_keep.values())
    states_fwd = weights + optimizer + sum(grads_held.values()) + keep
    bwd = sum(B_bwd.values())
    late = 0.0 if L.grad_accum > 1 else sum(G_late.values())
    # backward produces the output layer's weight gradient (.grad in the param dtype) first
    out_grad = min(late, e_p * out_weight)
    fwd_base = states_fwd + saved + final
    phases = {
        # ZeRO-1 keeps its bucket from the first micro-batch's backward to the step
        "forward (loss)": fwd_base + logits_fwd + (bwd if L.grad_accum > 1 and z == 1 else 0.0),
        "backward (logits)": fwd_base + bwd + logits_bwd + out_grad,
        "backward (layers)": fwd_base + bwd + recompute + inner + min(late, out_grad + 2 * late / max(layers, 1)),
        "optimizer step": weights + optimizer + gradients + keep + sum(B_step.values()),
    }
    if B_reduce:
        # a bucket that fills before backward ends is reduced while activations are still held
        during = saved if z == 3 and phi > DS_REDUCE_BUCKET else 0.0
        phases["gradient reduction"] = weights + optimizer + gradients + keep + sum(B_reduce.values()) + during
    if L.pipeline > 1 and "reduce bucket" in B_bwd:
        # the pipeline engine's reduce_gradients allocates a second bucket beside the hooks' one
        phases["gradient reduction (pipeline)"] = weights + optimizer + gradients + keep + 2 * B_bwd["reduce bucket"]
    phase = max(phases, key=phases.get)
    activations = saved + final + max(logits_fwd, logits_bwd, recompute + inner)
    buffers = keep + max(bwd, sum(B_reduce.values()), sum(B_step.values()))
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                          buffers=buffers, total=phases[phase], stage=stage, phase=phase, params=phi, detail=det,
                          phases=phases, at_step=weights + optimizer + gradients + keep)


def _is_1d(name: str) -> bool:
    """Biases and norm weights: the parameters without weight decay (engine.param_groups)."""
    return name.endswith(("bias", "layernorm.weight"))


def _module_sizes(params: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in params.items():
        module = name.rsplit(".", 1)[0]
        out[module] = out.get(module, 0) + n
    return out
