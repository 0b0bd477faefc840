#!/usr/bin/env bash
# Install afb_scale and its pinned dependencies into the current Python environment.
#
# On a machine without a GPU this installs torch==2.13.0 first: that pin takes the CPU wheel,
# while an unpinned torch would pull several GB of CUDA packages. On a GPU machine or in the
# NGC container the platform's torch is kept (pyproject only asks for torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch>=2.4"
  else
    "$PYTHON" -m pip install "torch==2.13.0"
  fi
fi
"$PYTHON" -m pip install -q -e ".[test,eval]"  # eval: transformers + lm-eval (afb_scale/evaluation/)

# DeepSpeed on CPU JIT-builds a shared-memory comm op on first use; two ranks building it at
# once has aborted runs, so build it once here (cached under ~/.cache/torch_extensions).
if "$PYTHON" -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then
  DS_ACCELERATOR=cpu "$PYTHON" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
fi
