"""The fused step's Triton kernels: a block (a row, a group or the tensor, one scale each) is cut into tiles of
``TILE`` elements, one program per tile, and stepped in phases (one launch each):

    phase 0  w_til of the tile (``adamw.adamw_w_til`` / ``sgd.sgd_w_til``): its absmax and whether it holds a
             NaN/Inf, per tile; nothing is written. The launcher reduces them per block (exact: a max).
    phase 1  blocks without NaN/Inf only: the block's new scale (``_new_scale``), w_til recomputed (the
             same operations on the same inputs: the same bits), rounded (to nearest, or stochastically with the
             uniforms of ``rng.uniform``), the codes written, e = w_til - w_hat injected into the momentum (ECO),
             the moments and the mode buffers written. New scales go to a separate array (another tile of the
             block may still be reading the old scale), copied over by the launcher after the launch.
    phase 2  mode 'kahan': e (kept by phase 1 in a scratch array) quantized to nearest with its own block scale
             into the compensation (``compensation_kernel``).

Block scales are fp32 absmax scales or E8M0 bytes (``SCALE``: the MX formats, ``_load_scale`` / ``_new_scale``).
A block holding a NaN/Inf in w_til is left exactly as it was (codes, scale, moments, buffers) and counted.
Packed int4 / fp4 tiles start on even indices (blocks are of even size or the whole tensor), so the two nibbles of a
byte belong to one program: phase 1 steps the even and the odd elements as two half tiles and writes whole bytes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .adamw import adamw_w_til
from .codecs import (ABSMAX_SCALE, BF16, E8M0_CEIL, FP4_E2M1, INT4, block_scale, code_of, e8m0_code, e8m0_value,
                     f32_to_bf16, is_finite, round_nearest, round_stochastic)
from .rng import uniform
from .sgd import sgd_w_til

__all__ = ["step_kernel", "compensation_kernel", "BIT_ARGS"]


@triton.jit
def _maximum(a, b):
    # the reductions' combine (not tl.max: a function of triton's standard library is compiled, not interpreted,
    # when triton was imported before TRITON_INTERPRET was set, so the kernels use only their own functions)
    return tl.maximum(a, b)


@triton.jit
def _w_til(j, mask, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale, grad_scale,
           decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, weight_decay,
           momentum, one_minus_dampening, neg_lr, ADAMW: tl.constexpr, FMT: tl.constexpr, GRAD_BF16: tl.constexpr,
           STATE_BF16: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_CARRIED: tl.constexpr, KAHAN: tl.constexpr,
           FROM_M: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, FIRST: tl.constexpr,
           NESTEROV: tl.constexpr):
    # (w_til, m, v, denom): AdamW's, or SGD's with v and denom standing in for nothing
    if ADAMW:
        w, m, v, d = adamw_w_til(j, mask, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp,
                                 comp_scale, grad_scale, decay, lerp_coeff, beta2, one_minus_beta2,
                                 bias_correction2_sqrt, eps, neg_step_size, FMT, GRAD_BF16, STATE_BF16, HAS_MASTER,
                                 HAS_CARRIED, KAHAN, FROM_M)
    else:
        w, m = sgd_w_til(j, mask, codes, scale, grad, exp_avg, master, carried, comp, comp_scale, grad_scale,
                         weight_decay, momentum, one_minus_dampening, neg_lr, FMT, GRAD_BF16, STATE_BF16,
                         HAS_MASTER, HAS_CARRIED, KAHAN, HAS_WD, HAS_MOM, FIRST, NESTEROV)
        v = m
        d = m
    return w, m, v, d


@triton.jit
def _load_scale(scales, b, mask, SCALE: tl.constexpr):
    # X of blocks b: an fp32 absmax scale, or 2^(code - 127) of an E8M0 byte
    if SCALE == ABSMAX_SCALE:
        return tl.load(scales + b, mask=mask, other=1.0)
    else:
        return e8m0_value(tl.load(scales + b, mask=mask, other=127).to(tl.uint32))


@triton.jit
def _new_scale(amax, fmax, new_scales, b, store_mask, SCALE: tl.constexpr, EMAX: tl.constexpr):
    # the block's new X from its absmax (formats.ScaleFormat.encode), written to new_scales where store_mask
    if SCALE == ABSMAX_SCALE:
        s = block_scale(amax, fmax)
        tl.store(new_scales + b, s, mask=store_mask)
    else:
        c = e8m0_code(amax, fmax, EMAX, SCALE == E8M0_CEIL)
        tl.store(new_scales + b, c.to(tl.uint8), mask=store_mask)
        s = e8m0_value(c.to(tl.uint32))
    return s


@triton.jit
def _store_f32(ptr, j, x, mask, IS_BF16: tl.constexpr):
    if IS_BF16:
        tl.store(ptr + j, f32_to_bf16(x), mask=mask)
    else:
        tl.store(ptr + j, x, mask=mask)


@triton.jit
def _quantize_elems(j, mask, s, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale, ebuf,
                    fmax, grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                    neg_step_size, weight_decay, momentum, one_minus_dampening, neg_lr, coef, k1, k2,
                    ADAMW: tl.constexpr, FMT: tl.constexpr, GRAD_BF16: tl.constexpr, STATE_BF16: tl.constexpr,
                    SR: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_CARRIED: tl.constexpr, KAHAN: tl.constexpr,
                    INJECT: tl.constexpr, FROM_M: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr,
                    FIRST: tl.constexpr, NESTEROV: tl.constexpr):
    # phase 1 on elements j with the block's new scale s: writes everything but the codes; returns the codes
    # and the absmax of e (for kahan's compensation scale)
    w, m, v, d = _w_til(j, mask, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale,
                        grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                        neg_step_size, weight_decay, momentum, one_minus_dampening, neg_lr, ADAMW, FMT, GRAD_BF16,
                        STATE_BF16, HAS_MASTER, HAS_CARRIED, KAHAN, FROM_M, HAS_WD, HAS_MOM, FIRST, NESTEROV)
    if FMT == BF16:
        y = w  # unscaled
    else:
        y = tl.div_rn(w, s)
    y = tl.where(y < -fmax, -fmax, tl.where(y > fmax, fmax, y))
    if SR:
        q = round_stochastic(y, uniform(j, k1, k2), FMT)
    else:
        q = round_nearest(y, FMT)
    err = w - q * s  # e = w_til - w_hat
    if HAS_MASTER:
        tl.store(master + j, w, mask=mask)
    if HAS_CARRIED:
        tl.store(carried + j, err, mask=mask)
    if KAHAN:
        tl.store(ebuf + j, err, mask=mask)
    if ADAMW:
        _store_f32(exp_avg_sq, j, v, mask, STATE_BF16)
        if INJECT:
            m = tl.fma(coef * err, d, m)  # m.addcmul_(e, denom, value=coef)
        _store_f32(exp_avg, j, m, mask, STATE_BF16)
    elif HAS_MOM:
        if INJECT:
            m = tl.fma(coef, err, m)  # m.add_(e, alpha=coef)
        _store_f32(exp_avg, j, m, mask, STATE_BF16)
    eamax = tl.reduce(tl.where(mask, tl.abs(err), 0.0), 1, _maximum, keep_dims=True)
    return code_of(q, FMT), eamax


# the fp32 scalars and key words arrive as int32 bit patterns: never specialized on their value (a pattern equal
# to 1 would become a constant, and the keys change every step)
BIT_ARGS = ["fmax", "grad_scale", "decay", "lerp_coeff", "beta2", "one_minus_beta2", "bias_correction2_sqrt", "eps",
             "neg_step_size", "weight_decay", "momentum", "one_minus_dampening", "neg_lr", "coef", "k1", "k2"]


@triton.jit(do_not_specialize=BIT_ARGS)
def step_kernel(codes, scales, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scales, ebuf, tile_amax,
                tile_bad, block_amax, block_bad, new_scales, num_blocks, block_size, ntiles, fmax, grad_scale, decay,
                lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, weight_decay,
                momentum, one_minus_dampening, neg_lr, coef, k1, k2, PHASE: tl.constexpr, ADAMW: tl.constexpr,
                FMT: tl.constexpr, SCALED: tl.constexpr, GRAD_BF16: tl.constexpr, STATE_BF16: tl.constexpr,
                SR: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_CARRIED: tl.constexpr, KAHAN: tl.constexpr,
                INJECT: tl.constexpr, FROM_M: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr,
                FIRST: tl.constexpr, NESTEROV: tl.constexpr, SCALE: tl.constexpr, EMAX: tl.constexpr,
                BPP: tl.constexpr, TILE: tl.constexpr):
    """Phase 0 or 1 (``PHASE``) of a program's [BPP, TILE] tile: BPP blocks of at most TILE elements (small
    blocks, ntiles = 1), or tile t of one block (BPP = 1). The fp32 scalars arrive as their int32 bit patterns
    (rounded from the Python floats on the host, as ATen rounds Python scalars), the key words likewise."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % ntiles
    b = (pid // ntiles) * BPP + tl.arange(0, BPP).to(tl.int64)[:, None]  # [BPP, 1]: the program's blocks
    row_ok = b < num_blocks
    start = b * block_size + t * TILE
    lim = block_size - t * TILE  # elements of the block from this tile's start
    stat = b * ntiles + t  # the tile's entry in tile_amax / tile_bad
    fmax = fmax.to(tl.float32, bitcast=True)
    grad_scale = grad_scale.to(tl.float32, bitcast=True)
    decay = decay.to(tl.float32, bitcast=True)
    lerp_coeff = lerp_coeff.to(tl.float32, bitcast=True)
    beta2 = beta2.to(tl.float32, bitcast=True)
    one_minus_beta2 = one_minus_beta2.to(tl.float32, bitcast=True)
    bias_correction2_sqrt = bias_correction2_sqrt.to(tl.float32, bitcast=True)
    eps = eps.to(tl.float32, bitcast=True)
    neg_step_size = neg_step_size.to(tl.float32, bitcast=True)
    weight_decay = weight_decay.to(tl.float32, bitcast=True)
    momentum = momentum.to(tl.float32, bitcast=True)
    one_minus_dampening = one_minus_dampening.to(tl.float32, bitcast=True)
    neg_lr = neg_lr.to(tl.float32, bitcast=True)
    coef = coef.to(tl.float32, bitcast=True)
    k1 = k1.to(tl.uint32, bitcast=True)
    k2 = k2.to(tl.uint32, bitcast=True)
    if SCALED:
        scale = _load_scale(scales, b, row_ok, SCALE)  # the old scale: w_hat = decode(code) * scale
    else:
        scale = 1.0  # x * 1 is exact: the same bits as no multiply
    if KAHAN and SCALED:
        comp_scale = _load_scale(comp_scales, b, row_ok, SCALE)
    else:
        comp_scale = 1.0
    if PHASE == 0:
        i = tl.arange(0, TILE)[None, :]
        j = start + i
        mask = row_ok & (i < lim)
        w, m, v, d = _w_til(j, mask, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale,
                            grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                            neg_step_size, weight_decay, momentum, one_minus_dampening, neg_lr, ADAMW, FMT,
                            GRAD_BF16, STATE_BF16, HAS_MASTER, HAS_CARRIED, KAHAN, FROM_M, HAS_WD, HAS_MOM, FIRST,
                            NESTEROV)
        ok = is_finite(w)
        amax = tl.reduce(tl.where(mask & ok, tl.abs(w), 0.0), 1, _maximum, keep_dims=True)
        bad = tl.reduce(tl.where(mask & (~ok), 1, 0), 1, _maximum, keep_dims=True)
        tl.store(tile_amax + stat, amax, mask=row_ok)
        tl.store(tile_bad + stat, bad, mask=row_ok)
    else:
        # blocks without NaN/Inf only: every store below is masked by `good`, so a bad block keeps its bytes
        good = row_ok & (tl.load(block_bad + b, mask=row_ok, other=1) == 0)
        if SCALED:  # written by the block's first tile
            s = _new_scale(tl.load(block_amax + b, mask=good, other=1.0), fmax, new_scales, b,
                           good & (b * 0 + t == 0), SCALE, EMAX)
        else:
            s = 1.0
        if FMT == INT4 or FMT == FP4_E2M1:
            i = tl.arange(0, TILE // 2)[None, :]
            even = start + 2 * i
            mask_even = good & (2 * i < lim)
            mask_odd = good & (2 * i + 1 < lim)
            lo, eamax_lo = _quantize_elems(
                even, mask_even, s, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale,
                ebuf, fmax, grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                neg_step_size, weight_decay, momentum, one_minus_dampening, neg_lr, coef, k1, k2, ADAMW, FMT,
                GRAD_BF16, STATE_BF16, SR, HAS_MASTER, HAS_CARRIED, KAHAN, INJECT, FROM_M, HAS_WD, HAS_MOM,
                FIRST, NESTEROV)
            hi, eamax_hi = _quantize_elems(
                even + 1, mask_odd, s, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp,
                comp_scale, ebuf, fmax, grad_scale, decay, lerp_coeff, beta2, one_minus_beta2,
                bias_correction2_sqrt, eps, neg_step_size, weight_decay, momentum, one_minus_dampening, neg_lr,
                coef, k1, k2, ADAMW, FMT, GRAD_BF16, STATE_BF16, SR, HAS_MASTER, HAS_CARRIED, KAHAN, INJECT,
                FROM_M, HAS_WD, HAS_MOM, FIRST, NESTEROV)
            _store_nibbles(codes, even, lo, hi, mask_even, mask_odd)
            eamax = tl.maximum(eamax_lo, eamax_hi)
        else:
            i = tl.arange(0, TILE)[None, :]
            j = start + i
            mask = good & (i < lim)
            c, eamax = _quantize_elems(
                j, mask, s, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale, ebuf,
                fmax, grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                neg_step_size, weight_decay, momentum, one_minus_dampening, neg_lr, coef, k1, k2, ADAMW, FMT,
                GRAD_BF16, STATE_BF16, SR, HAS_MASTER, HAS_CARRIED, KAHAN, INJECT, FROM_M, HAS_WD, HAS_MOM,
                FIRST, NESTEROV)
            tl.store(codes + j, c, mask=mask)
        if KAHAN:
            tl.store(tile_amax + stat, eamax, mask=good)


@triton.jit
def _store_nibbles(codes, even, lo, hi, mask_even, mask_odd):
    # bytes of elements (even, even + 1): lo in the low nibble; where the odd element does not exist (the last
    # byte of an odd-sized tensor) its nibble keeps what it held
    old = tl.load(codes + (even >> 1), mask=mask_even, other=0).to(tl.int32)
    hi = tl.where(mask_odd, hi, (old >> 4) & 0xF)
    tl.store(codes + (even >> 1), (lo | (hi << 4)).to(tl.uint8), mask=mask_even)


@triton.jit
def _compensation_codes(ebuf, j, mask, cs, fmax, FMT: tl.constexpr):
    e = tl.load(ebuf + j, mask=mask, other=0.0)
    if FMT == BF16:
        y = e
    else:
        y = tl.div_rn(e, cs)
    y = tl.where(y < -fmax, -fmax, tl.where(y > fmax, fmax, y))
    return code_of(round_nearest(y, FMT), FMT)


@triton.jit(do_not_specialize=["fmax"])
def compensation_kernel(comp, new_comp_scales, ebuf, block_eamax, block_bad, num_blocks, block_size, ntiles, fmax,
                        FMT: tl.constexpr, SCALED: tl.constexpr, SCALE: tl.constexpr, EMAX: tl.constexpr,
                        BPP: tl.constexpr, TILE: tl.constexpr):
    """Phase 2, mode 'kahan': e = w_til - w_hat (``ebuf``) quantized to nearest into the compensation, with the
    block scale of e (its absmax per block: ``block_eamax``), as the reference's quantize(w_til - w_hat); tiles
    as in ``step_kernel``."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % ntiles
    b = (pid // ntiles) * BPP + tl.arange(0, BPP).to(tl.int64)[:, None]
    row_ok = b < num_blocks
    start = b * block_size + t * TILE
    lim = block_size - t * TILE
    fmax = fmax.to(tl.float32, bitcast=True)
    good = row_ok & (tl.load(block_bad + b, mask=row_ok, other=1) == 0)
    if SCALED:
        cs = _new_scale(tl.load(block_eamax + b, mask=good, other=1.0), fmax, new_comp_scales, b,
                        good & (b * 0 + t == 0), SCALE, EMAX)
    else:
        cs = 1.0
    if FMT == INT4 or FMT == FP4_E2M1:
        i = tl.arange(0, TILE // 2)[None, :]
        even = start + 2 * i
        mask_even = good & (2 * i < lim)
        mask_odd = good & (2 * i + 1 < lim)
        lo = _compensation_codes(ebuf, even, mask_even, cs, fmax, FMT)
        hi = _compensation_codes(ebuf, even + 1, mask_odd, cs, fmax, FMT)
        _store_nibbles(comp, even, lo, hi, mask_even, mask_odd)
    else:
        i = tl.arange(0, TILE)[None, :]
        j = start + i
        mask = good & (i < lim)
        tl.store(comp + j, _compensation_codes(ebuf, j, mask, cs, fmax, FMT), mask=mask)
