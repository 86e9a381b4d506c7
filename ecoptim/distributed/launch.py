"""Run a function on N local processes with an initialised ``torch.distributed`` group (CPU, gloo).

This is what the tests and ``benchmarks/distributed.py`` use; it is also a convenient way to try the
distributed features on one machine without ``torchrun``:

    from ecoptim.distributed import run_workers
    results = run_workers(fn, world_size=2, args=(...,))   # fn(rank, world_size, *args) on every rank

Each worker gets ``torch.set_num_threads(threads)`` (default 1: several processes share the cores),
a process group rendezvoused through a ``FileStore`` in a fresh temporary directory (no port to pick, so
parallel test runs cannot collide), and its return value is sent back to the caller (``torch.save`` to a
file, so tensors are fine). An exception in any worker is re-raised in the caller with its traceback; a
worker that hangs is killed after ``timeout`` seconds.

``start_method="fork"`` (the default on Linux) starts in ~0.2 s; "spawn" re-imports torch in each child
(~5-10 s on a loaded 2-core machine) but is the safe choice when the caller has already started threads
(OpenMP pools with more than one thread, CUDA).
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_workers", "WorkerTimeout"]

_PRELOAD = ("torch._dynamo", "torch.distributed.tensor", "torch.nn.parallel")


class WorkerTimeout(RuntimeError):
    """A worker did not finish within ``run_workers``'s timeout (it was killed)."""


def _entry(rank: int, fn: Callable[..., Any], world_size: int, args: Sequence[Any], tmp: str, backend: str,
           threads: int) -> None:
    torch.set_num_threads(threads)
    store = dist.FileStore(os.path.join(tmp, "store"), world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(tmp, f"result{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (), *, backend: str = "gloo",
                start_method: str | None = None, timeout: float = 120.0, threads: int = 1) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the per-rank results.

    ``fn`` must be picklable by reference (a module-level function) when ``start_method`` is "spawn".
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    if start_method == "fork":
        # DDP / DTensor import these lazily (several seconds each); import once here so that every forked
        # worker inherits them instead of importing them again.
        for name in _PRELOAD:
            importlib.import_module(name)
    with tempfile.TemporaryDirectory(prefix="ecoptim-dist-") as tmp:
        ctx = mp.start_processes(_entry, (fn, world_size, tuple(args), tmp, backend, threads), nprocs=world_size,
                                 join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
                raise WorkerTimeout(f"distributed workers did not finish within {timeout:.0f} s (killed)")
        return [torch.load(os.path.join(tmp, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
