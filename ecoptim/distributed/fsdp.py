"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with quantized weights: low-bit shards, low-bit all-gathers.

What plain FSDP2 does with a ``QuantizedTensor`` parameter (torch 2.13, CPU/gloo): it *runs*, but silently
un-quantizes. ``fully_shard`` chunks each parameter with ``torch.chunk`` and copies the chunks into padded
buffers; the ``QuantizedTensor`` dispatch answers those ops by dequantizing, so every shard becomes a dense
fp32 tensor (4 B/param), the all-gathers move fp32, and the optimizer sees plain parameters (no ECO at
all). ``fsdp_status_report()`` / ``python benchmarks/distributed.py --fsdp-repro`` shows this.

``FSDPQuantizedTensor`` (a ``QuantizedTensor`` subclass) fixes it with FSDP2's tensor-subclass extension
points, the way torchao's float8/NF4 weights do:

* row sharding ops (``split``/``slice`` along dim 0, ``new_zeros``, ``copy_`` into a slice, ``view``,
  ``as_strided``) act on the codes and scales *without dequantizing*: a row slice of a per-row (or
  per-group) quantized weight is exactly the rows' codes and the rows' scales, so a shard is itself a
  valid quantized tensor and its re-quantization only needs its own rows;
* ``fsdp_pre_all_gather`` hands FSDP the shard's raw code bytes and scale bytes, and
  ``fsdp_post_all_gather`` rebuilds the unsharded quantized weight on the gathered buffers (zero copy).
  The forward's all-gather therefore moves 1 B/param for FP8/INT8 (0.5 for INT4) plus scales.

Gradients stay dense (fp32 reduce-scatter), and each rank's optimizer updates only its own rows:
``sharded_optimizer(AdamW)`` (``FSDPAdamW``, ``FSDPSGD``) runs the unchanged ecoptim update (ECO
injection, stochastic rounding) on the local shard of every ``DTensor`` parameter, keeps its state as
``DTensor`` shards (so ``torch.distributed.checkpoint`` can save and reshard it), agrees across ranks on
skipping non-finite steps, and gives every rank its own stochastic-rounding stream (shards are disjoint).

Limits (checked, with messages): weights are sharded along rows only, the row count must be divisible by
the world size (FSDP2 requires all-gather inputs of the padded shard's shape for uneven shards, which
flat code bytes cannot have), per-tensor scales are refused (one absmax over rows that live on different
ranks; use per-row or per-group), INT4 needs an even row length (two codes per byte), and the optimizer's
``kahan`` mode is not supported (its compensation buffer has scale-block shape).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..codec import quantize
from ..convert import spec_of
from ..formats import ABSMAX, BlockScaledFormat, FP4Format, IntFormat, PerGroup, PerRow, PerTensor, QuantSpec, Unscaled
from ..optim import SGD, AdamW
from ..optim.base import ParamStep
from ..qtensor import QuantizedTensor
from ..rng import KEY_DEVICE

__all__ = ["FSDPQuantizedTensor", "to_fsdp_quantized_", "fully_shard_quantized", "sharded_optimizer", "FSDPAdamW",
           "FSDPSGD", "fsdp_status_report", "local_shard", "gather_full", "check_shardable"]

aten = torch.ops.aten


def _per_row(spec: QuantSpec, shape: torch.Size) -> tuple[int, int]:
    """(code elements per row, scale elements per row) of a row-shardable spec."""
    rows = shape[0] if len(shape) else 1
    numel = 1
    for s in shape:
        numel *= s
    cols = numel // max(rows, 1)
    codes = cols // 2 if isinstance(spec.format, IntFormat) and spec.format.bits == 4 else cols
    if isinstance(spec.granularity, PerRow):
        scales = 1
    elif isinstance(spec.granularity, PerGroup):
        scales = cols // spec.granularity.group_size
    else:
        scales = 0
    return codes, scales


def check_shardable(spec: QuantSpec, shape: torch.Size, world_size: int, name: str = "weight") -> None:
    """Raise a ValueError naming the problem if a quantized weight cannot be row-sharded ``world_size`` ways."""
    if len(shape) < 1:
        raise ValueError(f"{name}: a 0-d quantized weight cannot be sharded")
    if spec.scale != ABSMAX or isinstance(spec.format, (BlockScaledFormat, FP4Format)):
        raise ValueError(f"{name}: FSDP row sharding of {spec} weights (MX / NVFP4 / FP4 codes, E8M0 or two-level "
                         "scales) is not supported; use DDP, or an fp32-scaled FP8/INT format for FSDP")
    if isinstance(spec.granularity, PerTensor) and world_size > 1:
        raise ValueError(f"{name}: per-tensor scales cannot be sharded (one absmax over rows held by different "
                         "ranks); quantize with granularity='row' or 'group<G>' for FSDP")
    if not isinstance(spec.granularity, (PerRow, PerGroup, Unscaled, PerTensor)):
        raise ValueError(f"{name}: unsupported granularity {spec.granularity}")
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(spec.format, IntFormat) and spec.format.bits == 4 and (numel // shape[0]) % 2:
        raise ValueError(f"{name}: INT4 packs two codes per byte, so FSDP needs an even row length, got "
                         f"{numel // shape[0]}")
    if shape[0] % world_size:
        raise ValueError(f"{name}: {shape[0]} rows cannot be split evenly over {world_size} ranks; FSDP2's "
                         "all-gather extension needs even shards (pad the layer or change the world size)")


class FSDPQuantizedTensor(QuantizedTensor):
    """A ``QuantizedTensor`` that FSDP2 shards by rows and all-gathers as codes + scales (see module doc)."""

    def _with(self, codes: torch.Tensor, scale: torch.Tensor | None, shape: torch.Size | None = None
              ) -> "FSDPQuantizedTensor":
        return FSDPQuantizedTensor(codes, scale, self.spec, self.shape if shape is None else torch.Size(shape),
                                   self.dtype)

    @staticmethod
    def from_quantized(q: QuantizedTensor) -> "FSDPQuantizedTensor":
        return FSDPQuantizedTensor(q.codes, q.scale, q.spec, q.shape, q.dtype)

    def __deepcopy__(self, memo: dict) -> "FSDPQuantizedTensor":
        if id(self) in memo:
            return memo[id(self)]
        new = self._with(self.codes.clone(), None if self.scale is None else self.scale.clone())
        if isinstance(self, nn.Parameter):
            new = nn.Parameter(new, requires_grad=self.requires_grad)
        memo[id(self)] = new
        return new

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple, outer_size: Any, outer_stride: Any) -> "FSDPQuantizedTensor":
        spec, shape, dtype = meta
        return FSDPQuantizedTensor(inner["codes"], inner.get("scale"), spec, shape, dtype)

    def __repr__(self) -> str:
        return "FSDP" + super().__repr__()

    # -- row slicing without dequantizing -------------------------------------------------------------
    def _rows(self, start: int, end: int) -> "FSDPQuantizedTensor":
        rows = self.shape[0]
        start, end = max(0, min(start, rows)), max(0, min(end, rows))
        end = max(start, end)
        cpr, spr = _per_row(self.spec, self.shape)
        codes = self.codes[start * cpr:end * cpr]
        scale = None if self.scale is None else (
            self.scale if spr == 0 else self.scale[start * spr:end * spr])
        return self._with(codes, scale, (end - start, *self.shape[1:]))

    @classmethod
    def _zeros(cls, like: "FSDPQuantizedTensor", size: Iterable[int]) -> "FSDPQuantizedTensor":
        size = torch.Size(size)
        codes, scale = quantize(torch.zeros(size, device=like.codes.device), like.spec)
        if like.scale is not None and scale is None:  # per-tensor: keep one scale slot
            scale = like.scale.new_ones(like.scale.shape)
        return FSDPQuantizedTensor(codes, scale, like.spec, size, like.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is aten.split.Tensor:
            t, size = args[0], args[1]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if dim not in (0, -t.dim()):
                raise NotImplementedError("FSDPQuantizedTensor only splits along rows (dim 0)")
            return [t._rows(s, s + size) for s in range(0, t.shape[0], size)] or [t._rows(0, 0)]
        if func is aten.slice.Tensor:
            t = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            start = args[2] if len(args) > 2 else kwargs.get("start", 0)
            end = args[3] if len(args) > 3 else kwargs.get("end", t.shape[0])
            step = args[4] if len(args) > 4 else kwargs.get("step", 1)
            if dim not in (0, -t.dim()) or step != 1:
                raise NotImplementedError("FSDPQuantizedTensor only slices contiguous rows (dim 0, step 1)")
            start = 0 if start is None else (start + t.shape[0] if start < 0 else start)
            end = t.shape[0] if end is None else (end + t.shape[0] if end < 0 else end)
            return t._rows(start, end)
        if func in (aten.new_zeros.default, aten.new_empty.default):
            return cls._zeros(args[0], args[1])
        if func is aten.view.default:
            t, size = args[0], list(args[1])
            if list(t.shape) == size:
                return t._with(t.codes, t.scale)
            if size in ([-1], [t.numel()]):
                # FSDP keeps a 1-D handle on the padded shard (``_sharded_param_data``) but reads its data only
                # for parameters *without* the all-gather extension; an alias (same shape) is enough, and
                # being a subclass it keeps FSDP from comparing storage pointers of the wrapper.
                return t._with(t.codes, t.scale)
            raise NotImplementedError(f"FSDPQuantizedTensor cannot be viewed as {size}")
        if func is aten.as_strided.default:
            t, size, stride = args[0], list(args[1]), list(args[2])
            offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0)
            if size == list(t.shape) and stride == list(t.stride()) and not offset:
                return t._with(t.codes, t.scale)
            raise NotImplementedError("FSDPQuantizedTensor supports only the identity as_strided")
        if func is aten.is_pinned.default:
            return args[0].codes.is_pinned()
        if func is aten._to_copy.default and isinstance(args[0], FSDPQuantizedTensor):
            s = args[0]
            if set(kwargs) <= {"device", "non_blocking"} or kwargs.get("dtype") in (None, s.dtype):
                dev = kwargs.get("device") or s.device
                return s._with(s.codes.to(dev), None if s.scale is None else s.scale.to(dev))
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._with(args[0].codes, args[0].scale)
        if func is aten.clone.default:
            s = args[0]
            return s._with(s.codes.clone(), None if s.scale is None else s.scale.clone())
        return QuantizedTensor.__torch_dispatch__.__func__(cls, func, types, args, kwargs)

    # -- FSDP2 all-gather extension ---------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...],
                            module: nn.Module, mp_policy: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        """All-gather the shard's code bytes and scale bytes (1-D uint8), never the dequantized weight."""
        inputs = [self.codes.reshape(-1).view(torch.uint8)]
        if self.scale is not None:
            inputs.append(self.scale.reshape(-1).view(torch.uint8))
        return tuple(inputs), (tuple(outer_size), self.codes.dtype, mesh.size())

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        outer_size, codes_dtype, world_size = metadata
        codes = all_gather_outputs[0].reshape(-1).view(codes_dtype)
        scale = None
        if self.scale is not None:
            scale = all_gather_outputs[1].reshape(-1).view(torch.float32)
            if isinstance(self.spec.granularity, PerTensor):
                scale = scale[:1]  # every rank sent the same single scale (world size 1 only)
        if out is not None:  # later all-gathers refill the same buffers: nothing to rebuild
            if out.codes.untyped_storage().data_ptr() != codes.untyped_storage().data_ptr():
                out.codes.copy_(codes)
                if scale is not None:
                    out.scale.copy_(scale)
            return None
        full = FSDPQuantizedTensor(codes, scale, self.spec, torch.Size(outer_size), self.dtype)
        return full, tuple(t for t in (codes, scale) if t is not None)


def to_fsdp_quantized_(model: nn.Module, world_size: int | None = None) -> nn.Module:
    """Swap every ``QuantizedTensor`` parameter for an ``FSDPQuantizedTensor`` on the same codes/scales.

    With ``world_size`` given (default: the initialised process group's), checks that every quantized weight
    can be row-sharded that many ways (see ``check_shardable``).
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    for mname, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, QuantizedTensor) and not isinstance(p, FSDPQuantizedTensor):
                fq = f"{mname}.{pname}" if mname else pname
                check_shardable(p.spec, p.shape, world_size, fq)
                setattr(mod, pname, nn.Parameter(FSDPQuantizedTensor.from_quantized(p), requires_grad=p.requires_grad))
    return model


def fully_shard_quantized(model: nn.Module, submodules: Iterable[nn.Module] | None = None, **fsdp_kwargs: Any
                          ) -> nn.Module:
    """``fully_shard`` each of ``submodules`` (e.g. the transformer blocks) and then the root, after
    ``to_fsdp_quantized_``. Keyword arguments go to ``fully_shard`` (``mesh``, ``reshard_after_forward``...)."""
    from torch.distributed.fsdp import fully_shard
    mesh = fsdp_kwargs.get("mesh")
    to_fsdp_quantized_(model, mesh.size() if mesh is not None else None)
    for m in submodules or ():
        fully_shard(m, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def gather_full(p: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The whole weight on every rank (a collective): a ``QuantizedTensor`` built from the gathered codes and
    scales of an ``FSDPQuantizedTensor`` shard (bit for bit, no dequantization), else ``full_tensor()``."""
    from torch.distributed.tensor import DTensor
    if not isinstance(p, DTensor):
        return p
    loc = p._local_tensor
    if not isinstance(loc, QuantizedTensor):
        return p.full_tensor()
    ws = dist.get_world_size(group)
    parts = []
    for t in (loc.codes, loc.scale):
        if t is None:
            parts.append(None)
            continue
        b = t.reshape(-1).view(torch.uint8)
        out = torch.empty(ws * b.numel(), dtype=torch.uint8, device=b.device)
        dist.all_gather_single(out, b.contiguous(), group=group)
        parts.append(out.view(t.dtype))
    scale = parts[1]
    if scale is not None and isinstance(loc.spec.granularity, PerTensor):
        scale = scale[:1]
    return QuantizedTensor(parts[0], scale, loc.spec, p.shape, p.dtype)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor
    return t._local_tensor if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------------------------------------
# Optimizers on sharded parameters
# --------------------------------------------------------------------------------------------------------

class _ShardedMixin:
    """Steps the local shard of each DTensor parameter through the optimizer's own ``step_group`` (the route
    every ecoptim step takes: the fused kernel where it applies, else the reference path)."""

    _block_skip_ok = False  # the skip decision is taken rank-wide (_grads_finite below)
    _clip_ok = False  # gradients are DTensor shards: their norm needs a collective (torch's clip does it)
    _state8_ok = False  # an 8-bit state's per-block absmax is not sharded like the parameter

    def _grads_finite(self) -> bool:  # type: ignore[override]
        flags = [torch.isfinite(local_shard(p.grad)).all() for g in self.param_groups for p in g["params"]
                 if p.grad is not None]
        ok = torch.stack(flags).all() if flags else torch.tensor(True)
        ok = ok.to(torch.int32)
        if dist.is_initialized():  # every rank must take the same skip decision
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    def generator(self, device: torch.device) -> torch.Generator:  # type: ignore[override]
        """Per-rank stochastic-rounding stream: ranks round disjoint shards, so their draws must differ. On CPU
        for every ``device``, as ``QuantOptimizer.generator`` (the same keys on CPU and CUDA)."""
        if KEY_DEVICE not in self._generators:
            rank = dist.get_rank() if dist.is_initialized() else 0
            g = torch.Generator(device=KEY_DEVICE)
            g.manual_seed((self.seed * 1_000_003 + rank) % (2 ** 63))
            self._generators[KEY_DEVICE] = g
        return self._generators[KEY_DEVICE]

    @contextmanager
    def _params_to_step(self, group: dict) -> Iterator[list[ParamStep]]:  # type: ignore[override]
        """The rank-local shard of every DTensor parameter (with its gradient shard and its state's local
        shards), for the unchanged ``step_group``; afterwards every per-element state tensor becomes a DTensor
        shard placed like its parameter (so that ``torch.distributed.checkpoint`` can save and reshard it)."""
        from torch.distributed.tensor import DTensor
        if group["mode"] == "kahan" and any(isinstance(p, DTensor) and p.grad is not None for p in group["params"]):
            raise NotImplementedError("mode='kahan' is not supported on sharded parameters; use 'eco'")
        params, shards = [], []  # shards: (parameter, its local shard's ParamStep)
        for p in group["params"]:
            if p.grad is None:
                continue
            if not isinstance(p, DTensor):
                params.append(ParamStep(p, p.grad, self.state[p], spec_of(p)))
                continue
            local = p._local_tensor
            local.grad = local_shard(p.grad)  # where fused.applies reads it
            local_state = {k: local_shard(v) for k, v in self.state[p].items()}
            params.append(ParamStep(local, local.grad, local_state, spec_of(local)))
            shards.append((p, params[-1]))
        try:
            yield params
        finally:
            for p, shard in shards:
                shard.param.grad = None
                _store_local_state(self.state[p], p, shard)


def _store_local_state(state: dict, p: torch.Tensor, shard: ParamStep) -> None:
    """Write the local ``shard.state`` back into DTensor parameter ``p``'s ``state``: a tensor of the shard's shape
    as a DTensor shard like ``p`` (reusing the one that already wraps it), anything else as it is."""
    from torch.distributed.tensor import DTensor
    for k, v in shard.state.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(shard.param.shape):
            old = state.get(k)
            if not (isinstance(old, DTensor) and old._local_tensor is v):
                state[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride())
        else:
            state[k] = v


def sharded_optimizer(cls: type) -> type:
    """An ecoptim optimizer class that works on FSDP2 (DTensor) parameters, e.g. ``sharded_optimizer(AdamW)``."""
    return type(f"FSDP{cls.__name__}", (_ShardedMixin, cls), {"__doc__": f"{cls.__name__} on FSDP2 shards "
                                                                         "(see ecoptim.distributed.fsdp)."})


FSDPAdamW = sharded_optimizer(AdamW)
FSDPSGD = sharded_optimizer(SGD)


# --------------------------------------------------------------------------------------------------------
# Reproduction of what plain FSDP2 does with QuantizedTensor parameters
# --------------------------------------------------------------------------------------------------------

def _repro_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from ..convert import quantize_
    out = {}
    for label in ("plain fully_shard", "fully_shard_quantized"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False))
        quantize_(model, "fp8_e4m3", filter_fn=lambda m, n: isinstance(m, nn.Linear))
        if label == "plain fully_shard":
            fully_shard(model)
        else:
            fully_shard_quantized(model)
        w = model[0].weight
        loc = local_shard(w)
        model(torch.randn(4, 16)).sum().backward()
        out[label] = (f"param {type(w).__name__}, local shard {type(loc).__name__}{tuple(loc.shape)}"
                      + (f" codes {loc.codes.dtype}" if isinstance(loc, QuantizedTensor) else " (dense: dequantized!)")
                      + f", grad {type(local_shard(w.grad)).__name__}")
    return out


def fsdp_status_report(world_size: int = 2) -> str:
    """Run FSDP2 on 2 CPU/gloo processes with and without ``FSDPQuantizedTensor``; describe the shards."""
    from .launch import run_workers
    res = run_workers(_repro_worker, world_size)[0]
    return "\n".join(f"{k:>24s}: {v}" for k, v in res.items())
