"""Studies (afb_scale/studies/): statistics with known answers, expansion of the study files, the
reports on synthetic run directories, the Slurm array rendering, and skip/resume of a real run."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from afb_scale import cli
from afb_scale.config import ConfigError
from afb_scale.studies import collect, stats
from afb_scale.studies.spec import RUN_META, STUDY_COPY, load_study, log_spaced
from afb_scale.studies.study_report import write_study_report
from conftest import corpus_overrides

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "configs" / "studies"


# ---------------------------------------------------------------------------------------------
# statistics

def test_bootstrap_mean_interval():
    assert stats.bootstrap_mean([2.0, 2.0, 2.0]).fmt() == "2 [2, 2]"
    iv = stats.bootstrap_mean([1.0, 2.0, 3.0, None, math.nan])
    assert iv.n == 3 and iv.mean == 2.0 and 1.0 <= iv.lo < 2.0 < iv.hi <= 3.0
    # Many draws from N(5, 1): the percentile interval is about mean +- 1.96 / sqrt(n).
    x = np.random.default_rng(1).normal(5.0, 1.0, 400)
    iv = stats.bootstrap_mean(list(x))
    half = 1.96 * x.std() / math.sqrt(x.size)
    assert iv.lo == pytest.approx(x.mean() - half, abs=0.02) and iv.hi == pytest.approx(x.mean() + half, abs=0.02)
    assert stats.bootstrap_mean([]).fmt() == "-" and stats.bootstrap_mean([4.0]).fmt() == "4"


def test_eta_fits_startup_plus_work():
    from afb_scale.studies.runner import eta_seconds

    # 10 s start-up + 2 s per unit of work, recovered from two runs and applied to the rest.
    assert eta_seconds([(1.0, 12.0), (5.0, 20.0)], [10.0, 0.5]) == pytest.approx(30.0 + 11.0)
    assert eta_seconds([(2.0, 8.0)], [1.0, 3.0]) == pytest.approx(16.0)  # one run: proportional
    assert eta_seconds([], [1.0]) == 0.0


def test_paired_difference_uses_matching_seeds():
    base = {1: 3.0, 2: 4.0, 3: 5.0, 4: 9.0}
    afb = {1: 2.5, 2: 3.5, 3: 4.5}  # seed 4 has no partner: left out
    iv = stats.paired_difference(afb, base)
    assert (iv.mean, iv.lo, iv.hi, iv.n) == pytest.approx((-0.5, -0.5, -0.5, 3))


def test_lr_sensitivity_known_answer():
    # L0 = 10; L(lr) = 5, 3, diverged (NaN -> L0), 12 (capped at L0): L* = 3, mean of [2, 0, 7, 7] = 4.
    assert stats.lr_sensitivity({1e-3: 5.0, 1e-2: 3.0, 1e-1: math.nan, 3e-1: 12.0}, 10.0) == pytest.approx(4.0)
    # Seeds that agree give a zero-width interval at the same value.
    losses = {1e-3: {1: 5.0, 2: 5.0}, 1e-2: {1: 3.0, 2: 3.0}, 1e-1: {1: math.nan, 2: math.nan}}
    iv = stats.lr_sensitivity_interval(losses, {1: 10.0, 2: 10.0})
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((3.0, 3.0, 3.0))


def test_power_law_fit_recovers_a_known_exponent():
    n = np.geomspace(1e4, 1e7, 6)
    law = stats.PowerLaw(E=1.7, A=400.0, alpha=0.34)
    fit = stats.fit_power_law(n, law(n))
    assert fit.alpha == pytest.approx(0.34, rel=1e-3) and fit.E == pytest.approx(1.7, abs=1e-3)
    assert fit.A == pytest.approx(400.0, rel=1e-2)
    # Noisy seeds per size: the bootstrap interval on alpha covers the truth, and the
    # extrapolation's interval covers the true value at 10x the largest N.
    rng = np.random.default_rng(0)
    points = {float(x): list(law(x) + rng.normal(0, 0.01, 5)) for x in n}
    res = stats.bootstrap_power_law(points, targets=[1e8], n_boot=300)
    assert res.alpha.lo <= 0.34 <= res.alpha.hi and res.alpha.hi - res.alpha.lo < 0.2
    assert res.predictions[1e8].lo <= law(1e8) <= res.predictions[1e8].hi
    with pytest.raises(ValueError, match="at least 3 distinct N"):
        stats.fit_power_law([1.0, 2.0], [3.0, 2.0])


# ---------------------------------------------------------------------------------------------
# study files

def test_cpu_study_files_expand():
    s = load_study(STUDIES / "stability-cpu.yaml")
    assert s.kind == "stability" and len(s.runs) == 4 * 3 * 3
    r = next(r for r in s.runs if r.name == "afb-swiglu_lr10x_seed3")
    assert "train.lr=0.03" in r.overrides and "train.seed=3" in r.overrides
    assert r.overrides[-1] == f"train.run_dir={s.run_root}/afb-swiglu_lr10x_seed3"
    lr = load_study(STUDIES / "lr-sweep-cpu.yaml")
    lrs = sorted({r.meta["lr"] for r in lr.runs})
    assert len(lrs) >= 7 and lrs[0] == pytest.approx(3e-4) and lrs[-1] == pytest.approx(3e-1)
    assert np.allclose(np.diff(np.log(lrs)), math.log(1000) / 6, rtol=0.01)  # evenly log-spaced
    sc = load_study(STUDIES / "scaling-cpu.yaml")
    for kind in ("gelu", "afb-swiglu"):
        ns = {r.meta["size"]: r.meta["fit_params"] for r in sc.runs if r.meta["kind"] == kind}
        assert len(ns) >= 4 and max(ns.values()) / min(ns.values()) >= 8
    for r in sc.runs:  # tokens = ratio x N, rounded up to whole steps of 8 x 64 tokens
        assert 10 * r.meta["fit_params"] <= r.meta["tokens"] < 10 * r.meta["fit_params"] + 8 * 64
    gpu = load_study(STUDIES / "scaling-gpt3.yaml")
    assert {r.meta["size"] for r in gpu.runs} == {"125m", "350m", "760m", "1.3b"}
    big = next(r for r in gpu.runs if r.name == "1.3b_gelu_seed1")
    assert "model.hidden_size=2048" in big.overrides and big.meta["tokens"] >= 20 * big.meta["params"]
    assert log_spaced(1.0, 100.0, 3) == [1.0, 10.0, 100.0]


def test_structured_scaling_study_counts_the_model_without_its_guide():
    import dataclasses

    from afb_scale import cost
    from afb_scale.config import load_config

    study = load_study(STUDIES / "scaling-structured-cpu.yaml")
    assert len(study.runs) == 4 * 4 and {r.meta["kind"] for r in study.runs} >= {"lowrank-gelu", "blockshuffle-gelu"}
    run = next(r for r in study.runs if r.name == "h64-l2_blockdense-gelu_seed1")
    m = load_config(run.config, run.overrides).model
    assert m.self_guided  # it trains with the guide ...
    guideless = cost.parameter_count(dataclasses.replace(m, self_guided=False))
    assert run.meta["params"] == guideless < cost.parameter_count(m)  # ... but N is the model it ends with
    dense = next(r for r in study.runs if r.name == "h64-l2_gelu_seed1")
    assert run.meta["fit_params"] < dense.meta["fit_params"] and run.meta["tokens"] < dense.meta["tokens"]
    gpu = load_study(STUDIES / "scaling-structured-gpt3.yaml")
    assert len(gpu.runs) == 4 * 5 and any(r.name == "1.3b_blockshuffle-gelu_seed1" for r in gpu.runs)


def test_bad_study_files(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text(f"study: stability\nbase: {ROOT}/configs/studies/base-cpu.yaml\nrun_root: r\n"
                   "kinds: [gelu, relu]\nseeds: [1]\nlr_multipliers: [1]\n")
    with pytest.raises(ConfigError, match="kind 'relu' is not allowed"):
        load_study(bad)
    bad.write_text(f"study: scaling\nbase: {ROOT}/configs/studies/base-cpu.yaml\nrun_root: r\n"
                   "kinds: [gelu]\nseeds: [1]\nlrs: [1]\n")
    assert cli.main(["study", "scaling", str(bad)]) == 2
    assert "unknown key(s) ['lrs'] for a scaling study" in capsys.readouterr().err
    assert cli.main(["study", "lr-sweep", str(STUDIES / "stability-cpu.yaml")]) == 2
    assert "is a stability study" in capsys.readouterr().err
    assert cli.main(["study", "report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_submit_renders_one_array_job(capsys):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = cli.main(["study", "stability", "configs/studies/stability-cpu.yaml",
                           "--submit", "configs/cluster/local-cpu.yaml", "--set", "nodes=1", "--dry-run"])
    finally:
        os.chdir(cwd)
    script = capsys.readouterr().out
    assert status == 0 and "#SBATCH --array=0-35" in script and "#SBATCH --nodes=1" in script
    assert "AFB_APPEND_RUN_DIR=0" in script  # each task names its own run directory
    assert "train.run_dir=runs/study-stability-cpu/afb-swiglu_lr10x_seed3" in script
    assert "configs/studies/base-cpu.yaml" in script


# ---------------------------------------------------------------------------------------------
# reports from synthetic run directories

def _run_dir(root: Path, name: str, meta: dict, losses: list[float], norms: list[float], vals: dict[int, float],
             warmup: int = 0, entropy: float | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / RUN_META).write_text(json.dumps({"name": name, **meta}))
    steps = len(losses)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": steps, "warmup_steps": warmup},
                                                   "model": {"ffn_kind": meta["kind"]}}))
    lines = [{"event": "start", "step": 0}]
    lines += [{"step": s, "val_loss": v, "val_token_accuracy": 0.1} for s, v in vals.items() if s == 0]
    for s, (loss, norm) in enumerate(zip(losses, norms), 1):
        lines.append({"step": s, "loss": loss, "grad_norm": norm, "lr": 1e-3})
        if s in vals:
            lines.append({"step": s, "val_loss": vals[s], "val_token_accuracy": 0.2})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if entropy is not None:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(d / "tensorboard"))
        for layer in ("layer01", "layer02"):
            w.add_scalar(f"afb/{layer}/gate_entropy", entropy, steps)
            w.add_scalar(f"afb/{layer}/activation_drift", 0.1, steps)
        w.close()
    return d


def _study_root(tmp_path: Path, spec: dict) -> Path:
    root = tmp_path / "study"
    root.mkdir()
    (root / STUDY_COPY).write_text(yaml.safe_dump(spec))
    return root


def test_stability_report_from_run_directories(tmp_path):
    root = _study_root(tmp_path, {"study": "stability"})
    for seed, final in ((1, 3.0), (2, 3.2), (3, 3.4)):
        meta = {"kind": "gelu", "seed": seed, "lr": 1e-3, "lr_multiplier": 1.0}
        _run_dir(root, f"gelu_s{seed}", meta, [5.0, 4.0, 3.5, 3.0], [1.0, 2.0, 3.0, 2.0],
                 {0: 6.0, 2: final + 0.5, 4: final})
        meta = {**meta, "kind": "afb-gelu"}
        _run_dir(root, f"afb_s{seed}", meta, [5.0, 4.0, 3.5, 3.0], [1.0, 1.0, 1.0, 1.0],
                 {0: 6.0, 2: final, 4: final - 0.25}, entropy=0.9)
    # diverged: ends above its step-0 loss
    _run_dir(root, "gelu_s4", {"kind": "gelu", "seed": 4, "lr": 1e-3, "lr_multiplier": 1.0},
             [5.0, 7.0, 8.0, 9.0], [1.0, 5.0, 9.0, 12.0], {0: 6.0, 4: 9.5})
    s = collect.summarize(root / "gelu_s1")
    assert s["state"] == "done" and not s["diverged"] and s["best_val_loss"] == 3.0
    assert s["grad_norm_variance"] == pytest.approx(0.5) and s["max_grad_norm"] == 3.0
    assert s["grad_norm_cv"] == pytest.approx(math.sqrt(0.5) / 2)
    assert collect.summarize(root / "gelu_s4")["diverged"]
    text = write_study_report(root).read_text()
    assert "| gelu | 1x (0.001) | 4 | 1/4 |" in text
    assert "| afb-gelu | 1x (0.001) | 3 | 0/3 | 2.95 [" in text
    # AFB minus base on seeds 1-3 (seed 4 has no AFB partner): -0.25 exactly, every resample.
    assert "| afb-gelu - gelu | 1x | 3 | -0.25 [-0.25, -0.25] |" in text
    assert "0.9 [0.9, 0.9]" in text  # gate entropy
    for png in ("loss.png", "val_loss.png", "grad_norm.png", "gate_entropy.png"):
        assert (root / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_lr_sweep_report_ranks_by_sensitivity(tmp_path):
    root = _study_root(tmp_path, {"study": "lr-sweep"})
    # flat: loss 4 at every LR -> sensitivity 0; peaked: 4, 5, 6 -> (0 + 1 + 2) / 3 = 1
    for kind, curve in (("swiglu", [4.0, 5.0, 6.0]), ("afb-swiglu", [4.0, 4.0, 4.0])):
        for lr, final in zip((1e-3, 1e-2, 1e-1), curve):
            for seed in (1, 2):
                _run_dir(root, f"{kind}_{lr}_{seed}", {"kind": kind, "seed": seed, "lr": lr},
                         [7.0, final], [1.0, 1.0], {0: 8.0, 2: final})
    text = write_study_report(root).read_text()
    assert "| 1 | afb-swiglu | 0 [0, 0] | 4 | 0.001 | 8 | 0/6 |" in text
    assert "| 2 | swiglu | 1 [1, 1] | 4 | 0.001 | 8 | 0/6 |" in text
    assert (root / "report" / "loss_vs_lr.png").is_file()


def test_scaling_report_fits_and_labels_extrapolation(tmp_path):
    root = _study_root(tmp_path, {"study": "scaling", "extrapolate_to": [1.0e8], "tokens_per_parameter": 20})
    law = stats.PowerLaw(E=2.0, A=60.0, alpha=0.3)
    for n in (1e4, 3e4, 1e5, 3e5):
        for seed, eps in ((1, -0.01), (2, 0.01)):
            loss = float(law(n)) + eps
            _run_dir(root, f"{int(n)}_gelu_{seed}", {"kind": "gelu", "seed": seed, "size": f"n{int(n)}",
                                                     "fit_params": n, "params": n, "tokens": 20 * n,
                                                     "flops_per_token": 6 * n}, [7.0, loss], [1.0, 1.0],
                     {0: 8.0, 2: loss})
    text = write_study_report(root).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| gelu | L(N) |"))
    alpha = float(row.split("|")[5].split()[0])
    assert alpha == pytest.approx(0.3, abs=0.02)
    assert "EXTRAPOLATION" in text and "| gelu | 1e+08 |" in text
    assert (root / "report" / "loss_vs_params.png").is_file() and (root / "report" / "loss_vs_flops.png").is_file()


# ---------------------------------------------------------------------------------------------
# a real run: killed part-way, resumed from its checkpoint by re-running, then skipped

def test_run_resumes_a_partial_run_and_skips_a_finished_one(default_corpus, tmp_path):
    study = tmp_path / "s.yaml"
    overrides = corpus_overrides(default_corpus) + [
        "model.num_layers=1", "model.hidden_size=32", "train.steps=60", "train.warmup_steps=1",
        "train.save_interval=2", "train.eval_interval=30", "train.eval_iters=1", "train.log_interval=1",
        "metrics.layer_metrics_interval=30"]
    study.write_text(yaml.safe_dump({"study": "stability", "base": str(STUDIES / "base-cpu.yaml"),
                                     "run_root": str(tmp_path / "runs"), "overrides": overrides,
                                     "kinds": ["afb-gelu"], "lr_multipliers": [1], "seeds": [7]}))
    cmd = [sys.executable, "-m", "afb_scale.cli", "study", "stability", str(study), "--run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "runs" / "afb-gelu_lr1x_seed7"
    # A crash from outside: SIGKILL the whole study (runner and its training process) once the
    # run has a complete checkpoint, long before its last step.
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert collect.run_state(run) == "partial", first.stdout.read()
    resumed_at = int(latest.read_text().strip()[len("step"):])
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming 1/1 afb-gelu_lr1x_seed7" in second.stdout and collect.run_state(run) == "done"
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", resumed_at)]
    assert "1 done" in (tmp_path / "runs" / "report" / "report.md").read_text()
    third = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert third.returncode == 0 and "1 finished, 0 to run" in third.stdout
    assert sum('"event"' in x for x in (run / "metrics.jsonl").read_text().splitlines()) == 2  # not run again
