"""End-to-end training throughput (tokens/s) of the `ecoptim compare` model, per method, side by side.

    python benchmarks/train_throughput.py                  # small preset (2.4M params), 16x64 bytes per step
    python benchmarks/train_throughput.py --preset base    # 10.8M params

Every method (the compare rows, plus dense fp32 with torch.optim.AdamW(fused=True) as the baseline) trains the
same model on the same batches. Steps are timed round-robin: each round gives every method ``--steps-per-round``
steps, so machine noise spreads over all rows; a step is forward + backward + clip + optimizer step + zero_grad,
as in `ecoptim compare`. Reported: median tokens/s over the rounds, its ratio to the baseline, and the share of
the step spent in ``optimizer.step()``. Rows marked "opt.clip_grad_norm_" clip with ecoptim's fused clipping
(one norm pass that is also the NaN/Inf check; the factor applied inside the step) instead of
torch.nn.utils.clip_grad_norm_; their optimizer share includes the clip. Results go to
``<out>/train_throughput.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from ecoptim.app import train
from ecoptim.app.cli import STATE_DTYPES
from report import machine_line, run_meta, write_report
from ecoptim.app.corpus import get_batch
from ecoptim.app.model import LlamaConfig, LlamaLM


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--methods", default=",".join(train.METHODS))
    ap.add_argument("--state-dtypes", default="bf16,8bit",
                    help="extra FP8 ECO + SR rows with these AdamW state precisions (--state-dtype values)")
    ap.add_argument("--fused-clip", default="fp8_eco_rtn,fp8_eco_sr",
                    help="extra rows of these methods clipping with opt.clip_grad_norm_ instead of torch's")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = LlamaConfig.preset(args.preset)
    data = train.load_corpus("shakespeare")
    lr = 1e-3

    runs = []
    fused_clip = set()  # names of the rows clipping with opt.clip_grad_norm_
    torch.manual_seed(0)
    dense = LlamaLM(cfg)
    runs.append(("torch AdamW fused (dense fp32)", dense, torch.optim.AdamW(
        dense.parameters(), lr=lr, betas=train.BETAS, eps=train.EPS, weight_decay=train.WEIGHT_DECAY, fused=True)))
    for m in train.resolve_methods(args.methods.split(",")):
        model, opt = train._build(m, cfg, seed=0, lr=lr, init_state=None)
        runs.append((f"ecoptim {m.name} ({m.label})", model, opt))
    for st in filter(None, args.state_dtypes.split(",")):
        m = train.resolve_methods(["fp8_eco_sr"])[0]
        model, opt = train._build(m, cfg, seed=0, lr=lr, init_state=None, state_dtype=STATE_DTYPES[st])
        runs.append((f"ecoptim {m.name} ({m.label}), {st} states", model, opt))
    for m in train.resolve_methods(list(filter(None, args.fused_clip.split(",")))):
        model, opt = train._build(m, cfg, seed=0, lr=lr, init_state=None)
        runs.append((f"ecoptim {m.name} ({m.label}), opt.clip_grad_norm_", model, opt))
        fused_clip.add(runs[-1][0])

    gen = torch.Generator().manual_seed(0)
    times = {name: [] for name, _, _ in runs}
    opt_times = {name: [] for name, _, _ in runs}

    def steps(name: str, model: nn.Module, opt: torch.optim.Optimizer, n: int) -> tuple[float, float]:
        total = in_opt = 0.0
        for _ in range(n):
            x, y = get_batch(data.train, args.batch_size, args.seq_len, gen)
            t0 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            if name in fused_clip:
                t1 = time.perf_counter()
                opt.clip_grad_norm_(train.GRAD_CLIP)
            else:
                nn.utils.clip_grad_norm_(model.parameters(), train.GRAD_CLIP)
                t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total += time.perf_counter() - t0
            in_opt += t2 - t1
        return total, in_opt

    for name, model, opt in runs:  # warm-up: first-step allocations, kernel build
        steps(name, model, opt, 2)
    for _ in range(args.rounds):
        for name, model, opt in runs:
            t, t_opt = steps(name, model, opt, args.steps_per_round)
            times[name].append(t)
            opt_times[name].append(t_opt)

    tokens = args.batch_size * args.seq_len * args.steps_per_round
    rows = []
    for name, _, _ in runs:
        t = statistics.median(times[name])
        rows.append(dict(name=name, tokens_per_s=tokens / t,
                         optimizer_share=statistics.median(o / a for o, a in zip(opt_times[name], times[name]))))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_torch_fused"] = r["tokens_per_s"] / base
    n_params = sum(p.numel() for p in dense.parameters())
    meta = run_meta("train_throughput.py", argv, args.threads, params=n_params, preset=args.preset,
                    batch=[args.batch_size, args.seq_len], rounds=args.rounds, steps_per_round=args.steps_per_round)
    lines = [f"{machine_line(meta)}; "
             f"{n_params / 1e6:.2f}M-param compare model ({args.preset}), {args.batch_size}x{args.seq_len} bytes per "
             f"step, median of {args.rounds} round-robin rounds of {args.steps_per_round} steps. "
             f"Command: `{meta['command']}`", "",
             "| method | tokens/s | vs torch fused dense | optimizer share of step |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['vs_torch_fused']:.2f}x | "
                     f"{r['optimizer_share']:.0%} |")
    write_report(args.out, "train_throughput", meta, rows, lines)


if __name__ == "__main__":
    main()
