"""AdamW (Adam when weight_decay=0) for quantized weights, with ECO's error injection.

Update (torch.optim.AdamW's single-tensor path, same ops in the same order):
    m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
    denom = sqrt(v) / sqrt(1 - b2^t) + eps
    w_til = w*(1 - lr*wd) - (lr/(1 - b1^t)) * m / denom

ECO injection after re-quantizing (e = w_til - q(w_til)), v untouched:
    m += (1 - lr*wd) * ((1 - b1^t)/lr) * (1 - 1/b1) * denom * e

Why (1 - lr*wd): the appendix's exact form keeps e and re-adds it at the next step. With decoupled decay
the next step starts from (1 - lr*wd)*(w_hat + e), so the carried error is (1 - lr*wd)*e; pushing it through
the momentum as in the SGD derivation (divide by the per-element step size lr/((1-b1^t)*denom) and by b1,
subtract the part already re-added) scales the whole coefficient by (1 - lr*wd). Without decay it is the
paper's coefficient. The momentum stays fp32 by default: |coef*e| can be much larger than m itself. The moments
of quantized weights may be stored in bf16 or in 8 or 4 bits per element (``state8.State8bit``,
``state8.State4bit``); the maths above always runs on fp32 working copies, rounded back to the stored form at the
end of the step (after injection: the injected term lands in the decoded fp32 m, and the sum is encoded).

AMSGrad (``amsgrad=True``, torch's variant): vmax = max(vmax, v) and denom = sqrt(vmax) / sqrt(1 - b2^t) + eps;
the injection is the formula above with this denominator. Why: per element the step is SGD with EMA momentum
and step size s = lr / ((1 - b1^t) * denom), so the SGD virtual-iterate argument (``sgd.py``) applies with
lr -> s: x = w_hat - (s*b1/(1-b1))*m follows x <- x - s*g exactly iff m += -(1-b1)/(s*b1) * e
= ((1 - b1^t)/lr) * (1 - 1/b1) * denom * e, where denom is whatever divides m in this step. As for plain Adam
the argument is exact while s is constant from one step to the next (bias corrections and the denominator
drift slowly); AMSGrad's denominator, a running maximum, changes no faster than Adam's. vmax is kept in fp32
next to the moments (bf16 or 8-bit moments with AMSGrad are refused for quantized weights: a re-rounded
maximum could fall below the v it bounds), and such a group takes the reference path (the fused kernel keeps
no vmax: ``fused.applies`` refuses it).

``maximize=True`` negates the gradient before everything else, as torch does (on the fused kernel: a factor
-1 on the gradient, composed exactly with a pending clip factor); the injection does not change.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..convert import spec_of
from ..rounding import is_identity
from . import fused as _fused
from .base import ParamStep, QuantOptimizer
from .hyper import check_flag, check_lr, check_number
from .state8 import BlockwiseState, dequantize_state, quantize_state, state_key

__all__ = ["AdamW", "adamw_update_", "eco_adamw_coef", "sqrt_rn"]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root of an fp32 tensor (IEEE sqrt, what the fused kernel computes).

    ``torch.sqrt`` on fp32 CPU tensors is not correctly rounded (~20% of results are 1 ulp off: ATen calls a
    vector math library), so no other implementation can reproduce its bits. The fp64 square root rounded to
    fp32 is exact: fp64 carries more than 2*24+2 bits, so the double rounding is innocuous for sqrt
    (``tests/test_kernels.py`` checks every fp32 in [1, 4), which covers all binades by scaling)."""
    if x.dtype != torch.float32:
        return x.sqrt()
    return x.double().sqrt_().to(torch.float32)


def adamw_update_(w: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: float, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
                  weight_decay: float, sqrt: Callable[[torch.Tensor], torch.Tensor] = torch.sqrt,
                  maximize: bool = False, max_exp_avg_sq: torch.Tensor | None = None) -> torch.Tensor:
    """torch.optim.AdamW's single-tensor step on ``w`` in place (with ``sqrt`` for its square root);
    returns ``denom``. ``maximize``: ascend (the gradient negated first, as torch); ``max_exp_avg_sq``: AMSGrad's
    running maximum of ``exp_avg_sq`` (updated in place), which then replaces it in the denominator. A Tensor
    ``lr`` goes through the same tensor arithmetic as in torch (so the same bits)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        exp_avg_sq = max_exp_avg_sq
    denom = (sqrt(exp_avg_sq) / bias_correction2 ** 0.5).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-step_size)
    return denom


def eco_adamw_coef(step: float, lr: float, beta1: float, weight_decay: float) -> float:
    """Scalar part of the injection coefficient (multiply by ``denom * e`` elementwise)."""
    return (1 - lr * weight_decay) * ((1 - beta1 ** step) / lr) * (1 - 1 / beta1)


def _check_betas(betas: Any, foreach: Any, capturable: Any) -> tuple[float, float]:
    """torch.optim.AdamW's checks of ``betas`` (order, types and messages), then ecoptim's: two finite floats
    in [0, 1). Tensor betas (which torch allows) are refused: torch's single-tensor code then takes different
    kernels (a Tensor weight in ``lerp_``), and ECO's injection coefficient is computed on the host."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, (int, float)) and not isinstance(b, bool) and not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if any(tensors):
        if not all(tensors):
            raise ValueError("betas must be either both floats or both Tensors")
        if foreach and not capturable:
            raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")
        raise ValueError(f"betas as Tensors are not supported by ecoptim: pass Python floats, e.g. "
                         f"betas=({float(betas[0])!r}, {float(betas[1])!r}) (the update and ECO's injection "
                         "coefficient are computed from them on the host)")
    return tuple(check_number("beta", b, hi=1.0, label=f"beta parameter at index {i}") for i, b in enumerate(betas))


class AdamW(QuantOptimizer):
    """Drop-in ``torch.optim.AdamW`` whose quantized parameters are updated per ``mode`` (default ECO).

    Args: params (tensors, named parameters or groups), lr (a float or a 1-element Tensor), betas, eps,
    weight_decay, amsgrad, maximize, foreach as torch.optim.AdamW, with its defaults; ``mode`` in
    {'eco', 'master', 'naive', 'exact', 'kahan'}; ``rounding`` in {'nearest', 'stochastic'}; ``seed`` of the
    stochastic-rounding generator; ``nonfinite`` in {'skip', 'raise', 'skip_blocks'} (see ``QuantOptimizer``);
    ``state_dtype`` of the moments of quantized weights: torch.float32, torch.bfloat16, ``State8bit()``
    (8-bit block-wise) or ``State4bit()`` (4-bit block-wise; dense parameters keep their own dtype); ``fused``: None or True
    (default None) steps every quantized weight it can with the fused CPU kernel (bit-identical to the reference,
    see ``optim/fused.py``), False always takes the reference path. ``capturable=True``, ``differentiable=True``
    and Tensor betas are refused (``hyper.py`` says why). Every hyper-parameter of every group is checked when the
    group is added (NaN and Inf included), with torch's error types and messages.
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, mode: str = "eco", rounding: str = "stochastic", seed: int = 0,
                 nonfinite: str = "skip", state_dtype: torch.dtype | BlockwiseState = torch.float32) -> None:
        if isinstance(lr, torch.Tensor) and foreach and not capturable:  # torch.optim.AdamW's check, first
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        betas = _check_betas(betas, foreach, capturable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        state_dtype=state_dtype)
        self._state8_streams = 0  # stream numbers handed out to parameters with 8/4-bit moments (in init order)
        super().__init__(params, defaults, mode=mode, rounding=rounding, seed=seed, nonfinite=nonfinite)

    _state8_ok = True  # False where states are sharded or exchanged between ranks (see distributed/)
    #: the per-parameter moments (their shapes and precision are checked when a state_dict is loaded)
    moment_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    #: the torch.optim class whose state_dicts this one loads and exports (``interop``), and its state keys
    torch_class = torch.optim.AdamW
    torch_state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _validate_group(self, group: dict) -> None:
        # torch.optim.AdamW's checks, in its order and with its messages, before ecoptim's own
        if isinstance(group["lr"], torch.Tensor) and group.get("foreach") and not group.get("capturable", False):
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        check_lr(group["lr"])
        check_number("eps", group["eps"], label="epsilon value")
        b1, b2 = _check_betas(group["betas"], group.get("foreach"), group.get("capturable", False))
        check_number("weight_decay", group["weight_decay"])
        check_flag("amsgrad", group.get("amsgrad", False))
        super()._validate_group(group)
        sd = group["state_dtype"]
        if not (isinstance(sd, BlockwiseState)
                or (isinstance(sd, torch.dtype) and sd in (torch.float32, torch.bfloat16))):
            raise ValueError(f"state_dtype must be torch.float32, torch.bfloat16, ecoptim.State8bit() or "
                             f"ecoptim.State4bit(), got {sd!r}")
        if isinstance(sd, BlockwiseState) and self.nonfinite == "skip_blocks":
            raise ValueError(f"{sd.bits}-bit states that the kernel cannot read in place are re-encoded a whole tensor "
                             "at a time, which nonfinite='skip_blocks' cannot leave partly untouched: use "
                             "nonfinite='skip' (default) or 'raise'")
        if isinstance(sd, BlockwiseState) and not self._state8_ok:
            raise ValueError(f"{type(self).__name__} does not support {sd.bits}-bit states ({type(sd).__name__}); "
                             "use state_dtype=torch.bfloat16 for smaller states")
        quantized = any(spec_of(p) is not None for p in group["params"])
        if group["mode"] == "eco" and b1 == 0 and quantized:
            raise ValueError("mode='eco' injects the rounding error into the first moment and divides by beta1, "
                             "so beta1 must be > 0; use betas=(0.9, ...) or mode='naive'")
        if group.get("amsgrad", False):
            if not self._amsgrad_ok:
                raise ValueError(f"amsgrad=True is not supported by {type(self).__name__}")
            if quantized and sd != torch.float32:
                raise ValueError(f"amsgrad=True keeps the running maximum of the second moment in fp32 next to the "
                                 f"moments; with state_dtype={sd} that maximum would be re-rounded every step and "
                                 f"could fall below the moment it bounds. Use state_dtype=torch.float32 with amsgrad")

    _amsgrad_ok = True  # False where the step reads the moments itself (see distributed/onebit.py)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        streams = [int(st["state8_stream"]) for st in self.state.values() if "state8_stream" in st]
        self._state8_streams = max(streams, default=-1) + 1  # parameters initialised later get fresh streams

    def _update_job(self, p: ParamStep, group: dict, key: tuple[int, int] | None) -> _fused.Job:
        b1, b2 = group["betas"]
        state = p.state
        step, lr, wd = state["step"].item(), group["lr"], group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        direct8 = False
        if m.dtype == torch.uint8:  # 8-bit moments: read and written by the kernel if their blocks tile the
            cfg = group["state_dtype"]  # weight's, else fp32 working copies around it
            direct8 = _fused.state8_fits(p.param, p.spec, cfg.block_size)
            if not direct8:
                m, v = self._load_state8(state, group, p.param.shape)
        job = _fused.adamw_job(p.param, p.grad, p.spec, m, v, key, step=step, lr=lr, beta1=b1, beta2=b2,
                               eps=group["eps"], weight_decay=wd, coef=eco_adamw_coef(step, lr, b1, wd),
                               inject=group["mode"] == "eco")
        job.injection_coef_of = lambda t, lr_t: eco_adamw_coef(t, lr_t, b1, wd)
        if direct8:
            _fused.attach_state8(job, cfg.block_size, state["exp_avg_absmax"], state["exp_avg_sq_absmax"],
                                 self._state8_keys(state, cfg))
        elif m is not state["exp_avg"]:
            job.after = lambda: self._store_state8(state, group, m, v)
        return job

    @staticmethod
    def _load_state8(state: dict, group: dict, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 working copies (of ``shape``) of the 8- or 4-bit moments."""
        cfg = group["state_dtype"]
        return (dequantize_state(state["exp_avg"], state["exp_avg_absmax"], True, cfg, shape),
                dequantize_state(state["exp_avg_sq"], state["exp_avg_sq_absmax"], False, cfg, shape))

    def _state8_keys(self, state: dict, cfg: BlockwiseState) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """This step's stochastic-rounding keys of the 8/4-bit m and v (None: round to nearest)."""
        if cfg.rounding != "stochastic":
            return None
        stream, step = int(state["state8_stream"]), int(state["step"].item())
        return state_key(self.seed, stream, True, step), state_key(self.seed, stream, False, step)

    def _store_state8(self, state: dict, group: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        cfg = group["state_dtype"]
        keys = self._state8_keys(state, cfg) or (None, None)
        for k, x, signed, key in (("exp_avg", m, True, keys[0]), ("exp_avg_sq", v, False, keys[1])):
            quantize_state(x, signed, cfg, key, out=(state[k], state[k + "_absmax"]))

    def _init_state(self, p: torch.Tensor, state: dict, group: dict, quantized: bool) -> None:
        # Quantized weights: moments in fp32 (or bf16 / 8-bit / 4-bit by option, fp32 for the maths); dense: the
        # param dtype.
        dt = group["state_dtype"] if quantized else p.dtype
        state["step"] = torch.tensor(0.0)
        if isinstance(dt, BlockwiseState):  # codes (p's shape, or packed flat) + one fp32 absmax per block; zeros
            # are code 0 (m: 0; v: 0 as long as the block's absmax is 0)
            # the parameter's own stochastic-rounding stream for its moments (kept in the state: a resumed run
            # rounds them exactly as the uninterrupted one)
            state["state8_stream"] = torch.tensor(self._state8_streams, dtype=torch.int64)
            self._state8_streams += 1
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = torch.zeros(dt.code_shape(p.shape), dtype=torch.uint8, device=p.device)
                state[k + "_absmax"] = torch.zeros(dt.blocks(p.numel()), dtype=torch.float32, device=p.device)
            return
        state["exp_avg"] = torch.zeros(p.shape, dtype=dt, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dt, device=p.device)
        if group.get("amsgrad", False):  # fp32 for quantized weights (_validate_group), as torch: p's dtype else
            state["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=dt, device=p.device)

    def _update_(self, w: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 spec: Any = None) -> Any:
        b1, b2 = group["betas"]
        # Quantized weights: correctly rounded sqrt, so that the fused kernel can reproduce the reference bit
        # for bit. Dense parameters and the FP32 identity format keep torch's own sqrt: there ecoptim promises
        # torch.optim.AdamW's exact bits.
        exact = spec is not None and not is_identity(spec.format)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.dtype == torch.uint8:  # 8/4-bit states: fp32 working copies
            m, v = self._load_state8(state, group, w.shape)
        elif w.dtype == torch.float32 and m.dtype != torch.float32:  # low-precision state: fp32 working copies
            m, v = m.float(), v.float()
        denom = adamw_update_(w, grad, m, v, step=state["step"].item(), lr=group["lr"], beta1=b1, beta2=b2,
                              eps=group["eps"], weight_decay=group["weight_decay"],
                              sqrt=sqrt_rn if exact else torch.sqrt,
                              maximize=group.get("maximize", False), max_exp_avg_sq=state.get("max_exp_avg_sq"))
        return denom, m, v

    def _inject_(self, e: torch.Tensor, state: dict, group: dict, aux: Any) -> None:
        denom, m, _ = aux
        coef = eco_adamw_coef(state["step"].item(), group["lr"], group["betas"][0], group["weight_decay"])
        m.addcmul_(e, denom, value=coef)

    def _finish_(self, state: dict, group: dict, aux: Any) -> None:
        _, m, v = aux
        if state["exp_avg"].dtype == torch.uint8:  # back to 8/4 bits (per the config's rounding), injection included
            self._store_state8(state, group, m, v)
        elif m is not state["exp_avg"]:  # round the fp32 working copies back to the stored dtype (RTN)
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
