"""`afb-scale`: the command line.

    afb-scale train --config configs/quickstart.yaml [section.key=value ...]   (under torchrun)
    afb-scale plan  --config CONFIG --world-size N [overrides]   validate and show the layout
    afb-scale prepare-data [--out data/default ...]               the built-in corpus (data_prep)

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

from afb_scale.config import ConfigError, data_parallel_size, load_config, validate

EXIT_BAD_INPUT = 2


def _load_validated(args, world_size: int):
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size)
    return cfg


def cmd_train(args) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _load_validated(args, world_size)
    from afb_scale.data import check_prepared_data

    check_prepared_data(cfg)  # tokenizer/model vocabulary and .bin/.idx pairs, before any group
    from afb_scale import train

    return train.run(cfg, world_size)


def cmd_prepare_data(args) -> int:
    from data_prep import default_corpus
    from data_prep.errors import run_command

    return run_command(default_corpus.main, args.args)


def cmd_plan(args) -> int:
    cfg = _load_validated(args, args.world_size)
    from afb_scale.engine import deepspeed_config

    m = cfg.model
    print(f"layout: world {args.world_size} = TP {cfg.parallel.tensor} x PP {cfg.parallel.pipeline} "
          f"x DP {data_parallel_size(cfg, args.world_size)}, ZeRO stage {cfg.parallel.zero_stage}")
    print(f"model: {m.ffn_kind}, {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads}, "
          f"ffn hidden {m.resolved_ffn_hidden_size}, feedback rank {m.feedback_rank}, "
          f"vocab {m.vocab_size} (padded {m.padded_vocab_size}), seq {m.seq_length}")
    print("deepspeed config:")
    print(json.dumps(deepspeed_config(cfg, args.world_size), indent=2))
    return 0


def _with_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (may `include:` others)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afb-scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (launch one process per rank with torchrun)")
    _with_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("prepare-data", help="prepare the built-in corpus (data_prep.default_corpus; --help for options)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_prepare_data)
    p = sub.add_parser("plan", help="validate a config for a world size and print the layout")
    _with_config_args(p)
    p.add_argument("--world-size", type=int, required=True)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes and warns
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
