"""`--malloc-cache` for the CPU benchmarks: glibc keeps freed memory for reuse.

glibc serves each large buffer (above its mmap threshold, which it moves with the process's own
history of frees) with its own mmap and unmaps it when freed, so every step page-faults those
activations back in, one zeroed 4 KiB page at a time. Measured at the 1.3B GELU shape, seq 1024,
the fused AFB backward kernel took 88 ms a call inside a training step and 26 ms on reused
buffers, and kernel time was about a quarter of a run. Two programs that allocate differently
(AFB and its base; afb_scale's training process and a bare loop) then differ by this CPU-only cost
and by where each one's threshold happened to land. These settings make glibc serve everything
from its heap and keep freed memory (no mmap, no trim), as torch's caching allocator does on CUDA
and jemalloc / tcmalloc do on CPU. glibc reads them at process start: a benchmark sets them in
the environment of the processes it starts, or re-executes itself.
"""

MALLOC_CACHE = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(256 << 20)}
