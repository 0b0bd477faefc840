"""`afb-scale`: the command line.

    afb-scale train --config configs/quickstart.yaml [section.key=value ...]   (under torchrun)
    afb-scale plan  --config CONFIG [--nodes N --gpus-per-node G --gpu-memory-gib M] [--search]
                                                                 parameters, FLOPs, memory, time (no GPU)
    afb-scale prepare-data [--out data/default ...]               the built-in corpus (data_prep)
    afb-scale submit configs/cluster/example.yaml [--dry-run]   Slurm batch script (launch/)
    afb-scale export RUN_DIR|CHECKPOINT OUT_DIR [--eval] [--format afb|hf]   one-process model / HF transformers
    afb-scale generate SOURCE --prompt TEXT [--temperature T --top-k K --top-p P --max-tokens N --seed S]
    afb-scale eval SOURCE --text FILES | --data PREFIX            loss, perplexity, bits/byte, accuracy
    afb-scale lm-eval --model afb_scale --model_args path=SOURCE ...   lm-evaluation-harness
    afb-scale sweep --sweep configs/studies/X.yaml [--run | --submit CLUSTER_YAML]
    afb-scale report RUN_DIR... --out DIR                         table + PNG plots
    afb-scale study stability|lr-sweep|scaling STUDY_YAML [--run | --submit CLUSTER_YAML [--dry-run]]
    afb-scale study report RUN_ROOT [--out DIR]                   the study's report from its run directories

Bad input ends with one line on stderr, `error: ...`, and exit status 2, before any process
group starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

# Known, understood noise from megatron-core 0.16.1, silenced so real warnings stand out:
# Apex / Transformer Engine absent (expected on CPU; the unfused torch paths are what we test),
# a deprecation inside its own config defaults, and a GPU-only tuning hint.
for _message in (".*(Apex|Transformer Engine|TransformerEngine).*", "full scope is deprecated.*",
                 ".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
    warnings.filterwarnings("ignore", message=_message)
# TransformerLayer logs "Unknown MLP type" for any MLP that is not megatron's own: ours is
# AFBMLP on purpose (model/specs.py).
logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)

from afb_scale.config import ConfigError, load_config, validate
from data_prep.errors import ArgumentParser

EXIT_BAD_INPUT = 2


def _load_validated(args, world_size: int):
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size)
    return cfg


def _launched() -> bool:
    """True under torchrun, srun_task.sh or any launcher that sets torch.distributed's variables."""
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


def _as_single_process(cfg) -> None:
    """A plain `afb-scale train` (no launcher) is a world of one, as a plain script would be:
    give torch.distributed the environment torchrun would. A layout that needs more ranks says
    how to launch it instead."""
    ranks = cfg.parallel.tensor * cfg.parallel.pipeline
    if ranks > 1:
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {cfg.parallel.tensor} x {cfg.parallel.pipeline} needs at least "
            f"{ranks} processes; launch it with torchrun --nproc_per_node {ranks} -m afb_scale.cli train ... "
            "(or launch/torchrun.sh), or set parallel.tensor=1 parallel.pipeline=1 for one process")
    import socket

    with socket.socket() as s:  # a free port for the one-process rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")


def cmd_train(args, callbacks=()) -> int:
    if not _launched():
        _as_single_process(load_config(args.config, args.overrides))
    world_size = int(os.environ["WORLD_SIZE"])
    cfg = _load_validated(args, world_size)
    from afb_scale.data.datasets import check_prepared_data

    check_prepared_data(cfg)  # tokenizer/model vocabulary and .bin/.idx pairs, before any group
    from afb_scale.training import checkpoint, trainer

    checkpoint.check_resume_model(cfg, cfg.train.run_dir)  # a resume with another model, before any group

    return trainer.run(cfg, world_size, callbacks)


def cmd_prepare_data(args) -> int:
    from data_prep import default_corpus
    from data_prep.errors import run_command

    return run_command(default_corpus.main, args.args)


def cmd_sweep(args) -> int:
    import shlex

    from afb_scale.studies import sweep

    runs = sweep.expand(args.sweep)
    if args.submit:
        return sweep.submit_array(runs, args.submit, args.dry_run)
    sweep.validate_all(runs, args.nproc)
    for i, run in enumerate(runs):
        print(f"{i:3d} {run.name}: {shlex.join(run.train_args()[2:])}")
    if not args.run:
        return 0
    status = sweep.run_locally(runs, args.nproc)
    if status == 0:
        from afb_scale.studies.report import write_report

        report = write_report([r.run_dir for r in runs], os.path.join(os.path.dirname(runs[0].run_dir), "report"))
        print(f"report: {report}")
    return status


def cmd_report(args) -> int:
    from afb_scale.studies.report import write_report

    try:
        path = write_report(args.run_dirs, args.out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print(path.read_text())
    print(f"written: {path} (+ PNG plots beside it)")
    return 0


def cmd_study(args) -> int:
    from afb_scale.studies.cli import run_study_command

    return run_study_command(args)


def cmd_export(args) -> int:
    from afb_scale.export import cmd_export as run_export

    return run_export(args)


def _plan_hardware(args, cfg, world_size: int):
    """The cluster `plan` sizes for: --world-size alone keeps its old meaning (nodes of up to 8
    devices); --nodes x --gpus-per-node otherwise (default one node of 8)."""
    from afb_scale.metrics.throughput import PEAK_TFLOPS, table_peak
    from afb_scale.planner import Hardware

    gpus = args.gpus_per_node or (min(world_size, 8) if args.world_size is not None else 8)
    nodes = args.nodes or -(-world_size // gpus)
    if args.gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory-gib={args.gpu_memory_gib:g} must be > 0")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu={args.mfu:g} must be in (0, 1] (a fraction: 0.3 is 30%)")
    precision = cfg.train.precision
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops={args.peak_tflops:g} must be > 0")
        peak, label = args.peak_tflops * 1e12, "--peak-tflops"
    elif cfg.metrics.peak_tflops is not None:
        peak, label = cfg.metrics.peak_tflops * 1e12, "metrics.peak_tflops"
    else:
        peak = table_peak(args.gpu, precision)
        if peak is None:
            raise ConfigError(f"--gpu={args.gpu} has no dense {precision} peak in the table (it has "
                              f"{', '.join(PEAK_TFLOPS[args.gpu])}); give --peak-tflops")
        label = f"{args.gpu} dense {precision}"
    return Hardware(nodes=nodes, gpus_per_node=gpus, memory_gib=args.gpu_memory_gib, peak_flops=peak,
                    peak_label=label, mfu=args.mfu)


def cmd_plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    for flag in ("nodes", "gpus_per_node", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={value} must be >= 1")
    if args.world_size is not None:
        world_size = args.world_size
        if args.nodes and args.gpus_per_node and args.nodes * args.gpus_per_node != world_size:
            raise ConfigError(f"--world-size={world_size} is not --nodes x --gpus-per-node = "
                              f"{args.nodes} x {args.gpus_per_node}; give one or the other")
    else:
        world_size = (args.nodes or 1) * (args.gpus_per_node or 8)
    # Planning never needs the hardware it plans for: GPU-only settings (fp16) are checked as
    # if a GPU were here.
    validate(cfg, world_size, cuda_available=True)
    hw = _plan_hardware(args, cfg, world_size)
    from afb_scale import planner
    from afb_scale.parallel.layout import ParallelLayout
    from afb_scale.training.engine import deepspeed_config

    m = cfg.model
    print(f"layout: world {world_size} = TP {cfg.parallel.tensor} x PP {cfg.parallel.pipeline} "
          f"x DP {ParallelLayout.of(cfg.parallel, world_size).data}, ZeRO stage {cfg.parallel.zero_stage}"
          f"{', sequence parallel' if cfg.parallel.sequence_parallel else ''}; "
          f"{hw.nodes} node(s) x {hw.gpus_per_node} device(s) of {hw.memory_gib:g} GiB")
    print(f"model: {m.ffn_kind}, {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads}, "
          f"ffn hidden {m.resolved_ffn_hidden_size}, feedback rank {m.feedback_rank}, "
          f"vocab {m.vocab_size} (padded {m.padded_vocab_size}), seq {m.seq_length}")
    print(planner.render_plan(cfg, world_size, hw, planner.exact_parameter_count(m)))
    if args.search:
        print(planner.render_search(planner.search(cfg, hw, world_size), hw, args.top))
    print("deepspeed config:")
    print(json.dumps(deepspeed_config(cfg, ParallelLayout.of(cfg.parallel, world_size)), indent=2))
    return 0


def cmd_selftest(args) -> int:
    from afb_scale.selftest import cmd_selftest as run_selftest

    return run_selftest(args)


def _with_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (may `include:` others)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="afb-scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (launch one process per rank with torchrun)")
    _with_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("prepare-data", help="prepare the built-in corpus (data_prep.default_corpus; --help for options)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_prepare_data)
    sub.add_parser("submit", help="render a Slurm batch script from configs/cluster/*.yaml and sbatch it (submit --help)")
    p = sub.add_parser("export", help="export a checkpoint for one-process evaluation (safetensors + config + tokenizer)")
    p.add_argument("source", help="run directory (newest complete checkpoint) or one checkpoint directory")
    p.add_argument("out_dir", help="export directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--eval", action="store_true", help="load the export here and print its validation loss")
    p.add_argument("--format", choices=("afb", "hf"), default="afb", help="afb (default): safetensors under "
                   "megatron's names; hf: a Hugging Face transformers directory (trust_remote_code)")
    p.set_defaults(func=cmd_export)
    # ---- evaluation (afb_scale/evaluation/)
    from afb_scale.evaluation import evaluate, generate

    p = sub.add_parser("generate", help="continue a prompt (greedy or sampled, KV cache), streamed to stdout")
    generate.add_arguments(p)
    p.set_defaults(func=generate.cmd_generate)
    p = sub.add_parser("eval", help="loss, perplexity, bits per byte and token accuracy on held-out text")
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.cmd_eval)
    sub.add_parser("lm-eval", help="lm-evaluation-harness with --model afb_scale (lm_eval's own arguments)")
    p = sub.add_parser("sweep", help="expand a sweep file; --run runs it here, --submit as a Slurm array job")
    p.add_argument("--sweep", required=True)
    p.add_argument("--run", action="store_true", help="run every variant with torchrun here, then report")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (world size) with --run")
    p.add_argument("--submit", metavar="CLUSTER_YAML", help="submit one array job, a task per run")
    p.add_argument("--dry-run", action="store_true", help="with --submit: print the batch script only")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="markdown table and PNG plots comparing runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("study", help="stability / lr-sweep / scaling studies: expand, --run here, --submit "
                       "as a Slurm array job, or `study report RUN_ROOT`")
    from afb_scale.studies.cli import add_arguments as study_arguments

    study_arguments(p)
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("selftest", help="train a few steps on every device path (fp32/bf16/fp16, "
                       "checkpointing, resume, export) and print a table")
    from afb_scale.selftest import add_arguments as selftest_arguments

    selftest_arguments(p)
    p.set_defaults(func=cmd_selftest)
    p = sub.add_parser("plan", help="size a run: parameters, FLOPs/token, memory per device, fit, time "
                       "(no GPU needed); --search ranks the layouts that fit")
    _with_config_args(p)
    p.add_argument("--world-size", type=int, help="devices in all (default: --nodes x --gpus-per-node)")
    p.add_argument("--nodes", type=int, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="devices per node (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per device, GiB (default 80)")
    from afb_scale.metrics.throughput import PEAK_TFLOPS

    p.add_argument("--gpu", default="H100-SXM", choices=sorted(PEAK_TFLOPS),
                   help="device whose dense peak the time estimate uses (default H100-SXM)")
    p.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s per device (overrides --gpu and "
                   "metrics.peak_tflops)")
    p.add_argument("--mfu", type=float, default=0.30, help="assumed model FLOPs utilisation for the time "
                   "estimate (default 0.30: AFB-GELU at 1.3B on one H100, docs/results/gpu.md)")
    p.add_argument("--search", action="store_true",
                   help="also list the layouts that fit, best estimated throughput first")
    p.add_argument("--top", type=int, default=20, help="rows of --search (default 20)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """The command line. `callbacks` (training.trainer.Callback objects) reach `train`: how a
    script of your own runs `afb-scale train` with hooks, e.g. `cli.main(["train", "--config",
    CONFIG], callbacks=[MyCallback()])` under torchrun."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:  # its own parser, with its own config type (afb_scale/cluster/submit.py)
        from afb_scale.cluster.submit import main as submit_main

        return submit_main(argv[1:])
    if argv[:1] == ["lm-eval"]:  # lm_eval's own parser, with the afb_scale model registered
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            print("error: afb-scale lm-eval needs lm-eval; install it with pip install -e '.[eval]'", file=sys.stderr)
            return EXIT_BAD_INPUT
        from afb_scale.evaluation.lm_eval_model import main as lm_eval_main

        return lm_eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes and warns
    try:
        return args.func(args, callbacks) if args.func is cmd_train else args.func(args)
    except ConfigError as e:
        # One write: every rank reports the same error, often into one shared log, and under
        # PYTHONUNBUFFERED print() sends the text and its newline as two writes that interleave.
        sys.stderr.write(f"error: {e}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
