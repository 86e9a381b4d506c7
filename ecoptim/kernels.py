"""Build and load ecoptim's C kernels (``ecoptim/csrc/eco_cpu.c``) for the fused CPU optimizer step.

The source is compiled once per machine with the system C compiler (``$CC`` or ``cc``/``gcc``) into a cache
directory (``$ECOPTIM_CACHE_DIR``, default ``~/.cache/ecoptim``), keyed by a hash of the source, the flags,
the OpenMP runtime and the CPU, and loaded with ctypes: no torch headers, no Python extension ABI; the build
takes ~40 s, once.
Flags: ``-O3 -march=native`` (AVX-512 or AVX2/FMA/F16C paths where the CPU has them, ``vector_isa`` says which;
``$ECOPTIM_KERNEL_MARCH`` overrides, e.g. ``x86-64-v3`` for AVX2 only, ``x86-64`` for the scalar code) and
``-ffp-contract=off`` (the compiler may not fuse multiply-adds the reference path does not fuse; see the C
file's header).

Threads: where torch runs on GNU libgomp (``openmp_runtime``), the source is compiled with ``-fopenmp`` and
linked to the file torch loaded, so the kernel's parallel regions run on torch's own thread pool; otherwise (or
if that build fails) it starts threads of its own per call (``threading_model`` says which).

If no compiler is found or the build fails, ``load()`` returns None (and warns once); the optimizers then use
the reference path. ``ECOPTIM_DISABLE_KERNELS=1`` forces that.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["load", "available", "threading_model", "vector_isa", "openmp_runtime", "all_finite", "sumsq", "uniform",
           "EcoArgs", "FMT_E4M3", "FMT_E5M2", "FMT_INT8", "FMT_BF16", "FMT_INT4"]

FMT_E4M3, FMT_E5M2, FMT_INT8, FMT_BF16, FMT_INT4 = 0, 1, 2, 3, 4
_SOURCE = Path(__file__).with_name("csrc") / "eco_cpu.c"
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]


def _flags() -> list[str]:
    # ECOPTIM_KERNEL_MARCH=x86-64 builds the portable scalar code (the tests check it is bit-identical too)
    return [f"-march={os.environ.get('ECOPTIM_KERNEL_MARCH', 'native')}", *_FLAGS]


class EcoArgs(ctypes.Structure):
    """Mirror of ``eco_args`` in eco_cpu.c (field order and types must match)."""

    _fields_ = [
        ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("grad", ctypes.c_void_p),
        ("m", ctypes.c_void_p), ("v", ctypes.c_void_p), ("lut", ctypes.c_void_p),
        ("nb", ctypes.c_int64), ("bs", ctypes.c_int64),
        ("fmt", ctypes.c_int32), ("grad_bf16", ctypes.c_int32), ("state_bf16", ctypes.c_int32),
        ("inject", ctypes.c_int32), ("stochastic", ctypes.c_int32),
        ("optimizer", ctypes.c_int32),
        ("nesterov", ctypes.c_int32), ("first_step", ctypes.c_int32),
        ("fmax", ctypes.c_float),
        ("decay", ctypes.c_float), ("w1", ctypes.c_float), ("b2", ctypes.c_float), ("omb2", ctypes.c_float),
        ("bc2s", ctypes.c_float), ("eps", ctypes.c_float), ("neg_step", ctypes.c_float), ("coef", ctypes.c_float),
        ("wd", ctypes.c_float), ("mom", ctypes.c_float), ("omd", ctypes.c_float), ("neg_lr", ctypes.c_float),
        ("k1", ctypes.c_uint32), ("k2", ctypes.c_uint32),
        ("nonfinite", ctypes.c_int64),
        # 8-bit moments (state_bf16 == 2)
        ("m_absmax", ctypes.c_void_p), ("v_absmax", ctypes.c_void_p),
        ("t7", ctypes.c_void_p), ("t8", ctypes.c_void_p),
        ("b7rtn", ctypes.c_void_p), ("b7sr", ctypes.c_void_p), ("b8rtn", ctypes.c_void_p), ("b8sr", ctypes.c_void_p),
        ("s8bs", ctypes.c_int64), ("nbkt", ctypes.c_int32), ("s8sr", ctypes.c_int32),
        ("mk1", ctypes.c_uint32), ("mk2", ctypes.c_uint32), ("vk1", ctypes.c_uint32), ("vk2", ctypes.c_uint32),
        # modes 'master' / 'exact'
        ("master", ctypes.c_void_p), ("err", ctypes.c_void_p),
        # gradient scale (clip_grad_norm_ folded into the step; 1.0 = none)
        ("gscale", ctypes.c_float),
        # mode 'kahan': the compensation's codes and scales
        ("comp", ctypes.c_void_p), ("comp_scale", ctypes.c_void_p),
    ]


_lib: ctypes.CDLL | None = None
_tried = False
_threads_on: str | None = None
_ABI = 12


def _cache_dir() -> Path:
    return Path(os.environ.get("ECOPTIM_CACHE_DIR") or Path.home() / ".cache" / "ecoptim")


def _cpu_id() -> str:
    try:  # -march=native: a binary is only valid on the CPU (flags) it was built for
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


def openmp_runtime() -> str | None:
    """The GNU OpenMP runtime (libgomp) torch runs its CPU ops on, as mapped in this process; None if there is
    none (another runtime, no /proc) or ``ECOPTIM_KERNEL_OPENMP=0``. The kernels are built to run their threads
    on it: torch's pool keeps its workers spinning for a while after each parallel op (a backward pass), and
    threads of the kernel's own would have to compete with them for the cores."""
    if os.environ.get("ECOPTIM_KERNEL_OPENMP", "1") == "0":
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "/libgomp" in ln}
    except OSError:
        return None
    found = sorted(q for q in paths if os.path.basename(q).startswith("libgomp") and os.path.isfile(q))
    return found[0] if len(found) == 1 else None  # two runtimes in one process: use neither


def _compile(cc: str, flags: list[str], omp: str | None, out: str, source: Path = _SOURCE) -> None:
    """Compile ``source`` into the shared library ``out``, its threads on the OpenMP runtime file ``omp`` (None:
    threads of its own)."""
    if omp is None:
        subprocess.run([cc, *flags, "-o", out, str(source), "-lm"], check=True, capture_output=True, text=True)
        return
    # compiled with -fopenmp but linked to the very file torch loaded (not the compiler's own libgomp): the
    # library then names torch's runtime by its soname, and the loader hands it the copy already in memory
    obj = out + ".o"
    try:
        subprocess.run([cc, *flags, "-fopenmp", "-c", "-o", obj, str(source)], check=True, capture_output=True,
                       text=True)
        subprocess.run([cc, *flags, "-o", out, obj, omp, "-lm"], check=True, capture_output=True, text=True)
    finally:
        if os.path.exists(obj):
            os.unlink(obj)


def _build(cc: str) -> tuple[Path, str | None]:
    """The cached library for this source, compiler, flags and CPU (built if missing), and the OpenMP runtime
    it runs its threads on (None: threads of its own)."""
    src = _SOURCE.read_bytes()
    flags = _flags()
    omp = openmp_runtime()
    for runtime in ([omp] if omp is None else [omp, None]):  # an OpenMP build that fails: threads of its own
        tag = hashlib.sha256(src + " ".join([cc] + flags + [f"openmp={runtime}"]).encode() + _cpu_id().encode()
                             + platform.machine().encode()).hexdigest()[:16]
        out = _cache_dir() / f"eco_cpu-{tag}.so"
        if out.exists():
            return out, runtime
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:  # build to a temporary name and rename: concurrent processes never load a half-written file
            _compile(cc, flags, runtime, tmp)
            os.replace(tmp, out)
            return out, runtime
        except subprocess.CalledProcessError:
            if runtime is None:
                raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise AssertionError("unreachable")


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
        path, runtime = _build(cc)
        lib = ctypes.CDLL(str(path))
        if lib.eco_abi_version() != _ABI:
            raise RuntimeError("stale kernel binary")
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"ecoptim: building the fused CPU kernels failed ({detail}); using the reference path")
        return None
    _lib = declare(lib)
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


def compiler() -> str | None:
    """The C compiler the kernels are built with (``$CC``, else ``cc`` or ``gcc`` on the PATH)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of the kernel library's entry points."""
    lib.eco_step_many.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    lib.eco_step_many.restype = ctypes.c_int
    lib.eco_uniform.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p]
    lib.eco_uniform.restype = None
    lib.eco_all_finite.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
                                   ctypes.c_int32]
    lib.eco_all_finite.restype = ctypes.c_int
    if hasattr(lib, "eco_vector_lanes"):
        lib.eco_vector_lanes.argtypes = []
        lib.eco_vector_lanes.restype = ctypes.c_int
    if hasattr(lib, "eco_sumsq"):
        lib.eco_sumsq.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                                  ctypes.c_void_p]
        lib.eco_sumsq.restype = ctypes.c_int
    if not hasattr(lib, "eco_state8"):  # an older build (benchmarks/kernel_ab.py loads one to compare)
        return lib
    lib.eco_state8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint32,
                               ctypes.c_int32, ctypes.c_int32]
    lib.eco_state8.restype = None
    return lib


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


def _tensor_arrays(tensors: list[torch.Tensor], dtype_codes: dict[torch.dtype, int]):
    """The C arrays (pointers, element counts, dtype codes) describing ``tensors`` for a kernel that reads
    contiguous CPU tensors of the dtypes in ``dtype_codes``; None if it cannot read them all."""
    if any(t.device.type != "cpu" or t.dtype not in dtype_codes or not t.is_contiguous() for t in tensors):
        return None
    n = len(tensors)
    return ((ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
            (ctypes.c_int64 * n)(*[t.numel() for t in tensors]),
            (ctypes.c_int32 * n)(*[dtype_codes[t.dtype] for t in tensors]))


def all_finite(tensors: list[torch.Tensor]) -> bool | None:
    """Whether every element of ``tensors`` is finite, in one threaded read pass (about 4x faster here than
    ``torch.isfinite(t).all()``, which materializes a bool tensor). None if the kernel cannot check them
    (not all contiguous fp32/bf16 CPU tensors, or no kernels): the caller then uses torch."""
    arrays = _tensor_arrays(tensors, {torch.float32: 0, torch.bfloat16: 1}) if tensors else None
    lib = load() if arrays is not None else None
    if lib is None:
        return None
    return bool(lib.eco_all_finite(*arrays, len(tensors), torch.get_num_threads()))


_SUMSQ_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def sumsq(tensors: list[torch.Tensor]) -> list[float] | None:
    """Per tensor, the sum of the squares of its elements in double precision, in one threaded read pass
    (NaN/Inf where a tensor holds NaN/Inf: the squares of fp32/bf16/fp16 values cannot overflow a double).
    Deterministic: the same bits whatever the thread count or build (see ``eco_sumsq``). None if the kernel
    cannot read them (not all contiguous fp32/bf16/fp16 CPU tensors, or no kernels)."""
    arrays = _tensor_arrays(tensors, _SUMSQ_DTYPES)
    lib = load() if arrays is not None else None
    if lib is None:
        return None
    out = (ctypes.c_double * len(tensors))()
    if lib.eco_sumsq(*arrays, len(tensors), torch.get_num_threads(), out) != 0:
        raise MemoryError("ecoptim: could not allocate the gradient-norm pass's chunk sums")
    return list(out)
