"""Fast path: the fused C kernel (``ecoptim/csrc/eco_cpu.c``) for AdamW and SGD, one call per param group.

The reference path (``base.QuantOptimizer._step_param``) makes ~20 passes over fp32 temporaries:
dequantize, the optimizer ops, absmax, scale, round, encode, dequantize again, error, injection. The kernel
does the same maths block by block (a row, a group or the tensor): sweep A dequantizes and updates the moments,
keeping w_til, the AdamW denominator and the new moments in a block-sized scratch while taking the block
absmax; sweep B computes the new scale, rounds, writes the codes, injects the error into the momentum and
writes the moments. Memory sees codes + grad + moments read once and codes + moments + scales written once,
and no temporary is larger than a block of 65536 elements: a block larger than that (a per-tensor scale)
is swept twice, once for its absmax and once, 4096 elements at a time, to update and quantize it. Nothing is written
before a block's update is known to be finite, so a block whose update is NaN/Inf is left exactly as it was
(``run`` reports it; ``nonfinite='skip_blocks'`` relies on this).

Agreement with the reference is *bit for bit*, for round-to-nearest and stochastic rounding alike: the kernel
performs the IEEE operations ATen performs (fused multiply-adds exactly where ATen's lerp/addcmul/add-alpha
kernels use them), and both paths draw the stochastic-rounding uniforms from ``ecoptim.rng`` with one key
per tensor from the optimizer's generator. ``tests/test_kernels.py`` checks codes, scales and moments for
equality.

8-bit moments (``state8.State8bit``) whose blocks tile the weight's blocks are decoded in sweep A and
encoded in sweep B (after the injection), a state block at a time, with the codec of ``eco_state8``
(``state8_fits``, ``attach_state8``); other 8-bit moments are decoded to fp32 working copies around the call.

Applies to: CPU tensors stored as ``QuantizedTensor`` with FP8 (E4M3, E5M2), INT8 or packed INT4 codes and an
absmax scale (per row / group / tensor; INT4 blocks of even size) or BF16 codes (unscaled); modes 'eco' and
'naive', and 'master' / 'exact' (the kernel then reads the fp32 master weights instead of the codes, or adds
the carried error to them, and writes them back; ``attach_mode_buffer``), and 'kahan' with blocks of at most
65536 elements (the kernel adds the stored compensation to w_til, and a third sweep quantizes the rounding error
w_til - w_hat, still in the block's scratch, with its own scale into the compensation; ``attach_compensation``);
lr > 0; fp32, bf16 or fp16 gradients. Anything else (a larger kahan block, FP16 storage, a custom
``Format.round``, CUDA tensors), or a machine without a C compiler, takes the reference path.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import torch

from .. import kernels
from ..formats import BF16, FP8_E4M3, FP8_E5M2, INT4, INT8, Format, PerRow, QuantSpec
from ..qtensor import QuantizedTensor

__all__ = ["applies", "Job", "run", "adamw_job", "sgd_job", "state8_fits", "attach_state8", "attach_mode_buffer",
           "attach_compensation"]

# the kernel knows these formats' grids by heart (e.g. E4M3: 3 mantissa bits, emin -6, max 448); others take the
# reference path
_FMT = {FP8_E4M3: kernels.FMT_E4M3, FP8_E5M2: kernels.FMT_E5M2, INT8: kernels.FMT_INT8, BF16: kernels.FMT_BF16,
        INT4: kernels.FMT_INT4}
_LUT: dict[torch.dtype, torch.Tensor] = {}
_SPLIT = 65536  # eco_cpu.c's SPLIT: larger blocks are swept in ranges shared by the threads


def applies(p: torch.Tensor, spec: QuantSpec | None, group: dict) -> bool:
    """Whether the fused kernel can step ``p`` with ``group``'s settings (and the kernels are built)."""
    if group.get("fused") is False or spec is None or not isinstance(p, QuantizedTensor):
        return False
    f, g = spec.format, p.grad  # called per parameter per step: each attribute is read once
    return (f in _FMT and type(f).round is Format.round  # a custom rounding override needs the reference
            and spec.scaled == (f is not BF16) and p.is_cpu
            and group["mode"] in ("eco", "naive", "master", "exact", "kahan") and group["lr"] > 0
            and (group["mode"] != "kahan" or _blocks_in_cache(p, spec))
            and g is not None and g.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and g.layout == torch.strided and p.codes.is_contiguous()
            and (p.scale is None or p.scale.is_contiguous()) and (f is not INT4 or _int4_blocks_aligned(p, spec))
            and kernels.available())


def _kernel_blocks(p: torch.Tensor, spec: QuantSpec) -> tuple[int, int]:
    # the blocks the kernel sweeps (number, size): the scale's blocks; unscaled (bf16): no absmax, so any split
    # works, and rows keep the blocks in cache like the scaled case
    return spec.granularity.blocks(p.shape) if spec.scaled else PerRow().blocks(p.shape)


def _blocks_in_cache(p: torch.Tensor, spec: QuantSpec) -> bool:
    # mode 'kahan': the kernel keeps a block's rounding error in its in-cache scratch until it is quantized
    # itself, so blocks must be at most SPLIT elements (a larger per-tensor block takes the reference path)
    return _kernel_blocks(p, spec)[1] <= _SPLIT


def _int4_blocks_aligned(p: torch.Tensor, spec: QuantSpec) -> bool:
    # packed INT4: a block must start on a byte (even element index) so that threads never share a byte
    nb, bs = spec.granularity.blocks(p.shape)
    return nb == 1 or bs % 2 == 0


def _lut(dtype: torch.dtype) -> torch.Tensor:
    # fp8 decode table taken from torch itself: the kernel's dequantization is torch's, by construction
    if dtype not in _LUT:
        _LUT[dtype] = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return _LUT[dtype]


def _args(p: QuantizedTensor, grad: torch.Tensor, spec: QuantSpec, m: torch.Tensor | None, v: torch.Tensor | None,
          key: tuple[int, int] | None, inject: bool) -> tuple[kernels.EcoArgs, list[torch.Tensor]]:
    f = spec.format
    if grad.dtype == torch.float16:
        grad = grad.to(torch.float32)  # exact; the kernel reads fp32 or bf16
    keep = [grad.contiguous()]  # tensors that must outlive the call
    nb, bs = _kernel_blocks(p, spec)
    a = kernels.EcoArgs()
    a.codes, a.grad = p.codes.data_ptr(), keep[0].data_ptr()
    a.scale = p.scale.data_ptr() if spec.scaled else None
    a.m = m.data_ptr() if m is not None else None
    a.v = v.data_ptr() if v is not None else None
    if f in (FP8_E4M3, FP8_E5M2):
        keep.append(_lut(f.storage_dtype))
        a.lut = keep[-1].data_ptr()
    a.nb, a.bs = nb, bs
    a.fmt = _FMT[f]
    a.grad_bf16 = int(keep[0].dtype == torch.bfloat16)
    a.state_bf16 = 2 if m is not None and m.dtype == torch.uint8 else int(m is not None and m.dtype == torch.bfloat16)
    a.inject = int(inject)
    a.stochastic = int(key is not None)
    if key is not None:
        a.k1, a.k2 = key
    a.fmax = f.max
    a.gscale = 1.0  # no gradient scaling unless the optimizer has a pending clip (QuantOptimizer.clip_grad_norm_)
    return a, keep


@dataclass
class Job:
    """One tensor's kernel arguments, and the tensors that must stay alive until the kernel has run."""

    args: kernels.EcoArgs
    keep: list[torch.Tensor]
    numel: int
    after: Callable[[], None] | None = None  # run right after the kernel (e.g. store fp32 working moments)

    @property
    def num_blocks(self) -> int:
        """The blocks (rows, groups or the tensor) the kernel sweeps; ``run`` reports NaN/Inf ones per job."""
        return self.args.nb

    @property
    def grad_scale(self) -> float:
        """The factor the gradient is multiplied by (in fp32) before the update: a pending clip, else 1."""
        return self.args.gscale

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        self.args.gscale = value


def run(jobs: list[Job], skip_nonfinite: bool = False) -> list[int]:
    """Step every job's tensor in one kernel call (one thread team for all of them). A block whose update
    comes out NaN/Inf is left exactly as it was; returns how many there were per job if ``skip_nonfinite``,
    else raises ValueError if there were any (after the whole call: the other blocks are stepped)."""
    if not jobs:
        return []
    lib = kernels.load()
    arr = (ctypes.POINTER(kernels.EcoArgs) * len(jobs))(*[ctypes.pointer(j.args) for j in jobs])
    rc = lib.eco_step_many(arr, len(jobs), torch.get_num_threads())
    if rc == -2:  # state8_fits and applies (kahan: _blocks_in_cache) keep this from happening
        raise ValueError("ecoptim fused step: 8-bit state blocks that do not tile the weight blocks, or kahan "
                         "blocks too large for the kernel; nothing was modified")
    if rc != 0:
        raise MemoryError("ecoptim fused step: could not allocate its block scratch; nothing was modified")
    for j in jobs:
        if j.after is not None:
            j.after()
    bad = [j.args.nonfinite for j in jobs]
    if any(bad) and not skip_nonfinite:
        j = next(j for j in jobs if j.args.nonfinite)
        raise ValueError(f"cannot quantize a weight holding non-finite values ({j.args.nonfinite} blocks of "
                         f"an updated weight of {j.numel} elements hold NaN/Inf; they were left unchanged): the "
                         "update overflowed; find where training diverged (e.g. a too large learning rate)")
    return bad


def adamw_job(p: QuantizedTensor, grad: torch.Tensor, spec: QuantSpec, m: torch.Tensor, v: torch.Tensor,
              key: tuple[int, int] | None, *, step: float, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, coef: float, inject: bool) -> Job:
    """One AdamW step of ``p`` (see ``adamw.py`` for the equations; the scalars below are the ones the
    reference passes to ATen, rounded to fp32 the same way). ``key``: the stochastic-rounding key
    (``rng.draw_key``; None: round to nearest)."""
    a, keep = _args(p, grad, spec, m, v, key, inject)
    a.optimizer = 0
    a.decay = 1 - lr * weight_decay
    a.w1, a.b2, a.omb2 = 1 - beta1, beta2, 1 - beta2
    a.bc2s = (1 - beta2 ** step) ** 0.5
    a.eps = eps
    a.neg_step = -(lr / (1 - beta1 ** step))
    a.coef = coef
    return Job(a, keep, p.numel())


def sgd_job(p: QuantizedTensor, grad: torch.Tensor, spec: QuantSpec, buf: torch.Tensor | None,
            key: tuple[int, int] | None, *, lr: float, momentum: float, dampening: float, nesterov: bool,
            weight_decay: float, coef: float, first: bool, inject: bool) -> Job:
    """One SGD step of ``p``; ``buf`` (fp32) is written whole when ``first`` (torch's buf = g); ``key`` as for
    ``adamw_job``."""
    a, keep = _args(p, grad, spec, buf, None, key, inject)
    a.optimizer = 1
    a.wd, a.mom, a.omd, a.neg_lr = weight_decay, momentum, 1 - dampening, -lr
    a.nesterov, a.first_step = int(nesterov), int(first)
    a.coef = coef
    return Job(a, keep, p.numel())


def state8_fits(p: QuantizedTensor, spec: QuantSpec, block_size: int) -> bool:
    """Whether the kernel can read and write 8-bit moments of ``p`` directly: their blocks (a power of two
    >= 8) must tile the weight's blocks, of at most 65536 elements. Otherwise the moments are decoded to fp32
    working copies around the kernel (``AdamW._fused_job_``)."""
    nb, bs = _kernel_blocks(p, spec)
    return (block_size >= 8 and block_size & (block_size - 1) == 0 and nb > 0 and bs <= _SPLIT
            and bs % block_size == 0)


def attach_state8(job: Job, block_size: int, m_absmax: torch.Tensor, v_absmax: torch.Tensor,
                  keys: tuple[tuple[int, int], tuple[int, int]] | None) -> None:
    """Point ``job`` (whose moments are the 8-bit codes) at their absmax arrays and the codec's tables;
    ``keys``: the stochastic-rounding keys of m and v (None: round to nearest)."""
    from .state8 import _search_tables
    a = job.args
    t7, b7rtn, b7sr = _search_tables(7)
    t8, b8rtn, b8sr = _search_tables(8)
    job.keep += [m_absmax, v_absmax]
    a.m_absmax, a.v_absmax = m_absmax.data_ptr(), v_absmax.data_ptr()
    a.t7, a.b7rtn, a.b7sr = t7.data_ptr(), b7rtn.data_ptr(), b7sr.data_ptr()
    a.t8, a.b8rtn, a.b8sr = t8.data_ptr(), b8rtn.data_ptr(), b8sr.data_ptr()
    a.s8bs, a.nbkt = block_size, b7rtn.numel()
    a.s8sr = int(keys is not None)
    if keys is not None:
        (a.mk1, a.mk2), (a.vk1, a.vk2) = ((k1 & 0xFFFFFFFF, k2 & 0xFFFFFFFF) for k1, k2 in keys)


def attach_compensation(job: Job, p: QuantizedTensor, codes: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Mode 'kahan': ``p``'s compensation, stored like ``p`` (``codes`` in its format, ``scale`` per block or
    None), added to w_til before the rounding and replaced by the rounded error w_til - w_hat, quantized to
    nearest with a new scale (as ``codec.quantize``)."""
    if not (codes.dtype == p.codes.dtype and codes.shape == p.codes.shape and codes.is_contiguous()) or (
            (scale is None) != (p.scale is None)) or (scale is not None and not (
            scale.dtype == torch.float32 and scale.shape == p.scale.shape and scale.is_contiguous())):
        raise ValueError("the kahan compensation must be stored like the weight (contiguous codes and scales of "
                         "the weight's dtypes and shapes)")
    job.keep.append(codes)
    job.args.comp = codes.data_ptr()
    if scale is not None:
        job.keep.append(scale)
        job.args.comp_scale = scale.data_ptr()


def attach_mode_buffer(job: Job, mode: str, buf: torch.Tensor) -> None:
    """Modes 'master' (``buf``: the fp32 master weights, stepped instead of the codes and then quantized) and
    'exact' (``buf``: the fp32 carried error, added before the step and replaced by w_til - w_hat after it)."""
    if not (buf.dtype == torch.float32 and buf.is_contiguous() and buf.numel() == job.numel):
        raise ValueError(f"the {mode} buffer must be a contiguous fp32 tensor of the weight's size")
    job.keep.append(buf)
    if mode == "master":
        job.args.master = buf.data_ptr()
    else:
        job.args.err = buf.data_ptr()
