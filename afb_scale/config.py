"""Typed run configuration: YAML composition, `key=value` overrides, validation.

One config describes a whole run (model + parallel layout + training + data); DeepSpeed's
JSON config is generated from it (engine.py), so users never write two.

Composition: a YAML file may list other YAML files under `include:` (paths relative to the
including file); they are merged in order, then the file's own keys on top, then command-line
overrides such as `model.hidden_size=128`. Every key is checked against the dataclasses below,
so a typo is an error, not a silently ignored setting.

`validate()` runs before any process group exists: a bad config costs the user one line and a
non-zero exit, never a half-started job.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# Structured comparators (Wei et al. 2024, model/structured.py): <structure>-<base>.
STRUCTURED_FFN_KINDS = tuple(f"{s}-{b}" for s in ("lowrank", "blockdense", "blockshuffle") for b in ("gelu", "swiglu"))
FFN_KINDS = ("gelu", "swiglu", "afb-gelu", "afb-swiglu") + STRUCTURED_FFN_KINDS
# Core attention: fused scaled_dot_product_attention, or megatron-core's local one (s x s scores).
ATTENTION_KINDS = ("sdpa", "local")


class ConfigError(ValueError):
    """A configuration value is not allowed. The message is one line naming key, value, rule."""


# Upper bounds on model sizes: far beyond any model this code trains (GPT-3 175B: 96 layers,
# hidden 12288, seq 2048), low enough that a typo (model.seq_length=1e8) is an error, not an
# allocation that takes the machine down.
MODEL_MAXIMA = {"num_layers": 2**10, "hidden_size": 2**17, "num_attention_heads": 2**10, "seq_length": 2**20,
                "vocab_size": 2**24, "feedback_rank": 2**17, "make_vocab_size_divisible_by": 2**16}
FFN_HIDDEN_MAX = 2**20


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # None: 4 * hidden for GELU kinds, 2/3 of that (rounded up to a multiple of 64) for SwiGLU.
    ffn_hidden_size: Optional[int] = None
    ffn_kind: str = "afb-gelu"
    feedback_rank: int = 64
    seq_length: int = 128
    # The tokenizer's vocabulary size; the embedding is padded to a multiple of
    # `make_vocab_size_divisible_by` (independent of TP so every layout builds the same model).
    vocab_size: int = 8192
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    # None: biases for the GELU kinds, none for SwiGLU (the design's SwiGLU has no biases).
    add_bias_linear: Optional[bool] = None
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # sdpa: torch's fused causal attention (flash kernels on GPU); local: megatron-core's
    # DotProductAttention. Neither has parameters: checkpoints load into either.
    attention: Literal["sdpa", "local"] = "sdpa"
    # AFB kinds: the hidden-unit path 2 sigmoid(gl) * act(h + db) as one fused op that recomputes
    # in backward (afb_scale/model/afb_fused.py). auto: compiled where torch.compile works, else
    # eager bodies; on: compiled or an error; off: the unfused reference math.
    afb_fused: Literal["auto", "on", "off"] = "auto"
    # Structured FFN kinds (lowrank-*, blockdense-*, blockshuffle-*; model/structured.py):
    # size by the share of the dense FFN's weights (null: 0.63) unless structured_rank (lowrank,
    # blockdense) / structured_blocks (blockdense, default 4; blockshuffle) are given.
    structured_share: Optional[float] = None
    structured_rank: Optional[int] = None
    structured_blocks: Optional[int] = None
    # Self-guided training: a dense guide mixed in with weight alpha, 1 -> 0 over the first
    # guide_fraction of train.steps, then dropped from compute, optimizer and checkpoints.
    self_guided: bool = True
    guide_fraction: float = 0.5
    guide_schedule: Literal["cosine", "linear"] = "cosine"

    @property
    def is_afb(self) -> bool:
        return self.ffn_kind.startswith("afb-")

    @property
    def structure(self) -> Optional[str]:
        """lowrank / blockdense / blockshuffle for a structured kind, else None."""
        return self.ffn_kind.split("-")[0] if self.ffn_kind in STRUCTURED_FFN_KINDS else None

    @property
    def structured_size(self):
        """Resolved rank / blocks and the achieved parameter share (a StructuredSize)."""
        from afb_scale.model.structured import resolve_size

        return resolve_size(self.structure, self.hidden_size, self.resolved_ffn_hidden_size, self.is_gated,
                            self.structured_share, self.structured_rank, self.structured_blocks)

    @property
    def is_gated(self) -> bool:
        return self.ffn_kind.endswith("swiglu")

    @property
    def use_bias(self) -> bool:
        return (not self.is_gated) if self.add_bias_linear is None else self.add_bias_linear

    @property
    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        f = 4 * self.hidden_size
        if self.is_gated:
            f = -(-(2 * f // 3) // 64) * 64
        return f

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Data-parallel degree is derived: world_size / (tensor * pipeline).
    sequence_parallel: bool = False
    zero_stage: int = 0


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 4
    save_interval: int = 100
    run_dir: str = "runs/default"
    # Complete checkpoints kept in <run_dir>/checkpoints (older ones are deleted); 0 keeps all.
    keep_checkpoints: int = 3
    # Stop (exit status 3) after this many consecutive steps with a non-finite loss or gradient
    # norm; such steps are never applied. Loss-scaler overflows under fp16 do not count.
    max_bad_steps: int = 3
    # Also write each checkpoint's model as consolidated fp32 safetensors (what resharding to
    # another TP/PP/DP layout and `afb-scale export` read).
    save_consolidated: bool = True
    # Seconds each start-up phase (rendezvous, process groups, dataset build and its cache
    # barrier, checkpoint discovery and load, the first step's collectives) may take before every
    # rank exits with one line naming the phase (afb_scale/training/watchdog.py); also the process groups'
    # collective timeout.
    startup_timeout_s: float = 900.0


@dataclass
class DatasetEntry:
    # Path prefix of a prepared dataset: `<prefix>.bin` and `<prefix>.idx`.
    prefix: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # sentencepiece model produced by data_prep; its vocabulary must match model.vocab_size.
    tokenizer: str = ""
    datasets: list[DatasetEntry] = field(default_factory=list)
    # train,valid,test proportions, megatron-core's split string format.
    split: str = "949,50,1"
    cache_dir: Optional[str] = None


@dataclass
class MetricsConfig:
    # Layer metrics (gate entropy, bias-correction ratio, activation drift) every N steps; 0 = off.
    layer_metrics_interval: int = 50
    # NerVE spectral diagnostics of every FFN layer (metrics/spectral.py, docs/spectral.md) every N
    # steps; 0 = off; null = every train.eval_interval (the default: sparse, and as sparse as
    # validation on big runs, where each costs two D x D eigendecompositions per layer).
    spectral_interval: Optional[int] = None
    grad_norm_window: int = 100
    loss_spike_factor: float = 2.0
    tensorboard: bool = True
    # Dense peak TFLOP/s per device that MFU is measured against. None: the table of
    # afb_scale/metrics/throughput.py by GPU name and train.precision (H100 SXM bf16: 989), or on
    # CPU a measured fp32 matmul peak.
    peak_tflops: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building typed configs from plain dicts


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping of {tp.__name__} fields")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `3e-4` (no decimal point) as a string; accept it as the number it is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; allowed: {', '.join(sorted(names))}")
        kwargs[k] = _check_type(key, v, hints[k])
    return cls(**kwargs)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include cycle through {path}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    merged: dict = {}
    includes = data.pop("include", None) or []
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"include={includes!r} in {str(path)!r} must be a list of file paths, e.g. include: [a.yaml]")
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def read_with_overrides(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """The composed YAML of `path` with `section.key=value` overrides applied, untyped."""
    data = _read_yaml(Path(path)) if path else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load, compose and type-check a config (validation against a world size is separate)."""
    return _from_dict(Config, read_with_overrides(path, overrides))


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Validation (no torch.distributed needed)


def validate_model(m: ModelConfig, tensor_parallel: int = 1) -> None:
    """Rules of the layer itself; also used by the model builders."""
    if m.ffn_kind not in FFN_KINDS:
        raise ConfigError(f"model.ffn_kind={m.ffn_kind!r} is not allowed; choose one of {', '.join(FFN_KINDS)}")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.feedback_rank < 1:
        raise ConfigError(f"model.feedback_rank={m.feedback_rank} must be >= 1")
    if m.make_vocab_size_divisible_by < 1:
        raise ConfigError(f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} must be >= 1")
    for key, most in MODEL_MAXIMA.items():
        if getattr(m, key) > most:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be between 1 and {most} (2**{most.bit_length() - 1})")
    if not 0 < m.init_method_std < math.inf:
        raise ConfigError(f"model.init_method_std={m.init_method_std} must be a finite number > 0")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0 <= getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be in [0, 1)")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} must be divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    f = m.resolved_ffn_hidden_size
    if f < 1:
        raise ConfigError(f"model.ffn_hidden_size={f} must be >= 1")
    if f > FFN_HIDDEN_MAX:
        raise ConfigError(f"model.ffn_hidden_size={f} must be between 1 and {FFN_HIDDEN_MAX} (2**20)")
    t = tensor_parallel
    if f % t:
        raise ConfigError(f"model.ffn_hidden_size={f} must be divisible by parallel.tensor={t}")
    if m.num_attention_heads % t:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} must be divisible by parallel.tensor={t}"
        )
    if m.padded_vocab_size % t:
        raise ConfigError(
            f"padded vocabulary {m.padded_vocab_size} (model.make_vocab_size_divisible_by="
            f"{m.make_vocab_size_divisible_by}) must be divisible by parallel.tensor={t}"
        )
    validate_structured(m, t)


def validate_structured(m: ModelConfig, t: int) -> None:
    """Sizes of the structured kinds: shares in (0, 1], block counts that divide the projections
    and shard over TP (parallel_structured.py's rules)."""
    if m.structured_share is not None and not 0 < m.structured_share <= 1:
        raise ConfigError(f"model.structured_share={m.structured_share} must be in (0, 1] (a share of the dense FFN's weights)")
    for key in ("structured_rank", "structured_blocks"):
        if getattr(m, key) is not None and not 1 <= getattr(m, key) <= FFN_HIDDEN_MAX:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be between 1 and {FFN_HIDDEN_MAX}")
    if not 0 <= m.guide_fraction <= 1:
        raise ConfigError(f"model.guide_fraction={m.guide_fraction} must be in [0, 1] (a fraction of train.steps)")
    if m.structure is None:
        return
    size = m.structured_size
    d, f, nb, r = m.hidden_size, m.resolved_ffn_hidden_size, size.blocks, size.rank
    if m.structure == "blockdense":
        if r % nb:
            raise ConfigError(f"model.structured_rank={r} must be divisible by model.structured_blocks={nb} ({m.ffn_kind})")
    if m.structure in ("blockdense", "blockshuffle"):
        for name, width in (("model.hidden_size", d), ("FFN hidden size", f)):
            if width % nb:
                raise ConfigError(f"{name}={width} must be divisible by model.structured_blocks={nb} ({m.ffn_kind}; "
                                  "set model.structured_blocks or model.structured_share)")
        # blockshuffle's SwiGLU fc1 shards its [gate; up] blocks with stride 2
        need = 2 * t if (m.structure == "blockshuffle" and m.is_gated) else t
        if nb % need:
            raise ConfigError(f"model.structured_blocks={nb} must be divisible by {need} (parallel.tensor={t}"
                              f"{' x 2, SwiGLU' if need != t else ''}): blocks are sharded over tensor-parallel ranks")
        if m.structure == "blockshuffle" and (min(d, f) // nb) < 1:
            raise ConfigError(f"model.structured_blocks={nb} leaves empty blocks at hidden size {d}")


def _check_directory(key: str, value: str) -> None:
    """`value` names a directory a run may create or use: not a file, nor inside one."""
    if not value:
        raise ConfigError(f"{key}={value!r} must name a directory")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value!r} is a file; it must be a directory (an existing one, or one to create)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}={value!r} cannot be created: {str(parent)!r} is a file, not a directory")
            break


def _check_train_numbers(t: TrainConfig) -> None:
    """Optimizer and schedule numbers in their meaningful ranges (NaN and infinity are refused)."""
    if not 0 < t.lr < math.inf:
        raise ConfigError(f"train.lr={t.lr} must be a finite number > 0")
    if not 0 <= t.min_lr < math.inf:
        raise ConfigError(f"train.min_lr={t.min_lr} must be a finite number >= 0 (and at most train.lr)")
    for key in ("weight_decay", "clip_grad"):
        if not 0 <= getattr(t, key) < math.inf:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be a finite number >= 0"
                              + (" (0: no clipping)" if key == "clip_grad" else ""))
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be in [0, 1)")
    if not 0 < t.adam_eps < math.inf:
        raise ConfigError(f"train.adam_eps={t.adam_eps} must be a finite number > 0")
    for key in ("global_batch_size", "eval_iters", "log_interval", "eval_interval"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed={t.seed} must be between 0 and {2**32 - 1} (numpy's seed range)")


def validate(cfg: Config, world_size: int, cuda_available: Optional[bool] = None) -> None:
    """Every rule a run must satisfy, checked before any process group starts."""
    p, t = cfg.parallel, cfg.train
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1 (the number of processes: WORLD_SIZE or --world-size)")
    for key in ("tensor", "pipeline"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 1")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not allowed; choose 0, 1, 2 or 3")
    if world_size % (p.tensor * p.pipeline):
        raise ConfigError(
            f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = "
            f"{p.tensor} x {p.pipeline}; world size must equal TP x PP x DP"
        )
    validate_model(cfg.model, p.tensor)
    from afb_scale.model.self_guided import check_layout  # self-guided structured kinds: where the guide can go

    check_layout(cfg)
    if cfg.model.num_layers % p.pipeline:
        raise ConfigError(
            f"model.num_layers={cfg.model.num_layers} must be divisible by parallel.pipeline={p.pipeline}"
        )
    if p.pipeline > 1 and p.zero_stage >= 2:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: DeepSpeed's "
            "pipeline engine supports ZeRO stage 0 or 1 only"
        )
    from afb_scale.parallel.layout import ParallelLayout

    dp = ParallelLayout.of(p, world_size).data
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _check_train_numbers(t)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
        )
    if t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be >= 1")
    if t.save_interval < 1:
        raise ConfigError(f"train.save_interval={t.save_interval} must be >= 1")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 0 (0 keeps every checkpoint)")
    if not t.startup_timeout_s > 0:
        raise ConfigError(f"train.startup_timeout_s={t.startup_timeout_s} must be > 0 seconds")
    if math.isinf(t.startup_timeout_s):
        raise ConfigError(f"train.startup_timeout_s={t.startup_timeout_s} must be a finite number of seconds")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    if not 0 <= t.warmup_steps <= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be between 0 and train.steps={t.steps}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}")
    # Mixed precision x ZeRO: where DeepSpeed 0.19.8 keeps fp32 master weights and accumulates
    # and reduces gradients at a precision that survives many micro-batches (docs/precision.md).
    if t.precision == "bf16" and p.zero_stage not in (1, 3):
        raise ConfigError(
            f"train.precision=bf16 with parallel.zero_stage={p.zero_stage}: DeepSpeed accumulates bf16 "
            "gradients in fp32 only at ZeRO stage 1 or 3 (stage 0 has no fp32 accumulation, stage 2 "
            "accumulates in bf16); use parallel.zero_stage=1 (free at data-parallel size 1) or 3"
        )
    if t.precision == "fp16" and p.zero_stage == 0:
        raise ConfigError(
            "train.precision=fp16 with parallel.zero_stage=0: DeepSpeed's stage-0 fp16 optimizer is "
            "its unfused one (an overflow check that syncs per parameter); use parallel.zero_stage=1, 2 or 3"
        )
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if t.precision == "fp16" and not cuda_available:
        raise ConfigError(
            "train.precision=fp16 needs a GPU and none is available; use train.precision=fp32 or bf16 on CPU"
        )
    if cfg.metrics.spectral_interval is not None and cfg.metrics.spectral_interval < 0:
        raise ConfigError(f"metrics.spectral_interval={cfg.metrics.spectral_interval} must be >= 0 "
                          "(0 = off, null = every train.eval_interval)")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tensor > 1, not parallel.tensor={p.tensor}")
    if cfg.metrics.peak_tflops is not None and cfg.metrics.peak_tflops <= 0:
        raise ConfigError(f"metrics.peak_tflops={cfg.metrics.peak_tflops} must be > 0 (TFLOP/s per device), "
                          "or null for the built-in table")
    total = sum(d.weight for d in cfg.data.datasets)
    for i, d in enumerate(cfg.data.datasets):
        if d.weight <= 0:
            raise ConfigError(f"data.datasets[{i}].weight={d.weight} must be > 0")
    if cfg.data.datasets and total <= 0:
        raise ConfigError("data.datasets weights must sum to a positive number")
    mt = cfg.metrics
    if mt.layer_metrics_interval < 0:
        raise ConfigError(f"metrics.layer_metrics_interval={mt.layer_metrics_interval} must be >= 0 (0 = off)")
    if mt.grad_norm_window < 1:
        raise ConfigError(f"metrics.grad_norm_window={mt.grad_norm_window} must be >= 1")
    if not 0 < mt.loss_spike_factor < math.inf:
        raise ConfigError(f"metrics.loss_spike_factor={mt.loss_spike_factor} must be a finite number > 0")
    # The run directory: created by rank 0 at start, so it must be a directory or creatable.
    _check_directory("train.run_dir", t.run_dir)
    if (Path(t.run_dir) / "checkpoints").exists() and not (Path(t.run_dir) / "checkpoints").is_dir():
        raise ConfigError(f"train.run_dir={t.run_dir!r} holds a file 'checkpoints' where its checkpoint "
                          "directory belongs; move the file away or use another train.run_dir")
    if cfg.data.cache_dir is not None:
        _check_directory("data.cache_dir", cfg.data.cache_dir)
