"""Error-feedback gradient compression as DDP communication hooks.

ECO feeds the *weight* quantization error back into the optimizer; this module is the other pillar of the
field: feeding the *gradient compression* error back, so that workers can send a few bits per gradient
entry instead of 32 and still converge. Each rank i compresses its local bucket gradient g_i with a
compressor C, the compressed messages are all-gathered, and every rank decodes and sums them in rank order
(so every rank ends with the same aggregate, bit for bit, and replicas stay identical).

Methods (``method=``), with per-rank state kept per parameter (so DDP's bucket rebuild is harmless):

  none      c_i = C(g_i);                       aggregate mean_i c_i        (no error feedback: biased)
  ef14      p_i = g_i + e_i;  c_i = C(p_i);  e_i = p_i - c_i;   aggregate mean_i c_i
            (Seide et al. 2014 "1-bit SGD"; Stich et al. 2018; Karimireddy et al. 2019 "EF-SGD")
  ef21      c_i = C(g_i - h_i);  h_i += c_i;  h += mean_i c_i;  aggregate h
            (Richtarik, Sokolov, Fatkhullin 2021: g_i <- g_i + C(grad_i - g_i); h = mean_i h_i is kept
            by every rank, never sent)
  econtrol  c_i = C(eta*e_i + g_i - h_i);  e_i += g_i - h_i - c_i;  h_i += c_i;  h += mean_i c_i;
            aggregate h       (Gao, Islamov, Stich 2023, Algorithm 1; eta in (0, 1] sets how strongly the
            error of the EF21-style estimator is fed back; eta = 0 is EF21, and with h frozen at 0 and
            eta = 1 it is EF14. Default eta: the compressor's contraction factor (Top-K: k/d), as the
            paper prescribes eta ~ delta; eta = 0.5 with Top-1% diverges)

Extra memory per rank (fp32, per parameter): ef14 4 B (e), ef21 8 B (h_i, h), econtrol 12 B (e, h_i, h).

The first ``start_iter`` iterations (default 1) use a plain all-reduce: DDP rebuilds its buckets after the
first iteration, and EF21 / EControl start from h_i = g_i(x_0), h = mean_i g_i(x_0) as in both papers.

Compressors: ``TopK(ratio)`` (largest-magnitude entries of the bucket: fp32 values + int32 indices, 8 B per
kept entry) and ``ScaledSign()`` (sign bits + one fp32 scale mean|x| per parameter: ~1/32 of fp32;
Karimireddy et al. 2019). ``Identity()`` sends fp32 (a check that the plumbing is exact).

Bytes: ``state.payload_bytes`` counts the bytes of the tensors this rank hands to collectives, per
iteration; ``state.dense_bytes`` what the plain fp32 all-reduce of the same buckets hands over. On the
wire (ring algorithms, n ranks) an all-reduce of D bytes sends 2(n-1)/n*D per rank and an all-gather of a
P-byte payload (n-1)*P, so compression pays off while P < 2D/n; ``wire_bytes`` gives both figures
and ``benchmarks/distributed.py`` measures the real socket bytes (``/proc/self/io``) as a check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Compressor", "TopK", "ScaledSign", "Identity", "ErrorFeedbackState", "ef_hook", "register_ef_hook",
           "allreduce_hook", "EF_METHODS", "wire_bytes"]

EF_METHODS = ("none", "ef14", "ef21", "econtrol")
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def wire_bytes(payload_bytes: int, world_size: int, collective: str) -> float:
    """Bytes one rank sends for a ring ``collective`` ("all_reduce" or "all_gather") of a payload."""
    n = world_size
    if collective == "all_reduce":
        return 2 * (n - 1) / n * payload_bytes
    if collective == "all_gather":
        return (n - 1) * payload_bytes
    raise ValueError(f"unknown collective {collective!r}")


# --------------------------------------------------------------------------------------------------------
# Compressors
# --------------------------------------------------------------------------------------------------------

class Compressor:
    """Maps a flat fp32 vector to a fixed-size payload (the same size on every rank) and back.

    ``segments`` are the numels of the parameters that make up the vector (per-parameter scales).
    """

    name = "compressor"
    #: EControl's default eta for this compressor. The paper takes eta proportional to the contraction
    #: factor delta (E||C(x) - x||^2 <= (1 - delta)||x||^2); a much larger eta with a rarely-selecting
    #: compressor (Top-K) makes the error oscillate and grow (|1 - eta*(m+1)| > 1 for an entry unselected
    #: m steps), which ``tests/test_distributed.py`` demonstrates.
    default_eta = 1.0

    def compress(self, x: torch.Tensor, segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(payload, C(x))``: the message to send and its decoded value (dense fp32)."""
        raise NotImplementedError

    def decompress(self, payload: torch.Tensor, numel: int, segments: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TopK(Compressor):
    """Keep the ``ratio`` (0 < ratio <= 1) largest-magnitude entries of the bucket; 8 bytes per kept entry."""

    ratio: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"TopK ratio must be in (0, 1], got {self.ratio!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"topk{self.ratio:g}"

    @property
    def default_eta(self) -> float:  # type: ignore[override]
        return self.ratio  # delta = k/d

    def k(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.ratio * numel)))

    def compress(self, x: torch.Tensor, segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k(x.numel())
        idx = x.abs().topk(k, sorted=False).indices
        vals = x[idx]
        payload = torch.cat([vals.view(torch.int32), idx.to(torch.int32)])
        dense = torch.zeros_like(x)
        dense[idx] = vals
        return payload, dense

    def decompress(self, payload: torch.Tensor, numel: int, segments: list[int]) -> torch.Tensor:
        k = payload.numel() // 2
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        out[payload[k:].long()] = payload[:k].view(torch.float32)
        return out


@dataclass(frozen=True)
class ScaledSign(Compressor):
    """sign(x) * mean|x|, one fp32 scale per parameter; 1 bit per entry + 4 bytes per parameter."""

    name = "sign"
    default_eta = 0.5  # delta = ||x||_1^2 / (d ||x||^2): 2/pi for Gaussian entries, 1/d at worst

    def compress(self, x: torch.Tensor, segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        scales = torch.stack([s.abs().mean() for s in x.split(segments)]).to(torch.float32)
        pos = x >= 0
        n = x.numel()
        bits = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=x.device)
        bits[:n] = pos
        packed = (bits.view(-1, 8) << _SHIFTS.to(x.device)).sum(1, dtype=torch.uint8)
        payload = torch.cat([packed, scales.view(torch.uint8)])
        return payload, self._decode(pos, scales, segments)

    @staticmethod
    def _decode(pos: torch.Tensor, scales: torch.Tensor, segments: list[int]) -> torch.Tensor:
        sign = pos.to(torch.float32).mul_(2).sub_(1)
        return sign.mul_(scales.repeat_interleave(torch.tensor(segments, device=pos.device)))

    def decompress(self, payload: torch.Tensor, numel: int, segments: list[int]) -> torch.Tensor:
        nbits = -(-numel // 8)
        packed, scales = payload[:nbits], payload[nbits:].clone().view(torch.float32)  # clone: 4-byte aligned
        pos = ((packed[:, None] >> _SHIFTS.to(payload.device)) & 1).reshape(-1)[:numel].bool()
        return self._decode(pos, scales, segments)


@dataclass(frozen=True)
class Identity(Compressor):
    """No compression (fp32 payload): checks that the hook plumbing reproduces a plain all-reduce."""

    name = "identity"

    def compress(self, x: torch.Tensor, segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return x.clone(), x.clone()

    def decompress(self, payload: torch.Tensor, numel: int, segments: list[int]) -> torch.Tensor:
        return payload.clone()


# --------------------------------------------------------------------------------------------------------
# Hook state and hook
# --------------------------------------------------------------------------------------------------------

@dataclass
class ErrorFeedbackState:
    """Per-rank state of an error-feedback compression hook (pass to ``DDP.register_comm_hook``)."""

    method: str = "ef21"
    compressor: Compressor = field(default_factory=lambda: TopK(0.01))
    eta: float | None = None          # EControl only; None -> compressor.default_eta
    start_iter: int = 1
    process_group: Any = None
    names: dict[int, str] = field(default_factory=dict)       # id(param) -> name (for state_dict)
    iteration: int = 0
    # per-parameter buffers: {"e": ..., "h_local": ..., "h": ...} (flat fp32), keyed by id(param)
    buffers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    payload_bytes: int = 0          # this iteration so far
    dense_bytes: int = 0            # this iteration so far
    history: list[tuple[int, int, int]] = field(default_factory=list)  # (iteration, payload, dense) per step

    def __post_init__(self) -> None:
        if self.method not in EF_METHODS:
            raise ValueError(f"unknown error-feedback method {self.method!r}; choose one of {EF_METHODS}")
        if not isinstance(self.compressor, Compressor):
            raise TypeError("compressor must be an ecoptim.distributed.Compressor (TopK, ScaledSign, Identity)")
        if self.eta is None:
            self.eta = float(self.compressor.default_eta)
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.start_iter < 1:
            raise ValueError("start_iter must be >= 1: DDP rebuilds its buckets after the first iteration and "
                             "EF21/EControl start from the full first gradient")

    # -- byte accounting ------------------------------------------------------------------------------
    def _end_iteration(self) -> None:
        self.history.append((self.iteration, self.payload_bytes, self.dense_bytes))
        self.iteration += 1
        self.payload_bytes = 0
        self.dense_bytes = 0

    def bytes_per_step(self, compressed_only: bool = True) -> tuple[float, float]:
        """Mean (payload, dense) bytes per iteration, over the compressed iterations by default."""
        rows = [h for h in self.history if not compressed_only or h[0] >= self.start_iter]
        if not rows:
            return 0.0, 0.0
        return sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows)

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Buffers keyed by parameter name (needs ``names``; ``register_ef_hook`` fills it)."""
        bufs = {self.names.get(pid, str(pid)): {k: v.clone() for k, v in b.items()} for pid, b in self.buffers.items()}
        return {"method": self.method, "iteration": self.iteration, "eta": self.eta, "buffers": bufs}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["method"] != self.method:
            raise ValueError(f"checkpoint holds {sd['method']!r} error-feedback state, this hook runs {self.method!r}")
        by_name = {n: pid for pid, n in self.names.items()}
        self.iteration = int(sd["iteration"])
        self.eta = float(sd["eta"])
        self.buffers = {}
        for name, b in sd["buffers"].items():
            if name not in by_name:
                raise ValueError(f"error-feedback state for unknown parameter {name!r}")
            self.buffers[by_name[name]] = {k: v.clone() for k, v in b.items()}

    def buffer_tensors(self) -> dict[str, torch.Tensor]:
        """Flat view of the state, for ``assert_replicas_identical(extra=...)`` (only ``h`` must agree)."""
        return {f"{self.names.get(pid, pid)}.{k}": v for pid, b in self.buffers.items() for k, v in b.items()}


def _gather(state: ErrorFeedbackState, x: torch.Tensor) -> torch.futures.Future:
    ws = dist.get_world_size(state.process_group)
    out = torch.empty(ws * x.numel(), dtype=x.dtype, device=x.device)
    work = dist.all_gather_single(out, x, group=state.process_group, async_op=True)
    return work.get_future().then(lambda _: out.view(ws, -1))


def _allreduce_mean(state: ErrorFeedbackState, buf: torch.Tensor) -> torch.futures.Future:
    ws = dist.get_world_size(state.process_group)
    buf.div_(ws)
    work = dist.all_reduce(buf, group=state.process_group, async_op=True)
    return work.get_future().then(lambda f: f.value()[0] if isinstance(f.value(), list) else f.value())


def ef_hook(state, bucket):  # no annotations: DDP checks them and this module postpones them (strings)
    """DDP communication hook: error-feedback compressed averaging of one gradient bucket (see module doc)."""
    buf = bucket.buffer()
    params = bucket.parameters()
    segments = [p.numel() for p in params]
    if buf.dtype != torch.float32:
        raise TypeError(f"ef_hook expects fp32 gradient buckets, got {buf.dtype}")
    ids = [id(p) for p in params]
    state.dense_bytes += buf.numel() * buf.element_size()
    is_last = bucket.is_last()
    it = state.iteration
    method = state.method

    if it < state.start_iter:  # plain all-reduce; EF21 / EControl take h_i = g_i(x0), h = mean g_i(x0)
        local = buf.clone() if method in ("ef21", "econtrol") else None
        state.payload_bytes += buf.numel() * buf.element_size()
        if is_last:
            state._end_iteration()
        fut = _allreduce_mean(state, buf)

        def init(f: torch.futures.Future) -> torch.Tensor:
            mean = f.value()
            if local is not None:
                for pid, lv, mv in zip(ids, local.split(segments), mean.split(segments)):
                    b = state.buffers.setdefault(pid, {})
                    b["h_local"], b["h"] = lv.clone(), mv.clone()
                    if method == "econtrol":
                        b["e"] = torch.zeros_like(lv)
            return mean

        return fut.then(init)

    def flat(key: str) -> torch.Tensor:
        parts = []
        for pid, n in zip(ids, segments):
            b = state.buffers.setdefault(pid, {})
            if key not in b:
                b[key] = torch.zeros(n, dtype=torch.float32, device=buf.device)
            parts.append(b[key])
        return torch.cat(parts)

    def scatter(key: str, v: torch.Tensor) -> None:
        for pid, part in zip(ids, v.split(segments)):
            state.buffers[pid][key].copy_(part)

    g = buf
    if method == "none":
        msg_in = g
    elif method == "ef14":
        e = flat("e")
        msg_in = g + e
    elif method == "ef21":
        h_local = flat("h_local")
        msg_in = g - h_local
    else:  # econtrol
        e, h_local = flat("e"), flat("h_local")
        diff = g - h_local
        msg_in = diff + state.eta * e
    payload, c = state.compressor.compress(msg_in, segments)
    if method == "ef14":
        scatter("e", msg_in - c)
    elif method == "ef21":
        scatter("h_local", h_local + c)
    elif method == "econtrol":
        scatter("e", e + diff - c)
        scatter("h_local", h_local + c)
    h = flat("h") if method in ("ef21", "econtrol") else None
    state.payload_bytes += payload.numel() * payload.element_size()
    if is_last:
        state._end_iteration()
    ws = dist.get_world_size(state.process_group)
    numel = buf.numel()
    compressor = state.compressor

    def aggregate(f: torch.futures.Future) -> torch.Tensor:
        gathered = f.value()
        total = torch.zeros(numel, dtype=torch.float32, device=buf.device)
        for r in range(ws):  # same payloads, same order on every rank => bit-identical aggregate
            total += compressor.decompress(gathered[r], numel, segments)
        mean = total.div_(ws)
        if h is None:
            return mean
        h.add_(mean)
        scatter("h", h)
        return h.clone()

    return _gather(state, payload).then(aggregate)


def allreduce_hook(state, bucket):  # no annotations (see ef_hook)
    """The plain mean all-reduce (DDP's default), with the same byte accounting as ``ef_hook``."""
    buf = bucket.buffer()
    nbytes = buf.numel() * buf.element_size()
    state.dense_bytes += nbytes
    state.payload_bytes += nbytes
    if bucket.is_last():
        state._end_iteration()
    return _allreduce_mean(state, buf)


def register_ef_hook(model: nn.Module, method: str = "ef21", compressor: Compressor | None = None, *,
                     eta: float | None = None, start_iter: int = 1, process_group: Any = None) -> ErrorFeedbackState:
    """Register an error-feedback compression hook on a DDP model and return its state.

    ``method="allreduce"`` registers the plain all-reduce with byte accounting (a baseline).
    """
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(model, DistributedDataParallel):
        raise TypeError("register_ef_hook needs a DistributedDataParallel model (see ecoptim.distributed.ddp)")
    plain = method == "allreduce"
    state = ErrorFeedbackState("none" if plain else method, compressor or TopK(0.01), eta, start_iter,
                               process_group or model.process_group,
                               names={id(p): n for n, p in model.module.named_parameters()})
    model.register_comm_hook(state, allreduce_hook if plain else ef_hook)
    return state
