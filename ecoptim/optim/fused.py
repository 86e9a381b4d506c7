"""Fast path: the fused step ops (``ecoptim.ops``: ``adamw_step_`` / ``sgd_step_``) for AdamW and SGD, one call per
param group; on CPU their kernel is the C library of ``ecoptim/csrc`` (``ecoptim/backends/cpu``).

The reference path (``base.QuantOptimizer._step_reference``) makes ~20 passes over fp32 temporaries:
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
encoded in sweep B (after the injection), a state block at a time, with the codec of ``csrc/state8.h``
(``state8_fits``, ``attach_state8``); other 8-bit moments are decoded to fp32 working copies around the call.
4-bit moments (``state8.State4bit``) take the reference path.

Applies to: CPU tensors stored as ``QuantizedTensor`` with FP8 (E4M3, E5M2), INT8 or packed INT4 / FP4 (E2M1)
codes and an absmax scale (per row / group / tensor; packed blocks of even size), the MX formats (MXFP8, MXFP4,
or any of those elements with an E8M0 scale, either rule) and NVFP4 (E4M3 x fp32 two-level scale: blocks of at
most 65536 elements, not in mode 'kahan'; the kernel sweeps the tensor twice, once for its absmax), or BF16
codes (unscaled); modes 'eco' and 'naive', and 'master' / 'exact' (the kernel then reads the fp32 master weights
instead of the codes, or adds the carried error to them, and writes them back; ``attach_mode_buffer``), and
'kahan' with blocks of at most 65536 elements (the kernel adds the stored compensation to w_til, and a third
sweep quantizes the rounding error w_til - w_hat, still in the block's scratch, with its own scale into the
compensation; ``attach_compensation``); lr > 0; fp32, bf16 or fp16 gradients. Anything else (a larger kahan
block, NVFP4 in mode 'kahan', FP16 storage, a custom ``Format.round``), or a machine without a C compiler, takes
the reference path. CUDA tensors take the op's CUDA kernel, the Triton kernels of ``ecoptim/backends/triton``
(``triton_backend.applies``), where triton imports and the case is one they cover, else the reference path.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Callable

import torch

from .. import kernels, ops
from ..backends import triton as triton_backend  # the CUDA kernels (Triton), loaded only where triton imports
from ..backends.cpu import ops as cpu_ops  # registers the CPU kernels of the ops
from ..formats import BF16, FORMATS, SCALE_FORMATS, E4M3TensorScale, Format, PerRow, QuantSpec
from ..qtensor import QuantizedTensor
from .state8 import State4bit, search_tables

__all__ = ["applies", "Job", "GroupCall", "run", "adamw_job", "sgd_job", "state8_fits", "attach_state8",
           "attach_mode_buffer", "attach_compensation"]

# the kernel knows these formats' grids by heart (e.g. E4M3: 3 mantissa bits, emin -6, max 448); others (an equal
# name with another grid included) take the reference path
_KERNEL_FORMATS = frozenset(FORMATS[name] for name in cpu_ops.FORMATS)
_KERNEL_SCALES = frozenset(SCALE_FORMATS[name] for name in cpu_ops.SCALE_FORMATS)  # likewise the scale formats
_SPLIT = 65536  # csrc/step.c's SPLIT: larger blocks are swept in ranges shared by the threads


def applies(p: torch.Tensor, spec: QuantSpec | None, group: dict) -> bool:
    """Whether the fused kernel can step ``p`` with ``group``'s settings (and the kernels are built)."""
    # AMSGrad: the kernel keeps no running maximum of v. A Tensor lr: the reference derives the step's scalars
    # (lr / bias correction, 1 - lr * wd) in the lr tensor's fp32 arithmetic, as torch does, while the op takes
    # lr as a float. 4-bit moments: the kernel has only the 8-bit codec. All take the reference path.
    if (group.get("fused") is False or group.get("amsgrad") or isinstance(group["lr"], torch.Tensor)
            or spec is None or not isinstance(p, QuantizedTensor) or isinstance(group.get("state_dtype"), State4bit)):
        return False
    if p.is_cuda:  # the op's CUDA kernel: the Triton kernels (ecoptim/backends/triton), for the cases they reproduce
        return triton_backend.applies(p, spec, group)
    f, g = spec.format, p.grad  # called per parameter per step: each attribute is read once
    return (f in _KERNEL_FORMATS and type(f).round is Format.round  # a custom rounding override needs the reference
            and spec.scale in _KERNEL_SCALES and _two_level_ok(p, spec, group["mode"])
            and spec.scaled == (f is not BF16) and p.is_cpu
            and not spec.granularity.transposed  # codes in another order than the grad and moments (Conv1D)
            and group["mode"] in ("eco", "naive", "master", "exact", "kahan") and group["lr"] > 0
            and (group["mode"] != "kahan" or _blocks_in_cache(p, spec))
            and g is not None and g.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and g.layout == torch.strided and p.codes.is_contiguous()
            and (p.scale is None or p.scale.is_contiguous()) and (f.bits != 4 or _int4_blocks_aligned(p, spec))
            and kernels.available())


def _kernel_blocks(p: torch.Tensor, spec: QuantSpec) -> tuple[int, int]:
    # the blocks the kernel sweeps (number, size): the scale's blocks; unscaled (bf16): no absmax, so any split
    # works, and rows keep the blocks in cache like the scaled case
    return spec.granularity.blocks(p.shape) if spec.scaled else PerRow().blocks(p.shape)


def _blocks_in_cache(p: torch.Tensor, spec: QuantSpec) -> bool:
    # mode 'kahan': the kernel keeps a block's rounding error in its in-cache scratch until it is quantized
    # itself, so blocks must be at most SPLIT elements (a larger per-tensor block takes the reference path)
    return _kernel_blocks(p, spec)[1] <= _SPLIT


def _two_level_ok(p: torch.Tensor, spec: QuantSpec, mode: str) -> bool:
    # NVFP4's two-level scale: the kernel sweeps each block whole from its scratch, and has no second pass for a
    # kahan compensation's own tensor scale
    return not isinstance(spec.scale, E4M3TensorScale) or (mode != "kahan" and _blocks_in_cache(p, spec))


def _int4_blocks_aligned(p: torch.Tensor, spec: QuantSpec) -> bool:
    # packed INT4 / FP4: a block must start on a byte (even element index) so that threads never share a byte
    nb, bs = spec.granularity.blocks(p.shape)
    return nb == 1 or bs % 2 == 0


_DTYPE = operator.attrgetter("dtype")


@dataclass
class Job:
    """One tensor's arguments of a fused step op (``ecoptim.ops``): its tensors, its per-tensor scalars, and the
    hyper-parameters it shares with the other tensors of the op call (``group``)."""

    optimizer: str                      # 'adamw' or 'sgd'
    codes: torch.Tensor
    scales: torch.Tensor | None
    grad: torch.Tensor
    exp_avg: torch.Tensor | None        # AdamW's first moment / SGD's momentum buffer
    exp_avg_sq: torch.Tensor | None     # AdamW's second moment
    format: str
    scale_format: str                   # the scale's ecoptim.formats.SCALE_FORMATS name
    block_size: int
    numel: int
    step: float | bool                  # AdamW: the step count t; SGD: whether this is the buffer's first step
    injection_coef: float
    sr_key: tuple[int, int] | None      # stochastic rounding of the weight (None: to nearest)
    group: tuple                        # the op's keyword hyper-parameters, as (name, value) pairs
    grad_scale: float = 1.0             # a pending clip (QuantOptimizer.clip_grad_norm_), applied in fp32
    after: Callable[[], None] | None = None  # run right after the kernel (e.g. store fp32 working moments)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # mode buffers and 8-bit absmax, by op name
    state8_block_size: int = 0
    state8_keys: tuple[tuple[int, int], tuple[int, int]] | None = None
    # the injection coefficient at (step count, lr), the group's other hyper-parameters fixed: what a later step
    # of the same tensor passes (``GroupCall``); None: the job is not repeated that way
    injection_coef_of: Callable[[float, float], float] | None = None

    @property
    def num_blocks(self) -> int:
        """The blocks (rows, groups or the tensor) the kernel sweeps; ``run`` reports NaN/Inf ones per job."""
        return self.numel // self.block_size if self.block_size > 0 else 0


def _job(optimizer: str, p: QuantizedTensor, grad: torch.Tensor, spec: QuantSpec, m: torch.Tensor | None,
         v: torch.Tensor | None, key: tuple[int, int] | None, step: float | bool, coef: float, group: dict) -> Job:
    return Job(optimizer, p.codes, p.scale if spec.scaled else None, grad, m, v, spec.format.name, spec.scale.name,
               _kernel_blocks(p, spec)[1], p.numel(), step, coef, key,
               tuple(sorted({**group, "stochastic": key is not None}.items())))


_MODE_BUFFERS = ("master_weights", "carried_errors", "compensation_codes", "compensation_scales")


def _op_args(jobs: list[Job]) -> dict:
    """The fused step op's arguments stepping ``jobs`` (which share their group hyper-parameters)."""
    buffers = {name: [j.buffers.get(name) for j in jobs] for name in _MODE_BUFFERS}
    args = dict(codes=[j.codes for j in jobs], scales=[j.scales for j in jobs], grads=[j.grad for j in jobs],
                formats=[j.format for j in jobs], scale_formats=[j.scale_format for j in jobs],
                block_sizes=[j.block_size for j in jobs],
                injection_coefs=[j.injection_coef for j in jobs], grad_scales=[j.grad_scale for j in jobs],
                sr_keys=[k for j in jobs if j.sr_key is not None for k in j.sr_key], **buffers, **dict(jobs[0].group))
    if jobs[0].optimizer == "sgd":
        return dict(args, momentum_buffers=[j.exp_avg for j in jobs], first_steps=[bool(j.step) for j in jobs])
    eight_bit = [j for j in jobs if j.state8_block_size]
    state8_sr = any(j.state8_keys is not None for j in eight_bit)
    no_keys = ((0, 0), (0, 0))
    return dict(
        args, exp_avg=[j.exp_avg for j in jobs], exp_avg_sq=[j.exp_avg_sq for j in jobs],
        exp_avg_absmax=[j.buffers.get("exp_avg_absmax") for j in jobs],
        exp_avg_sq_absmax=[j.buffers.get("exp_avg_sq_absmax") for j in jobs], steps=[float(j.step) for j in jobs],
        state8_block_sizes=[j.state8_block_size for j in jobs],
        state8_keys=[k for j in jobs for pair in (j.state8_keys or no_keys) for k in pair] if state8_sr else [],
        state8_tables=[*search_tables(7), *search_tables(8)] if eight_bit else [], state8_stochastic=state8_sr)


def _short_forms(args: dict) -> dict:
    """The op's arguments ``args`` with the lists that allow it in their short form (``ecoptim.ops``): one entry
    for equal ones, none for all-None optional tensors."""
    short = {}
    for name, values in args.items():
        if isinstance(values, list) and len(values) > 1:
            if name in ops.SHARED_VALUE_LISTS and values.count(values[0]) == len(values):
                values = values[:1]
            elif name in ops.OPTIONAL_TENSOR_LISTS and all(v is None for v in values):
                values = []
        short[name] = values
    return short


def _call_op(optimizer: str, args: dict) -> torch.Tensor:
    return (ops.sgd_step_ if optimizer == "sgd" else ops.adamw_step_)(**args)


def _group_key(j: Job) -> tuple:
    # jobs of one op call share their hyper-parameters, and 8-bit moments their rounding
    return j.optimizer, j.group, j.state8_keys is not None if j.state8_block_size else None


def _check_finite(bad: list[int], numels: list[int], skip_nonfinite: bool) -> None:
    if any(bad) and not skip_nonfinite:
        n, numel = next((n, numel) for n, numel in zip(bad, numels) if n)
        raise ValueError(f"cannot quantize a weight holding non-finite values ({n} blocks of "
                         f"an updated weight of {numel} elements hold NaN/Inf; they were left unchanged): the "
                         "update overflowed; find where training diverged (e.g. a too large learning rate)")


def run(jobs: list[Job], skip_nonfinite: bool = False) -> list[int]:
    """Step every job's tensor with the fused step op, one call (one thread team) for all jobs that share their
    hyper-parameters (a param group's). A block whose update comes out NaN/Inf is left exactly as it was;
    returns how many there were per job if ``skip_nonfinite``, else raises ValueError if there were any (after
    the whole call: the other blocks are stepped)."""
    if not jobs:
        return []
    calls: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        calls.setdefault(_group_key(j), []).append(i)
    bad = [0] * len(jobs)
    for members in calls.values():
        counts = _call_op(jobs[members[0]].optimizer, _op_args([jobs[i] for i in members])).tolist()
        for i, c in zip(members, counts):
            bad[i] = c
    for j in jobs:
        if j.after is not None:
            j.after()
    _check_finite(bad, [j.numel for j in jobs], skip_nonfinite)
    return bad


class GroupCall:
    """A param group's fused step op call, kept from one step to the next: the arguments that stay (the
    tensors, formats, block sizes, hyper-parameters other than lr) are built once from the first step's jobs;
    ``run`` takes the ones that change every step (gradients, step counts, lr, the clip, stochastic-rounding
    keys) and steps with the same arguments the jobs of that step would give the op (``run(jobs)``).

    On CPU the op's argument structs are kept too (``backends.cpu.ops.PreparedCall``) and run again without the
    op's per-call checks, so whoever keeps a ``GroupCall`` must check before each ``run`` that every tensor of
    ``tensors`` is still its parameter's or its state's, at the same address and unchanged (identity, data
    pointer, version: ``QuantOptimizer._step_planned`` does), and pass gradients ``readable`` returned.

    Only jobs stepped by one op call whose arguments are all of that kind qualify (``of`` returns None
    otherwise): no fp32 working moments around the call (``Job.after``), no stochastically rounded 8-bit moments
    (their keys depend on the step), no SGD first step (the buffer is created then), and an
    ``injection_coef_of`` on each job."""

    def __init__(self, jobs: list[Job]) -> None:
        self.optimizer = jobs[0].optimizer
        args = _op_args(jobs)
        # the structs of the first step's call (kept by the CPU backend), prepared from its arguments; devices
        # whose kernels keep nothing between calls go through the op every step
        self.prepared = (cpu_ops.PREPARE[self.optimizer](**args) if jobs[0].codes.device.type == "cpu"
                         else None)
        # the first step's per-step arguments are dropped: its gradients are not kept alive between steps
        self.args = dict(_short_forms(args), grads=[], sr_keys=[])
        self.numels = [j.numel for j in jobs]
        self.num_blocks = [j.num_blocks for j in jobs]
        self.grad_dtypes = [j.grad.dtype for j in jobs]
        self.injection_coef_of = jobs[0].injection_coef_of

    @classmethod
    def of(cls, jobs: list[Job]) -> "GroupCall | None":
        """A ``GroupCall`` repeating ``jobs``' op call in later steps, or None if they do not qualify."""
        if not jobs:
            return None
        key = _group_key(jobs[0])
        if any(_group_key(j) != key or j.after is not None or j.state8_keys is not None
               or j.injection_coef_of is None or (j.optimizer == "sgd" and j.step) for j in jobs):
            return None
        return cls(jobs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the call reads or writes besides the gradients (weights, moments, mode buffers, tables)."""
        return [t for name, values in self.args.items() if name != "grads" and isinstance(values, list)
                for t in values if isinstance(t, torch.Tensor)]

    def readable(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """This step's gradients (one per job, in order) as ``run`` takes them, or None where the call cannot
        step them: a missing one, another count or size than the first step's, or a dtype or layout the kernel
        does not read (on a device: any dtype other than the first step's)."""
        if any(map(operator.is_, grads, repeat(None))):
            return None
        if self.prepared is not None:
            return self.prepared.readable(grads)
        if (len(grads) != len(self.numels) or list(map(torch.Tensor.numel, grads)) != self.numels
                or list(map(_DTYPE, grads)) != self.grad_dtypes or any(g.layout != torch.strided for g in grads)):
            return None
        return grads

    def run(self, grads: list[torch.Tensor], steps: list[float], lr: float, grad_scale: float,
            sr_keys: list[int] | torch.Tensor, skip_nonfinite: bool = False) -> list[int]:
        """One step (``run``'s semantics and result): ``grads`` as ``readable`` gave them, ``steps`` the step
        counts (after their increment), ``lr`` the group's, ``grad_scale`` the factor of every gradient,
        ``sr_keys`` two per tensor, a list or an int64 tensor (empty: to nearest)."""
        coef_of = self.injection_coef_of
        first = steps[0] if steps else 0.0
        if steps.count(first) == len(steps):  # one step count for the group (the usual case): the op's short form
            steps, coefs = [first], [coef_of(first, lr)]
        else:
            by_step = {s: coef_of(s, lr) for s in set(steps)}
            coefs = list(map(by_step.__getitem__, steps))
        if self.optimizer == "sgd":
            steps = self.args["first_steps"]
        if self.prepared is not None:
            bad = self.prepared.run(grads, steps, coefs, [grad_scale], sr_keys, lr).tolist()
        else:
            if isinstance(sr_keys, torch.Tensor):
                sr_keys = sr_keys.tolist()
            args = dict(self.args, grads=grads, lr=lr, grad_scales=[grad_scale], sr_keys=sr_keys,
                        injection_coefs=coefs)
            if self.optimizer != "sgd":
                args["steps"] = steps
            bad = _call_op(self.optimizer, args).tolist()
        _check_finite(bad, self.numels, skip_nonfinite)
        return bad


def adamw_job(p: QuantizedTensor, grad: torch.Tensor, spec: QuantSpec, m: torch.Tensor, v: torch.Tensor,
              key: tuple[int, int] | None, *, step: float, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, coef: float, inject: bool) -> Job:
    """One AdamW step of ``p`` (see ``adamw.py`` for the equations; the op derives the scalars the reference
    passes to ATen, rounded to fp32 the same way). ``key``: the stochastic-rounding key (``rng.draw_key``; None:
    round to nearest)."""
    return _job("adamw", p, grad, spec, m, v, key, step, coef,
                dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, inject=bool(inject)))


def sgd_job(p: QuantizedTensor, grad: torch.Tensor, spec: QuantSpec, buf: torch.Tensor | None,
            key: tuple[int, int] | None, *, lr: float, momentum: float, dampening: float, nesterov: bool,
            weight_decay: float, coef: float, first: bool, inject: bool) -> Job:
    """One SGD step of ``p``; ``buf`` (fp32) is written whole when ``first`` (torch's buf = g); ``key`` as for
    ``adamw_job``."""
    return _job("sgd", p, grad, spec, buf, None, key, bool(first), coef,
                dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
                     weight_decay=weight_decay, inject=bool(inject)))


def state8_fits(p: QuantizedTensor, spec: QuantSpec, block_size: int) -> bool:
    """Whether the kernel can read and write 8-bit moments of ``p`` directly: their blocks (a power of two
    >= 8) must tile the weight's blocks, of at most 65536 elements. Otherwise the moments are decoded to fp32
    working copies around the kernel (``AdamW._update_job``)."""
    nb, bs = _kernel_blocks(p, spec)
    return (block_size >= 8 and block_size & (block_size - 1) == 0 and nb > 0 and bs <= _SPLIT
            and bs % block_size == 0)


def attach_state8(job: Job, block_size: int, m_absmax: torch.Tensor, v_absmax: torch.Tensor,
                  keys: tuple[tuple[int, int], tuple[int, int]] | None) -> None:
    """Point ``job`` (whose moments are the 8-bit codes) at their absmax arrays; ``keys``: the
    stochastic-rounding keys of m and v (None: round to nearest)."""
    job.buffers["exp_avg_absmax"], job.buffers["exp_avg_sq_absmax"] = m_absmax, v_absmax
    job.state8_block_size = block_size
    job.state8_keys = keys


def attach_compensation(job: Job, p: QuantizedTensor, codes: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Mode 'kahan': ``p``'s compensation, stored like ``p`` (``codes`` in its format, ``scale`` per block or
    None), added to w_til before the rounding and replaced by the rounded error w_til - w_hat, quantized to
    nearest with a new scale (as ``codec.quantize``)."""
    if not (codes.dtype == p.codes.dtype and codes.shape == p.codes.shape and codes.is_contiguous()) or (
            (scale is None) != (p.scale is None)) or (scale is not None and not (
            scale.dtype == p.scale.dtype and scale.shape == p.scale.shape and scale.is_contiguous())):
        raise ValueError("the kahan compensation must be stored like the weight (contiguous codes and scales of "
                         "the weight's dtypes and shapes)")
    job.buffers["compensation_codes"] = codes
    if scale is not None:
        job.buffers["compensation_scales"] = scale


def attach_mode_buffer(job: Job, mode: str, buf: torch.Tensor) -> None:
    """Modes 'master' (``buf``: the fp32 master weights, stepped instead of the codes and then quantized) and
    'exact' (``buf``: the fp32 carried error, added before the step and replaced by w_til - w_hat after it)."""
    if not (buf.dtype == torch.float32 and buf.is_contiguous() and buf.numel() == job.numel):
        raise ValueError(f"the {mode} buffer must be a contiguous fp32 tensor of the weight's size")
    job.buffers["master_weights" if mode == "master" else "carried_errors"] = buf
