#!/usr/bin/env bash
# The README's main job: set up, prepare the built-in corpus (Python's standard library
# sources), and train a tiny AFB GPT with TP = 2 on 2 processes. Extra arguments are config
# overrides, e.g. `bash launch/quickstart.sh train.steps=100`.
#
# Where it runs: on CPU (DS_ACCELERATOR=cpu, gloo) unless torch sees at least 2 CUDA GPUs, the
# two ranks of TP = 2 then using one GPU each (NCCL cannot run two ranks on one GPU). With
# exactly one GPU it runs on CPU and hides the GPU (CUDA_VISIBLE_DEVICES=""), saying so.
# A DS_ACCELERATOR set by the caller is kept as it is.
#
# Settings (environment):
#   AFB_SKIP_SETUP=1  do not run launch/setup.sh (the environment is already installed)
#   AFB_DRY_RUN=1     print the device choice and the torchrun command line, then exit 0; runs
#                     neither the setup nor the corpus preparation nor the training
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${AFB_SKIP_SETUP:-0}" != 1 ] && [ "${AFB_DRY_RUN:-0}" != 1 ]; then
  bash launch/setup.sh
fi
if [ -z "${DS_ACCELERATOR:-}" ]; then
  # CUDA GPUs torch can use (0 without torch, without a GPU, or with CUDA_VISIBLE_DEVICES="").
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" \
    2>/dev/null) || gpus=0
  case "$gpus" in '' | *[!0-9]*) gpus=0 ;; esac
  if [ "$gpus" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
  elif [ "$gpus" -lt 2 ]; then
    echo "quickstart: $gpus CUDA GPU visible, but TP = 2 needs 2 (one rank per GPU with NCCL): running on CPU (DS_ACCELERATOR=cpu, CUDA_VISIBLE_DEVICES=\"\")"
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CMD=(torchrun --standalone --nproc_per_node 2 -m afb_scale.cli train --config configs/quickstart.yaml "$@")
if [ "${AFB_DRY_RUN:-0}" = 1 ]; then
  echo "quickstart: DS_ACCELERATOR=${DS_ACCELERATOR:-} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-(unset)}"
  printf 'quickstart: dry run (AFB_DRY_RUN=1), would run:'
  printf ' %q' "${CMD[@]}"
  printf '\n'
  exit 0
fi
if [ ! -f data/default/stdlib_text_document.idx ]; then
  python3 -m data_prep.default_corpus --out data/default
fi
exec "${CMD[@]}"
