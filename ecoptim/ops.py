r"""ecoptim's operators, declared once with ``torch.library``: the fused optimizer steps of quantized weights.

Each op steps a list of tensors (a param group) in place and is implemented per device: the CPU kernel is
registered in ``ecoptim/backends/cpu/ops.py`` (the C library of ``ecoptim/csrc``); a GPU kernel registers under
the same schema. The fake implementations below give the result's shape and dtype, so that the ops trace under
``FakeTensorMode`` / ``torch.compile``.

Per tensor i (lists of one entry per tensor): ``codes[i]`` holds the weight in ``formats[i]`` (a
``ecoptim.formats`` name: fp8_e4m3, fp8_e5m2, int8, int4 and fp4_e2m1 (packed, two per byte), bf16, mxfp8,
mxfp4, nvfp4) with one scale per block of ``block_sizes[i]`` elements in ``scales[i]`` (None for unscaled bf16),
stored as ``scale_formats[i]`` says (a ``formats.SCALE_FORMATS`` name: absmax, e8m0, e8m0_ceil, e4m3_fp32);
``grads[i]`` its gradient (fp32, bf16 or fp16). Per block, with w_hat = decode(codes) * scale:

    g     = grad * grad_scale                                   # a pending clip folded in (fp32)
    AdamW (adamw_step_; step t = steps[i]):
    m     = lerp(m, g, 1 - beta1) ;  v = beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    w_til = w_hat * (1 - lr * wd) - (lr / (1 - beta1^t)) * m / denom
    SGD (sgd_step_; torch.optim.SGD): g = g + wd * w_hat ;  m = g on the first step, else momentum * m +
    (1 - dampening) * g ;  d = g + momentum * m (nesterov) or m ;  w_til = w_hat - lr * d
    scale = absmax(w_til) / format_max ;  w_hat' = round(w_til / scale) * scale       (to nearest, or
                                                               stochastically with the key sr_keys[2i:2i+2])
    (the absmax scale; E8M0 and E4M3 x fp32 scales are chosen from the block absmax as ``formats.E8M0Scale`` and
    ``formats.E4M3TensorScale`` say, the latter from the whole tensor's absmax too)
    e     = w_til - w_hat'
    inject (ECO):  AdamW  m = m + injection_coefs[i] * e * denom ;  SGD  m = m + injection_coefs[i] * e

every operation rounded to fp32 as the reference path (``ecoptim.optim``) performs it, so the results are bit
for bit the reference's. Modes other than 'eco' / 'naive' use the optional buffers: 'master' steps
``master_weights[i]`` (fp32) instead of w_hat and writes w_til back; 'exact' adds ``carried_errors[i]`` to w_hat
and replaces it with e; 'kahan' adds the compensation (``compensation_codes[i]`` / ``compensation_scales[i]``,
stored like the weight) to w_til and replaces it with e quantized to nearest.

Short forms, for calls over many tensors (each list entry costs the op call a conversion): ``formats``,
``block_sizes``, ``steps``, ``injection_coefs``, ``grad_scales``, ``state8_block_sizes`` and ``first_steps`` may
hold one entry standing for every tensor's, and the optional tensor lists (``scales``, the 8-bit absmax lists,
the mode buffers, ``momentum_buffers``) may be empty, standing for None everywhere.

8-bit moments (AdamW): ``exp_avg[i]`` / ``exp_avg_sq[i]`` of dtype uint8 are ``ecoptim.optim.state8`` codes with
one fp32 absmax per ``state8_block_sizes[i]`` elements (``exp_avg_absmax[i]``, ``exp_avg_sq_absmax[i]``), decoded
and re-encoded in the step with the codec's search tables (``state8_tables``: ``state8.search_tables(7)`` then
``(8)``, six tensors), rounded stochastically with ``state8_keys[4i:4i+4]`` if ``state8_stochastic``.

A block whose w_til holds NaN/Inf is left exactly as it was (codes, scale, moments, buffers); the result holds
how many such blocks each tensor had (int64, one per tensor). With an e4m3_fp32 scale every block depends on the
tensor's absmax, so one such block leaves the whole tensor as it was and all its blocks are counted.

The gradient checks that decide whether and how to step (``kernels.all_finite``, ``kernels.sumsq``) and the
stochastic-rounding stream (``kernels.uniform``, a cross-check of ``ecoptim.rng``) stay plain functions: their
callers branch on the answer in Python before anything is mutated, so an op returning a tensor would only add a
device round trip.
"""
from __future__ import annotations

import torch

__all__ = ["adamw_step_", "sgd_step_", "ADAMW_STEP_SCHEMA", "SGD_STEP_SCHEMA", "SHARED_VALUE_LISTS",
           "OPTIONAL_TENSOR_LISTS", "expand_short_forms"]

#: the per-tensor lists that may hold one entry standing for every tensor's (module docstring: short forms)
SHARED_VALUE_LISTS = ("formats", "scale_formats", "block_sizes", "steps", "injection_coefs", "grad_scales",
                      "state8_block_sizes", "first_steps")
#: the optional tensor lists that may be empty, standing for None everywhere
OPTIONAL_TENSOR_LISTS = ("scales", "exp_avg_absmax", "exp_avg_sq_absmax", "master_weights", "carried_errors",
                         "compensation_codes", "compensation_scales", "momentum_buffers")


def expand_short_forms(n: int, lists: dict[str, list]) -> dict[str, list]:
    """``lists`` (argument name -> the op's list) with every short form written out to ``n`` entries: one entry of a
    ``SHARED_VALUE_LISTS`` list stands for every tensor's, an empty ``OPTIONAL_TENSOR_LISTS`` list for None
    everywhere. Other lengths are left as they are, for the kernel's own check to refuse."""
    full = {}
    for name, values in lists.items():
        if len(values) != n:
            if len(values) == 1 and name in SHARED_VALUE_LISTS:
                values = list(values) * n
            elif not values and name in OPTIONAL_TENSOR_LISTS:
                values = [None] * n
        full[name] = values
    return full


_WEIGHTS = "Tensor(a!)[] codes, Tensor(b!)?[] scales, Tensor[] grads"


def _modes(first: str) -> str:
    # the mode buffers' arguments, their alias sets lettered from ``first``
    a, b, c, d = (chr(ord(first) + k) for k in range(4))
    return (f"Tensor({a}!)?[] master_weights, Tensor({b}!)?[] carried_errors, Tensor({c}!)?[] compensation_codes, "
            f"Tensor({d}!)?[] compensation_scales")


_PER_TENSOR = "str[] formats, str[] scale_formats, int[] block_sizes"

ADAMW_STEP_SCHEMA = (
    f"({_WEIGHTS}, Tensor(c!)[] exp_avg, Tensor(d!)[] exp_avg_sq, Tensor(e!)?[] exp_avg_absmax, "
    f"Tensor(f!)?[] exp_avg_sq_absmax, {_modes('g')}, {_PER_TENSOR}, float[] steps, float[] injection_coefs, "
    "float[] grad_scales, int[] sr_keys, int[] state8_block_sizes, int[] state8_keys, Tensor[] state8_tables, "
    "*, float lr, float beta1, float beta2, float eps, float weight_decay, bool inject, bool stochastic, "
    "bool state8_stochastic) -> Tensor")
SGD_STEP_SCHEMA = (
    f"({_WEIGHTS}, Tensor(c!)?[] momentum_buffers, {_modes('d')}, {_PER_TENSOR}, bool[] first_steps, "
    "float[] injection_coefs, float[] grad_scales, int[] sr_keys, "
    "*, float lr, float momentum, float dampening, bool nesterov, float weight_decay, bool inject, "
    "bool stochastic) -> Tensor")

torch.library.define("ecoptim::adamw_step_", ADAMW_STEP_SCHEMA)
torch.library.define("ecoptim::sgd_step_", SGD_STEP_SCHEMA)


def _nonfinite_counts(codes: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    # the result of either op: one int64 count per tensor, on the tensors' device
    if not grads:
        return torch.empty(0, dtype=torch.int64)
    return grads[0].new_empty((len(codes),), dtype=torch.int64)


@torch.library.register_fake("ecoptim::adamw_step_")
def _adamw_step_fake(codes, scales, grads, *args, **kwargs) -> torch.Tensor:
    return _nonfinite_counts(codes, grads)


@torch.library.register_fake("ecoptim::sgd_step_")
def _sgd_step_fake(codes, scales, grads, *args, **kwargs) -> torch.Tensor:
    return _nonfinite_counts(codes, grads)


adamw_step_ = torch.ops.ecoptim.adamw_step_
"""AdamW step of quantized weights, in place (see the module docstring); returns the non-finite blocks per tensor."""
sgd_step_ = torch.ops.ecoptim.sgd_step_
"""SGD step of quantized weights, in place (see the module docstring); returns the non-finite blocks per tensor."""
