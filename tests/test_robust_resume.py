"""Resuming a run directory with a config that cannot work there ends in one line.

Two kinds: a config whose values are absurd for any run (a run directory that is a file, a
sequence length of 10^8, a negative learning rate, ...: `validate`, before any process group),
and a config whose model differs from the checkpoint it would resume (another hidden size,
FFN kind, vocabulary, ...: `checkpoint.check_model_matches`, before any engine is built, on
every rank alike).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from afb_scale.training import checkpoint

from afb_scale import cli
from afb_scale.config import ConfigError, load_config, validate
from checkpoint_cases import REPO, Ranks, corpus, scratch, torchrun
from checkpoint_cases import overrides as run_overrides

QUICKSTART = "configs/quickstart.yaml"


# ----------------------------------------------------------------------------------------------
# Absurd values: refused by validate, one line naming the key, the value and what is allowed


def _bad_values(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "withfile").mkdir()
    (tmp_path / "withfile" / "checkpoints").write_text("not a directory")
    return [
        (f"train.run_dir={afile}", f"train.run_dir='{afile}' is a file; it must be a directory"),
        (f"train.run_dir={afile}/run", f"train.run_dir='{afile}/run' cannot be created: '{afile}' is a file"),
        ("train.run_dir=''", "train.run_dir='' must name a directory"),
        (f"train.run_dir={tmp_path / 'withfile'}", "holds a file 'checkpoints' where its checkpoint directory belongs"),
        (f"data.cache_dir={afile}", f"data.cache_dir='{afile}' is a file"),
        ("model.seq_length=100000000", "model.seq_length=100000000 must be between 1 and 1048576 (2**20)"),
        ("model.hidden_size=4194304", "model.hidden_size=4194304 must be between 1 and 131072 (2**17)"),
        ("model.num_layers=100000", "model.num_layers=100000 must be between 1 and 1024 (2**10)"),
        ("model.vocab_size=100000000", "model.vocab_size=100000000 must be between 1 and 16777216 (2**24)"),
        ("model.ffn_hidden_size=4194304", "model.ffn_hidden_size=4194304 must be between 1 and 1048576 (2**20)"),
        ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by=0 must be >= 1"),
        ("model.hidden_dropout=1.5", "model.hidden_dropout=1.5 must be in [0, 1)"),
        ("model.init_method_std=-0.02", "model.init_method_std=-0.02 must be a finite number > 0"),
        ("train.lr=-0.001", "train.lr=-0.001 must be a finite number > 0"),
        ("train.lr=.nan", "train.lr=nan must be a finite number > 0"),
        ("train.min_lr=-1e-4", "train.min_lr=-0.0001 must be a finite number >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be a finite number >= 0"),
        ("train.clip_grad=-1", "train.clip_grad=-1.0 must be a finite number >= 0 (0: no clipping)"),
        ("train.adam_beta2=1.0", "train.adam_beta2=1.0 must be in [0, 1)"),
        ("train.adam_eps=0", "train.adam_eps=0.0 must be a finite number > 0"),
        ("train.eval_iters=0", "train.eval_iters=0 must be >= 1"),
        ("train.log_interval=0", "train.log_interval=0 must be >= 1"),
        ("train.eval_interval=-5", "train.eval_interval=-5 must be >= 1"),
        ("train.global_batch_size=0", "train.global_batch_size=0 must be >= 1"),
        ("train.seed=-1", "train.seed=-1 must be between 0 and 4294967295"),
        ("train.startup_timeout_s=.inf", "train.startup_timeout_s=inf must be a finite number of seconds"),
        ("metrics.grad_norm_window=0", "metrics.grad_norm_window=0 must be >= 1"),
        ("metrics.layer_metrics_interval=-1", "metrics.layer_metrics_interval=-1 must be >= 0"),
        ("metrics.loss_spike_factor=0", "metrics.loss_spike_factor=0.0 must be a finite number > 0"),
    ]


def test_absurd_values_are_one_line_errors_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # the quickstart's TP=2 layout, as torchrun would say
    for override, message in _bad_values(tmp_path):
        run_dir = tmp_path / "run"
        overrides = [f"train.run_dir={run_dir}", override]  # the case's own run_dir, if any, wins
        with pytest.raises(ConfigError) as error:
            validate(load_config(QUICKSTART, overrides), world_size=2, cuda_available=False)
        assert message in str(error.value) and "\n" not in str(error.value), (override, str(error.value))
        assert cli.main(["train", "--config", QUICKSTART, *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == f"error: {error.value}", (override, err)
        assert not run_dir.exists()


def test_sane_values_at_the_bounds_pass(tmp_path):
    cfg = load_config(QUICKSTART, [f"train.run_dir={tmp_path / 'new' / 'run'}", "model.seq_length=1048576",
                                   "train.clip_grad=0", "train.weight_decay=0", "train.min_lr=0", "train.seed=0",
                                   "train.adam_beta1=0", "metrics.layer_metrics_interval=0"])
    validate(cfg, world_size=2, cuda_available=False)
    (tmp_path / "existing").mkdir()
    validate(load_config(QUICKSTART, [f"train.run_dir={tmp_path / 'existing'}"]), world_size=2, cuda_available=False)


# ----------------------------------------------------------------------------------------------
# Another model than the checkpoint's: one line naming the key and both values


# A two-step run of one process (checkpoint at step 2): hidden 64, 4 heads, 2 layers, afb-gelu
# (FFN 256), feedback rank 8, vocabulary 512, learned positions over 32 tokens, LayerNorm.
ONE_PROCESS = {"parallel.tensor": 1, "parallel.pipeline": 1, "train.steps": 2, "train.warmup_steps": 1,
               "train.save_interval": 2}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m afb_scale.cli train` in one process, no launcher."""
    return subprocess.run([sys.executable, "-m", "afb_scale.cli", "train", "--config", QUICKSTART, *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def trained_run() -> Path:
    run_dir = scratch() / "robust-resume"
    proc = _train(run_overrides(corpus(), run_dir, **ONE_PROCESS))
    assert proc.returncode == 0 and "training finished: 2 steps" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_dir


def _copy_of_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run(), tmp_path / "run"))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _expected(tag_dir: Path, key: str, new: str, old: str) -> str:
    return (f"model.{key}={new} but checkpoint {tag_dir} was saved with model.{key}={old}; resume with "
            f"model.{key}={old}, or start the new model in another train.run_dir")


def test_resume_with_another_hidden_size_ends_in_one_line(tmp_path):
    run_dir = _copy_of_run(tmp_path)
    checkpoints, metrics = _digest(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_bytes()
    proc = _train(run_overrides(corpus(), run_dir, **{**ONE_PROCESS, "train.steps": 4, "model.hidden_size": 128}))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    tag_dir = run_dir / "checkpoints" / "step00000002"
    assert proc.stderr.strip().splitlines()[-1] == "error: " + _expected(tag_dir, "hidden_size", "128", "64")
    assert "Traceback" not in proc.stdout + proc.stderr
    # Nothing of the run changed: its checkpoints and its metrics are as they were.
    assert _digest(run_dir / "checkpoints") == checkpoints
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_every_rank_of_two_ends_in_the_same_line(tmp_path):
    """Two plain rank processes (the environment torchrun gives each): both exit 2, none hangs."""
    run_dir = _copy_of_run(tmp_path)
    ranks = Ranks(2, run_overrides(corpus(), run_dir, **{**ONE_PROCESS, "model.hidden_size": 128}), tmp_path / "log",
                  env={"PYTHONUNBUFFERED": "1"})
    assert ranks.wait(timeout=240) == [2, 2], ranks.text()[-3000:]
    text = ranks.text()
    line = "error: " + _expected(run_dir / "checkpoints" / "step00000002", "hidden_size", "128", "64")
    assert text.splitlines().count(line) == 2, text[-3000:]
    assert "Traceback" not in text


@pytest.mark.parametrize("nproc", [1, 2])
def test_under_torchrun_every_rank_exits(nproc, tmp_path):
    run_dir = _copy_of_run(tmp_path)
    result = torchrun(nproc, run_overrides(corpus(), run_dir, **{**ONE_PROCESS, "model.hidden_size": 128}),
                      timeout=240)  # a rank that hangs makes this raise
    out = result.stdout
    assert result.returncode != 0, out[-3000:]
    assert "error: model.hidden_size=128 but checkpoint" in out, out[-3000:]
    # The only traceback is torchrun's own report that a child failed, none from a rank.
    assert out.count("Traceback (most recent call last)") == out.count("errors.ChildFailedError"), out[-3000:]
    assert "training finished" not in out


MODEL_CHANGES = [
    ("num_layers", 4, "4", "2"),
    ("hidden_size", 128, "128", "64"),
    ("num_attention_heads", 8, "8", "4"),
    ("ffn_kind", "afb-swiglu", "afb-swiglu", "afb-gelu"),
    ("ffn_kind", "gelu", "gelu", "afb-gelu"),
    ("ffn_hidden_size", 512, "512", "256"),
    ("feedback_rank", 16, "16", "8"),
    ("vocab_size", 1024, "1024", "512"),
    ("make_vocab_size_divisible_by", 384, "384 (padded vocabulary 768)", "128 (padded vocabulary 512)"),
    ("seq_length", 64, "64", "32"),
    ("position_embedding_type", "rope", "rope", "learned_absolute"),
    ("normalization", "RMSNorm", "RMSNorm", "LayerNorm"),
    ("add_bias_linear", False, "false", "true"),
    ("tie_embeddings", False, "false", "true"),
]

# Settings without parameters, or equal after resolution: a resume may change them.
MODEL_KEEPS = [("hidden_dropout", 0.3), ("attention_dropout", 0.2), ("attention", "local"), ("afb_fused", "off"),
               ("init_method_std", 0.01),
               ("make_vocab_size_divisible_by", 256), ("add_bias_linear", True), ("ffn_hidden_size", 256)]


def _saved(tmp_path=None):
    tag_dir = trained_run() / "checkpoints" / "step00000002"
    return tag_dir, json.loads((tag_dir / checkpoint.MARKER).read_text()), load_config(tag_dir / "config.yaml")


def test_every_model_setting_the_weights_are_tied_to_is_compared():
    tag_dir, marker, saved = _saved()
    assert marker["model"]["hidden_size"] == 64  # the marker records the model section
    checkpoint.check_model_matches(saved, tag_dir, marker)
    for attr, value, new, old in MODEL_CHANGES:
        cfg = copy.deepcopy(saved)
        setattr(cfg.model, attr, value)
        with pytest.raises(ConfigError) as error:
            checkpoint.check_model_matches(cfg, tag_dir, marker)
        assert str(error.value) == _expected(tag_dir, attr, new, old)
    for attr, value in MODEL_KEEPS:
        cfg = copy.deepcopy(saved)
        setattr(cfg.model, attr, value)
        checkpoint.check_model_matches(cfg, tag_dir, marker)


def test_sequence_length_may_change_with_rotary_positions():
    tag_dir, marker, saved = _saved()
    rope = copy.deepcopy(marker)
    rope["model"]["position_embedding_type"] = "rope"
    cfg = copy.deepcopy(saved)
    cfg.model.position_embedding_type, cfg.model.seq_length = "rope", 128
    checkpoint.check_model_matches(cfg, tag_dir, rope)
    cfg.model.hidden_size = 128
    with pytest.raises(ConfigError, match=r"^model\.hidden_size=128 but"):
        checkpoint.check_model_matches(cfg, tag_dir, rope)


def test_checkpoints_from_before_the_record_are_compared_through_their_config(tmp_path):
    tag_dir, marker, saved = _saved()
    legacy = {k: v for k, v in marker.items() if k != "model"}
    cfg = copy.deepcopy(saved)
    cfg.model.num_layers = 4
    with pytest.raises(ConfigError) as error:
        checkpoint.check_model_matches(cfg, tag_dir, legacy)
    assert str(error.value) == _expected(tag_dir, "num_layers", "4", "2")
    # Neither a record nor a readable config.yaml: nothing to compare with, the check is skipped.
    bare = tmp_path / "step00000002"
    bare.mkdir()
    checkpoint.check_model_matches(cfg, bare, legacy)
    (bare / "config.yaml").write_text("model: [unreadable\n")
    checkpoint.check_model_matches(cfg, bare, legacy)


def test_check_without_a_process_group(tmp_path):
    """`check_resume_model` reads the newest marker without checksums or collectives, for a
    command line to call before any process group starts."""
    _, _, saved = _saved()
    cfg = copy.deepcopy(saved)
    cfg.model.ffn_kind = "gelu"
    with pytest.raises(ConfigError, match=r"^model\.ffn_kind=gelu but checkpoint .*step00000002 was saved with "
                                          r"model\.ffn_kind=afb-gelu"):
        checkpoint.check_resume_model(cfg, trained_run())
    checkpoint.check_resume_model(saved, trained_run())
    checkpoint.check_resume_model(cfg, tmp_path / "fresh")
    assert not dist.is_initialized()


def test_the_same_model_still_resumes(tmp_path):
    run_dir = _copy_of_run(tmp_path)
    # Dropout may change on resume; the model's weights are the same shapes.
    proc = _train(run_overrides(corpus(), run_dir, **{**ONE_PROCESS, "train.steps": 3, "model.hidden_dropout": 0.0}))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'step00000002'}" in proc.stdout
    assert "training finished: 3 steps" in proc.stdout
