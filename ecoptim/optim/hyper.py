"""Construction-time checks of optimizer hyper-parameters, with torch.optim's error types and messages.

torch.optim checks ``0 <= lr``, ``0 <= eps``, ``0 <= beta < 1``, ``0 <= weight_decay``, ``0 <= momentum`` and
raises ``ValueError("Invalid <name> ...: <value>")``; ecoptim raises the same type with the same opening words
(so torch's own optimizer tests match them) and additionally refuses what torch lets through to fail later: NaN
and +-Inf, bools and other non-numbers, and flags that are not bools. The checks run on every parameter group,
including groups added later and groups loaded from a state_dict.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_number", "check_lr", "check_flag", "check_impl_flags"]


def _describe(x: Any) -> str:
    return repr(float(x)) if isinstance(x, torch.Tensor) and x.numel() == 1 else repr(x)


def check_number(name: str, x: Any, *, lo: float = 0.0, hi: float | None = None, label: str | None = None) -> float:
    """``x`` as a float, checked to be a finite real number in ``[lo, hi)`` (``hi`` None: no upper bound).

    ``label``: the words of torch's message (``"Invalid {label}: {x}"``), e.g. ``"weight_decay value"``."""
    label = label or f"{name} value"
    bound = f"in [{lo:g}, {hi:g})" if hi is not None else f">= {lo:g}"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        if isinstance(x, torch.Tensor):
            raise ValueError(f"Invalid {label}: {_describe(x)} is a Tensor; {name} must be a Python float "
                             "(ecoptim computes its update and ECO's injection coefficient from it on the host)")
        raise ValueError(f"Invalid {label}: {x!r} ({type(x).__name__}); {name} must be a finite float {bound}")
    x = float(x)
    if not math.isfinite(x) or x < lo or (hi is not None and x >= hi):
        raise ValueError(f"Invalid {label}: {x!r}; {name} must be a finite float {bound}")
    return x


def check_lr(lr: Any) -> None:
    """A learning rate: a finite float >= 0, or (as torch allows, e.g. for LR schedulers that write into it) a
    1-element floating-point Tensor holding one, without autograd."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.dtype.is_floating_point or lr.requires_grad:
            raise ValueError(f"Invalid learning rate: a Tensor lr must be a floating-point tensor without autograd "
                             f"(got dtype {lr.dtype}, requires_grad={lr.requires_grad}); ecoptim's step is not "
                             "differentiable")
        value = float(lr)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid learning rate: {value!r}; lr must be a finite float >= 0")
        return
    check_number("lr", lr, label="learning rate")


def check_flag(name: str, x: Any, *, allow_none: bool = False) -> None:
    """A bool flag (``allow_none``: also None, torch's "choose for me")."""
    if not (isinstance(x, bool) or (allow_none and x is None)):
        raise ValueError(f"{name} must be True or False{' or None' if allow_none else ''}, got {x!r}")


def check_impl_flags(group: dict, owner: str) -> None:
    """torch.optim's implementation flags, checked against what an ecoptim step can honour.

    * ``foreach`` (None/bool): accepted. ecoptim's update of a dense parameter is torch's single-tensor
      code, which gives the same bits as torch's foreach code on CPU; quantized weights take ecoptim's own
      paths whatever it says.
    * ``fused`` (None/bool): accepted; None and True use ecoptim's fused CPU kernel where it applies, False
      always the reference path (same bits either way).
    * ``differentiable``: only False. ecoptim rewrites quantized weights in place under ``torch.no_grad``;
      there is no autograd graph through its step.
    * ``capturable`` (AdamW): only False. The step reads its step count on the host (``.item()``) and
      calls a CPU kernel, so it cannot be recorded into a CUDA graph.
    """
    check_flag("foreach", group.get("foreach"), allow_none=True)
    if group.get("fused") is True and group.get("foreach") is True:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    check_flag("differentiable", group.get("differentiable", False))
    if group.get("differentiable", False):
        raise ValueError(f"differentiable=True is not supported by {owner}: ecoptim rewrites quantized weights in "
                         "place under torch.no_grad, so no autograd graph runs through its step; use "
                         "differentiable=False (the default)")
    check_flag("capturable", group.get("capturable", False))
    if group.get("capturable", False):
        raise ValueError(f"capturable=True is not supported by {owner}: its step reads the step count on the host "
                         "and runs a CPU kernel, so it cannot be captured in a CUDA graph; use capturable=False "
                         "(the default)")
