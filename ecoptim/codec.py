"""Whole-tensor quantize / dequantize: float weights <-> (codes, scales) for a ``QuantSpec``.

    scale_b = max(absmax(block_b) / fmt.max, tiny)        one fp32 scale per block (none if unscaled)
    codes   = encode(round(w / scale_b))                  see ``ecoptim.rounding``
    w_hat   = decode(codes) * scale_b                     always computed in fp32

Dequantization is one deterministic fp32 multiply, so the "fake" (fp32 tensor on the grid) and the
real (codes + scales) storage produce bit-identical weights.
"""
from __future__ import annotations

import torch

from .formats import QuantSpec

__all__ = ["quantize", "dequantize", "compute_scale", "check_weight"]

_TINY = torch.finfo(torch.float32).tiny


def check_weight(w: torch.Tensor, spec: QuantSpec) -> None:
    """Raise a ValueError that names the problem if ``w`` cannot be quantized with ``spec``."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"only floating-point weights can be quantized, got dtype "
                         f"{getattr(w, 'dtype', type(w).__name__)}; convert the tensor to float first")
    spec.granularity.validate(w.shape)


def compute_scale(w32: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """Per-block absmax scale (fp32, shape (n_blocks,)), or None for unscaled formats."""
    if not spec.scaled:
        return None
    nb, bs = spec.granularity.blocks(w32.shape)
    if w32.numel() == 0:
        return torch.ones(nb, dtype=torch.float32, device=w32.device)
    absmax = w32.reshape(nb, bs).abs().amax(dim=1)
    return (absmax / spec.format.max).clamp_(min=_TINY)


def quantize(w: torch.Tensor, spec: QuantSpec, rounding: str = "nearest",
             generator: torch.Generator | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize ``w`` to ``(codes, scale)``. Pass ``scale`` to reuse a given scale instead of absmax."""
    w32 = w.detach().to(torch.float32)
    if scale is None:
        scale = compute_scale(w32, spec)
    if scale is None:
        y = w32.reshape(-1)
    else:
        nb, bs = spec.granularity.blocks(w32.shape)
        y = (w32.reshape(nb, bs) / scale[:, None]).reshape(-1)
    q = spec.format.round(y, rounding, generator)
    return spec.format.encode(q), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec, shape: torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes and scales back to a dense tensor of ``shape`` (computed in fp32, then cast to ``dtype``)."""
    numel = 1
    for s in shape:
        numel *= s
    v = spec.format.decode(codes.reshape(-1), numel)
    if scale is not None:
        nb, bs = spec.granularity.blocks(shape)
        v = v.reshape(nb, bs) * scale[:, None]
    return v.reshape(shape).to(dtype)
