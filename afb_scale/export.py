"""Export a trained model for evaluation: one directory, loadable in one process without DeepSpeed.

    python -m afb_scale.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--overwrite] [--eval]
    (afb-scale export ... once the CLI wires it to `cmd_export`)

RUN_DIR_OR_CHECKPOINT is a run directory (its newest checkpoint that verifies is used) or one
checkpoint directory (`<run_dir>/checkpoints/step00000300`). OUT_DIR receives:

    model.safetensors   every parameter as a full fp32 tensor, named as megatron-core's GPTModel
                        names it at TP = PP = 1 (embedding.word_embeddings.weight, decoder.layers.0...)
    config.yaml         the run's config; its `model:` section is what builds the network (for a
                        structured kind past its guide's removal, model.self_guided=false: no guide)
    tokenizer.model     a copy of the run's sentencepiece model
    export.json         provenance: source checkpoint, step, consumed samples, the tokenizer's
                        original path and sha256, the sha256 of model.safetensors, and for a
                        structured kind saved with its self-guided guide the guide's weight alpha
                        at that step (`guide_alpha`; null otherwise), which the loader applies

Loading it (no DeepSpeed is imported; megatron-core gets a one-process group):

    from afb_scale.export import load_exported, lm_loss
    model, cfg = load_exported("exports/run1")          # GPTModel, eval mode, CPU, fp32
    loss = lm_loss(model, tokens, labels, loss_mask)    # tokens/labels [b, seq_length]

`validation_loss(model, cfg)` evaluates the run's own validation batches, the number the
training run printed as "validation loss".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from data_prep.errors import ArgumentParser

EXPORT_FORMAT = "afb_scale-export-1"


def _checkpoint_of(src: Path) -> tuple[Path, dict]:
    from afb_scale.training import checkpoint

    if (src / checkpoint.MARKER).exists() or checkpoint._TAG.match(src.name):
        marker, reason = checkpoint.verify(src)
        if marker is None:
            raise SystemExit(f"error: checkpoint {src} cannot be exported: {reason}")
        return src, marker
    found = checkpoint.find_complete(src, announce=print)
    if found is None:
        raise SystemExit(f"error: {src} has no complete checkpoint")
    return found


def export_model(src: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the export directory (atomically: staged beside OUT_DIR, renamed at the end)."""
    from safetensors.torch import save_file

    from afb_scale.training.checkpoint import describe_file
    from afb_scale.config import dump_config, load_config
    from afb_scale.training.reshard import read_consolidated

    tag_dir, marker = _checkpoint_of(Path(src))
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
    cfg = load_config(tag_dir / "config.yaml")
    state = dict(read_consolidated(tag_dir))
    cfg, guide_alpha = _guide_at(cfg, marker["step"], state)
    with staged_directory(out) as stage:
        save_file(state, str(stage / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        dump_config(cfg, stage / "config.yaml")
        tokenizer = Path(cfg.data.tokenizer)
        tok_info = None
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, stage / "tokenizer.model")
            tok_info = {"file": "tokenizer.model", "source": str(tokenizer.resolve()),
                        "sha256": describe_file(tokenizer)["sha256"]}
        info = {
            "format": EXPORT_FORMAT, "source_checkpoint": str(tag_dir.resolve()), "step": marker["step"],
            "consumed_samples": marker["consumed_samples"], "trained_layout": marker["layout"],
            "tokenizer": tok_info, "model_sha256": describe_file(stage / "model.safetensors")["sha256"],
            "parameters": int(sum(t.numel() for t in state.values())), "guide_alpha": guide_alpha,
        }
        (stage / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def _guide_at(cfg, step: int, state: dict):
    """(the config that builds the checkpoint's model, its guide's alpha or None): a structured
    kind's guide exists in checkpoints up to its removal step (model/self_guided.py) and mixes in
    with the alpha its last update used."""
    if cfg.model.structure is None:
        return cfg, None
    from afb_scale.model.self_guided import SelfGuidedSchedule

    schedule = SelfGuidedSchedule(cfg, None)
    model_cfg = schedule.config_at(step)
    has_guide = any(".guide." in name for name in state)
    if has_guide != model_cfg.model.self_guided:
        raise SystemExit(f"error: the checkpoint at step {step} {'has' if has_guide else 'lacks'} the self-guided guide, "
                         f"but its config (guide_fraction={cfg.model.guide_fraction}, train.steps={cfg.train.steps}) "
                         f"says it {'lacks' if has_guide else 'has'} it")
    return model_cfg, schedule.alpha_after(step) if has_guide else None


@contextlib.contextmanager
def staged_directory(out: Path):
    """A temporary directory beside `out` to write into; when the block ends normally it
    replaces `out` (one rename), on any error it is removed: `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _single_process_megatron() -> None:
    """megatron-core's modules need its parallel state even at TP = PP = 1: a one-process gloo
    group (file store in a temporary directory, no port) if no process group exists yet."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from afb_scale import device

    device.setup()
    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="afb_scale_export_pg_")) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        device.seed_model_parallel_rng(0)  # megatron's attention forks this RNG on CUDA
    elif parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("load_exported builds a TP = PP = 1 model; call it in a process of its own")


@torch.no_grad()
def load_exported(out_dir: str | os.PathLike, verify: bool = True):
    """(megatron-core GPTModel with the exported weights, in eval mode on CPU, the run's Config)."""
    from safetensors.torch import load_file

    from afb_scale.training.checkpoint import describe_file
    from afb_scale.config import ParallelConfig, load_config
    from afb_scale.model.gpt import build_gpt_model

    out = Path(out_dir)
    info = json.loads((out / "export.json").read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{out} is not an afb_scale export ({info.get('format')!r})")
    if verify and describe_file(out / "model.safetensors")["sha256"] != info["model_sha256"]:
        raise ValueError(f"{out / 'model.safetensors'} does not match the sha256 in export.json")
    cfg = load_config(out / "config.yaml")
    if (out / "tokenizer.model").is_file():
        cfg.data.tokenizer = str(out / "tokenizer.model")
    _single_process_megatron()
    model = build_gpt_model(cfg.model, ParallelConfig(), "fp32", cfg.train.seed)
    state = load_file(str(out / "model.safetensors"))
    params = dict(model.named_parameters())
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise KeyError(f"export does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for name, p in params.items():
        p.copy_(state[name])
    if info.get("guide_alpha") is not None:
        from afb_scale.model.self_guided import set_alpha

        set_alpha(model, info["guide_alpha"])
    return model.eval(), cfg


def lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean next-token cross-entropy of one batch ([b, s] each), as training computes it."""
    from afb_scale.model.gpt import causal_attention_mask, position_ids_for

    seq = tokens.shape[1]
    logits = model(tokens, position_ids_for(tokens), causal_attention_mask(seq))  # [b, s, v]
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                reduction="none").view_as(labels)
    mask = loss_mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def validation_loss(model, cfg) -> float:
    """The run's validation loss: its first `train.eval_iters` validation global batches, each
    the mean over its micro-batches, then averaged (what training prints)."""
    from afb_scale.data.datasets import build_datasets, samples_needed

    _, valid, _ = build_datasets(cfg, samples_needed(cfg))
    G, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_batch = []
    for i in range(cfg.train.eval_iters):
        losses = []
        for start in range(i * G, (i + 1) * G, mb):
            samples = [valid[j] for j in range(start, start + mb)]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")}
            losses.append(lm_loss(model, **batch).item())
        per_batch.append(sum(losses) / len(losses))
    return sum(per_batch) / len(per_batch)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="run directory (newest complete checkpoint) or one checkpoint directory")
    p.add_argument("out_dir", help="export directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--eval", action="store_true", help="load the export in this process and print its validation loss")
    p.add_argument("--format", choices=("afb", "hf"), default="afb", help="afb (default): safetensors under "
                   "megatron's names; hf: a Hugging Face transformers directory (afb_scale/evaluation/hf_export.py)")


def cmd_export(args) -> int:
    if getattr(args, "format", "afb") == "hf":
        from afb_scale.evaluation.hf_export import cmd_export_hf

        return cmd_export_hf(args)
    out = export_model(args.source, args.out_dir, overwrite=args.overwrite)
    info = json.loads((out / "export.json").read_text())
    print(f"exported step {info['step']} of {info['source_checkpoint']} to {out} "
          f"({info['parameters']:,} parameters, fp32)")
    if info["tokenizer"] is None:
        print("warning: the run's tokenizer file was not found from this directory; export.json has no tokenizer")
    if args.eval:
        model, cfg = load_exported(out)
        print(f"validation loss {validation_loss(model, cfg):.6f} (exported model, one process, no DeepSpeed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m afb_scale.export", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return cmd_export(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
