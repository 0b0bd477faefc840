"""The library patches (afb_scale/compat/) stand in for specific upstream code: if the pinned
megatron-core or DeepSpeed changes that code, these fail, naming what to re-read."""

import hashlib
import importlib
import inspect

import pytest
import torch

from afb_scale.compat import deepspeed as ds_compat
from afb_scale.compat import megatron as megatron_compat


def _source_hash(target: str) -> str:
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("target,expected", sorted({**ds_compat.UPSTREAM, **megatron_compat.UPSTREAM}.items()))
def test_patched_upstream_code_is_the_pinned_version(target, expected):
    got = _source_hash(target)
    assert got == expected, (f"{target} changed upstream (sha {got}, patched against {expected}): re-read the patch "
                             "in afb_scale/compat/ that names it, fix it, then update UPSTREAM")


def test_torch_lr_scheduler_still_marks_its_step_wrapper():
    """skip_non_finite_fp32_steps re-marks its wrapper with the attribute torch's LRScheduler
    checks; if torch renames it, the scheduler would warn on every run."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert getattr(opt.step, "_wrapped_by_lr_sched", False) is True


def test_training_position_moves_the_lr_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    class Counters:  # the two DeepSpeedEngine attributes set_training_position writes
        global_steps = global_samples = 0

    eng = Counters()
    ds_compat.set_training_position(eng, sched, step=4, consumed_samples=32)
    assert (eng.global_steps, eng.global_samples) == (4, 32)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / 5)
