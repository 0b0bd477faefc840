"""`afb-scale`: the command line.

    afb-scale train --config configs/quickstart.yaml [section.key=value ...]   (under torchrun)
    afb-scale plan  --config CONFIG --world-size N [overrides]   validate and show the layout
    afb-scale prepare-data ...                                    see data_prep

Bad input ends with one line on stderr, `error: ...`, and exit status 2, before any process
group starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# megatron-core warns at import that Apex / Transformer Engine are absent; on CPU they are
# expected to be, and the unfused torch paths are what we test.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")

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
