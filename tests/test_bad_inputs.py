"""The bad-input catalogue: every command, given something wrong, ends in one line.

Each case runs a real command in a fresh process (`python -m afb_scale.cli ...`,
`python -m data_prep.tokenize ...`) and asserts: a non-zero exit status; the last line of stderr
starts with `error:` and names the bad value; no Python traceback anywhere in the output; and
nothing half-written (the run or output directory holds no new file).

Cases are grouped: configs (types, ranges, layouts, includes), data (missing, truncated,
mismatched, too small), checkpoints (damaged, shape change, a file where a directory belongs),
cluster configs and sweep files, and the export / report / plan arguments.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import ROOT, corpus_overrides

QUICKSTART = "configs/quickstart.yaml"
ONE = ["parallel.tensor=1"]  # one process, no launcher needed
TINY = ["train.steps=2", "train.warmup_steps=1", "train.eval_interval=2", "train.eval_iters=1",
        "train.save_interval=1", "metrics.layer_metrics_interval=0", "model.hidden_size=64"]


@dataclass
class Case:
    argv: Callable[[Path, Path], list[str]]  # (corpus, workdir) -> command after `python -m`
    message: str  # must appear in the last stderr line
    setup: Optional[Callable[[Path, Path], None]] = None  # prepares workdir (bad files, a run)
    env: dict = field(default_factory=dict)


def train(*overrides, config=QUICKSTART, corpus=True):
    def argv(corpus_dir, work):
        data = corpus_overrides(corpus_dir) if corpus else []
        return ["afb_scale.cli", "train", "--config", str(config).format(work=work), *ONE, *TINY, *data,
                f"train.run_dir={work / 'run'}", *[o.format(work=work, corpus=corpus_dir) for o in overrides]]
    return argv


def write(relpath: str, text: str):
    def setup(corpus, work):
        (work / relpath).parent.mkdir(parents=True, exist_ok=True)
        (work / relpath).write_text(text)
    return setup


def copy_corpus(damage: Callable[[Path], None]):
    """A copy of the prepared corpus under work/data, damaged."""
    def setup(corpus, work):
        shutil.copytree(corpus, work / "data", ignore=shutil.ignore_patterns("cache"))
        damage(work / "data")
    return setup


def truncate(name: str):
    def damage(d: Path):
        p = d / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return damage


DATA = ["data.tokenizer={work}/data/tokenizer.model",
        "data.datasets=[{{prefix: {work}/data/stdlib_text_document, weight: 1.0}}]"]


_RUNS: dict[Path, Path] = {}


def trained_run():
    """A copy of a real two-step run (one process) in work/run, with a checkpoint per step; the
    run is trained once per session."""
    def setup(corpus, work):
        if corpus not in _RUNS:
            home = Path(tempfile.mkdtemp(prefix="afb_bad_inputs_"))
            atexit.register(shutil.rmtree, home, True)
            cmd = [sys.executable, "-m", *train()(corpus, home)]
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=_env(), timeout=300)
            _RUNS[corpus] = home / "run"
        shutil.copytree(_RUNS[corpus], work / "run")
    return setup


def damage_checkpoints(fn: Callable[[Path], None]):
    def setup(corpus, work):
        trained_run()(corpus, work)
        for tag in sorted((work / "run" / "checkpoints").glob("step*")):
            fn(tag)
    return setup


def _small_corpus(corpus, work):
    """Three short documents through the real data_prep commands."""
    (work / "docs").mkdir()
    for i in range(3):
        (work / "docs" / f"d{i}.txt").write_text(f"document {i} " * 50)
    subprocess.run([sys.executable, "-m", "data_prep.tokenize", "-i", str(work / "docs"), "--tokenizer",
                    str(corpus / "tokenizer.model"), "--out", str(work / "small")],
                   check=True, capture_output=True, cwd=ROOT)


CASES = {
    # ---- configs: types, ranges, layouts, includes
    "unknown key": Case(train("model.hidden_sise=64"), "unknown config key 'model.hidden_sise'"),
    "not a number": Case(train("train.lr=fast"), "train.lr='fast' must be a number"),
    "not a bool": Case(train("train.activation_checkpointing=maybe"), "train.activation_checkpointing='maybe' must be true or false"),
    "unknown precision": Case(train("train.precision=fp8"), "train.precision='fp8' is not allowed; choose one of fp32, bf16, fp16"),
    "unknown ffn kind": Case(train("model.ffn_kind=relu"), "model.ffn_kind='relu' is not allowed"),
    "heads do not divide hidden": Case(train("model.num_attention_heads=5"), "model.hidden_size=64 must be divisible by model.num_attention_heads=5"),
    "zero feedback rank": Case(train("model.feedback_rank=0"), "model.feedback_rank=0 must be >= 1"),
    "batch not a multiple": Case(train("train.global_batch_size=12", "train.micro_batch_size=8"),
                                 "train.global_batch_size=12 must be a multiple of train.micro_batch_size x data-parallel size = 8 x 1"),
    "bf16 at ZeRO 0": Case(train("train.precision=bf16"), "train.precision=bf16 with parallel.zero_stage=0"),
    "fp16 without a GPU": Case(train("train.precision=fp16", "parallel.zero_stage=1"), "train.precision=fp16 needs a GPU"),
    "pipeline with ZeRO 2": Case(lambda c, w: ["afb_scale.cli", "plan", "--config", QUICKSTART, "parallel.pipeline=2",
                                               "parallel.zero_stage=2", "--world-size", "4"],
                                 "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"),
    "world size not a multiple": Case(lambda c, w: ["afb_scale.cli", "plan", "--config", QUICKSTART, "--world-size", "3"],
                                      "world size 3 is not a multiple of parallel.tensor x parallel.pipeline = 2 x 1"),
    "layout needs ranks": Case(lambda c, w: ["afb_scale.cli", "train", "--config", QUICKSTART, *TINY,
                                             f"train.run_dir={w / 'run'}"],
                               "needs at least 2 processes; launch it with torchrun --nproc_per_node 2"),
    "warmup past the end": Case(train("train.warmup_steps=5"), "train.warmup_steps=5 must be between 0 and train.steps=2"),
    "zero start-up timeout": Case(train("train.startup_timeout_s=0"), "train.startup_timeout_s=0.0 must be > 0 seconds"),
    "absurd sequence length": Case(train("model.seq_length=100000000"), "model.seq_length=100000000"),
    "run dir is a file": Case(train("train.run_dir={work}/afile"), "train.run_dir=", setup=write("afile", "x")),
    "override without =": Case(train("model.hidden_size"), "override 'model.hidden_size' must look like section.key=value"),
    "missing config file": Case(train(config="{work}/nope.yaml"), "nope.yaml' does not exist"),
    "config not YAML": Case(train(config="{work}/bad.yaml"), "is not valid YAML", setup=write("bad.yaml", "model: [1, 2\n")),
    "config is a list": Case(train(config="{work}/list.yaml"), "must hold a mapping, not list", setup=write("list.yaml", "- 1\n")),
    "include cycle": Case(train(config="{work}/a.yaml"), "include cycle through",
                          setup=lambda c, w: (write("a.yaml", "include: [b.yaml]\n")(c, w),
                                              write("b.yaml", "include: [a.yaml]\n")(c, w))),
    "include not a list": Case(train(config="{work}/inc.yaml"), "include='size/tiny.yaml' in",
                               setup=write("inc.yaml", "include: size/tiny.yaml\n")),
    # ---- data
    "tokenizer missing": Case(train("data.tokenizer={work}/none.model"), "none.model"),
    "vocabulary mismatch": Case(train("model.vocab_size=1000"), "pieces but model.vocab_size=1000"),
    "dataset missing": Case(train("data.datasets=[{{prefix: {work}/nothing, weight: 1.0}}]"),
                            "nothing.idx' does not exist"),
    "truncated .bin": Case(train(*DATA, corpus=False), "the .bin/.idx pair is truncated",
                           setup=copy_corpus(truncate("stdlib_text_document.bin"))),
    "truncated .idx": Case(train(*DATA, corpus=False), "is truncated or corrupt",
                           setup=copy_corpus(truncate("stdlib_text_document.idx"))),
    "bad split string": Case(train("data.split=90,x"), "data.split='90,x' must be 1 to 3 comma-separated"),
    "corpus too small for the split": Case(train("data.datasets=[{{prefix: {work}/small, weight: 1.0}}]"),
                                           "documents", setup=_small_corpus),
    "tokenize an empty directory": Case(lambda c, w: ["data_prep.tokenize", "-i", str(w / "empty"), "--tokenizer",
                                                      str(c / "tokenizer.model"), "--out", str(w / "out")],
                                        "empty", setup=lambda c, w: (w / "empty").mkdir()),
    "undecodable input": Case(lambda c, w: ["data_prep.tokenize", "-i", str(w / "bin.txt"), "--tokenizer",
                                            str(c / "tokenizer.model"), "--out", str(w / "out")],
                              "bin.txt", setup=lambda c, w: (w / "bin.txt").write_bytes(b"ok\n\xff\xfe\xfa bad\n")),
    # ---- checkpoints
    "every checkpoint damaged": Case(train(), "no loadable checkpoint",
                                     setup=damage_checkpoints(lambda t: truncate("mp_rank_00_model_states.pt")(t))),
    "checkpoints is a file": Case(train(), "checkpoints",
                                  setup=lambda c, w: write("run/checkpoints", "not a directory")(c, w)),
    "model shape changed on resume": Case(train("model.hidden_size=128"), "model.hidden_size", setup=trained_run()),
    # ---- cluster configs and sweep files
    "submit: bad time": Case(lambda c, w: ["afb_scale.cli", "submit", "configs/cluster/local-cpu.yaml", "time=25:99:99",
                                           "--dry-run"], "time='25:99:99'"),
    "submit: unknown key": Case(lambda c, w: ["afb_scale.cli", "submit", "configs/cluster/local-cpu.yaml", "nodez=2",
                                              "--dry-run"], "nodez"),
    "sweep: empty axis": Case(lambda c, w: ["afb_scale.cli", "sweep", "--sweep", str(w / "s.yaml")],
                              "sweep axis 'train.lr' must be a non-empty list",
                              setup=write("s.yaml", f"base: {ROOT / QUICKSTART}\nrun_root: {{}}\naxes: {{train.lr: []}}\n")),
    "sweep: missing file": Case(lambda c, w: ["afb_scale.cli", "sweep", "--sweep", str(w / "none.yaml")],
                                "sweep file"),
    # ---- export, report, plan arguments
    "export: no run there": Case(lambda c, w: ["afb_scale.cli", "export", str(w / "norun"), str(w / "out")], "norun"),
    "export: output exists": Case(lambda c, w: ["afb_scale.cli", "export", str(w / "run"), str(w / "out")], "out",
                                  setup=lambda c, w: (trained_run()(c, w), (w / "out").mkdir())),
    "report: no runs": Case(lambda c, w: ["afb_scale.cli", "report", str(w / "norun"), "--out", str(w / "rep")], "norun"),
    "plan: world size 0": Case(lambda c, w: ["afb_scale.cli", "plan", "--config", QUICKSTART, "--world-size", "0"],
                               "world size 0"),
}


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_catalogue_size():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_line(name, default_corpus, tmp_path):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    if case.setup:
        case.setup(default_corpus, work)
    before = _tree(work)
    proc = subprocess.run([sys.executable, "-m", *case.argv(default_corpus, work)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(**case.env), timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines, output[-2000:]
    assert lines[-1].startswith("error: ") and case.message in lines[-1], lines[-1]
    assert _tree(work) == before, sorted(_tree(work) - before)
