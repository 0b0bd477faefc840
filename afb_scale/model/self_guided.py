"""Self-guided training of the structured FFN kinds: the guide's weight alpha and its removal.

Each structured projection computes o = alpha * G x + (1 - alpha) * structured(x). With
S = round(model.guide_fraction * train.steps) guided steps, the update taken after `step`
completed steps uses

    cosine: alpha = (1 + cos(pi * step / S)) / 2        linear: alpha = 1 - step / S

(1 at step 0), and no guide at all from step S on. alpha is a pure function of the step (set
before every step by `on_step`, never stored), so a resumed run recomputes it.

The guide's lifetime, in completed steps c (a checkpoint tagged c was saved after c steps):
- the model built for a run resuming at c has the guide iff c <= S (`engine_config`);
- before step S + 1, `on_step(engine, S)` replaces the engine by one built without the guide and
  moves into it every other parameter, its AdamW state, the optimizer's hyper-parameters, the LR
  scheduler and DeepSpeed's step counters (`_transfer`), with the RNG states left as they were.
  From then on the guide is in no forward, optimizer or checkpoint.
Since alpha(S) would be 0, the guide's last contribution before removal is exactly nothing, and
the new engine continues the same run: a run resumed from any checkpoint (c <= S: guided, then
removed in-process the same way; c > S: built without the guide, loaded by DeepSpeed) matches an
uninterrupted one bit for bit (tests/test_self_guided.py).

The transfer handles torch's AdamW under DeepSpeed's fp32 engine at ZeRO 0 (the optimizer's
state is keyed by parameter) and under its ZeRO-1/2 and bf16 ZeRO-1 optimizers (flat fp32
partitions, moved parameter by parameter with deepspeed.utils' safe_get/set_full_* and
compat.deepspeed.start_zero_optimizer_state). ZeRO 3, fp16 and pipeline parallelism are
untested; config validation refuses self-guided training there for now (run them with
model.self_guided=false).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from afb_scale.compat import deepspeed as ds_compat
from afb_scale.config import Config, ConfigError

SCHEDULES = ("cosine", "linear")


def guided_steps(cfg: Config) -> int:
    """S: how many optimizer steps run with the guide (0: none)."""
    m = cfg.model
    if m.structure is None or not m.self_guided:
        return 0
    return int(round(m.guide_fraction * cfg.train.steps))


def alpha_at(step: int, guided: int, schedule: str = "cosine") -> float:
    """The guide's weight for the update after `step` completed steps (0 once step >= guided)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if step >= guided:
        return 0.0
    progress = step / guided
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def alpha_after(completed: int, guided: int, schedule: str = "cosine") -> float:
    """alpha of the model as it stands after `completed` steps: the one its last update (and the
    evaluation after it) used; 1 before any step. For a checkpoint, an export, a resharded load."""
    return alpha_at(max(completed - 1, 0), guided, schedule)


def check_layout(cfg: Config) -> None:
    """The layouts where the guide's removal moves the optimizer state exactly (see above)."""
    if guided_steps(cfg) == 0:
        return
    p, t = cfg.parallel, cfg.train
    tested = (t.precision == "fp32" and p.zero_stage in (0, 1, 2)) or (t.precision == "bf16" and p.zero_stage == 1)
    if not tested or p.pipeline != 1:
        raise ConfigError(
            f"model.self_guided=true ({cfg.model.ffn_kind}) runs at train.precision=fp32 with parallel.zero_stage=0-2 "
            f"or bf16 with zero_stage=1, and parallel.pipeline=1, for now, not precision={t.precision}, "
            f"zero_stage={p.zero_stage}, pipeline={p.pipeline}; set model.self_guided=false (or model.guide_fraction=0) there")


class SelfGuidedSchedule:
    """What the training loop calls: `engine_config` once, `on_step` before every step."""

    def __init__(self, cfg: Config, layout):
        self.cfg, self.layout = cfg, layout  # layout: this rank's ParallelLayout
        self.guided = guided_steps(cfg)
        self.schedule = cfg.model.guide_schedule

    def config_at(self, completed_steps: int) -> Config:
        """The config of the model that exists after `completed_steps` steps (guide iff <= S)."""
        if self.guided == 0 or completed_steps <= self.guided:
            return self.cfg if self.guided else _without_guide(self.cfg)
        return _without_guide(self.cfg)

    def alpha_after(self, completed_steps: int) -> float:
        return alpha_after(completed_steps, self.guided, self.schedule) if self.guided else 0.0

    def engine_config(self, plan) -> Config:
        """The config to build the engine from for a fresh run (plan None) or a resume plan
        (checkpoint.ResumePlan)."""
        return self.config_at(0 if plan is None else _plan_step(plan.dir))

    def on_step(self, engine, step: int):
        """Before the update after `step` completed steps: drop the guide at S, set alpha.
        Returns the engine to train with (a new one at the removal step)."""
        if self.guided == 0:
            return engine
        if step >= self.guided and has_guide(engine.module):
            engine = drop_guide(engine, _without_guide(self.cfg), self.layout)
        set_alpha(engine.module, alpha_at(step, self.guided, self.schedule))
        return engine


def _without_guide(cfg: Config) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, self_guided=False))


def _plan_step(tag_dir) -> int:
    match = re.search(r"(\d+)$", tag_dir.name)
    if match is None:
        raise ValueError(f"checkpoint directory {tag_dir} has no step number")
    return int(match.group(1))


def _linears(module: torch.nn.Module):
    from afb_scale.model.parallel_structured import structured_linears

    return structured_linears(module)


def has_guide(module: torch.nn.Module) -> bool:
    return any(lin.guide is not None for lin in _linears(module))


def set_alpha(module: torch.nn.Module, alpha: float) -> None:
    for lin in _linears(module):
        lin.alpha = alpha if lin.guide is not None else 0.0


def drop_guide(old, cfg: Config, layout):
    """A new Engine for `cfg` (no guide) continuing `old`'s state exactly (collective)."""
    from afb_scale import device
    from afb_scale.training.engine import Engine

    rng = device.rng_state()
    new = Engine(cfg, layout)  # reseeds torch's RNG while building; restored below
    _transfer(old, new)
    device.set_rng_state(rng)
    old.engine.destroy()
    return new


@torch.no_grad()
def _transfer(old, new) -> None:
    old_params = dict(old.module.named_parameters())
    new_params = dict(new.module.named_parameters())
    dropped = set(old_params) - set(new_params)
    if set(new_params) - set(old_params) or any(".guide." not in n for n in dropped):
        raise RuntimeError(f"guide removal: the models differ beyond the guides: {sorted(set(new_params) ^ set(old_params))[:4]}")
    old_opt, new_opt = old.engine.optimizer, new.engine.optimizer
    if ds_compat.is_zero_partitioned(old_opt):
        _transfer_partitioned(old_opt, new_opt, old_params, new_params)
    else:
        _transfer_per_parameter(old_opt, new_opt, old_params, new_params)
    for g_old, g_new in zip(old_opt.param_groups, new_opt.param_groups, strict=True):
        g_new.update({k: v for k, v in g_old.items() if k != "params"})
    new.scheduler.load_state_dict(old.scheduler.state_dict())
    ds_compat.copy_step_counters(old.engine, new.engine)


def _transfer_per_parameter(old_opt, new_opt, old_params, new_params) -> None:
    """ZeRO 0, fp32: torch's optimizer itself, its state keyed by the model's parameters."""
    for opt in (old_opt, new_opt):
        if not isinstance(opt, torch.optim.Optimizer):
            raise RuntimeError(f"guide removal at ZeRO 0 needs torch's optimizer (fp32), not {type(opt).__name__}")
    for name, p in new_params.items():
        q = old_params[name]
        p.copy_(q)
        if q in old_opt.state:
            new_opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in old_opt.state[q].items()}


def _transfer_partitioned(old_opt, new_opt, old_params, new_params) -> None:
    """ZeRO 1/2 (fp32) and bf16 ZeRO 1: each rank holds a slice of a flat fp32 copy and of the
    moments, partitioned differently once the guides are gone. DeepSpeed's safe_get/set_full_*
    move each kept parameter's full fp32 weight and moments across (all-reduces over its
    data-parallel group, so every rank walks the parameters in the same order); the model's
    working copy too."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_optimizer_state)

    keys = ds_compat.start_zero_optimizer_state(new_opt, old_opt)
    for name, p in new_params.items():
        q = old_params[name]
        full = safe_get_full_fp32_param(q)
        p.copy_(full.to(p.dtype))
        safe_set_full_fp32_param(p, full)
        for key in keys:
            safe_set_full_optimizer_state(p, safe_get_full_optimizer_state(q, key), key)
