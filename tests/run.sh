#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python3 -m pytest -q --durations=15 tests "$@"
