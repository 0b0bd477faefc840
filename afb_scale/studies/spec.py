"""Study files and their expansion into named training runs.

A study file (configs/studies/*.yaml) names the question and the grid that answers it:

    study: stability                 # stability | lr-sweep | scaling
    base: ../quickstart.yaml         # a run config, relative to this file
    run_root: runs/study-stability   # run <name> goes to <run_root>/<name>
    overrides: [train.steps=60]      # applied to every run
    kinds: [gelu, swiglu, afb-gelu, afb-swiglu]
    seeds: [1, 2, 3]                 # train.seed: initialisation and data order
    nproc: 1                         # processes per run with --run (torchrun when > 1)
    threads: 1                       # with --run: OMP_NUM_THREADS of each run (default: torch's)
    # stability:  lr_multipliers: [1, 4, 10]      (x the base config's train.lr and train.min_lr)
    # lr-sweep:   lrs: {start: 3.0e-4, stop: 3.0e-1, count: 7}   (log-spaced) or a list;
    #             train.min_lr = lr / 10 (the GPT-3 presets' ratio)
    # scaling:    sizes: {NAME: size YAML (relative) or a list of overrides, ...}
    #             tokens_per_parameter: 20, count_embeddings: true, extrapolate_to: [1.3e9]
    # every study: divergence_margin: 1.0   (nats; see collect.py's definition of diverged)

Each run carries `study_run.json` in its run directory (written before it starts): the study,
kind, seed, LR, size, parameter count and FLOPs per token. With the study file copied to
`<run_root>/study.yaml`, the report needs nothing but the run root.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from afb_scale.config import FFN_KINDS, ConfigError, load_config, validate

STUDIES = ("stability", "lr-sweep", "scaling")

COMMON_KEYS = {"study", "base", "run_root", "overrides", "kinds", "seeds", "nproc", "threads", "divergence_margin"}
STUDY_KEYS = {
    "stability": {"lr_multipliers"},
    "lr-sweep": {"lrs"},
    "scaling": {"sizes", "tokens_per_parameter", "count_embeddings", "extrapolate_to"},
}
RUN_META = "study_run.json"
STUDY_COPY = "study.yaml"


@dataclass
class StudyRun:
    name: str
    config: str  # the base run config
    overrides: list[str]  # including train.run_dir
    run_dir: str
    meta: dict = field(default_factory=dict)  # kind, seed, lr, lr_multiplier, size, params, ...

    @property
    def train_args(self) -> list[str]:
        return ["--config", self.config, *self.overrides]


@dataclass
class Study:
    kind: str
    path: str
    spec: dict
    runs: list[StudyRun]

    @property
    def run_root(self) -> str:
        return self.spec["run_root"]

    @property
    def nproc(self) -> int:
        return int(self.spec.get("nproc", 1))

    @property
    def threads(self) -> int | None:
        return self.spec.get("threads")


def log_spaced(start: float, stop: float, count: int) -> list[float]:
    """`count` LRs from start to stop, evenly spaced in log, rounded to 3 significant digits."""
    if count < 2:
        return [float(start)]
    step = (math.log(stop) - math.log(start)) / (count - 1)
    return [float(f"{math.exp(math.log(start) + i * step):.3g}") for i in range(count)]


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if k == "include":
            raise ConfigError(f"a size file may not use include: ({prefix or 'top level'})")
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return out


def non_embedding(m, params: int) -> int:
    """Parameters less the token (and output, when untied) and learned position embeddings."""
    n = params - m.padded_vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    if m.position_embedding_type == "learned_absolute":
        n -= m.seq_length * m.hidden_size
    return n


def _size_overrides(name: str, entry, here: Path) -> list[str]:
    if isinstance(entry, list) and all(isinstance(o, str) for o in entry):
        return list(entry)
    if isinstance(entry, str):
        path = here / entry
        if not path.is_file():
            raise ConfigError(f"scaling size {name!r}: size file {str(path)!r} does not exist")
        return _flatten(yaml.safe_load(path.read_text()) or {})
    raise ConfigError(f"scaling size {name!r} must be a size YAML path or a list of key=value overrides, not {entry!r}")


def _lr_slug(lr: float) -> str:
    return f"{lr:.3g}".replace("+", "")


def _need_list(spec: dict, key: str, path: Path) -> list:
    value = spec.get(key)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"study file {str(path)!r}: {key} must be a non-empty list, not {value!r}")
    return value


def final_model(model):
    """The model a run ends with, whose size and FLOPs a study counts: a structured kind's
    self-guided guide is gone by then (model/self_guided.py), so it is left out of N."""
    return replace(model, self_guided=False) if model.structure is not None else model


def load_study(study_path: str | os.PathLike) -> Study:
    """Read and expand a study file; every run's config is type-checked (not yet against a world)."""
    path = Path(study_path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"study file {str(path)!r} must be a mapping")
    kind = spec.get("study")
    if kind not in STUDIES:
        raise ConfigError(f"study file {str(path)!r}: study={kind!r} is not allowed; choose one of {', '.join(STUDIES)}")
    unknown = set(spec) - COMMON_KEYS - STUDY_KEYS[kind]
    if unknown:
        raise ConfigError(f"study file {str(path)!r}: unknown key(s) {sorted(unknown)} for a {kind} study; allowed: "
                          f"{', '.join(sorted(COMMON_KEYS | STUDY_KEYS[kind]))}")
    for key in ("base", "run_root"):
        if not isinstance(spec.get(key), str):
            raise ConfigError(f"study file {str(path)!r} needs {key}: (a path)")
    kinds = _need_list(spec, "kinds", path)
    for k in kinds:
        if k not in FFN_KINDS:
            raise ConfigError(f"study file {str(path)!r}: kind {k!r} is not allowed; choose from {', '.join(FFN_KINDS)}")
    seeds = _need_list(spec, "seeds", path)
    if not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"study file {str(path)!r}: seeds must be distinct non-negative integers, not {seeds!r}")
    if not isinstance(spec.get("nproc", 1), int) or spec.get("nproc", 1) < 1:
        raise ConfigError(f"study file {str(path)!r}: nproc={spec.get('nproc')!r} must be an integer >= 1")
    threads = spec.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"study file {str(path)!r}: threads={threads!r} must be an integer >= 1")
    base = (path.parent / spec["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"study file {str(path)!r}: base config {str(base)!r} does not exist")
    try:  # a path relative to the working directory when it is below it (so cluster nodes resolve it too)
        base_arg = str(base.relative_to(Path.cwd()))
    except ValueError:
        base_arg = str(base)
    common = [str(o) for o in spec.get("overrides") or []]
    root = spec["run_root"].rstrip("/")
    runs: list[StudyRun] = []

    def add(name: str, extra: list[str], meta: dict) -> None:
        run_dir = f"{root}/{name}"
        overrides = common + extra + [f"train.run_dir={run_dir}"]
        try:
            cfg = load_config(base_arg, overrides)
        except ConfigError as e:
            raise ConfigError(f"study run {name}: {e}") from None
        from afb_scale import cost

        m = final_model(cfg.model)
        params = cost.parameter_count(m)
        tokens_per_step = cfg.train.global_batch_size * m.seq_length
        meta = {"study": kind, "name": name, **meta, "threads": threads, "lr": cfg.train.lr, "seed": cfg.train.seed,
                "params": params, "non_embedding_params": non_embedding(m, params),
                "flops_per_token": cost.flops_per_token(m), "steps": cfg.train.steps,
                "tokens": cfg.train.steps * tokens_per_step}
        runs.append(StudyRun(name, base_arg, overrides, run_dir, meta))

    if kind == "stability":
        mults = _need_list(spec, "lr_multipliers", path)
        nominal_cfg = load_config(base_arg, common).train
        nominal, nominal_min = nominal_cfg.lr, nominal_cfg.min_lr
        for s in seeds:  # seed by seed: a study stopped part-way has every cell, at fewer seeds
            for k in kinds:
                for mult in mults:
                    add(f"{k}_lr{mult:g}x_seed{s}",
                        [f"model.ffn_kind={k}", f"train.lr={nominal * mult:.6g}", f"train.seed={s}",
                         f"train.min_lr={nominal_min * mult:.6g}"],  # the whole schedule scaled
                        {"kind": k, "lr_multiplier": float(mult), "nominal_lr": nominal})
    elif kind == "lr-sweep":
        lrs = spec.get("lrs")
        if isinstance(lrs, dict):
            if set(lrs) != {"start", "stop", "count"}:
                raise ConfigError(f"study file {str(path)!r}: lrs needs start, stop and count, not {sorted(lrs)}")
            lrs = log_spaced(float(lrs["start"]), float(lrs["stop"]), int(lrs["count"]))
        lrs = _need_list({"lrs": lrs}, "lrs", path)
        for s in seeds:
            for k in kinds:
                for lr in lrs:
                    add(f"{k}_lr{_lr_slug(float(lr))}_seed{s}",
                        [f"model.ffn_kind={k}", f"train.lr={float(lr):.6g}", f"train.seed={s}",
                         f"train.min_lr={float(lr) / 10:.6g}"],
                        {"kind": k})
    else:
        sizes = spec.get("sizes")
        if not isinstance(sizes, dict) or not sizes:
            raise ConfigError(f"study file {str(path)!r}: sizes must be a mapping NAME: size YAML or overrides")
        ratio = float(spec.get("tokens_per_parameter", 20))
        with_emb = bool(spec.get("count_embeddings", True))
        planned = []
        for size, entry in sizes.items():
            size_ov = _size_overrides(size, entry, path.parent)
            for k in kinds:
                probe = load_config(base_arg, common + size_ov + [f"model.ffn_kind={k}"])
                m = final_model(probe.model)
                from afb_scale import cost

                n = cost.parameter_count(m)
                if not with_emb:
                    n = non_embedding(m, n)
                tokens_per_step = probe.train.global_batch_size * m.seq_length
                steps = max(1, math.ceil(ratio * n / tokens_per_step))
                warmup = min(probe.train.warmup_steps, max(1, steps // 10))
                evals = max(1, steps // 4)
                planned.append((size, k, size_ov + [
                    f"model.ffn_kind={k}", f"train.steps={steps}", f"train.warmup_steps={warmup}",
                    f"train.eval_interval={evals}",
                    f"train.save_interval={max(evals, probe.train.save_interval if steps > 2000 else evals)}",
                    f"metrics.layer_metrics_interval={evals}"],
                    {"kind": k, "size": size, "fit_params": n, "tokens_per_parameter": ratio,
                     "count_embeddings": with_emb}))
        for s in seeds:  # seed by seed, sizes in the file's order (small first: a partial study can fit)
            for size, k, ov, meta in planned:
                add(f"{size}_{k}_seed{s}", ov + [f"train.seed={s}"], meta)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"study file {str(path)!r}: two runs share a name; make kinds/seeds/LRs/sizes distinct")
    return Study(kind, str(path), spec, runs)


def validate_runs(study: Study, world_size: int) -> None:
    """Every run's config against the world it will run in, before the first one starts."""
    for run in study.runs:
        try:
            validate(load_config(run.config, run.overrides), world_size)
        except ConfigError as e:
            raise ConfigError(f"study run {run.name}: {e}") from None


def write_study_files(study: Study) -> None:
    """`<run_root>/study.yaml` and each run's `study_run.json`: what the report reads."""
    root = Path(study.run_root)
    root.mkdir(parents=True, exist_ok=True)
    (root / STUDY_COPY).write_text(yaml.safe_dump({**study.spec, "study_file": study.path}, sort_keys=False))
    for run in study.runs:
        d = Path(run.run_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / RUN_META).write_text(json.dumps({**run.meta, "overrides": run.overrides, "config": run.config}, indent=1))


def as_dict(run: StudyRun) -> dict:
    return asdict(run)
