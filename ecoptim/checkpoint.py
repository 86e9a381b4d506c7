"""Checkpoints of quantized models: atomic, validated, resumable; and safetensors export.

``save_checkpoint`` writes one ``torch.save`` file holding the model's state_dict (quantized weights as codes
+ fp32 scales, never dequantized floats), the optimizer's state (including ecoptim's stochastic-rounding
generators), the LR scheduler's state, the global torch RNG state, the step and any plain ``extra`` data,
plus a CRC32 of every tensor. It writes to a temporary file in the same directory, fsyncs it and renames it
over ``path`` (``os.replace``), so a crash or an error mid-save leaves the previous checkpoint intact. A write
that fails (disk full, I/O error) raises ``CheckpointWriteError`` (an ``OSError``) naming the path and the
cause, after removing its temporary file; a process killed mid-write can leave only a ``.<name>.*.tmp`` file
(``atomic_temp_glob``), never a partial ``path``.

``load_checkpoint`` reads and checks everything first (readable file, checksums, every model entry's
format / granularity / shape / dtype / scale, the optimizer's groups and state shapes, the scheduler's class)
and only then loads, so a refused checkpoint leaves the model, optimizer and scheduler untouched. Every
refusal is a ``ValueError`` naming the file, the parameter and what differs; a file that cannot be read or
fails its checksums raises the subclass ``CorruptCheckpointError`` (``verify_checkpoint`` checks a file alone,
so that a caller can fall back to an older checkpoint: ``ecoptim.resilience.CheckpointManager``).

``export_safetensors`` / ``load_safetensors`` store codes (``<name>.codes``, float8 codes as F8_E4M3 /
F8_E5M2, int4 as packed uint8), scales (``<name>.scale``) and dense tensors, with a JSON description of every
entry (kind, format, granularity, logical shape, compute dtype, CRC32) in the header metadata under
``"ecoptim"``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .formats import QuantSpec, get_format, get_granularity, get_scale_format
from .qtensor import QuantizedTensor

__all__ = ["save_checkpoint", "load_checkpoint", "verify_checkpoint", "export_safetensors", "load_safetensors",
           "CHECKPOINT_FORMAT", "CorruptCheckpointError", "CheckpointWriteError", "atomic_temp_glob", "atomic_write",
           "numbered_checkpoints"]

CHECKPOINT_FORMAT = "ecoptim.checkpoint"
CHECKPOINT_VERSION = 1
SAFETENSORS_FORMAT = "ecoptim.safetensors"
SAFETENSORS_VERSION = 1
_MAX_LISTED = 8  # problems listed in one error message


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read, is truncated or fails its checksums (damaged on disk or by an
    interrupted copy), as opposed to an intact checkpoint that does not match the given model."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error, ...). The previous file at the target path, if any,
    is unchanged, and the temporary file was removed. ``errno`` is the cause's errno when it had one."""


def atomic_temp_glob(name: str) -> str:
    """The glob pattern of the temporary files that an atomic write of a file called ``name`` creates next to
    it (``name`` may itself hold glob wildcards). Only a process killed mid-write leaves one behind."""
    return f".{name}.*.tmp"


def numbered_checkpoints(directory: Path, name_pattern: re.Pattern[str], *, directories: bool
                         ) -> list[tuple[int, Path]]:
    """``(step, path)`` of the entries of ``directory`` whose whole name matches ``name_pattern`` (its first group
    is the step), oldest first: files, or with ``directories`` directories (distributed checkpoints). A missing
    ``directory`` holds none. Nothing is opened or validated."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = name_pattern.fullmatch(entry.name)
        if m is not None and (entry.is_dir() if directories else entry.is_file()):
            found.append((int(m.group(1)), entry))
    return sorted(found)


# -- helpers -------------------------------------------------------------------------------------------
def _qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _same_class(saved: Any, obj: Any) -> bool:
    """Class names match (the module path may have moved between versions)."""
    return isinstance(saved, str) and saved.rsplit(".", 1)[-1] == type(obj).__qualname__.rsplit(".", 1)[-1]


def _crc(t: torch.Tensor) -> int:
    """CRC32 of a dense tensor's bytes (logical order)."""
    b = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(b.numpy().data) if b.numel() else 0


def _walk_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every dense tensor inside nested dicts / lists / tuples (QuantizedTensor: its codes and scale)."""
    if isinstance(obj, QuantizedTensor):
        yield f"{prefix}.codes", obj.codes
        if obj.scale is not None:
            yield f"{prefix}.scale", obj.scale
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{prefix}/{i}")


def _checksums(payload: dict) -> dict[str, int]:
    return {k: _crc(t) for k, t in _walk_tensors({k: v for k, v in payload.items() if k != "checksums"})}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> bool:
    """Remove ``path``; True if it is gone (or never existed), False if removing it failed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _os_error_in_chain(e: BaseException) -> OSError | None:
    """The first OSError among ``e`` and its causes / contexts (torch's writer wraps the file's OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_failure(path: Path, cause: BaseException, removed: bool, tmp: str) -> CheckpointWriteError:
    os_error = _os_error_in_chain(cause)
    if os_error is not None:
        cause = os_error
    errno_ = getattr(cause, "errno", None)
    what = f"{os.strerror(errno_)} [errno {errno_}]" if errno_ else f"{type(cause).__name__}: {cause}"
    if errno_ and str(cause) and os.strerror(errno_) not in str(cause):
        what += f" ({cause})"
    hint = {errno.ENOSPC: "; free space on that disk or save elsewhere",
            errno.EDQUOT: "; the disk quota is exhausted: free space or save elsewhere",
            errno.EFBIG: "; the file exceeds this process's file-size limit (ulimit -f) or the file system's"}.get(
                errno_, "")
    left = "" if removed else f"; its temporary file {tmp!r} could not be removed, delete it by hand"
    err = CheckpointWriteError(f"could not write {str(path)!r}: {what}; the previous file at that path (if any) is "
                               f"unchanged{left}{hint}")
    err.errno = errno_
    return err


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the temp file, rename it over ``path``; remove it on any failure.

    ``path`` then holds either its previous content or the complete new one, never a mix, whenever the
    process dies. The temporary file is ``atomic_temp_glob(path.name)`` in the same directory.

    An ``OSError`` or ``RuntimeError`` (torch's stream writer reports a failed write as a RuntimeError) is
    raised again as ``CheckpointWriteError`` naming ``path`` and the cause; other errors (e.g. an unpicklable
    payload) and interrupts pass through unchanged, the temporary file removed either way.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        # mkstemp creates the file 0600; a checkpoint gets the permissions any new file gets (umask applies),
        # so that a shared cluster's group can read it as it reads torch.save's files
        os.chmod(tmp, 0o666 & ~_current_umask())
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise _write_failure(path, e, _remove_quietly(tmp), tmp) from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(directory)
    return path


def _describe(t: torch.Tensor) -> str:
    if isinstance(t, QuantizedTensor):
        return f"a {t.spec} quantized weight of shape {tuple(t.shape)}"
    return f"a dense {str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)}"


def _codes_finite(codes: torch.Tensor) -> bool:
    if codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes = codes.to(torch.float16)  # exact for both fp8 formats
    return not codes.is_floating_point() or bool(torch.isfinite(codes).all())


def _entry_problem(src: Any, dst: torch.Tensor) -> str | None:
    """What differs between a checkpoint entry ``src`` and the model's tensor ``dst`` (None if it can load)."""
    if not isinstance(src, torch.Tensor):
        return f"the checkpoint holds a {type(src).__name__}, not a tensor"
    sq, dq = isinstance(src, QuantizedTensor), isinstance(dst, QuantizedTensor)
    if dq and not sq:
        return (f"the model stores {_describe(dst)} but the checkpoint holds {_describe(src)} (to quantize a "
                "dense checkpoint into this model use model.load_state_dict)")
    if sq and not dq:
        return f"the checkpoint holds {_describe(src)} but the model's parameter is {_describe(dst)}"
    if tuple(src.shape) != tuple(dst.shape):
        return f"shape differs: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}"
    if not sq:
        if src.dtype != dst.dtype:
            return f"dtype differs: checkpoint {src.dtype}, model {dst.dtype}"
        return None
    if str(src.spec) != str(dst.spec):
        what = ("format" if str(src.spec.format) != str(dst.spec.format) else
                "granularity" if str(src.spec.granularity) != str(dst.spec.granularity) else "scale format")
        return f"{what} differs: checkpoint {src.spec}, model {dst.spec}"
    if src.dtype != dst.dtype:
        return f"compute dtype differs: checkpoint {src.dtype}, model {dst.dtype}"
    if src.codes.dtype != dst.codes.dtype or tuple(src.codes.shape) != tuple(dst.codes.shape):
        return (f"codes differ: checkpoint {src.codes.dtype} {tuple(src.codes.shape)}, model {dst.codes.dtype} "
                f"{tuple(dst.codes.shape)}")
    if dst.scale is not None and src.scale is None:
        kind = "fp32" if dst.scale.dtype == torch.float32 else f"{dst.spec.scale} ({_dtype_name(dst.scale.dtype)})"
        return f"missing scale: the model's {dst.spec} weight needs {dst.scale.numel()} {kind} scales"
    if dst.scale is None and src.scale is not None:
        return f"unexpected scale: the model's {dst.spec} weight is unscaled"
    if src.scale is not None:
        if src.scale.dtype != dst.scale.dtype or tuple(src.scale.shape) != tuple(dst.scale.shape):
            return (f"scale differs: checkpoint {src.scale.dtype} {tuple(src.scale.shape)}, model "
                    f"{dst.scale.dtype} {tuple(dst.scale.shape)}")
        if src.spec.scaled:
            problem = src.spec.scale.problem(src.scale, src.spec.granularity.blocks(src.shape)[0])
            if problem is not None:
                return f"the checkpoint's scale {problem} (corrupt checkpoint)"
    if not _codes_finite(src.codes):
        return "the checkpoint's codes hold NaN/Inf (corrupt checkpoint)"
    return None


def _validate_model_state(where: str, sd: Any, model: nn.Module, strict: bool) -> None:
    if not isinstance(sd, dict):
        raise ValueError(f"{where}: the model state is a {type(sd).__name__}, not a state_dict")
    expected = model.state_dict(keep_vars=True)
    problems = []
    if strict:
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        if missing:
            problems.append(f"missing keys (in the model, not in the checkpoint): {missing[:_MAX_LISTED]}"
                            + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""))
        if unexpected:
            problems.append(f"unexpected keys (in the checkpoint, not in the model): {unexpected[:_MAX_LISTED]}"
                            + (f" and {len(unexpected) - _MAX_LISTED} more" if len(unexpected) > _MAX_LISTED
                               else ""))
    for k, dst in expected.items():
        if k in sd:
            p = _entry_problem(sd[k], dst)
            if p is not None:
                problems.append(f"{k}: {p}")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{where} does not match the model; nothing was loaded:\n  "
                         + "\n  ".join(problems[:_MAX_LISTED]) + more)


def _expected_state_shape(name: str, p: torch.Tensor, group: dict) -> tuple[int, ...] | None:
    from .convert import spec_of
    from .optim.state8 import BlockwiseState

    spec = spec_of(p)
    cfg = group.get("state_dtype")
    if name.endswith("_absmax"):  # 8/4-bit states: one absmax per block of the (saved) group's config
        return (cfg.blocks(p.numel()),) if isinstance(cfg, BlockwiseState) else None
    if name in ("exp_avg", "exp_avg_sq") and isinstance(cfg, BlockwiseState) and spec is not None:
        return cfg.code_shape(p.shape)  # 4-bit codes: packed flat
    if name == "comp_codes" and spec is not None:
        return (spec.format.code_numel(p.numel()),)
    if name == "comp_scale" and spec is not None:
        return spec.scale.stored_shape(spec.granularity.blocks(p.shape)[0])
    return tuple(p.shape)


def _validate_optimizer_state(where: str, saved: Any, optimizer: torch.optim.Optimizer,
                              names: dict[int, str]) -> None:
    if saved is None:
        raise ValueError(f"{where} holds no optimizer state, but an optimizer was given to load it into")
    if not _same_class(saved.get("class"), optimizer):
        raise ValueError(f"{where}: optimizer class differs: checkpoint {saved.get('class')}, "
                         f"given {_qualname(optimizer)}")
    sd = saved.get("state")
    if not isinstance(sd, dict) or "param_groups" not in sd or "state" not in sd:
        raise ValueError(f"{where}: the optimizer state is malformed (no 'param_groups'/'state')")
    groups = optimizer.param_groups
    if len(sd["param_groups"]) != len(groups):
        raise ValueError(f"{where}: the checkpoint's optimizer has {len(sd['param_groups'])} parameter groups, "
                         f"the given one has {len(groups)}")
    ids, params, saved_group = [], [], {}
    for i, (sg, g) in enumerate(zip(sd["param_groups"], groups)):
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"{where}: parameter group {i} has {len(sg['params'])} parameters in the checkpoint "
                             f"and {len(g['params'])} in the given optimizer")
        ids += list(sg["params"])
        params += list(g["params"])
        saved_group.update({pid: sg for pid in sg["params"]})
    by_id = dict(zip(ids, params))
    problems = []
    for pid, st in sd["state"].items():
        if pid not in by_id:
            problems.append(f"state for unknown parameter id {pid}")
            continue
        p = by_id[pid]
        pname = names.get(id(p), f"parameter #{ids.index(pid)}")
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                exp = _expected_state_shape(k, p, saved_group[pid])
                if exp is not None and tuple(v.shape) != exp:
                    problems.append(f"{pname}: optimizer state '{k}' has shape {tuple(v.shape)}, expected {exp}")
    if problems:
        raise ValueError(f"{where}: the optimizer state does not match the given optimizer; nothing was loaded:\n  "
                         + "\n  ".join(problems[:_MAX_LISTED]))


def _validate_scheduler_state(where: str, saved: Any, scheduler: Any) -> None:
    if saved is None:
        raise ValueError(f"{where} holds no LR scheduler state, but a scheduler was given to load it into")
    if not _same_class(saved.get("class"), scheduler):
        raise ValueError(f"{where}: LR scheduler class differs: checkpoint {saved.get('class')}, "
                         f"given {_qualname(scheduler)}")
    st = saved.get("state")
    if not isinstance(st, dict):
        raise ValueError(f"{where}: the LR scheduler state is malformed")
    base = getattr(scheduler, "base_lrs", None)
    if base is not None and "base_lrs" in st and len(st["base_lrs"]) != len(base):
        raise ValueError(f"{where}: the checkpoint's LR scheduler drives {len(st['base_lrs'])} parameter groups, "
                         f"the given one {len(base)}")


# -- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int | None = None, extra: Any = None) -> Path:
    """Atomically write a checkpoint of ``model`` (and optionally optimizer, LR scheduler, step, extra).

    ``extra`` must be plain data (numbers, strings, lists, dicts, tensors) so that it loads with
    ``torch.load(weights_only=True)``. On any error the previous file at ``path`` is left as it was.
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "torch_version": str(torch.__version__),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else {"class": _qualname(optimizer),
                                                      "state": optimizer.state_dict()},
        "scheduler": None if scheduler is None else {"class": _qualname(scheduler),
                                                      "state": scheduler.state_dict()},
        "step": step,
        "extra": extra,
        "rng": {"torch": torch.get_rng_state()},
    }
    payload["checksums"] = _checksums(payload)
    def write(tmp: str) -> None:
        # through a Python file object: a failing write then surfaces as an OSError with its errno (ENOSPC,
        # EIO, ...) behind torch's RuntimeError, which CheckpointWriteError reports
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    return atomic_write(path, write)


def _read_checkpoint(path: Path, weights_only: bool = True) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    try:
        payload = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # truncated zip, bad pickle, unknown globals, ...
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), None)
        if why is not None:
            raise ValueError(f"checkpoint {str(path)!r} holds Python objects that torch.load(weights_only=True) "
                             f"does not unpickle ({why}); keep save_checkpoint's `extra` to plain "
                             "data (numbers, strings, lists, dicts, tensors), or pass weights_only=False for a "
                             "file you trust") from e
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} ({size} bytes) cannot be read: it is truncated, "
                                     f"corrupt or not a torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an ecoptim checkpoint (written by save_checkpoint); "
                         "for a bare state_dict use torch.load + model.load_state_dict")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {payload['version']}, newer than this ecoptim "
                         f"understands ({CHECKPOINT_VERSION}); upgrade ecoptim")
    saved = payload.get("checksums")
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} has no checksums (corrupt)")
    actual = _checksums(payload)
    bad = [k for k in set(saved) | set(actual) if saved.get(k) != actual.get(k)]
    if bad:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is corrupt: checksum mismatch for "
                                     f"{sorted(bad)[:_MAX_LISTED]}")
    return payload


def verify_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """Check that ``path`` is a readable ecoptim checkpoint whose every tensor matches its CRC32.

    Returns ``{"step", "extra"}`` without loading anything into a model. Raises ``FileNotFoundError``,
    ``CorruptCheckpointError`` (unreadable, truncated, checksum mismatch) or ``ValueError`` (not an ecoptim
    checkpoint, or a newer version).
    """
    payload = _read_checkpoint(Path(path), weights_only)
    return {"step": payload.get("step"), "extra": payload.get("extra")}


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, *, strict: bool = True, restore_rng: bool = False,
                    weights_only: bool = True) -> dict[str, Any]:
    """Validate the checkpoint at ``path`` against the given objects, then load it into them.

    Returns ``{"step", "extra", "rng_state"}``. ``restore_rng=True`` also restores the global torch RNG (for
    bit-exact resumption of code that draws from it, e.g. dropout or data shuffling). ``weights_only=False``
    unpickles arbitrary objects in ``extra`` (only for files you trust). If anything does not match, raises
    ``ValueError`` saying what, and nothing is modified.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    payload = _read_checkpoint(path, weights_only)
    _validate_model_state(where, payload.get("model"), model, strict)
    names = {id(p): n for n, p in model.named_parameters()}
    if optimizer is not None:
        _validate_optimizer_state(where, payload.get("optimizer"), optimizer, names)
    if scheduler is not None:
        _validate_scheduler_state(where, payload.get("scheduler"), scheduler)

    # Everything checked: load. Optimizer and scheduler first (their load_state_dict re-validate and could
    # still refuse); on failure put their previous states back. torch's load_state_dict replaces the state
    # tensors instead of writing into them, so the previous state_dict() still holds the old values.
    old_opt = optimizer.state_dict() if optimizer is not None else None
    old_sched = scheduler.state_dict() if scheduler is not None else None
    try:
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"]["state"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"]["state"])
    except Exception as e:
        if optimizer is not None:
            optimizer.load_state_dict(old_opt)
        if scheduler is not None:
            scheduler.load_state_dict(old_sched)
        raise ValueError(f"{where}: loading the optimizer/scheduler state failed, nothing was loaded: {e}") from e
    with torch.no_grad():
        model.load_state_dict(payload["model"], strict=strict)
    rng = (payload.get("rng") or {}).get("torch")
    if restore_rng and rng is not None:
        torch.set_rng_state(rng)
    return {"step": payload.get("step"), "extra": payload.get("extra"), "rng_state": rng}


# -- safetensors ---------------------------------------------------------------------------------------
def _safetensors():
    """The ``safetensors`` package (with ``safetensors.torch`` loaded), or an ImportError saying what to install."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError as e:
        raise ImportError("ecoptim's safetensors export/import needs the 'safetensors' package: "
                          "pip install safetensors") from e
    return safetensors


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype_from(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def export_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.state_dict()`` to a safetensors file: codes + scales for quantized weights (never
    dequantized), dense tensors as they are, and a JSON description under the metadata key ``"ecoptim"``.
    Tied tensors are stored once. Written atomically like ``save_checkpoint``."""
    safetensors = _safetensors()
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[tuple, str] = {}  # exact (storage, offset, shape, stride, dtype) -> stored name

    def put(key: str, t: torch.Tensor) -> dict[str, Any]:
        t = t.detach().to("cpu")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            return {"alias": seen[ident]}
        if key in tensors:
            raise ValueError(f"safetensors key {key!r} is used twice; rename the parameter")
        # a fresh contiguous copy: safetensors refuses tensors sharing storage with another one
        tensors[key] = t.contiguous().clone() if t.numel() else t.contiguous()
        if t.numel():
            seen[ident] = key
        return {"key": key, "crc32": _crc(tensors[key])}

    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, QuantizedTensor):
            e = {"kind": "quantized", "format": str(t.spec.format), "granularity": str(t.spec.granularity),
                 "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "codes": put(f"{name}.codes", t.codes),
                 "scale": None if t.scale is None else put(f"{name}.scale", t.scale)}
            if t.spec.scale != t.spec.format.default_scale:  # named only when not implied by the format
                e["scale_format"] = str(t.spec.scale)
        else:
            e = {"kind": "dense", "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "data": put(name, t)}
        entries[name] = e
    desc = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION, "entries": entries}
    meta = dict(metadata or {})
    meta["ecoptim"] = json.dumps(desc, separators=(",", ":"))
    def write(tmp: str) -> None:
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=meta)
        except Exception as e:
            # safetensors reports a failed write as "I/O error: ... (os error 28)": keep its errno, so that
            # atomic_write reports it as the CheckpointWriteError of a full or failing disk
            found = re.search(r"\(os error (\d+)\)", str(e))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code)) from e

    return atomic_write(path, write)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The file as a state_dict (quantized entries rebuilt as QuantizedTensor); ValueError if unreadable."""
    safetensors = _safetensors()
    where = f"safetensors file {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{where} ({path.stat().st_size} bytes) cannot be read: it is truncated, corrupt or not a "
                         f"safetensors file ({type(e).__name__}: {e})") from e
    if "ecoptim" not in meta:
        raise ValueError(f"{where} has no ecoptim format description (metadata key 'ecoptim'); it was not "
                         "written by ecoptim.export_safetensors")
    try:
        desc = json.loads(meta["ecoptim"])
        entries = desc["entries"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: the ecoptim format description is malformed ({e})") from e
    if desc.get("format") != SAFETENSORS_FORMAT or desc.get("version", 0) > SAFETENSORS_VERSION:
        raise ValueError(f"{where}: unsupported description {desc.get('format')!r} version {desc.get('version')!r}")

    def get(name: str, ref: dict | None, what: str) -> torch.Tensor:
        if ref is None:
            raise ValueError(f"{where}: {name}: missing {what}")
        key = ref.get("key") or ref.get("alias")
        if key not in raw:
            raise ValueError(f"{where}: {name}: missing {what} (tensor {key!r} is not in the file)")
        t = raw[key]
        if "crc32" in ref and _crc(t) != ref["crc32"]:
            raise ValueError(f"{where} is corrupt: checksum mismatch for {key!r}")
        return t

    sd: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        try:
            shape, dtype = torch.Size(e["shape"]), _dtype_from(e["dtype"])
            if e["kind"] == "dense":
                t = get(name, e.get("data"), "data")
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(f"{name}: stored tensor is {t.dtype} {tuple(t.shape)}, description says "
                                     f"{dtype} {tuple(shape)}")
                sd[name] = t
            elif e["kind"] == "quantized":
                fmt = get_format(e["format"])
                # no "scale_format": the format's default scale
                spec = QuantSpec(fmt, get_granularity(e["granularity"], fmt),
                                 None if e.get("scale_format") is None else get_scale_format(e["scale_format"]))
                codes = get(name, e.get("codes"), "codes")
                if spec.scaled:
                    scale = get(name, e.get("scale"), "scale")
                else:
                    scale = None if e.get("scale") is None else get(name, e["scale"], "scale")
                stored_as = getattr(fmt, "storage_dtype", None)  # FloatFormat's, or a block-scaled format's elements
                if stored_as is not None and codes.dtype == torch.uint8 and stored_as.itemsize == 1:
                    codes = codes.view(stored_as)  # a writer that stored fp8 codes as raw bytes
                sd[name] = QuantizedTensor(codes, scale, spec, shape, dtype)
            else:
                raise ValueError(f"{name}: unknown entry kind {e['kind']!r}")
        except ValueError as err:
            msg = str(err)
            raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: {name}: malformed description entry ({err!r})") from None
    return sd


def load_safetensors(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a file written by ``export_safetensors`` into ``model`` (which must be quantized the same way),
    bit for bit. Validates everything first; on a mismatch raises ValueError and leaves ``model`` untouched."""
    path = Path(path)
    sd = _read_safetensors(path)
    _validate_model_state(f"safetensors file {str(path)!r}", sd, model, strict)
    with torch.no_grad():
        model.load_state_dict(sd, strict=strict)
    return model
