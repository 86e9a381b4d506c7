"""Rounding of fp32 values onto a format's grid: round-to-nearest-even and stochastic rounding.

Both work on *scaled* values y (already divided by the block scale) and return fp32 tensors whose
values lie exactly on the grid of ``fmt`` (so the later cast to the storage dtype is exact).

With s = fmt.spacing(y) (a power of two for float formats, 1 for integer formats), y/s is exact and

    nearest:    q = s * round_half_even(y / s)
    stochastic: q = s * (floor(y / s) + [u < y/s - floor(y/s)]),   u ~ U[0, 1)

The uniforms u come from ``ecoptim.rng``: a counter-based hash of the element index under one key drawn
from ``generator``, which the fused CPU kernel reproduces bit for bit.

so E[q] = y (unbiased) and q is always one of the two grid neighbours of y. Values are clamped to
[-fmt.max, fmt.max] first (saturation), so neither mode can leave the finite range.

This module sits below ``ecoptim.formats``: it needs only ``max``, ``spacing`` and ``is_identity`` from a
format (the ``Grid`` protocol, which every ``formats.Format`` satisfies), and ``Format.round`` delegates here.
"""
from __future__ import annotations

from typing import Literal, Protocol

import torch

from .rng import draw_key, uniform

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")

__all__ = ["Grid", "round_nearest", "round_stochastic", "round_to_grid", "ROUNDINGS", "Rounding", "check_rounding",
           "is_identity"]


class Grid(Protocol):
    """What rounding needs from a symmetric number format; every ``ecoptim.formats.Format`` is one."""

    @property
    def max(self) -> float:
        """The largest finite grid value; values beyond +-max saturate."""

    @property
    def is_identity(self) -> bool:
        """True when every fp32 value is on the grid, so rounding returns its input."""

    def spacing(self, y: torch.Tensor) -> torch.Tensor:
        """Distance between the grid points that bracket ``y`` (fp32, same shape)."""


def check_rounding(rounding: str) -> str:
    """Return ``rounding`` if it is one of ``ROUNDINGS``, else raise a ValueError naming the choices."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use 'nearest' or 'stochastic'")
    return rounding


def is_identity(fmt: Grid) -> bool:
    """True when rounding onto ``fmt`` changes nothing (the fp32 grid): no work, and no random key drawn."""
    return bool(fmt.is_identity)


def round_nearest(y: torch.Tensor, fmt: Grid) -> torch.Tensor:
    """Round-to-nearest, ties to even, with saturation at +-fmt.max. ``y`` must be fp32."""
    if is_identity(fmt):
        return y.clone()
    y = y.clamp(-fmt.max, fmt.max)
    s = fmt.spacing(y)
    return torch.round(y / s).mul_(s)


def round_stochastic(y: torch.Tensor, fmt: Grid, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased stochastic rounding onto the grid. ``noise`` (U[0,1), same shape) overrides ``generator``;
    otherwise one key is drawn from ``generator`` (global RNG if None) and the uniforms are ``rng.uniform``."""
    if is_identity(fmt):
        return y.clone()
    y = y.clamp(-fmt.max, fmt.max)
    s = fmt.spacing(y)
    r = y / s
    lo = torch.floor(r)
    if noise is None:
        noise = uniform(draw_key(generator), y.numel(), y.device).view(y.shape)
    # r - lo is exact (both are integers times powers of two within 24 bits), so P(up) = frac exactly
    # up to the 2^-24 resolution of the uniforms.
    return lo.add_((noise < (r - lo)).to(lo.dtype)).mul_(s)


def round_to_grid(y: torch.Tensor, fmt: Grid, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``round_nearest`` or ``round_stochastic`` by name (``generator`` is used by the stochastic one only)."""
    if rounding == "nearest":
        return round_nearest(y, fmt)
    if rounding == "stochastic":
        return round_stochastic(y, fmt, generator)
    check_rounding(rounding)
    raise AssertionError  # unreachable
