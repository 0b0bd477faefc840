#!/usr/bin/env bash
# One srun task per GPU: map Slurm's task variables to the torch.distributed ones that torchrun
# would set, then become COMMAND. Used by launch/slurm/train.sbatch with AFB_LAUNCHER=srun.
#
#   srun --ntasks-per-node=GPUS launch/srun_task.sh COMMAND [ARGS...]
#
# MASTER_ADDR and MASTER_PORT come from the batch script (first node of the allocation).
# Because the command replaces this shell (exec), Slurm's signals reach the trainer directly
# and its exit status (75 after a preemption checkpoint) is the task's and srun's status.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: launch/srun_task.sh COMMAND [ARGS...]" >&2
    exit 2
fi
: "${MASTER_ADDR:?MASTER_ADDR must be set (the batch script sets it)}"
: "${MASTER_PORT:?MASTER_PORT must be set (the batch script sets it)}"

export RANK="$SLURM_PROCID"
export WORLD_SIZE="$SLURM_NTASKS"
# LOCAL_RANK is the task's index on its node, as torchrun defines it; torch.distributed and
# megatron-core rely on that meaning, so it stays SLURM_LOCALID even where it is not a CUDA device
# index: with GPU binding (srun --gpu-bind=..., --gpus-per-task=1) Slurm sets each task's
# CUDA_VISIBLE_DEVICES to its own GPU only, so every task sees one device, cuda:0, and
# cuda:LOCAL_RANK does not exist for LOCAL_RANK > 0. The trainer therefore picks its device as
# LOCAL_RANK only when LOCAL_RANK < torch.cuda.device_count(), and device 0 when exactly one GPU
# is visible (afb_scale.device.local_device_index); do not "fix" this by rewriting LOCAL_RANK.
export LOCAL_RANK="$SLURM_LOCALID"
# SLURM_TASKS_PER_NODE reads like "4(x2)"; the batch script asks for the same number of tasks
# on every node (--ntasks-per-node), so its first count is this node's.
export LOCAL_WORLD_SIZE="${SLURM_TASKS_PER_NODE%%[(,]*}"
export GROUP_RANK="$SLURM_NODEID"

echo "afb-launch node=${SLURMD_NODENAME:-$(hostname)} host=$(hostname) launcher=srun rank=$RANK" \
    "world_size=$WORLD_SIZE local_rank=$LOCAL_RANK master=$MASTER_ADDR:$MASTER_PORT"
exec "$@"
