"""NerVE spectral diagnostics (afb_scale/metrics/spectral.py).

Every metric is held to a direct float64 numpy statement of the issue's formulas, on random
inputs and on structured ones whose values are known in closed form (isotropic, low rank, a
prescribed spectrum); the captured X_pre / X_post of every FFN kind to activations computed
straight from the weights; and TP = 2 and 4 (with and without sequence parallelism), and a
TP x PP engine, to TP = 1 on real gloo ranks.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from multiproc import run_ranks

# ---------------------------------------------------------------------------------------------
# The formulas, written again in numpy (float64) from the issue text


def np_spectrum(x):
    x = np.asarray(x, dtype=np.float64)
    cov = np.cov(x, rowvar=False)  # (X - mean)^T (X - mean) / (N - 1)
    return np.maximum(np.sort(np.linalg.eigvalsh(cov))[::-1], 1e-12)


def np_entropy(l):
    p = l / l.sum()
    return -np.sum(p * np.log(p))


def np_pr(l):
    return l.sum() ** 2 / np.sum(l**2)


def np_eee(l):
    d = len(l)
    c = np.cumsum(l) / l.sum()
    return float(np.clip(np.sum(c - np.arange(1, d + 1) / d) / (d / 2), 0.0, 1.0))


def np_js(lp, lq):
    p, q = lp / lp.sum(), lq / lq.sum()
    m = (p + q) / 2
    return 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))


def np_metrics_from_spectra(lp, lq):
    out = {}
    for side, l in (("pre", lp), ("post", lq)):
        out[f"{side}_entropy"], out[f"{side}_participation_ratio"], out[f"{side}_eee"] = np_entropy(l), np_pr(l), np_eee(l)
    out["js"] = np_js(lp, lq)
    out["pr_gain"] = out["post_participation_ratio"] / out["pre_participation_ratio"]
    out["delta_eee"] = out["post_eee"] - out["pre_eee"]
    return out


def np_metrics(x_pre, x_post):
    return np_metrics_from_spectra(np_spectrum(x_pre), np_spectrum(x_post))


def assert_metrics_close(got, want, rel, abs_=0.0, what=""):
    assert set(got) == set(want), (set(got) ^ set(want), what)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=abs_), f"{what} {k}: {got[k]} vs {want[k]}"


# ---------------------------------------------------------------------------------------------
# Structured inputs

N, D = 256, 64


def _centered_orthonormal(n, d, gen):
    """n x d, orthonormal columns that each sum to zero: its covariance is I / (n - 1)."""
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    a -= a.mean(0)
    return torch.linalg.qr(a)[0]


def _with_spectrum(variances, gen):
    """Tokens whose covariance eigenvalues are exactly `variances` (a random rotation of them)."""
    d = len(variances)
    q = _centered_orthonormal(N, d, gen) * math.sqrt(N - 1)
    rot = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    return (q * torch.as_tensor(variances, dtype=torch.float64).sqrt()) @ rot.T


def test_random_inputs_match_numpy():
    from afb_scale.metrics.spectral import covariance_spectrum, layer_spectral_metrics

    gen = torch.Generator().manual_seed(0)
    # Correlated columns with an offset (the mean must come out) and a nonlinearity between.
    x_pre = torch.randn(N, D, generator=gen) @ torch.randn(D, D, generator=gen) * 0.3 + 2.0
    x_post = torch.nn.functional.gelu(x_pre)
    eig = covariance_spectrum(x_pre)
    assert eig.dtype == torch.float64 and bool((eig[:-1] >= eig[1:]).all())  # sorted descending
    np.testing.assert_allclose(eig.numpy(), np_spectrum(x_pre.numpy()), rtol=1e-4, atol=1e-6 * float(eig[0]))
    got = layer_spectral_metrics(x_pre, x_post)
    want = np_metrics(x_pre.numpy(), x_post.numpy())
    # fp32 covariance against float64 numpy: rounding of order 1e-6 relative.
    assert_metrics_close(got, want, rel=1e-4)
    assert 0 < got["js"] < math.log(2) and got["pr_gain"] != pytest.approx(1.0, abs=1e-3)  # gelu moved it


def test_isotropic_input_known_values():
    from afb_scale.metrics.spectral import layer_spectral_metrics

    gen = torch.Generator().manual_seed(1)
    iso = (_centered_orthonormal(N, D, gen) * 5.0 + 1.0).float()
    got = layer_spectral_metrics(iso, iso)
    assert got["pre_entropy"] == pytest.approx(math.log(D), rel=1e-6)
    assert got["pre_participation_ratio"] == pytest.approx(D, rel=1e-5)
    assert got["pre_eee"] == pytest.approx(0.0, abs=1e-5)
    assert got["js"] == pytest.approx(0.0, abs=1e-12) and got["pr_gain"] == 1.0 and got["delta_eee"] == 0.0


@pytest.mark.parametrize("k", [1, 5, 16])
def test_low_rank_input_known_values(k):
    """k equal eigenvalues, D - k zero: SE = ln k, PR = k, EEE = 1 - k/D (C_j = min(j/k, 1))."""
    from afb_scale.metrics.spectral import covariance_spectrum, layer_spectral_metrics

    gen = torch.Generator().manual_seed(k)
    x = _with_spectrum([4.0] * k + [0.0] * (D - k), gen).float()
    eig = covariance_spectrum(x)
    assert eig[:k].numpy() == pytest.approx(4.0, rel=1e-5)
    got = layer_spectral_metrics(x, x)
    # The D - k zero eigenvalues come out of fp32 as ~1e-8 noise (or the 1e-12 floor): each adds
    # -p ln p ~ 1e-7 to the entropy, hence the absolute tolerance there.
    assert got["pre_entropy"] == pytest.approx(math.log(k), abs=1e-4)
    assert got["pre_participation_ratio"] == pytest.approx(k, rel=1e-5)
    assert got["pre_eee"] == pytest.approx(1 - k / D, abs=1e-6)
    want = np_metrics(x.numpy(), x.numpy())
    assert_metrics_close(got, want, rel=1e-5, abs_=1e-4)


def test_prescribed_spectrum_known_values():
    """A power-law spectrum: the metrics of the exact eigenvalues, no eigensolver on the numpy side."""
    from afb_scale.metrics.spectral import layer_spectral_metrics

    gen = torch.Generator().manual_seed(7)
    v_pre = 1.0 / np.arange(1, D + 1) ** 1.0
    v_post = 1.0 / np.arange(1, D + 1) ** 0.5
    got = layer_spectral_metrics(_with_spectrum(v_pre, gen).float(), _with_spectrum(v_post, gen).float())
    assert_metrics_close(got, np_metrics_from_spectra(v_pre, v_post), rel=1e-4)


def test_js_isotropic_against_rank_one_closed_form():
    from afb_scale.metrics.spectral import layer_spectral_metrics

    gen = torch.Generator().manual_seed(3)
    iso = _with_spectrum([1.0] * D, gen).float()
    rank1 = _with_spectrum([1.0] + [0.0] * (D - 1), gen).float()
    got = layer_spectral_metrics(iso, rank1)
    m1 = (1 / D + 1) / 2  # m = (p + q) / 2: (1/D + 1)/2 first, 1/(2D) elsewhere
    js = 0.5 * ((1 / D) * math.log((1 / D) / m1) + (D - 1) / D * math.log(2)) + 0.5 * math.log(1 / m1)
    assert got["js"] == pytest.approx(js, rel=1e-5)
    assert got["pr_gain"] == pytest.approx(1 / D, rel=1e-4)
    assert got["delta_eee"] == pytest.approx((D - 1) / D, abs=1e-5)
    assert got["post_entropy"] == pytest.approx(0.0, abs=1e-4)


def test_guards():
    from afb_scale.metrics.spectral import covariance_spectrum, js_divergence, layer_spectral_metrics

    # A non-finite activation gives NaN metrics (the logger drops them), not an exception mid-run.
    bad = torch.randn(N, 8)
    bad[3, 2] = float("inf")
    assert all(math.isnan(v) for v in layer_spectral_metrics(bad, bad).values())

    with pytest.raises(ValueError, match="at least 2 tokens"):
        covariance_spectrum(torch.ones(1, 4))
    with pytest.raises(ValueError, match="different widths"):
        js_divergence(torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Capture from megatron MLPs of every kind, and tensor parallelism

HIDDEN, FFN, RANK, SEQ, BATCH = 16, 64, 8, 32, 8  # N = 256 tokens > D = 64: a full-rank covariance
KINDS = ["gelu", "swiglu", "afb-gelu", "afb-swiglu"]


def _reference(kind, seed=0):
    """Full weights (non-zero feedback), input, and X_pre / X_post computed straight from them."""
    from afb_scale.model.afb import ReferenceAFBFFN

    base, afb = kind.removeprefix("afb-"), kind.startswith("afb-")
    torch.manual_seed(seed)
    ref = ReferenceAFBFFN(HIDDEN, FFN, base=base, feedback="afb" if afb else "none", feedback_rank=RANK,
                          bias=base == "gelu", init_std=0.3)
    with torch.no_grad():
        if afb:
            ref.Ub.normal_(0, 0.3)
            ref.Ug.normal_(0, 0.3)
            ref.c.normal_(0, 0.3)
        if ref.b1 is not None:
            ref.b1.normal_(0, 0.5)
    state = {n: p.detach().clone() for n, p in ref.named_parameters()}
    x = torch.randn(SEQ, BATCH, HIDDEN)
    w = {n: t.double() for n, t in state.items()}
    xd = x.double().reshape(-1, HIDDEN)
    F = torch.nn.functional
    h = xd @ w["W1"].T + (w["b1"] if "b1" in w else 0)
    pre = h
    if afb:
        z = F.gelu(h @ w["V"].T + w["c"])
        h = h + z @ w["Ub"].T
        gate = 2 * torch.sigmoid(z @ w["Ug"].T)
    else:
        gate = 1.0
    act = F.silu(h) * (xd @ w["W3"].T) if base == "swiglu" else F.gelu(h)
    return state, x, pre.numpy(), (gate * act).numpy()


def _tp_spectra(rank, world, cases, sequence_parallels):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.metrics.spectral import collect_spectra, reduce_spectra
    from afb_scale.model.gpt import transformer_config
    from afb_scale.model.parallel_afb import megatron_state_from_reference
    from afb_scale.model.specs import transformer_layer_spec
    from afb_scale.model.tp_layout import load_full_state
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig(tensor=world))
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for kind, (state, x) in cases.items():
        for sp in sequence_parallels:
            cfg = ModelConfig(hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, ffn_kind=kind,
                              feedback_rank=RANK)
            tc = transformer_config(cfg, ParallelConfig(tensor=world, sequence_parallel=sp))
            mlp = build_module(transformer_layer_spec(kind, RANK).submodules.mlp, config=tc)
            load_full_state(mlp, megatron_state_from_reference(state, kind.endswith("swiglu")), rank, world)
            chunk = SEQ // world
            x_local = x[rank * chunk:(rank + 1) * chunk] if sp else x
            with torch.no_grad():
                out_off, _ = mlp(x_local)
                with collect_spectra(mlp) as captured:
                    out_on, _ = mlp(x_local)
            assert torch.equal(out_on, out_off)  # measuring does not change the computation
            hooks = [mlp.linear_fc1._forward_hooks, mlp.linear_fc2._forward_pre_hooks]
            assert not any(hooks)  # off again after the block: ordinary steps run no hook
            mine = reduce_spectra(captured, group)
            parts = [None] * world
            dist.all_gather_object(parts, mine, group=group)
            assert sum(len(p) for p in parts) == 1  # one owner computed the one layer
            out[(kind, sp)] = {k: v for p in parts for k, v in p.items()}["mlp"]
    return out


@pytest.fixture(scope="module")
def cases():
    return {kind: _reference(kind, seed=i) for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def tp1(cases):
    [res] = run_ranks(_tp_spectra, 1, {k: c[:2] for k, c in cases.items()}, [False])
    return res


def test_capture_matches_activations_from_the_weights(cases, tp1):
    """X_pre = W1 x + b1 (SwiGLU: the silu branch), X_post = the down-projection's input."""
    for kind, (_, _, pre, post) in cases.items():
        assert_metrics_close(tp1[(kind, False)], np_metrics(pre, post), rel=1e-4, what=kind)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_tp1(cases, tp1, world):
    for rank_results in run_ranks(_tp_spectra, world, {k: c[:2] for k, c in cases.items()}, [False, True]):
        for (kind, sp), metrics in rank_results.items():
            assert_metrics_close(metrics, tp1[(kind, False)], rel=1e-5, what=f"TP={world} {kind} sp={sp}")


# ---------------------------------------------------------------------------------------------
# Whole models through the engine: pipeline stages compute their own layers


def _engine_spectra(rank, world, overrides):
    from megatron.core import parallel_state

    from afb_scale.config import validate
    from afb_scale.training.engine import Engine
    from afb_scale.metrics.spectral import probe_spectral_metrics
    from afb_scale.parallel.groups import init_distributed
    from engine_cases import rank_micro_batches, text_batches, tiny_config

    cfg = tiny_config(**overrides)
    validate(cfg, world)
    layout = init_distributed(cfg.parallel)
    engine = Engine(cfg, layout)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    [batch] = text_batches(1, cfg.train.global_batch_size)
    engine.train_batch(rank_micro_batches(batch, cfg.train.micro_batch_size, dp_rank, dp))  # off init
    probe = rank_micro_batches(batch, cfg.train.micro_batch_size, dp_rank, dp)[:1]
    from afb_scale.metrics.layer_metrics import afb_layers
    from afb_scale.metrics.spectral import ffn_layers

    names = sorted(ffn_layers(engine.module))
    assert names == sorted(afb_layers(engine.module))  # the AFB layer metrics use the same names
    return names, probe_spectral_metrics(engine, probe)


ENGINE = {"model.num_layers": 4, "train.micro_batch_size": 8, "train.global_batch_size": 8}  # 256 tokens > D = 128


def test_engine_tp2_pp2_equals_single_process():
    [(names, ref)] = run_ranks(_engine_spectra, 1, ENGINE)
    assert names == [f"layer{i:02d}" for i in range(1, 5)]
    assert ref.pop("spectral/seconds") > 0  # the call's own cost, logged beside the metrics
    assert {t.split("/")[1] for t in ref} == set(names) and len(ref) == 4 * 9
    assert all(t.startswith("spectral/") for t in ref)
    results = run_ranks(_engine_spectra, 4, {**ENGINE, "parallel.tensor": 2, "parallel.pipeline": 2})
    # Ranks 0-1 are stage 0, 2-3 stage 1: each stage names its own layers by their global number.
    assert [names for names, _ in results] == [["layer01", "layer02"]] * 2 + [["layer03", "layer04"]] * 2
    for _, tags in results:
        assert tags.pop("spectral/seconds") > 0
        assert set(tags) == set(ref)  # every rank has every stage's layers
        for tag, value in ref.items():
            # After a training step the TP x PP weights differ from the single process's by fp32
            # rounding (test_engine_equivalence holds them to 1e-5): the spectra's own values agree
            # to < 1e-6 relative, but JS and dEEE are differences of two spectra, ~2e-3 here, so
            # their 1e-7-sized absolute error is 1e-5 relative. Their test is absolute.
            difference = tag.endswith(("/js", "/delta_eee"))
            assert tags[tag] == pytest.approx(value, rel=0 if difference else 1e-5, abs=1e-6 if difference else 0), tag


# ---------------------------------------------------------------------------------------------
# Config, schedule, report, and the training loop


def test_config_and_schedule():
    from afb_scale.config import ConfigError, load_config, validate
    from afb_scale.metrics.spectral import spectral_due

    assert load_config(None, []).metrics.spectral_interval is None  # default: with validation
    assert load_config(None, ["metrics.spectral_interval=25"]).metrics.spectral_interval == 25
    cfg = load_config(None, ["metrics.spectral_interval=-1"])
    with pytest.raises(ConfigError, match="metrics.spectral_interval=-1 must be >= 0"):
        validate(cfg, 1, cuda_available=False)
    assert [s for s in range(0, 101) if spectral_due(s, None, 50)] == [0, 50, 100]
    assert [s for s in range(0, 101) if spectral_due(s, 40, 50)] == [0, 40, 80]
    assert not any(spectral_due(s, 0, 50) for s in range(0, 101))


def test_report_plots_spectral_metrics_per_layer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from afb_scale.studies.report import SPECTRAL_METRICS, summarize, write_report

    runs = []
    for name, gain in (("gelu", 1.5), ("afb-gelu", 2.5)):
        w = SummaryWriter(str(tmp_path / name / "tensorboard"))
        for step in (0, 50, 100):
            w.add_scalar("train/loss", 5.0 - step / 100, step)
            for layer, scale in (("layer01", 1.0), ("layer02", 3.0)):
                for metric in (m for m in SPECTRAL_METRICS if m != "pr_gain"):
                    w.add_scalar(f"spectral/{layer}/{metric}", 0.1 * scale * (1 + step / 100), step)
                w.add_scalar(f"spectral/{layer}/pr_gain", gain * scale, step)
        w.close()
        runs.append(tmp_path / name)
    s = summarize(runs[1])
    assert s["PR gain"] == pytest.approx(2.5 * (1 + 3) / 2)  # last value, mean over layers
    assert s["spectral JS"] == pytest.approx(0.1 * 2 * (1 + 3) / 2)
    report = write_report(runs, tmp_path / "report")
    text = report.read_text()
    for metric in SPECTRAL_METRICS:
        png = tmp_path / "report" / f"spectral_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"(spectral_{metric}.png)" in text
    assert "PR gain" in text and "| afb-gelu |" in text


def test_report_without_spectral_runs_has_no_spectral_plots(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from afb_scale.studies.report import write_report

    w = SummaryWriter(str(tmp_path / "r" / "tensorboard"))
    w.add_scalar("train/loss", 1.0, 1)
    w.close()
    report = write_report([tmp_path / "r"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("spectral_*.png")) and "spectral_" not in report.read_text()


def test_training_writes_spectral_scalars(default_corpus, tmp_path):
    """The quickstart (TP = 2, 2 processes), shortened, with the metric on a 5-step stride."""
    from conftest import ROOT, corpus_overrides
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "afb_scale.cli", "train", "--config", "configs/quickstart.yaml",
           *corpus_overrides(default_corpus), f"train.run_dir={run_dir}", "train.steps=10",
           "train.warmup_steps=2", "train.eval_interval=10", "train.save_interval=10", "train.eval_iters=1",
           "metrics.spectral_interval=5", "model.seq_length=64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for layer in ("layer01", "layer02"):
        for metric in ("pre_entropy", "post_entropy", "pre_participation_ratio", "post_participation_ratio",
                       "pre_eee", "post_eee", "js", "pr_gain", "delta_eee"):
            tag = f"spectral/{layer}/{metric}"
            assert tag in tags, f"{tag} missing from {sorted(tags)}"
            assert [e.step for e in events.Scalars(tag)] == [0, 5, 10]
    assert [e.step for e in events.Scalars("spectral/seconds")] == [0, 5, 10]
    # At step 0 AFB is the base FFN: the post spectrum is gelu's reshaping of the pre spectrum.
    js = [e.value for e in events.Scalars("spectral/layer01/js")]
    assert all(0.0 < v < math.log(2) for v in js), js
