"""Sweep expansion and study reports (table + PNG plots from real TensorBoard event files)."""

import math

import pytest
from torch.utils.tensorboard import SummaryWriter

from afb_scale import cli
from afb_scale.config import ConfigError
from afb_scale.studies.report import summarize, write_report
from afb_scale.studies.sweep import expand


def test_sweep_expands_the_cross_product(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "base: " + str(cli.__file__).replace("afb_scale/cli.py", "configs/quickstart.yaml") + "\n"
        "run_root: runs/x\noverrides: [train.steps=5]\n"
        "axes:\n  model.ffn_kind: [gelu, afb-gelu]\n  train.lr: [1.0e-3, 2.0e-3, 4.0e-3]\n")
    runs = expand(sweep)
    assert len(runs) == 6
    assert runs[0].name == "ffn_kind=gelu_lr=0.001"
    assert runs[-1].overrides == ["train.steps=5", "model.ffn_kind=afb-gelu", "train.lr=0.004"]
    assert runs[-1].run_dir == "runs/x/ffn_kind=afb-gelu_lr=0.004"
    assert len({r.name for r in runs}) == 6


def test_sweep_rejects_bad_files(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: x.yaml\nrun_root: r\naxes: {train.lr: 3}\n")
    with pytest.raises(ConfigError, match="sweep axis 'train.lr' must be a non-empty list"):
        expand(sweep)
    assert cli.main(["sweep", "--sweep", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _fake_run(root, name, losses, norms, entropy=None):
    run = root / name
    w = SummaryWriter(str(run / "tensorboard"))
    for step, (loss, norm) in enumerate(zip(losses, norms), 1):
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/grad_norm", norm, step)
    w.add_scalar("val/loss", losses[-1] + 0.1, len(losses))
    w.add_scalar("val/loss", losses[0] + 0.1, 0)
    if entropy is not None:
        for layer in ("layer01", "layer02"):
            w.add_scalar(f"afb/{layer}/gate_entropy", entropy, len(losses))
    w.close()
    return run


def test_report_table_and_plots(tmp_path):
    a = _fake_run(tmp_path, "gelu", [5.0, 4.0, 3.0], [1.0, 3.0, 2.0])
    b = _fake_run(tmp_path, "afb-gelu", [5.0, 3.5, 2.5], [1.0, 1.0, 1.0], entropy=0.8)
    s = summarize(a)
    assert s["final val loss"] == pytest.approx(3.1) and s["best val loss"] == pytest.approx(3.1)
    assert s["grad-norm CV"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert s["max grad norm"] == 3.0 and s["gate entropy"] is None
    assert summarize(b)["gate entropy"] == pytest.approx(0.8)
    assert summarize(b)["grad-norm CV"] == 0.0
    report = write_report([a, b], tmp_path / "report")
    text = report.read_text()
    assert "| gelu |" in text and "| afb-gelu |" in text
    for png in ("loss.png", "val_loss.png", "grad_norm.png", "gate_entropy.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png


def test_sweep_submits_one_array_job(capsys):
    root = cli.__file__.replace("afb_scale/cli.py", "")
    status = cli.main(["sweep", "--sweep", root + "configs/studies/stability-tiny.yaml",
                       "--submit", root + "configs/cluster/local-cpu.yaml", "--dry-run"])
    script = capsys.readouterr().out
    assert status == 0
    assert "#SBATCH --array=0-3" in script
    # Each task's overrides, and the base config as the command.
    assert "model.ffn_kind=afb-gelu" in script and "train.lr=0.012" in script
    assert "configs/quickstart.yaml" in script
