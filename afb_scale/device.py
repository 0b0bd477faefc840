"""The one place that knows whether this process runs on CPU or CUDA.

Everything device-specific is decided here: which device a rank uses, the collective backend,
how megatron-core's model-parallel RNG is seeded, the parameter dtype of a precision, and how a
batch reaches the device. The rest of the package asks this module and is device-agnostic, so
the CPU test suite runs the same code a GPU job runs.

Why each piece exists (each was a crash or a silent error on the GPU path before):
- megatron-core's attention, and with sequence parallelism its embedding and transformer block,
  fork the "model-parallel-rng" CUDA RNG state even at dropout 0; on CUDA it must be created by
  `model_parallel_cuda_manual_seed` after the parallel groups exist (`seed_model_parallel_rng`).
  Without CUDA, compat/megatron.py installs a tracker whose fork is a no-op instead.
- Under `srun --gpu-bind` or `--gpus-per-task` each task sees only its own GPU, while LOCAL_RANK
  (SLURM_LOCALID) still counts the node's tasks: `local_device_index` uses LOCAL_RANK only where
  it names a visible device.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from afb_scale.compat import megatron as megatron_compat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    """torch.distributed backend: NCCL between GPUs, gloo on CPU."""
    return "nccl" if cuda_available() else "gloo"


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device index for a rank that is `local_rank` on its node.

    torchrun and one-task-per-node Slurm jobs show every GPU of the node to every rank: the
    index is the local rank. A launcher that binds one GPU per task (srun --gpu-bind) shows each
    rank exactly one: index 0. Anything else is a launch error, reported in one line.
    """
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but only {device_count} CUDA devices are visible "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
        "start one process per visible GPU, or bind exactly one GPU per task"
    )


def setup() -> torch.device:
    """Pick this process's device before any process group or model exists; returns it.

    On CUDA: select the GPU for LOCAL_RANK. Without CUDA: install megatron-core's CPU shims.
    Idempotent.
    """
    if cuda_available():
        index = local_device_index(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    megatron_compat.apply()
    return torch.device("cpu")


def current() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch (and on CUDA megatron-core's model-parallel RNG tracker) after the groups exist.

    On CUDA, `model_parallel_cuda_manual_seed` seeds the default CUDA generator with `seed` and
    creates the tracker's "model-parallel-rng" state with a per-TP-rank offset (dropout inside
    tensor-parallel regions differs per shard, as megatron intends). Without CUDA the tracker
    stays the no-op one from compat/megatron.py.
    """
    torch.manual_seed(seed)
    if cuda_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        megatron_compat.reset_rng_tracker()


def rng_state() -> dict:
    """This rank's torch RNG states: CPU, and the current CUDA device's (not every visible GPU's:
    a resume under a launcher that shows another number of GPUs must still load them)."""
    state = {"torch": torch.get_rng_state()}
    if cuda_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["megatron_cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if cuda_available() and cuda_state is not None:
        if isinstance(cuda_state, (list, tuple)):  # written by versions that saved every GPU's
            cuda_state = cuda_state[min(torch.cuda.current_device(), len(cuda_state) - 1)]
        torch.cuda.set_rng_state(cuda_state)
        if "megatron_cuda_tracker" in state:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_cuda_tracker"])


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to `device`; to a GPU from pinned memory without blocking the host, so the
    copy overlaps with the work already queued (CUDA orders it before the kernels that read it)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
