"""SGD's update of one tile of elements, as a Triton function: w_til and the new momentum, with the operations of
torch.optim.SGD's single-tensor step (``ecoptim/optim/sgd.py``; ATen's add with alpha is a fused multiply-add,
as in ``ecoptim/csrc/sgd_sweeps.h``):

    w     = decode(code) * scale  (or the master weight; + the carried error)
    g     = grad * grad_scale ;  g = fma(wd, w, g) if wd != 0
    m     = g on the buffer's first step, else fma(1 - dampening, g, m * momentum)    (if momentum != 0)
    d     = fma(momentum, m, g) if nesterov else m   (g without momentum)
    w_til = fma(-lr, d, w)                                    (+ the kahan compensation, decoded)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .adamw import load_f32
from .codecs import decode

__all__ = ["sgd_w_til"]


@triton.jit
def sgd_w_til(j, mask, codes, scale, grad, buf, master, carried, comp, comp_scale, grad_scale, weight_decay,
              momentum, one_minus_dampening, neg_lr, FMT: tl.constexpr, GRAD_BF16: tl.constexpr,
              STATE_BF16: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_CARRIED: tl.constexpr, KAHAN: tl.constexpr,
              HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr):
    """(w_til, m) of elements ``j`` (m is g without momentum); nothing is written."""
    if HAS_MASTER:
        w = tl.load(master + j, mask=mask, other=0.0)
    else:
        w = decode(codes, j, mask, FMT) * scale
    if HAS_CARRIED:
        w = w + tl.load(carried + j, mask=mask, other=0.0)
    g = load_f32(grad, j, mask, GRAD_BF16) * grad_scale
    if HAS_WD:
        g = tl.fma(weight_decay, w, g)
    m = g
    d = g
    if HAS_MOM:
        if not FIRST:
            m = tl.fma(one_minus_dampening, g, load_f32(buf, j, mask, STATE_BF16) * momentum)
        if NESTEROV:
            d = tl.fma(momentum, m, g)
        else:
            d = m
    w = tl.fma(neg_lr, d, w)
    if KAHAN:
        w = w + decode(comp, j, mask, FMT) * comp_scale
    return w, m
