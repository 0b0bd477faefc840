"""Every place afb_scale reaches into DeepSpeed 0.19.8's internals, with why.

The engine uses DeepSpeed through its public API (`deepspeed.initialize`, `train_batch`,
`backward`/`step`, `save_checkpoint`/`load_checkpoint`); the functions below are the only
writes to its private state. Each names the upstream code it replaces; `UPSTREAM` holds a hash of
that code in the pinned version, and tests/test_compat.py fails loudly when an upgrade changes it,
so whoever upgrades re-reads the patch instead of shipping a silently wrong one.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

# "module:qualname" -> sha256[:16] of inspect.getsource in deepspeed 0.19.8 (tests/test_compat.py).
UPSTREAM = {
    "deepspeed.runtime.engine:DeepSpeedEngine.clip_fp32_gradients": "c3ad53cbce68a72f",
    "deepspeed.runtime.engine:DeepSpeedEngine._take_model_step": "c4c6e01aa1fc4e7d",
    "deepspeed.runtime.engine:DeepSpeedEngine.load_checkpoint": "5728d3dfa42a3d6c",
    "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state": "45e666d78112a891",
    "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._optimizer_step": "d7e21affbbf9b696",
    "deepspeed.runtime.bf16_optimizer:BF16_Optimizer._lazy_init_hp_params_optimizer_state": "756e7b78c340beef",
    "deepspeed.runtime.bf16_optimizer:BF16_Optimizer.step": "9b21d4a28f8714d9",
}


def clip_fp32_gradients_with(engine, grad_norm: Callable[[list], torch.Tensor]) -> None:
    """Replace DeepSpeed's fp32 ZeRO-0 clipping with `grad_norm` (a norm that is right under PP),
    and keep the norm for `get_global_grad_norm`.

    Replaces `DeepSpeedEngine.clip_fp32_gradients` (runtime/engine.py:3502), which counts
    replicated parameters only on ranks whose pipe x model rank is 0 -- so under pipeline
    parallelism the layer norms of later stages are left out -- and discards the norm it computed.
    ZeRO >= 1 and the mixed-precision optimizers have their own (stage-aware) norm and are left alone.
    """

    def clip_fp32_gradients():
        params = list(engine.module.parameters())
        norm = grad_norm(params)
        engine._global_grad_norm = norm  # what get_global_grad_norm() returns
        # torch multiplies every gradient by min(1, max / (norm + 1e-6)) even when that is 1.0;
        # skipping the no-op multiply is bit-identical and saves a pass over all gradients. (One
        # host read of the norm: the loop reads it back every step anyway.)
        max_norm = engine.gradient_clipping()
        if torch.isfinite(norm) and float(norm) + 1e-6 > max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


def skip_non_finite_fp32_steps(engine, grad_norm: Callable[[list], torch.Tensor]) -> None:
    """Never apply a non-finite gradient on the one path DeepSpeed does not guard.

    DeepSpeed's ZeRO 1-3 and fp16/bf16 optimizers check the gradients for inf/NaN and skip such
    a step (no update, no LR-scheduler step, `was_step_applied()` False). Plain fp32 at ZeRO 0
    hands the gradients straight to torch's AdamW. Here that optimizer's `step` first takes the
    global gradient norm (the one clipping just computed, or a fresh one) and returns without
    updating when it is not finite; its `overflow` attribute is what `_take_model_step`
    (runtime/engine.py:3505, `if self.optimizer.overflow`) reads to count the step as skipped
    and leave the LR scheduler alone, exactly as on the ZeRO paths. The norm is identical on
    every rank (gradients are already reduced over DP, the norm over TP x PP), so all ranks skip
    together.
    """
    opt = engine.optimizer
    inner_step = opt.step
    opt.overflow = False

    def step(*args, **kwargs):
        if engine.gradient_clipping() <= 0.0:
            engine._global_grad_norm = grad_norm(list(engine.module.parameters()))
        norm = engine._global_grad_norm
        opt.overflow = norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)))
        if opt.overflow:
            return None
        return inner_step(*args, **kwargs)

    # torch's LRScheduler wrapped the original step to check call order and warns unless the
    # step it finds carries this mark (torch/optim/lr_scheduler.py, `patch_track_step_called`);
    # this wraps that wrapper, so the order check still runs.
    step._wrapped_by_lr_sched = True
    opt.step = step


def skip_allreduce_without_data_parallel_peers(engine) -> None:
    """At ZeRO 0 with a data-parallel group of one, turn off DeepSpeed's gradient all-reduce.

    DeepSpeedEngine.backward (runtime/engine.py:3163, `if self.enable_backward_allreduce`) then
    runs `buffered_allreduce_fallback` (engine.py:3095): it flattens every gradient into one
    buffer, all-reduces it over the data-parallel group, divides by its size and copies it back.
    Over a group of one that is an identity, and it cost ~8% of a step at the 4-layer d=256
    benchmark shape (benchmarks/bench_framework_overhead.py). `enable_backward_allreduce` is
    DeepSpeed's own switch for callers that reduce gradients themselves (its pipeline engine
    turns it off the same way). ZeRO >= 1 and the pipeline engine reduce through their own paths
    and are left alone.
    """
    engine.enable_backward_allreduce = False


def copy_step_counters(old, new) -> None:
    """Carry DeepSpeed's step counters from one engine to its replacement (self-guided training
    rebuilds the engine without the guide mid-run, model/self_guided.py). DeepSpeed has no API
    for this; these are the attributes `_take_model_step` and `save_checkpoint` read."""
    for counter in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
        setattr(new, counter, getattr(old, counter))


def set_training_position(engine, scheduler, step: int, consumed_samples: int) -> None:
    """Put a freshly built engine at `step` without DeepSpeed's checkpoint loader (a checkpoint
    from another layout: only the weights came across, reshard.py).

    `load_checkpoint` (runtime/engine.py) would set `global_steps` / `global_samples` from its
    own files; here there are none in this layout, so they are set directly, and the LR scheduler
    is moved to the step the way torch resumes one (`last_epoch = step - 1`, then one `step()`
    that sets the optimizer's LR for `step`, as an uninterrupted run has it).
    """
    engine.global_steps = step
    engine.global_samples = consumed_samples
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        scheduler.step()


def is_zero_partitioned(optimizer) -> bool:
    """True for DeepSpeed's ZeRO-1/2 optimizer and its bf16 ZeRO-1 one (BF16_Optimizer): flat
    fp32 partitions with per-parameter fragments, which deepspeed.utils' safe_get/set_* reach."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(optimizer, (DeepSpeedZeroOptimizer, BF16_Optimizer))


def _flat_partitions(optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 partition per parameter group (the tensors torch's optimizer steps)."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return optimizer.single_partition_of_fp32_groups  # DeepSpeedZeroOptimizer
    return optimizer.fp32_groups_flat_partition  # BF16_Optimizer


def start_zero_optimizer_state(new, old) -> list[str]:
    """Give a ZeRO-1/2 (or bf16 ZeRO-1) optimizer that has not stepped yet (`new`) the state torch's optimizer
    would create in its first step, shaped like `old`'s: per flat partition, every per-element
    state (AdamW: exp_avg, exp_avg_sq) zero and every other entry (the step count) copied; then
    link each parameter's fragment of it. Returns the per-element keys, which
    `deepspeed.utils.safe_set_full_optimizer_state` can now write parameter by parameter
    (self-guided training replaces its engine mid-run, model/self_guided.py).

    Why: DeepSpeedZeroOptimizer lets torch's optimizer create its state lazily in the first
    `step()` and only then links the parameters' fragments of it
    (`_lazy_init_hp_params_optimizer_state`, runtime/zero/stage_1_and_2.py and
    runtime/bf16_optimizer.py); before that the
    safe_set_* functions have nothing to write into. Both optimizers hold the same parameter
    groups in the same order (engine.param_groups), only the flat partitions' sizes differ.
    `old` is relinked first (`link_optimizer_state`).
    """
    link_optimizer_state(old)
    if new.optimizer.state:
        raise RuntimeError("start_zero_optimizer_state: the new optimizer already has state")
    olds, news = _flat_partitions(old), _flat_partitions(new)
    if len(olds) != len(news):
        raise RuntimeError(f"start_zero_optimizer_state: {len(olds)} parameter groups before, {len(news)} after")
    per_element: set[str] = set()
    for old_flat, new_flat in zip(olds, news):
        state = {}
        for key, value in old.optimizer.state[old_flat].items():
            if torch.is_tensor(value) and value.shape == old_flat.shape:
                state[key] = torch.zeros_like(new_flat)
                per_element.add(key)
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        new.optimizer.state[new_flat] = state
    link_optimizer_state(new)
    return sorted(per_element)


def link_optimizer_state(zero_optimizer) -> None:
    """(Re)link every parameter's fragment of a ZeRO-1/2 optimizer's state, so that
    `deepspeed.utils.safe_get_full_optimizer_state` reaches every parameter's moments.

    Why: DeepSpeedZeroOptimizer's `_optimizer_step(group_no)` links the fragments of *all*
    groups right after stepping the first one, when torch's optimizer has no state for the later groups yet, and then never again
    (`_hp_optimizer_states_linked`): the moments of every group but the first stay unreachable.
    After `load_checkpoint` the fragments are relinked to the weights but not to the loaded state.
    Running upstream's own linking again once the state exists fixes both.
    """
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()
