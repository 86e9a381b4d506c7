"""What every ecoptim optimizer shares: validation, the step route, the weight-update modes, RNG state.

The step route, shaped like torch.optim's (``torch.optim.adamw.adamw(..., foreach=, fused=)``): ``step()``
checks the gradients (or takes a pending clip) and, per param group, collects the parameters to step
(``_params_to_step``: a ``ParamStep`` each, holding the tensor, its gradient, its state and its spec) and hands
them to ``step_group``, the one function that picks per parameter the fused C kernel (``fused.applies``) or the
reference path (``_step_reference``). FSDP's per-shard update (``distributed/fsdp.py``) collects the rank-local
shards instead and goes through the same ``step_group``.

A subclass supplies small hooks around pure functions (see ``sgd.py`` / ``adamw.py``):
  * ``_update_(w, grad, state, group, spec)``: the textbook update of the fp32 tensor ``w`` *in place* (the same
    ops, in the same order, as torch.optim's single-tensor path), returning what ``_inject_`` needs;
  * ``_inject_(e, state, group, aux)``: ECO's error injection into the momentum;
  * ``_update_job(param, group, key)``: the same update and injection as a job for the fused kernel.

How a quantized weight is updated (``mode``), with q(.) the re-quantizer and w_hat the stored weight:
  eco     w_til = update(w_hat);  w_hat = q(w_til);  e = w_til - w_hat;  m += coef * e   (no extra memory)
  naive   w_til = update(w_hat);  w_hat = q(w_til)                                    (error dropped)
  master  W = update(W) on an fp32 master copy;  w_hat = q(W)                          (+4 B/param)
  exact   w_til = update(w_hat + e_prev);  w_hat = q(w_til);  e_prev = w_til - w_hat   (+4 B/param)
          The appendix's oracle. For SGD-M this is the same recurrence as the momentum form
          m = m_bar + e_prev/lr - e/(lr*beta) (substitute m into w_hat - lr*m), written so that
          w_hat + e_prev == W holds *exactly* in fp32 (Sterbenz: e is exact), hence with any LR it
          reproduces master-weight quantized weights bit for bit.
  kahan   w_til = update(w_hat) + c;  w_hat = q(w_til);  c = q_c(w_til - w_hat)
          a compensation buffer c stored in the weight's own format (own scales), as torch-optimi does
          for bf16 weights (+1 B/param for FP8).
Parameters that are not quantized get the plain update in their own dtype, exactly as torch.optim does.

Fused kernel: ``step_group`` gives the group's kernel parameters their step counts in one foreach add and
their stochastic-rounding keys in one draw (in parameter order, the keys the reference path would draw), and
steps them in one kernel call; the results are bit-identical to the reference path's.

Thousands of tensors: the per-parameter Python work of a step is done once per param group and repeated while
nothing it was derived from changes. ``_params_to_step`` hands on the group's kept ``ParamStep`` list (fresh
gradients), and ``step_group`` repeats the group's kept op call (``_GroupPlan``; on CPU the backend's packed
structs, ``backends.cpu.ops.PreparedCall``) after checking everything the call points to: identities, data
pointers, versions, gradient sizes and dtypes. Any change sends the group down the full route, which plans anew
(``tests/test_step_cache.py``, ``docs/performance-notes.md``).
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, compress, repeat
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.optim import Optimizer

from .. import kernels
from ..codec import dequantize, quantize
from ..convert import spec_of
from ..formats import QuantSpec
from ..qtensor import QuantizedTensor
from ..rng import KEY_DEVICE, draw_key_words, draw_keys
from ..rounding import check_rounding
from . import fused as _fused
from .hyper import check_flag, check_impl_flags, check_lr
from .interop import convert_state_dict, warn_conversions

__all__ = ["QuantOptimizer", "ParamStep", "MODES", "NonFiniteGradientError", "read_weight", "store_weight_",
           "total_grad_norm"]

MODES = ("eco", "master", "naive", "exact", "kahan")
NONFINITE = ("skip", "raise", "skip_blocks")


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or Inf and ``nonfinite='raise'`` was chosen; nothing was updated."""


def read_weight(p: torch.Tensor) -> torch.Tensor:
    """The stored value of weight ``p`` (a ``QuantizedTensor``, or a dense tensor holding fake-quantized or plain
    values) as a fresh fp32 tensor."""
    if isinstance(p, QuantizedTensor):
        return p.dequantize(torch.float32)
    return p.detach().to(torch.float32, copy=True)


def store_weight_(p: torch.Tensor, spec: QuantSpec, w_til: torch.Tensor, rounding: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    """w_hat = q(w_til): re-quantize ``w_til`` with ``spec`` and ``rounding`` into ``p`` (its codes and scales, or
    its fake-quantized values); return w_hat in fp32. Stochastic rounding draws one key from ``generator``."""
    codes, scale = quantize(w_til, spec, rounding, generator)
    w_new = dequantize(codes, scale, spec, p.shape, torch.float32)
    if isinstance(p, QuantizedTensor):
        p.codes.copy_(codes)
        if scale is not None:
            p.scale.copy_(scale)
    else:
        p.detach().copy_(w_new)
    return w_new


def total_grad_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads, norm_type)``, accumulated in fp64 and returned as an fp32 scalar.

    The 2-norm takes one threaded C pass (``kernels.sumsq``: fp64 sums in a fixed order, so the same bits
    whatever the thread count); other norms and tensors the kernel cannot read use torch in fp64. The
    result is NaN/Inf exactly when some gradient element is (squares of fp32 values cannot overflow a double), or
    when the norm itself exceeds the fp32 range (> 3.4e38), as torch's fp32 norm would."""
    if norm_type == math.inf:
        norms = [torch.linalg.vector_norm(g, math.inf).to(torch.float64) for g in grads]
        return (torch.stack(norms).max() if norms else torch.zeros((), dtype=torch.float64)).to(torch.float32)
    if norm_type == 2.0:
        sums = kernels.sumsq(grads)
        if sums is None:
            sums = [float(torch.linalg.vector_norm(g, 2, dtype=torch.float64)) ** 2 for g in grads]
        total = math.fsum(sums) if all(map(math.isfinite, sums)) else sum(sums)
    else:
        total = sum(float(torch.linalg.vector_norm(g, norm_type, dtype=torch.float64)) ** norm_type for g in grads)
    return torch.tensor(total ** (1.0 / norm_type) if math.isfinite(total) else total, dtype=torch.float32)


@dataclass
class _PendingClip:
    """What ``clip_grad_norm_`` measured, for the next ``step``: the gradient factor (None: no clipping was
    needed), whether every gradient was finite, and the parameters and gradients it measured (with the
    gradients' version counters, so that a gradient changed in between is detected)."""

    scale: float | None
    finite: bool
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    versions: list[int]


# the state buffers a mode keeps besides the moments, which the fused kernel reads and writes in place
_MODE_BUFFERS = {"master": ("master",), "exact": ("error",), "kahan": ("comp_codes", "comp_scale")}


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    fast = kernels.all_finite(tensors)
    if fast is not None:
        return fast
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def _scaled_grad(grad: torch.Tensor, grad_scale: float | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``grad`` (in ``dtype``) times a pending clip's factor: a new tensor if scaled, else ``grad`` itself."""
    g = grad if dtype is None else grad.to(dtype)
    return g if grad_scale is None else g * grad_scale


@dataclass(eq=False)  # identity, not elementwise tensor comparison
class ParamStep:
    """One parameter of a param group, as ``QuantOptimizer.step_group`` steps it.

    ``param``: the tensor updated in place (the parameter itself, or the rank-local shard of an FSDP parameter);
    ``grad``: its gradient (``param.grad`` is the same tensor: ``fused.applies`` reads it there; None between
    steps in the list ``_params_to_step`` keeps); ``state``: its optimizer state (filled on its first step);
    ``spec``: its quantization, None for a dense parameter."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, Any]
    spec: QuantSpec | None


_GRAD = operator.attrgetter("grad")
_PARAM = operator.attrgetter("param")
_STATE = operator.attrgetter("state")
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_LAYOUT = operator.attrgetter("layout")
_VERSION = operator.attrgetter("_version")
_NBYTES = operator.attrgetter("nbytes")
_CODES = operator.attrgetter("codes")
_SCALE = operator.attrgetter("scale")
_SPEC = operator.attrgetter("spec")


def _share_counts(counts: list[torch.Tensor]) -> None:
    """Make the 0-d step counts ``counts`` (CPU, fp32, distinct) views of one tensor, in order, each keeping its
    value and identity (``Tensor.set_``), so that ``_shared_counts`` finds them: a ``foreach`` add over n 0-d
    tensors costs microseconds per tensor, one add over their n elements nothing."""
    if not counts or len(set(map(id, counts))) != len(counts) or not all(
            t.dim() == 0 and t.dtype == torch.float32 and t.is_cpu and not t.requires_grad for t in counts):
        return
    flat = torch.stack(counts)
    storage = flat.untyped_storage()
    for i, t in enumerate(counts):
        t.set_(storage, i, (), ())


def _shared_counts(counts: list[torch.Tensor]) -> torch.Tensor | None:
    """The one fp32 tensor whose elements are ``counts``, in order and each once, if they are (see
    ``_share_counts``), else None."""
    n = len(counts)
    if n < 2:
        return None
    first = counts[0]
    if first.dtype != torch.float32 or first.dim() != 0:
        return None
    storage = first.untyped_storage()
    base = storage.data_ptr()
    if storage.nbytes() != 4 * n or list(map(torch.Tensor.data_ptr, counts)) != list(range(base, base + 4 * n, 4)):
        return None
    if set(map(_DTYPE, counts)) != {torch.float32}:
        return None
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, (n,), (1,))


def _same_settings(a: dict, b: dict) -> bool:
    # a group's settings, compared without tensor arithmetic: a tensor setting counts as unchanged only if it is
    # the same object; any other by value (``_settings`` took lists by value, so an edit in place is seen)
    return a.keys() == b.keys() and all(
        x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else (type(x) is type(y) and x == y)
        for x, y in zip(a.values(), (b[k] for k in a)))


def _settings(group: dict) -> dict:
    # what decides how a group is stepped, except its tensors and lr (a scheduler's lr is read every step); lists
    # (e.g. betas=[0.9, 0.99]) as tuples, a copy of their values that a later `group["betas"][0] = ...` cannot reach
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in group.items() if k not in ("params", "lr")}


@dataclass(eq=False)
class _StepList:
    """The ``ParamStep`` list ``QuantOptimizer._params_to_step`` gave a param group, with what it was derived from
    (the group's parameter list, which of them had a gradient, their state dicts and specs), so that the next
    step can hand the same objects on with only the gradients refreshed, after checking that nothing else
    changed (identity checks, one C-level pass per item over the group's parameters)."""

    group: dict
    params: list[torch.Tensor]
    has_grad: list[bool]
    stepped: list[torch.Tensor]
    states: list[dict]
    specs: list[QuantSpec | None]
    steps: list[ParamStep]


@dataclass(eq=False)
class _GroupPlan:
    """What ``step_group`` repeats from one step of a param group to the next: which of the stepped parameters
    the kernel steps and the op call that steps them (``fused.GroupCall``), with everything they were derived
    from, so that a change is detected before the step (``QuantOptimizer._step_planned``) and the group then
    takes the full route, which plans it anew. Checked every step, with one C-level pass per item over the
    parameters: each stepped one's tensor, state dict and spec (identity; done by ``_params_to_step`` when
    ``step_group`` is handed the list it keeps); the group's settings; the gradients (``GroupCall.readable``);
    for the kernel's parameters their codes and scale (identity) and every value in their state dict
    (identity); every tensor the kept call points to (data pointer, version and bytes: a tensor given other
    storage or a smaller view, or resized, re-strided or written by torch in place, is seen);
    the step counts' places in their shared
    tensor (data pointer)."""

    group: dict
    steps: list[ParamStep] | None  # the list ``_params_to_step`` keeps, if the plan was made from it
    params: list[torch.Tensor]
    states: list[dict]
    specs: list[QuantSpec | None]
    settings: dict
    kernel_index: list[int] | None  # positions of the kernel's parameters among ``params`` (None: all of them)
    dense_index: list[int]
    kernel: list[torch.Tensor]
    codes: list[torch.Tensor]
    scales: list[torch.Tensor | None]
    kernel_states: list[dict]
    state_values: list[Any]
    watched: list[torch.Tensor]  # every tensor of the kept call but the gradients (``GroupCall.tensors``)
    pointers: list[int]
    versions: list[int]
    sizes: list[int]  # their bytes (numel x element size)
    # a device kernel writes the weights through torch ops, which bump their versions (the CPU kernel's writes
    # through pointers do not): the plan then takes the versions after its own op call
    own_writes_bump_versions: bool
    step_counts: list[torch.Tensor]
    shared_counts: torch.Tensor | None  # the step counts' one tensor (``_share_counts``), or None
    count_pointers: list[int]
    call: _fused.GroupCall


class QuantOptimizer(Optimizer):
    """Base class; see the module docstring for the modes.

    Non-finite gradients (``nonfinite``):
      * 'skip' (default): one read of every gradient before the step; a step with any NaN/Inf is skipped whole
        (nothing is touched; ``skipped_steps`` counts them).
      * 'raise': the same check, raising ``NonFiniteGradientError``.
      * 'skip_blocks': no separate pass over the gradients (torch.optim's cost, which checks nothing). The
        fused kernel checks every block (a row, group or tensor sharing a scale) as it updates it and leaves
        a block whose update comes out NaN/Inf exactly as it was (codes, scale, moments); parameters outside
        the kernel are checked one by one and skipped whole. ``skipped_blocks`` counts the blocks left alone
        (such a parameter counts as one) and a warning says so. A parameter's step count advances if any of
        its blocks was updated.
    Either way, non-finite values never reach the stored weights.

    Gradient clipping: ``opt.clip_grad_norm_(max_norm)`` (instead of ``torch.nn.utils.clip_grad_norm_``) reads
    every gradient once for the norm, which also tells whether they are all finite, and folds the clipping
    factor into the next ``step()`` (the kernel scales each gradient as it reads it), so the step needs no
    separate NaN/Inf pass and the gradients are not rewritten.
    """

    _block_skip_ok = True  # False where every rank must take the same skip decision (see distributed/)
    _clip_ok = True  # False where the gradients are sharded or exchanged inside step (see distributed/)
    _kernel_ok = True  # False where the update is not one the fused op implements (it has AdamW and SGD only)

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, mode: str = "eco",
                 rounding: str = "stochastic", seed: int = 0, nonfinite: str = "skip") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        check_rounding(rounding)
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; use 'skip', 'raise' or 'skip_blocks'")
        if nonfinite == "skip_blocks" and not self._block_skip_ok:
            raise ValueError(f"{type(self).__name__} must take the same skip decision on every rank: use "
                             "nonfinite='skip' or 'raise' (not 'skip_blocks')")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        defaults = dict(defaults, mode=mode, rounding=rounding)
        # set before the groups are added: add_param_group validates each group as it comes (and some checks
        # depend on these)
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.skipped_blocks = 0
        self._generators: dict[str, torch.Generator] = {}
        self._clip: _PendingClip | None = None
        super().__init__(params, defaults)

    # -- hooks for subclasses ---------------------------------------------------------------------
    def _validate_group(self, group: dict) -> None:
        """Check a parameter group's settings (every group: at construction, ``add_param_group`` and
        ``load_state_dict``); raises before the group is kept. Subclasses check their own hyper-parameters
        first (in torch.optim's order, with its error types) and then call this."""
        if group["mode"] not in MODES:
            raise ValueError(f"unknown mode {group['mode']!r}; choose one of {MODES}")
        check_rounding(group["rounding"])
        if group.get("fused") not in (None, True, False):
            raise ValueError(f"fused must be None (use the fused kernel where it applies), True (same) or False "
                             f"(always the reference path), got {group['fused']!r}")
        check_lr(group["lr"])
        check_flag("maximize", group.get("maximize", False))
        check_impl_flags(group, type(self).__name__)
        lr = group["lr"]
        if group["mode"] == "eco" and lr == 0 and any(spec_of(p) is not None for p in group["params"]):
            raise ValueError("mode='eco' divides the injected error by the learning rate, so lr must be > 0; "
                             "start warm-up from a small positive lr (e.g. 0.01 x peak) instead of 0")

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, then the group's settings are validated; a group that
        fails is not kept."""
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _init_state(self, p: torch.Tensor, state: dict, group: dict, quantized: bool) -> None:
        raise NotImplementedError

    def _update_(self, w: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 spec: QuantSpec | None = None) -> Any:
        """``spec`` is the format of the quantized weight ``w`` stands for (None for a dense parameter)."""
        raise NotImplementedError

    def _inject_(self, e: torch.Tensor, state: dict, group: dict, aux: Any) -> None:
        raise NotImplementedError

    def _finish_(self, state: dict, group: dict, aux: Any) -> None:
        """End of a quantized parameter's step (e.g. write fp32 working copies back to low-precision state)."""

    def _update_job(self, p: ParamStep, group: dict, key: tuple[int, int] | None) -> _fused.Job:
        """The optimizer's update and injection of the quantized ``p`` as a job for the fused kernel (see
        ``fused.py``), bit-identical to ``_update_`` + ``_inject_`` + ``_finish_``. Called only where
        ``fused.applies``, after the step count has advanced; ``key``: the stochastic-rounding key drawn for ``p``
        (None: round to nearest). ``step_group`` adds the clip's factor and the mode's buffers."""
        raise NotImplementedError

    # -- RNG ----------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The generator that stochastic rounding of tensors on ``device`` draws its keys from (seeded from
        ``seed``, saved in state_dict): one CPU generator, whatever ``device`` is.

        Why CPU for every device: a key is two 32-bit words drawn with ``torch.randint``, and a CUDA generator
        (Philox) gives other numbers than a CPU one (Mersenne Twister) for the same seed. Drawing every key on
        CPU makes the stochastic-rounding stream a function of the seed and the parameter order only: the same
        keys, hence (``rng.uniform``, a hash of key and element index) the same uniforms and the same bits on
        CPU and CUDA, and no device synchronisation to read a key."""
        if KEY_DEVICE not in self._generators:
            g = torch.Generator(device=KEY_DEVICE)
            g.manual_seed(self.seed)
            self._generators[KEY_DEVICE] = g
        return self._generators[KEY_DEVICE]

    def rng_states(self) -> dict[str, torch.Tensor]:
        """The stochastic-rounding generators' states, by device (what ``state_dict`` saves under 'rng')."""
        return {k: g.get_state() for k, g in self._generators.items()}

    def set_rng_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the stochastic-rounding generators by generators in ``states`` (``rng_states``' format)."""
        generators = {}
        for device, state in states.items():
            if torch.device(device) != torch.device(KEY_DEVICE):
                # every key is drawn from the CPU generator (``generator``); a state saved for another device's
                # generator (an older checkpoint of a run on CUDA) cannot continue that run's key stream
                warnings.warn(f"stochastic-rounding generator state for {device!r} ignored: keys are drawn from "
                              f"the {KEY_DEVICE} generator, which restarts from the seed if the checkpoint holds "
                              "no state for it; the resumed run's rounding stream differs from an uninterrupted "
                              "one", RuntimeWarning, stacklevel=2)
                continue
            g = torch.Generator(device=device)
            g.set_state(state)
            generators[device] = g
        self._generators = generators

    # -- the loop -----------------------------------------------------------------------------------
    def _with_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters of every group that have a gradient, and their gradients."""
        params = [p for g in self.param_groups for p in g["params"]]
        with torch._C.DisableTorchFunctionSubclass():  # .grad of a QuantizedTensor without its Python handler
            grads = list(map(_GRAD, params))
        has_grad = list(map(operator.is_not, grads, repeat(None)))
        return list(compress(params, has_grad)), list(compress(grads, has_grad))

    def _grads_finite(self) -> bool:
        return _all_finite(self._with_grads()[1])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Total norm of the gradients of this optimizer's parameters (what ``torch.nn.utils.clip_grad_norm_``
        returns), with the clipping folded into the next ``step()``.

        The next step multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))`` (torch's factor, in
        fp32) as it reads it, bit-identical to scaling the gradients first; ``p.grad`` itself is left as it is.
        The norm is accumulated in fp64 (``total_grad_norm``) and doubles as the step's NaN/Inf check: with a
        non-finite norm the next step is skipped (``nonfinite='raise'``: raises ``NonFiniteGradientError``)
        instead of scaling every gradient to NaN as torch's clipping would. Saves, per step, torch clipping's
        read-and-write of every gradient and the step's own NaN/Inf read. Gradients changed between this call
        and ``step()`` (another backward, an in-place edit) make ``step()`` raise; ``zero_grad()`` drops it.
        """
        if not self._clip_ok:
            raise NotImplementedError(f"{type(self).__name__} steps sharded or exchanged gradients; use "
                                      "torch.nn.utils.clip_grad_norm_ on the model's parameters instead")
        if isinstance(max_norm, bool) or not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm)
                                              and max_norm > 0):
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
        norm_type = float(norm_type)
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 (or math.inf), got {norm_type!r}")
        params, grads = self._with_grads()
        total = total_grad_norm(grads, norm_type)
        finite = bool(torch.isfinite(total))
        if error_if_nonfinite and not finite:
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot "
                               "be clipped; nothing was changed (error_if_nonfinite=False skips the next step "
                               "instead)")
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's factor, in the same fp32 operations
        scale = float(coef) if finite and float(coef) < 1.0 else None
        self._clip = _PendingClip(scale, finite, params, grads, list(map(_VERSION, grads)))
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also drops a pending clip (it belongs to these gradients)."""
        self._clip = None
        # torch's loop reads each parameter's .grad; a QuantizedTensor's would go through its Python
        # __torch_function__ handler (about a microsecond each), and the gradients themselves are plain tensors
        with torch._C.DisableTorchFunctionSubclass():
            super().zero_grad(set_to_none)

    def _take_clip(self) -> _PendingClip | None:
        """The pending clip, checked against the current gradients (and consumed)."""
        clip, self._clip = self._clip, None
        if clip is None:
            return None
        params, grads = self._with_grads()
        if (len(params) != len(clip.params) or not all(map(operator.is_, params, clip.params))
                or not all(map(operator.is_, grads, clip.grads)) or list(map(_VERSION, grads)) != clip.versions):
            raise RuntimeError("the gradients changed after clip_grad_norm_() (another backward pass, a new or "
                               "edited .grad): call opt.clip_grad_norm_() right before opt.step(); nothing was "
                               "updated")
        return clip

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step: the gradients are checked per ``nonfinite`` (see the class docstring) or by the
        pending clip, then each param group's parameters (``_params_to_step``) go through ``step_group``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._take_clip()
        if clip is not None:  # its norm pass has checked every gradient already
            blocks, finite = False, clip.finite
        else:
            blocks = self.nonfinite == "skip_blocks"  # checked block by block in the kernel instead
            finite = blocks or self._grads_finite()
        if not finite:
            if self.nonfinite == "raise":
                raise NonFiniteGradientError("a gradient holds NaN/Inf; weights and optimizer state were left "
                                             "untouched (use nonfinite='skip' to skip such steps)")
            self.skipped_steps += 1
            return loss
        grad_scale = clip.scale if clip is not None else None
        skipped = 0
        for group in self.param_groups:
            with self._params_to_step(group) as params:
                skipped += self.step_group(group, params, grad_scale=grad_scale, skip_nonfinite=blocks)
        self._drop_stale_plans()
        if skipped:
            self.skipped_blocks += skipped
            warnings.warn(f"ecoptim: {skipped} blocks (rows/groups/tensors) had NaN/Inf updates this step and were "
                          "left unchanged (nonfinite='skip_blocks')", RuntimeWarning, stacklevel=2)
        return loss

    def _kept(self, name: str) -> dict[int, Any]:
        # per-group things kept between steps (by the group's id; each entry holds its group, so that the id
        # stays the group's while kept). In the instance's __dict__, created on first use: an unpickled or
        # loaded optimizer (torch's __setstate__) starts without them.
        return self.__dict__.setdefault(name, {})

    def _drop_stale_plans(self) -> None:
        """Forget what was kept for groups no longer in ``param_groups`` (replaced by ``load_state_dict``, or
        passed to ``step_group`` as a copy), so that their tensors are not kept alive."""
        live = {id(g): g for g in self.param_groups}
        for name in ("_step_lists", "_step_plans"):
            kept = self._kept(name)
            for k in [k for k, v in kept.items() if live.get(k) is not v.group]:
                del kept[k]

    @contextmanager
    def _params_to_step(self, group: dict) -> Iterator[list[ParamStep]]:
        """The parameters of ``group`` that have a gradient, in parameter order, for ``step_group`` (a context:
        a subclass that steps other tensors than the parameters, e.g. FSDP's local shards, undoes its set-up
        after the step). The list and its ``ParamStep`` objects are kept from one step to the next and handed on
        again, their gradients refreshed, while the group's parameters, which of them have a gradient, their
        state dicts and specs are the same objects (checked every step). ``step_group`` trusts that check for
        this very list, so an override must hand on a new list rather than edit this one in place."""
        params = self._param_steps(group)
        try:
            yield params
        finally:
            if not all(map(_STATE, params)):
                for p in params:
                    if not p.state:  # skipped before its first step (nonfinite='skip_blocks'): it keeps no state entry
                        del self.state[p.param]
            for p in params:  # the kept list must not keep this step's gradients alive (zero_grad frees them)
                p.grad = None

    def _param_steps(self, group: dict) -> list[ParamStep]:
        """``_params_to_step``'s list for ``group``: the kept one with this step's gradients, or a new one."""
        lists = self._kept("_step_lists")
        params = group["params"]
        with torch._C.DisableTorchFunctionSubclass():  # .grad of a QuantizedTensor without its Python handler
            grads = list(map(_GRAD, params))
        kept = lists.get(id(group))
        if kept is not None and kept.group is group and len(params) == len(kept.params) and all(
                map(operator.is_, params, kept.params)):
            has_grad = list(map(operator.is_not, grads, repeat(None)))
            if has_grad == kept.has_grad:
                stepped = kept.stepped
                if len(stepped) != len(params):
                    grads = list(compress(grads, has_grad))
                if all(map(operator.is_, map(self.state.__getitem__, stepped), kept.states)) and all(
                        map(operator.is_, map(spec_of, stepped), kept.specs)):
                    steps = kept.steps
                    for s, g in zip(steps, grads):
                        s.grad = g
                    return steps
        steps = [ParamStep(p, g, self.state[p], spec_of(p)) for p, g in zip(params, grads) if g is not None]
        lists[id(group)] = _StepList(group, list(params), [g is not None for g in grads], list(map(_PARAM, steps)),
                                     list(map(_STATE, steps)), list(map(_SPEC, steps)), steps)
        return steps

    @torch.no_grad()
    def step_group(self, group: dict, params: list[ParamStep], *, grad_scale: float | None = None,
                   skip_nonfinite: bool = False) -> int:
        """Step ``params`` (``group``'s, in parameter order) with ``group``'s settings: the fused kernel for each
        one it applies to (``fused.applies``), the reference path (``_step_reference``) for the others, with
        bit-identical results. Every caller goes through here: ``step()`` and FSDP's per-shard update.

        ``grad_scale``: a pending clip's factor, multiplied into every gradient as it is read (in fp32).
        ``skip_nonfinite`` (``nonfinite='skip_blocks'``): the kernel leaves a block whose update is NaN/Inf as it
        was, and a parameter outside the kernel whose gradient holds NaN/Inf is left whole (one block); a
        parameter none of whose blocks was updated keeps its step count. Without it, NaN/Inf updates raise
        ValueError. Returns the number of blocks left unchanged.

        Stochastic-rounding keys are drawn one per quantized tensor in parameter order, as the reference path
        draws them: the kernel's parameters all at once (``_start_kernel_steps``), unless a quantized parameter
        on the reference path stands between them; that one draws its key in its turn, so then every kernel
        parameter draws its own in its turn too.

        A group stepped with all its kernel parameters in one op call keeps that call (a ``_GroupPlan``): the
        next call with the same parameters, states, specs, settings and gradient sizes repeats it with
        this step's gradients, step counts, lr, clip factor and keys, and skips the per-parameter work of
        choosing the path and building the kernel's arguments; the bits are the same."""
        plans = self._kept("_step_plans")
        plan = plans.get(id(group))
        if plan is not None and plan.group is group:
            skipped = self._step_planned(plan, params, grad_scale, skip_nonfinite)
            if skipped is not None:
                return skipped
        skipped, kernel_step = self._step_group(group, params, grad_scale, skip_nonfinite)
        plan = self._plan(group, params, kernel_step)
        if plan is None:
            plans.pop(id(group), None)
        else:
            plans[id(group)] = plan
        return skipped

    def _step_group(self, group: dict, params: list[ParamStep], grad_scale: float | None,
                    skip_nonfinite: bool) -> tuple[int, tuple[list[ParamStep], list[_fused.Job]] | None]:
        """``step_group``, also returning the kernel's parameters and jobs if they were stepped together in one
        op call after their keys were drawn at once (what a ``_GroupPlan`` repeats), else None."""
        kernel = [self._kernel_ok and _fused.applies(p.param, p.spec, group) for p in params]
        together = all(k or p.spec is None for p, k in zip(params, kernel))
        keys = iter(self._start_kernel_steps(group, [p for p, k in zip(params, kernel) if k]) if together else ())
        skipped, jobs, job_params, alone = 0, [], [], False
        for p, k in zip(params, kernel):
            if k:
                key = next(keys) if together else self._start_kernel_steps(group, [p])[0]
                job = self._kernel_job(p, group, key, grad_scale)
                if job.after is not None:  # fp32 working moments: stepped alone, now, so that only one tensor's
                    _fused.run([job])       # working copies exist at a time
                    alone = True
                else:  # stepped below, all together: one kernel call, one thread team per group
                    jobs.append(job)
                    job_params.append(p)
            elif skip_nonfinite and not _all_finite([p.grad]):
                skipped += 1  # outside the kernel: the whole parameter is one block
            else:
                self._step_reference(p, group, grad_scale)
        if jobs:
            for p, job, n_bad in zip(job_params, jobs, _fused.run(jobs, skip_nonfinite=skip_nonfinite)):
                skipped += n_bad
                if n_bad and n_bad == job.num_blocks:  # nothing of it was updated: its step did not happen
                    self._undo_step_start(p.state, job)
        return skipped, ((job_params, jobs) if together and jobs and not alone else None)

    def _undo_step_start(self, state: dict, job: _fused.Job) -> None:
        """A kernel parameter none of whose blocks was updated (``nonfinite='skip_blocks'``): undo what starting
        its step did to its state (the step count's increment; subclasses: what their ``_update_job`` set up)."""
        state["step"] -= 1

    def _plan(self, group: dict, params: list[ParamStep],
              kernel_step: tuple[list[ParamStep], list[_fused.Job]] | None) -> _GroupPlan | None:
        """The plan repeating this step of ``params`` with ``group`` (just taken by ``_step_group``) in later
        steps, or None where it cannot be repeated that way (see ``_GroupPlan`` and ``fused.GroupCall.of``)."""
        if kernel_step is None:
            return None
        job_params, jobs = kernel_step
        call = _fused.GroupCall.of(jobs)
        if call is None:
            return None
        position = {id(p): i for i, p in enumerate(params)}
        kernel_index = [position.get(id(p), -1) for p in job_params]
        # the kernel's parameters with their own state entries (not, e.g., FSDP's per-step views of a shard's
        # state, which would never be the same objects again)
        if -1 in kernel_index or any(self.state.get(p.param) is not p.state for p in job_params):
            return None
        kernel_set = set(kernel_index)
        dense_index = [i for i in range(len(params)) if i not in kernel_set]
        if any(params[i].spec is not None for i in dense_index):
            return None
        kernel = list(map(_PARAM, job_params))
        states = list(map(_STATE, job_params))
        step_counts = [st["step"] for st in states]
        _share_counts(step_counts)
        shared = _shared_counts(step_counts)
        watched = call.tensors()
        kept = self._kept("_step_lists").get(id(group))
        return _GroupPlan(
            group=group, steps=params if kept is not None and kept.steps is params else None,
            params=list(map(_PARAM, params)), states=list(map(_STATE, params)), specs=list(map(_SPEC, params)),
            settings=_settings(group),
            kernel_index=None if kernel_index == list(range(len(params))) else kernel_index,
            dense_index=dense_index, kernel=kernel, codes=list(map(_CODES, kernel)),
            scales=list(map(_SCALE, kernel)), kernel_states=states,
            state_values=list(chain.from_iterable(map(dict.values, states))), watched=watched,
            pointers=list(map(torch.Tensor.data_ptr, watched)), versions=list(map(_VERSION, watched)),
            sizes=list(map(_NBYTES, watched)), own_writes_bump_versions=any(t.device.type != "cpu" for t in watched),
            step_counts=step_counts, shared_counts=shared,
            count_pointers=list(map(torch.Tensor.data_ptr, step_counts)) if shared is not None else [], call=call)

    def _step_planned(self, plan: _GroupPlan, params: list[ParamStep], grad_scale: float | None,
                      skip_nonfinite: bool) -> int | None:
        """``params`` stepped as ``_step_group`` would step them, bit for bit, by repeating ``plan``, if nothing
        the plan was derived from changed; None (nothing done) otherwise."""
        group, is_ = plan.group, operator.is_
        if params is not plan.steps and (  # (the kept list was checked by _params_to_step this step)
                len(params) != len(plan.params) or not all(map(is_, map(_PARAM, params), plan.params))
                or not all(map(is_, map(_STATE, params), plan.states))
                or not all(map(is_, map(_SPEC, params), plan.specs))):
            return None
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) or not lr > 0 or not _same_settings(_settings(group), plan.settings):
            return None
        kernel_steps = params if plan.kernel_index is None else [params[i] for i in plan.kernel_index]
        kernel, call = plan.kernel, plan.call
        grads = call.readable(list(map(_GRAD, kernel_steps)))
        if (grads is None or not all(map(is_, map(_CODES, kernel), plan.codes))
                or not all(map(is_, map(_SCALE, kernel), plan.scales))):
            return None
        values = list(chain.from_iterable(map(dict.values, plan.kernel_states)))
        if len(values) != len(plan.state_values) or not all(map(is_, values, plan.state_values)):
            return None
        watched = plan.watched
        # data pointer, version and bytes: set_, resize_, in-place re-striding and torch's in-place writes change
        # the version; .data = (no version bump) the pointer, or, at the same address (a view of the old storage,
        # or new storage where the old was freed), the bytes, so the kernel never writes past a tensor's end (a
        # same-sized view with other strides at the same address would be written in memory order: not checked,
        # contiguity is the costliest of these reads)
        if (list(map(torch.Tensor.data_ptr, watched)) != plan.pointers or list(map(_VERSION, watched)) != plan.versions
                or list(map(_NBYTES, watched)) != plan.sizes
                or (plan.shared_counts is not None
                    and list(map(torch.Tensor.data_ptr, plan.step_counts)) != plan.count_pointers)):
            return None
        # the step, as _step_group takes it: step counts and keys of the kernel's parameters, the dense ones on
        # the reference path, then the kernel's op call
        shared = plan.shared_counts
        if shared is not None:
            shared.add_(1)  # the same fp32 additions as one add per count
            steps = shared.tolist()
        else:
            torch._foreach_add_(plan.step_counts, 1)
            steps = [t.item() for t in plan.step_counts]
        keys = (draw_key_words(self.generator(kernel[0].device), len(kernel)) if group["rounding"] == "stochastic"
                else [])
        skipped = 0
        for i in plan.dense_index:
            p = params[i]
            if skip_nonfinite and not _all_finite([p.grad]):
                skipped += 1
            else:
                self._step_reference(p, group, grad_scale)
        factor = 1.0 if grad_scale is None else grad_scale
        if group.get("maximize", False):
            factor = -factor
        bad = call.run(grads, steps, lr, factor, keys, skip_nonfinite=skip_nonfinite)
        if plan.own_writes_bump_versions:
            plan.versions = list(map(_VERSION, watched))
        if any(bad):
            for i, (n_bad, num_blocks) in enumerate(zip(bad, call.num_blocks)):
                skipped += n_bad
                if n_bad and n_bad == num_blocks:
                    plan.step_counts[i] -= 1
        return skipped

    def _start_kernel_steps(self, group: dict, params: list[ParamStep]) -> list[tuple[int, int] | None]:
        """For parameters the kernel steps (in parameter order): create missing state, advance every step count
        (one foreach add) and draw their stochastic-rounding keys (one draw: the keys one-by-one draws in this
        order would give, ``rng.draw_keys``). Returns the keys (None each for round-to-nearest)."""
        for p in params:
            if not p.state:
                self._init_quantized_state(p.param, p.state, group, p.spec)
        if not params:
            return []
        counts = [p.state["step"] for p in params]
        shared = _shared_counts(counts)
        if shared is not None:
            shared.add_(1)  # the same fp32 additions, in one op
        else:
            torch._foreach_add_(counts, 1)
        if group["rounding"] != "stochastic":
            return [None] * len(params)
        return draw_keys(self.generator(params[0].param.device), len(params))

    def _kernel_job(self, p: ParamStep, group: dict, key: tuple[int, int] | None,
                    grad_scale: float | None) -> _fused.Job:
        """The fused kernel's whole step of ``p``: the optimizer's ``_update_job`` plus what every optimizer adds,
        the clip's factor and the mode's buffers."""
        job = self._update_job(p, group, key)
        if grad_scale is not None:
            job.grad_scale = grad_scale  # fp32 in the kernel, as the reference's g * scale
        if group.get("maximize", False):  # torch negates the gradient first; -(g*c) == g*(-c) exactly in fp32
            job.grad_scale = -job.grad_scale
        state = p.state
        names = _MODE_BUFFERS.get(group["mode"], ())
        for name in names:
            if name in state and not state[name].is_contiguous():  # e.g. loaded from a checkpoint as a view:
                state[name] = state[name].contiguous()              # the kernel needs it flat
        if group["mode"] == "kahan":
            _fused.attach_compensation(job, p.param, state["comp_codes"], state.get("comp_scale"))
        elif names:
            _fused.attach_mode_buffer(job, group["mode"], state[names[0]])
        return job

    def _init_quantized_state(self, p: torch.Tensor, state: dict, group: dict, spec: QuantSpec) -> None:
        """The optimizer's state of a quantized weight, plus what its mode keeps (master copy, error, Kahan
        buffer)."""
        self._init_state(p, state, group, True)
        if group["mode"] == "master":
            state["master"] = read_weight(p)
        elif group["mode"] == "exact":
            state["error"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        elif group["mode"] == "kahan":
            codes, scale = quantize(torch.zeros(p.shape, device=p.device), spec)
            state["comp_codes"] = codes
            if scale is not None:
                state["comp_scale"] = scale

    def _step_reference(self, p: ParamStep, group: dict, grad_scale: float | None) -> None:
        """The reference step of one parameter: torch.optim's single-tensor ops, then for a quantized weight the
        mode's re-quantization (see the module docstring). Draws its stochastic-rounding key in its turn."""
        param, state, spec = p.param, p.state, p.spec
        if not state:
            if spec is not None:
                self._init_quantized_state(param, state, group, spec)
            else:
                self._init_state(param, state, group, False)
        state["step"] += 1
        if spec is None:  # a plain parameter: the textbook update, in its own dtype, in place
            self._update_(param, _scaled_grad(p.grad, grad_scale), state, group)
            return
        mode, lr = group["mode"], group["lr"]
        grad = _scaled_grad(p.grad, grad_scale, torch.float32)  # fp32 maths for quantized weights
        if mode == "master":
            w = state["master"]
        elif mode == "exact":
            w = read_weight(param).add_(state["error"])
        else:
            w = read_weight(param)
        aux = self._update_(w, grad, state, group, spec)  # w now holds w_til
        if mode == "kahan":
            w.add_(dequantize(state["comp_codes"], state.get("comp_scale"), spec, param.shape))
        if mode == "eco" and lr == 0:
            self._finish_(state, group, aux)
            return  # nothing moved; the error would be divided by zero. Stored weight left as it is.
        gen = self.generator(param.device) if group["rounding"] == "stochastic" else None
        w_hat = store_weight_(param, spec, w, group["rounding"], gen)
        if mode == "eco":
            self._inject_(w.sub_(w_hat), state, group, aux)
        elif mode == "exact":
            state["error"].copy_(w.sub_(w_hat))
        elif mode == "kahan":
            codes, scale = quantize(w.sub_(w_hat), spec)
            state["comp_codes"].copy_(codes)
            if scale is not None:
                state["comp_scale"].copy_(scale)
        self._finish_(state, group, aux)

    # -- (de)serialization ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["ecoptim"] = {"rng": {k: g.get_state() for k, g in self._generators.items()},
                         "skipped_steps": self.skipped_steps, "skipped_blocks": self.skipped_blocks,
                         "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this optimizer class (any mode, rounding or state precision) or of the matching
        torch.optim class. Hyper-parameters and step counts come from it; how weights are stored and stepped
        stays as constructed, mismatches converted where that loses nothing (one warning names them) and
        refused otherwise, before anything is modified (see ``interop``)."""
        state_dict, notes = convert_state_dict(self, state_dict)
        extra = state_dict.pop("ecoptim", None)
        for sg, g in zip(state_dict["param_groups"], self.param_groups):  # refuse bad settings before loading
            self._validate_group(dict(sg, params=g["params"]))
        # torch casts every floating state to the parameter's dtype; ecoptim keeps fp32 states for
        # low-precision weights, so remember the saved dtypes and restore them afterwards.
        dtypes = {pid: {k: v.dtype for k, v in st.items() if isinstance(v, torch.Tensor)}
                  for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            st = self.state.get(p)
            for k, dt in dtypes.get(pid, {}).items():
                if st is not None and isinstance(st.get(k), torch.Tensor) and st[k].dtype != dt:
                    st[k] = st[k].to(dt)
        for group in self.param_groups:
            self._validate_group(group)
        if extra is not None:
            self.seed = extra.get("seed", self.seed)
            self.skipped_steps = extra.get("skipped_steps", 0)
            self.skipped_blocks = extra.get("skipped_blocks", 0)
            self._generators = {}
            for k, s in extra.get("rng", {}).items():
                g = torch.Generator(device=k)
                g.set_state(s)
                self._generators[k] = g
        if notes:
            warn_conversions(notes)
