"""The GPU check in one command: bit-identity tests on the GPU, the optimizer-step benchmark, the FP8 matmul
path's memory, and the training app on GPU against CPU, checked against the GPU targets.

    python benchmarks/gpu_check.py                       # on a machine with one CUDA GPU (a few minutes)
    python benchmarks/gpu_check.py --device cpu --tiny   # dry run: every stage at toy sizes, on CPU

Stages (each recorded, a failing one does not stop the others):
  1. tests: pytest on tests/test_triton.py (where present), tests/test_device.py and tests/test_scaled_mm.py; on
     a GPU their CUDA cases run (the Triton kernels and the reference path against the CPU, bit for bit).
  2. optim_step: ``benchmarks/optim_step.py --device DEVICE`` (ecoptim against torch fused AdamW, torchao and
     torch-optimi where installed), its JSON and markdown beside this script's.
  3. fp8_matmul: one FP8 linear's forward + backward through the dequantize path and the FP8 matmul path
     (``ecoptim.qtensor.fp8_linear``): bytes held from forward to backward, peak bytes, and time on a GPU.
  4. compare: ``ecoptim compare`` on DEVICE and on CPU with the same settings, their tokens/s.
Targets (from issue 19; meaningful on an H100/H200-class GPU only):
  * FP8 ECO AdamW step (fp8_e4m3/row, eco, SR, fused) <= 0.85x torch fused fp32 AdamW's time;
  * the same step >= 70% of the device's measured copy bandwidth (algorithmic bytes / time);
  * compare's tokens/s on the device >= 20x the CPU's.
Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (default out: benchmarks/results/gpu_check) and prints
PASS/FAIL per target. Exit status: 1 if a test stage failed (or, with --require-targets, a target), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # optim_step.py and report.py, as when they run as scripts
sys.path.insert(0, str(ROOT))  # this checkout's ecoptim

import ecoptim  # noqa: E402
from ecoptim.qtensor import fp8_matmul  # noqa: E402

TEST_FILES = ("tests/test_triton.py", "tests/test_device.py", "tests/test_scaled_mm.py")
ECO_ROW = "ecoptim AdamW fp8_e4m3/row eco SR fused"
TORCH_ROW = "torch AdamW fused (fp32)"
TARGET_STEP_RATIO = 0.85
TARGET_COPY_FRACTION = 0.70
TARGET_COMPARE_SPEEDUP = 20.0


# -- 1. tests ----------------------------------------------------------------------------------------------------
def run_tests(selection: list[str], timeout: float) -> dict[str, Any]:
    """pytest on ``selection`` (files or node ids) in a subprocess; its counts and exit status."""
    if not selection:
        return {"selection": [], "returncode": 0, "summary": "skipped", "ok": True}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *selection]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}\ntimed out after {timeout:.0f} s", -1
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped)", ln)),
                   lines[-1] if lines else "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    return {"selection": selection, "command": " ".join(cmd), "returncode": rc, "summary": summary,
            "counts": counts, "seconds": time.perf_counter() - t, "ok": rc == 0, "tail": "\n".join(lines[-40:])}


# -- 2. optimizer step -------------------------------------------------------------------------------------------
def run_optim_step(device: str, tiny: bool, out: Path) -> dict[str, Any]:
    import optim_step
    # tiny: toy shapes and only the rows the targets read (plus the peers), to run in seconds
    size = (["--rows", "32", "--cols", "128", "--tensors", "2", "--repeats", "1", "--warmup", "1",
             "--only", f"{TORCH_ROW},{ECO_ROW},torchao,torch-optimi"] if tiny
            else ["--repeats", "10", "--warmup", "3"])
    argv = ["--device", device, *size, "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        meta, rows = optim_step.main(argv)
    finally:  # optim_step sets torch's thread count for its run; a caller's own setting comes back
        torch.set_num_threads(threads)
    return {"argv": argv, "meta": meta, "rows": rows}


# -- 3. FP8 matmul memory ----------------------------------------------------------------------------------------
def _cpu_bytes(fn: Callable[[], None], forward_mark: str) -> tuple[int, int]:
    """(peak, held after the ``forward_mark`` region) of the CPU allocator's live bytes during ``fn``, from torch's
    profiler (every allocation and free, in order). ``torch._scaled_mm``'s own scratch is left out of the peak:
    on CPU it widens its FP8 operands to fp32 internally, which a GPU's FP8 matmul does not; its result counts."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    inside = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == "aten::_scaled_mm"]
    end_forward = max(e.start_ns() + e.duration_ns() for e in events if e.name() == forward_mark)
    live = peak = 0
    held = None
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if held is None and t > end_forward:
            held = live
        live += nbytes
        if not any(a <= t <= b for a, b in inside):
            peak = max(peak, live)
    return peak, live if held is None else held


def linear_memory(device: str, n: int = 4096, k: int = 4096, tokens: int = 2048,
                  dtype: torch.dtype = torch.float32, repeats: int = 0) -> dict[str, Any]:
    """One ``n x k`` FP8 (E4M3, per-row) linear, forward and backward on ``tokens`` rows, through the dequantize
    path and the FP8 matmul path: bytes held from the end of forward to backward (what a deep model keeps per
    layer), peak bytes during forward + backward (both above what was allocated before), and on a GPU the median
    time of ``repeats`` runs. CPU: the allocator's events (``_cpu_bytes``); CUDA: torch.cuda's memory stats."""
    from torch.profiler import record_function
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # seeded here, leaving a caller's global RNG as it was
        torch.manual_seed(0)
        lin = ecoptim.quantize_(nn.Sequential(nn.Linear(k, n, bias=False)), "fp8_e4m3", "row",
                                filter_fn=lambda m, name: isinstance(m, nn.Linear))[0].to(dev, dtype)
        x = torch.randn(tokens, k, dtype=dtype).to(dev).requires_grad_(True)
        dy = torch.randn(tokens, n, dtype=dtype).to(dev)
    out: dict[str, Any] = {"shape": [n, k], "tokens": tokens, "dtype": str(dtype), "device": str(dev),
                           "dense_weight_bytes": n * k * torch.tensor([], dtype=dtype).element_size()}
    for name, enabled in (("dequantize", False), ("fp8", True)):
        def run() -> None:
            with record_function("forward"):
                y = lin(x)
            y.backward(dy)
        x.grad, lin.weight.grad = None, None
        try:
            with fp8_matmul(enabled):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                    y = lin(x)
                    held = torch.cuda.memory_allocated(dev) - base
                    y.backward(dy)
                    torch.cuda.synchronize(dev)
                    peak = torch.cuda.max_memory_allocated(dev) - base
                    del y
                    times = []
                    for _ in range(repeats):
                        x.grad, lin.weight.grad = None, None
                        torch.cuda.synchronize(dev)
                        t = time.perf_counter()
                        run()
                        torch.cuda.synchronize(dev)
                        times.append(time.perf_counter() - t)
                    out[name] = {"held_bytes": held, "peak_bytes": peak,
                                 "seconds": sorted(times)[len(times) // 2] if times else None}
                else:
                    peak, held = _cpu_bytes(run, "forward")
                    out[name] = {"held_bytes": held, "peak_bytes": peak, "seconds": None}
        except RuntimeError as e:  # e.g. a GPU without FP8 matmuls
            out[name] = {"error": str(e).splitlines()[0]}
    return out


# -- 4. compare --------------------------------------------------------------------------------------------------
def run_compare(device: str, tiny: bool, steps: int, out: Path, timeout: float) -> dict[str, Any]:
    """``ecoptim compare`` with the same settings on ``device`` and on CPU; tokens/s per method and their ratio."""
    settings = (["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
                 "--eval-batches", "1", "--methods", "fp8_eco_sr"] if tiny
                else ["--steps", str(steps), "--eval-every", str(steps), "--eval-batches", "1",
                      "--methods", "fp32_mw,fp8_eco_sr"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    runs: dict[str, Any] = {}
    for dev in dict.fromkeys([device, "cpu"]):
        run_out = out / f"compare_{dev.replace(':', '')}"
        cmd = [sys.executable, "-m", "ecoptim", "compare", *settings, "--device", dev, "--checkpoint-every", "0",
               "--quiet", "--out", str(run_out)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            rc, tail = -1, f"timed out after {timeout:.0f} s"
        run: dict[str, Any] = {"command": " ".join(cmd), "returncode": rc, "seconds": time.perf_counter() - t}
        if rc == 0:
            summary = json.loads((run_out / "results.json").read_text())["summary"]
            run["tokens_per_s"] = {r["method"]: r["tokens_per_s"] for r in summary}
        else:
            run["tail"] = tail
        runs[dev] = run
    speedup = {}
    if all("tokens_per_s" in r for r in runs.values()):
        speedup = {m: v / runs["cpu"]["tokens_per_s"][m] for m, v in runs[device]["tokens_per_s"].items()}
    return {"settings": settings, "runs": runs, "speedup_vs_cpu": speedup}


# -- targets and report ------------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: its measured value, the bound and pass/fail (None where its stage did not produce it)."""
    rows = {r["name"]: r for r in result.get("optim_step", {}).get("rows", [])}
    eco = rows.get(ECO_ROW)
    compare = result.get("compare", {}).get("speedup_vs_cpu", {})
    speed = compare.get("fp8_eco_sr")
    out = [
        ("FP8 ECO AdamW step time / torch fused fp32 AdamW", eco and eco.get("time_vs_torch_fused"),
         f"<= {TARGET_STEP_RATIO}", lambda v: v <= TARGET_STEP_RATIO),
        ("FP8 ECO AdamW step bandwidth / device copy bandwidth", eco and eco.get("copy_fraction"),
         f">= {TARGET_COPY_FRACTION:.0%}", lambda v: v >= TARGET_COPY_FRACTION),
        ("compare tokens/s (fp8_eco_sr) / CPU's", speed, f">= {TARGET_COMPARE_SPEEDUP:g}x",
         lambda v: v >= TARGET_COMPARE_SPEEDUP),
    ]
    return [{"target": name, "value": value, "bound": bound, "passed": None if value is None else bool(ok(value))}
            for name, value, bound, ok in out]


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def markdown(result: dict[str, Any]) -> list[str]:
    dry = " (dry run on CPU at toy sizes: not a GPU measurement)" if result["dry_run"] else ""
    lines = [f"# GPU check on {result['device_name']}{dry}", "",
             f"torch {result['torch']}, command `{result['command']}`", "", "## Targets", "",
             "| target | measured | bound | result |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        verdict = "not measured" if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
        lines.append(f"| {t['target']} | {v} | {t['bound']} | {verdict} |")
    lines += ["", "## Tests", ""]
    tests = result.get("tests", {})
    lines.append(f"`{' '.join(tests.get('selection', []))}`: {tests.get('summary', 'not run')}")
    mem = result.get("fp8_matmul")
    if mem:
        lines += ["", f"## FP8 matmul path: one {mem['shape'][0]}x{mem['shape'][1]} FP8 linear, {mem['tokens']} "
                  f"tokens, {mem['dtype']}", "",
                  "| path | held forward->backward (MiB) | peak (MiB) | time (ms) |", "|---|---:|---:|---:|"]
        for name in ("dequantize", "fp8"):
            r = mem.get(name, {})
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | |")
                continue
            ms = "n/a" if r.get("seconds") is None else f"{r['seconds'] * 1e3:.2f}"
            lines.append(f"| {name} | {_mib(r.get('held_bytes'))} | {_mib(r.get('peak_bytes'))} | {ms} |")
    step = result.get("optim_step")
    if step:
        lines += ["", "## Optimizer step", "", "| optimizer | step (ms) | vs torch fused | % of copy |",
                  "|---|---:|---:|---:|"]
        for r in step["rows"]:
            ratio = "n/a" if r.get("time_vs_torch_fused") is None else f"{r['time_vs_torch_fused']:.2f}x"
            lines.append(f"| {r['name']} | {r['step_s'] * 1e3:.2f} | {ratio} | {r['copy_fraction']:.0%} |")
    cmp_ = result.get("compare")
    if cmp_:
        lines += ["", "## ecoptim compare: tokens/s", "", "| device | method | tokens/s | vs CPU |",
                  "|---|---|---:|---:|"]
        for dev, run in cmp_["runs"].items():
            for m, v in run.get("tokens_per_s", {"(failed)": float("nan")}).items():
                sp = cmp_["speedup_vs_cpu"].get(m) if dev != "cpu" else 1.0
                lines.append(f"| {dev} | {m} | {v:.0f} | {'n/a' if sp is None else f'{sp:.1f}x'} |")
    errors = result.get("errors", {})
    if errors:
        lines += ["", "## Stages that failed", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the GPU to check (default cuda); cpu for a dry run")
    ap.add_argument("--tiny", action="store_true", help="toy sizes everywhere (a dry run that the script works)")
    ap.add_argument("--tests", nargs="*", default=None,
                    help="pytest files or node ids for stage 1 (default: the test files that exist of "
                         f"{', '.join(TEST_FILES)}; none given: skip the stage)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: tests,optim_step,fp8_matmul,compare")
    ap.add_argument("--compare-steps", type=int, default=50, help="training steps of each compare run (default 50)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed to the tests and to each compare run")
    ap.add_argument("--require-targets", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run with --device cpu "
                 "--tiny for a dry run")
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"tests", "optim_step", "fp8_matmul", "compare"}
    if unknown:
        ap.error(f"--skip: unknown stages {sorted(unknown)}; use tests, optim_step, fp8_matmul, compare")
    args.out.mkdir(parents=True, exist_ok=True)
    selection = ([f for f in TEST_FILES if (ROOT / f).exists()] if args.tests is None else args.tests)
    result: dict[str, Any] = {
        "device": str(device), "dry_run": device.type != "cuda" or args.tiny, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "errors": {}}
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("tests", lambda: run_tests(selection, args.timeout)),
        ("optim_step", lambda: run_optim_step(str(device), args.tiny, args.out)),
        ("fp8_matmul", lambda: linear_memory(str(device), *((256, 256, 64) if args.tiny else (4096, 4096, 2048)),
                                             repeats=0 if device.type != "cuda" else 10)),
        ("compare", lambda: run_compare(str(device), args.tiny, args.compare_steps, args.out, args.timeout)),
    ]
    for name, stage in stages:
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        try:
            result[name] = stage()
        except Exception as e:  # noqa: BLE001 - recorded; the other stages still run
            result["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    result["targets"] = targets(result)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = markdown(result)
    (args.out / "gpu_check.md").write_text("\n".join(lines))
    print("\n".join(lines))
    for t in result["targets"]:
        verdict = "not measured" if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        print(f"{verdict:>12s}  {t['target']}: {value} (bound {t['bound']})")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    failed = not result.get("tests", {"ok": True})["ok"] or bool(result["errors"])
    missed = any(t["passed"] is False for t in result["targets"])
    return 1 if failed or (args.require_targets and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
