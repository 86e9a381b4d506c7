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

Under ``torchrun``, ``init_from_torchrun(backend)`` replaces ``dist.init_process_group(backend)``: the same
process group, with its rendezvous keys in a namespace of their own for every restart of the worker group.
torchrun (c10d rendezvous, shared TCP store: the default) keeps one store across ``--max-restarts``
restarts, and the workers of a restart would otherwise read the addresses that the dead workers published
there: gloo then connects to a closed port ("connectFullMesh failed ... Connection refused") or waits for
a peer that no longer exists (``tests/test_faults.py`` kills ranks under torchrun).

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

__all__ = ["run_workers", "WorkerTimeout", "init_from_torchrun"]

_PRELOAD = ("torch._dynamo", "torch.distributed.tensor", "torch.nn.parallel")


class WorkerTimeout(RuntimeError):
    """A worker did not finish within ``run_workers``'s timeout (it was killed)."""


def init_from_torchrun(backend: str = "gloo", **kwargs: Any) -> None:
    """``dist.init_process_group(backend)`` from torchrun's environment, safe across elastic restarts.

    Outside torchrun (no ``TORCHELASTIC_RESTART_COUNT``) this is ``dist.init_process_group(backend, **kwargs)``.
    Under torchrun the store's keys live under ``ecoptim/restart<n>/``, so that the workers of restart ``n``
    never read what the workers of an earlier attempt wrote to the store that torchrun keeps between restarts.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, **kwargs)
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"init_from_torchrun: TORCHELASTIC_RESTART_COUNT is set but {missing} are not; run the "
                         "script with torchrun (python -m torch.distributed.run)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun's agent hosts the store unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, then rank 0 hosts it
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=hosts,
                          multi_tenant=True)
    dist.init_process_group(backend, store=dist.PrefixStore(f"ecoptim/restart{restart}/", store), rank=rank,
                            world_size=world_size, **kwargs)


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
