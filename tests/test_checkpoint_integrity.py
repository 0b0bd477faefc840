"""Damaged checkpoints are found at load, reported in one line, and skipped for the previous one.

Copies of the DP = 2 ZeRO-1 reference run's checkpoints (steps 9 and 12) are damaged in the
ways storage and crashes damage files; `find_complete` must pick step 9 and say why it skipped
step 12, both in one process and verified by two real ranks sharing the checksum work (each
hashes half the files, so the damaged file is found by whichever rank owns it).
"""

from __future__ import annotations

import json
import shutil

import pytest

from checkpoint_cases import reference_run
from multiproc import run_ranks

NEWEST, PREVIOUS = "step00000012", "step00000009"


@pytest.fixture
def run_copy(tmp_path):
    src = reference_run("dp2-zero1")
    dst = tmp_path / "run"
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": (lambda d: _truncate(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                        "zero_pp_rank_1_mp_rank_00_optim_states.pt has"),
    "missing marker": (lambda d: (d / "COMPLETE").unlink(), "no COMPLETE marker (the save did not finish)"),
    "garbled marker": (lambda d: (d / "COMPLETE").write_text('{"format": 1, "tag"'), "COMPLETE marker is unreadable"),
    "missing shard": (lambda d: (d / "mp_rank_00_model_states.pt").unlink(), "missing file mp_rank_00_model_states.pt"),
    "flipped bit": (lambda d: _flip_byte(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                    "checksum mismatch in zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "missing rng state": (lambda d: (d / "rng" / "rank00001.pt").unlink(), "missing file rng/rank00001.pt"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_skipped_in_one_line(kind, run_copy, capsys):
    from afb_scale.training import checkpoint

    damage, reason = DAMAGE[kind]
    damage(run_copy / "checkpoints" / NEWEST)
    tag_dir, marker = checkpoint.find_complete(run_copy)
    assert (tag_dir.name, marker["step"]) == (PREVIOUS, 9)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("skipping checkpoint")]
    assert len(lines) == 1 and lines[0].startswith(f"skipping checkpoint {NEWEST}: {reason}"), lines


def _find_on_ranks(rank, world, run_dir):
    from afb_scale.training import checkpoint
    from afb_scale.config import ParallelConfig
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig())
    said = []
    found = checkpoint.find_complete(run_dir, announce=said.append)
    return found[0].name, said


def test_two_ranks_agree_on_a_bit_flip_only_one_of_them_reads(run_copy):
    from afb_scale.training import checkpoint

    marker = json.loads((run_copy / "checkpoints" / NEWEST / "COMPLETE").read_text())
    for name in sorted(marker["files"])[1::2]:  # files rank 1 hashes
        if name.endswith(".pt"):
            _flip_byte(run_copy / "checkpoints" / NEWEST / name)
            break
    results = run_ranks(_find_on_ranks, 2, run_copy)
    assert [tag for tag, _ in results] == [PREVIOUS, PREVIOUS]
    assert results[0][1] == [f"skipping checkpoint {NEWEST}: checksum mismatch in {name}"]
    assert checkpoint.verify(run_copy / "checkpoints" / PREVIOUS)[0] is not None


def test_only_incomplete_saves_mean_a_fresh_start_but_only_corrupt_ones_stop(run_copy):
    from afb_scale.training import checkpoint

    for tag in (NEWEST, PREVIOUS):
        (run_copy / "checkpoints" / tag / "COMPLETE").unlink()
    assert checkpoint.find_complete(run_copy, announce=lambda _: None) is None
    marked = run_copy / "checkpoints" / PREVIOUS
    (marked / "COMPLETE").write_text("not json")
    from afb_scale.config import ConfigError

    with pytest.raises(ConfigError, match=f"no loadable checkpoint .*{PREVIOUS} failed verification"):
        checkpoint.find_complete(run_copy, announce=lambda _: None)


def test_retention_keeps_the_newest_complete_and_drops_abandoned_saves(tmp_path):
    from afb_scale.training import checkpoint

    ckpt = tmp_path / "checkpoints"
    for step, complete in [(3, True), (6, True), (7, False), (9, True), (12, False)]:
        d = ckpt / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.MARKER).write_text("{}")
    checkpoint._apply_retention(ckpt, keep=2, current_step=9)
    # 3 is beyond the newest two, 7 an abandoned save older than 9; 12 (newer) is left alone.
    assert sorted(p.name for p in ckpt.iterdir()) == ["step00000006", "step00000009", "step00000012"]


def test_the_newest_complete_checkpoint_wins_whatever_latest_says(run_copy):
    # A kill between writing COMPLETE and replacing `latest` leaves `latest` one behind.
    from afb_scale.training import checkpoint

    (run_copy / "checkpoints" / "latest").write_text(PREVIOUS)
    assert checkpoint.find_complete(run_copy)[0].name == NEWEST
    (run_copy / "checkpoints" / "latest").unlink()
    assert checkpoint.find_complete(run_copy)[0].name == NEWEST


@pytest.mark.parametrize("override, message", [
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 must be >= 0"),
    ("train.max_bad_steps=0", "train.max_bad_steps=0 must be >= 1"),
    ("train.save_interval=0", "train.save_interval=0 must be >= 1"),
])
def test_checkpoint_settings_are_validated(override, message):
    from afb_scale.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [override, "train.warmup_steps=0"]), 1, cuda_available=False)
