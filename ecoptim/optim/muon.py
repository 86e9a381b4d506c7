"""Muon (orthogonalised momentum) for quantized 2-D weights, with an ECO-style error injection; and the usual
recipe's pairing with AdamW for the other parameters.

Update (torch.optim.Muon's single-tensor path, same ops in the same order):
    m   = lerp(m, g, 1 - beta)          = beta*m + (1-beta)*g         (EMA momentum)
    u   = lerp(g, m, beta) if nesterov else m
    O   = NS(u)                          quintic Newton-Schulz in bf16 (``zeropower_via_newtonschulz``)
    w   = w*(1 - lr*wd) - lr_a*O         lr_a = adjusted_lr(lr, adjust_lr_fn, shape)

ECO injection after re-quantizing (e = w_til - q(w_til)), with rho = 1 - lr*wd:
    plain:    m += rho * (1/(lr_a*gain)) * (1 - 1/beta)        * e
    nesterov: m += rho * (-(1-beta)/(lr_a*gain*beta^2))         * e
    gain = ||O||_F / ||u||_F   (injection='secant', default)   or   gain = 1   (injection='unit')

Derivation, and where it is approximate. Model the orthogonaliser as linear, O(u) ~= gain*u. Then Muon is SGD
with momentum and step size lr_a*gain, and the SGD-M virtual-iterate argument (``sgd.py``) gives the
coefficients above (the Nesterov one from the same argument, as for SGD); with a constant gain, the virtual
iterate x = w_hat - a*m follows the master-weight recurrence exactly whatever the quantizer did. O is not
linear: it is invariant to the scale of u (its exact Jacobian maps u itself to 0) and NS5 only roughly
equalises singular values, so nothing here holds exactly for Muon. The two choices of gain:
  * 'secant': the step's own ratio ||NS(u)||_F / ||u||_F, exact when u is proportional to an orthogonal matrix
    (then NS(u) = gain*u up to bf16 rounding). It keeps the injected term in the momentum's units (gradient
    units): the error moves u by about as much as it moved w, relative to the update's own size. A step too
    small to move a weight (e = -lr_a*O when wd = 0) then adds (1/beta - 1)*(||u||/||O||)*O to m, which is
    (1/beta - 1)*m (m -> m/beta, SGD's rule) when u is proportional to NS(u).
  * 'unit': gain 1, the SGD coefficient with lr_a. It mixes units (e/lr_a is an update, m a gradient): with
    small gradients the injected error dominates m and with it the direction of the next update.
Decoupled decay: the factor rho is the project's convention (``adamw.py``: the carried error re-enters the next
step decayed). The coefficient that keeps the linear model's virtual iterate exact with decay is
(1/(lr_a*gain))*(1 - rho/beta) (plain); the two differ by wd/gain, i.e. relatively by lr*wd*beta/(1-beta)
(about 4% at lr*wd = 2e-3, beta = 0.95), far inside the approximation above. docs/design/muon.md has the full
derivation.

Modes 'master', 'exact', 'naive' and 'kahan' are the base class's (``base.py``); 'exact' carries the error in
fp32 and reproduces 'master' bit for bit (w_hat + e_prev is the master weight exactly). The fused kernel has
no Muon step: every group takes the reference path.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any, Iterable

import torch
from torch import nn

from ..convert import spec_of
from .adamw import AdamW
from .base import QuantOptimizer
from .hyper import check_flag, check_lr, check_number

__all__ = ["Muon", "MuonWithAdamW", "muon_with_adamw", "muon_update_", "zeropower_via_newtonschulz",
           "adjusted_lr", "eco_muon_coef", "secant_gain", "NS_COEFFICIENTS", "NS_STEPS", "NS_EPS", "ADJUST_LR_FNS", "INJECTIONS"]

#: torch.optim.Muon's defaults (Keller Jordan's quintic coefficients, 5 steps, eps)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
INJECTIONS = ("secant", "unit")


def zeropower_via_newtonschulz(update: torch.Tensor, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                               ns_steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of the 2-D ``update`` = U S V^T, in bf16, computed as torch.optim.Muon
    computes it (same ops, same order, so the same bits):
        X = bf16(update) (transposed if it has more rows than columns);  X /= max(||X||_F, eps)
        ns_steps times:  A = X X^T;  X = a*X + (b*A + c*A A) X
    The quintic's coefficients push singular values towards ~[0.7, 1.2] rather than exactly 1 (torch's note)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if update.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float | torch.Tensor, adjust_lr_fn: str | None, shape: torch.Size | tuple[int, ...]) -> Any:
    """torch.optim.Muon's per-matrix learning rate for an A x B weight:
    'original' / None: lr*sqrt(max(1, A/B)) (Keller Jordan);  'match_rms_adamw': lr*0.2*sqrt(max(A, B)) (Moonshot:
    the update's RMS then matches AdamW's, so AdamW's lr and weight decay carry over)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


def muon_update_(w: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, *, lr: float | torch.Tensor,
                 weight_decay: float, momentum: float, nesterov: bool,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_steps: int = NS_STEPS,
                 eps: float = NS_EPS, adjust_lr_fn: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.Muon's single-tensor step on the 2-D ``w`` in place (momentum ``buf`` updated in place); see the
    module docstring. Returns (u, O): the matrix that was orthogonalised and its orthogonalisation (ECO's
    secant gain reads their norms)."""
    if isinstance(lr, torch.Tensor) and lr.dim() != 0:  # torch's _to_scalar: a 1-element Tensor lr as 0-dim
        lr = lr.squeeze()
    if grad.ndim != 2:
        raise ValueError("Param gradient must be a 2D matrix")
    buf.lerp_(grad, 1 - momentum)
    u = grad.lerp(buf, momentum) if nesterov else buf
    ortho = zeropower_via_newtonschulz(u, ns_coefficients, ns_steps, eps)
    lr_a = adjusted_lr(lr, adjust_lr_fn, w.shape)
    w.mul_(1 - lr * weight_decay)
    w.add_(ortho, alpha=-lr_a)
    return u, ortho


def eco_muon_coef(lr: float, lr_a: float, momentum: float, nesterov: bool, weight_decay: float,
                  gain: float = 1.0) -> float:
    """Injection coefficient c in m += c*e: the SGD-M coefficient for step size ``lr_a * gain`` (Muon's adjusted
    lr times the orthogonaliser's modelled gain), times (1 - lr*wd); see the module docstring."""
    step = lr_a * gain
    if nesterov:
        base = -(1.0 - momentum) / (step * momentum * momentum)
    else:
        base = (1.0 / step) * (1.0 - 1.0 / momentum)
    return (1.0 - lr * weight_decay) * base


def secant_gain(u: torch.Tensor, ortho: torch.Tensor) -> float:
    """||ortho||_F / ||u||_F in fp32 (0 when u is 0: then nothing moved and nothing is injected)."""
    nu = float(torch.linalg.vector_norm(u, dtype=torch.float32))
    no = float(torch.linalg.vector_norm(ortho, dtype=torch.float32))
    return no / nu if nu > 0 else 0.0


class Muon(QuantOptimizer):
    """Drop-in ``torch.optim.Muon`` whose quantized 2-D weights are updated per ``mode`` (default ECO).

    Args: params (2-D tensors only: dense, fake-quantized or ``QuantizedTensor``), lr, weight_decay, momentum,
    nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn as torch.optim.Muon, with its defaults; ``mode`` in
    {'eco', 'master', 'naive', 'exact', 'kahan'}; ``rounding`` in {'nearest', 'stochastic'}; ``seed`` of the
    stochastic-rounding generator; ``nonfinite`` in {'skip', 'raise', 'skip_blocks'} (see ``QuantOptimizer``);
    ``injection`` in {'secant', 'unit'}: the gain ECO's injection assumes for the orthogonaliser (module
    docstring). Dense parameters, and quantized ones stored in the FP32 identity format, get torch's update bit
    for bit. Muon is for hidden-layer matrices: put embeddings, the output head, norms and biases under AdamW
    (``muon_with_adamw`` builds the pair).

    ``mode='eco'`` needs 0 < momentum < 1 for quantized weights (the injection divides by it) and lr > 0.
    Every group takes the reference path (the fused C kernel has no Muon step).
    """

    _kernel_ok = False  # the fused op implements AdamW and SGD only

    moment_keys = ("momentum_buffer",)
    torch_class = torch.optim.Muon
    torch_state_keys = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS,
                 ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None, *, mode: str = "eco",
                 rounding: str = "stochastic", seed: int = 0, nonfinite: str = "skip",
                 injection: str = "secant") -> None:
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; choose one of {INJECTIONS}")
        # an optimizer setting like ``nonfinite``, not a group hyper-parameter: a state_dict (ecoptim's or
        # torch.optim.Muon's) loads whatever this optimizer was constructed with
        self.injection = injection
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults, mode=mode, rounding=rounding, seed=seed, nonfinite=nonfinite)

    def _validate_group(self, group: dict) -> None:
        # torch.optim.Muon's checks, in its order and with its opening words, then ecoptim's own
        check_lr(group["lr"])
        m = check_number("momentum", group["momentum"], hi=1.0)
        check_number("weight_decay", group["weight_decay"], label="weight decay")
        fn = group["adjust_lr_fn"]
        if fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {fn} is not supported; use None, 'original' or "
                             "'match_rms_adamw'")
        check_flag("nesterov", group["nesterov"])
        coefs = group["ns_coefficients"]
        if (not isinstance(coefs, (tuple, list)) or len(coefs) != 3
                or not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c)
                           for c in coefs)):
            raise ValueError(f"ns_coefficients must be a tuple of exactly 3 finite floats (a, b, c), got {coefs!r}")
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 0 <= steps < 100:
            raise ValueError(f"ns_steps must be an int in [0, 100) (torch refuses 100 or more), got {steps!r}")
        check_number("eps", group["eps"])
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                 f"{tuple(p.shape)}; optimize it with AdamW (``ecoptim.muon_with_adamw`` splits a "
                                 "model this way)")
            if p.is_complex():
                raise ValueError("Muon does not support complex parameters")
        super()._validate_group(group)
        if group["mode"] == "eco" and m == 0 and any(spec_of(p) is not None for p in group["params"]):
            raise ValueError("mode='eco' injects the rounding error into the momentum and divides by it, so "
                             "momentum must be > 0 for quantized weights; use momentum=0.95, or mode='naive'")

    def _init_state(self, p: torch.Tensor, state: dict, group: dict, quantized: bool) -> None:
        state["step"] = torch.tensor(0.0)
        # torch: zeros like the gradient; quantized weights keep it in fp32 (|coef*e| can dwarf m)
        if quantized:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            like = p.grad if p.grad is not None else p
            state["momentum_buffer"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _update_(self, w: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 spec: Any = None) -> Any:
        if grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        return muon_update_(w, grad, state["momentum_buffer"], lr=group["lr"], weight_decay=group["weight_decay"],
                            momentum=group["momentum"], nesterov=group["nesterov"],
                            ns_coefficients=tuple(group["ns_coefficients"]), ns_steps=group["ns_steps"],
                            eps=group["eps"], adjust_lr_fn=group["adjust_lr_fn"])

    def _inject_(self, e: torch.Tensor, state: dict, group: dict, aux: Any) -> None:
        u, ortho = aux
        gain = secant_gain(u, ortho) if self.injection == "secant" else 1.0
        if gain == 0.0:
            return  # u was 0: nothing was orthogonalised, no gain to divide by
        lr = float(group["lr"])
        coef = eco_muon_coef(lr, adjusted_lr(lr, group["adjust_lr_fn"], e.shape), group["momentum"],
                             group["nesterov"], group["weight_decay"], gain)
        state["momentum_buffer"].add_(e, alpha=coef)


class _States(Mapping):
    """Read-only view of several optimizers' ``state`` dicts (their keys are disjoint). Unlike a ChainMap it never
    indexes a ``defaultdict`` with a key it lacks (which would create an empty state there)."""

    def __init__(self, *states: Mapping) -> None:
        self.states = states

    def __getitem__(self, key: Any) -> Any:
        for st in self.states:
            if key in st:
                return st[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator:
        for st in self.states:
            yield from st

    def __len__(self) -> int:
        return sum(len(st) for st in self.states)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden 2-D weights and AdamW for everything else, stepped together as one optimizer.

    ``param_groups`` lists Muon's groups then AdamW's (the same dicts), so LR schedulers (``LambdaLR`` scales
    each group from its own initial lr) and ``zero_grad`` act on both; ``state`` is a live view of both
    optimizers' states; ``state_dict`` holds both (``{'muon': ..., 'adamw': ...}``). ``skipped_steps`` /
    ``skipped_blocks`` add up both optimizers' counts (each checks its own gradients: with ``nonfinite='skip'``
    a NaN in one half skips that half only, so clip or check the whole model first to skip both)."""

    def __init__(self, muon: Muon, adamw: AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        # not torch.optim.Optimizer.__init__: the groups and states belong to the two optimizers; this object
        # only presents them together (what schedulers, zero_grad and memory_report read)
        self.defaults = {}
        self.param_groups = muon.param_groups + adamw.param_groups
        self.state = _States(muon.state, adamw.state)  # type: ignore[assignment]
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._zero_grad_profile_name = "Optimizer.zero_grad#MuonWithAdamW.zero_grad"

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Muon's step, then AdamW's (``closure`` is evaluated once, before both)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    @property
    def skipped_steps(self) -> int:
        return self.muon.skipped_steps + self.adamw.skipped_steps

    @property
    def skipped_blocks(self) -> int:
        return self.muon.skipped_blocks + self.adamw.skipped_blocks

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a MuonWithAdamW state_dict: it needs exactly the keys 'muon' and 'adamw' (load "
                             "a single optimizer's state_dict into opt.muon or opt.adamw instead)")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = _States(self.muon.state, self.adamw.state)  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MuonWithAdamW(\n  muon={self.muon!r},\n  adamw={self.adamw!r}\n)"


def muon_with_adamw(model: nn.Module, *, lr: float = 0.02, weight_decay: float = 0.1, momentum: float = 0.95,
                    nesterov: bool = True, adjust_lr_fn: str | None = None, adamw_lr: float = 3e-4,
                    adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                    adamw_weight_decay: float = 0.1, muon_filter: Any = None, mode: str = "eco",
                    rounding: str = "stochastic", seed: int = 0, nonfinite: str = "skip",
                    injection: str = "secant") -> MuonWithAdamW:
    """The usual Muon recipe: Muon for the 2-D weights of hidden layers, AdamW for the rest (embeddings, output
    head, norms, biases), both with ``mode`` / ``rounding`` for whatever is quantized.

    ``muon_filter(name, param) -> bool`` picks Muon's parameters; default: 2-D parameters that are not an
    ``nn.Embedding``'s weight, nor the weight of the model's last ``nn.Linear`` (the output head), nor tied to
    either. AdamW decays only its 2-D parameters (``adamw_weight_decay``; norms' gains and biases are not
    decayed). With ``adjust_lr_fn='match_rms_adamw'`` Muon's lr and weight decay can be AdamW's."""
    if muon_filter is None:
        excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            excluded.add(id(linears[-1].weight))
        muon_filter = lambda name, p: p.ndim == 2 and id(p) not in excluded  # noqa: E731
    muon_params, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if muon_filter(name, p):
            muon_params.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    if not muon_params:
        raise ValueError("muon_with_adamw found no parameter for Muon (2-D hidden-layer weights); pass "
                         "muon_filter=, or use AdamW alone")
    muon = Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                adjust_lr_fn=adjust_lr_fn, mode=mode, rounding=rounding, seed=seed, nonfinite=nonfinite,
                injection=injection)
    groups = [g for g in ({"params": decay, "weight_decay": adamw_weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    adamw = AdamW(groups, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
                  mode=mode, rounding=rounding, seed=seed + 1, nonfinite=nonfinite)
    return MuonWithAdamW(muon, adamw)
