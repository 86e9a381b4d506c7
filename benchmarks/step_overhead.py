"""The Python side of an ecoptim step (everything but the kernel) per parameter: a git revision against the
working tree, interleaved in time.

    python benchmarks/step_overhead.py --rev c17b23b                       # 400 weights of 64x1024
    python benchmarks/step_overhead.py --rev c17b23b --tensors 2000 --rows 16

Each round starts one measuring process per side (the package at ``--rev``, extracted with ``git archive``, or the
working tree), in a fresh random order, so that the machine's drift hits both alike. A measuring process builds
FP8 ECO AdamW (``nonfinite='skip_blocks'``: no NaN/Inf pre-check, whose own cost is one C call) on ``--tensors``
weights, replaces the C kernel (``eco_step_many``) by a no-op (``kernel_replaced_by_noop``, which
``many_tensors.py`` uses too), and times ``opt.step()``: what is left is the Python part of the step, per
parameter (applicability, state, step counts, stochastic-rounding keys, the op call and the packing of its
arguments). As a yardstick it also times torch's fused AdamW, kernel included, on the same shapes. Reported:
medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def _median_time(step, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextmanager
def kernel_replaced_by_noop() -> Iterator[None]:
    """Within the block, the fused step's C kernel (``eco_step_many`` of the library ``ecoptim.kernels.load()``
    returns) does nothing and reports success; every other C function (gradient checks, norms) is the real one.
    A step then costs its Python part alone, the op call and the packing of its arguments included."""
    from ecoptim import kernels

    lib = kernels.load()
    if lib is None:
        raise RuntimeError("ecoptim's C kernels are unavailable on this machine: nothing to replace")

    class NoKernel:
        def __getattr__(self, name: str):
            return getattr(lib, name)

        @staticmethod
        def eco_step_many(*args) -> int:
            return 0

    real = kernels.load
    kernels.load = lambda: NoKernel()
    try:
        yield
    finally:
        kernels.load = real


def measure(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from torch import nn

    import ecoptim

    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    mods = nn.ModuleList([nn.Linear(args.cols, args.rows, bias=False) for _ in range(args.tensors)])
    ecoptim.quantize_(mods, "fp8_e4m3", "row")
    for m in mods:
        m.weight.grad = torch.randn(shape, generator=g) * 1e-3
    dense = [nn.Parameter(torch.randn(shape, generator=g) * 0.02) for _ in range(args.tensors)]
    for p in dense:
        p.grad = torch.randn(shape, generator=g) * 1e-3
    torch_opt = torch.optim.AdamW(dense, lr=1e-3, fused=True)
    out = {}
    for rounding in ("nearest", "stochastic"):
        opt = ecoptim.AdamW(mods.parameters(), lr=1e-3, rounding=rounding, nonfinite="skip_blocks")
        opt.step()  # state created, kernel built and run once
        with kernel_replaced_by_noop():
            out[rounding] = _median_time(opt.step, args.steps) / args.tensors * 1e6
    out["torch_ms"] = _median_time(torch_opt.step, args.steps) * 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="git revision whose package is the other side")
    ap.add_argument("--tensors", type=int, default=400)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=21, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=5, help="processes per side")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    if not args.rev:
        ap.error("--rev is required")
    child = [sys.executable, __file__, "--child", "--tensors", str(args.tensors), "--rows", str(args.rows),
             "--cols", str(args.cols), "--steps", str(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.rev, "ecoptim"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        sides = {f"package at {args.rev}": tmp, "working tree": str(ROOT)}
        results: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        rnd = random.Random(0)
        for _ in range(args.rounds):
            for name in rnd.sample(list(sides), len(sides)):
                env = dict(os.environ, PYTHONPATH=sides[name])
                res = subprocess.run(child, env=env, check=True, capture_output=True, text=True)
                results[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{args.tensors} FP8 ECO AdamW weights of {args.rows}x{args.cols}, {os.cpu_count()} CPUs; medians of "
          f"{args.rounds} processes per side, each the median of {args.steps} steps")
    for name, rs in results.items():
        torch_ms = statistics.median(r["torch_ms"] for r in rs)
        cells = []
        for rounding, tag in (("nearest", "RTN"), ("stochastic", "SR")):
            us = statistics.median(r[rounding] for r in rs)
            cells.append(f"{tag} {us:5.1f} us/param ({us * args.tensors / 1e3:5.2f} ms a step)")
        print(f"{name:24s} Python part: {', '.join(cells)}; torch fused AdamW whole step {torch_ms:.2f} ms")


if __name__ == "__main__":
    main()
