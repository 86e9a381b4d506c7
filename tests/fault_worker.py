"""Training processes that tests/test_faults.py (and benchmarks/soak.py) interrupt: SIGTERM, SIGKILL, torchrun.

    python tests/fault_worker.py single --dir D --steps N --every K      # one process, PreemptionGuard
    torchrun --nproc-per-node 2 --max-restarts 3 tests/fault_worker.py dist --kind ddp --root D --steps N
             --every K [--kill RANK:STEP:WHERE]                            # WHERE: step | save | marker

Both resume from the newest complete checkpoint in their directory, train to ``--steps`` and write the final
state (``final.pt`` / ``final-rank<r>.pt``: codes, scales, dense parameters, optimizer state, SR generator
state). Every batch is a function of (step, rank) alone, so a resumed run sees the same data as an
uninterrupted one without a data-loader state. The same functions run uninterrupted in the test process
(``train_single``, ``train_dist`` via ``run_workers``) to give the reference.

``--kill`` makes one rank SIGKILL itself in the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0): before
the optimizer step of STEP ("step"), after writing its part of the checkpoint of STEP but before the
collective save completes ("save"), or on rank 0 after every rank wrote the checkpoint of STEP but before
the completion marker ("marker": a DCP checkpoint with its .metadata, which only the marker's absence
keeps from being taken as complete).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's TinyLM when run as a script

import ecoptim  # noqa: E402
from ecoptim.qtensor import QuantizedTensor  # noqa: E402
from ecoptim.resilience import CheckpointManager, PreemptionGuard  # noqa: E402

from conftest import TinyLM, lm_loss  # noqa: E402


def batch(step: int, rank: int = 0, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(seed * 1_000_003 + 17 * step + rank))


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every stored tensor of the model and optimizer (local shards under FSDP) plus the SR generator state."""
    from torch.distributed.tensor import DTensor
    out: dict[str, torch.Tensor] = {}
    names = {}
    for n, p in model.named_parameters():
        names[id(p)] = n
        local = p._local_tensor if isinstance(p, DTensor) else p
        if isinstance(local, QuantizedTensor):
            out[n + ".codes"] = local.codes.reshape(-1).view(torch.uint8).clone()
            if local.scale is not None:
                out[n + ".scale"] = local.scale.clone()
        else:
            out[n] = local.detach().clone()
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v = v._local_tensor if isinstance(v, DTensor) else v
                out[f"state.{names[id(p)]}.{k}"] = v.detach().clone()
    out["rng"] = opt.generator(torch.device("cpu")).get_state().clone()
    return out


# -- one process -----------------------------------------------------------------------------------------
def build_single(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM()
    ecoptim.quantize_(model, "fp8_e4m3", "row")
    opt = ecoptim.AdamW(model.parameters(), lr=1e-2, mode="eco", rounding="stochastic", seed=seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    return model, opt, sched


def train_single(directory: str | None, steps: int, every: int, seed: int = 0, report: bool = False) -> dict:
    """Train to ``steps``; with a ``directory``: resume from its newest intact checkpoint, save every ``every``
    steps, and on SIGTERM/SIGINT save and exit with status 128 + signal. Returns the final snapshot."""
    model, opt, sched = build_single(seed)
    manager = CheckpointManager(directory, keep=2) if directory else None
    with PreemptionGuard() as guard:
        info = manager.load_latest(model, opt, sched) if manager else None
        step = 0 if info is None else info["step"]
        if report:
            print(f"start {step}", flush=True)
        while step < steps:
            opt.zero_grad()
            lm_loss(model, batch(step, seed=seed)).backward()
            opt.step()
            sched.step()
            step += 1
            if report:
                print(f"step {step}", flush=True)
            if manager and (step % every == 0 or guard.should_stop()):
                manager.save(step, model, opt, sched)
            if guard.should_stop():
                print(f"preempted {step}", flush=True)
                sys.exit(guard.exit_code)
    return snapshot(model, opt)


# -- several processes -----------------------------------------------------------------------------------
def build_dist(kind: str, seed: int = 0):
    from ecoptim.distributed import TopK, ddp, register_ef_hook
    from ecoptim.distributed.fsdp import FSDPAdamW, fully_shard_quantized
    torch.manual_seed(seed)
    model = TinyLM()
    ef_state = None
    if kind == "fsdp":
        ecoptim.quantize_(model, "fp8_e4m3", "row")
        fully_shard_quantized(model, model.blocks)
        run, opt = model, FSDPAdamW(model.parameters(), lr=1e-2, mode="eco", rounding="stochastic", seed=seed)
    elif kind == "ddp":
        ecoptim.quantize_(model, "fp8_e4m3", "row", filter_fn=lambda m, n: n.startswith("blocks.0"))
        ecoptim.quantize_(model, "int4", "tensor", filter_fn=lambda m, n: n.startswith("blocks.1"))
        run = ddp(model)
        ef_state = register_ef_hook(run, "econtrol", TopK(0.1))
        opt = ecoptim.AdamW(run.parameters(), lr=1e-2, mode="eco", rounding="stochastic", seed=seed)
    else:
        raise ValueError(f"unknown kind {kind!r} (ddp | fsdp)")
    return model, run, opt, ef_state


def _parse_kill(kill: str | None, rank: int) -> tuple[int, str] | None:
    """RANK:STEP:WHERE -> (STEP, WHERE) on that rank in the first attempt, else None."""
    if not kill or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    r, s, where = kill.split(":")
    if where not in ("step", "save", "marker"):
        raise ValueError(f"unknown kill point {where!r} (step | save | marker)")
    return (int(s), where) if int(r) == rank else None


def _arm_kill_in_save(where: str) -> None:
    """Make the next distributed save SIGKILL this process at ``where``."""
    if where == "save":
        from torch.distributed.checkpoint import FileSystemWriter
        original = FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            fut = original(self, plan, planner)
            fut.wait()  # this rank's files are on disk; the collective save never completes
            os.kill(os.getpid(), signal.SIGKILL)
            return fut

        FileSystemWriter.write_data = write_then_die
    else:
        import ecoptim.distributed.checkpoint as dckpt

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        dckpt.write_completion_marker = die


def train_dist(rank: int, world_size: int, kind: str, root: str | None, steps: int, every: int,
               kill: str | None = None, seed: int = 0) -> dict:
    """Train ``kind`` on an initialised process group to ``steps``, resuming from / saving to ``root``."""
    from ecoptim.distributed.checkpoint import DistributedCheckpointManager
    model, run, opt, ef_state = build_dist(kind, seed)
    manager = DistributedCheckpointManager(root, keep=2) if root else None
    armed = _parse_kill(kill, rank)
    step = (manager.load_latest(run, opt, ef_state) if manager else None) or 0
    start = step
    while step < steps:
        lm_loss(run, batch(step, rank, seed)).backward()
        if armed == (step + 1, "step"):
            os.kill(os.getpid(), signal.SIGKILL)
        opt.step()
        opt.zero_grad()
        step += 1
        if manager and step % every == 0:
            if armed is not None and armed[0] == step and armed[1] != "step":
                _arm_kill_in_save(armed[1])
            manager.save(step, run, opt, ef_state)
    return {"start": start, "state": snapshot(model, opt)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("single")
    s.add_argument("--dir", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--every", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("dist")
    d.add_argument("--kind", choices=["ddp", "fsdp"], required=True)
    d.add_argument("--root", required=True)
    d.add_argument("--steps", type=int, required=True)
    d.add_argument("--every", type=int, default=3)
    d.add_argument("--kill", default=None)
    d.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.mode == "single":
        final = train_single(a.dir, a.steps, a.every, a.seed, report=True)
        torch.save(final, Path(a.dir) / "final.pt")
        print("done", flush=True)
        return
    import torch.distributed as dist
    from ecoptim.distributed import init_from_torchrun
    init_from_torchrun("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    out = train_dist(rank, ws, a.kind, a.root, a.steps, a.every, a.kill, a.seed)
    out["restart"] = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.save(out, Path(a.root) / f"final-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
