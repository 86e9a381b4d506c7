"""The CPU kernels of ``ecoptim.ops``: pack the op's named arguments into ``eco_step_args`` structs (``abi``) and
call the C library's ``eco_step_many`` once per op call (one thread team for every tensor).

The library is the one ``ecoptim.kernels.load()`` builds on first use; registering the kernels builds nothing.
The scalars are derived here from the op's hyper-parameters with the expressions the reference path uses (in
Python floats, then rounded to fp32 by the struct, as ATen rounds Python scalars), so the bits are the same.
"""
from __future__ import annotations

import ctypes

import torch

from ... import kernels, ops
from ...formats import FORMATS as FORMATS_BY_NAME
from .abi import Dtype, Format, Optimizer, ScaleFormat, StateStorage, StepArgs

__all__ = ["FORMATS", "SCALE_FORMATS", "adamw_step_cpu", "sgd_step_cpu"]

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


def _check_scale(name: str, t: torch.Tensor | None, scale_format: int, num_blocks: int) -> None:
    # the kernel writes num_blocks scales in this layout: a tensor of another size would be written out of bounds
    if t is not None and not (t.is_contiguous() and t.numel() * t.element_size() ==
                              _SCALE_BYTES[scale_format](num_blocks)):
        raise ValueError(f"ecoptim fused step: {name} holds {t.numel() * t.element_size()} bytes, but a scale of "
                         f"{num_blocks} blocks in its scale format takes {_SCALE_BYTES[scale_format](num_blocks)} "
                         "(contiguous); pass the scale the weight's QuantSpec stores")


def _weights_args(k: int, codes, scales, grads, formats, scale_formats, block_sizes, master_weights, carried_errors,
                  compensation_codes, compensation_scales, keep: list) -> StepArgs:
    """The struct of tensor k with its weight, gradient and mode buffers filled in; ``keep``: tensors that must
    outlive the call."""
    if formats[k] not in FORMATS:
        raise ValueError(f"ecoptim fused step: unknown format {formats[k]!r}; one of {sorted(FORMATS)}")
    if scale_formats[k] not in SCALE_FORMATS:
        raise ValueError(f"ecoptim fused step: unknown scale format {scale_formats[k]!r}; one of "
                         f"{sorted(SCALE_FORMATS)}")
    code, fmax = FORMATS[formats[k]], FORMATS_BY_NAME[formats[k]].max
    g = grads[k]
    if g.dtype == torch.float16:
        g = g.to(torch.float32)  # exact; the kernel reads fp32 or bf16
    g = g.contiguous()
    keep.append(g)
    a = StepArgs()
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
    return a


def _run(args: list[StepArgs]) -> torch.Tensor:
    lib = kernels.load()
    if lib is None:
        raise RuntimeError("ecoptim's C kernels are unavailable on this machine (see ecoptim.kernels.load)")
    arr = (ctypes.POINTER(StepArgs) * len(args))(*[ctypes.pointer(a) for a in args])
    rc = lib.eco_step_many(arr, len(args), torch.get_num_threads())
    if rc == -2:
        raise ValueError("ecoptim fused step: 8-bit state blocks that do not tile the weight blocks, kahan "
                         "blocks too large for the kernel, or a two-level (NVFP4) scale in mode 'kahan' or with "
                         "blocks over 65536 elements; nothing was modified")
    if rc != 0:
        raise MemoryError("ecoptim fused step: could not allocate its block scratch; nothing was modified")
    return torch.tensor([a.result.nonfinite_blocks for a in args], dtype=torch.int64)


def _set_key(pair, keys, k: int) -> None:
    pair[0], pair[1] = keys[2 * k] & 0xFFFFFFFF, keys[2 * k + 1] & 0xFFFFFFFF


@torch.library.register_kernel("ecoptim::adamw_step_", "cpu")
def adamw_step_cpu(codes, scales, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master_weights,
                   carried_errors, compensation_codes, compensation_scales, formats, scale_formats, block_sizes, steps,
                   injection_coefs, grad_scales, sr_keys, state8_block_sizes, state8_keys, state8_tables, *, lr,
                   beta1, beta2, eps, weight_decay, inject, stochastic, state8_stochastic) -> torch.Tensor:
    """``ecoptim::adamw_step_`` on CPU tensors."""
    n = len(codes)
    _check_lists(n, scales=scales, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                 exp_avg_absmax=exp_avg_absmax, exp_avg_sq_absmax=exp_avg_sq_absmax, master_weights=master_weights,
                 carried_errors=carried_errors, compensation_codes=compensation_codes,
                 compensation_scales=compensation_scales, formats=formats, scale_formats=scale_formats,
                 block_sizes=block_sizes, steps=steps,
                 injection_coefs=injection_coefs, grad_scales=grad_scales, state8_block_sizes=state8_block_sizes)
    if stochastic and len(sr_keys) != 2 * n:
        raise ValueError("ecoptim fused step: stochastic rounding needs two sr_keys per tensor")
    eight_bit = any(m.dtype == torch.uint8 for m in exp_avg)
    if eight_bit and (len(state8_tables) != 6 or (state8_stochastic and len(state8_keys) != 4 * n)):
        raise ValueError("ecoptim fused step: 8-bit moments need the six state8_tables (state8.search_tables(7) "
                         "and (8)) and, if stochastic, four state8_keys per tensor")
    keep: list[torch.Tensor] = []
    args = []
    for k in range(n):
        a = _weights_args(k, codes, scales, grads, formats, scale_formats, block_sizes, master_weights, carried_errors,
                          compensation_codes, compensation_scales, keep)
        a.moments.exp_avg, a.moments.exp_avg_sq = exp_avg[k].data_ptr(), exp_avg_sq[k].data_ptr()
        a.moments.storage = _STORAGE[exp_avg[k].dtype]
        if a.moments.storage == StateStorage.EIGHT_BIT:
            s8 = a.state8
            t7, b7rtn, b7sr, t8, b8rtn, b8sr = state8_tables
            s8.exp_avg_absmax, s8.exp_avg_sq_absmax = exp_avg_absmax[k].data_ptr(), exp_avg_sq_absmax[k].data_ptr()
            s8.signed_magnitudes, s8.unsigned_magnitudes = t7.data_ptr(), t8.data_ptr()
            s8.signed_buckets_nearest, s8.signed_buckets_stochastic = b7rtn.data_ptr(), b7sr.data_ptr()
            s8.unsigned_buckets_nearest, s8.unsigned_buckets_stochastic = b8rtn.data_ptr(), b8sr.data_ptr()
            s8.block_size, s8.num_buckets, s8.stochastic = state8_block_sizes[k], b7rtn.numel(), int(state8_stochastic)
            if state8_stochastic:
                _set_key(s8.exp_avg_key, state8_keys, 2 * k)
                _set_key(s8.exp_avg_sq_key, state8_keys, 2 * k + 1)
        h = a.hyper
        h.optimizer, h.stochastic, h.inject = Optimizer.ADAMW, int(stochastic), int(inject)
        if stochastic:
            _set_key(h.sr_key, sr_keys, k)
        step = steps[k]
        h.grad_scale, h.injection_coef = grad_scales[k], injection_coefs[k]
        # the scalars the reference passes to ATen (adamw.adamw_update_), in the same Python expressions
        h.decay_factor = 1 - lr * weight_decay
        h.one_minus_beta1, h.beta2, h.one_minus_beta2 = 1 - beta1, beta2, 1 - beta2
        h.bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        h.eps = eps
        h.neg_step_size = -(lr / (1 - beta1 ** step))
        args.append(a)
    return _run(args)


@torch.library.register_kernel("ecoptim::sgd_step_", "cpu")
def sgd_step_cpu(codes, scales, grads, momentum_buffers, master_weights, carried_errors, compensation_codes,
                 compensation_scales, formats, scale_formats, block_sizes, first_steps, injection_coefs, grad_scales,
                 sr_keys, *, lr,
                 momentum, dampening, nesterov, weight_decay, inject, stochastic) -> torch.Tensor:
    """``ecoptim::sgd_step_`` on CPU tensors."""
    n = len(codes)
    _check_lists(n, scales=scales, grads=grads, momentum_buffers=momentum_buffers, master_weights=master_weights,
                 carried_errors=carried_errors, compensation_codes=compensation_codes,
                 compensation_scales=compensation_scales, formats=formats, scale_formats=scale_formats,
                 block_sizes=block_sizes, first_steps=first_steps, injection_coefs=injection_coefs,
                 grad_scales=grad_scales)
    if stochastic and len(sr_keys) != 2 * n:
        raise ValueError("ecoptim fused step: stochastic rounding needs two sr_keys per tensor")
    keep: list[torch.Tensor] = []
    args = []
    for k in range(n):
        a = _weights_args(k, codes, scales, grads, formats, scale_formats, block_sizes, master_weights, carried_errors,
                          compensation_codes, compensation_scales, keep)
        buf = momentum_buffers[k]
        a.moments.exp_avg = _ptr(buf)
        a.moments.storage = StateStorage.BF16 if buf is not None and buf.dtype == torch.bfloat16 else StateStorage.FP32
        h = a.hyper
        h.optimizer, h.stochastic, h.inject = Optimizer.SGD, int(stochastic), int(inject)
        if stochastic:
            _set_key(h.sr_key, sr_keys, k)
        h.grad_scale, h.injection_coef = grad_scales[k], injection_coefs[k]
        h.weight_decay, h.momentum, h.one_minus_dampening, h.neg_lr = weight_decay, momentum, 1 - dampening, -lr
        h.nesterov, h.first_step = int(nesterov), int(first_steps[k])
        args.append(a)
    return _run(args)


# the ops this module implements (imported for their registration)
IMPLEMENTS = (ops.adamw_step_, ops.sgd_step_)
