"""Parallel layout and process groups: `layout.py` says where a rank stands (sizes, coordinates,
groups) as one value; `groups.py` creates the groups (torch.distributed + megatron-core)."""
