"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023) for quantized weights, with an
ECO-style error injection.

Update (the paper's Algorithm 2, in the ops and order of the common PyTorch implementation, lucidrains'
lion-pytorch):
    w     = w*(1 - lr*wd)
    c     = b1*m + (1-b1)*g                  (the interpolation the step takes the sign of)
    w_til = w - lr*sign(c)
    m     = b2*m + (1-b2)*g                  (the momentum is updated after the step, with b2)

ECO injection after re-quantizing (e = w_til - q(w_til)), per element, with rho = 1 - lr*wd:
    m += rho * (-(1-b2)/(lr*b1)) * |c| * e

Derivation, and where it is approximate (docs/design/lion.md has it in full). Model the sign as linear per
element, sign(c_i) = c_i/|c_i|: the step is then s_i*c_i with s_i = lr/|c_i| (the step's own secant gain, like
Muon's 'secant' injection). For a constant s, Lion is linear and the virtual iterate x = w_hat - a*m follows
x <- x - s*g exactly whatever the quantizer did iff a = s*b1/(1-b2) and the injection is m += -(1/a)*e =
-(1-b2)/(s*b1)*e, which is the formula above (b1 = b2 gives SGD-M's EMA coefficient (1/s)(1 - 1/b)). It is not
exact for Lion: s_i changes with c_i from step to step, and the sign saturates, so an error pushed into m can
change the direction of a later step but never its size (lr per element). In particular, a step too small to
move a weight (e = -lr*sign(c)) adds (1-b2)/b1 * c to m: m keeps growing along c, x moves by -s*g as the linear
model says, but the next step is still lr*sign(c), so under round-to-nearest with lr below half a grid step
nothing ever moves, with or without ECO. Decoupled decay: the factor rho is the project's convention
(``adamw.py``).

Modes 'master', 'exact', 'naive' and 'kahan' are the base class's (``base.py``). The fused kernel has no Lion
step: every group takes the reference path.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..convert import spec_of
from .base import QuantOptimizer
from .hyper import check_flag, check_lr, check_number

__all__ = ["Lion", "lion_update_", "eco_lion_coef"]


def lion_update_(w: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr: float, beta1: float,
                 beta2: float, weight_decay: float, maximize: bool = False) -> torch.Tensor:
    """One Lion step on ``w`` and ``exp_avg`` in place (module docstring); returns c = b1*m + (1-b1)*g, the
    interpolation whose sign was taken. ``maximize``: ascend (the gradient negated first)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    c = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    w.add_(torch.sign(c), alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
    return c


def eco_lion_coef(lr: float, beta1: float, beta2: float, weight_decay: float) -> float:
    """Scalar part of Lion's injection coefficient: multiply by ``|c| * e`` elementwise (module docstring)."""
    return (1 - lr * weight_decay) * (-(1 - beta2) / (lr * beta1))


class Lion(QuantOptimizer):
    """Lion whose quantized parameters are updated per ``mode`` (default ECO).

    Args: params (tensors, named parameters or groups), lr (default 1e-4), betas (b1 for the step's
    interpolation, b2 for the momentum; default (0.9, 0.99)), weight_decay (decoupled, default 0), maximize;
    ``mode`` in {'eco', 'master', 'naive', 'exact', 'kahan'}; ``rounding`` in {'nearest', 'stochastic'};
    ``seed`` of the stochastic-rounding generator; ``nonfinite`` in {'skip', 'raise', 'skip_blocks'} (see
    ``QuantOptimizer``). Dense parameters, and quantized ones stored in the FP32 identity format, get the plain
    Lion update (``lion_update_``) bit for bit. The momentum of quantized weights is fp32.

    ``mode='eco'`` needs b1 > 0 for quantized weights (the injection divides by it) and lr > 0. Every group takes
    the reference path (the fused C kernel has no Lion step).
    """

    _kernel_ok = False  # the fused op implements AdamW and SGD only

    moment_keys = ("exp_avg",)

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, mode: str = "eco",
                 rounding: str = "stochastic", seed: int = 0, nonfinite: str = "skip") -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, mode=mode, rounding=rounding, seed=seed, nonfinite=nonfinite)

    def _validate_group(self, group: dict) -> None:
        check_lr(group["lr"])
        if isinstance(group["lr"], torch.Tensor):
            raise ValueError("Lion takes lr as a Python float (the injection coefficient is computed on the host)")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, _ = (check_number("beta", b, hi=1.0, label=f"beta parameter at index {i}") for i, b in enumerate(betas))
        check_number("weight_decay", group["weight_decay"])
        check_flag("maximize", group.get("maximize", False))
        super()._validate_group(group)
        if group["mode"] == "eco" and b1 == 0 and any(spec_of(p) is not None for p in group["params"]):
            raise ValueError("mode='eco' injects the rounding error into the momentum and divides by beta1, so "
                             "beta1 must be > 0 for quantized weights; use betas=(0.9, 0.99), or mode='naive'")

    def _init_state(self, p: torch.Tensor, state: dict, group: dict, quantized: bool) -> None:
        state["step"] = torch.tensor(0.0)
        # quantized weights: fp32 momentum (|coef*|c|*e| can dwarf m); dense: the parameter's dtype
        dt = torch.float32 if quantized else p.dtype
        state["exp_avg"] = torch.zeros(p.shape, dtype=dt, device=p.device)

    def _update_(self, w: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 spec: Any = None) -> Any:
        if grad.is_sparse:
            raise RuntimeError("Lion does not support sparse gradients")
        b1, b2 = group["betas"]
        return lion_update_(w, grad, state["exp_avg"], lr=group["lr"], beta1=b1, beta2=b2,
                            weight_decay=group["weight_decay"], maximize=group.get("maximize", False))

    def _inject_(self, e: torch.Tensor, state: dict, group: dict, aux: Any) -> None:
        b1, b2 = group["betas"]
        coef = eco_lion_coef(group["lr"], b1, b2, group["weight_decay"])
        state["exp_avg"].addcmul_(e, aux.abs_(), value=coef)
