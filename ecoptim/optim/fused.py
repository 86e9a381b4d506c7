"""Fast path: one compiled kernel per quantized tensor for AdamW (modes eco and naive).

The reference path (``base.QuantOptimizer._step_param``) makes ~20 passes over fp32 temporaries:
dequantize, the AdamW ops, absmax, scale, round, encode, dequantize again, error, injection. Here the same
maths is one function compiled by torch.compile (inductor, C++ on CPU), which fuses it into a row-wise
kernel: pass 1 computes w_til and the row absmax, pass 2 recomputes w_til from the same inputs, rounds,
writes codes, scales, m and v. No full-size fp32 temporary is materialised; traffic per element is
codes + grad + m + v read twice and codes + m + v written once.

Grid spacing is computed from the fp32 exponent bits (exact powers of two, like ``FloatFormat.spacing``),
so only formats whose spacing stays a normal fp32 number qualify: FP8 E4M3/E5M2 and INT8, scaled.

Agreement with the reference: the quantization maths is the same sequence of IEEE operations, but inductor
lowers ``lerp``/``addcmul``/scalar division differently from ATen's eager kernels (fma, no reciprocal
multiply), so m and v can differ in the last bit, and a weight sitting on a rounding tie can then land on
the other neighbour. ``tests/test_fused.py`` bounds both. Stochastic rounding consumes the same
``torch.rand`` stream as the reference path, so a seeded run draws the same numbers in both paths.
"""
from __future__ import annotations

import warnings

import torch

from ..formats import FloatFormat, IntFormat, QuantSpec

__all__ = ["supports", "adamw_step_"]

_TINY = torch.finfo(torch.float32).tiny


def supports(spec: QuantSpec) -> bool:
    f = spec.format
    if not spec.scaled:
        return False
    if isinstance(f, FloatFormat):
        return f.bits == 8 and f.emin - f.man_bits >= -126
    return isinstance(f, IntFormat) and f.bits == 8


def _kernel(codes: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
            noise: torch.Tensor | None, decay: torch.Tensor, one_minus_b1: torch.Tensor, b2: torch.Tensor,
            one_minus_b2: torch.Tensor, bc2_sqrt: torch.Tensor, eps: torch.Tensor, step_size: torch.Tensor,
            coef: torch.Tensor, fmax: float, man_bits: int, emin: int, is_float: bool, inject: bool) -> None:
    nb = scale.shape[0]
    g = grad.reshape(nb, -1).to(torch.float32)
    m2, v2 = m.view(nb, -1), v.view(nb, -1)
    w = codes.view(nb, -1).to(torch.float32) * scale[:, None]
    # AdamW, same order as adamw_update_
    w_til = w * decay
    m2.copy_(m2 + one_minus_b1 * (g - m2))
    v2.copy_(v2 * b2 + one_minus_b2 * (g * g))
    denom = v2.sqrt() / bc2_sqrt + eps
    w_til = w_til - step_size * (m2 / denom)
    # re-quantize with a fresh absmax scale per block
    new_scale = (w_til.abs().amax(1) / fmax).clamp_min(_TINY)
    y = (w_til / new_scale[:, None]).clamp(-fmax, fmax)
    if is_float:
        k = (((y.view(torch.int32) >> 23) & 0xFF) - 127).clamp_min(emin) - man_bits
        s = ((k + 127) << 23).view(torch.float32)
        r = y * ((127 - k) << 23).view(torch.float32)  # y / s, exact: s is a power of two
    else:
        s = torch.ones_like(y)
        r = y
    if noise is None:
        q = torch.round(r) * s
    else:
        lo = torch.floor(r)
        q = (lo + (noise.view(nb, -1) < (r - lo)).to(torch.float32)) * s
    codes.view(nb, -1).copy_(q.to(codes.dtype))
    scale.copy_(new_scale)
    if inject:
        m2.copy_(m2 + coef * ((w_til - q * new_scale[:, None]) * denom))


_compiled = None
_failed = False


def _get_kernel():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_kernel, dynamic=True, fullgraph=True)
    return _compiled


def adamw_step_(codes: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                noise: torch.Tensor | None, spec: QuantSpec, *, step: float, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, coef: float, inject: bool) -> bool:
    """Run the fused step in place. Returns False (and warns once) if compilation is unavailable."""
    global _failed
    if _failed:
        return False
    f = spec.format
    dev = codes.device
    t = lambda x: torch.tensor(x, dtype=torch.float32, device=dev)  # noqa: E731  (0-d: no recompiles per lr)
    args = (t(1 - lr * weight_decay), t(1 - beta1), t(beta2), t(1 - beta2), t((1 - beta2 ** step) ** 0.5), t(eps),
            t(lr / (1 - beta1 ** step)), t(coef))
    try:
        _get_kernel()(codes, scale, grad, m, v, noise, *args, float(f.max),
                      getattr(f, "man_bits", 0), getattr(f, "emin", 0), isinstance(f, FloatFormat), inject)
    except Exception as e:  # no C++ compiler, unsupported backend: fall back to the reference path
        _failed = True
        warnings.warn(f"ecoptim fused AdamW kernel unavailable ({type(e).__name__}: {e}); using the reference path")
        return False
    return True
