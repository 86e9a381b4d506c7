"""The CPU kernels of ``ecoptim.ops``: pack the op's named arguments into ``eco_step_args`` structs (``abi``) and
call the C library's ``eco_step_many`` once per op call (one thread team for every tensor).

The library is the one ``ecoptim.kernels.load()`` builds on first use; registering the kernels builds nothing.
The scalars are derived here from the op's hyper-parameters with the expressions the reference path uses (in
Python floats, then rounded to fp32 by the struct, as ATen rounds Python scalars), so the bits are the same.
"""
from __future__ import annotations

import array
import collections
import ctypes
import itertools
import operator

import torch

from ... import kernels, ops
from ...formats import FORMATS as FORMATS_BY_NAME
from .abi import Dtype, Format, Optimizer, ScaleFormat, StateStorage, StepArgs

__all__ = ["FORMATS", "SCALE_FORMATS", "PREPARE", "PreparedCall", "adamw_step_cpu", "sgd_step_cpu", "clear_packed",
           "prepare_adamw", "prepare_sgd"]

# the formats whose grids the kernel knows by heart (ecoptim.formats name -> eco_format: the element grid; the MX
# and NVFP4 formats are their element format with a scale format of their own, see SCALE_FORMATS)
FORMATS: dict[str, int] = {"fp8_e4m3": Format.FP8_E4M3, "fp8_e5m2": Format.FP8_E5M2, "int8": Format.INT8,
                           "bf16": Format.BF16, "int4": Format.INT4, "fp4_e2m1": Format.FP4_E2M1,
                           "mxfp8": Format.FP8_E4M3, "mxfp4": Format.FP4_E2M1, "nvfp4": Format.FP4_E2M1}
# the scale formats the kernel computes (ecoptim.formats.SCALE_FORMATS name -> eco_scale_format)
SCALE_FORMATS: dict[str, int] = {"absmax": ScaleFormat.ABSMAX, "e8m0": ScaleFormat.E8M0_FLOOR,
                                 "e8m0_ceil": ScaleFormat.E8M0_CEIL, "e4m3_fp32": ScaleFormat.E4M3_TENSOR}
# bytes of a stored scale of n blocks, per scale format (formats.ScaleFormat.stored_shape and dtype)
_SCALE_BYTES = {ScaleFormat.ABSMAX: lambda n: 4 * n, ScaleFormat.E8M0_FLOOR: lambda n: n,
                ScaleFormat.E8M0_CEIL: lambda n: n, ScaleFormat.E4M3_TENSOR: lambda n: n + 4}
_STORAGE = {torch.float32: StateStorage.FP32, torch.bfloat16: StateStorage.BF16, torch.uint8: StateStorage.EIGHT_BIT}
_FP8_TABLES: dict[torch.dtype, torch.Tensor] = {}


def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    # fp8 decode table taken from torch itself: the kernel's dequantization is torch's, by construction
    if dtype not in _FP8_TABLES:
        _FP8_TABLES[dtype] = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return _FP8_TABLES[dtype]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_lists(n: int, **lists) -> None:
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"ecoptim fused step: {name} has {len(values)} entries for {n} tensors; pass one per "
                             "tensor")


def _full_lists(n: int, lists: dict[str, list]) -> dict[str, list]:
    """``lists`` (name -> the op's argument) with every short form written out to n entries
    (``ops.expand_short_forms``); a list of another length is refused (``_check_lists``)."""
    full = ops.expand_short_forms(n, lists)
    _check_lists(n, **full)
    return full


def _check_scale(name: str, t: torch.Tensor | None, scale_format: int, num_blocks: int) -> None:
    # the kernel writes num_blocks scales in this layout: a tensor of another size would be written out of bounds
    # (an empty weight has no block, and its scale is neither read nor written)
    if t is not None and num_blocks and not (t.is_contiguous() and t.numel() * t.element_size() ==
                              _SCALE_BYTES[scale_format](num_blocks)):
        raise ValueError(f"ecoptim fused step: {name} holds {t.numel() * t.element_size()} bytes, but a scale of "
                         f"{num_blocks} blocks in its scale format takes {_SCALE_BYTES[scale_format](num_blocks)} "
                         "(contiguous); pass the scale the weight's QuantSpec stores")


def _weights_args(a: StepArgs, k: int, codes, scales, grads, formats, scale_formats, block_sizes, master_weights,
                  carried_errors, compensation_codes, compensation_scales) -> None:
    """Fill in the weight, gradient (``grads``: as ``_readable_grads`` gives them) and mode buffers of tensor k's
    struct ``a``."""
    if formats[k] not in FORMATS:
        raise ValueError(f"ecoptim fused step: unknown format {formats[k]!r}; one of {sorted(FORMATS)}")
    if scale_formats[k] not in SCALE_FORMATS:
        raise ValueError(f"ecoptim fused step: unknown scale format {scale_formats[k]!r}; one of "
                         f"{sorted(SCALE_FORMATS)}")
    code, fmax = FORMATS[formats[k]], FORMATS_BY_NAME[formats[k]].max
    g = grads[k]
    w = a.weights
    w.codes, w.scales = codes[k].data_ptr(), _ptr(scales[k])
    if code in (Format.FP8_E4M3, Format.FP8_E5M2):
        w.fp8_table = _fp8_table(codes[k].dtype).data_ptr()
    n = g.numel()
    w.block_size = block_sizes[k]
    w.num_blocks = n // block_sizes[k] if block_sizes[k] > 0 else 0
    w.format, w.format_max = code, fmax
    w.scale_format = SCALE_FORMATS[scale_formats[k]]
    _check_scale("scales", scales[k], w.scale_format, w.num_blocks)
    _check_scale("compensation_scales", compensation_scales[k], w.scale_format, w.num_blocks)
    a.gradient.values, a.gradient.dtype = g.data_ptr(), Dtype.BF16 if g.dtype == torch.bfloat16 else Dtype.FP32
    m = a.modes
    m.master, m.carried_error = _ptr(master_weights[k]), _ptr(carried_errors[k])
    m.compensation_codes, m.compensation_scales = _ptr(compensation_codes[k]), _ptr(compensation_scales[k])


# -- packed structs kept between calls ------------------------------------------------------------------------------
# Packing n structs field by field costs microseconds per tensor, every step. An op call whose tensors are the
# previous call's (same data pointers, dtypes, sizes, formats, block sizes: everything the per-tensor packing
# reads except the gradients and the step's scalars) reuses that call's structs and rewrites only what changes
# from step to step (gradient pointers and dtypes, stochastic-rounding keys, the scalars) with one strided write
# per field over all the structs. The key holds every input of the kept fields, so the op never reuses a struct
# for other tensors: a replaced, re-allocated, re-typed or resized tensor (data pointer, dtype or numel) misses.
# A ``PreparedCall`` kept by its caller runs its structs again without this key, on the caller's checks.

_DTYPE = operator.attrgetter("dtype")
_LAYOUT = operator.attrgetter("layout")
_STRIDE = ctypes.sizeof(StepArgs)
_KEPT_CALLS = 16  # param groups whose structs are kept (least recently used dropped)
_TORCH_DTYPES = {"float": torch.float32, "int32_t": torch.int32, "int64_t": torch.int64}


def _pointers(ts: list[torch.Tensor | None]) -> tuple[int, ...]:
    if ts and ts[0] is None and all(map(operator.is_, ts, itertools.repeat(None))):
        return (0,) * len(ts)  # an unused optional list
    try:
        return tuple(map(torch.Tensor.data_ptr, ts))
    except TypeError:  # some entries are None
        return tuple(0 if t is None else t.data_ptr() for t in ts)


def _field_layout(path: str) -> tuple[int, str]:
    # byte offset within eco_step_args and C type of a field named "struct.field"
    outer, inner = path.split(".")
    member = getattr(StepArgs, outer)
    sub = dict(StepArgs._fields_)[outer]
    ctype = dict(sub._fields_)[inner]
    offset = member.offset + getattr(sub, inner).offset
    if ctype is ctypes.c_float:
        return offset, "float"
    if ctype is ctypes.c_int32 or ctype is ctypes.c_uint32 * 2:
        return offset, "int32_t"
    return offset, "int64_t"  # int64_t and pointers


class _Packed:
    """The structs of one op call (``array``, and the pointers ``eco_step_many`` takes), with strided tensor views
    of their fields for writing one field of every struct at once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.array = (StepArgs * n)()
        self.pointers = (ctypes.POINTER(StepArgs) * n)(*map(ctypes.pointer, self.array))
        self.raw = torch.frombuffer(self.array, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        self.views: dict[str, torch.Tensor] = {}
        self.key: tuple = ()  # what the structs were packed from (see _packed)

    def field(self, path: str, pairs: bool = False) -> torch.Tensor:
        """Field ``path`` ("struct.field") of every struct: an (n,) tensor (an (n, 2) one for a key pair)."""
        view = self.views.get(path)
        if view is None:
            offset, ctype = _field_layout(path)
            dtype = _TORCH_DTYPES[ctype]
            size = torch.empty((), dtype=dtype).element_size()
            flat = self.raw.view(dtype)
            view = (flat.as_strided((self.n, 2), (_STRIDE // size, 1), offset // size) if pairs else
                    flat.as_strided((self.n,), (_STRIDE // size,), offset // size))
            self.views[path] = view
        return view

    def set(self, path: str, values: list | float | int) -> None:
        """Write ``values`` (one per struct, or one for all) into field ``path``, rounded as ctypes rounds."""
        view = self.field(path)
        if isinstance(values, list) and values and values.count(values[0]) == len(values):
            values = values[0]  # one value for all (a group's step count, clip factor, ...): one fill
        fp = view.dtype == torch.float32
        if isinstance(values, list):
            values = torch.frombuffer(array.array("d" if fp else "q", values), dtype=torch.float64 if fp
                                      else torch.int64)
        else:
            values = torch.tensor(values, dtype=torch.float64 if fp else torch.int64)
        # Python floats are doubles: the fp32 fields take them rounded to nearest (beyond the fp32 range: +-Inf), as
        # a ctypes c_float does
        view.copy_(values)

    def set_keys(self, path: str, keys: list[int] | torch.Tensor, first: int, every: int) -> None:
        """Write key pairs into field ``path``: struct k takes ``keys[every*k + first]`` and the next one (the low
        32 bits of each, as ``_set_key``); ``keys`` a list of ints or an int64 tensor of them."""
        if not self.n:
            return
        if not isinstance(keys, torch.Tensor):
            keys = torch.frombuffer(array.array("q", keys), dtype=torch.int64)
        k = keys.view(self.n, every)[:, first:first + 2] & 0xFFFFFFFF
        self.field(path, pairs=True).copy_(torch.where(k >= 2 ** 31, k - 2 ** 32, k))  # the same 32 bits in int32


_PACKED: collections.OrderedDict[tuple, _Packed] = collections.OrderedDict()


def _packed(key: tuple, first: torch.Tensor | None, pack) -> _Packed:
    """The structs kept for ``key``, or new ones filled in by ``pack(array)`` (and kept).

    Kept under a short key (the op, the tensor count and the data pointer of the first weight, ``first``: a
    param group's),
    holding the full one: a hit costs one comparison of the full key (no hashing of its thousands of entries),
    and the full key differing (a tensor of the group replaced) repacks and replaces that group's entry."""
    n = key[1]
    short = (key[0], n, 0 if first is None else first.data_ptr())
    entry = _PACKED.get(short)
    if entry is not None and entry.key == key:
        _PACKED.move_to_end(short)
        return entry
    entry = _Packed(n)
    pack(entry.array)
    entry.key = key
    _PACKED[short] = entry
    _PACKED.move_to_end(short)
    while len(_PACKED) > _KEPT_CALLS:
        _PACKED.popitem(last=False)
    return entry


def clear_packed() -> None:
    """Drop the structs the op keeps between its calls (they hold no tensors, only their addresses); a
    ``PreparedCall`` held by a caller keeps its own."""
    _PACKED.clear()


def _layouts(ts: list[torch.Tensor | None]) -> tuple:
    # what _check_scale checks of each tensor (size, dtype, contiguity): in the key, so that a tensor of another
    # layout at a kept address misses and is checked again, before the kernel writes into it
    if ts and ts[0] is None and all(map(operator.is_, ts, itertools.repeat(None))):
        return ()
    try:
        return (tuple(map(torch.Tensor.numel, ts)), tuple(map(_DTYPE, ts)),
                tuple(map(torch.Tensor.is_contiguous, ts)))
    except TypeError:  # some entries are None
        return tuple((0, None, True) if t is None else (t.numel(), t.dtype, t.is_contiguous()) for t in ts)


def _weights_key(codes, scales, grads, formats, scale_formats, block_sizes, master_weights, carried_errors,
                 compensation_codes, compensation_scales) -> tuple:
    # everything _weights_args reads, except the gradients' pointers and dtypes (rewritten every call)
    return (tuple(formats), tuple(scale_formats), tuple(block_sizes), _pointers(codes), tuple(map(_DTYPE, codes)),
            _pointers(scales), _layouts(scales), _layouts(compensation_scales),
            tuple(map(torch.Tensor.numel, grads)), _pointers(master_weights), _pointers(carried_errors),
            _pointers(compensation_codes), _pointers(compensation_scales))


def _readable_grads(grads: list[torch.Tensor], dtypes: set[torch.dtype] | None = None) -> list[torch.Tensor]:
    """The gradients as the kernel reads them: contiguous fp32 or bf16 (fp16 converted, exactly); ``dtypes``:
    their dtypes, where the caller has them."""
    if torch.float16 not in (set(map(_DTYPE, grads)) if dtypes is None else dtypes) and all(
            map(torch.Tensor.is_contiguous, grads)):
        return grads
    return [(g.to(torch.float32) if g.dtype == torch.float16 else g).contiguous() for g in grads]


_GRAD_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _run(entry: _Packed) -> torch.Tensor:
    lib = kernels.load()
    if lib is None:
        raise RuntimeError("ecoptim's C kernels are unavailable on this machine (see ecoptim.kernels.load)")
    rc = lib.eco_step_many(entry.pointers, entry.n, torch.get_num_threads())
    if rc == -2:
        raise ValueError("ecoptim fused step: 8-bit state blocks that do not tile the weight blocks, kahan "
                         "blocks too large for the kernel, or a two-level (NVFP4) scale in mode 'kahan' or with "
                         "blocks over 65536 elements; nothing was modified")
    if rc != 0:
        raise MemoryError("ecoptim fused step: could not allocate its block scratch; nothing was modified")
    return entry.field("result.nonfinite_blocks").clone()


def _set_key(pair, keys, k: int) -> None:
    pair[0], pair[1] = keys[2 * k] & 0xFFFFFFFF, keys[2 * k + 1] & 0xFFFFFFFF


class PreparedCall:
    """One call of a fused step op on CPU tensors, its argument structs packed (or an earlier call's, kept for
    the same tensors: ``_packed``). ``run`` writes what may change from call to call (the gradients and their
    dtypes, step counts, lr, clip factors, injection coefficients, stochastic-rounding keys, the other scalars)
    into every struct at once, with one strided write per field, and steps.

    The op's CPU kernels are a ``PreparedCall`` and one ``run``. ``fused.GroupCall`` keeps one from a group's
    first planned step and runs it again each step without the op's per-call checks and packing key. Whoever
    keeps one must check before each ``run`` that every tensor it was prepared with (all but the gradients) is
    still the same object at the same address and of the same size, not resized or re-strided in between
    (``QuantOptimizer._step_planned`` compares identity, data pointer, version and bytes),
    and must pass gradients ``readable`` returned."""

    optimizer = ""

    def __init__(self, entry: _Packed, numels: list[int], hyper: dict) -> None:
        self.entry, self.numels, self.hyper = entry, numels, hyper
        self.n = len(numels)
        self.layouts = [torch.strided] * self.n

    def readable(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """``grads`` as the kernel reads them (``_readable_grads``), or None where they do not fit the structs
        (another count, size or layout, or a dtype other than fp32, bf16 and fp16)."""
        if (len(grads) != self.n or list(map(torch.Tensor.numel, grads)) != self.numels
                or list(map(_LAYOUT, grads)) != self.layouts):
            return None
        dtypes = set(map(_DTYPE, grads))
        return _readable_grads(grads, dtypes) if dtypes <= _GRAD_DTYPES else None

    def run(self, grads: list[torch.Tensor], steps: list, injection_coefs: list[float], grad_scales: list[float],
            sr_keys: list[int] | torch.Tensor, lr: float, state8_keys: list[int] = ()) -> torch.Tensor:
        """Step, with ``grads`` as ``readable`` gives them and the per-tensor lists written out to one entry per
        tensor or given as one for all (``steps``: AdamW's step counts or SGD's first_steps; ``sr_keys`` two per
        tensor, a list or an int64 tensor); returns the non-finite blocks per tensor."""
        entry = self.entry
        entry.set("gradient.values", list(map(torch.Tensor.data_ptr, grads)))
        dtypes = set(map(_DTYPE, grads))
        if len(dtypes) <= 1:  # one dtype for all (the usual case): one fill
            entry.set("gradient.dtype", Dtype.BF16 if torch.bfloat16 in dtypes else Dtype.FP32)
        else:
            entry.set("gradient.dtype", [Dtype.BF16 if g.dtype == torch.bfloat16 else Dtype.FP32 for g in grads])
        if self.hyper["stochastic"]:
            entry.set_keys("hyper.sr_key", sr_keys, 0, 2)
        entry.set("hyper.grad_scale", list(grad_scales))
        entry.set("hyper.injection_coef", list(injection_coefs))
        self._set_scalars(steps, lr, state8_keys)
        return _run(entry)

    def _set_scalars(self, steps: list, lr: float, state8_keys: list[int]) -> None:
        raise NotImplementedError


class _AdamWCall(PreparedCall):
    optimizer = "adamw"

    def _set_scalars(self, steps: list[float], lr: float, state8_keys: list[int]) -> None:
        entry, h = self.entry, self.hyper
        if h["state8_stochastic"] and h["eight_bit"]:
            entry.set_keys("state8.exp_avg_key", state8_keys, 0, 4)
            entry.set_keys("state8.exp_avg_sq_key", state8_keys, 2, 4)
        beta1, beta2 = h["beta1"], h["beta2"]
        # the scalars the reference passes to ATen (adamw.adamw_update_), in the same Python expressions
        entry.set("hyper.decay_factor", 1 - lr * h["weight_decay"])
        entry.set("hyper.one_minus_beta1", 1 - beta1)
        entry.set("hyper.beta2", beta2)
        entry.set("hyper.one_minus_beta2", 1 - beta2)
        entry.set("hyper.eps", h["eps"])
        by_step = {t: ((1 - beta2 ** t) ** 0.5, -(lr / (1 - beta1 ** t))) for t in set(steps)}
        entry.set("hyper.bias_correction2_sqrt", [by_step[t][0] for t in steps])
        entry.set("hyper.neg_step_size", [by_step[t][1] for t in steps])


class _SGDCall(PreparedCall):
    optimizer = "sgd"

    def _set_scalars(self, steps: list[bool], lr: float, state8_keys: list[int]) -> None:
        entry, h = self.entry, self.hyper
        entry.set("hyper.weight_decay", h["weight_decay"])
        entry.set("hyper.momentum", h["momentum"])
        entry.set("hyper.one_minus_dampening", 1 - h["dampening"])
        entry.set("hyper.neg_lr", -lr)
        entry.set("hyper.nesterov", int(h["nesterov"]))
        entry.set("hyper.first_step", [int(f) for f in steps])


def prepare_adamw(codes, scales, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master_weights,
                  carried_errors, compensation_codes, compensation_scales, formats, scale_formats, block_sizes,
                  steps, injection_coefs, grad_scales, sr_keys, state8_block_sizes, state8_keys, state8_tables, *,
                  lr, beta1, beta2, eps, weight_decay, inject, stochastic, state8_stochastic) -> PreparedCall:
    """The ``PreparedCall`` of ``ecoptim::adamw_step_`` with these arguments (checked as the op checks them)."""
    n = len(codes)
    (scales, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master_weights, carried_errors,
     compensation_codes, compensation_scales, formats, scale_formats, block_sizes, steps, injection_coefs,
     grad_scales, state8_block_sizes) = _full_lists(n, dict(
        scales=scales, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, exp_avg_absmax=exp_avg_absmax,
        exp_avg_sq_absmax=exp_avg_sq_absmax, master_weights=master_weights, carried_errors=carried_errors,
        compensation_codes=compensation_codes, compensation_scales=compensation_scales, formats=formats,
        scale_formats=scale_formats, block_sizes=block_sizes, steps=steps, injection_coefs=injection_coefs,
        grad_scales=grad_scales,
        state8_block_sizes=state8_block_sizes)).values()
    if stochastic and len(sr_keys) != 2 * n:
        raise ValueError("ecoptim fused step: stochastic rounding needs two sr_keys per tensor")
    moment_dtypes = tuple(map(_DTYPE, exp_avg))
    eight_bit = torch.uint8 in moment_dtypes
    if eight_bit and (len(state8_tables) != 6 or (state8_stochastic and len(state8_keys) != 4 * n)):
        raise ValueError("ecoptim fused step: 8-bit moments need the six state8_tables (state8.search_tables(7) "
                         "and (8)) and, if stochastic, four state8_keys per tensor")
    grads = _readable_grads(grads)
    key = ("adamw", n, bool(stochastic), bool(inject), bool(state8_stochastic), moment_dtypes,
           _pointers(exp_avg), _pointers(exp_avg_sq), _pointers(exp_avg_absmax), _pointers(exp_avg_sq_absmax),
           tuple(state8_block_sizes), _pointers(state8_tables),
           *_weights_key(codes, scales, grads, formats, scale_formats, block_sizes, master_weights, carried_errors,
                         compensation_codes, compensation_scales))

    def pack(array) -> None:
        # every field of every struct, as this call's arguments give it (the definition the strided writes of
        # PreparedCall.run repeat for the fields that change from call to call; tests/test_step_cache.py compares
        # the two)
        for k in range(n):
            a = array[k]
            _weights_args(a, k, codes, scales, grads, formats, scale_formats, block_sizes, master_weights,
                          carried_errors, compensation_codes, compensation_scales)
            a.moments.exp_avg, a.moments.exp_avg_sq = exp_avg[k].data_ptr(), exp_avg_sq[k].data_ptr()
            a.moments.storage = _STORAGE[exp_avg[k].dtype]
            if a.moments.storage == StateStorage.EIGHT_BIT:
                s8 = a.state8
                t7, b7rtn, b7sr, t8, b8rtn, b8sr = state8_tables
                s8.exp_avg_absmax = exp_avg_absmax[k].data_ptr()
                s8.exp_avg_sq_absmax = exp_avg_sq_absmax[k].data_ptr()
                s8.signed_magnitudes, s8.unsigned_magnitudes = t7.data_ptr(), t8.data_ptr()
                s8.signed_buckets_nearest, s8.signed_buckets_stochastic = b7rtn.data_ptr(), b7sr.data_ptr()
                s8.unsigned_buckets_nearest, s8.unsigned_buckets_stochastic = b8rtn.data_ptr(), b8sr.data_ptr()
                s8.block_size, s8.num_buckets = state8_block_sizes[k], b7rtn.numel()
                s8.stochastic = int(state8_stochastic)
                if state8_stochastic:
                    _set_key(s8.exp_avg_key, state8_keys, 2 * k)
                    _set_key(s8.exp_avg_sq_key, state8_keys, 2 * k + 1)
            h = a.hyper
            h.optimizer, h.stochastic, h.inject = Optimizer.ADAMW, int(stochastic), int(inject)
            if stochastic:
                _set_key(h.sr_key, sr_keys, k)
            step = steps[k]
            h.grad_scale, h.injection_coef = grad_scales[k], injection_coefs[k]
            h.decay_factor = 1 - lr * weight_decay
            h.one_minus_beta1, h.beta2, h.one_minus_beta2 = 1 - beta1, beta2, 1 - beta2
            h.bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            h.eps = eps
            h.neg_step_size = -(lr / (1 - beta1 ** step))

    entry = _packed(key, codes[0] if n else None, pack)
    return _AdamWCall(entry, list(map(torch.Tensor.numel, grads)), dict(
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, stochastic=bool(stochastic),
        state8_stochastic=bool(state8_stochastic), eight_bit=eight_bit))


def adamw_step_cpu(codes, scales, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master_weights,
                   carried_errors, compensation_codes, compensation_scales, formats, scale_formats, block_sizes, steps,
                   injection_coefs, grad_scales, sr_keys, state8_block_sizes, state8_keys, state8_tables, *, lr,
                   beta1, beta2, eps, weight_decay, inject, stochastic, state8_stochastic) -> torch.Tensor:
    """``ecoptim::adamw_step_`` on CPU tensors: ``prepare_adamw`` and one ``run``."""
    grads = _readable_grads(grads)
    call = prepare_adamw(codes, scales, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
                         master_weights, carried_errors, compensation_codes, compensation_scales, formats,
                         scale_formats, block_sizes, steps, injection_coefs, grad_scales, sr_keys, state8_block_sizes,
                         state8_keys, state8_tables, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay, inject=inject, stochastic=stochastic,
                         state8_stochastic=state8_stochastic)
    return call.run(grads, steps, injection_coefs, grad_scales, sr_keys, lr, state8_keys)


def prepare_sgd(codes, scales, grads, momentum_buffers, master_weights, carried_errors, compensation_codes,
                compensation_scales, formats, scale_formats, block_sizes, first_steps, injection_coefs, grad_scales,
                sr_keys, *, lr, momentum, dampening, nesterov, weight_decay, inject, stochastic) -> PreparedCall:
    """The ``PreparedCall`` of ``ecoptim::sgd_step_`` with these arguments (checked as the op checks them)."""
    n = len(codes)
    (scales, grads, momentum_buffers, master_weights, carried_errors, compensation_codes, compensation_scales,
     formats, scale_formats, block_sizes, first_steps, injection_coefs, grad_scales) = _full_lists(n, dict(
        scales=scales, grads=grads, momentum_buffers=momentum_buffers, master_weights=master_weights,
        carried_errors=carried_errors, compensation_codes=compensation_codes,
        compensation_scales=compensation_scales, formats=formats, scale_formats=scale_formats,
        block_sizes=block_sizes, first_steps=first_steps,
        injection_coefs=injection_coefs, grad_scales=grad_scales)).values()
    if stochastic and len(sr_keys) != 2 * n:
        raise ValueError("ecoptim fused step: stochastic rounding needs two sr_keys per tensor")
    grads = _readable_grads(grads)
    buffer_dtypes = tuple(None if b is None else b.dtype for b in momentum_buffers)
    key = ("sgd", n, bool(stochastic), bool(inject), buffer_dtypes, _pointers(momentum_buffers),
           *_weights_key(codes, scales, grads, formats, scale_formats, block_sizes, master_weights, carried_errors,
                         compensation_codes, compensation_scales))

    def pack(array) -> None:
        # every field of every struct (see prepare_adamw)
        for k in range(n):
            a = array[k]
            _weights_args(a, k, codes, scales, grads, formats, scale_formats, block_sizes, master_weights,
                          carried_errors, compensation_codes, compensation_scales)
            buf = momentum_buffers[k]
            a.moments.exp_avg = _ptr(buf)
            a.moments.storage = (StateStorage.BF16 if buf is not None and buf.dtype == torch.bfloat16
                                 else StateStorage.FP32)
            h = a.hyper
            h.optimizer, h.stochastic, h.inject = Optimizer.SGD, int(stochastic), int(inject)
            if stochastic:
                _set_key(h.sr_key, sr_keys, k)
            h.grad_scale, h.injection_coef = grad_scales[k], injection_coefs[k]
            h.weight_decay, h.momentum, h.one_minus_dampening, h.neg_lr = weight_decay, momentum, 1 - dampening, -lr
            h.nesterov, h.first_step = int(nesterov), int(first_steps[k])

    entry = _packed(key, codes[0] if n else None, pack)
    return _SGDCall(entry, list(map(torch.Tensor.numel, grads)), dict(
        weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
        stochastic=bool(stochastic)))


def sgd_step_cpu(codes, scales, grads, momentum_buffers, master_weights, carried_errors, compensation_codes,
                 compensation_scales, formats, scale_formats, block_sizes, first_steps, injection_coefs, grad_scales,
                 sr_keys, *, lr,
                 momentum, dampening, nesterov, weight_decay, inject, stochastic) -> torch.Tensor:
    """``ecoptim::sgd_step_`` on CPU tensors: ``prepare_sgd`` and one ``run``."""
    grads = _readable_grads(grads)
    call = prepare_sgd(codes, scales, grads, momentum_buffers, master_weights, carried_errors, compensation_codes,
                       compensation_scales, formats, scale_formats, block_sizes, first_steps, injection_coefs,
                       grad_scales, sr_keys, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                       weight_decay=weight_decay, inject=inject, stochastic=stochastic)
    return call.run(grads, first_steps, injection_coefs, grad_scales, sr_keys, lr)


#: the ``PreparedCall`` of each op (by its ``fused.Job.optimizer`` name), from the op's own arguments
PREPARE = {"adamw": prepare_adamw, "sgd": prepare_sgd}


# registered by name, so that the module's names stay the functions (register_kernel as a decorator returns None)
torch.library.register_kernel("ecoptim::adamw_step_", "cpu", adamw_step_cpu)
torch.library.register_kernel("ecoptim::sgd_step_", "cpu", sgd_step_cpu)

# the ops this module implements (imported for their registration)
IMPLEMENTS = (ops.adamw_step_, ops.sgd_step_)
