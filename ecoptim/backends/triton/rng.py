"""The stochastic-rounding uniforms of ``ecoptim.rng`` as a Triton function, in 32-bit integer operations:

    h   = mix32(lo32(i) XOR k1) ;  h = mix32(h XOR (k2 + hi32(i)) mod 2^32) ;  u_i = (h >> 8) * 2^-24

for the flat element index i of the stepped tensor and its key (k1, k2), the function the reference path and the
CPU kernel (``ecoptim/csrc/rng.h``) use, so every path rounds every element with the same number.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["mix32", "uniform"]


@triton.jit
def mix32(x):
    """rng.mix32 (the "lowbias32" hash) on uint32 ``x``; products wrap mod 2^32."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def uniform(j, k1, k2):
    """u_j in [0, 1) for int64 indices ``j`` and the key's two words ``k1``, ``k2`` (uint32)."""
    lo = (j & 0xFFFFFFFF).to(tl.uint32)
    hi = (j >> 32).to(tl.uint32)
    h = mix32(lo ^ k1)
    h = mix32(h ^ (k2 + hi))
    return (h >> 8).to(tl.float32) * (2.0 ** -24)
