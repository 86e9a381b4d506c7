"""Measured memory: real bytes of storage behind weights, scales and optimizer state.

Bytes are read from ``untyped_storage().nbytes()`` of every tensor that holds data, and a storage shared
by several tensors is counted once, so tied weights or views are not double counted. Nothing is
derived from dtype tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .qtensor import QuantizedTensor

__all__ = ["memory_report", "MemoryReport", "ParamMemory"]


@dataclass
class ParamMemory:
    name: str
    numel: int
    kind: str  # e.g. "fp8_e4m3/row" or "dense float32"
    weight_bytes: int
    scale_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.scale_bytes + self.state_bytes

    @property
    def quantized(self) -> bool:
        """True for a weight stored as codes + scales (a ``QuantizedTensor``)."""
        return not self.kind.startswith("dense")


@dataclass
class MemoryReport:
    params: list[ParamMemory] = field(default_factory=list)
    other_state_bytes: int = 0  # optimizer state not attached to a parameter (none for ecoptim optimizers)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.params)

    @property
    def scale_bytes(self) -> int:
        return sum(p.scale_bytes for p in self.params)

    @property
    def state_bytes(self) -> int:
        return sum(p.state_bytes for p in self.params) + self.other_state_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.scale_bytes + self.state_bytes

    @property
    def quantized_numel(self) -> int:
        """Elements of the parameters stored quantized."""
        return sum(p.numel for p in self.params if p.quantized)

    def quantized_fraction(self, exclude: Callable[[str], bool] | None = None) -> float:
        """Share of the parameters' elements stored quantized, among those whose name ``exclude`` does not
        match (e.g. ``exclude=lambda n: "embed" in n or "lm_head" in n`` to measure the transformer blocks)."""
        kept = [p for p in self.params if exclude is None or not exclude(p.name)]
        return sum(p.numel for p in kept if p.quantized) / max(sum(p.numel for p in kept), 1)

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.numel, 1)

    def table(self) -> str:
        rows = [f"{'parameter':40s} {'numel':>10s} {'kind':>18s} {'weights':>10s} {'scales':>8s} {'state':>10s}"]
        for p in self.params:
            rows.append(f"{p.name[:40]:40s} {p.numel:10d} {p.kind[:18]:>18s} {p.weight_bytes:10d} "
                        f"{p.scale_bytes:8d} {p.state_bytes:10d}")
        rows.append(f"{'total':40s} {self.numel:10d} {'':>18s} {self.weight_bytes:10d} {self.scale_bytes:8d} "
                    f"{self.state_bytes:10d}  = {self.total_bytes} B, {self.bytes_per_param:.3f} B/param")
        return "\n".join(rows)


def _bytes(t: torch.Tensor | None, seen: set) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    local = getattr(t, "_local_tensor", None)  # DTensor (an FSDP2 shard): count this rank's shard
    if local is not None:
        return _bytes(local, seen)
    if isinstance(t, QuantizedTensor):
        return _bytes(t.codes, seen) + _bytes(t.scale, seen)
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # another wrapper subclass (e.g.
        names, _ = t.__tensor_flatten__()                                   # torchao's 8-bit optimizer state)
        return sum(_bytes(getattr(t, n), seen) for n in names)
    st = t.untyped_storage()
    key = (st.device.type, st.data_ptr())
    if key in seen or st.nbytes() == 0:
        return 0
    seen.add(key)
    return st.nbytes()


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the real bytes of every parameter's storage (codes, scales) and its optimizer state."""
    seen: set = set()
    report = MemoryReport()
    states = optimizer.state if optimizer is not None else {}
    for name, p in model.named_parameters():
        local = getattr(p, "_local_tensor", p)  # FSDP2: this rank's shard
        if isinstance(local, QuantizedTensor):
            wb, sb = _bytes(local.codes, seen), _bytes(local.scale, seen)
            kind = str(local.spec)
        else:
            wb, sb = _bytes(local, seen), 0
            kind = f"dense {str(p.dtype).replace('torch.', '')}"
        stb = sum(_bytes(v, seen) for v in states.get(p, {}).values() if isinstance(v, torch.Tensor))
        report.params.append(ParamMemory(name, local.numel(), kind, wb, sb, stb))
    if optimizer is not None:
        model_params = {id(p) for p in model.parameters()}
        for p, st in optimizer.state.items():
            if id(p) not in model_params:
                report.other_state_bytes += sum(_bytes(v, seen) for v in st.values() if isinstance(v, torch.Tensor))
    return report
