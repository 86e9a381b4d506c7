"""``quantize_(model, ...)``: turn selected weights of a model into quantized storage, in place.

    quantize_(model, QuantConfig("fp8_e4m3", "row"))        # a config object, checked when it is built
    quantize_(model, "fp8_e4m3", "row")                     # the same with plain names
    quantize_(model, "int4", "group32", storage="fake")     # dense fp32 weights restricted to the INT4 grid
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .codec import check_weight, dequantize, quantize
from .formats import Format, Granularity, QuantSpec, get_format, get_granularity, with_in_dim
from .qtensor import QuantizedTensor
from .rounding import check_rounding

__all__ = ["quantize_", "QuantConfig", "STORAGES", "Storage", "default_filter", "spec_of", "is_quantized",
           "QuantizeReport", "QuantizeEntry", "ParamFilter", "ModuleFilter", "infer_in_dim", "is_conv1d",
           "HEAD_NAMES", "ROUTER_NAMES"]

Storage = Literal["real", "fake"]
#: How ``quantize_`` keeps a quantized weight: low-bit codes + scales, or fp values on the grid.
STORAGES = ("real", "fake")


@dataclass(frozen=True, init=False)
class QuantConfig:
    """What ``quantize_`` turns each selected weight into: a number format and a scale granularity.

    ``format`` takes a name (``"fp8_e4m3"``, ``"fp8"``, ``"int4"``, ...) or a ``Format``; ``granularity`` takes
    ``"tensor" | "row" | "group<G>" | G | "none"`` or a ``Granularity``, and None picks the format's default
    (per-row for FP8/INT, unscaled for BF16/FP16/FP32). Both are resolved and checked here, so a bad name
    fails when the config is built, not inside ``quantize_``; equal configs compare equal whichever spelling
    built them (``QuantConfig("fp8", "row") == QuantConfig(FP8_E4M3, PerRow())``).
    """

    format: Format
    granularity: Granularity

    def __init__(self, format: str | Format = "fp8_e4m3", granularity: str | int | Granularity | None = None):
        try:
            fmt = get_format(format)
            gran = get_granularity(granularity, fmt)
        except ValueError as e:
            raise ValueError(f"QuantConfig: {e}") from None
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "granularity", gran)

    @property
    def spec(self) -> QuantSpec:
        """The same format and granularity as the ``QuantSpec`` that quantized tensors carry."""
        return QuantSpec(self.format, self.granularity)

    def __str__(self) -> str:
        return str(self.spec)


#: Last name components that mark an output head (kept in high precision, as in the paper).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "score"})
#: Name components that mark a Mixture-of-Experts router (kept in high precision: it picks the experts, and its
#: weight is small). "gate" alone: Qwen-/Mixtral-/OLMoE-style ``mlp.gate``; "gate_proj" is a projection.
ROUTER_NAMES = frozenset({"router", "gate", "shared_expert_gate", "moe_gate"})
_SPEC_ATTR = "_ecoptim_spec"

#: ``filter_fn(module, module_fqn, param_name) -> bool``: selects one parameter of one module.
ParamFilter = Callable[[nn.Module, str, str], bool]
#: ``filter_fn(module, module_fqn) -> bool``: selects the module's ``weight`` (the original signature).
ModuleFilter = Callable[[nn.Module, str], bool]


def spec_of(p: torch.Tensor) -> QuantSpec | None:
    """The QuantSpec of a quantized parameter (real or fake), or None for a plain one."""
    if isinstance(p, QuantizedTensor):
        return p.spec
    return getattr(p, _SPEC_ATTR, None)


def is_quantized(p: torch.Tensor) -> bool:
    """True for a parameter that ``quantize_`` converted (real or fake storage)."""
    return spec_of(p) is not None


def is_conv1d(module: nn.Module) -> bool:
    """A transformers-style ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out), recognised by
    its class name and its ``nf`` (out features) attribute, so that ecoptim does not import transformers."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == module.nf)


def infer_in_dim(module: nn.Module, name: str, p: torch.Tensor) -> int | None:
    """Which dims a row of ``module.<name>`` runs along (``ecoptim.formats.IN_DIMS``), from the module's kind:

    - ``nn.Linear`` [out, in], conv kernels [out, in, ...]: None (dim 0 is the output channel);
    - a ``Conv1D`` weight [in, out]: -2 (one scale per output column);
    - any other parameter with 3 or more dims, e.g. a stack of expert weights [E, out, in]: -1, so every
      expert's every output row gets its scale; -2 ([E, in, out]) when the module says its experts are stored
      transposed (transformers' ``is_transposed``, set by ``use_experts_implementation(is_transposed=True)``).
    """
    if isinstance(module, (nn.Linear, nn.Embedding, _ConvNd)):
        return None
    if name == "weight" and is_conv1d(module):
        return -2
    if p.ndim >= 3:
        return -2 if getattr(module, "is_transposed", False) is True else -1
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _is_router(fqn: str) -> bool:
    return any(part in ROUTER_NAMES or part.endswith("_router") for part in fqn.split("."))


@dataclass(frozen=True)
class _ModelFacts:
    emb_weights: frozenset[int]
    vocab_sizes: frozenset[int]   # out features that mark a head
    heads: frozenset[int]         # ids of the modules the model names as its output embeddings

    @staticmethod
    def of(model: nn.Module) -> "_ModelFacts":
        embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        head = None
        get_head = getattr(model, "get_output_embeddings", None)  # transformers' models name their LM head
        if callable(get_head):
            try:
                head = get_head()
            except (AttributeError, NotImplementedError):
                head = None
        if isinstance(head, nn.Module):
            # the model names its head, so the vocabulary-size guess (which small position or relative-bias
            # embeddings fool) is not needed
            return _ModelFacts(frozenset(id(m.weight) for m in embs), frozenset(), frozenset({id(head)}))
        return _ModelFacts(frozenset(id(m.weight) for m in embs), frozenset(m.num_embeddings for m in embs),
                           frozenset())


def _default_choice(facts: _ModelFacts, module: nn.Module, fqn: str, name: str) -> tuple[bool, str]:
    """(selected, why): the default filter's decision on ``module.<name>`` and its reason."""
    p = module._parameters.get(name)
    if p is None or not p.is_floating_point():
        return False, "not a floating-point parameter"
    if isinstance(module, nn.Embedding) or id(p) in facts.emb_weights:
        return False, "embedding" if isinstance(module, nn.Embedding) else "tied to an embedding"
    if _is_router(fqn):
        return False, "router"
    if fqn.rsplit(".", 1)[-1] in HEAD_NAMES or id(module) in facts.heads:
        return False, "output head"
    if p.ndim < 2:
        return False, "norm" if _is_norm(module) else "bias" if name == "bias" else "vector"
    if isinstance(module, nn.Linear) or (name == "weight" and is_conv1d(module)):
        if name != "weight":
            return False, "not a weight"
        out_features = module.out_features if isinstance(module, nn.Linear) else p.shape[1]
        if out_features in facts.vocab_sizes:
            return False, "output head"
        return True, "projection"
    if isinstance(module, _ConvNd):
        return False, "convolution"
    if isinstance(module, nn.MultiheadAttention) and name.endswith("proj_weight"):
        return True, "projection"  # in_proj_weight [3E, E] and q/k/v_proj_weight: used as F.linear weights
    if p.ndim >= 3:
        return True, "expert weights"
    return False, "2-D parameter of a module ecoptim does not know the layout of"


def default_filter(model: nn.Module) -> Callable[..., bool]:
    """The paper's choice, extended to transformers' models: every projection and every expert weight, not
    the embeddings, the LM head, norms or MoE routers. ``fn(module, fqn, param_name="weight") -> bool``.

    Selected: the weight of every ``nn.Linear`` and transformers ``Conv1D``, the input projections of
    ``nn.MultiheadAttention``, and every parameter with 3 or more dims of any other module but a convolution
    (stacked experts, e.g. ``mlp.experts.gate_up_proj``).
    Kept in high precision: ``nn.Embedding`` weights and weights tied to one; heads (a module named as in
    ``HEAD_NAMES``, or projecting onto a vocabulary: out features == some embedding's ``num_embeddings``);
    routers (a name component in ``ROUTER_NAMES``, e.g. ``mlp.gate``, ``router.classifier``); norms; biases
    and other vectors; 2-D parameters of other modules (their layout is unknown: ``quantize_`` warns).
    """
    facts = _ModelFacts.of(model)

    def fn(module: nn.Module, fqn: str, name: str = "weight") -> bool:
        return _default_choice(facts, module, fqn, name)[0]

    return fn


def _takes_param_name(fn: Callable) -> bool:
    # a filter of three positional parameters is a ParamFilter; two: the original ModuleFilter
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


@dataclass(frozen=True)
class QuantizeEntry:
    """One parameter ``quantize_`` looked at: its name, shape, dense bytes, and what became of it."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int                      # dense bytes before quantization
    spec: str | None                 # the QuantSpec it got (None: left as it was)
    reason: str                      # why it was selected or skipped


@dataclass
class QuantizeReport:
    """What ``quantize_(..., report=r)`` selected and skipped: pass an empty report and read it afterwards.

    ``selected`` / ``skipped`` list every parameter of the model once (a tied parameter under its first name).
    """

    selected: list[QuantizeEntry] = field(default_factory=list)
    skipped: list[QuantizeEntry] = field(default_factory=list)

    @property
    def selected_numel(self) -> int:
        return sum(e.numel for e in self.selected)

    @property
    def skipped_numel(self) -> int:
        return sum(e.numel for e in self.skipped)

    @property
    def selected_bytes(self) -> int:
        return sum(e.nbytes for e in self.selected)

    @property
    def skipped_bytes(self) -> int:
        return sum(e.nbytes for e in self.skipped)

    @property
    def fraction_quantized(self) -> float:
        """Share of the model's parameters (elements) that were quantized."""
        return self.selected_numel / max(self.selected_numel + self.skipped_numel, 1)

    def summary(self) -> str:
        """One line: counts, elements and bytes on each side."""
        return (f"quantized {len(self.selected)} parameters ({self.selected_numel} elements, "
                f"{self.selected_bytes} dense bytes, {self.fraction_quantized:.1%} of the elements); "
                f"left dense {len(self.skipped)} ({self.skipped_numel} elements, {self.skipped_bytes} bytes)")

    def table(self) -> str:
        """Every parameter with its fate, then ``summary()``."""
        rows = [f"{'parameter':48s} {'shape':>18s} {'numel':>10s} {'bytes':>10s}  result"]
        for e in self.selected + self.skipped:
            fate = f"{e.spec} ({e.reason})" if e.spec else f"dense: {e.reason}"
            rows.append(f"{e.name[:48]:48s} {str(e.shape)[:18]:>18s} {e.numel:10d} {e.nbytes:10d}  {fate}")
        rows.append(self.summary())
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()


def quantize_(model: nn.Module, format: QuantConfig | str | Format = "fp8_e4m3",
              granularity: str | int | Granularity | None = None,
              filter_fn: ParamFilter | ModuleFilter | None = None, storage: Storage | None = None,
              rounding: str = "nearest", generator: torch.Generator | None = None, *,
              mode: str | None = None, report: QuantizeReport | None = None) -> nn.Module:
    """Quantize every parameter selected by ``filter_fn``, in place.

    ``format``: a ``QuantConfig``, or a format name / ``Format`` with ``granularity`` beside it (the two spell
    the same thing: ``quantize_(m, QuantConfig("int4", "group32"))`` is ``quantize_(m, "int4", "group32")``).

    ``filter_fn``: ``fn(module, module_fqn, param_name) -> bool`` selects any parameter (``ParamFilter``, e.g.
    ``lambda m, fqn, name: name == "gate_up_proj"``); a function of two arguments ``fn(module, module_fqn)``
    selects that module's ``weight`` (``ModuleFilter``). It defaults to ``default_filter(model)``: every
    projection (``nn.Linear``, ``Conv1D``) and expert weight, not embeddings, heads, norms or routers.

    Per-row and per-group scales follow each parameter's layout (``infer_in_dim``): an ``nn.Linear`` weight
    [out, in] gets one scale per row, an expert stack [E, out, in] one per expert and output row (groups run
    along ``in``), a ``Conv1D`` weight [in, out] one per output column. A granularity given with its own
    ``in_dim`` (``PerRow(in_dim=-1)``, ``"row[in=-1]"``) is used as given.

    storage="real" (the default): the parameter becomes an ``nn.Parameter`` wrapping a ``QuantizedTensor``
    (codes + scales); storage="fake": it stays a dense parameter whose values are restricted to the grid (the
    same values, bit for bit, as real storage dequantizes to), tagged with its spec so ecoptim optimizers
    re-quantize it. ``mode=`` is the deprecated name of ``storage=``.

    ``rounding`` ("nearest" | "stochastic", with ``generator``) rounds the initial cast. ``report``: a
    ``QuantizeReport`` to fill with every parameter selected or skipped, with counts and bytes. Parameters
    left dense that the default filter cannot place (2-D parameters of unknown modules), or that a module
    filter cannot reach (parameters of 3 or more dims outside ``weight``), are named in a warning. Every
    argument and every selected parameter is checked before any is touched. The model's own forward code is
    unchanged. Returns ``model``.
    """
    if mode is not None:
        if storage is not None:
            raise ValueError(f"quantize_ got both storage={storage!r} and its deprecated alias mode={mode!r}; "
                             "pass storage= only")
        warnings.warn("quantize_(mode=...) is deprecated: use storage='real' | 'fake' (in ecoptim, mode= names "
                      "an optimizer's update rule)", DeprecationWarning, stacklevel=2)
        storage = mode  # type: ignore[assignment]
    if storage is None:
        storage = "real"
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; use 'real' (low-bit codes + scales) or 'fake' "
                         "(fp values on the grid)")
    if isinstance(format, QuantConfig):
        if granularity is not None:
            raise ValueError(f"quantize_ got a QuantConfig and granularity={granularity!r}; put the granularity "
                             f"in the config: QuantConfig({str(format.format)!r}, {granularity!r})")
        spec = format.spec
    else:
        spec = QuantSpec.make(format, granularity)
    check_rounding(rounding)
    if report is not None and not isinstance(report, QuantizeReport):
        raise ValueError(f"report must be a QuantizeReport to fill, got {type(report).__name__}")
    facts = _ModelFacts.of(model)
    by_param = filter_fn is None or _takes_param_name(filter_fn)
    explicit_layout = getattr(spec.granularity, "in_dim", None) is not None

    # every (module, name) holding each parameter, first holder first: a tied parameter is converted once and
    # the converted one put back in every holder
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for fqn, m in model.named_modules():
        for name, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((fqn, m, name))

    selected: list[tuple[str, torch.Tensor, QuantSpec, str]] = []
    skipped: list[tuple[str, torch.Tensor, str]] = []
    for places in holders.values():
        fqn, m, name = places[0]
        p = m._parameters[name]
        full = f"{fqn}.{name}" if fqn else name
        default_pick, why = _default_choice(facts, m, fqn, name)
        if is_quantized(p):
            skipped.append((full, p, "already quantized"))
            continue
        if filter_fn is None:
            pick = default_pick
        elif by_param:
            pick = any(filter_fn(hm, hfqn, hname) for hfqn, hm, hname in places)
        else:
            pick = any(hname == "weight" and filter_fn(hm, hfqn) for hfqn, hm, hname in places)
        if pick:
            p_spec = spec if explicit_layout else QuantSpec(spec.format, with_in_dim(
                spec.granularity, infer_in_dim(m, name, p)))
            selected.append((full, p, p_spec, why if default_pick else "selected by filter_fn"))
        elif default_pick and not by_param and why == "expert weights":
            skipped.append((full, p, "expert weights a module filter cannot select"))
        else:
            skipped.append((full, p, why if not default_pick else "not selected by filter_fn"))

    with torch.no_grad():
        for full, p, p_spec, _ in selected:  # validate everything before touching anything
            try:
                check_weight(p, p_spec)
            except ValueError as e:
                raise ValueError(f"{full}: {e}") from None
        for full, p, p_spec, _ in selected:
            if storage == "real":
                q = QuantizedTensor.from_float(p.detach(), p_spec, rounding, generator)
                new = nn.Parameter(q, requires_grad=p.requires_grad)
                for _, hm, hname in holders[id(p)]:
                    setattr(hm, hname, new)
            else:
                codes, scale = quantize(p, p_spec, rounding, generator)
                p.copy_(dequantize(codes, scale, p_spec, p.shape, p.dtype))
                setattr(p, _SPEC_ATTR, p_spec)

    unplaced = [(n, p) for n, p, why in skipped
                if why.startswith("2-D parameter") or why.startswith("expert weights a module filter")]
    if unplaced:
        nbytes = sum(p.numel() * p.element_size() for _, p in unplaced)
        names = ", ".join(n for n, _ in unplaced[:4]) + (", ..." if len(unplaced) > 4 else "")
        hint = ("a filter_fn(module, fqn) selects modules' .weight only: pass filter_fn(module, fqn, param_name) "
                "to select these" if not by_param else
                "their layout is unknown: select them with filter_fn(module, fqn, param_name) and a granularity "
                "whose in_dim fits, or leave them dense")
        warnings.warn(f"quantize_ leaves {len(unplaced)} parameters dense ({nbytes} bytes): {names}; {hint}",
                      UserWarning, stacklevel=2)
    if report is not None:
        report.selected.extend(QuantizeEntry(n, tuple(p.shape), p.numel(), p.numel() * p.element_size(), str(sp), why)
                               for n, p, sp, why in selected)
        report.skipped.extend(QuantizeEntry(n, tuple(p.shape), p.numel(), p.numel() * p.element_size(), None, why)
                              for n, p, why in skipped)
    return model
