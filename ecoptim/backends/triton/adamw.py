"""AdamW's update of one tile of elements, as a Triton function: w_til, the new moments and the denominator,
with the IEEE operations ATen performs for the reference path (``ecoptim/optim/adamw.py``), in its order, with a
fused multiply-add exactly where ATen's CPU kernels use one (lerp, addcmul) and nowhere else (the kernels are
launched with ``enable_fp_fusion=False``). The same sequence as ``ecoptim/csrc/adamw_sweeps.h``:

    w     = decode(code) * scale  (or the master weight; + the carried error)   then  w = w * (1 - lr*wd)
    g     = grad * grad_scale
    m     = fma(lerp_coeff, g - m, m if lerp weight < 0.5 else g)                  (m.lerp_(g, 1 - b1))
    v     = fma((1 - b2) * g, g, v * b2)                                           (v.mul_(b2).addcmul_(g, g))
    denom = sqrt_rn(v) /_rn sqrt(1 - b2^t) + eps
    w_til = w + (-(lr / (1 - b1^t)) * m) /_rn denom           (+ the kahan compensation, decoded)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codecs import bf16_to_f32, decode

__all__ = ["load_f32", "adamw_w_til"]


@triton.jit
def load_f32(ptr, j, mask, IS_BF16: tl.constexpr):
    """Elements ``j`` of an fp32 array, or of a bf16 one passed as int16 bits, as fp32."""
    if IS_BF16:
        return bf16_to_f32(tl.load(ptr + j, mask=mask, other=0))
    else:
        return tl.load(ptr + j, mask=mask, other=0.0)


@triton.jit
def adamw_w_til(j, mask, codes, scale, grad, exp_avg, exp_avg_sq, master, carried, comp, comp_scale,
                grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
                FMT: tl.constexpr, GRAD_BF16: tl.constexpr, STATE_BF16: tl.constexpr, HAS_MASTER: tl.constexpr,
                HAS_CARRIED: tl.constexpr, KAHAN: tl.constexpr, FROM_M: tl.constexpr):
    """(w_til, m, v, denom) of elements ``j`` (see the module docstring); nothing is written."""
    if HAS_MASTER:
        w = tl.load(master + j, mask=mask, other=0.0)
    else:
        w = decode(codes, j, mask, FMT) * scale
    if HAS_CARRIED:
        w = w + tl.load(carried + j, mask=mask, other=0.0)
    w = w * decay
    g = load_f32(grad, j, mask, GRAD_BF16) * grad_scale
    m = load_f32(exp_avg, j, mask, STATE_BF16)
    v = load_f32(exp_avg_sq, j, mask, STATE_BF16)
    if FROM_M:  # ATen's lerp: from the start point for weights < 0.5, from the end point otherwise
        m = tl.fma(lerp_coeff, g - m, m)
    else:
        m = tl.fma(lerp_coeff, g - m, g)
    v = v * beta2
    v = tl.fma(one_minus_beta2 * g, g, v)
    d = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + tl.div_rn(neg_step_size * m, d)
    if KAHAN:
        w = w + decode(comp, j, mask, FMT) * comp_scale
    return w, m, v, d
