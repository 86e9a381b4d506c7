"""Data-parallel training of the compare model with error-feedback gradient compression (CPU, gloo).

Every method trains the same quantized LlamaLM (FP8 E4M3 per-row block linears, ecoptim AdamW ECO + SR,
the paper's recipe from ``ecoptim.app.train``) on ``--world-size`` local processes, each rank on different
batches, and reports:

  * final validation loss (rank 0, fixed batches) and its gap to the uncompressed all-reduce run;
  * bytes per step handed to collectives by one rank (payload) vs the fp32 all-reduce of the same buckets;
  * bytes per step one rank actually wrote to its sockets (``wchar`` of /proc/self/io around
    forward + backward + optimizer step), a measurement, not a formula;
  * whether the replicas were bit-identical (codes, scales, optimizer state) at the end.

    python benchmarks/distributed.py                        # tiny preset, 2 ranks, all methods
    python benchmarks/distributed.py --preset small --steps 300 --methods allreduce ef21:topk0.01
    python benchmarks/distributed.py --methods allreduce fsdp fsdp_fp32   # FSDP2: low-bit vs fp32 all-gathers
    python benchmarks/distributed.py --methods allreduce onebit:30        # 1-bit Adam, 30 warm-up steps
    python benchmarks/distributed.py --fsdp-repro           # what plain fully_shard does to QuantizedTensor
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ecoptim.convert import quantize_
from ecoptim.app.corpus import eval_batches, get_batch, load_split
from ecoptim.distributed import (ScaledSign, TopK, assert_replicas_identical, ddp, register_ef_hook, run_workers,
                                 wire_bytes)
from ecoptim.distributed.ddp import ReplicaDivergenceError
from ecoptim.app.model import LlamaConfig, LlamaLM, is_block_linear
from ecoptim.optim import AdamW
from ecoptim.app.train import BETAS, EPS, GRAD_CLIP, WEIGHT_DECAY, lr_lambda

DEFAULT_METHODS = ["allreduce", "none:topk0.01", "ef14:topk0.01", "ef21:topk0.01", "econtrol:topk0.01",
                   "none:sign", "ef14:sign", "ef21:sign", "econtrol:sign"]


def parse_method(spec: str) -> tuple[str, object]:
    """"allreduce" | "<none|ef14|ef21|econtrol>:<topk<ratio>|sign>" ("fsdp", "fsdp_fp32", "onebit[:warmup]"
    are handled by ``worker``)."""
    if spec == "allreduce":
        return "allreduce", None
    method, _, comp = spec.partition(":")
    if comp.startswith("topk"):
        return method, TopK(float(comp[4:] or 0.01))
    if comp == "sign":
        return method, ScaledSign()
    raise ValueError(f"unknown method spec {spec!r}")


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar"):
                return int(line.split()[1])
    return 0


def worker(rank: int, world_size: int, spec: str, cfg_dict: dict, steps: int, batch_size: int, seq_len: int,
           lr: float, seed: int, fmt: str, eta: float) -> dict:
    cfg = LlamaConfig(**cfg_dict)
    train = load_split("shakespeare", "train")
    torch.manual_seed(seed)
    model = LlamaLM(cfg)
    fsdp = spec.startswith("fsdp")
    if fmt != "fp32" and spec != "fsdp_fp32":
        quantize_(model, fmt, "row", filter_fn=is_block_linear)
    opt_cls = AdamW
    state = None
    onebit = spec.startswith("onebit")
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from ecoptim.distributed import FSDPAdamW, fully_shard_quantized
        if spec == "fsdp_fp32":
            for b in model.blocks:
                fully_shard(b)
            fully_shard(model)
        else:
            fully_shard_quantized(model, model.blocks)
        dmodel, opt_cls = model, FSDPAdamW
    elif onebit:
        from functools import partial

        from ecoptim.distributed import OneBitAdamW
        dmodel = ddp(model, forward_sync_buffers=False)
        warmup = int(spec.partition(":")[2] or max(1, steps // 10))
        opt_cls = partial(OneBitAdamW, warmup_steps=warmup)
    else:
        dmodel = ddp(model, forward_sync_buffers=False)  # rope tables are constants: keep only gradient traffic
        method, comp = parse_method(spec)
        state = register_ef_hook(dmodel, method, comp, eta=eta)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = opt_cls([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                  lr=lr, betas=BETAS, eps=EPS, mode="eco", rounding="stochastic", seed=seed)
    if onebit:
        from ecoptim.distributed import onebit_hook
        dmodel.register_comm_hook(opt, onebit_hook)
    sched = LambdaLR(opt, lr_lambda(steps))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # every rank sees different batches
    wire, wire_fwd = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(train, batch_size, seq_len, gen)
        a = _wchar()
        _, loss = dmodel(x, y)
        wire_fwd.append(_wchar() - a)
        loss.backward()
        if not fsdp:  # (DTensor grad clipping works too, but costs an extra collective we do not want to count)
            nn.utils.clip_grad_norm_(dmodel.parameters(), GRAD_CLIP)
        opt.step()  # 1-bit Adam communicates here; the others only in forward/backward
        wire.append(_wchar() - a)
        opt.zero_grad(set_to_none=True)
        sched.step()
    wall = time.perf_counter() - t0
    identical = None
    if not fsdp:
        try:
            extra = {} if state is None else {k: v for k, v in state.buffer_tensors().items() if k.endswith(".h")}
            assert_replicas_identical(dmodel, opt, extra=extra)
            identical = True
        except ReplicaDivergenceError:
            identical = False
    out = {"wall_s": wall, "identical": identical}
    model.eval()
    val = load_split("shakespeare", "val")
    with torch.no_grad():  # every rank evaluates (FSDP's forward is a collective)
        batches = list(eval_batches(val, batch_size, seq_len, 16))
        out["val_loss"] = sum(float(dmodel(bx, by)[1]) for bx, by in batches) / len(batches)
    skip = 1
    numel_bytes = 4 * sum(p.numel() for p in model.parameters())
    if state is not None:
        payload, dense = state.bytes_per_step()
        skip = state.start_iter
    elif onebit:
        skip = opt.warmup_steps
        payload, dense = sum(opt.payload_bytes) / max(1, len(opt.payload_bytes)), numel_bytes
    else:
        payload = dense = float("nan")
    out.update(payload_per_step=payload, dense_per_step=dense,
               wire_per_step=sum(wire[skip:]) / max(1, len(wire) - skip),
               wire_fwd_per_step=sum(wire_fwd[skip:]) / max(1, len(wire_fwd) - skip), wire_first_step=wire[0],
               collective="all_reduce" if spec == "allreduce" else "all_gather")
    return out


def fsdp_repro() -> None:
    from ecoptim.distributed.fsdp import fsdp_status_report
    print(fsdp_status_report())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="fp8_e4m3")
    ap.add_argument("--eta", type=float, default=None, help="EControl feedback strength (default: compressor delta)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--fsdp-repro", action="store_true")
    args = ap.parse_args()
    if args.fsdp_repro:
        fsdp_repro()
        return
    cfg = LlamaConfig.preset(args.preset, max_seq_len=max(args.seq_len, 64))
    rows = []
    print(f"{cfg.d_model=} {cfg.n_layers=} params={LlamaLM(cfg).num_params()} ranks={args.world_size} "
          f"steps={args.steps} batch/rank={args.batch_size}x{args.seq_len} format={args.format}")
    base = None
    for spec in args.methods:
        t = time.perf_counter()
        res = run_workers(worker, args.world_size, (spec, cfg.to_dict(), args.steps, args.batch_size, args.seq_len,
                                                   args.lr, args.seed, args.format, args.eta), timeout=3600)
        r0 = res[0]
        if spec == "allreduce":
            base = r0
        row = dict(method=spec, val_loss=r0["val_loss"], payload=r0["payload_per_step"], dense=r0["dense_per_step"],
                   wire=r0["wire_per_step"], wire_fwd=r0["wire_fwd_per_step"], identical=r0["identical"] is not False
                   and all(r["identical"] is not False for r in res), wall_s=time.perf_counter() - t)
        rows.append(row)
        gap = "" if base is None else f"{row['val_loss'] - base['val_loss']:+.4f}"
        if spec.startswith("fsdp"):
            print(f"{spec:>20s}  val {row['val_loss']:.4f} ({gap:>8s})  wire {row['wire']:>10.0f} B/step, of which "
                  f"forward all-gathers {row['wire_fwd']:>10.0f}  {row['wall_s']:.0f}s", flush=True)
            continue
        row["model_wire"] = wire_bytes(int(r0["payload_per_step"]), args.world_size, r0["collective"])
        print(f"{spec:>20s}  val {row['val_loss']:.4f} ({gap:>8s})  payload {row['payload']:>10.0f} B/step "
              f"({row['payload'] / row['dense']:7.2%} of fp32)  wire {row['wire']:>10.0f} B/step "
              f"(ring model {row['model_wire']:>10.0f})  identical={row['identical']}  {row['wall_s']:.0f}s",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
