"""Soak test: train the compare model under random kills for a bounded time; the result must equal an
uninterrupted run bit for bit.

A worker process trains the compare model (LlamaLM, FP8 E4M3 per-row block linears, ecoptim AdamW ECO +
stochastic rounding, weight-decay groups, warm-up + cosine LR, gradient clipping) with a
``PreemptionGuard`` and a ``CheckpointManager`` (a checkpoint every ``--every`` steps). For ``--budget``
seconds this script kills it at random steps, SIGKILL (no chance to save; mid-step or mid-save, which
leaves a temporary file) or SIGTERM (the guard saves and exits), and restarts it each time; the worker
resumes from the newest intact checkpoint. After the budget the worker runs to ``--steps`` undisturbed.
Then the same training runs uninterrupted in this process and every tensor (codes, scales, dense
parameters, optimizer state, SR generator state) is compared.

    python benchmarks/soak.py --budget 60                       # writes benchmarks/results/soak.json
    python benchmarks/soak.py --budget 600 --steps 5000 --every 7 --seed 3 --out /tmp/soak.json

Reports restarts survived (by signal), the steps each restart resumed from, the work redone, and the
differing tensors with their largest absolute difference (there must be none: ``identical: true``).
The process exits with status 1 if anything differs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ecoptim.convert import quantize_
from ecoptim.model import LlamaConfig, LlamaLM, is_block_linear
from ecoptim.optim import AdamW
from ecoptim.qtensor import QuantizedTensor
from ecoptim.resilience import CheckpointManager, PreemptionGuard

# the compare recipe (ecoptim's experiment app): AdamW betas, eps, decoupled weight decay, clipping norm
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.98), 1e-9, 0.1, 1.0
CFG = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=64)
BATCH, SEQ, LR = 8, 32, 3e-3


def _tokens() -> torch.Tensor:
    try:
        from ecoptim.corpus import load_split
        return load_split("shakespeare", "train").long()
    except Exception:  # the corpus is optional here: byte tokens of any fixed text exercise the same faults
        return torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0))


def batch(data: torch.Tensor, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a function of (seed, step) alone, so a resumed run needs no loader state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=g)
    x = torch.stack([data[s:s + SEQ] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + SEQ + 1] for s in starts.tolist()])
    return x, y


def build(steps: int, seed: int) -> tuple[nn.Module, AdamW, LambdaLR]:
    torch.manual_seed(seed)
    model = LlamaLM(CFG)
    quantize_(model, "fp8_e4m3", "row", filter_fn=is_block_linear)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                lr=LR, betas=BETAS, eps=EPS, mode="eco", rounding="stochastic", seed=seed, nonfinite="skip")
    warmup = max(1, steps // 10)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

    return model, opt, LambdaLR(opt, lr_at)


def snapshot(model: nn.Module, opt: AdamW) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if isinstance(p, QuantizedTensor):
            out[n + ".codes"] = p.codes.reshape(-1).view(torch.uint8).clone()
            out[n + ".scale"] = p.scale.clone()
        else:
            out[n] = p.detach().clone()
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"state.{names[id(p)]}.{k}"] = v.detach().clone()
    out["rng"] = opt.generator(torch.device("cpu")).get_state().clone()
    return out


def train(directory: str | None, steps: int, every: int, seed: int, report: bool = False) -> dict[str, torch.Tensor]:
    """Train to ``steps`` (resuming from ``directory``'s newest intact checkpoint if given)."""
    data = _tokens()
    model, opt, sched = build(steps, seed)
    manager = CheckpointManager(directory, keep=2) if directory else None
    with PreemptionGuard() as guard:
        info = manager.load_latest(model, opt, sched) if manager else None
        step = 0 if info is None else info["step"]
        if report:
            print(f"start {step}", flush=True)
        model.train()
        while step < steps:
            x, y = batch(data, step, seed)
            _, loss = model(x, y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if report:
                print(f"step {step}", flush=True)
            if manager and (step % every == 0 or guard.should_stop()):
                manager.save(step, model, opt, sched)
            if guard.should_stop():
                sys.exit(guard.exit_code)
    return snapshot(model, opt)


def soak(budget: float, steps: int, every: int, seed: int, max_span: int) -> dict:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="ecoptim-soak-"))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--dir", str(work), "--steps", str(steps),
           "--every", str(every), "--seed", str(seed)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    resumed_from: list[int] = []  # the step each attempt started from
    reached: list[int] = []  # the last step each attempt finished
    torn_saves = 0
    while True:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        sent, target, lines = None, None, []
        for line in proc.stdout:
            line = line.strip()
            lines.append(line)
            if line.startswith("start ") and time.monotonic() - t0 < budget:
                target = int(line.split()[1]) + rng.randint(1, max_span)
            if target is not None and sent is None and line == f"step {target}":
                # right after the worker printed step N: in N's checkpoint save when N is a multiple of
                # --every, else in step N + 1; a short random delay spreads the kill further
                time.sleep(rng.uniform(0.0, 0.05))
                sent = rng.choice(["SIGKILL", "SIGKILL", "SIGTERM"])
                proc.send_signal(getattr(signal, sent))
        proc.wait()
        torn_saves += bool(list(work.glob(".*.tmp")))  # killed mid-save: its temporary file is left
        starts = [ln for ln in lines if ln.startswith("start ")]
        done = [int(ln.split()[1]) for ln in lines if ln.startswith("step ")]
        if starts:
            resumed_from.append(int(starts[0].split()[1]))
            reached.append(done[-1] if done else resumed_from[-1])
        if proc.returncode == 0:
            break
        expected = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 128 + signal.SIGTERM}.get(sent)
        if proc.returncode != expected:
            raise RuntimeError(f"worker failed with status {proc.returncode} (sent {sent}):\n"
                               + "\n".join(lines[-30:]))
        kills[sent] += 1
    wall = time.monotonic() - t0
    got = torch.load(work / "final.pt", weights_only=True)
    ref = train(None, steps, every, seed)
    differing = {k: float((got[k].double() - ref[k].double()).abs().max()) for k in ref
                 if k in got and not torch.equal(got[k], ref[k])}
    stray = sorted(p.name for p in work.iterdir() if p.name.endswith(".tmp"))
    shutil.rmtree(work, ignore_errors=True)
    return {"steps": steps, "every": every, "seed": seed, "budget_s": budget, "wall_s": round(wall, 1),
            "restarts_survived": sum(kills.values()), "kills": kills,
            "kills_mid_save": torn_saves, "resumed_from": resumed_from[1:],
            "steps_redone": sum(a - b for a, b in zip(reached, resumed_from[1:])),
            "tensors_compared": len(ref), "differing_tensors": differing,
            "max_abs_diff": max(differing.values(), default=0.0),
            "identical": not differing and got.keys() == ref.keys(),
            "stray_temp_files_at_end": stray}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds during which kills happen")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-span", type=int, default=40, help="most steps a worker runs before its kill")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.worker:
        final = train(a.dir, a.steps, a.every, a.seed, report=True)
        torch.save(final, Path(a.dir) / "final.pt")
        return
    result = soak(a.budget, a.steps, a.every, a.seed, a.max_span)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "resumed_from"}, indent=1))
    sys.exit(0 if result["identical"] else 1)


if __name__ == "__main__":
    main()
