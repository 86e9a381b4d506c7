"""``QuantizedTensor``: a weight stored as low-bit codes + fp32 scales, usable as an ``nn.Parameter``.

It is a wrapper tensor subclass (the torchao pattern): it has the logical shape and compute dtype of the
weight it replaces but no dense storage of its own. Any torch op that reads it sees the dequantized
weight (``__torch_dispatch__`` dequantizes on the fly), so ``F.linear(x, weight)`` and autograd work
unchanged, and the gradient that lands in ``param.grad`` is an ordinary dense tensor.

Boundaries are explicit: ``QuantizedTensor.from_float(w, spec)`` quantizes, ``.dequantize()`` returns
the dense weight, ``.requantize_(w)`` overwrites codes and scales in place (what optimizers call).
Ops that would *write* into it through torch (``p.add_(...)``, ``torch.optim.SGD``) raise instead of
silently updating a temporary copy.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from .codec import check_weight, dequantize, quantize
from .formats import QuantSpec, get_format, get_granularity, get_scale_format

__all__ = ["QuantizedTensor", "DequantizedView"]

aten = torch.ops.aten


def _spec_key(spec: QuantSpec) -> tuple[str, str]:
    return str(spec.format), str(spec.granularity)


def _scale_key(spec: QuantSpec) -> str:
    return str(spec.scale)


def _rebuild_quantized(codes: torch.Tensor, scale: torch.Tensor | None, fmt: str, gran: str,
                       shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool,
                       is_param: bool, scale_format: str | None = None) -> "QuantizedTensor":
    # scale_format None: a pickle written before specs named their scale format, i.e. the format's default
    spec = QuantSpec(get_format(fmt), get_granularity(gran, get_format(fmt)),
                     None if scale_format is None else get_scale_format(scale_format))
    t = QuantizedTensor(codes, scale, spec, torch.Size(shape), dtype)
    if is_param:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(requires_grad) if requires_grad else t


# Let torch.load(weights_only=True) rebuild quantized checkpoints.
torch.serialization.add_safe_globals([_rebuild_quantized])


class QuantizedTensor(torch.Tensor):
    codes: torch.Tensor
    scale: torch.Tensor | None
    spec: QuantSpec

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec, shape: torch.Size,
                dtype: torch.dtype, requires_grad: bool = False) -> "QuantizedTensor":
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device,
                                                   requires_grad=requires_grad)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec, shape: torch.Size,
                 dtype: torch.dtype, requires_grad: bool = False) -> None:
        self.codes = codes
        self.scale = scale
        self.spec = spec

    # -- boundaries -------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec, rounding: str = "nearest",
                   generator: torch.Generator | None = None) -> "QuantizedTensor":
        """Quantize a dense float tensor (compute dtype = ``w.dtype``)."""
        check_weight(w, spec)
        codes, scale = quantize(w, spec, rounding, generator)
        return cls(codes, scale, spec, w.shape, w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``decode(codes) * scale`` (fp32 maths, cast to ``dtype`` or the compute dtype)."""
        return dequantize(self.codes, self.scale, self.spec, self.shape, dtype or self.dtype)

    @torch.no_grad()
    def requantize_(self, w: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None,
                    stats: dict | None = None) -> "QuantizedTensor":
        """Overwrite codes and scales in place with the quantization of ``w`` (scale recomputed, so a row
        that grew past the old range is not clipped). ``stats``: see ``ecoptim.codec.quantize``."""
        codes, scale = quantize(w, self.spec, rounding, generator, stats=stats)
        self.codes.copy_(codes)
        if scale is not None:
            self.scale.copy_(scale)
        return self

    # -- serialization, copies ---------------------------------------------------------------------
    def __reduce_ex__(self, protocol: int) -> tuple[Any, tuple[Any, ...]]:
        fmt, gran = _spec_key(self.spec)
        return (_rebuild_quantized, (self.codes, self.scale, fmt, gran, tuple(self.shape), self.dtype,
                                     self.requires_grad, isinstance(self, torch.nn.Parameter),
                                     _scale_key(self.spec)))

    def __deepcopy__(self, memo: dict) -> "QuantizedTensor":
        if id(self) in memo:
            return memo[id(self)]
        new = _rebuild_quantized(self.codes.clone(), None if self.scale is None else self.scale.clone(),
                                 *_spec_key(self.spec), tuple(self.shape), self.dtype, self.requires_grad,
                                 isinstance(self, torch.nn.Parameter), _scale_key(self.spec))
        memo[id(self)] = new
        return new

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        inner = ["codes"] if self.scale is None else ["codes", "scale"]
        return inner, (self.spec, self.shape, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple, outer_size: Any, outer_stride: Any) -> "QuantizedTensor":
        spec, shape, dtype = meta
        return QuantizedTensor(inner["codes"], inner.get("scale"), spec, shape, dtype)

    def _stable_hash_for_caching(self) -> str:
        """Cache key for torch.compile's AOT autograd cache: everything the traced graph depends on
        (spec, logical shape/dtype, inner tensors' metadata), not the values."""
        import hashlib

        inner = [(t.dtype, tuple(t.shape), tuple(t.stride()), t.device.type)
                 for t in (self.codes, self.scale) if t is not None]
        key = repr((type(self).__qualname__, _spec_key(self.spec), _scale_key(self.spec), tuple(self.shape), self.dtype,
                    self.requires_grad, inner))
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, spec={self.spec}, dtype={self.dtype}, "
                f"codes={self.codes.dtype})")

    def _dequantize_index(self, dim: int, index: int) -> torch.Tensor | None:
        """``self.dequantize()[index]`` along dim 0 (one expert of a stack) without dequantizing the others, or
        None when that slice does not start and end on whole scale blocks (and bytes, for packed INT4)."""
        if dim not in (0, -self.dim()) or self.dim() < 2 or not self.codes.is_contiguous():
            return None
        n_lead = self.shape[0]
        index = index + n_lead if index < 0 else index
        if not 0 <= index < n_lead:
            return None  # out of range: the dense path raises torch's IndexError
        n = self.numel() // n_lead
        start = index * n
        packed = self.codes.numel() != self.numel()  # INT4: two codes per byte
        if packed and (start % 2 or n % 2):
            return None
        scale = self.scale
        if scale is not None:
            nb, bs = self.spec.granularity.blocks(self.shape)
            if nb > 1:
                if n % bs:
                    return None
                scale = scale[start // bs:(start + n) // bs]
        flat = self.codes.reshape(-1)
        v = self.spec.format.decode(flat[start // 2:(start + n) // 2] if packed else flat[start:start + n], n)
        if scale is not None:
            v = (v.reshape(scale.numel(), -1) * scale[:, None]).reshape(-1) if scale.numel() > 1 else v * scale
        return self.spec.granularity.from_storage_order(v, self.shape[1:]).to(self.dtype)

    def _with(self, codes: torch.Tensor, scale: torch.Tensor | None) -> "QuantizedTensor":
        return QuantizedTensor(codes, scale, self.spec, self.shape, self.dtype)

    # -- dispatch -------------------------------------------------------------------------------------
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._with(args[0].codes, args[0].scale)
        if func is aten.clone.default:
            s = args[0]
            return s._with(s.codes.clone(), None if s.scale is None else s.scale.clone())
        if func is aten.copy_.default:
            return _copy_into(args[0], args[1])
        if func is aten._to_copy.default and isinstance(args[0], QuantizedTensor):
            s = args[0]
            if set(kwargs) <= {"device", "non_blocking"} or kwargs.get("dtype") in (None, s.dtype):
                dev = kwargs.get("device") or s.device
                q = QuantizedTensor(s.codes.to(dev), None if s.scale is None else s.scale.to(dev), s.spec,
                                    s.shape, s.dtype)
                return q
        if func._schema.is_mutable:
            raise RuntimeError(_WRITE_MESSAGE.format(func=func))
        if func is aten.select.int and isinstance(args[0], QuantizedTensor) and not kwargs:
            one = args[0]._dequantize_index(*args[1:])
            if one is not None:
                return DequantizedView(one)
        args, kwargs = tree_map_only(QuantizedTensor, lambda t: t.dequantize(), (args, kwargs))
        out = func(*args, **kwargs)
        if func.is_view:  # an expert w[e], a transpose, unbind: a view of the dequantized values, read-only
            return tree_map_only(torch.Tensor, DequantizedView, out)
        return out


_WRITE_MESSAGE = ("{func} would write into a QuantizedTensor through a dense temporary and lose the update; "
                  "update quantized weights with an ecoptim optimizer or QuantizedTensor.requantize_()")


def _written_args(func, args: tuple, kwargs: dict) -> list:
    """The arguments ``func`` writes into (those its schema marks with a write alias, e.g. ``self`` of ``add_``)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(a.name))
    return out


class DequantizedView(torch.Tensor):
    """What a view op (indexing one expert, ``transpose``, ``unbind``, ...) of a ``QuantizedTensor`` returns: the
    dequantized values of the view, read-only.

    Reading it (``F.linear``, ``torch.bmm``, ``torch._grouped_mm``, ...) computes on the plain dense tensor and
    returns plain tensors, bit for bit what the same op on the dequantized weight gives. Writing into it raises,
    because the values are a temporary: a write would be lost instead of reaching the quantized weight. Views of
    it stay ``DequantizedView``.
    """

    _dense: torch.Tensor

    @staticmethod
    def __new__(cls, dense: torch.Tensor) -> "DequantizedView":
        return torch.Tensor._make_wrapper_subclass(cls, dense.shape, strides=dense.stride(),
                                                   storage_offset=dense.storage_offset(), dtype=dense.dtype,
                                                   device=dense.device, requires_grad=False)

    def __init__(self, dense: torch.Tensor) -> None:
        self._dense = dense

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_dense"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: None, outer_size: Any, outer_stride: Any) -> "DequantizedView":
        return DequantizedView(inner["_dense"])

    def __repr__(self) -> str:
        return f"DequantizedView({self._dense!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func._schema.is_mutable and any(isinstance(t, (DequantizedView, QuantizedTensor))
                                           for t in _written_args(func, args, kwargs)):
            raise RuntimeError(_WRITE_MESSAGE.format(func=func) + " (this tensor is a view of a quantized weight)")
        args, kwargs = tree_map_only((DequantizedView, QuantizedTensor), lambda t: t._dense if isinstance(
            t, DequantizedView) else t.dequantize(), (args, kwargs))
        out = func(*args, **kwargs)
        if func.is_view:
            return tree_map_only(torch.Tensor, DequantizedView, out)
        return out


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)``: what ``load_state_dict`` calls. Refuses mismatches with a message saying what differs."""
    if not isinstance(dst, QuantizedTensor):
        # a dense destination reads a quantized source as its dequantized values
        dst.copy_(src.dequantize(dst.dtype))
        return dst
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"cannot load a tensor of shape {tuple(src.shape)} into a quantized weight of shape "
                         f"{tuple(dst.shape)}")
    if isinstance(src, QuantizedTensor):
        if _spec_key(src.spec) != _spec_key(dst.spec) or _scale_key(src.spec) != _scale_key(dst.spec):
            raise ValueError(f"checkpoint holds a {src.spec} quantized weight but the model expects {dst.spec}; "
                             "quantize the model with the checkpoint's format or load a dense checkpoint")
        if src.codes.shape != dst.codes.shape or (src.scale is None) != (dst.scale is None) or (
                dst.scale is not None and src.scale.shape != dst.scale.shape):
            raise ValueError(f"quantized weight of shape {tuple(dst.shape)}: checkpoint codes/scales have shapes "
                             f"{tuple(src.codes.shape)}/{None if src.scale is None else tuple(src.scale.shape)}, "
                             f"expected {tuple(dst.codes.shape)}/"
                             f"{None if dst.scale is None else tuple(dst.scale.shape)}")
        dst.codes.copy_(src.codes)
        if dst.scale is not None:
            dst.scale.copy_(src.scale)
        return dst
    if not src.is_floating_point():
        raise ValueError(f"cannot load a {src.dtype} tensor into a quantized weight; expected a float tensor")
    dst.requantize_(src.to(torch.float32))
    return dst
