"""``quantize_(model, ...)``: turn selected weights of a model into quantized storage, in place."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .codec import check_weight, dequantize, quantize
from .formats import Format, Granularity, QuantSpec
from .qtensor import QuantizedTensor
from .rounding import check_rounding

__all__ = ["quantize_", "default_filter", "spec_of", "is_quantized"]

#: Last name components that mark an output head (kept in high precision, as in the paper).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "score"})
_SPEC_ATTR = "_ecoptim_spec"


def spec_of(p: torch.Tensor) -> QuantSpec | None:
    """The QuantSpec of a quantized parameter (real or fake), or None for a plain one."""
    if isinstance(p, QuantizedTensor):
        return p.spec
    return getattr(p, _SPEC_ATTR, None)


def is_quantized(p: torch.Tensor) -> bool:
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


@torch.no_grad()
def quantize_(model: nn.Module, format: str | Format = "fp8_e4m3", granularity: str | int | Granularity | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, mode: str = "real",
              rounding: str = "nearest", generator: torch.Generator | None = None) -> nn.Module:
    """Quantize the ``weight`` of every module selected by ``filter_fn(module, fqn)``, in place.

    mode="real": the weight becomes an ``nn.Parameter`` wrapping a ``QuantizedTensor`` (codes + scales);
    mode="fake": the weight stays a dense parameter whose values are restricted to the grid (same values,
    bit for bit, as real mode dequantizes to), tagged with its spec so ecoptim optimizers re-quantize it.
    The model's own forward code is unchanged. Returns ``model``.
    """
    spec = QuantSpec.make(format, granularity)
    if mode not in ("real", "fake"):
        raise ValueError(f"unknown mode {mode!r}; use 'real' (low-bit storage) or 'fake' (fp grid values)")
    check_rounding(rounding)
    fn = filter_fn or default_filter(model)
    selected = [(fqn, m) for fqn, m in model.named_modules()
                if fn(m, fqn) and isinstance(getattr(m, "weight", None), torch.Tensor) and not is_quantized(m.weight)]
    for fqn, m in selected:  # validate everything before touching anything
        try:
            check_weight(m.weight, spec)
        except ValueError as e:
            raise ValueError(f"{fqn}.weight: {e}") from None
    for fqn, m in selected:
        w = m.weight
        if mode == "real":
            q = QuantizedTensor.from_float(w.detach(), spec, rounding, generator)
            m.weight = nn.Parameter(q, requires_grad=w.requires_grad)
        else:
            codes, scale = quantize(w, spec, rounding, generator)
            w.copy_(dequantize(codes, scale, spec, w.shape, w.dtype))
            setattr(w, _SPEC_ATTR, spec)
    return model
