"""The fused optimizer step as Triton kernels: the CUDA implementation of ``ecoptim.ops``' ``adamw_step_`` and
``sgd_step_``, bit-identical to the reference path (``ecoptim.optim``) like the CPU kernel.

Split by concern: ``codecs`` (codes <-> fp32 with integer bit operations, rounding), ``rng`` (the
stochastic-rounding uniforms), ``adamw`` / ``sgd`` (the update of a tile of elements), ``step`` (the kernels and
their phases), ``ops`` (the launchers, registered for CUDA), ``support`` (which parameters they step). Only
``support`` is imported with this package, so ``ecoptim`` imports without triton; ``load_ops()`` imports the
kernels (and registers them).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ...formats import QuantSpec
from .support import available, supports

__all__ = ["available", "cuda_ready", "supports", "applies", "load_ops"]


def load_ops() -> ModuleType:
    """The launchers' module (``ecoptim.backends.triton.ops``), imported once: registers the CUDA kernels."""
    return importlib.import_module(__name__ + ".ops")


_cuda_ready: bool | None = None


def cuda_ready() -> bool:
    """Whether the kernels can step CUDA tensors here: triton imports and a CUDA device exists (then the kernels
    are registered for the ops). Asked per parameter per step: answered once."""
    global _cuda_ready
    if _cuda_ready is None:
        _cuda_ready = available() and torch.cuda.is_available()
        if _cuda_ready:
            load_ops()
    return _cuda_ready


def applies(p: torch.Tensor, spec: QuantSpec | None, group: dict) -> bool:
    """Whether the op's CUDA kernel (these Triton kernels) steps ``p``: a CUDA tensor that ``supports`` accepts."""
    return p.is_cuda and supports(p, spec, group) and cuda_ready()
