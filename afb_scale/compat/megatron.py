"""The few patches megatron-core 0.16.1 needs to run on a machine without CUDA.

megatron-core assumes a GPU in a handful of places that matter to us. Everything CPU-specific
lives here, applied once by `apply()` and only when CUDA is absent, so GPU runs execute
megatron-core unmodified. Each patch names the place it works around.

Not patched here, handled by the callers instead:
- `get_default_causal_mask` (transformer/utils.py:35) allocates on "cuda": the model code always
  passes an explicit attention mask.
"""

from __future__ import annotations

import torch

# "module:qualname" -> sha256[:16] of inspect.getsource in megatron-core 0.16.1: the code these
# patches stand in for. tests/test_compat.py fails when an upgrade changes any of it.
UPSTREAM = {
    "megatron.core.utils:GlobalMemoryBuffer.get_tensor": "2b843a83eb762098",
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state": "aa26caaa069c5c4f",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state": "b179c9d95438b61c",
    "megatron.core.tensor_parallel.random:initialize_rng_tracker": "4bc461df7c7f7a43",
    "megatron.core.tensor_parallel.random:CheckpointFunction.forward": "07b45db6c50f404b",
}

_applied = False


def apply() -> bool:
    """Install the CPU shims if CUDA is unavailable. Idempotent. Returns True if installed."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    # GlobalMemoryBuffer.get_tensor (utils.py:631), rotary embeddings and
    # gather_from_tensor_model_parallel_region allocate on `torch.cuda.current_device()`.
    # Answering "cpu" makes those allocations land on the only device there is.
    torch.cuda.current_device = lambda: "cpu"

    # Activation recompute (CheckpointFunction) saves and restores the CPU and CUDA RNG states
    # (tensor_parallel/random.py:444-460); the CUDA half raises without CUDA (random.py:55).
    # With no CUDA generator there is nothing to save, and the CPU state is still restored.
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mpu_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _applied = True
    reset_rng_tracker()
    return True


def reset_rng_tracker() -> None:
    """Attention dropout forks megatron's CUDA RNG tracker, which raises without CUDA states.

    The inference tracker makes `fork()` a no-op context. Dropout is then drawn from torch's
    default CPU generator, which is fine for CPU runs (dropout is 0 in the test configs).
    """
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
