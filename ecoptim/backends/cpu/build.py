"""Build and load the CPU kernel library from ``ecoptim/csrc`` (every ``.c`` file there, linked into one shared
library).

The sources are compiled once per machine with the system C compiler (``$CC`` or ``cc``/``gcc``) into a cache
directory (``$ECOPTIM_CACHE_DIR``, default ``~/.cache/ecoptim``), keyed by a hash of every source and header, the
flags, the OpenMP runtime and the CPU, and loaded with ctypes: no torch headers, no Python extension ABI.
Flags: ``-O3 -march=native`` (AVX-512 or AVX2/FMA/F16C paths where the CPU has them; ``$ECOPTIM_KERNEL_MARCH``
overrides, e.g. ``x86-64-v3`` for AVX2 only, ``x86-64`` for the scalar code) and ``-ffp-contract=off`` (the
compiler may not fuse multiply-adds the reference path does not fuse; see ``csrc/step.c``).

Threads: where torch runs on GNU libgomp (``openmp_runtime``), the sources are compiled with ``-fopenmp`` and
linked to the file torch loaded, so the kernels' parallel regions run on torch's own thread pool; otherwise (or
if that build fails) they start threads of their own per call.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import abi

__all__ = ["SOURCE_DIR", "sources", "flags", "compiler", "openmp_runtime", "compile_library", "check_header",
           "source_digest", "build", "open_library"]

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-pthread"]


def sources(directory: Path = SOURCE_DIR) -> list[Path]:
    """The files the library is built from (``.c`` compiled, ``.h`` included), sorted by name."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".c", ".h"))


def flags() -> list[str]:
    """The compiler flags (``$ECOPTIM_KERNEL_MARCH`` picks the ISA: x86-64 builds the portable scalar code)."""
    return [f"-march={os.environ.get('ECOPTIM_KERNEL_MARCH', 'native')}", *_BASE_FLAGS]


def compiler() -> str | None:
    """The C compiler the kernels are built with (``$CC``, else ``cc`` or ``gcc`` on the PATH)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def openmp_runtime() -> str | None:
    """The GNU OpenMP runtime (libgomp) torch runs its CPU ops on, as mapped in this process; None if there is
    none (another runtime, no /proc) or ``ECOPTIM_KERNEL_OPENMP=0``. The kernels are built to run their threads
    on it: torch's pool keeps its workers spinning for a while after each parallel op (a backward pass), and
    threads of the kernels' own would have to compete with them for the cores."""
    if os.environ.get("ECOPTIM_KERNEL_OPENMP", "1") == "0":
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "/libgomp" in ln}
    except OSError:
        return None
    found = sorted(q for q in paths if os.path.basename(q).startswith("libgomp") and os.path.isfile(q))
    return found[0] if len(found) == 1 else None  # two runtimes in one process: use neither


def _cpu_id() -> str:
    try:  # -march=native: a binary is only valid on the CPU (flags) it was built for
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


def compile_library(cc: str, cflags: list[str], omp: str | None, out: str, directory: Path = SOURCE_DIR) -> None:
    """Compile the ``.c`` files of ``directory`` into the shared library ``out``, its threads on the OpenMP
    runtime file ``omp`` (None: threads of its own). Raises subprocess.CalledProcessError if the build fails."""
    c_files = [str(p) for p in sources(directory) if p.suffix == ".c"]
    if omp is None:
        subprocess.run([cc, *cflags, "-shared", "-o", out, *c_files, "-lm"], check=True, capture_output=True,
                       text=True)
        return
    # compiled with -fopenmp but linked to the very file torch loaded (not the compiler's own libgomp): the
    # library then names torch's runtime by its soname, and the loader hands it the copy already in memory
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
        objs = []
        for src in c_files:
            objs.append(os.path.join(tmp, Path(src).stem + ".o"))
            subprocess.run([cc, *cflags, "-fopenmp", "-c", "-o", objs[-1], src], check=True, capture_output=True,
                           text=True)
        subprocess.run([cc, *cflags, "-shared", "-o", out, *objs, omp, "-lm"], check=True, capture_output=True,
                       text=True)


def check_header(directory: Path = SOURCE_DIR) -> None:
    """Raise RuntimeError if ``eco_abi.h`` is not the header ``abi.py`` generates (someone edited one of them)."""
    if (directory / "eco_abi.h").read_text() != abi.header():
        raise RuntimeError("ecoptim/csrc/eco_abi.h does not match ecoptim/backends/cpu/abi.py; regenerate it with "
                           "`python -m ecoptim.backends.cpu.abi`")


def source_digest(directory: Path = SOURCE_DIR) -> bytes:
    """The hash of every source and header (names and contents): part of the cache key, so that a change to any
    of them rebuilds."""
    digest = hashlib.sha256()
    for p in sources(directory):
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.digest()


def build(cc: str, directory: Path = SOURCE_DIR) -> tuple[Path, str | None]:
    """The cached library for these sources, compiler, flags and CPU (built if missing), and the OpenMP runtime
    it runs its threads on (None: threads of its own)."""
    digest = source_digest(directory)
    cflags = flags()
    omp = openmp_runtime()
    for runtime in ([omp] if omp is None else [omp, None]):  # an OpenMP build that fails: threads of its own
        tag = hashlib.sha256(digest + " ".join([cc] + cflags + [f"openmp={runtime}"]).encode()
                             + _cpu_id().encode() + platform.machine().encode()).hexdigest()[:16]
        out = _cache_dir() / f"eco_cpu-{tag}.so"
        if out.exists():
            return out, runtime
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:  # build to a temporary name and rename: concurrent processes never load a half-written file
            compile_library(cc, cflags, runtime, tmp, directory)
            os.replace(tmp, out)
            return out, runtime
        except subprocess.CalledProcessError:
            if runtime is None:
                raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise AssertionError("unreachable")


def open_library(path: Path | str) -> ctypes.CDLL:
    """Load a built library and declare its entry points; RuntimeError if it was built from another argument
    definition than this package's (``abi.ABI_HASH``)."""
    lib = ctypes.CDLL(str(path))
    lib.eco_abi_hash.restype = ctypes.c_uint32
    if lib.eco_abi_hash() != abi.ABI_HASH:
        raise RuntimeError(f"kernel library {path} was built from another argument definition "
                           f"(ABI hash {lib.eco_abi_hash():#010x}, this package's {abi.ABI_HASH:#010x})")
    return abi.declare(lib)


def _cache_dir() -> Path:
    return Path(os.environ.get("ECOPTIM_CACHE_DIR") or Path.home() / ".cache" / "ecoptim")
