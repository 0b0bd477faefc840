#!/usr/bin/env bash
# One command, a few minutes on one GPU: every CUDA path the project has (fp32, bf16, fp16 with
# loss scaling, activation checkpointing, SDPA and megatron attention, layer metrics, checkpoint
# save + bit-exact resume, export), and NCCL TP/DP/PP/sequence parallelism when >= 2 GPUs are
# visible. Prints a table and ends with `gpu_smoke=pass` or `gpu_smoke=fail: <first failure>`.
# Extra arguments go to `afb-scale selftest` (e.g. --steps 20, --cases bf16-afb,fp16-afb).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m afb_scale.cli selftest --gpu --out "${AFB_SMOKE_OUT:-runs/gpu_smoke}" "$@"
