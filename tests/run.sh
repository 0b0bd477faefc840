#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command, and what CI runs.
#
# As root on Debian/Ubuntu it also installs slurm-wlm, munge and shellcheck for the real
# two-node Slurm tests (they start and stop their own daemons). Elsewhere those tests skip,
# unless AFB_REQUIRE_SLURM=1 (set by .ci/run), where a missing Slurm is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash launch/ci/install_slurm.sh
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python3 -m pytest -q --durations=15 tests "$@"
