"""Checkpoints that never lose work: atomic saves, verified loads, bit-exact resume, retention.

Layout of `<run_dir>/checkpoints/`:

    step00000300/                       one checkpoint (tag = step number)
        mp_rank_*_model_states.pt ...   DeepSpeed's files: model, optimizer and ZeRO partitions,
        zero_pp_rank_*_optim_states.pt  LR scheduler, loss scaler, our client state
        rng/rank00000.pt ...            every rank's python / numpy / torch (/ CUDA) RNG states
        consolidated/model-stage*.safetensors   the model in full fp32 tensors (reshard.py)
        config.yaml                     the run's config
        COMPLETE                        written last: JSON with every file's size and sha256,
                                        the layout and the model section of the config
    latest                              the newest complete tag, replaced atomically after COMPLETE

A save (collective, `save`): rank 0 clears any leftover directory of the same tag; every rank
writes its DeepSpeed files and RNG state; the consolidated model is gathered and written; then,
after a barrier, the ranks checksum the files between them (each file is read once, by one
rank, and fsync'd), rank 0 writes COMPLETE (tmp file + fsync + rename) and only then replaces
`latest`, and deletes checkpoints beyond `train.keep_checkpoints`. A process killed at any
moment leaves either a complete checkpoint or a directory without COMPLETE.

A load (collective, `load_latest`) trusts nothing: it walks the tags newest first, checks the
marker, every listed file's presence, size and sha256 (hashing spread over the ranks), and
skips a bad one with one line, `skipping checkpoint <tag>: <reason>`, in favour of the next
older. A config whose model differs from the checkpoint's in a setting its weights are tied to
(shapes, FFN kind, vocabulary, ...) ends in one line naming the key and both values, before any
engine is built (`check_model_matches`; checkpoints from before the marker recorded the model are
compared with their config.yaml). In the layout that wrote it the checkpoint is restored
through DeepSpeed's own loader plus the RNG states: the run continues bit for bit. In another
TP/PP/DP/ZeRO layout the model is loaded from the consolidated tensors (see reshard.py:
optimizer moments restart).

What must survive a resume besides DeepSpeed's own state is a set of named components, each
with `state_dict()` / `load_state_dict()` (the Trainer's data position, stability tracker,
activation-drift reference, ...): `save` stores them together in DeepSpeed's client state, and
`load` hands them back as one dict. The data order is a pure function of `consumed_samples`
(data/batches.py), so a resumed run neither repeats nor skips a sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from afb_scale import device
from afb_scale.compat import deepspeed as ds_compat
from afb_scale.config import ConfigError
from afb_scale.parallel.layout import ParallelLayout

MARKER = "COMPLETE"
LATEST = "latest"
FORMAT = 1
_TAG = re.compile(r"^step(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _print0(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checksums


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over `path`, fsync the directory: `path` is old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_file(path: Path) -> dict:
    """Size and sha256 of a file; also fsyncs it, so what was hashed is what is on disk."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _list_files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MARKER and not p.name.startswith("."))


def _shared(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _gathered(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# Layout and RNG


def layout_of(cfg, layout: ParallelLayout) -> dict:
    """What DeepSpeed's files are tied to: a different layout loads through the consolidated model."""
    return {"world_size": layout.world_size, "tensor": layout.tensor, "pipeline": layout.pipeline,
            "data": layout.data, "zero_stage": layout.zero_stage, "precision": cfg.train.precision}


def _layout_text(layout: dict) -> str:
    return (f"TP={layout['tensor']} PP={layout['pipeline']} DP={layout['data']} "
            f"ZeRO={layout['zero_stage']} {layout['precision']}")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), **device.rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    device.set_rng_state(state)


def _rng_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / "rng" / f"rank{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------
# Save


def save(engine, run_dir: str | Path, step: int, consumed_samples: int, components: dict | None = None) -> Path:
    """Collective: every rank calls it. `components`: name -> object with `state_dict()`, saved
    together and returned by `load`. Returns the checkpoint directory once it is complete."""
    cfg = engine.cfg
    ckpt, tag = checkpoint_dir(run_dir), tag_for(step)
    tag_dir = ckpt / tag
    rank = dist.get_rank()
    _print0(f"saving checkpoint {tag_dir}")
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a save of this step that never completed, or an older attempt's
            shutil.rmtree(tag_dir)
    dist.barrier()
    state = {"step": step, "consumed_samples": consumed_samples,
             "components": {name: c.state_dict() for name, c in (components or {}).items()}}
    engine.engine.save_checkpoint(str(ckpt), tag=tag, client_state=state, save_latest=False)
    rng_file = _rng_path(tag_dir, rank)
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), rng_file)
    if cfg.train.save_consolidated:
        from afb_scale.training.reshard import save_consolidated

        save_consolidated(engine, tag_dir)
    if rank == 0:
        from afb_scale.config import dump_config

        dump_config(cfg, tag_dir / "config.yaml")
    dist.barrier()  # every rank's files are written
    _seal(engine, ckpt, tag_dir, step, consumed_samples)
    return tag_dir


def _seal(engine, ckpt: Path, tag_dir: Path, step: int, consumed_samples: int) -> None:
    """Collective, once every rank's files are written: checksum them, write COMPLETE, then
    `latest`, then apply retention. A process killed before this returns leaves a checkpoint
    without its marker, which `find_complete` skips."""
    cfg, tag = engine.cfg, tag_dir.name
    rank, world = dist.get_rank(), dist.get_world_size()
    files = _shared(_list_files(tag_dir) if rank == 0 else None)
    mine = {name: describe_file(tag_dir / name) for name in files[rank::world]}
    described = {k: v for part in _gathered(mine) for k, v in part.items()}
    if rank == 0:
        marker = {
            "format": FORMAT, "tag": tag, "step": step, "consumed_samples": consumed_samples,
            "layout": layout_of(cfg, engine.layout), "consolidated": cfg.train.save_consolidated,
            "model": dataclasses.asdict(cfg.model),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: described[name] for name in files},
        }
        write_atomic(tag_dir / MARKER, json.dumps(marker, indent=1).encode())
        write_atomic(ckpt / LATEST, tag.encode())
        _apply_retention(ckpt, cfg.train.keep_checkpoints, step)
    dist.barrier()  # nobody moves on (or exits) before the marker and `latest` exist


def _tags(ckpt: Path) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint directory, newest first."""
    if not ckpt.is_dir():
        return []
    out = [(int(m.group(1)), p.name) for p in ckpt.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(out, reverse=True)


def _apply_retention(ckpt: Path, keep: int, current_step: int) -> None:
    """Keep the newest `keep` marked checkpoints (0: all); drop unmarked leftovers older than
    the one just completed (saves that never finished; a newer unmarked directory is left alone)."""
    marked = 0
    for step, tag in _tags(ckpt):
        path = ckpt / tag
        if (path / MARKER).is_file():
            marked += 1
            if keep and marked > keep:
                shutil.rmtree(path, ignore_errors=True)
        elif step < current_step:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Verify and load


def _read_marker(tag_dir: Path) -> tuple[Optional[dict], str]:
    path = tag_dir / MARKER
    if not path.is_file():
        return None, f"no {MARKER} marker (the save did not finish)"
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{MARKER} marker is unreadable ({type(e).__name__})"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict) \
            or marker.get("tag") != tag_dir.name or not {"step", "consumed_samples", "layout"} <= set(marker):
        return None, f"{MARKER} marker is not a format-{FORMAT} marker for {tag_dir.name}"
    return marker, ""


def _check_sizes(tag_dir: Path, marker: dict) -> str:
    for name, info in marker["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{name} has {size} bytes, {MARKER} says {info['size']} (truncated or overwritten)"
    return ""


def verify(tag_dir: Path, rank: int = 0, world: int = 1) -> tuple[Optional[dict], str]:
    """(marker, "") if the checkpoint is whole, else (None, reason). With world > 1 this rank
    checksums only its share of the files (the caller gathers the reasons)."""
    marker, reason = _read_marker(tag_dir)
    if marker is None:
        return None, reason
    reason = _check_sizes(tag_dir, marker)
    if reason:
        return None, reason
    for name in sorted(marker["files"])[rank::world]:
        if describe_file(tag_dir / name)["sha256"] != marker["files"][name]["sha256"]:
            return None, f"checksum mismatch in {name}"
    return marker, ""


def find_complete(run_dir: str | Path, announce=_print0) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that verifies, as (directory, marker); None if there is none.

    Collective when torch.distributed is initialised (ranks share the checksum work); also works
    in a single process without it (export). Raises if checkpoints exist but every one with a
    marker is corrupt: starting from scratch then would silently throw the run away.
    """
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    ckpt = checkpoint_dir(run_dir)
    tags = _shared([t for _, t in _tags(ckpt)]) if distributed else [t for _, t in _tags(ckpt)]
    rejected_marked = []
    for tag in tags:
        marker, reason = verify(ckpt / tag, rank, world)
        reasons = [r for r in (_gathered(reason) if distributed else [reason]) if r]
        if not reasons:
            return ckpt / tag, (_shared(marker) if distributed else marker)
        announce(f"skipping checkpoint {tag}: {reasons[0]}")
        if (ckpt / tag / MARKER).is_file():
            rejected_marked.append(tag)
    if rejected_marked:
        # Bad input, decided alike on every rank (the reasons are gathered): one line, exit 2.
        raise ConfigError(
            f"no loadable checkpoint in {ckpt}: {', '.join(rejected_marked)} failed verification; "
            "move them away to start the run from scratch")
    return None


# ----------------------------------------------------------------------------------------------
# The model a checkpoint holds


def _yaml_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _model_identity(m) -> list[tuple[str, object, str]]:
    """(key, value compared, value shown) of every model setting a checkpoint's weights are tied
    to, in the order a difference is reported. Settings without parameters (dropout, init std,
    attention kernel) may change on resume; seq_length only with learned position embeddings."""
    out = [("ffn_kind", m.ffn_kind, m.ffn_kind), ("num_layers", m.num_layers, m.num_layers),
           ("hidden_size", m.hidden_size, m.hidden_size),
           ("num_attention_heads", m.num_attention_heads, m.num_attention_heads),
           ("ffn_hidden_size", m.resolved_ffn_hidden_size, m.resolved_ffn_hidden_size)]
    if m.is_afb:
        out.append(("feedback_rank", m.feedback_rank, m.feedback_rank))
    if m.structure is not None:  # the resolved sizes: a share and an explicit rank may agree
        size = m.structured_size
        out += [("structured_rank", size.rank, size.rank), ("structured_blocks", size.blocks, size.blocks)]
    out += [("vocab_size", m.vocab_size, m.vocab_size),
            ("make_vocab_size_divisible_by", m.padded_vocab_size,
             f"{m.make_vocab_size_divisible_by} (padded vocabulary {m.padded_vocab_size})"),
            ("position_embedding_type", m.position_embedding_type, m.position_embedding_type)]
    if m.position_embedding_type == "learned_absolute":
        out.append(("seq_length", m.seq_length, m.seq_length))
    out += [("normalization", m.normalization, m.normalization),
            ("add_bias_linear", m.use_bias, _yaml_value(m.use_bias)),
            ("tie_embeddings", m.tie_embeddings, _yaml_value(m.tie_embeddings))]
    return out


def saved_model(tag_dir: Path, marker: dict):
    """The ModelConfig a checkpoint was saved with: the marker's record, or for checkpoints
    written before the marker had one, the model section of the checkpoint's config.yaml. None
    if neither can be read (the check is then skipped)."""
    import yaml

    from afb_scale.config import ConfigError, ModelConfig, _from_dict

    data = marker.get("model")
    if data is None:
        try:
            data = (yaml.safe_load((tag_dir / "config.yaml").read_text()) or {}).get("model")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
            return None
    if not isinstance(data, dict):
        return None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return _from_dict(ModelConfig, {k: v for k, v in data.items() if k in known}, "model")
    except (ConfigError, TypeError):
        return None


def check_model_matches(cfg, tag_dir: Path, marker: dict) -> None:
    """A ConfigError naming the first model setting in which `cfg` differs from the checkpoint
    (its value there and in the config), instead of a shape mismatch deep inside a load."""
    from afb_scale.config import ConfigError

    saved = saved_model(tag_dir, marker)
    if saved is None:
        return
    # The two lists line up up to their first difference: an optional entry depends only on a
    # setting compared before it (ffn_kind, position_embedding_type).
    for (key, have, shown), (_, had, was) in zip(_model_identity(cfg.model), _model_identity(saved)):
        if have != had:
            raise ConfigError(
                f"model.{key}={shown} but checkpoint {tag_dir} was saved with model.{key}={was}; resume "
                f"with model.{key}={was}, or start the new model in another train.run_dir")


def check_resume_model(cfg, run_dir: str | Path) -> None:
    """`check_model_matches` against the newest checkpoint with a readable marker, without
    checksums or a process group: for a command line to call before any process group starts.
    `resume_plan` checks again against the checkpoint it actually picks."""
    ckpt = checkpoint_dir(run_dir)
    for _, tag in _tags(ckpt):
        marker, _ = _read_marker(ckpt / tag)
        if marker is not None:
            check_model_matches(cfg, ckpt / tag, marker)
            return


@dataclasses.dataclass
class ResumePlan:
    """Which checkpoint a run resumes from, and how (decided before the engine is built)."""

    dir: Path
    marker: dict
    same_layout: bool  # True: DeepSpeed's own loader, bit-exact; False: consolidated weights
    weights: Optional[Mapping] = None  # another layout: the full model to build the engine from


@dataclasses.dataclass
class Restored:
    """What `load` gives back: the position, the components' states and this rank's RNG."""

    step: int
    consumed_samples: int
    components: dict
    rng: Optional[dict] = None  # None after resharding: RNG streams are per layout


def resume_plan(cfg, layout: ParallelLayout, run_dir: str | Path) -> Optional[ResumePlan]:
    """Collective, before the engine is built: which checkpoint to resume from and how (None:
    a fresh run). A config whose model differs from the checkpoint's is a ConfigError, on every
    rank alike."""
    found = find_complete(run_dir)
    if found is None:
        return None
    tag_dir, marker = found
    check_model_matches(cfg, tag_dir, marker)
    if marker["layout"] == layout_of(cfg, layout):
        return ResumePlan(tag_dir, marker, same_layout=True)
    if not marker.get("consolidated"):
        raise ConfigError(
            f"checkpoint {tag_dir} was saved at {_layout_text(marker['layout'])} without a consolidated "
            f"model (train.save_consolidated=false); resume it at that layout")
    from afb_scale.training.reshard import read_consolidated

    return ResumePlan(tag_dir, marker, same_layout=False, weights=read_consolidated(tag_dir))


def _components_of(client_state: dict) -> dict:
    if "components" in client_state:
        return client_state["components"]
    # Checkpoints from before components were named carried the stability window at top level.
    return {"stability": client_state["stability"]} if "stability" in client_state else {}


def load(engine, plan: ResumePlan) -> Restored:
    """Collective: restore what `resume_plan` chose into an engine built for it. The caller
    loads the components and applies the RNG states (`set_rng_state`) right before its next
    training step."""
    tag_dir, marker = plan.dir, plan.marker
    if plan.same_layout:
        path, state = engine.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        state = dict(state or {})
        rng = torch.load(_rng_path(tag_dir, dist.get_rank()), weights_only=False)
        _print0(f"resuming from {tag_dir} at step {state['step']} (optimizer, LR schedule, data position, RNG restored)")
        return Restored(state["step"], state["consumed_samples"], _components_of(state), rng)
    # Another layout: the weights went into the engine at construction. The step and data
    # position carry over; the LR schedule is a function of the step; Adam's moments restart.
    step, consumed = marker["step"], marker["consumed_samples"]
    ds_compat.set_training_position(engine.engine, engine.scheduler, step, consumed)
    _print0(f"resharding checkpoint {tag_dir} saved at {_layout_text(marker['layout'])} into "
            f"{_layout_text(layout_of(engine.cfg, engine.layout))}: weights, step {step} and data position loaded; "
            "optimizer moments restart (warm start)")
    return Restored(step, consumed, components={})
