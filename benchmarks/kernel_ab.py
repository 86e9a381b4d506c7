"""A/B timing of two builds of the fused C kernel (ecoptim/csrc/eco_cpu.c), side by side in one process.

    python benchmarks/kernel_ab.py --rev 0aea8c8                 # the kernel at a git revision vs the working tree
    python benchmarks/kernel_ab.py --rev 0aea8c8 --gran tensor --rounding stochastic
    python benchmarks/kernel_ab.py --rev HEAD --a-threads pthreads --after backward   # threads of its own vs
                                                                                  # torch's OpenMP pool

Both sources are compiled with the flags ecoptim uses and loaded side by side; one optimizer (FP8 ECO AdamW on
20 weights of 1024x1280 by default) is stepped round-robin with each library in turn, plus torch's fused
AdamW on the same shapes, so that machine noise hits every row alike. The NaN/Inf pre-check is switched off
(nonfinite='skip_blocks') so that the rows time the kernel itself, except with 8-bit states (``--states``),
which that policy does not offer. A revision with kernel ABI 6 (before
0.1's struct lost its fp8 grid fields, e.g. 0aea8c8) is driven through its own argument struct.
``--a-threads`` / ``--b-threads`` build a row with threads of its own (``pthreads``) or on torch's OpenMP pool
(``openmp``, the package's default where torch runs on libgomp); ``--after backward`` runs a forward/backward
pass of a small torch MLP before every timed step, as a training loop does (torch's pool is then still
spinning); the rows are taken in a fresh random order every round.
"""
from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ecoptim
from ecoptim import kernels
from ecoptim.optim import fused

ROOT = Path(__file__).resolve().parents[1]


class _ArgsV6(ctypes.Structure):
    """ABI 6's argument struct: today's plus each fp8 format's mantissa bits and emin after ``stochastic``."""

    _fields_ = (lambda f: f[:f.index(("stochastic", ctypes.c_int32)) + 1]
                + [("man_bits", ctypes.c_int32), ("emin", ctypes.c_int32)]
                + f[f.index(("stochastic", ctypes.c_int32)) + 1:])(list(kernels.EcoArgs._fields_))


def _stepper(lib: ctypes.CDLL):
    """fused.run's replacement that steps the jobs with ``lib`` (converting the arguments for ABI 6)."""
    abi = lib.eco_abi_version()
    if abi in (7, 8, 9, 10, 11, kernels._ABI):  # 8-12 only appended fields (8-bit states, master/exact
        # buffers, gscale, the kahan compensation)
        def run(jobs, skip_nonfinite=False):
            kernels._lib = lib
            return real_run(jobs, skip_nonfinite)
        return run
    if abi != 6:
        sys.exit(f"kernel ABI {abi} is neither this checkout's ({kernels._ABI}) nor 6")
    grid = {kernels.FMT_E4M3: (3, -6), kernels.FMT_E5M2: (2, -14)}

    def run_v6(jobs, skip_nonfinite=False):
        old = [_ArgsV6(**{name: getattr(j.args, name) for name, _ in kernels.EcoArgs._fields_}) for j in jobs]
        for a in old:
            a.man_bits, a.emin = grid.get(a.fmt, (0, 0))
        arr = (ctypes.POINTER(_ArgsV6) * len(old))(*[ctypes.pointer(a) for a in old])
        if lib.eco_step_many(arr, len(old), torch.get_num_threads()) != 0:
            raise MemoryError("kernel scratch")
        return [a.nonfinite for a in old]
    return run_v6


real_run = fused.run


def build(source: str, out: Path, threads: str) -> ctypes.CDLL:
    src = out.with_suffix(".c")
    src.write_text(source)
    omp = kernels.openmp_runtime() if threads == "openmp" else None
    if threads == "openmp" and omp is None:
        sys.exit("--*-threads openmp: torch's OpenMP runtime (libgomp) is not loaded in this process")
    kernels._compile(kernels.compiler(), kernels._flags(), omp, str(out), src)
    return kernels.declare(ctypes.CDLL(str(out)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision whose eco_cpu.c is row A")
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
    old_src = subprocess.run(["git", "show", f"{args.rev}:ecoptim/csrc/eco_cpu.c"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    new_src = (ROOT / "ecoptim" / "csrc" / "eco_cpu.c").read_text()
    kernels.load()  # the package's own build, so that fused.run finds a library to replace
    with tempfile.TemporaryDirectory() as tmp:
        libs = {f"kernel at {args.rev} ({args.a_threads})":
                _stepper(build(old_src, Path(tmp) / "a.so", args.a_threads)),
                f"working tree ({args.b_threads})": _stepper(build(new_src, Path(tmp) / "b.so", args.b_threads))}
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
        for name, step_with in libs.items():
            steppers[name] = (lambda f: lambda: (setattr(fused, "run", f), opt.step()))(step_with)
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
        fused.run = real_run
    base = statistics.median(times["torch AdamW fused (fp32)"])
    print(f"{args.fmt}/{args.gran} {args.rounding}, {args.states} states, {args.tensors} x {args.rows}x{args.cols}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} rounds in random order, after {args.after}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:36s} {med * 1e3:7.1f} ms  {med / base:5.2f}x torch")


if __name__ == "__main__":
    main()
