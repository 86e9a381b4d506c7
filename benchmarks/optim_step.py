"""Optimizer-step benchmark: ecoptim against torch.optim, torchao and torch-optimi, side by side.

    python benchmarks/optim_step.py                      # ~25M parameters in 20 tensors
    python benchmarks/optim_step.py --rows 512 --cols 640 --tensors 8 --repeats 3   # quick
    python benchmarks/optim_step.py --device cuda        # on a GPU (what benchmarks/gpu_check.py runs)

Every configuration steps the same shapes in one process, one after the other, and is timed as the median
of ``--repeats`` steps after ``--warmup`` steps, round-robin over the configurations. Reported per row:
  * step time and its ratio to torch's fused implementation of the same optimizer on fp32 weights, and for
    ecoptim the part of it spent checking the gradients for NaN/Inf (timed separately, same round);
  * achieved bandwidth = algorithmic bytes read + written per step / time, and its fraction of a plain
    tensor copy measured on the same machine in the same run (the practical limit). Algorithmic bytes are
    what the update must touch once: weights (stored dtype), grads, states, scales; a multi-pass
    implementation moves more, which is exactly what the fraction exposes;
  * static bytes/param from ecoptim.memory_report (weights + scales + optimizer state, real storage).
Rows marked "+ clip" time gradient clipping (max norm 1.0, which these gradients exceed) and the step together,
as a training loop runs them: torch.nn.utils.clip_grad_norm_ (a norm pass, then every gradient rewritten) before
torch's step, ecoptim's ``opt.clip_grad_norm_`` (one norm pass that is also the NaN/Inf check; the factor is
applied inside the step) before ecoptim's; their ratio is to "torch AdamW fused (fp32) + clip".
``--device cuda`` puts weights, gradients and states on the GPU and synchronizes around every timed step.
Results go to ``<out>/optim_step.json`` and ``<out>/optim_step.md``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import ecoptim
from ecoptim.optim import QuantOptimizer
from report import machine_line, run_meta, write_report


@dataclass
class Config:
    name: str
    build: Callable[[list[torch.Tensor]], tuple[nn.Module, torch.optim.Optimizer]]
    bytes_per_param: float  # algorithmic bytes read + written per parameter per step
    clip: bool = False  # time gradient clipping + step (see the module docstring)


MAX_NORM = 1.0


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, clip: bool) -> None:
    if clip and isinstance(opt, QuantOptimizer):
        opt.clip_grad_norm_(MAX_NORM)
    elif clip:
        nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously: a step's time is only known after it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device's queue drained before and after."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def _model(weights: list[torch.Tensor], dtype: torch.dtype) -> nn.Module:
    m = nn.Module()
    m.layers = nn.ModuleList()
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w.to(dtype).clone())
        m.layers.append(lin)
    return m


def _set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(p.dtype)


def configs(args: argparse.Namespace) -> list[Config]:
    hp = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
    def torch_fused(w):
        m = _model(w, torch.float32)
        return m, torch.optim.AdamW(m.parameters(), fused=True, **hp)

    out = [
        Config("torch AdamW fused (fp32)", torch_fused, 28),
        Config("torch AdamW foreach (fp32)", lambda w: (lambda m: (m, torch.optim.AdamW(m.parameters(), foreach=True, **hp)))(
            _model(w, torch.float32)), 28),
    ]
    try:
        from torchao.optim import _AdamW as AoAdamW
        out.append(Config("torchao _AdamW bf16 SR (bf16 w, fp32 states)", lambda w: (lambda m: (m, AoAdamW(
            m.parameters(), bf16_stochastic_round=True, **hp)))(_model(w, torch.bfloat16)), 2 + 2 + 2 + 16))
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"torchao unavailable: {e}")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit
        out.append(Config("torchao AdamW8bit (fp32 w, 8-bit states)", lambda w: (lambda m: (m, AoAdamW8bit(
            m.parameters(), **hp)))(_model(w, torch.float32)), 4 + 4 + 4 + 4 * (1 + 4 / 256)))
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"torchao AdamW8bit unavailable: {e}")
    try:
        import optimi
        out.append(Config("torch-optimi AdamW kahan (bf16 w, bf16 states)", lambda w: (lambda m: (m, optimi.AdamW(
            m.parameters(), kahan_sum=True, lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1,
            decouple_lr=False)))(_model(w, torch.bfloat16)), 2 + 2 + 2 + 8 + 4))
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"torch-optimi unavailable: {e}")

    def eco(fmt: str, gran: str | None, mode: str, rounding: str, fused: bool, state_dtype=torch.float32,
            nonfinite: str = "skip", clip: bool = False):
        def build(w):
            m = ecoptim.quantize_(_model(w, torch.float32), fmt, gran, filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
            return m, ecoptim.AdamW(m.parameters(), mode=mode, rounding=rounding, fused=None if fused else False,
                                    state_dtype=state_dtype, nonfinite=nonfinite, **hp)
        wb = {"fp8_e4m3": 1, "int8": 1, "int4": 0.5, "bf16": 2}[fmt]
        eight = isinstance(state_dtype, ecoptim.State8bit)
        sb = 1 + 4 / state_dtype.block_size if eight else 2 if state_dtype == torch.bfloat16 else 4
        extra = {"master": 8, "exact": 8, "kahan": 2 * wb}.get(mode, 0)
        states = (f" 8bit-states{'-SR' if state_dtype.rounding == 'stochastic' else ''}" if eight
                  else " bf16-states" if state_dtype == torch.bfloat16 else "")
        name = (f"ecoptim AdamW {fmt}{'/' + gran if gran else ''} {mode} {'SR' if rounding == 'stochastic' else 'RTN'}"
                f"{' fused' if fused else ' reference'}{states}"
                f"{' skip_blocks' if nonfinite == 'skip_blocks' else ''}{' + clip' if clip else ''}")
        # + clip: the norm pass reads every gradient once more
        return Config(name, build, 2 * wb + 4 + 4 * sb + extra + 4 * clip, clip)

    for rounding in ("nearest", "stochastic"):
        out.append(eco("fp8_e4m3", "row", "eco", rounding, True))
    for rounding in ("nearest", "stochastic"):  # no separate NaN/Inf pass: torch.optim's cost model
        out.append(eco("fp8_e4m3", "row", "eco", rounding, True, nonfinite="skip_blocks"))
    # gradient clipping + step, as training loops run them
    out.append(Config("torch AdamW fused (fp32) + clip", torch_fused, 28 + 4 + 8, clip=True))
    for rounding in ("nearest", "stochastic"):
        out.append(eco("fp8_e4m3", "row", "eco", rounding, True, clip=True))
    for rounding in ("nearest", "stochastic"):
        out.append(eco("fp8_e4m3", "row", "eco", rounding, True, torch.bfloat16))
    out.append(eco("fp8_e4m3", "tensor", "eco", "stochastic", True))
    out.append(eco("fp8_e4m3", "row", "naive", "stochastic", True))
    out.append(eco("int8", "row", "eco", "stochastic", True))
    out.append(eco("int4", "group128", "eco", "stochastic", True))
    out.append(eco("bf16", None, "eco", "stochastic", True))
    out.append(eco("bf16", None, "eco", "stochastic", True, torch.bfloat16))
    for rounding in ("nearest", "stochastic"):
        out.append(eco("fp8_e4m3", "row", "eco", rounding, False))
    for mode in ("master", "exact", "kahan"):
        out.append(eco("fp8_e4m3", "row", mode, "stochastic", True))
    # torch-optimi's configuration (bf16 weights, bf16 states, a bf16 Kahan compensation) in ecoptim
    out.append(eco("bf16", None, "kahan", "nearest", True, torch.bfloat16))
    for mode in ("master", "exact", "kahan"):
        out.append(eco("fp8_e4m3", "row", mode, "stochastic", False))
    for sd in (ecoptim.State8bit(), ecoptim.State8bit(rounding="stochastic")):  # decode, kernel, encode per tensor
        out.append(eco("fp8_e4m3", "row", "eco", "stochastic", True, sd))

    # SGD with momentum: the other optimizer with a fused path
    sgd_hp = dict(lr=1e-2, momentum=0.9, weight_decay=0.0)
    out.append(Config("torch SGD momentum fused (fp32)", lambda w: (lambda m: (m, torch.optim.SGD(
        m.parameters(), fused=True, **sgd_hp)))(_model(w, torch.float32)), 20))

    def eco_sgd(w):
        m = ecoptim.quantize_(_model(w, torch.float32), "fp8_e4m3", "row",
                              filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
        return m, ecoptim.SGD(m.parameters(), mode="eco", rounding="stochastic", **sgd_hp)
    out.append(Config("ecoptim SGD fp8_e4m3/row eco SR fused", eco_sgd, 2 + 4 + 8))
    return out


def copy_bandwidth(numel: int, repeats: int, device: torch.device | str = "cpu") -> float:
    """Bytes per second of a plain fp32 copy of ``numel`` elements on ``device`` (read + write)."""
    device = torch.device(device)
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(repeats + 2)]
    return 2 * 4 * numel / statistics.median(times[2:])


def main(argv: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Run the benchmark; returns (meta, rows), also written as JSON and markdown (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1280)
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="where weights, gradients and states live: cpu or cuda")
    ap.add_argument("--only", default="", help="comma-separated substrings; run only matching configurations")
    ap.add_argument("--out", default=None, help="directory for the JSON and markdown reports (default: "
                    "benchmarks/results, or none with --only: a partial run never replaces the full one)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)  # drawn on CPU: the same values on every device
    weights = [(torch.randn(args.rows, args.cols, generator=g) * 0.02).to(device) for _ in range(args.tensors)]
    grads = [(torch.randn(args.rows, args.cols, generator=g) * 1e-3).to(device) for _ in range(args.tensors)]
    numel = args.rows * args.cols * args.tensors
    bw_copy = copy_bandwidth(args.rows * args.cols * args.tensors, args.repeats, device)
    print(f"{numel / 1e6:.1f}M parameters in {args.tensors} tensors on {device}; copy bandwidth "
          f"{bw_copy / 1e9:.2f} GB/s; {args.threads} threads")
    # Build every configuration first, then time them round-robin (one step of each per round, in a fresh
    # random order), so that machine noise (other processes, frequency changes, torch's OpenMP workers still
    # spinning after the previous row) is spread over all rows instead of hitting one.
    built = []
    for cfg in configs(args):
        if args.only and not any(s in cfg.name for s in args.only.split(",")):
            continue
        model, opt = cfg.build(weights)
        _set_grads(model, grads)
        for _ in range(args.warmup):
            clip_and_step(model, opt, cfg.clip)
        built.append((cfg, model, opt, []))
    check_times: dict[str, list[float]] = {cfg.name: [] for cfg, *_ in built}
    rnd = random.Random(0)
    for _ in range(args.repeats):
        # a fresh order every round: no row always runs right after the same one
        for cfg, model, opt, times in rnd.sample(built, len(built)):
            times.append(timed(lambda: clip_and_step(model, opt, cfg.clip), device))
            if isinstance(opt, QuantOptimizer) and opt.nonfinite != "skip_blocks" and not cfg.clip:  # its NaN/Inf pass
                check_times[cfg.name].append(timed(opt._grads_finite, device))
    rows = []
    for cfg, model, opt, times in built:
        dt = statistics.median(times)
        mem = ecoptim.memory_report(model, opt)
        check = statistics.median(check_times[cfg.name]) if check_times[cfg.name] else None
        row = dict(name=cfg.name, step_s=dt, nonfinite_check_s=check, bytes_per_param_moved=cfg.bytes_per_param,
                   bandwidth_gbs=cfg.bytes_per_param * numel / dt / 1e9,
                   copy_fraction=cfg.bytes_per_param * numel / dt / bw_copy,
                   static_bytes_per_param=mem.bytes_per_param)
        rows.append(row)
        print(f"{cfg.name:60s} {dt * 1e3:9.1f} ms  {row['bandwidth_gbs']:6.2f} GB/s ({row['copy_fraction']:.0%} of copy)"
              f"  {row['static_bytes_per_param']:.3f} B/param")
    del built
    base = next((r["step_s"] for r in rows if r["name"] == "torch AdamW fused (fp32)"), None)
    base_clip = next((r["step_s"] for r in rows if r["name"] == "torch AdamW fused (fp32) + clip"), None)
    base_sgd = next((r["step_s"] for r in rows if r["name"].startswith("torch SGD")), None)
    for r in rows:  # each optimizer against torch's fused implementation of the same optimizer (and clipping)
        b = base_sgd if "SGD" in r["name"] else base_clip if r["name"].endswith("+ clip") else base
        r["time_vs_torch_fused"] = r["step_s"] / b if b else None
    meta = run_meta("optim_step.py", argv, args.threads, numel=numel, tensors=args.tensors,
                    shape=[args.rows, args.cols], copy_bandwidth_gbs=bw_copy / 1e9, repeats=args.repeats,
                    warmup=args.warmup, device=str(device),
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    lines = [f"{machine_line(meta)}; "
             f"{numel / 1e6:.1f}M params in {args.tensors} tensors of {args.rows}x{args.cols} on "
             f"{meta['device_name']}; plain copy "
             f"{bw_copy / 1e9:.2f} GB/s. Command: `{meta['command']}`", "",
             "| optimizer | step (ms) | of which NaN/Inf check (ms) | time vs torch fused | GB/s | % of copy | "
             "static B/param |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "n/a" if r["time_vs_torch_fused"] is None else f"{r['time_vs_torch_fused']:.2f}x"
        check = "-" if r["nonfinite_check_s"] is None else f"{r['nonfinite_check_s'] * 1e3:.1f}"
        lines.append(f"| {r['name']} | {r['step_s'] * 1e3:.1f} | {check} | {ratio} | "
                     f"{r['bandwidth_gbs']:.2f} | {r['copy_fraction']:.0%} | {r['static_bytes_per_param']:.3f} |")
    write_report(args.out or (None if args.only else "benchmarks/results"), "optim_step", meta, rows, lines)
    return meta, rows


if __name__ == "__main__":
    main()
