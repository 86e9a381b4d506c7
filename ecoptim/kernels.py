"""ecoptim's CPU kernels: whether they are available here, how they run, and the helpers that call them directly.

The fused optimizer step is the op ``ecoptim::adamw_step_`` / ``ecoptim::sgd_step_`` (``ecoptim.ops``), whose CPU
kernel (``ecoptim/backends/cpu``) calls the C library built from ``ecoptim/csrc``. The library is built on first
use (``load()``; about 40 s, once per machine and source; see ``backends/cpu/build.py`` for the cache, flags and
threads), never at ``import ecoptim``.

If no compiler is found or the build fails, ``load()`` returns None (and warns once); the optimizers then use
the reference path. ``ECOPTIM_DISABLE_KERNELS=1`` forces that.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import warnings

import torch

from .backends.cpu import build as _build
from .backends.cpu.abi import Dtype

__all__ = ["load", "available", "threading_model", "vector_isa", "openmp_runtime", "compiler", "all_finite",
           "sumsq", "uniform"]

openmp_runtime = _build.openmp_runtime
compiler = _build.compiler

_lib: ctypes.CDLL | None = None
_tried = False
_threads_on: str | None = None


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None if it cannot be built here."""
    global _lib, _tried, _threads_on
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("ECOPTIM_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    cc = compiler()
    if cc is None:
        warnings.warn("ecoptim: no C compiler found, the fused CPU optimizer step is unavailable; "
                      "install gcc (or set CC) for a ~20x faster step. Using the reference path.")
        return None
    try:
        _build.check_header()
        path, runtime = _build.build(cc)
        lib = _build.open_library(path)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"ecoptim: building the fused CPU kernels failed ({detail}); using the reference path")
        return None
    _lib = lib
    _threads_on = "openmp" if runtime else "pthreads"
    return lib


def threading_model() -> str | None:
    """How the loaded kernels run their threads: 'openmp' (torch's OpenMP pool, ``openmp_runtime``) or
    'pthreads' (threads of their own, started per call); None if the kernels are not available."""
    return _threads_on if load() is not None else None


def vector_isa() -> str | None:
    """The vector instructions of the loaded kernels' sweeps: 'avx512' (16 lanes), 'avx2' (8 lanes) or 'scalar'
    (what ``-march`` gave the build; every one gives the same bits); None if the kernels are not available."""
    lib = load()
    return None if lib is None else {16: "avx512", 8: "avx2", 1: "scalar"}[lib.eco_vector_lanes()]


def available() -> bool:
    """True if the fused CPU kernels are built and loaded."""
    return load() is not None


def uniform(key: tuple[int, int], n: int) -> torch.Tensor:
    """The C implementation of ``ecoptim.rng.uniform`` (for cross-checks)."""
    lib = load()
    if lib is None:
        raise RuntimeError("ecoptim's C kernels are unavailable on this machine")
    out = torch.empty(n, dtype=torch.float32)
    lib.eco_uniform(key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF, n, out.data_ptr())
    return out


_DTYPES = {torch.float32: Dtype.FP32, torch.bfloat16: Dtype.BF16, torch.float16: Dtype.FP16}


def _tensor_arrays(tensors: list[torch.Tensor], dtypes: tuple[torch.dtype, ...]):
    """The C arrays (pointers, element counts, eco_dtype codes) describing ``tensors`` for a kernel that reads
    contiguous CPU tensors of ``dtypes``; None if it cannot read them all."""
    if any(t.device.type != "cpu" or t.dtype not in dtypes or not t.is_contiguous() for t in tensors):
        return None
    n = len(tensors)
    return ((ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
            (ctypes.c_int64 * n)(*[t.numel() for t in tensors]),
            (ctypes.c_int32 * n)(*[_DTYPES[t.dtype] for t in tensors]))


def all_finite(tensors: list[torch.Tensor]) -> bool | None:
    """Whether every element of ``tensors`` is finite, in one threaded read pass (about 4x faster here than
    ``torch.isfinite(t).all()``, which materializes a bool tensor). None if the kernel cannot check them
    (not all contiguous fp32/bf16 CPU tensors, or no kernels): the caller then uses torch."""
    arrays = _tensor_arrays(tensors, (torch.float32, torch.bfloat16)) if tensors else None
    lib = load() if arrays is not None else None
    if lib is None:
        return None
    return bool(lib.eco_all_finite(*arrays, len(tensors), torch.get_num_threads()))


def sumsq(tensors: list[torch.Tensor]) -> list[float] | None:
    """Per tensor, the sum of the squares of its elements in double precision, in one threaded read pass
    (NaN/Inf where a tensor holds NaN/Inf: the squares of fp32/bf16/fp16 values cannot overflow a double).
    Deterministic: the same bits whatever the thread count or build (see ``eco_sumsq``). None if the kernel
    cannot read them (not all contiguous fp32/bf16/fp16 CPU tensors, or no kernels)."""
    arrays = _tensor_arrays(tensors, (torch.float32, torch.bfloat16, torch.float16))
    lib = load() if arrays is not None else None
    if lib is None:
        return None
    out = (ctypes.c_double * len(tensors))()
    if lib.eco_sumsq(*arrays, len(tensors), torch.get_num_threads(), out) != 0:
        raise MemoryError("ecoptim: could not allocate the gradient-norm pass's chunk sums")
    return list(out)
