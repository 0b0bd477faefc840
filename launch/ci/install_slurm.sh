#!/usr/bin/env bash
# Install what the real-Slurm tests need (Debian/Ubuntu): slurm-wlm (slurmctld, slurmd and the
# client commands), munge (Slurm's authentication) and shellcheck (the script lint test).
# Idempotent: does nothing when every command is already present, so CI can call it on every run.
# The tests start and stop their own private daemons; nothing installed here is started.
set -euo pipefail

need=()
for cmd in slurmctld slurmd sbatch munged shellcheck; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "install_slurm: slurm-wlm, munge and shellcheck are already installed"
    exit 0
fi
echo "install_slurm: missing ${need[*]}; installing slurm-wlm munge shellcheck"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
# --no-install-recommends keeps out the MPI and X11 stacks that slurm-wlm recommends.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends slurm-wlm munge shellcheck
