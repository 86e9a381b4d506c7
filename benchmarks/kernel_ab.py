"""A/B timing of two builds of the fused C kernel (ecoptim/csrc), side by side in one process.

    python benchmarks/kernel_ab.py --rev 0aea8c8                 # the kernel at a git revision vs the working tree
    python benchmarks/kernel_ab.py --rev 0aea8c8 --gran tensor --rounding stochastic
    python benchmarks/kernel_ab.py --rev HEAD --a-threads pthreads --after backward   # threads of its own vs
                                                                                  # torch's OpenMP pool

Both source trees (``ecoptim/csrc`` at the revision and in the working tree) are compiled with the flags ecoptim
uses and loaded side by side; one optimizer (FP8 ECO AdamW on 20 weights of 1024x1280 by default) is stepped
round-robin with each library in turn, plus torch's fused AdamW on the same shapes, so that machine noise hits
every row alike. The NaN/Inf pre-check is switched off (nonfinite='skip_blocks') so that the rows time the
kernel itself, except with 8-bit states (``--states``), which that policy does not offer.
Only revisions built from the same argument definition (``ecoptim/backends/cpu/abi.py``: the library's
``eco_abi_hash``) can be compared: the op's CPU kernel packs this checkout's structs. An older revision is
refused with its hash.
``--a-threads`` / ``--b-threads`` build a row with threads of its own (``pthreads``) or on torch's OpenMP pool
(``openmp``, the package's default where torch runs on libgomp); ``--after backward`` runs a forward/backward
pass of a small torch MLP before every timed step, as a training loop does (torch's pool is then still
spinning); the rows are taken in a fresh random order every round.
"""
from __future__ import annotations

import argparse
import ctypes
import io
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ecoptim
from ecoptim import kernels
from ecoptim.backends.cpu import build as cpu_build

ROOT = Path(__file__).resolve().parents[1]


def checkout_sources(rev: str, into: Path) -> Path:
    """``ecoptim/csrc`` of git revision ``rev``, extracted under ``into``; returns its directory."""
    tar = subprocess.run(["git", "archive", rev, "ecoptim/csrc"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "ecoptim" / "csrc"


def build(directory: Path, out: Path, threads: str) -> ctypes.CDLL:
    omp = cpu_build.openmp_runtime() if threads == "openmp" else None
    if threads == "openmp" and omp is None:
        sys.exit("--*-threads openmp: torch's OpenMP runtime (libgomp) is not loaded in this process")
    cpu_build.compile_library(cpu_build.compiler(), cpu_build.flags(), omp, str(out), directory)
    try:
        return cpu_build.open_library(out)
    except (RuntimeError, AttributeError) as e:  # AttributeError: a library from before eco_abi_hash
        sys.exit(f"cannot compare {directory}: {e}; kernel_ab compares builds of this checkout's argument "
                 "definition only")


def stepping_with(lib: ctypes.CDLL, opt) -> None:
    """Step ``opt`` with the op's CPU kernel calling ``lib``."""
    kernels._lib = lib  # the library the op's CPU kernel calls (kernels.load() returns it)
    opt.step()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision whose ecoptim/csrc is row A")
    ap.add_argument("--fmt", default="fp8_e4m3")
    ap.add_argument("--gran", default="row")
    ap.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1280)
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--states", default="fp32", choices=["fp32", "bf16", "8bit", "8bit-sr"],
                    help="optimizer state storage (8-bit states keep the NaN/Inf pre-check: nonfinite='skip')")
    ap.add_argument("--repeats", type=int, default=21)
    default_threads = "openmp" if kernels.openmp_runtime() else "pthreads"
    ap.add_argument("--a-threads", choices=["openmp", "pthreads"], default=default_threads)
    ap.add_argument("--b-threads", choices=["openmp", "pthreads"], default=default_threads)
    ap.add_argument("--after", choices=["nothing", "backward"], default="nothing",
                    help="what runs right before each timed step")
    args = ap.parse_args(argv)
    if kernels.load() is None:  # the package's own build: the op's kernel then finds a library to replace
        sys.exit("ecoptim's C kernels are unavailable here")
    own = kernels._lib
    with tempfile.TemporaryDirectory() as tmp:
        old_dir = checkout_sources(args.rev, Path(tmp) / "rev")
        libs = {f"kernel at {args.rev} ({args.a_threads})": build(old_dir, Path(tmp) / "a.so", args.a_threads),
                f"working tree ({args.b_threads})": build(cpu_build.SOURCE_DIR, Path(tmp) / "b.so", args.b_threads)}
        g = torch.Generator().manual_seed(0)
        shape = (args.rows, args.cols)
        mods = nn.ModuleList([nn.Linear(args.cols, args.rows, bias=False) for _ in range(args.tensors)])
        ecoptim.quantize_(mods, args.fmt, args.gran)
        for m in mods:
            m.weight.grad = torch.randn(shape, generator=g) * 1e-3
        states = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": ecoptim.State8bit(),
                  "8bit-sr": ecoptim.State8bit(rounding="stochastic")}[args.states]
        opt = ecoptim.AdamW(mods.parameters(), lr=1e-3, rounding=args.rounding, state_dtype=states,
                            nonfinite="skip" if args.states.startswith("8bit") else "skip_blocks")
        dense = [nn.Parameter(torch.randn(shape, generator=g) * 0.02) for _ in range(args.tensors)]
        for p in dense:
            p.grad = torch.randn(shape, generator=g) * 1e-3
        torch_opt = torch.optim.AdamW(dense, lr=1e-3, fused=True)
        mlp = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
        x = torch.randn(256, 512, generator=g)

        def before() -> None:
            if args.after == "backward":
                mlp(x).square().mean().backward()

        steppers = {"torch AdamW fused (fp32)": torch_opt.step}
        for name, lib in libs.items():
            steppers[name] = (lambda lib: lambda: stepping_with(lib, opt))(lib)
        times: dict[str, list[float]] = {k: [] for k in steppers}
        order = list(steppers)
        rnd = random.Random(0)
        for _ in range(2):  # warm-up
            for f in steppers.values():
                f()
        for _ in range(args.repeats):
            rnd.shuffle(order)  # no row always follows the same one
            for name in order:
                before()
                t = time.perf_counter()
                steppers[name]()
                times[name].append(time.perf_counter() - t)
        kernels._lib = own
    base = statistics.median(times["torch AdamW fused (fp32)"])
    print(f"{args.fmt}/{args.gran} {args.rounding}, {args.states} states, {args.tensors} x {args.rows}x{args.cols}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} rounds in random order, after {args.after}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:36s} {med * 1e3:7.1f} ms  {med / base:5.2f}x torch")


if __name__ == "__main__":
    main()
