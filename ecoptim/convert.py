"""``quantize_(model, ...)``: turn selected weights of a model into quantized storage, in place.

    quantize_(model, QuantConfig("fp8_e4m3", "row"))        # a config object, checked when it is built
    quantize_(model, "fp8_e4m3", "row")                     # the same with plain names
    quantize_(model, "int4", "group32", storage="fake")     # dense fp32 weights restricted to the INT4 grid
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .codec import check_weight, dequantize, quantize
from .formats import Format, Granularity, QuantSpec, get_format, get_granularity
from .qtensor import QuantizedTensor
from .rounding import check_rounding

__all__ = ["quantize_", "QuantConfig", "STORAGES", "Storage", "default_filter", "spec_of", "is_quantized"]

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
_SPEC_ATTR = "_ecoptim_spec"


def spec_of(p: torch.Tensor) -> QuantSpec | None:
    """The QuantSpec of a quantized parameter (real or fake), or None for a plain one."""
    if isinstance(p, QuantizedTensor):
        return p.spec
    return getattr(p, _SPEC_ATTR, None)


def is_quantized(p: torch.Tensor) -> bool:
    """True for a parameter that ``quantize_`` converted (real or fake storage)."""
    return spec_of(p) is not None


def default_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """The paper's choice: every ``nn.Linear`` weight except the LM head and embeddings.

    A Linear is treated as a head when its name ends in one of ``HEAD_NAMES``, when its weight is tied to an
    ``nn.Embedding``, or when it projects onto a vocabulary (out_features == some embedding's num_embeddings).
    """
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}

    def fn(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if fqn.rsplit(".", 1)[-1] in HEAD_NAMES or id(module.weight) in emb_weights:
            return False
        return module.out_features not in vocab_sizes

    return fn


def quantize_(model: nn.Module, format: QuantConfig | str | Format = "fp8_e4m3",
              granularity: str | int | Granularity | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, storage: Storage | None = None,
              rounding: str = "nearest", generator: torch.Generator | None = None, *,
              mode: str | None = None) -> nn.Module:
    """Quantize the ``weight`` of every module selected by ``filter_fn(module, fqn)``, in place.

    ``format``: a ``QuantConfig``, or a format name / ``Format`` with ``granularity`` beside it (the two spell
    the same thing: ``quantize_(m, QuantConfig("int4", "group32"))`` is ``quantize_(m, "int4", "group32")``).
    ``filter_fn`` defaults to ``default_filter(model)`` (every ``nn.Linear`` but heads and tied embeddings).

    storage="real" (the default): the weight becomes an ``nn.Parameter`` wrapping a ``QuantizedTensor``
    (codes + scales); storage="fake": the weight stays a dense parameter whose values are restricted to the
    grid (the same values, bit for bit, as real storage dequantizes to), tagged with its spec so ecoptim
    optimizers re-quantize it. ``mode=`` is the deprecated name of ``storage=``.

    ``rounding`` ("nearest" | "stochastic", with ``generator``) rounds the initial cast. Every argument and
    every selected weight is checked before any weight is touched. The model's own forward code is
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
    fn = filter_fn or default_filter(model)
    selected = [(fqn, m) for fqn, m in model.named_modules()
                if fn(m, fqn) and isinstance(getattr(m, "weight", None), torch.Tensor) and not is_quantized(m.weight)]
    with torch.no_grad():
        for fqn, m in selected:  # validate everything before touching anything
            try:
                check_weight(m.weight, spec)
            except ValueError as e:
                raise ValueError(f"{fqn}.weight: {e}") from None
        for fqn, m in selected:
            w = m.weight
            if storage == "real":
                q = QuantizedTensor.from_float(w.detach(), spec, rounding, generator)
                m.weight = nn.Parameter(q, requires_grad=w.requires_grad)
            else:
                codes, scale = quantize(w, spec, rounding, generator)
                w.copy_(dequantize(codes, scale, spec, w.shape, w.dtype))
                setattr(w, _SPEC_ATTR, spec)
    return model
