"""``torch.distributed.checkpoint`` (DCP) for quantized DDP and FSDP2 runs.

    save_checkpoint(path, model, optimizer, ef_state=None)     # collective: every rank calls it
    load_checkpoint(path, model, optimizer, ef_state=None)     # in place, bit for bit

What is stored (flat keys, all plain dtypes so DCP never has to understand ``QuantizedTensor``):

  model.<name>.codes    the weight's code bytes as a uint8 matrix with one row per weight row
  model.<name>.scale    its fp32 scales, one row per weight row (per-row: (R, 1); per-group: (R, C/G))
  model.<name>          dense parameters and persistent buffers
  optim.<name>.<key>    optimizer state (exp_avg, exp_avg_sq, momentum_buffer, master, error, step)
  ef.rank<r>.<name>.<k> error-feedback hook buffers (e, h_local per rank; h)
  obj.optim.groups      hyper-parameters of every param group (lr, betas, mode, rounding, ...)
  obj.optim.ecoptim     seed and skipped-step count;   obj.optim.rng.rank<r>: each rank's SR generator states
  obj.ef.meta           error-feedback method, iteration, eta
  obj.meta.<name>.spec  the weight's format/granularity (checked on load)
  (obj.* entries are pickled Python objects stored as uint8 tensors: load only checkpoints you trust)

Under FSDP2 the codes/scales/state of a row-sharded weight are saved as ``DTensor`` shards (Shard(0) along
rows), so DCP writes each rank's rows once and can load them into a different number of ranks, or into a
plain single-process quantized model (``tests/test_distributed.py`` loads a 2-rank FSDP checkpoint into a
non-distributed model). Under DDP the replicated tensors are written once. Loading writes into the live
codes/scales storage; the per-rank SR generator states and error-feedback buffers are restored when the
world size matches (otherwise generators are re-seeded and error-feedback buffers start from zero).
"""
from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..formats import PerTensor, Unscaled
from ..qtensor import QuantizedTensor
from .compression import ErrorFeedbackState
from .ddp import unwrap

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_tensors"]


def _obj(o: Any) -> torch.Tensor:
    """A picklable object as a uint8 tensor (DCP would otherwise flatten nested dicts into keys)."""
    return torch.frombuffer(bytearray(pickle.dumps(o)), dtype=torch.uint8)


def _unobj(t: torch.Tensor) -> Any:
    return pickle.loads(t.numpy().tobytes())  # our own checkpoint: trusted like torch.load(weights_only=False)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _dtensor_cls():
    from torch.distributed.tensor import DTensor
    return DTensor


def _as_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A view of ``t`` as (rows, -1) (uint8 for sub-4-byte or non-fp32 codes), sharing storage."""
    flat = t.reshape(-1)
    if t.dtype != torch.float32:
        flat = flat.view(torch.uint8)
    if rows > 0 and flat.numel() % rows == 0:
        return flat.view(rows, -1)
    return flat.view(1, -1)


def _wrap_like(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``local`` (rows of this rank) as a DTensor sharded like parameter ``p`` (if ``p`` is a DTensor)."""
    DTensor = _dtensor_cls()
    if not isinstance(p, DTensor):
        return local
    shape = (p.shape[0], *local.shape[1:])
    stride = tuple(int(s) for s in torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _model_entries(model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
    DTensor = _dtensor_cls()
    model = unwrap(model)
    out: dict[str, Any] = {}
    specs: dict[str, str] = {}
    for name, p in model.named_parameters():
        local = p._local_tensor if isinstance(p, DTensor) else p
        if isinstance(local, QuantizedTensor):
            rows = local.shape[0] if local.dim() else 1
            specs[name] = str(local.spec)
            out[f"model.{name}.codes"] = _wrap_like(_as_rows(local.codes, rows), p)
            if local.scale is not None:
                if isinstance(local.spec.granularity, (PerTensor, Unscaled)):
                    out[f"model.{name}.scale"] = local.scale  # one scale (PerTensor is never sharded)
                else:
                    out[f"model.{name}.scale"] = _wrap_like(_as_rows(local.scale, rows), p)
        else:
            out[f"model.{name}"] = p.detach()
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent:
            out[f"model.{name}"] = b.detach()
    return out, specs


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in unwrap(model).named_parameters()}


def checkpoint_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       ef_state: ErrorFeedbackState | None = None) -> dict[str, Any]:
    """The flat state dict that ``save_checkpoint`` hands to ``dcp.save`` (see the module doc)."""
    sd, specs = _model_entries(model)
    sd.update({f"obj.meta.{n}.spec": _obj(s) for n, s in specs.items()})
    rank = _rank()
    if optimizer is not None:
        names = _param_names(model)
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    sd[f"optim.{names[id(p)]}.{k}"] = v
        sd["obj.optim.groups"] = _obj([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
        if hasattr(optimizer, "_generators"):
            sd["obj.optim.ecoptim"] = _obj({"seed": optimizer.seed, "skipped_steps": optimizer.skipped_steps})
            sd[f"obj.optim.rng.rank{rank}"] = _obj({k: g.get_state() for k, g in optimizer._generators.items()})
    if ef_state is not None:
        sd["obj.ef.meta"] = _obj({"method": ef_state.method, "iteration": ef_state.iteration, "eta": ef_state.eta})
        for key, v in ef_state.buffer_tensors().items():
            sd[f"ef.rank{rank}.{key}"] = v
    return sd


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ef_state: ErrorFeedbackState | None = None) -> None:
    """Save model (codes + scales), optimizer and error-feedback state with DCP (a collective)."""
    dcp.save(checkpoint_tensors(model, optimizer, ef_state), checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ef_state: ErrorFeedbackState | None = None) -> None:
    """Load a ``save_checkpoint`` checkpoint into ``model`` / ``optimizer`` / ``ef_state`` in place."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    DTensor = _dtensor_cls()
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    sd, specs = _model_entries(model)

    def want_obj(key: str) -> bool:
        if key in md:
            sd[key] = torch.empty(tuple(md[key].size), dtype=torch.uint8)
            return True
        return False

    for name in specs:
        if not want_obj(f"obj.meta.{name}.spec"):
            raise ValueError(f"{name}: the checkpoint has no quantized weight of that name")
    rank = _rank()
    params = {n: p for n, p in unwrap(model).named_parameters()}
    opt_targets: dict[str, tuple[torch.Tensor, str]] = {}
    if optimizer is not None:
        for key, meta in md.items():
            if not key.startswith("optim.") or not isinstance(meta, TensorStorageMetadata):
                continue
            pname, _, skey = key[len("optim."):].rpartition(".")
            if pname not in params:
                raise ValueError(f"checkpoint has optimizer state for unknown parameter {pname!r}")
            p = params[pname]
            size = tuple(meta.size)
            dtype = meta.properties.dtype
            if isinstance(p, DTensor) and size == tuple(p.shape):
                local = torch.zeros(p._local_tensor.shape, dtype=dtype, device=p.device)
                target = _wrap_like(local, p)
            else:
                target = torch.zeros(size, dtype=dtype, device=p.device)
            sd[key] = target
            opt_targets[key] = (p, skey)
        for key in ("obj.optim.groups", "obj.optim.ecoptim", f"obj.optim.rng.rank{rank}"):
            want_obj(key)
    ef_keys = []
    if ef_state is not None and want_obj("obj.ef.meta"):
        prefix = f"ef.rank{rank}."
        for key, meta in md.items():
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
                sd[key] = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
                ef_keys.append(key)
    missing = [k for k in sd if k not in md]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} entries this model needs, e.g. {missing[:3]}")
    dcp.load(sd, checkpoint_id=path)
    objs = {k[len("obj."):]: _unobj(v) for k, v in sd.items() if k.startswith("obj.")}
    for name, spec in specs.items():
        if objs[f"meta.{name}.spec"] != spec:
            raise ValueError(f"{name}: checkpoint holds a {objs[f'meta.{name}.spec']} weight, the model a {spec} one")
    if optimizer is not None:
        for key, (p, skey) in opt_targets.items():
            optimizer.state[p][skey] = sd[key]
        if "optim.groups" in objs:
            if len(objs["optim.groups"]) != len(optimizer.param_groups):
                raise ValueError("checkpoint and optimizer have different numbers of param groups")
            for g, saved in zip(optimizer.param_groups, objs["optim.groups"]):
                g.update(saved)
        extra = objs.get("optim.ecoptim")
        if extra is not None:
            optimizer.seed = extra["seed"]
            optimizer.skipped_steps = extra["skipped_steps"]
            optimizer._generators = {}
            for dev, state in objs.get(f"optim.rng.rank{rank}", {}).items():
                g = torch.Generator(device=dev)
                g.set_state(state)
                optimizer._generators[dev] = g
    if ef_state is not None and "ef.meta" in objs:
        meta = objs["ef.meta"]
        if meta["method"] != ef_state.method:
            raise ValueError(f"checkpoint holds {meta['method']!r} error-feedback state, the hook runs "
                             f"{ef_state.method!r}")
        ef_state.iteration, ef_state.eta = meta["iteration"], meta["eta"]
        by_name = {n: pid for pid, n in ef_state.names.items()}
        ef_state.buffers = {}
        for key in ef_keys:
            pname, _, k = key[len(f"ef.rank{rank}."):].rpartition(".")
            ef_state.buffers.setdefault(by_name[pname], {})[k] = sd[key]
