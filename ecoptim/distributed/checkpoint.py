"""``torch.distributed.checkpoint`` (DCP) for quantized DDP and FSDP2 runs.

    save_checkpoint(path, model, optimizer, ef_state=None)     # collective: every rank calls it
    load_checkpoint(path, model, optimizer, ef_state=None)     # in place, bit for bit
    manager = DistributedCheckpointManager(root, keep=3)        # root/step-<n>, newest complete one wins
    manager.save(step, model, optimizer, ef_state); manager.load_latest(model, optimizer, ef_state)

Completeness. A checkpoint directory is complete only once it holds the marker file ``.ecoptim-complete``,
which rank 0 writes atomically after every rank finished ``dcp.save`` (a barrier) and which lists every
file of the checkpoint with its size. ``load_checkpoint`` refuses a directory without it, or whose files
are missing or have other sizes (``IncompleteCheckpointError``), before touching the model: a rank that
died mid-save, a disk that filled up or a copy that was cut short leaves no marker, so a half-written
checkpoint is never taken as complete. Saving over an existing directory first removes its marker (and
then its old files), so that directory is incomplete until the new save finishes; saving each step to a
fresh directory (``DistributedCheckpointManager``) always leaves the previous complete one to resume from.

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

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..checkpoint import CorruptCheckpointError, atomic_write, numbered_checkpoints
from ..formats import PerTensor, Unscaled
from ..qtensor import QuantizedTensor
from .compression import ErrorFeedbackState
from .ddp import unwrap

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_tensors", "COMPLETE_MARKER", "IncompleteCheckpointError",
           "check_complete", "write_completion_marker", "DistributedCheckpointManager"]

COMPLETE_MARKER = ".ecoptim-complete"
MARKER_FORMAT = "ecoptim.dcp-complete"
MARKER_VERSION = 1


class IncompleteCheckpointError(CorruptCheckpointError):
    """A distributed checkpoint directory whose save never finished (no completion marker) or whose files no
    longer match the marker (missing, truncated)."""


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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_dcp_file(name: str) -> bool:
    return name.endswith(".distcp") or name.startswith(".metadata") or (name.startswith("__") and ".metadata" in name)


def _invalidate(directory: Path) -> None:
    """Make ``directory`` incomplete before anything in it changes: marker first (synced), then old files."""
    marker = directory / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        try:  # the removal must reach the disk before any data file changes
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # e.g. Windows: directories cannot be opened
            fd = None
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if directory.is_dir():
        for f in directory.iterdir():
            if f.is_file() and _is_dcp_file(f.name):
                f.unlink()


def write_completion_marker(path: str | os.PathLike, world_size: int, step: int | None = None) -> Path:
    """Write ``path/.ecoptim-complete`` atomically: every file of the checkpoint with its size, the world size
    and the step. ``save_checkpoint`` calls it on rank 0 once every rank has finished writing."""
    directory = Path(path)
    files = {f.name: f.stat().st_size for f in sorted(directory.iterdir())
             if f.is_file() and f.name != COMPLETE_MARKER and _is_dcp_file(f.name) and not f.name.endswith(".tmp")}
    body = json.dumps({"format": MARKER_FORMAT, "version": MARKER_VERSION, "world_size": world_size, "step": step,
                       "files": files}, indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(body)

    return atomic_write(directory / COMPLETE_MARKER, write)


def check_complete(path: str | os.PathLike) -> dict[str, Any]:
    """The completion marker of the checkpoint directory ``path`` (``{"world_size", "step", "files"}``), after
    checking that every file it lists is there with its size; ``IncompleteCheckpointError`` otherwise."""
    directory = Path(path)
    where = f"distributed checkpoint {str(directory)!r}"
    if not directory.is_dir():
        raise FileNotFoundError(f"{where} does not exist (or is not a directory)")
    marker = directory / COMPLETE_MARKER
    if not marker.exists():
        raise IncompleteCheckpointError(
            f"{where} is incomplete: it has no {COMPLETE_MARKER} marker, so its save never finished (a rank died, "
            "the job was killed or the disk failed mid-save); load the previous checkpoint "
            "(DistributedCheckpointManager.load_latest does)")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        if info.get("format") != MARKER_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IncompleteCheckpointError(f"{where}: its {COMPLETE_MARKER} marker is unreadable ({e})") from e
    if ".metadata" not in files:
        raise IncompleteCheckpointError(f"{where}: its marker lists no .metadata file (not a DCP checkpoint)")
    for name, size in files.items():
        f = directory / name
        if not f.is_file():
            raise IncompleteCheckpointError(f"{where} is damaged: its file {name!r} is missing")
        if f.stat().st_size != size:
            raise IncompleteCheckpointError(f"{where} is damaged: its file {name!r} has {f.stat().st_size} bytes, "
                                            f"the save wrote {size} (truncated or overwritten)")
    return info


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ef_state: ErrorFeedbackState | None = None, *, step: int | None = None) -> None:
    """Save model (codes + scales), optimizer and error-feedback state with DCP (a collective).

    Returns once the checkpoint is complete on every rank: rank 0 first invalidates an existing checkpoint
    at ``path``, every rank writes its part, and after a barrier rank 0 writes the completion marker.
    """
    directory = Path(path)
    if _rank() == 0:
        _invalidate(directory)
    _barrier()
    dcp.save(checkpoint_tensors(model, optimizer, ef_state), checkpoint_id=path)
    _barrier()
    if _rank() == 0:
        write_completion_marker(directory, _world_size(), step)
    _barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ef_state: ErrorFeedbackState | None = None) -> dict[str, Any]:
    """Load a ``save_checkpoint`` checkpoint into ``model`` / ``optimizer`` / ``ef_state`` in place.

    Refuses (``IncompleteCheckpointError``, nothing loaded) a checkpoint whose save did not finish. Returns
    the completion marker's ``{"step", "world_size", ...}``.
    """
    from torch.distributed.checkpoint import FileSystemReader
    info = check_complete(path)
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
    return {"step": info.get("step"), "world_size": info.get("world_size")}


class DistributedCheckpointManager:
    """Distributed checkpoints of one run as ``root/step-<n>`` directories; keeps the ``keep`` newest complete
    ones. ``save`` and ``load_latest`` are collectives (every rank calls them at the same point)."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, prefix: str = "step-") -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int (complete checkpoints to keep), got {keep!r}")
        if not prefix or "/" in prefix or "\\" in prefix:
            raise ValueError(f"prefix {prefix!r} must be a plain directory name part")
        self.root = Path(root)
        self.keep = keep
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}(\d+)")

    def path(self, step: int) -> Path:
        """The directory of the checkpoint of ``step``."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return self.root / f"{self.prefix}{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, directory)`` of every checkpoint directory under ``root``, complete or not, oldest first."""
        return numbered_checkpoints(self.root, self._pattern, directories=True)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint (``(step, directory)``), skipping incomplete or damaged ones with a
        ``RuntimeWarning`` naming each; None if there is none. Reads the file system on the calling rank only."""
        for step, d in reversed(self.checkpoints()):
            try:
                check_complete(d)
            except (IncompleteCheckpointError, FileNotFoundError) as e:
                warnings.warn(f"skipping {e}", RuntimeWarning, stacklevel=2)
                continue
            return step, d
        return None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             ef_state: ErrorFeedbackState | None = None) -> Path:
        """Save ``step`` to its own directory (collective); then rank 0 deletes all but the ``keep`` newest
        complete checkpoints, and incomplete ones older than the newest complete one."""
        path = self.path(step)
        if _rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
        _barrier()
        save_checkpoint(str(path), model, optimizer, ef_state, step=step)
        if _rank() == 0:
            self._prune(path)
        _barrier()
        return path

    def _prune(self, newest: Path) -> None:
        complete = []
        for step, d in reversed(self.checkpoints()):
            try:
                check_complete(d)
            except (IncompleteCheckpointError, FileNotFoundError):
                if complete:  # an incomplete save older than a complete checkpoint: nothing will resume from it
                    shutil.rmtree(d, ignore_errors=True)
                continue
            complete.append(d)
            if len(complete) > self.keep and d != newest:
                # marker first: a crash mid-removal leaves an incomplete directory, never a "complete" torso
                (d / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(d, ignore_errors=True)

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ef_state: ErrorFeedbackState | None = None) -> int | None:
        """Load the newest complete checkpoint (collective: rank 0 picks it, every rank loads the same one).
        Returns its step, or None when there is none (a fresh start)."""
        choice = [None]
        if _rank() == 0:
            found = self.latest()
            choice = [None if found is None else (found[0], str(found[1]))]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        step, path = choice[0]
        load_checkpoint(path, model, optimizer, ef_state)
        return step
