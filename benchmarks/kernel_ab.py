"""A/B timing of two builds of the fused C kernel (ecoptim/csrc/eco_cpu.c), side by side in one process.

    python benchmarks/kernel_ab.py --rev 0aea8c8                 # the kernel at a git revision vs the working tree
    python benchmarks/kernel_ab.py --rev 0aea8c8 --gran tensor --rounding stochastic

Both sources are compiled with the flags ecoptim uses and loaded side by side; one optimizer (FP8 ECO AdamW on
20 weights of 1024x1280 by default) is stepped round-robin with each library in turn, plus torch's fused
AdamW on the same shapes, so that machine noise hits every row alike. The NaN/Inf pre-check is switched off
(nonfinite='skip_blocks') so that the rows time the kernel itself. A revision with kernel ABI 6 (before
0.1's struct lost its fp8 grid fields, e.g. 0aea8c8) is driven through its own argument struct.
"""
from __future__ import annotations

import argparse
import ctypes
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
    if abi in (7, 8, 9, 10, kernels._ABI):  # 8-11 only appended fields (8-bit states, master/exact buffers, gscale)
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


def build(source: str, out: Path) -> ctypes.CDLL:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([kernels.compiler(), *kernels._flags(), "-o", str(out), str(src), "-lm"], check=True)
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
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args(argv)
    old_src = subprocess.run(["git", "show", f"{args.rev}:ecoptim/csrc/eco_cpu.c"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    new_src = (ROOT / "ecoptim" / "csrc" / "eco_cpu.c").read_text()
    kernels.load()  # the package's own build, so that fused.run finds a library to replace
    with tempfile.TemporaryDirectory() as tmp:
        libs = {f"kernel at {args.rev}": _stepper(build(old_src, Path(tmp) / "a.so")),
                "kernel in working tree": _stepper(build(new_src, Path(tmp) / "b.so"))}
        g = torch.Generator().manual_seed(0)
        shape = (args.rows, args.cols)
        mods = nn.ModuleList([nn.Linear(args.cols, args.rows, bias=False) for _ in range(args.tensors)])
        ecoptim.quantize_(mods, args.fmt, args.gran)
        for m in mods:
            m.weight.grad = torch.randn(shape, generator=g) * 1e-3
        opt = ecoptim.AdamW(mods.parameters(), lr=1e-3, rounding=args.rounding, nonfinite="skip_blocks")
        dense = [nn.Parameter(torch.randn(shape, generator=g) * 0.02) for _ in range(args.tensors)]
        for p in dense:
            p.grad = torch.randn(shape, generator=g) * 1e-3
        torch_opt = torch.optim.AdamW(dense, lr=1e-3, fused=True)
        times: dict[str, list[float]] = {"torch AdamW fused (fp32)": [], **{k: [] for k in libs}}
        for _ in range(2):  # warm-up
            torch_opt.step()
            for step_with in libs.values():
                fused.run = step_with
                opt.step()
        for _ in range(args.repeats):
            t = time.perf_counter()
            torch_opt.step()
            times["torch AdamW fused (fp32)"].append(time.perf_counter() - t)
            for name, step_with in libs.items():
                fused.run = step_with
                t = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["torch AdamW fused (fp32)"])
    print(f"{args.fmt}/{args.gran} {args.rounding}, {args.tensors} x {args.rows}x{args.cols}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} round-robin rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med * 1e3:7.1f} ms  {med / base:5.2f}x torch")


if __name__ == "__main__":
    main()
