"""The Triton kernels of ``ecoptim.ops`` (``adamw_step_``, ``sgd_step_``): the launchers, registered as the ops'
CUDA implementation. Importing this module registers them (it needs triton; ``ecoptim.backends.triton.load_ops``
imports it where triton imports).

The launchers take the op's arguments and run on any device Triton runs on: CUDA tensors compiled, or CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how
``tests/test_triton.py`` checks them against the reference path on machines without a GPU. Per tensor, three
launches (``step.py``): phase 0 (block statistics), phase 1 (quantize and write), and for mode 'kahan' phase 2
(the compensation). The scalars are derived from the op's hyper-parameters with the expressions the CPU kernel
uses (``ecoptim/backends/cpu/ops.py``: Python floats rounded once to fp32) and passed as fp32 bit patterns.

Scale formats: 'absmax' (fp32 scales) for fp8_e4m3, fp8_e5m2, int8, int4, fp4_e2m1 and bf16 (unscaled); 'e8m0' and
'e8m0_ceil' (E8M0 bytes) for the MX formats mxfp8 and mxfp4. Not supported here (refused with a ValueError before
anything is modified; ``support.supports`` keeps such cases on the reference path): other pairings (NVFP4's
two-level scale among them), 8-bit moments, and packed int4 / fp4 blocks of odd size (a block would share a byte
with the next).
"""
from __future__ import annotations

import numpy as np
import torch
import triton

from ... import ops
from ...formats import FORMATS, largest_normal_exponent
from .codecs import FORMAT_IDS, PACKED, SCALE_IDS
from .step import compensation_kernel, step_kernel

__all__ = ["adamw_step", "sgd_step", "MAX_TILE", "LAUNCH_OPTIONS", "IMPLEMENTS", "SCALE_FORMATS_OF"]

MAX_TILE = 1024  # elements per program: smaller blocks share a program, larger ones are split into tiles
# every launch's compile options: no contraction of a multiply and an add into an fma (the reference rounds both)
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)


def _f32_bits(x: float) -> int:
    """The fp32 nearest to the Python float ``x`` (as a C float conversion rounds it), as its int32 bit pattern."""
    with np.errstate(over="ignore"):
        return int(np.array([x], dtype=np.float32).view(np.int32)[0])


def _f32(x: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(x)


def _key_word(k: int) -> int:
    # a key word (0 .. 2^32 - 1) as the int32 with its bits: one kernel signature for every key
    return int(np.array([k & 0xFFFFFFFF], dtype=np.uint32).view(np.int32)[0])


_CODE_VIEW = {"fp8_e4m3": torch.uint8, "fp8_e5m2": torch.uint8, "mxfp8": torch.uint8, "bf16": torch.int16}
# the scale formats each format is stepped with (the reference's pairings the kernels reproduce)
SCALE_FORMATS_OF = {**{fmt: ("absmax",) for fmt in ("fp8_e4m3", "fp8_e5m2", "int8", "int4", "fp4_e2m1", "bf16")},
                    "mxfp8": ("e8m0", "e8m0_ceil"), "mxfp4": ("e8m0", "e8m0_ceil")}


def _codes_as_int(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    # the kernels read and write codes as integers (codecs.py)
    return codes.view(_CODE_VIEW[fmt]) if fmt in _CODE_VIEW else codes


def _scales_as_stored(scales: torch.Tensor | None) -> torch.Tensor | None:
    # E8M0 scales (float8_e8m0fnu) are read and written as their bytes
    return scales.view(torch.uint8) if scales is not None and scales.element_size() == 1 else scales


def _as_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    # bf16 arrays are passed as their int16 bits (decoded and rounded with integer operations)
    return t.view(torch.int16) if t is not None and t.dtype == torch.bfloat16 else t


def _check(n: int, codes, scales, grads, formats, block_sizes, moments: dict, buffers: dict, **lists) -> None:
    """Refuse arguments the kernels cannot step, before anything is modified."""
    for name, values in dict(scales=scales, grads=grads, formats=formats, block_sizes=block_sizes, **moments,
                             **buffers, **lists).items():
        if len(values) != n:
            raise ValueError(f"ecoptim fused step (triton): {name} has {len(values)} entries for {n} tensors; pass "
                             "one per tensor")
    for k in range(n):
        fmt, g, bs = formats[k], grads[k], block_sizes[k]
        if fmt not in FORMAT_IDS:
            raise ValueError(f"ecoptim fused step (triton): unknown format {fmt!r}; one of {sorted(FORMAT_IDS)}")
        if g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"ecoptim fused step (triton): gradient dtype {g.dtype}; use fp32, bf16 or fp16")
        n_el = g.numel()
        if bs <= 0 or n_el % bs:
            raise ValueError(f"ecoptim fused step (triton): block size {bs} does not divide the {n_el} elements")
        packed = FORMAT_IDS[fmt] in PACKED
        if packed and bs % 2 and n_el != bs:
            raise ValueError(f"ecoptim fused step (triton): packed {fmt} blocks must be of even size (or one block "
                             "for the tensor), so that no byte holds two blocks; use the reference path")
        for name, t in (("codes", codes[k]), ("scales", scales[k]),
                        *((key, v[k]) for key, v in moments.items()), *((key, v[k]) for key, v in buffers.items())):
            if t is None:
                continue
            if t.dtype == torch.uint8 and name in ("exp_avg", "exp_avg_sq"):
                raise ValueError("ecoptim fused step (triton): 8-bit moments are not supported by the Triton "
                                 "kernel; use state_dtype=torch.float32 or torch.bfloat16 (or the reference path)")
            if not t.is_contiguous() or t.device != g.device:
                raise ValueError(f"ecoptim fused step (triton): {name} of tensor {k} must be contiguous and on "
                                 f"the gradient's device ({g.device})")
        if fmt != "bf16" and scales[k] is None:
            raise ValueError(f"ecoptim fused step (triton): format {fmt} needs its block scales")
        for name, t in (("scales", scales[k]), ("compensation_scales", buffers["compensation_scales"][k])):
            if t is not None and fmt != "bf16" and t.numel() != n_el // bs:
                raise ValueError(f"ecoptim fused step (triton): {name} of tensor {k} has {t.numel()} entries for "
                                 f"{n_el // bs} blocks")
        if codes[k].numel() != ((n_el + 1) // 2 if packed else n_el):
            raise ValueError(f"ecoptim fused step (triton): tensor {k} has {codes[k].numel()} codes for a gradient "
                             f"of {n_el} elements")
        comp = buffers["compensation_codes"][k]
        if comp is not None and (comp.dtype != codes[k].dtype or comp.numel() != codes[k].numel()):
            raise ValueError(f"ecoptim fused step (triton): compensation_codes of tensor {k} must be stored like its "
                             f"codes ({codes[k].numel()} of {codes[k].dtype}), got {comp.numel()} of {comp.dtype}")
        for name, t in (*((key, v[k]) for key, v in moments.items()), ("master_weights", buffers["master_weights"][k]),
                        ("carried_errors", buffers["carried_errors"][k])):
            if t is not None and (t.numel() != n_el or t.dtype not in (torch.float32, torch.bfloat16)):
                raise ValueError(f"ecoptim fused step (triton): {name} of tensor {k} must hold the gradient's "
                                 f"{n_el} elements in fp32 (or bf16 moments), got {t.numel()} of {t.dtype}")
        kinds = {v[k].dtype for v in moments.values() if v[k] is not None}
        if len(kinds) > 1:
            raise ValueError(f"ecoptim fused step (triton): the moments of tensor {k} must share one dtype")


def _step_tensor(adamw: bool, codes: torch.Tensor, scales: torch.Tensor | None, grad: torch.Tensor,
                 exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor | None, master: torch.Tensor | None,
                 carried: torch.Tensor | None, comp: torch.Tensor | None, comp_scales: torch.Tensor | None,
                 fmt: str, scale_format: str, block_size: int, scalars: dict, flags: dict) -> torch.Tensor:
    """One tensor's step (phases 0, 1 and, for kahan, 2); returns its count of NaN/Inf blocks (0-dim int64)."""
    scales, comp_scales = _scales_as_stored(scales), _scales_as_stored(comp_scales)
    n = grad.numel()
    dev = grad.device
    nb = n // block_size
    if nb == 0:
        return torch.zeros((), dtype=torch.int64, device=dev)
    if block_size <= MAX_TILE:  # several whole blocks per program
        tile = max(triton.next_power_of_2(block_size), 16)
        bpp, ntiles = MAX_TILE // tile, 1
    else:  # tiles of one block per program
        tile, bpp, ntiles = MAX_TILE, 1, triton.cdiv(block_size, MAX_TILE)
    grid = (triton.cdiv(nb, bpp) * ntiles,)
    scaled = fmt != "bf16"
    kahan = comp is not None
    if grad.dtype == torch.float16:
        grad = grad.to(torch.float32)  # exact; the kernel reads fp32 or bf16
    grad = _as_bits(grad.contiguous())
    state_bf16 = exp_avg is not None and exp_avg.dtype == torch.bfloat16
    dummy = torch.empty(1, dtype=torch.float32, device=dev)  # for the pointers a case does not read
    codes_i = _codes_as_int(codes, fmt)
    comp_i = _codes_as_int(comp, fmt) if kahan else dummy
    tile_amax = torch.empty(nb * ntiles, dtype=torch.float32, device=dev)
    tile_bad = torch.empty(nb * ntiles, dtype=torch.int32, device=dev)
    ebuf = torch.empty(n, dtype=torch.float32, device=dev) if kahan else dummy
    new_scales = scales.clone() if scaled else dummy
    fmax = _f32_bits(FORMATS[fmt].max)
    pointers = [codes_i, scales if scaled else dummy, grad, _as_bits(exp_avg) if exp_avg is not None else dummy,
                _as_bits(exp_avg_sq) if exp_avg_sq is not None else dummy, master if master is not None else dummy,
                carried if carried is not None else dummy, comp_i,
                comp_scales if kahan and scaled else dummy, ebuf, tile_amax, tile_bad]
    consts = dict(ADAMW=adamw, FMT=FORMAT_IDS[fmt], SCALED=scaled, GRAD_BF16=grad.dtype == torch.int16,
                  STATE_BF16=state_bf16, HAS_MASTER=master is not None, HAS_CARRIED=carried is not None, KAHAN=kahan,
                  SCALE=SCALE_IDS[scale_format], EMAX=largest_normal_exponent(FORMATS[fmt]), BPP=bpp, TILE=tile,
                  **flags)
    args = [nb, block_size, ntiles, fmax, *scalars.values()]
    # phase 0: per-tile statistics of w_til, reduced per block (a max: exact in any order)
    step_kernel[grid](*pointers, dummy, dummy, dummy, *args, PHASE=0, **consts, **LAUNCH_OPTIONS)
    block_amax = tile_amax.view(nb, ntiles).amax(1)
    block_bad = tile_bad.view(nb, ntiles).amax(1)
    # phase 1: quantize and write the finite blocks
    step_kernel[grid](*pointers, block_amax, block_bad, new_scales, *args, PHASE=1, **consts,
                      **LAUNCH_OPTIONS)
    if scaled:
        scales.copy_(new_scales)
    if kahan:  # phase 2: the compensation, from e's absmax per block (phase 1 left it in tile_amax)
        block_eamax = tile_amax.view(nb, ntiles).amax(1)
        new_comp_scales = comp_scales.clone() if scaled else dummy
        compensation_kernel[grid](comp_i, new_comp_scales, ebuf, block_eamax, block_bad, nb, block_size, ntiles,
                                  fmax, FMT=FORMAT_IDS[fmt], SCALED=scaled, SCALE=consts["SCALE"],
                                  EMAX=consts["EMAX"], BPP=bpp, TILE=tile, **LAUNCH_OPTIONS)
        if scaled:
            comp_scales.copy_(new_comp_scales)
    return block_bad.sum().to(torch.int64)


def _check_scale_formats(n: int, formats: list[str], scale_formats: list[str], scales: list,
                         comp_scales: list) -> None:
    # fp32 absmax scales for the plain formats, E8M0 for the MX ones; NVFP4's two-level scale takes the
    # reference path
    if len(scale_formats) != n:
        raise ValueError(f"ecoptim fused step (triton): scale_formats has {len(scale_formats)} entries for {n} "
                         "tensors; pass one per tensor")
    for fmt, sf in zip(formats, scale_formats):
        if fmt in SCALE_FORMATS_OF and sf not in SCALE_FORMATS_OF[fmt]:
            raise ValueError(f"ecoptim fused step (triton): scale_formats entry {sf!r} for format {fmt!r}; the "
                             f"Triton kernels step {fmt} with {' or '.join(map(repr, SCALE_FORMATS_OF[fmt]))} "
                             "scales (others, NVFP4's two-level scale among them, take the reference path)")
    for k, (fmt, sf, s, cs) in enumerate(zip(formats, scale_formats, scales, comp_scales)):
        if fmt not in SCALE_FORMATS_OF:
            continue  # an unknown format: refused by _check
        for name, t in (("scales", s), ("compensation_scales", cs)):
            want = 4 if sf == "absmax" else 1
            if t is not None and t.element_size() != want:
                raise ValueError(f"ecoptim fused step (triton): {name} of tensor {k} are {t.dtype}; scale format "
                                 f"{sf!r} is stored as {'fp32' if want == 4 else 'one E8M0 byte'} per block")


def _counts(counts: list[torch.Tensor]) -> torch.Tensor:
    # the op's result: one int64 count of NaN/Inf blocks per tensor, on the tensors' device
    if not counts:
        return torch.empty(0, dtype=torch.int64)
    return torch.stack(counts)


def adamw_step(codes, scales, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master_weights,
               carried_errors, compensation_codes, compensation_scales, formats, scale_formats, block_sizes, steps,
               injection_coefs, grad_scales, sr_keys, state8_block_sizes, state8_keys, state8_tables, *, lr, beta1,
               beta2, eps, weight_decay, inject, stochastic, state8_stochastic) -> torch.Tensor:
    """``ecoptim::adamw_step_`` with the Triton kernels (the op's arguments; see ``ecoptim.ops``)."""
    n = len(codes)
    (scales, exp_avg_absmax, exp_avg_sq_absmax, master_weights, carried_errors, compensation_codes,
     compensation_scales, formats, scale_formats, block_sizes, steps, injection_coefs,
     grad_scales) = ops.expand_short_forms(n, dict(
        scales=scales, exp_avg_absmax=exp_avg_absmax, exp_avg_sq_absmax=exp_avg_sq_absmax,
        master_weights=master_weights, carried_errors=carried_errors, compensation_codes=compensation_codes,
        compensation_scales=compensation_scales, formats=formats, scale_formats=scale_formats,
        block_sizes=block_sizes, steps=steps, injection_coefs=injection_coefs, grad_scales=grad_scales)).values()
    _check_scale_formats(n, formats, scale_formats, scales, compensation_scales)
    buffers = dict(master_weights=master_weights, carried_errors=carried_errors,
                   compensation_codes=compensation_codes, compensation_scales=compensation_scales)
    _check(n, codes, scales, grads, formats, block_sizes, dict(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq), buffers,
           steps=steps, injection_coefs=injection_coefs, grad_scales=grad_scales)
    if stochastic and len(sr_keys) != 2 * n:
        raise ValueError("ecoptim fused step (triton): stochastic rounding needs two sr_keys per tensor")
    one_minus_beta1 = _f32(1 - beta1)
    from_m = bool(one_minus_beta1 < np.float32(0.5))
    # ATen's lerp computes from the start point with the weight, or from the end point with weight - 1 (in fp32)
    lerp_coeff = float(one_minus_beta1 if from_m else one_minus_beta1 - np.float32(1.0))
    counts = []
    for k in range(n):
        step = steps[k]
        # the scalars the reference passes to ATen (adamw.adamw_update_), in the same Python expressions
        scalars = dict(grad_scale=grad_scales[k], decay=1 - lr * weight_decay, lerp_coeff=lerp_coeff,
                       beta2=beta2, one_minus_beta2=1 - beta2, bias_correction2_sqrt=(1 - beta2 ** step) ** 0.5,
                       eps=eps, neg_step_size=-(lr / (1 - beta1 ** step)), weight_decay=0.0, momentum=0.0,
                       one_minus_dampening=0.0, neg_lr=0.0, coef=injection_coefs[k])
        scalars = {name: _f32_bits(x) for name, x in scalars.items()}
        scalars["k1"] = _key_word(sr_keys[2 * k]) if stochastic else 0
        scalars["k2"] = _key_word(sr_keys[2 * k + 1]) if stochastic else 0
        flags = dict(SR=bool(stochastic), INJECT=bool(inject), FROM_M=from_m, HAS_WD=False, HAS_MOM=True,
                     FIRST=False, NESTEROV=False)
        counts.append(_step_tensor(True, codes[k], scales[k], grads[k], exp_avg[k], exp_avg_sq[k], master_weights[k],
                                   carried_errors[k], compensation_codes[k], compensation_scales[k], formats[k],
                                   scale_formats[k], block_sizes[k], scalars, flags))
    return _counts(counts)


def sgd_step(codes, scales, grads, momentum_buffers, master_weights, carried_errors, compensation_codes,
             compensation_scales, formats, scale_formats, block_sizes, first_steps, injection_coefs, grad_scales,
             sr_keys, *, lr, momentum, dampening, nesterov, weight_decay, inject, stochastic) -> torch.Tensor:
    """``ecoptim::sgd_step_`` with the Triton kernels (the op's arguments; see ``ecoptim.ops``)."""
    n = len(codes)
    (scales, momentum_buffers, master_weights, carried_errors, compensation_codes, compensation_scales, formats,
     scale_formats, block_sizes, first_steps, injection_coefs, grad_scales) = ops.expand_short_forms(n, dict(
        scales=scales, momentum_buffers=momentum_buffers, master_weights=master_weights,
        carried_errors=carried_errors, compensation_codes=compensation_codes,
        compensation_scales=compensation_scales, formats=formats, scale_formats=scale_formats,
        block_sizes=block_sizes, first_steps=first_steps, injection_coefs=injection_coefs,
        grad_scales=grad_scales)).values()
    _check_scale_formats(n, formats, scale_formats, scales, compensation_scales)
    buffers = dict(master_weights=master_weights, carried_errors=carried_errors,
                   compensation_codes=compensation_codes, compensation_scales=compensation_scales)
    _check(n, codes, scales, grads, formats, block_sizes, dict(momentum_buffers=momentum_buffers), buffers,
           first_steps=first_steps, injection_coefs=injection_coefs, grad_scales=grad_scales)
    if stochastic and len(sr_keys) != 2 * n:
        raise ValueError("ecoptim fused step (triton): stochastic rounding needs two sr_keys per tensor")
    has_wd, has_mom = _f32(weight_decay) != 0, _f32(momentum) != 0
    counts = []
    for k in range(n):
        buf = momentum_buffers[k]
        scalars = dict(grad_scale=grad_scales[k], decay=1.0, lerp_coeff=0.0, beta2=0.0, one_minus_beta2=0.0,
                       bias_correction2_sqrt=1.0, eps=0.0, neg_step_size=0.0, weight_decay=weight_decay,
                       momentum=momentum, one_minus_dampening=1 - dampening, neg_lr=-lr, coef=injection_coefs[k])
        scalars = {name: _f32_bits(x) for name, x in scalars.items()}
        scalars["k1"] = _key_word(sr_keys[2 * k]) if stochastic else 0
        scalars["k2"] = _key_word(sr_keys[2 * k + 1]) if stochastic else 0
        flags = dict(SR=bool(stochastic), INJECT=bool(inject) and buf is not None, FROM_M=False,
                     HAS_WD=bool(has_wd), HAS_MOM=bool(has_mom) and buf is not None,
                     FIRST=bool(first_steps[k]), NESTEROV=bool(nesterov))
        counts.append(_step_tensor(False, codes[k], scales[k], grads[k], buf, None, master_weights[k],
                                   carried_errors[k], compensation_codes[k], compensation_scales[k], formats[k],
                                   scale_formats[k], block_sizes[k], scalars, flags))
    return _counts(counts)


torch.library.register_kernel("ecoptim::adamw_step_", "cuda", adamw_step)
torch.library.register_kernel("ecoptim::sgd_step_", "cuda", sgd_step)

# the ops this module implements (imported for their registration)
IMPLEMENTS = (ops.adamw_step_, ops.sgd_step_)
