"""1-bit Adam (Tang et al. 2021) for quantized weights: full-precision warm-up, then frozen variance and
sign-compressed momentum with error feedback, with ECO on the weights throughout.

Adam's update is not linear in the gradient (the denominator), so compressing gradients with error
feedback (``ef_hook``) fights Adam's normalisation; 1-bit Adam's observation is that the variance v
stabilises early. So:

  warm-up (steps 1..warmup_steps): plain data parallel AdamW (DDP all-reduces the gradients), v and m built
      from the averaged gradient as usual;
  compressed phase: v is frozen. Each rank forms its local momentum from its *local* gradient,
          m_i = b1*m + (1-b1)*g_i,  p_i = m_i + e_i,  c_i = C(p_i),  e_i = p_i - c_i
      (C = scaled sign by default: 1 bit per entry + one fp32 scale per parameter), the c_i are
      all-gathered and every rank sets m = mean_i c_i (the same value on every rank, summed in rank order),
      then takes the AdamW step with m and the frozen v. ECO's injection then adds the weight
      re-quantization error into m (identical on every rank, so replicas stay bit-identical).

Use with DDP: register ``onebit_hook`` so that DDP all-reduces during warm-up and hands each rank its own
gradient (no communication) afterwards; the optimizer then does the compressed exchange itself:

    model = ddp(quantized_model)
    opt = OneBitAdamW(model.parameters(), lr=..., warmup_steps=100)
    model.register_comm_hook(opt, onebit_hook)

The momentum exchange is one all-gather per step of all parameters together (``opt.payload_bytes``
records its size); the warm-up steps cost one fp32 all-reduce each, as plain DDP.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..convert import spec_of
from ..optim import AdamW
from ..optim.adamw import eco_adamw_coef
from ..optim.base import NonFiniteGradientError, read_weight, store_weight_
from .compression import Compressor, ScaledSign

__all__ = ["OneBitAdamW", "onebit_hook"]


class OneBitAdamW(AdamW):
    """ecoptim AdamW with 1-bit Adam's compressed phase after ``warmup_steps`` (see the module doc).

    Extra args: ``warmup_steps`` (full-precision steps before freezing v), ``compressor`` (default
    ``ScaledSign()``), ``process_group``. Modes 'eco' (default), 'naive' and 'master' are supported.
    Extra memory: one fp32 error buffer per parameter (``state['onebit_error']``) in the compressed phase.
    """

    #: state that legitimately differs between ranks (assert_replicas_identical skips it)
    per_rank_state = ("onebit_error",)
    _block_skip_ok = False  # the compressed phase needs one rank-wide skip decision
    _clip_ok = False  # the compressed phase exchanges momenta, not gradients
    _state8_ok = False  # the compressed phase works on the fp32 momentum directly
    _amsgrad_ok = False  # the compressed phase freezes v: there is no running maximum to keep

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if group.get("maximize", False):
            raise ValueError("OneBitAdamW does not support maximize=True: its compressed phase exchanges momenta "
                             "built from the gradients as they are; negate the loss instead")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, warmup_steps: int = 100,
                 compressor: Compressor | None = None, process_group: Any = None, mode: str = "eco",
                 rounding: str = "stochastic", seed: int = 0, nonfinite: str = "skip") -> None:
        if mode not in ("eco", "naive", "master"):
            raise ValueError(f"OneBitAdamW supports mode 'eco', 'naive' or 'master', got {mode!r}")
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1: the variance to freeze comes from the warm-up")
        super().__init__(params, lr, betas, eps, weight_decay, mode=mode, rounding=rounding, seed=seed,
                         nonfinite=nonfinite)
        self.warmup_steps = int(warmup_steps)
        self.compressor = compressor or ScaledSign()
        self.process_group = process_group
        self.steps_taken = 0
        self.payload_bytes: list[int] = []   # bytes this rank handed to the momentum all-gather, per step

    @property
    def compressed_phase(self) -> bool:
        """True once the warm-up is over (the *next* backward must not be all-reduced)."""
        return self.steps_taken >= self.warmup_steps

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["ecoptim"]["onebit"] = {"steps_taken": self.steps_taken, "warmup_steps": self.warmup_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        onebit = state_dict.get("ecoptim", {}).get("onebit")
        super().load_state_dict(state_dict)
        if onebit is not None:
            self.steps_taken, self.warmup_steps = onebit["steps_taken"], onebit["warmup_steps"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self.compressed_phase:
            skipped = self.skipped_steps
            loss = super().step(closure)
            self.steps_taken += int(self.skipped_steps == skipped)
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite_everywhere():
            if self.nonfinite == "raise":
                raise NonFiniteGradientError("a gradient holds NaN/Inf on some rank; nothing was updated")
            self.skipped_steps += 1
            return loss
        self._compressed_step()
        self.steps_taken += 1
        return loss

    def _grads_finite_everywhere(self) -> bool:
        ok = torch.tensor(int(self._grads_finite()), dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.process_group)
        return bool(ok)

    def _compressed_step(self) -> None:
        items = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not items:
            return
        # 1. local momenta (+ worker error), one flat vector, compressed with one scale per parameter
        locals_, segments = [], []
        for p, group in items:
            st = self.state[p]
            if "onebit_error" not in st:
                st["onebit_error"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            b1 = group["betas"][0]
            m_local = st["exp_avg"].to(torch.float32).lerp(p.grad.to(torch.float32), 1 - b1).reshape(-1)
            locals_.append(m_local.add_(st["onebit_error"]))
            segments.append(p.numel())
        flat = torch.cat(locals_)
        payload, c = self.compressor.compress(flat, segments)
        for (p, _), e_new in zip(items, (flat - c).split(segments)):
            self.state[p]["onebit_error"].copy_(e_new)
        # 2. every rank decodes every message in rank order: the same averaged momentum everywhere
        ws = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        if ws > 1:
            gathered = torch.empty(ws * payload.numel(), dtype=payload.dtype, device=payload.device)
            dist.all_gather_single(gathered, payload, group=self.process_group)
            gathered = gathered.view(ws, -1)
            total = torch.zeros_like(flat)
            for r in range(ws):
                total += self.compressor.decompress(gathered[r], flat.numel(), segments)
            m_avg = total.div_(ws)
        else:
            m_avg = c
        self.payload_bytes.append(payload.numel() * payload.element_size())
        # 3. AdamW step with the averaged momentum and the frozen variance (+ ECO injection)
        for (p, group), m_new in zip(items, m_avg.split(segments)):
            self._frozen_v_update(p, group, m_new.view(p.shape))

    def _frozen_v_update(self, p: torch.Tensor, group: dict, m_new: torch.Tensor) -> None:
        st = self.state[p]
        st["step"] += 1
        step = st["step"].item()
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st["exp_avg"].copy_(m_new)
        # v was last updated at the end of the warm-up: keep its bias correction from then
        bc2 = 1 - b2 ** min(step, self.warmup_steps)
        denom = (st["exp_avg_sq"].sqrt() / bc2 ** 0.5).add_(eps)
        step_size = lr / (1 - b1 ** step)
        spec = spec_of(p)
        if spec is None:
            w = p.detach()
            if wd != 0:
                w.mul_(1 - lr * wd)
            w.addcdiv_(st["exp_avg"].to(p.dtype), denom.to(p.dtype), value=-step_size)
            return
        mode = group["mode"]
        w = st["master"] if mode == "master" else read_weight(p)
        if wd != 0:
            w.mul_(1 - lr * wd)
        w.addcdiv_(st["exp_avg"], denom, value=-step_size)
        gen = self.generator(p.device) if group["rounding"] == "stochastic" else None
        w_hat = store_weight_(p, spec, w, group["rounding"], gen)
        if mode == "eco":
            st["exp_avg"].addcmul_(w.sub_(w_hat), denom, value=eco_adamw_coef(step, lr, b1, wd))


def onebit_hook(opt: OneBitAdamW, bucket):  # no annotations: DDP checks them (see compression.ef_hook)
    """DDP comm hook for ``OneBitAdamW``: mean all-reduce during warm-up, the local gradient afterwards."""
    buf = bucket.buffer()
    if opt.compressed_phase:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut
    ws = dist.get_world_size(opt.process_group)
    buf.div_(ws)
    work = dist.all_reduce(buf, group=opt.process_group, async_op=True)
    return work.get_future().then(lambda f: f.value()[0] if isinstance(f.value(), list) else f.value())
