"""Run a function on N real ranks (forked processes, gloo) and collect what each returns.

Forking from inside pytest inherits the already-imported megatron-core and DeepSpeed, so a
multi-rank test costs about a second instead of a torchrun launch per test
(see ../shared/design/architecture.md). The ranks form a real torch.distributed gloo group.
"""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(result) -> bytes:
    """Results travel as torch.save bytes, not as tensors.

    torch.multiprocessing would pass a tensor as a shared-memory file descriptor fetched from the
    child's resource-sharer socket when the parent unpickles it; a child that has already exited
    has removed that socket, and the parent fails with FileNotFoundError (seen on CI). Bytes have
    no such lifetime.
    """
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        torch.set_num_threads(1)
        queue.put((rank, "ok", _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # report any failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from afb_scale.parallel.groups import destroy_distributed

        try:
            destroy_distributed()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, start_method: str = "fork") -> list:
    """fn(rank, world_size, *args) on each rank; returns the per-rank results in rank order.

    start_method="spawn" starts fresh interpreters (seconds of imports each) for work that a
    forked child can deadlock on: after the parent has run multi-threaded (OpenMP) kernels, a
    forked child's first large parallel op can wait forever on a lock copied in its held state.
    """
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = _from_bytes(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
