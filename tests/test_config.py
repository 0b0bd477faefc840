"""Config composition, overrides and validation: bad input fails fast, in one line, before
any process group starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from afb_scale import cli
from afb_scale.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_composition_and_overrides():
    cfg = load_config(QUICKSTART, ["model.hidden_size=96", "train.lr=1e-3", "parallel.zero_stage=1"])
    assert cfg.model.ffn_kind == "afb-gelu" and cfg.parallel.tensor == 2  # from the included parts
    assert cfg.model.hidden_size == 96 and cfg.train.lr == 1e-3 and cfg.parallel.zero_stage == 1
    assert cfg.data.datasets[0].prefix == "data/default/stdlib_text_document"


@pytest.mark.parametrize("name", ["125m", "350m", "760m", "1.3b"])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu", "afb-gelu", "afb-swiglu"])
def test_size_presets(name, ffn):
    cfg = load_config(ROOT / "configs" / "size" / f"{name}.yaml", [f"model.ffn_kind={ffn}"])
    validate(cfg, world_size=8, cuda_available=True)
    expected = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 16)}[name]
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == expected
    f = m.resolved_ffn_hidden_size
    assert f == 4 * m.hidden_size if "swiglu" not in ffn else abs(f - 8 * m.hidden_size / 3) < 64


BAD = [
    (["model.hidden_sise=64"], 2, "unknown config key 'model.hidden_sise'"),
    (["parallel.tensor=2", "parallel.pipeline=2"], 6, "world size 6 is not a multiple of parallel.tensor x parallel.pipeline = 2 x 2"),
    (["model.num_attention_heads=3", "model.hidden_size=96"], 2, "model.num_attention_heads=3 must be divisible by parallel.tensor=2"),
    (["model.ffn_hidden_size=129"], 2, "model.ffn_hidden_size=129 must be divisible by parallel.tensor=2"),
    (["parallel.tensor=1", "parallel.pipeline=2", "model.num_layers=3"], 2, "model.num_layers=3 must be divisible by parallel.pipeline=2"),
    (["parallel.tensor=1", "train.global_batch_size=12", "train.micro_batch_size=4"], 2,
     "train.global_batch_size=12 must be a multiple of train.micro_batch_size x data-parallel size = 4 x 2"),
    (["parallel.tensor=1", "parallel.pipeline=2", "parallel.zero_stage=2"], 2,
     "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"),
    (["train.precision=fp16", "parallel.zero_stage=1"], 2, "train.precision=fp16 needs a GPU and none is available"),
    (["train.precision=bf16"], 2, "train.precision=bf16 with parallel.zero_stage=0: DeepSpeed accumulates bf16 "
     "gradients in fp32 only at ZeRO stage 1 or 3"),
    (["train.precision=bf16", "parallel.zero_stage=2"], 2, "train.precision=bf16 with parallel.zero_stage=2"),
    (["train.precision=fp16"], 2, "train.precision=fp16 with parallel.zero_stage=0: DeepSpeed's stage-0 fp16 "
     "optimizer is its unfused one"),
    (["parallel.tensor=1", "parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel=true needs parallel.tensor > 1"),
    (["model.attention=flash"], 2, "model.attention='flash' is not allowed; choose one of sdpa, local"),
    (["model.ffn_kind=relu"], 2, "model.ffn_kind='relu' is not allowed"),
    (["train.lr=fast"], 2, "train.lr='fast' must be a number"),
]


@pytest.mark.parametrize("overrides,world,message", BAD)
def test_invalid_config_fails_before_any_process_group(overrides, world, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    run_dir = tmp_path / "run"
    status = cli.main(["train", "--config", QUICKSTART, *overrides, f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not dist.is_initialized()
    assert not run_dir.exists()


def test_missing_config_file(capsys):
    assert cli.main(["plan", "--config", "nope.yaml", "--world-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file") and err.rstrip().endswith("nope.yaml' does not exist")


def test_cli_exit_status_in_a_fresh_process(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "3"}
    proc = subprocess.run([sys.executable, "-m", "afb_scale.cli", "train", "--config", QUICKSTART,
                           f"train.run_dir={tmp_path / 'r'}"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: world size 3 is not a multiple")
    assert not (tmp_path / "r").exists()


def test_afb_fused_on_off_survive_yaml_booleans():
    # YAML 1.1 reads a bare `off` / `on` as false / true; the key still gets its words.
    for word in ("off", "on", "auto"):
        assert load_config("configs/quickstart.yaml", [f"model.afb_fused={word}"]).model.afb_fused == word
