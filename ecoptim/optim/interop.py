"""Moving optimizer state between torch.optim and ecoptim, and between ecoptim settings.

Switching a half-trained dense run (fp32 or bf16, ``torch.optim.AdamW`` / ``SGD``) to quantized weights::

    model.load_state_dict(dense_checkpoint["model"])        # dense weights
    ecoptim.quantize_(model, "fp8")                         # stored as FP8 from here on
    opt = ecoptim.AdamW(model.parameters(), lr=..., mode="eco")
    opt.load_state_dict(dense_checkpoint["optimizer"])      # a torch.optim.AdamW state_dict

and back: ``to_torch_state_dict(opt)`` is a state_dict that ``torch.optim.AdamW`` / ``SGD`` loads.

What a loaded state_dict may change, and what it may not (``convert_state_dict``):
  * Training hyper-parameters (lr, betas, eps, weight_decay, momentum, amsgrad, maximize, ...) and the step
    counts come from the state_dict, as torch.optim does: the run resumes its schedule.
  * How weights are stored and stepped (``mode``, ``rounding``, ``state_dtype``, ``fused``, ``foreach``,
    ``capturable``, ``differentiable``) stays as the optimizer was constructed: constructing it is how a user
    says what the run is to become. A mismatch is converted where that loses nothing, and named in one warning:
      - a mode buffer the new mode does not keep (the fp32 master copy of 'master', the carried error of
        'exact', the compensation of 'kahan') is dropped; the weights go on from their stored values;
      - a mode buffer the new mode needs is created: the master copy from the stored weights, the carried
        error and the compensation as zeros (what a fresh optimizer starts from);
      - moments in a narrower type than the new one are widened exactly (bf16 -> fp32, 8-bit -> fp32: the values
        the optimizer used), and fp32 moments whose every value is exactly representable are narrowed.
    Rounding moments into a narrower type (fp32 -> bf16, anything -> 8 bits) loses information, so it is
    refused unless asked for explicitly (``from_torch_state_dict(..., round_states=True)``; 8-bit moments are
    then encoded to nearest).
  * Moments of another shape than their parameter, a state_dict of another optimizer (its groups lack this
    optimizer's hyper-parameters), or ``torch.optim.Adam`` with L2 weight decay (``decoupled_weight_decay=False``,
    ``weight_decay != 0``: another algorithm than AdamW) are refused.
Nothing is modified before every check has passed.

torch.optim.SGD keeps no step count; a parameter loaded from it starts ecoptim's count at 0 (only reported,
nothing in SGD's update reads it).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from ..codec import quantize
from ..convert import spec_of
from ..qtensor import QuantizedTensor
from .state8 import BlockwiseState, dequantize_state, quantize_state

__all__ = ["convert_state_dict", "from_torch_state_dict", "to_torch_state_dict", "MODE_BUFFERS", "STORAGE_KEYS"]

#: group settings that say how weights are stored and stepped: kept from the optimizer as constructed
STORAGE_KEYS = ("mode", "rounding", "state_dtype", "fused", "foreach", "capturable", "differentiable")
#: hyper-parameters that older state_dicts may lack (torch's own ``__setstate__`` defaults them to False)
_OPTIONAL_KEYS = ("amsgrad", "maximize", "nesterov")
#: the state a mode keeps besides the moments
MODE_BUFFERS = {"master": ("master",), "exact": ("error",), "kahan": ("comp_codes", "comp_scale")}
_ALL_BUFFERS = ("master", "error", "comp_codes", "comp_scale")
_BUFFER_NAMES = {"master": "fp32 master copy", "error": "carried error", "comp_codes": "compensation",
                 "comp_scale": "compensation"}
_STATE8_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax", "state8_stream")


def _fits_exactly(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(x.to(dtype).to(x.dtype), x))


def _stored_weight(p: torch.Tensor) -> torch.Tensor:
    """The stored weight as a fresh fp32 tensor."""
    if isinstance(p, QuantizedTensor):
        return p.dequantize(torch.float32)
    return p.detach().to(torch.float32, copy=True)


def _state_owner(optimizer: torch.optim.Optimizer) -> tuple[tuple[str, ...], str]:
    keys = getattr(optimizer, "moment_keys", None)
    if not keys:
        raise TypeError(f"{type(optimizer).__name__} declares no moment_keys: not an ecoptim optimizer")
    return keys, type(optimizer).__name__


def convert_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], *,
                       round_states: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``state_dict`` (of this ecoptim optimizer class, saved with any settings, or of the matching
    torch.optim class) made to fit ``optimizer`` as constructed; see the module docstring. Returns the converted
    state_dict (new containers; tensors that need no change are shared) and what was converted, one line each.
    Raises ValueError for what cannot be converted without loss (``round_states``: round moments into a
    narrower type instead)."""
    moment_keys, owner = _state_owner(optimizer)
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state_dict (it needs 'state' and 'param_groups')")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups ({len(saved_groups)}) than "
                         f"the optimizer ({len(groups)})")
    for i, (sg, g) in enumerate(zip(saved_groups, groups)):
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"loaded state dict contains a parameter group that doesn't match the size of "
                             f"optimizer's group: group {i} has {len(sg['params'])} parameters, the optimizer's "
                             f"{len(g['params'])}")
    notes: list[str] = []
    new_groups = [_convert_group(optimizer, i, sg, g, notes) for i, (sg, g) in enumerate(zip(saved_groups, groups))]

    owners = {pid: (p, sg, ng) for sg, ng, g in zip(saved_groups, new_groups, groups)
              for pid, p in zip(sg["params"], g["params"])}
    new_state: dict[Any, dict] = {}
    converted: dict[str, list[Any]] = {}
    for pid, st in state_dict["state"].items():  # in the state_dict's order, as torch loads it
        if pid not in owners:
            new_state[pid] = st  # torch.optim ignores state of ids no group names
            continue
        p, sg, ng = owners[pid]
        new_state[pid] = _convert_param_state(dict(st), p, pid, sg, ng, moment_keys, owner, round_states, converted)
    _assign_state8_streams(new_state)
    notes += [f"{what} ({len(pids)} parameters: {pids[:8]}{' ...' if len(pids) > 8 else ''})"
              for what, pids in converted.items()]
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["state"], out["param_groups"] = new_state, new_groups
    return out, notes


def _convert_group(optimizer: torch.optim.Optimizer, i: int, sg: dict, g: dict, notes: list[str]) -> dict:
    owner = type(optimizer).__name__
    missing = [k for k in optimizer.defaults if k not in sg and k not in STORAGE_KEYS and k not in _OPTIONAL_KEYS]
    if missing:
        raise ValueError(f"parameter group {i} of the state_dict has no {missing}: it is not the state of a "
                         f"{owner} (its keys: {sorted(k for k in sg if k != 'params')})")
    ng = dict(sg)
    if "decoupled_weight_decay" in ng:  # torch.optim.Adam / AdamW
        if not ng.pop("decoupled_weight_decay") and ng.get("weight_decay", 0) != 0:
            raise ValueError(f"parameter group {i} comes from torch.optim.Adam with weight_decay="
                             f"{ng['weight_decay']}: L2 decay added to the gradient, another algorithm than "
                             f"{owner}'s decoupled decay; resume it with torch.optim.Adam, or set its "
                             "weight_decay to 0 if the run is to continue as AdamW without decay")
    for k in _OPTIONAL_KEYS:
        if k in optimizer.defaults:
            ng.setdefault(k, False)
    for k in STORAGE_KEYS:
        if k in g:
            if k in ("mode", "rounding", "state_dtype") and k in sg and sg[k] != g[k]:
                notes.append(f"group {i}: {k} {sg[k]} -> {g[k]} (as the optimizer was constructed)")
            ng[k] = g[k]
        else:
            ng.pop(k, None)
    return ng


def _convert_param_state(st: dict, p: torch.Tensor, pid: Any, sg: dict, ng: dict, moment_keys: tuple[str, ...],
                         owner: str, round_states: bool, converted: dict[str, list[Any]]) -> dict:
    where = f"parameter {pid}"
    spec = spec_of(p)
    shape = tuple(p.shape)
    saved_cfg = sg.get("state_dtype")
    for k in moment_keys + ("master", "error"):
        v = st.get(k)
        low_bit = k in moment_keys and f"{k}_absmax" in st and isinstance(saved_cfg, BlockwiseState)
        want = saved_cfg.code_shape(shape) if low_bit else shape  # 4-bit codes: packed flat
        if isinstance(v, torch.Tensor) and tuple(v.shape) != want:
            raise ValueError(f"{where}: state {k!r} has shape {tuple(v.shape)}, expected {tuple(want)} for a parameter "
                             f"of shape {shape}: the state_dict belongs to another model or another parameter order")
    if "step" not in st:  # torch.optim.SGD keeps no step count
        st["step"] = torch.tensor(0.0)
    if not ng.get("amsgrad", False) and "max_exp_avg_sq" in st:
        del st["max_exp_avg_sq"]
        converted.setdefault("dropped AMSGrad's max_exp_avg_sq (the group has amsgrad=False)", []).append(pid)
    if ng.get("amsgrad", False) and "max_exp_avg_sq" not in st and "exp_avg_sq" in st:
        raise ValueError(f"{where}: the group has amsgrad=True but the state has no max_exp_avg_sq")

    # mode buffers
    need = MODE_BUFFERS.get(ng["mode"], ()) if spec is not None else ()
    for k in _ALL_BUFFERS:
        if k in st and k not in need:
            del st[k]
            if k != "comp_scale":
                converted.setdefault(f"dropped the {_BUFFER_NAMES[k]} (mode {ng['mode']!r} keeps none; the weights "
                                     "go on from their stored values)", []).append(pid)
    if need and need[0] not in st:
        if ng["mode"] == "master":
            st["master"] = _stored_weight(p)
            what = "created the fp32 master copy from the stored weights (mode 'master')"
        elif ng["mode"] == "exact":
            st["error"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            what = "created the carried error as zeros (mode 'exact')"
        else:
            codes, scale = quantize(torch.zeros(shape, device=p.device), spec)
            st["comp_codes"] = codes
            if scale is not None:
                st["comp_scale"] = scale
            what = "created the compensation as zeros (mode 'kahan')"
        converted.setdefault(what, []).append(pid)
    elif "comp_codes" in need:
        codes, scale = quantize(torch.zeros(shape, device=p.device), spec)
        if st["comp_codes"].shape != codes.shape or st["comp_codes"].dtype != codes.dtype:
            raise ValueError(f"{where}: the kahan compensation is stored as {st['comp_codes'].dtype} "
                             f"{tuple(st['comp_codes'].shape)}, the weight's format needs {codes.dtype} "
                             f"{tuple(codes.shape)}")

    if spec is None:
        return st  # dense parameters: their moments take the parameter's dtype (torch.optim's rule)
    target = ng.get("state_dtype", torch.float32)
    for k in moment_keys:
        v = st.get(k)
        if not isinstance(v, torch.Tensor):
            continue
        eight = v.dtype == torch.uint8 and f"{k}_absmax" in st
        if eight and isinstance(target, BlockwiseState) and isinstance(saved_cfg, BlockwiseState) and \
                target.nearest() == saved_cfg.nearest():
            continue  # the same 8/4-bit encoding (its rounding only says how later steps re-encode)
        if eight:
            if not isinstance(saved_cfg, BlockwiseState):
                raise ValueError(f"{where}: {k} is stored in 8 or 4 bits but its group records no State8bit / "
                                 "State4bit")
            x = dequantize_state(v, st[f"{k}_absmax"], k == "exp_avg", saved_cfg, shape)
        elif not v.dtype.is_floating_point:
            raise ValueError(f"{where}: state {k!r} has dtype {v.dtype}, not a floating-point moment")
        else:
            x = v
        if isinstance(target, BlockwiseState):
            if not round_states:
                raise ValueError(f"{where}: {owner} stores moments in {target.bits} bits ({target}); encoding the "
                                 f"state_dict's "
                                 f"{x.dtype} moments rounds them. Construct with state_dtype=torch.float32, or round "
                                 "them explicitly: ecoptim.optim.from_torch_state_dict(opt, sd, round_states=True)")
            st[k], st[f"{k}_absmax"] = quantize_state(x.to(torch.float32).contiguous(), k == "exp_avg",
                                                       target.nearest())
            converted.setdefault(f"rounded moments to {target.bits} bits ({target}, to nearest)", []).append(pid)
            continue
        if x.dtype == target:
            st[k] = x
            if eight:
                converted.setdefault(f"decoded {saved_cfg.bits}-bit moments to {target}", []).append(pid)
            continue
        if torch.finfo(x.dtype).bits < torch.finfo(target).bits or _fits_exactly(x, target):
            converted.setdefault(f"converted moments {x.dtype} -> {target} (exactly)", []).append(pid)
        elif round_states:
            converted.setdefault(f"rounded moments {x.dtype} -> {target}", []).append(pid)
        else:
            raise ValueError(f"{where}: the state_dict's {k} is {x.dtype} and {owner} keeps {target} moments for "
                             f"quantized weights: rounding them loses information. Construct with "
                             f"state_dtype={x.dtype}, or round them explicitly: "
                             "ecoptim.optim.from_torch_state_dict(opt, sd, round_states=True)")
        st[k] = x.to(target)
    if not isinstance(target, BlockwiseState):
        for key in _STATE8_KEYS:
            st.pop(key, None)
    return st


def _assign_state8_streams(state: dict[Any, dict]) -> None:
    """8-bit moments encoded here get stochastic-rounding stream numbers after those already in use."""
    used = [int(st["state8_stream"]) for st in state.values() if "state8_stream" in st]
    nxt = max(used, default=-1) + 1
    for st in state.values():
        if "exp_avg_absmax" in st and "state8_stream" not in st:
            st["state8_stream"] = torch.tensor(nxt, dtype=torch.int64)
            nxt += 1


def from_torch_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], *,
                          round_states: bool = False) -> None:
    """Load ``state_dict`` (torch.optim's or ecoptim's, any mode and state precision) into ``optimizer``,
    converting as the module docstring says; ``round_states=True`` allows rounding moments into a narrower
    state type (fp32 -> bf16 or 8 bits). Warns once, naming what was converted."""
    converted, notes = convert_state_dict(optimizer, state_dict, round_states=round_states)
    optimizer.load_state_dict(converted)  # nothing left to convert: no second warning
    if notes:
        warn_conversions(notes)


def _user_stacklevel() -> int:
    """The ``stacklevel`` (seen from the caller of this function) of the first frame outside ecoptim: a warning
    then points at the user's ``load_state_dict`` call, through any subclass overrides."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("ecoptim."):
        frame, level = frame.f_back, level + 1
    return level


def warn_conversions(notes: list[str]) -> None:
    """One UserWarning naming every conversion ``convert_state_dict`` made (``notes``)."""
    warnings.warn("ecoptim: the loaded optimizer state was converted to the optimizer's settings:\n  "
                  + "\n  ".join(notes), UserWarning, stacklevel=_user_stacklevel())


def _torch_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    cls = getattr(optimizer, "torch_class", None)
    if cls is None:
        raise TypeError(f"{type(optimizer).__name__} has no torch.optim counterpart (torch_class)")
    return cls([torch.zeros(1, 1)]).defaults  # 2-D: torch.optim.Muon takes matrices only


def to_torch_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state as the matching torch.optim class (``torch_class``: ``torch.optim.AdamW`` /
    ``SGD``) saves it, for ``torch_optimizer.load_state_dict``: moments as torch keeps them (8-bit ones decoded
    to fp32, the values ecoptim used), torch's group keys. What torch.optim has no place for (ecoptim's mode,
    rounding and state precision, master copies, carried errors, compensations, RNG state) is left out, with a
    warning when that is a buffer."""
    moment_keys, _ = _state_owner(optimizer)
    defaults = _torch_defaults(optimizer)
    sd = optimizer.state_dict()
    keep_step = "step" in getattr(optimizer, "torch_state_keys", ())
    groups, cfgs, shapes = [], {}, {}
    for g, live in zip(sd["param_groups"], optimizer.param_groups):
        shapes.update({pid: p.shape for pid, p in zip(g["params"], live["params"])})
        ng = {k: v for k, v in g.items() if k not in ("mode", "rounding", "state_dtype")}
        for k, v in defaults.items():
            ng.setdefault(k, v)
        ng["fused"] = None  # ecoptim's flag names its own kernel; torch's would ask for torch's fused kernel
        groups.append(ng)
        cfgs.update({pid: g.get("state_dtype") for pid in g["params"]})
    state, dropped = {}, set()
    for pid, st in sd["state"].items():
        ns = {}
        for k, v in st.items():
            if k in moment_keys:
                if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and f"{k}_absmax" in st:
                    v = dequantize_state(v, st[f"{k}_absmax"], k == "exp_avg", cfgs[pid], shapes[pid])
                ns[k] = v
            elif k == "step":
                if keep_step:
                    ns[k] = v
            elif k in _ALL_BUFFERS:
                dropped.add(_BUFFER_NAMES[k])
            elif k not in _STATE8_KEYS:
                dropped.add(k)
        state[pid] = ns
    if dropped:
        warnings.warn(f"ecoptim: to_torch_state_dict leaves out what torch.optim has no place for: "
                      f"{sorted(dropped)} (a 'master' run's fp32 master copy is the true weight: export it as the "
                      "model's weights if it is to be kept)", UserWarning, stacklevel=_user_stacklevel())
    return {"state": state, "param_groups": groups}
