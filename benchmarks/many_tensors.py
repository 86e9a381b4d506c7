"""Thousands of tensors: ecoptim's training-loop step against torch's on the same shapes, side by side in one
process (issue #18 point 5).

    python benchmarks/many_tensors.py                                    # both cases, default sizes
    python benchmarks/many_tensors.py --tensors 40 --rows 8 --cols 64 --moe-experts 2 --moe-hidden 64 \\
        --moe-intermediate 32 --repeats 3 --warmup 1 --python-steps 3 --out /tmp/mt    # a quick try

Two cases, each stepping FP8 E4M3 weights with one absmax scale per row (``ecoptim.AdamW``, mode 'eco'):
  * ``uniform``: ``--tensors`` weights of ``--rows`` x ``--cols`` (default 2,000 of 64x512);
  * ``moe``: the expert weights of DeepSeek-MoE-16B's MoE layers, one ``nn.Linear`` per expert (the model the
    paper fine-tunes, and the layout with the most tensors): per layer ``--moe-experts`` routed experts (64 in the
    model), each gate_proj and up_proj [1408, 2048] and down_proj [2048, 1408], plus the shared experts' MLP
    (2 shared experts: intermediate 2 x 1408, [2816, 2048] and [2048, 2816]); ``--moe-layers`` such layers (27 in
    the model; 1 by default). The default of 16 routed experts keeps the run within ~6 GB; the model's full
    layer (``--moe-experts 64``) needs ~21 GB. The shapes are the model's (``--moe-hidden`` /
    ``--moe-intermediate`` shrink them for a quick try only).

Rows per case, all timed round-robin in one process (each round runs every row once, in a fresh random order;
reported: the median over ``--repeats`` rounds after ``--warmup``), the gradients the same random ones for all:
  * torch clip + step: ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` then ``torch.optim.AdamW(fused=True)``
    on fp32 copies of the weights (the gradients, which the clip rewrites, are restored before each round,
    untimed);
  * ecoptim clip + step, RTN and SR: ``opt.clip_grad_norm_(1.0)`` then ``opt.step()`` (the clip's norm pass is
    also the step's NaN/Inf check; its factor is applied inside the step);
  * the bare steps of both (ecoptim's default ``nonfinite='skip'`` includes its NaN/Inf pass over the
    gradients);
  * the Python part of ecoptim's step per parameter: ``opt.step()`` with the C kernel replaced by a no-op
    (``step_overhead.kernel_replaced_by_noop``) and ``nonfinite='skip_blocks'`` (no separate gradient pass),
    median over ``--python-steps`` steps, RTN and SR.
Ratios are to torch's row of the same kind (clip + step, or bare step). ``--processes N`` (N > 1) runs each case
in N fresh processes, one after the other, and reports per row the median time and the median, lowest and
highest of the N ratios: each process allocates its tensors anew, and on some hosts the speed of torch's
memory-bound step can change from one process to the next (see docs/performance-notes.md) while
staying steady within a process, so a single process's ratio can land anywhere in that range. The issue's
targets: the training loop's ratio (clip + step) at most 1.0x, the Python part at most 3 us per parameter.
Results go to ``<out>/many_tensors.json`` and ``<out>/many_tensors.md`` (default ``benchmarks/results``).
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
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import ecoptim
from report import machine_line, run_meta, write_report
from step_overhead import kernel_replaced_by_noop

MAX_NORM = 1.0
ROUNDINGS = (("nearest", "RTN"), ("stochastic", "SR"))


def uniform_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(args.rows, args.cols)] * args.tensors


def moe_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """DeepSeek-MoE-16B's expert weights ([out, in], as nn.Linear stores them), layer after layer: every routed
    expert's gate_proj, up_proj and down_proj, then the shared experts' MLP."""
    h, i = args.moe_hidden, args.moe_intermediate
    shared = args.moe_shared * i
    layer = [(i, h), (i, h), (h, i)] * args.moe_experts + ([(shared, h), (shared, h), (h, shared)] if shared else [])
    return layer * args.moe_layers


CASES: dict[str, Callable[[argparse.Namespace], list[tuple[int, int]]]] = {"uniform": uniform_shapes,
                                                                           "moe": moe_shapes}


def case_title(name: str, args: argparse.Namespace, shapes: list[tuple[int, int]]) -> str:
    numel = sum(r * c for r, c in shapes)
    if name == "uniform":
        what = f"{args.tensors} weights of {args.rows}x{args.cols}"
    else:
        what = (f"DeepSeek-MoE-style experts: {args.moe_layers} layer(s) x ({args.moe_experts} routed experts x 3 "
                f"Linears [{args.moe_intermediate}, {args.moe_hidden}] / [{args.moe_hidden}, {args.moe_intermediate}]"
                f"{f' + shared MLP of {args.moe_shared * args.moe_intermediate}' if args.moe_shared else ''}), "
                f"{len(shapes)} weights")
    return f"{name}: {what}, {numel / 1e6:.1f}M parameters"


def bytes_needed(shapes: list[tuple[int, int]]) -> int:
    # per parameter: the fp32 weights and gradients drawn (8), torch's fp32 weights, gradients and moments (16),
    # and per ecoptim optimizer (RTN, SR: each its own copy of the weights) FP8 codes and fp32 moments (9 each)
    return sum(r * c for r, c in shapes) * (8 + 16 + 18)


@dataclass
class Row:
    name: str
    kind: str  # "clip + step" or "step": the torch row of the same kind is its yardstick
    run: Callable[[], None]
    before: Callable[[], None] | None = None  # untimed, before each timed run


def build(shapes: list[tuple[int, int]], seed: int) -> tuple[list[Row], dict[str, ecoptim.AdamW]]:
    """The rows of one case, and ecoptim's optimizers by rounding (for the Python part)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]  # norm > 1 for any sizeable case: clipped
    dense = [nn.Parameter(w.clone()) for w in weights]
    for p, gr in zip(dense, grads):
        p.grad = gr.clone()
    torch_opt = torch.optim.AdamW(dense, lr=1e-3, weight_decay=0.1, fused=True)

    def restore_torch_grads() -> None:  # torch's clip rewrote them
        torch._foreach_copy_([p.grad for p in dense], grads)

    def torch_clip_step() -> None:
        nn.utils.clip_grad_norm_(dense, MAX_NORM)
        torch_opt.step()

    rows = [Row("torch AdamW fused (fp32) + clip", "clip + step", torch_clip_step, restore_torch_grads),
            Row("torch AdamW fused (fp32)", "step", torch_opt.step, restore_torch_grads)]
    opts = {}
    for rounding, tag in ROUNDINGS:
        layers = nn.ModuleList(nn.Linear(s[1], s[0], bias=False) for s in shapes)
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                layer.weight.copy_(w)
        ecoptim.quantize_(layers, "fp8_e4m3", "row")
        quantized = list(layers.parameters())
        for p, gr in zip(quantized, grads):
            p.grad = gr  # ecoptim reads the gradients and leaves them as they are: shared by both optimizers
        opt = ecoptim.AdamW(quantized, lr=1e-3, weight_decay=0.1, mode="eco", rounding=rounding)
        opts[rounding] = opt

        def clip_step(opt: ecoptim.AdamW = opt) -> None:
            opt.clip_grad_norm_(MAX_NORM)
            opt.step()
        rows.append(Row(f"ecoptim AdamW fp8_e4m3/row eco {tag} + clip", "clip + step", clip_step))
        rows.append(Row(f"ecoptim AdamW fp8_e4m3/row eco {tag}", "step", opt.step))
    return rows, opts


def time_rows(rows: list[Row], warmup: int, repeats: int, rnd: random.Random) -> dict[str, float]:
    """Median seconds per row over ``repeats`` rounds (after ``warmup``), each round every row once in a fresh
    random order."""
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    for k in range(warmup + repeats):
        for row in rnd.sample(rows, len(rows)):
            if row.before is not None:
                row.before()
            t = time.perf_counter()
            row.run()
            dt = time.perf_counter() - t
            if k >= warmup:
                times[row.name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def python_part(opt: ecoptim.AdamW, steps: int) -> float:
    """Seconds per parameter of ``opt.step()`` with the C kernel a no-op and no separate NaN/Inf pass (median
    over ``steps`` steps)."""
    n = sum(p.grad is not None for g in opt.param_groups for p in g["params"])
    policy, opt.nonfinite = opt.nonfinite, "skip_blocks"
    try:
        opt.step()  # one real step under this policy first (a plan is kept from one step to the next)
        times = []
        with kernel_replaced_by_noop():
            for _ in range(steps):
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
    finally:
        opt.nonfinite = policy
    return statistics.median(times) / n


# the options a case's child process (--processes) is given, as the parent got them
_FORWARDED = ("tensors", "rows", "cols", "moe_layers", "moe_experts", "moe_shared", "moe_hidden", "moe_intermediate",
              "warmup", "repeats", "python_steps", "threads", "seed")


def in_processes(case: str, args: argparse.Namespace, processes: int) -> list[list[dict]]:
    """The result rows of ``case`` run by this script in each of ``processes`` fresh processes, in turn."""
    runs = []
    for k in range(processes):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), "--cases", case, "--processes", "1", "--out", tmp]
            for name in _FORWARDED:
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            print(f"process {k + 1}/{processes}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(tmp, "many_tensors.json")) as f:
                runs.append(json.load(f)["results"])
    return runs


def across_processes(runs: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """The rows of several processes' runs of one case combined (median time; median, lowest and highest
    ratio; median Python part) and their table lines."""
    n = len(runs)
    rows_out, lines = [], ["| row | time (ms), median | vs torch (same kind): median [lowest, highest] |",
                           "|---|---:|---:|"]
    timed = [r for r in runs[0] if "ratio" in r]
    for first in timed:
        same = [next(r for r in run if r["row"] == first["row"]) for run in runs]
        ratios = [r["ratio"] for r in same]
        ms = statistics.median(r["ms"] for r in same)
        rows_out.append(dict(first, ms=ms, ratio=statistics.median(ratios), ratio_min=min(ratios),
                             ratio_max=max(ratios), ratios=ratios, processes=n))
        lines.append(f"| {first['row']} | {ms:.2f} | {statistics.median(ratios):.2f}x [{min(ratios):.2f}x, "
                     f"{max(ratios):.2f}x] |")
    python = []
    for first in (r for r in runs[0] if r["kind"] == "python"):
        us = statistics.median(next(r for r in run if r["row"] == first["row"])["us_per_param"] for run in runs)
        rows_out.append(dict(first, us_per_param=us, processes=n))
        python.append(f"{first['row'].rsplit(' ', 1)[-1]} {us:.2f} us per parameter tensor")
    lines += ["", f"Each row over {n} processes. Python part of ecoptim's step (C kernel a no-op, "
              f"nonfinite='skip_blocks'), median: " + ", ".join(python), ""]
    return rows_out, lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="uniform,moe", help="comma-separated: uniform, moe")
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--moe-layers", type=int, default=1)
    ap.add_argument("--moe-experts", type=int, default=16, help="routed experts per layer (DeepSeek-MoE-16B: 64)")
    ap.add_argument("--moe-shared", type=int, default=2, help="shared experts per layer (their MLP's intermediate "
                    "size is this times --moe-intermediate; 0: none)")
    ap.add_argument("--moe-hidden", type=int, default=2048)
    ap.add_argument("--moe-intermediate", type=int, default=1408)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--python-steps", type=int, default=21, help="steps timed for the Python part")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=1, help="run each case in this many fresh processes and "
                    "report the median and range of their ratios")
    ap.add_argument("--out", default="benchmarks/results", help="directory for many_tensors.json / .md ('' for "
                    "none)")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    for name in ("tensors", "rows", "cols", "moe_layers", "moe_experts", "moe_hidden", "moe_intermediate",
                 "repeats", "python_steps", "threads", "processes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.moe_shared < 0 or args.warmup < 0:
        ap.error("--moe-shared and --warmup must be >= 0")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rnd = random.Random(args.seed)
    meta = run_meta("many_tensors.py", argv, args.threads, max_norm=MAX_NORM, warmup=args.warmup,
                    repeats=args.repeats, python_steps=args.python_steps, processes=args.processes)
    rows_out: list[dict] = []
    lines = [machine_line(meta) + f". Command: `{meta['command']}`", ""]
    for case in cases:
        shapes = CASES[case](args)
        title = case_title(case, args, shapes)
        print(f"{title}; needs ~{bytes_needed(shapes) / 2 ** 30:.1f} GiB", flush=True)
        if args.processes > 1:
            case_rows, case_lines = across_processes(in_processes(case, args, args.processes))
            rows_out += case_rows
            lines += [f"### {title}", "", *case_lines]
            continue
        rows, opts = build(shapes, args.seed)
        medians = time_rows(rows, args.warmup, args.repeats, rnd)
        python_us = {tag: python_part(opts[rounding], args.python_steps) * 1e6 for rounding, tag in ROUNDINGS}
        yardstick = {r.kind: medians[r.name] for r in rows if r.name.startswith("torch")}
        lines += [f"### {title}", "", "| row | time (ms) | vs torch (same kind) |", "|---|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r.kind != "clip + step", r.name)):
            ratio = medians[r.name] / yardstick[r.kind]
            rows_out.append(dict(case=case, row=r.name, kind=r.kind, ms=medians[r.name] * 1e3, ratio=ratio,
                                 tensors=len(shapes), params=sum(a * b for a, b in shapes)))
            lines.append(f"| {r.name} | {medians[r.name] * 1e3:.2f} | {ratio:.2f}x |")
        lines += ["", "Python part of ecoptim's step (C kernel a no-op, nonfinite='skip_blocks'): " + ", ".join(
            f"{tag} {us:.2f} us per parameter tensor ({us * len(shapes) / 1e3:.2f} ms a step)"
            for tag, us in python_us.items()),
            ""]
        for tag, us in python_us.items():
            rows_out.append(dict(case=case, row=f"ecoptim Python part {tag}", kind="python", us_per_param=us,
                                 tensors=len(shapes), params=sum(a * b for a, b in shapes)))
        del rows, opts
    write_report(args.out or None, "many_tensors", meta, rows_out, lines)


if __name__ == "__main__":
    main()
