"""`--format hf`: a Hugging Face transformers directory, and one loader for every model source.

    afb-scale export RUN_DIR|CHECKPOINT|EXPORT OUT --format hf

OUT holds what `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)` load:

    config.json                 AfbGptConfig, with `auto_map` naming the two files below
    configuration_afb_gpt.py    modeling_afb_gpt.py    tokenization_afb_gpt.py   (hf_modeling/)
    model.safetensors           fp32 weights under the HF names (modeling_afb_gpt.py lists the mapping)
    tokenizer.model             the run's sentencepiece model; tokenizer_config.json
    generation_config.json      eos / pad ids
    config.yaml                 the run's afb_scale config (eval --data rebuilds its splits from it)
    export.json                 provenance: format afb_scale-hf-1, source checkpoint, step, sha256s

`load_model(source)` gives (AfbGptForCausalLM in eval mode, tokenizer, afb_scale Config or None)
for any of: such a directory, an `afb-scale export` directory (safetensors under megatron's
names), a checkpoint directory, or a run directory (its newest complete checkpoint). Everything
downstream (generate, eval, lm_eval) runs this one HF model, whose logits the tests hold to
megatron-core's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from afb_scale.config import ConfigError
from afb_scale.export import staged_directory

HF_FORMAT = "afb_scale-hf-1"


def require_eval_extras() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("the evaluation commands need transformers; install them with pip install -e '.[eval]'")


def _quiet_transformers() -> None:
    """No per-shard progress bars from save_pretrained / from_pretrained on a one-file model."""
    require_eval_extras()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
MODEL_TYPE = "afb_gpt"


@dataclass
class MegatronSource:
    """Full TP = PP = 1 tensors under megatron-core's names, and where they came from."""
    state: dict
    cfg: object  # afb_scale.config.Config
    tokenizer: Optional[Path]
    provenance: dict


def _checkpoint_of(path: Path):
    """(tag_dir, marker) of a run or checkpoint directory, bad input as ConfigError (exit 2)."""
    from afb_scale.export import _checkpoint_of as find

    try:
        return find(path)
    except SystemExit as e:  # export.py's own messages: "error: ..." (exit status 1 there)
        raise ConfigError(str(e.code).removeprefix("error: ")) from None


def read_megatron_source(path: str | os.PathLike) -> MegatronSource:
    """A run directory, a checkpoint directory or an `afb-scale export` (format afb_scale-export-1)."""
    from afb_scale.config import load_config
    from afb_scale.export import EXPORT_FORMAT

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give a run directory, a checkpoint directory or an export")
    if (path / "export.json").is_file():
        info = json.loads((path / "export.json").read_text())
        if info.get("format") != EXPORT_FORMAT:
            raise ConfigError(f"{path} is an export of format {info.get('format')!r}; this reads "
                              f"{EXPORT_FORMAT} (afb-scale export) or {HF_FORMAT} (afb-scale export --format hf)")
        from safetensors.torch import load_file

        from afb_scale.training.checkpoint import describe_file

        if describe_file(path / "model.safetensors")["sha256"] != info["model_sha256"]:
            raise ConfigError(f"{path / 'model.safetensors'} does not match the sha256 in export.json")
        cfg = load_config(path / "config.yaml")
        tok = path / "tokenizer.model"
        return MegatronSource(load_file(str(path / "model.safetensors")), cfg, tok if tok.is_file() else None,
                              {k: info.get(k) for k in ("source_checkpoint", "step", "consumed_samples")})
    from afb_scale.training.reshard import read_consolidated

    tag_dir, marker = _checkpoint_of(path)
    cfg = load_config(tag_dir / "config.yaml")
    tok = Path(cfg.data.tokenizer)
    state = {k: v for k, v in read_consolidated(tag_dir).items()}
    return MegatronSource(state, cfg, tok if tok.is_file() else None,
                          {"source_checkpoint": str(tag_dir.resolve()), "step": marker["step"],
                           "consumed_samples": marker["consumed_samples"]})


def hf_config(model_cfg, eos_id: int = 2, pad_id: int = 0):
    from afb_scale.evaluation.hf_modeling.configuration_afb_gpt import AfbGptConfig

    m = model_cfg
    return AfbGptConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        intermediate_size=m.resolved_ffn_hidden_size, ffn_kind=m.ffn_kind, feedback_rank=m.feedback_rank,
        **({"structured_rank": m.structured_size.rank, "structured_blocks": m.structured_size.blocks}
           if m.structure else {}),
        max_position_embeddings=m.seq_length, position_embedding_type=m.position_embedding_type,
        rotary_base=10000.0,  # megatron-core's GPTModel default; gpt.py passes no other
        normalization=m.normalization, layer_norm_eps=1e-5,  # TransformerConfig.layernorm_epsilon
        use_bias=m.use_bias, tie_word_embeddings=m.tie_embeddings, eos_token_id=eos_id, pad_token_id=pad_id)


def hf_state_from_megatron(state: dict, config) -> dict[str, torch.Tensor]:
    """megatron-core GPTModel names (TP = PP = 1) -> modeling_afb_gpt names. Every input tensor
    must be used and every output shape checked, so a layout mistake cannot pass silently."""
    c = config
    heads, groups = c.num_attention_heads, c.num_key_value_heads
    hd = c.hidden_size // heads
    per_group = heads // groups
    left = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(name):
        if name not in left:
            raise KeyError(f"the checkpoint has no {name}")
        return left.pop(name)

    def norm(src, dst):
        out[f"{dst}.weight"] = take(f"{src}.weight")
        if c.normalization == "LayerNorm":
            out[f"{dst}.bias"] = take(f"{src}.bias")

    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    if c.position_embedding_type == "learned_absolute":
        out["model.embed_positions.weight"] = take("embedding.position_embeddings.weight")
    for i in range(c.num_hidden_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        norm(f"{src}.input_layernorm", f"{dst}.input_layernorm")
        norm(f"{src}.pre_mlp_layernorm", f"{dst}.post_attention_layernorm")
        # linear_qkv rows: for each query group g, [q heads of g (per_group * hd); k_g (hd); v_g (hd)]
        # (megatron SelfAttention.get_query_key_value_tensors).
        for suffix in ("weight", "bias") if c.use_bias else ("weight",):
            qkv = take(f"{src}.self_attention.linear_qkv.{suffix}")
            qkv = qkv.reshape(groups, (per_group + 2) * hd, *qkv.shape[1:])
            q, k, v = torch.split(qkv, [per_group * hd, hd, hd], dim=1)
            out[f"{dst}.self_attn.q_proj.{suffix}"] = q.reshape(heads * hd, *qkv.shape[2:])
            out[f"{dst}.self_attn.k_proj.{suffix}"] = k.reshape(groups * hd, *qkv.shape[2:])
            out[f"{dst}.self_attn.v_proj.{suffix}"] = v.reshape(groups * hd, *qkv.shape[2:])
            out[f"{dst}.self_attn.o_proj.{suffix}"] = take(f"{src}.self_attention.linear_proj.{suffix}")
        gated = c.ffn_kind.endswith("swiglu")
        if c.ffn_kind.split("-")[0] in ("lowrank", "blockdense", "blockshuffle"):
            # the factors as they are (SwiGLU's fc1 is one structured map to [gate; up])
            for fc in ("fc1", "fc2"):
                for name in ("first.weight", "second.weight", *(("bias",) if c.use_bias else ())):
                    out[f"{dst}.mlp.{fc}.{name}"] = take(f"{src}.mlp.linear_{fc}.{name}")
            continue
        for suffix in ("weight", "bias") if c.use_bias else ("weight",):
            fc1 = take(f"{src}.mlp.linear_fc1.{suffix}")
            if gated:  # [W1; W3] (megatron's glu: silu(first half) * second half)
                out[f"{dst}.mlp.w1.{suffix}"], out[f"{dst}.mlp.w3.{suffix}"] = fc1.chunk(2, dim=0)
            else:
                out[f"{dst}.mlp.w1.{suffix}"] = fc1
            out[f"{dst}.mlp.w2.{suffix}"] = take(f"{src}.mlp.linear_fc2.{suffix}")
        if c.ffn_kind.startswith("afb-"):
            out[f"{dst}.mlp.feedback_read.weight"] = take(f"{src}.mlp.feedback_read.weight")
            out[f"{dst}.mlp.feedback_read.bias"] = take(f"{src}.mlp.feedback_read.bias")
            ub, ug = take(f"{src}.mlp.feedback_write.weight").chunk(2, dim=0)  # [Ub; Ug]
            out[f"{dst}.mlp.feedback_bias.weight"], out[f"{dst}.mlp.feedback_gate.weight"] = ub, ug
    norm("decoder.final_layernorm", "model.norm")
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")
    left.pop("output_layer.weight", None)  # a tied run may still carry the last stage's copy
    if left:
        raise KeyError(f"checkpoint tensors with no place in the HF model: {', '.join(sorted(left)[:5])}")
    return {k: v.contiguous() for k, v in out.items()}


def build_hf_model(src: MegatronSource):
    """AfbGptForCausalLM (eval mode, fp32) holding the source's weights, and its tokenizer."""
    from afb_scale.evaluation.hf_modeling.modeling_afb_gpt import AfbGptForCausalLM

    guides = sorted(k for k in src.state if k.endswith(".guide.weight"))
    if guides:
        from afb_scale.model.self_guided import guided_steps

        raise ConfigError(
            f"this checkpoint (step {src.provenance.get('step')}) still holds the self-guided guide ({guides[0]}, ...), "
            f"whose weight alpha is > 0 until step {guided_steps(src.cfg)}; the HF export holds the structured "
            f"path only: export a checkpoint from step {guided_steps(src.cfg)} on")
    tok = load_tokenizer(src.tokenizer) if src.tokenizer else None
    config = hf_config(src.cfg.model, *((tok.eos_token_id, tok.pad_token_id) if tok else ()))
    state = hf_state_from_megatron(src.state, config)
    with torch.device("meta"):
        model = AfbGptForCausalLM(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise KeyError(f"{name} was not loaded")
    return model.eval(), tok


def load_tokenizer(path: Path):
    from afb_scale.evaluation.hf_modeling.tokenization_afb_gpt import AfbGptTokenizer

    return AfbGptTokenizer(vocab_file=str(path))


def export_hf(source: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write OUT (staged beside it and renamed at the end: nothing half-written)."""
    from afb_scale.training.checkpoint import describe_file
    from afb_scale.config import dump_config
    from afb_scale.evaluation.hf_modeling.configuration_afb_gpt import AfbGptConfig
    from afb_scale.evaluation.hf_modeling.modeling_afb_gpt import AfbGptForCausalLM
    from afb_scale.evaluation.hf_modeling.tokenization_afb_gpt import AfbGptTokenizer

    require_eval_extras()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    src = read_megatron_source(source)
    if src.tokenizer is None:
        raise ConfigError(f"the run's tokenizer {src.cfg.data.tokenizer} is not found from here; an HF export needs it")
    model, tok = build_hf_model(src)
    _quiet_transformers()
    AfbGptConfig.register_for_auto_class()
    AfbGptForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    AfbGptTokenizer.register_for_auto_class("AutoTokenizer")
    with staged_directory(out) as stage:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        config = json.loads((stage / "config.json").read_text())
        if "AutoModelForCausalLM" not in config.get("auto_map", {}):
            raise RuntimeError(f"transformers wrote no auto_map into config.json: {config.get('auto_map')}")
        dump_config(src.cfg, stage / "config.yaml")
        info = {"format": HF_FORMAT, **src.provenance, "ffn_kind": src.cfg.model.ffn_kind,
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "model_sha256": describe_file(stage / "model.safetensors")["sha256"],
                "tokenizer_sha256": describe_file(stage / "tokenizer.model")["sha256"]}
        (stage / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def is_hf_export(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "COMPLETE").exists()


def load_model(source: str | os.PathLike):
    """(AfbGptForCausalLM, tokenizer, afb_scale Config or None) from any model source."""
    from afb_scale.config import load_config

    require_eval_extras()
    path = Path(source)
    if is_hf_export(path):
        from afb_scale.evaluation.hf_modeling.modeling_afb_gpt import AfbGptForCausalLM

        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{path} holds a Hugging Face model of type {config.get('model_type')!r}; "
                              f"this reads afb_scale exports (model_type {MODEL_TYPE!r})")
        if not (path / "tokenizer.model").is_file():
            raise ConfigError(f"{path} has no tokenizer.model")
        _quiet_transformers()
        # This package's own classes (the files the export copied): no remote-code cache needed.
        model = AfbGptForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
        return model, load_tokenizer(path / "tokenizer.model"), cfg
    src = read_megatron_source(path)
    if src.tokenizer is None:
        raise ConfigError(f"the run's tokenizer {src.cfg.data.tokenizer} is not found from here")
    model, tok = build_hf_model(src)
    return model, tok, src.cfg


def cmd_export_hf(args) -> int:
    out = export_hf(args.source, args.out_dir, overwrite=args.overwrite)
    info = json.loads((out / "export.json").read_text())
    print(f"exported step {info['step']} of {info['source_checkpoint']} to {out} as a Hugging Face model "
          f"({info['parameters']:,} parameters, fp32, {info['ffn_kind']}); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    if args.eval:
        from afb_scale.evaluation.evaluate import run_eval

        cfg_prefix = load_model_config(out).data.datasets
        if len(cfg_prefix) != 1:
            raise ConfigError("--eval with --format hf evaluates one dataset; this run blends several "
                              "(use afb-scale eval --data PREFIX)")
        r = run_eval(str(out), data=cfg_prefix[0].prefix, split="valid", progress=False)
        print(f"validation loss {r['loss']:.6f} (HF model, one process)")
    return 0


def load_model_config(out: Path):
    from afb_scale.config import load_config

    return load_config(Path(out) / "config.yaml")
