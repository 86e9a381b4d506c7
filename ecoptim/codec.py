"""Whole-tensor quantize / dequantize: float weights <-> (codes, scales) for a ``QuantSpec``.

    scale_b = max(absmax(block_b) / fmt.max, tiny)        one fp32 scale per block (none if unscaled)
    codes   = encode(round(w / scale_b))                  see ``ecoptim.rounding``
    w_hat   = decode(codes) * scale_b                     always computed in fp32

Codes and blocks follow the granularity's storage order (``Granularity.to_storage_order``: the logical order,
or the transpose of the last two dims for a weight stored (in, out), so that every block is consecutive).

That is the spec's default scale format (``formats.AbsmaxScale``). In general the spec's ``scale`` format
stores ``spec.scale.encode(absmax, fmt)`` (E8M0 exponents for MX, E4M3 block scales times an fp32 tensor
scale for NVFP4) and ``scale_b = spec.scale.decode(stored)`` is the fp32 effective scale in both formulas.

Dequantization is one deterministic fp32 multiply, so the "fake" (fp32 tensor on the grid) and the
real (codes + scales) storage produce bit-identical weights.

Non-finite weights are refused (``ValueError``) instead of turning into NaN scales and codes: with an
absmax scale the check is free (it reads the per-block absmax, which is NaN/Inf iff the block is), otherwise
it is one ``isfinite`` reduction. Values beyond +-max after scaling are clamped (saturated); with an absmax
scale that cannot happen, with a caller-given scale or the OCP MX rule (``E8M0Scale("floor")``) it can, and
``quantize(..., stats=d)`` counts it.
"""
from __future__ import annotations

import torch

from .formats import QuantSpec

__all__ = ["quantize", "dequantize", "compute_scale", "block_absmax", "check_weight", "check_finite",
           "saturation_threshold"]


def check_weight(w: torch.Tensor, spec: QuantSpec) -> None:
    """Raise a ValueError that names the problem if ``w`` cannot be quantized with ``spec``."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"only floating-point weights can be quantized, got dtype "
                         f"{getattr(w, 'dtype', type(w).__name__)}; convert the tensor to float first")
    spec.granularity.validate(w.shape)
    check_finite(w)


def _nonfinite_message(n_bad: int, numel: int) -> str:
    return (f"cannot quantize a weight holding non-finite values ({n_bad} of {numel} elements are NaN/Inf): "
            "its scale and codes would be NaN; find where the weight diverged (e.g. a too large learning rate)")


def check_finite(w: torch.Tensor) -> None:
    """Raise a ValueError if ``w`` holds NaN or Inf (one reduction)."""
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(_nonfinite_message(int((~torch.isfinite(w)).sum()), w.numel()))


def saturation_threshold(spec: QuantSpec) -> float:
    """Scaled magnitude beyond which clamping to +-max changes a value by more than rounding would:
    max + half the grid spacing at max. Values past it are counted as saturated."""
    m = torch.tensor([spec.format.max], dtype=torch.float32)
    return spec.format.max + 0.5 * float(spec.format.spacing(m))  # in float64: no overflow for FP32


def block_absmax(w32: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """absmax of every block of ``w32`` (fp32, shape (n_blocks,)). An empty tensor's blocks read as fmt.max, so
    the absmax scale of an empty weight is 1."""
    nb, bs = spec.granularity.blocks(w32.shape)
    if w32.numel() == 0:
        return torch.full((nb,), spec.format.max, dtype=torch.float32, device=w32.device)
    return spec.granularity.to_storage_order(w32).reshape(nb, bs).abs().amax(dim=1)


def compute_scale(w32: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The stored scale of ``w32`` (``spec.scale.encode`` of the per-block absmax: with the default absmax scale,
    fp32 of shape (n_blocks,)), or None for unscaled formats."""
    if not spec.scaled:
        return None
    return spec.scale.encode(block_absmax(w32, spec), spec.format)


def quantize(w: torch.Tensor, spec: QuantSpec, rounding: str = "nearest",
             generator: torch.Generator | None = None,
             scale: torch.Tensor | None = None,
             stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize ``w`` to ``(codes, scale)``. Pass ``scale`` (a stored scale of ``spec.scale``'s kind) to reuse
    it instead of computing one from ``w``.

    Raises ValueError if ``w`` holds NaN/Inf. If ``stats`` (a dict) is given, ``stats["saturated"]`` is
    increased by the number of elements clamped at +-max by more than half a grid step (always 0 with an
    absmax scale), ``stats["clamped"]`` by the number of elements clamped at all (|w / scale| > max) and
    ``stats["numel"]`` by ``w.numel()``.
    """
    w32 = w.detach().to(torch.float32)
    if scale is None:
        if spec.scaled:
            absmax = block_absmax(w32, spec)
            # absmax is NaN/Inf iff its block is: a check on n_blocks values instead of all of w
            if not bool(torch.isfinite(absmax).all()):
                raise ValueError(_nonfinite_message(int((~torch.isfinite(w32)).sum()), w32.numel()))
            scale = spec.scale.encode(absmax, spec.format)
        else:
            check_finite(w32)
    else:
        check_finite(w32)
        if spec.scaled:
            problem = spec.scale.problem(scale, spec.granularity.blocks(w32.shape)[0])
            if problem is not None:
                raise ValueError(f"quantize() was given a scale that {problem}")
    if scale is None:
        y = w32.reshape(-1)
    else:
        nb, bs = spec.granularity.blocks(w32.shape)
        y = (spec.granularity.to_storage_order(w32).reshape(nb, bs) / spec.scale.decode(scale)[:, None]).reshape(-1)
    if stats is not None:
        stats["saturated"] = stats.get("saturated", 0) + int((y.abs() > saturation_threshold(spec)).sum())
        stats["clamped"] = stats.get("clamped", 0) + int((y.abs() > spec.format.max).sum())
        stats["numel"] = stats.get("numel", 0) + y.numel()
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
        v = v.reshape(nb, bs) * spec.scale.decode(scale)[:, None]
    return spec.granularity.from_storage_order(v, shape).to(dtype)
