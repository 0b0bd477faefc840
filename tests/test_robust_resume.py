"""Resuming a run directory with a config that cannot work there ends in one line.

Two kinds: a config whose values are absurd for any run (a run directory that is a file, a
sequence length of 10^8, a negative learning rate, ...: `validate`, before any process group),
and a config whose model differs from the checkpoint it would resume (another hidden size,
FFN kind, vocabulary, ...: `checkpoint.check_model_matches`, before any engine is built, on
every rank alike).
"""

from __future__ import annotations

import pytest

from afb_scale import cli
from afb_scale.config import ConfigError, load_config, validate

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
