"""SGD with momentum (EMA, undamped, Nesterov) for quantized weights, with ECO's error injection.

Update (torch.optim.SGD's, including its first-step rule buf = g):
    g   = grad + wd * w                        (L2 weight decay, as torch)
    m   = beta*m + (1 - dampening)*g           (dampening = beta gives the paper's EMA form)
    d   = g + beta*m  if nesterov else m
    w   = w - lr*d

ECO injection after re-quantizing (e = w_til - q(w_til)):
    plain:    m += (1/lr) * (1 - 1/beta) * e                 = -(1 - beta)/(lr*beta)   * e
    nesterov: m += -(1 - beta)/(lr*beta^2) * e

Derivation: with the virtual iterate x = w_hat - a*m (m after injection) one step gives
    x' = w_hat - lr*d - e - a*(m_new + c*e),
the error vanishes iff c = -1/a, and the old momentum vanishes iff (lr + a)*beta = a (plain) or
(lr*beta + a)*beta = a (Nesterov), i.e. a = lr*beta/(1-beta) resp. a = lr*beta^2/(1-beta). Then x' = x - k*g
for a constant k (lr for EMA momentum, lr/(1-beta) undamped; lr*(1+beta) resp. lr/(1-beta) with Nesterov): plain gradient
descent on the virtual iterate whatever the quantizer did. ``tests/test_optim.py`` checks it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from . import fused as _fused
from ..convert import spec_of
from .base import ParamStep, QuantOptimizer
from .hyper import check_flag, check_lr, check_number

__all__ = ["SGD", "sgd_update_", "eco_sgd_coef"]


def sgd_update_(w: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, *, lr: float | torch.Tensor,
                momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                maximize: bool = False) -> torch.Tensor | None:
    """torch.optim.SGD's single-tensor step on ``w`` in place; returns the (new or updated) momentum buffer.
    ``maximize``: ascend (the gradient negated first, as torch)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(w, alpha=weight_decay)
    if momentum != 0:
        if buf is None:
            buf = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    w.add_(grad, alpha=-lr)
    return buf


def eco_sgd_coef(lr: float, momentum: float, nesterov: bool) -> float:
    """Injection coefficient c in m += c*e (see the module docstring)."""
    if nesterov:
        return -(1.0 - momentum) / (lr * momentum * momentum)
    return (1.0 / lr) * (1.0 - 1.0 / momentum)


class SGD(QuantOptimizer):
    """Drop-in ``torch.optim.SGD`` whose quantized parameters are updated per ``mode`` (default ECO).

    Args: params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused as
    torch.optim.SGD, with torch's defaults (momentum 0: plain SGD); ``mode`` in
    {'eco', 'master', 'naive', 'exact', 'kahan'}; ``rounding`` in {'nearest', 'stochastic'}; ``seed`` of the
    stochastic-rounding generator; ``nonfinite`` in {'skip', 'raise', 'skip_blocks'} (see ``QuantOptimizer``);
    ``fused``: None (default) or True use the fused CPU kernel where it applies (bit-identical to the reference
    path), False never. ``differentiable=True`` is refused (see ``hyper.check_impl_flags``).

    ``mode='eco'`` injects the rounding error into the momentum buffer, so a group holding quantized weights needs
    ``momentum > 0`` (e.g. 0.9); such a group with ``momentum=0`` is refused at construction (plain SGD on
    quantized weights: ``mode='naive'`` or ``'kahan'``). Dense parameters take torch's update in any mode.
    ``maximize=True`` negates the gradient before the update, as torch does; the injection is unchanged (it
    depends on the momentum recurrence only, not on the sign of what it accumulates).
    """

    #: the per-parameter moments (their shapes and precision are checked when a state_dict is loaded)
    moment_keys = ("momentum_buffer",)
    #: the torch.optim class whose state_dicts this one loads and exports (``interop``), and its state keys
    torch_class = torch.optim.SGD
    torch_state_keys = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, mode: str = "eco", rounding: str = "stochastic", seed: int = 0,
                 nonfinite: str = "skip") -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, mode=mode, rounding=rounding, seed=seed, nonfinite=nonfinite)

    def _validate_group(self, group: dict) -> None:
        # torch.optim.SGD's checks, in its order and with its messages, before ecoptim's own
        check_lr(group["lr"])
        m = check_number("momentum", group["momentum"], hi=1.0)
        check_number("weight_decay", group["weight_decay"])
        d = check_number("dampening", group["dampening"], lo=-math.inf)
        check_flag("nesterov", group["nesterov"])
        if group["nesterov"] and (m <= 0 or d != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening (momentum > 0, "
                             "dampening = 0, as torch.optim.SGD)")
        super()._validate_group(group)
        if group["mode"] == "eco" and m == 0 and any(spec_of(p) is not None for p in group["params"]):
            raise ValueError("mode='eco' injects the rounding error into the momentum and divides by it, so "
                             "momentum must be > 0 for quantized weights; use momentum=0.9, or "
                             "mode='naive'/'kahan' for plain SGD")

    def _init_state(self, p: torch.Tensor, state: dict, group: dict, quantized: bool) -> None:
        state["step"] = torch.tensor(0.0)
        # torch's rule: the buffer is created from the first gradient; ecoptim keeps it in fp32 for
        # quantized weights (the injected term can dwarf m, so it needs the range).
        state["momentum_buffer"] = None

    def _update_(self, w: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 spec: Any = None) -> Any:
        state["momentum_buffer"] = sgd_update_(
            w, grad, state["momentum_buffer"], lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], weight_decay=group["weight_decay"],
            maximize=group.get("maximize", False))
        return None

    def _update_job(self, p: ParamStep, group: dict, key: tuple[int, int] | None) -> _fused.Job:
        lr, mom, state = group["lr"], group["momentum"], p.state
        first = state["momentum_buffer"] is None and mom != 0
        if first:  # torch creates the buffer from the first gradient; the kernel writes all of it, except blocks
            # it leaves unchanged (nonfinite='skip_blocks'): those hold zeros, from which the next step's
            # momentum * 0 + (1 - dampening) * g is the first step's g (dampening 0, torch's default)
            state["momentum_buffer"] = torch.zeros(p.param.shape, dtype=torch.float32, device=p.param.device)
        eco, nesterov = group["mode"] == "eco", group["nesterov"]
        job = _fused.sgd_job(p.param, p.grad, p.spec, state["momentum_buffer"], key, lr=lr, momentum=mom,
                             dampening=group["dampening"], nesterov=nesterov, weight_decay=group["weight_decay"],
                             coef=eco_sgd_coef(lr, mom, nesterov) if eco else 0.0, first=first, inject=eco)
        job.injection_coef_of = lambda t, lr_t: eco_sgd_coef(lr_t, mom, nesterov) if eco else 0.0
        return job

    def _undo_step_start(self, state: dict, job: _fused.Job) -> None:
        super()._undo_step_start(state, job)
        if job.step:  # its first step did not happen: the next one creates the buffer from its gradient again
            state["momentum_buffer"] = None

    def _inject_(self, e: torch.Tensor, state: dict, group: dict, aux: Any) -> None:
        state["momentum_buffer"].add_(e, alpha=eco_sgd_coef(group["lr"], group["momentum"], group["nesterov"]))
