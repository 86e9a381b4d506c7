"""Which parameters the Triton kernels step: the device-independent conditions (``supports``), checked per
parameter per step by ``ecoptim.optim.fused.applies`` for CUDA tensors. Anything else takes the reference path, so
no case the kernels do not reproduce bit for bit ever reaches them. Needs no triton (only the last check asks
whether it imports)."""
from __future__ import annotations

import importlib.util

import torch

from ...formats import ABSMAX, BF16, FORMATS, FP4_E2M1, INT4, MXFP4, MXFP8, E8M0Scale, Format, QuantSpec
from ...qtensor import QuantizedTensor

__all__ = ["available", "supports", "KERNEL_FORMATS", "MX_FORMATS", "MODES"]

# the formats whose grids the kernels know (codecs.py); an equal name with another grid takes the reference path
KERNEL_FORMATS = frozenset(FORMATS[name] for name in ("fp8_e4m3", "fp8_e5m2", "int8", "int4", "fp4_e2m1", "bf16"))
# the MX formats, stepped with E8M0 scales (either rule); NVFP4's two-level scale is not in the kernels
MX_FORMATS = frozenset((MXFP8, MXFP4))
MODES = ("eco", "naive", "master", "exact", "kahan")
_available: bool | None = None


def available() -> bool:
    """Whether triton can be imported here (the kernels themselves are compiled on first use)."""
    global _available
    if _available is None:
        _available = importlib.util.find_spec("triton") is not None
    return _available


def supports(p: torch.Tensor, spec: QuantSpec | None, group: dict) -> bool:
    """Whether the Triton kernels can step ``p`` with ``group``'s settings, bit-identically to the reference path,
    whatever the device: FP8 (E4M3, E5M2), INT8, packed INT4 or packed FP4 E2M1 codes with an absmax scale per row,
    group or tensor (packed blocks of even size or one block), unscaled BF16, or MXFP8 / MXFP4 with E8M0 block
    scales (floor or ceil rule); modes eco, naive, master, exact, kahan;
    fp32 or bf16 moments; fp32, bf16 or fp16 gradients; lr > 0 (a float). Not: AMSGrad, a Tensor lr, 8-bit
    moments, other formats or scales (NVFP4's two-level scale among them), a custom ``Format.round``, transposed
    (Conv1D) storage."""
    if (group.get("fused") is False or group.get("amsgrad") or isinstance(group["lr"], torch.Tensor)
            or spec is None or not isinstance(p, QuantizedTensor)):
        return False
    f, g = spec.format, p.grad
    mx = f in MX_FORMATS
    if not ((f in KERNEL_FORMATS and spec.scale == ABSMAX or mx and isinstance(spec.scale, E8M0Scale))
            and type(f).round is Format.round and spec.scaled == (f is not BF16) and not spec.granularity.transposed
            and group["mode"] in MODES and group["lr"] > 0
            and group.get("state_dtype", torch.float32) in (torch.float32, torch.bfloat16)
            and g is not None and g.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and g.layout == torch.strided and g.device == p.codes.device and p.codes.is_contiguous()
            and (p.scale is None or p.scale.is_contiguous())):
        return False
    if f.bits == 4:  # INT4, FP4 E2M1, MXFP4: a block must start on a byte so that no byte holds two blocks
        nb, bs = spec.granularity.blocks(p.shape)
        if nb > 1 and bs % 2:
            return False
    return available()
