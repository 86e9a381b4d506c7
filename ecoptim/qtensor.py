"""``QuantizedTensor``: a weight stored as low-bit codes + fp32 scales, usable as an ``nn.Parameter``.

It is a wrapper tensor subclass (the torchao pattern): it has the logical shape and compute dtype of the
weight it replaces but no dense storage of its own. Any torch op that reads it sees the dequantized
weight (``__torch_dispatch__`` dequantizes on the fly), so ``F.linear(x, weight)`` and autograd work
unchanged, and the gradient that lands in ``param.grad`` is an ordinary dense tensor. The one exception:
``F.linear`` of an FP8 weight on a GPU with FP8 matmuls multiplies the FP8 codes directly (``fp8_linear``, within
a stated tolerance of the dequantized weight's result; ``fp8_matmul`` switches it, see docs/guides/gpu.md).

Boundaries are explicit: ``QuantizedTensor.from_float(w, spec)`` quantizes, ``.dequantize()`` returns
the dense weight, ``.requantize_(w)`` overwrites codes and scales in place (what optimizers call).
Ops that would *write* into it through torch (``p.add_(...)``, ``torch.optim.SGD``) raise instead of
silently updating a temporary copy.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_map_only

from .codec import check_weight, dequantize, quantize
from .formats import FP8_E4M3, FP8_E5M2, PerRow, PerTensor, QuantSpec, get_format, get_granularity, get_scale_format

__all__ = ["QuantizedTensor", "DequantizedView", "fp8_matmul", "fp8_matmul_applies", "fp8_linear", "FP8_MATMUL_ENV"]

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
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        # F.linear of an FP8 weight may run on the FP8 codes (``fp8_linear``); every other op goes on to
        # __torch_dispatch__ as with torch's disabled torch-function handler
        if func is _LINEAR:
            kwargs = kwargs or {}
            x, weight = args[0] if args else kwargs.get("input"), args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, QuantizedTensor) and fp8_matmul_applies(x, weight, bias):
                return fp8_linear(x, weight, bias)
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})

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


# -- FP8 matmuls ---------------------------------------------------------------------------------------------------
_LINEAR = torch.nn.functional.linear
FP8_MATMUL_ENV = "ECOPTIM_FP8_MATMUL"
"""Environment switch of the FP8 matmul path: 'auto' (default: CUDA GPUs of compute capability >= 8.9),
'1' (wherever ``torch._scaled_mm`` runs, CPU included) or '0' (never). ``fp8_matmul`` overrides it."""
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _dense(t: Any) -> bool:
    """A tensor with dense values of its own (under torch.compile a fake or functional one), not a quantized
    weight or a view of one."""
    return isinstance(t, torch.Tensor) and not isinstance(t, (QuantizedTensor, DequantizedView))


_FP8_MAX = 448.0  # float8_e4m3fn's largest finite value: activations and gradients are quantized to E4M3
_forced: list[bool | None] = [None]  # fp8_matmul's setting (None: the environment's)


@contextmanager
def fp8_matmul(enabled: bool | None = True) -> Iterator[None]:
    """Within the block, FP8 weights' linears use the FP8 matmul path (``fp8_linear``) wherever it applies
    (``enabled=True``, CPU included, e.g. to test it), never (False), or per ``ECOPTIM_FP8_MATMUL`` (None)."""
    if enabled not in (None, True, False):
        raise ValueError(f"fp8_matmul(enabled=) takes True, False or None, got {enabled!r}")
    before = _forced[0]
    _forced[0] = enabled
    try:
        yield
    finally:
        _forced[0] = before


def _fp8_matmul_wanted(device: torch.device) -> bool:
    if _forced[0] is not None:
        return _forced[0]
    env = os.environ.get(FP8_MATMUL_ENV, "auto").strip().lower()
    if env in ("1", "on", "true"):
        return True
    if env in ("0", "off", "false"):
        return False
    if env != "auto":
        raise ValueError(f"{FP8_MATMUL_ENV}={env!r}: use 'auto', '1' or '0'")
    # FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_applies(x: Any, weight: QuantizedTensor, bias: Any = None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` takes the FP8 matmul path (``fp8_linear``): the switch is on
    (``fp8_matmul``), ``weight`` is a 2-D FP8 (E4M3/E5M2) weight with per-row or per-tensor scales stored in
    logical order, ``x`` a non-empty plain fp32/bf16/fp16 tensor on the weight's device, of the weight's dtype
    (any of them under autocast), and both matmul dimensions (in and out features) multiples of 16 (what
    ``torch._scaled_mm`` needs on a GPU)."""
    spec = weight.spec
    gran = spec.granularity
    return (_dense(x) and (bias is None or _dense(bias))
            and spec.format in (FP8_E4M3, FP8_E5M2) and weight.dim() == 2
            and (isinstance(gran, PerTensor) or (isinstance(gran, PerRow) and not gran.transposed))
            and x.dtype in _FLOATS and x.device == weight.device
            and (x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type))
            and x.dim() >= 1 and x.numel() > 0 and x.shape[-1] == weight.shape[1]
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
            # an E5M2 weight is the left operand (see _scaled_mm_rows), so the token count is a matmul dim too
            and (spec.format is not FP8_E5M2 or (x.numel() // max(x.shape[-1], 1)) % 16 == 0)
            and weight.codes.is_contiguous() and _fp8_matmul_wanted(x.device))


def _rowwise_e4m3(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as E4M3 codes with one fp32 scale per row: a ~= codes * scale, scale = absmax(row) / 448
    (1 for an all-zero row), codes rounded to nearest."""
    a32 = a.to(torch.float32)
    scale = a32.abs().amax(dim=1, keepdim=True).div_(_FP8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (a32 / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), scale


def _weight_scales(weight: QuantizedTensor) -> torch.Tensor:
    """The weight's fp32 scales, one per output row (the tensor's one repeated for a per-tensor weight)."""
    n = weight.shape[0]
    scale = weight.spec.scale.decode(weight.scale).to(torch.float32).reshape(-1)
    return scale.expand(n).contiguous() if scale.numel() == 1 else scale


def _scaled_mm_rows(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """(a * a_scale[:, None]) @ (b * b_scale[:, None]).T in bf16, for row-major FP8 ``a`` (M, K) and ``b`` (N, K)
    with fp32 row scales, by ``torch._scaled_mm`` (exact products, fp32 accumulation).

    CUDA's row-wise FP8 kernel takes E5M2 only as its left operand, so an E5M2 ``b`` computes the transposed
    product (b a^T)^T instead: the same sums."""
    if b.dtype == torch.float8_e5m2:
        out = torch._scaled_mm(b, a.t(), scale_a=b_scale.reshape(-1, 1), scale_b=a_scale.reshape(1, -1),
                               out_dtype=torch.bfloat16)
        return out.t()
    return torch._scaled_mm(a, b.t(), scale_a=a_scale.reshape(-1, 1), scale_b=b_scale.reshape(1, -1),
                            out_dtype=torch.bfloat16)


class _FP8Linear(torch.autograd.Function):
    """y = x W^T + b with W = diag(s_w) C (C: the weight's FP8 codes, s_w: its row scales) on FP8 matmuls.

    forward:   y  = scaled_mm(q(x), C^T; s_x, s_w)                 (q: row-wise E4M3, s_x its row scales)
    backward:  dx = scaled_mm(q(dy * s_w), C; s_g, 1)              (W's scales folded into dy: they run along
                                                                   this matmul's reduction dim)
               dW = dy^T x                                         (dense, in dy's dtype, as F.linear's)
    ``torch._scaled_mm`` multiplies the FP8 operands exactly and accumulates in fp32; its row-wise form returns
    bf16, cast to ``out_dtype`` (the compute dtype, or autocast's). Each gradient comes back in its input's
    dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
        n, k = weight.shape
        qx, s_x = _rowwise_e4m3(x.reshape(-1, k))
        y = _scaled_mm_rows(qx, s_x, weight.codes.view(n, k), _weight_scales(weight)).to(out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            qg, s_g = _rowwise_e4m3(dy2.to(torch.float32) * _weight_scales(weight)[None, :])
            codes_t = weight.codes.view(n, k).t().contiguous()  # C^T row-major: 1 byte per weight, not a dense W
            ones = torch.ones(k, dtype=torch.float32, device=dy.device)
            dx = _scaled_mm_rows(qg, s_g, codes_t, ones).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = dy2.t().mm(x.reshape(-1, k).to(dy2.dtype)).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None


def fp8_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on FP8 matmuls (``torch._scaled_mm``) without a dense weight: the forward
    and the input gradient multiply the weight's FP8 codes with E4M3 row-quantized activations (gradients), the
    weight's scales applied as matmul scales; the weight gradient is dense, as F.linear's. Agrees with the
    dequantize path within the rounding of the activations to E4M3 (relative error <= 2^-4 per element;
    ``tests/test_scaled_mm.py`` bounds the relative Frobenius error at 5%). Call it only where
    ``fp8_matmul_applies``. Under autocast the output has autocast's dtype, as F.linear's."""
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return _FP8Linear.apply(x, weight, bias, out_dtype)
