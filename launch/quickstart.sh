#!/usr/bin/env bash
# The README's main job: set up, prepare the built-in corpus (Python's standard library
# sources), and train a tiny AFB GPT with TP = 2 on 2 CPU processes. Extra arguments are
# config overrides, e.g. `bash launch/quickstart.sh train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f data/default/stdlib_text_document.idx ]; then
  python3 -m data_prep.default_corpus --out data/default
fi
exec torchrun --standalone --nproc_per_node 2 -m afb_scale.cli train --config configs/quickstart.yaml "$@"
