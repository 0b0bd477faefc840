"""Patches to the libraries afb_scale builds on, one module per library, each patch saying why,
which upstream code it replaces, and guarded by tests/test_compat.py against version changes:
`megatron.py` (megatron-core on a machine without CUDA), `deepspeed.py` (DeepSpeed internals)."""
