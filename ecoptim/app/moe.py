"""The paper's Mixture-of-Experts fine-tune in miniature: ``ecoptim finetune --arch qwen3-moe``.

The paper fine-tunes DeepSeek-MoE-16B with INT4 weights: naive master-weight removal diverges with RTN and SR,
ECO matches master weights. Here a small ``transformers`` Qwen3-MoE (byte-level vocabulary of 256, experts fused
into 3-D parameters [E, out, in], a top-k router) is built from a config (nothing is downloaded), pre-trained
dense on the embedded corpus, its expert stacks are cast to INT4 and every method fine-tunes it with the paper's
AdamW recipe. Training, tables and plots are those of ``ecoptim finetune`` (``train.train_run``,
``cli.summarize`` / ``cli.write_outputs``); this module holds only the model and its quantization choice.

Attention, router, norms, embeddings and head stay dense (fp32, trained with master weights): the experts are
what the paper stores in INT4, and they hold most of an MoE's parameters.
"""
from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import QuantizeReport, default_filter, quantize_
from .train import Method

__all__ = ["ARCHS", "MOE_GRANULARITY", "MoeConfig", "MoeLM", "is_expert_weight", "add_arch_args",
           "moe_config_from_args", "check_quantizable", "quantized_summary"]

#: ``--arch`` choices: the app's own Llama (``model.py``) and transformers' Qwen3-MoE.
ARCHS = ("llama", "qwen3-moe")
#: INT4 scales of the experts. The paper's INT4 fine-tune keeps one scale per tensor, and DeepSeek-MoE stores each
#: expert as its own ``nn.Linear``, so every expert has its own scale there. A fused stack [E, out, in] cannot
#: express "one scale per expert"; its per-tensor scale would be shared by all E experts of a layer (an expert
#: with small weights would then lose its grid to the largest one). One scale per expert output row keeps the
#: experts' scales independent, as the paper's are, at E * out fp32 scales per stack (0.03 B/param at in = 128).
MOE_GRANULARITY = "row"


@dataclass(frozen=True)
class MoeConfig:
    """A small byte-level Qwen3-MoE: every layer's MLP is ``num_experts`` SwiGLU experts of width
    ``expert_hidden``, ``top_k`` of them per token. Defaults: 0.95M parameters, 83% of them in the experts."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    expert_hidden: int = 128
    num_experts: int = 8
    top_k: int = 2
    max_seq_len: int = 64
    vocab_size: int = 256

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must divide d_model {self.d_model} and be a multiple of "
                             f"n_kv_heads {self.n_kv_heads}; change --n-heads or --d-model")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"--top-k must be in [1, --experts={self.num_experts}], got {self.top_k}")

    @property
    def label(self) -> str:
        """How titles name the model."""
        return f"Qwen3-MoE ({self.num_experts} experts, top {self.top_k})"

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "qwen3-moe", **asdict(self)}

    def build(self) -> "MoeLM":
        """A freshly initialised model (from torch's global RNG, like ``LlamaLM``)."""
        return MoeLM(self)

    def quantize_filter(self, model: nn.Module) -> Callable[[nn.Module, str, str], bool]:
        """The parameters that a quantized method stores in low precision: ``is_expert_weight``."""
        return is_expert_weight(model)


class MoeLM(nn.Module):
    """``transformers.Qwen3MoeForCausalLM`` behind the app's model interface: ``forward(x, y) -> (logits, loss)``
    with ``y`` the next-byte targets (already shifted, as ``corpus.get_batch`` gives them)."""

    def __init__(self, cfg: MoeConfig) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as e:  # the Llama experiments do not need it
            raise ImportError("--arch qwen3-moe needs the `transformers` package: pip install transformers") from e
        self.cfg = cfg
        hf = transformers.Qwen3MoeConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.expert_hidden,
            moe_intermediate_size=cfg.expert_hidden, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_model // cfg.n_heads, num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.max_seq_len, use_cache=False,
            tie_word_embeddings=False,
            # the eager expert loop: the reference implementation, and the one whose w[e] dequantizes one expert
            experts_implementation="eager")
        self.lm = transformers.Qwen3MoeForCausalLM(hf)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.lm(input_ids=x).logits
        loss = None if y is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_expert_weight(model: nn.Module) -> Callable[[nn.Module, str, str], bool]:
    """``quantize_`` filter: what ``convert.default_filter`` selects, restricted to parameters of 3 or more dims
    (the fused expert stacks ``mlp.experts.gate_up_proj`` / ``down_proj``): the weights the paper's MoE fine-tune
    stores in INT4."""
    base = default_filter(model)

    def fn(module: nn.Module, fqn: str, name: str) -> bool:
        p = getattr(module, name, None)
        return isinstance(p, torch.Tensor) and p.ndim >= 3 and base(module, fqn, name)

    return fn


def add_arch_args(p: argparse.ArgumentParser) -> None:
    """``--arch`` and the MoE's own sizes, added to ``ecoptim finetune``."""
    g = p.add_argument_group("architecture (--arch qwen3-moe: a transformers Qwen3-MoE, its expert stacks in INT4 "
                             "one scale per expert row; --d-model, --n-layers, --n-heads, --ffn-hidden (per expert) "
                             "and --max-seq-len size it, --preset does not)")
    g.add_argument("--arch", default="llama", choices=ARCHS,
                   help="model: the app's Llama (default) or a transformers Qwen3-MoE whose experts are quantized")
    g.add_argument("--experts", type=int, default=MoeConfig.num_experts,
                   help=f"qwen3-moe: experts per MoE layer (default {MoeConfig.num_experts})")
    g.add_argument("--top-k", type=int, default=MoeConfig.top_k,
                   help=f"qwen3-moe: experts per token (default {MoeConfig.top_k})")


def moe_config_from_args(args: argparse.Namespace) -> MoeConfig:
    """The ``MoeConfig`` that ``--d-model``, ``--n-layers``, ``--n-heads``, ``--ffn-hidden``, ``--max-seq-len``,
    ``--experts`` and ``--top-k`` give (each left out: ``MoeConfig``'s default). Raises ValueError for bad sizes
    or when ``transformers`` is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("--arch qwen3-moe needs the `transformers` package: pip install transformers")
    d = MoeConfig()
    if args.experts < 1:
        raise ValueError(f"--experts must be >= 1, got {args.experts}")
    n_heads = args.n_heads or d.n_heads
    return MoeConfig(d_model=args.d_model or d.d_model, n_layers=args.n_layers or d.n_layers, n_heads=n_heads,
                     n_kv_heads=d.n_kv_heads if n_heads % d.n_kv_heads == 0 else n_heads,
                     expert_hidden=args.ffn_hidden or d.expert_hidden, num_experts=args.experts, top_k=args.top_k,
                     max_seq_len=args.max_seq_len or max(d.max_seq_len, args.seq_len))


def check_quantizable(cfg: MoeConfig, methods: Sequence[Method]) -> None:
    """Fail before pre-training (not after it) if a method's format or granularity does not fit the experts, or
    if a method is not an AdamW row (the Muon rows pick the Llama's block linears)."""
    for m in methods:
        if m.optimizer != "adamw":
            raise ValueError(f"method {m.name!r}: --arch qwen3-moe runs the AdamW rows only (fp32_mw and "
                             "[<format>_]<row>); drop the muon methods")
        if not m.dense:
            model = cfg.build()
            try:
                quantize_(model, m.format, m.granularity, filter_fn=is_expert_weight(model))
            except ValueError as e:
                raise ValueError(f"{m.name}: {e}") from None


def quantized_summary(cfg: MoeConfig, method: Method) -> dict[str, Any]:
    """Which parameters ``method`` stores quantized (names, spec, share of the model's elements), from a
    ``QuantizeReport`` of a fresh model: written to results.json so that the table's B/param can be read."""
    model = cfg.build()
    report = QuantizeReport()
    quantize_(model, method.format, method.granularity, filter_fn=is_expert_weight(model), report=report)
    return {"params": [e.name for e in report.selected], "specs": sorted({str(e.spec) for e in report.selected}),
            "numel": report.selected_numel, "fraction": report.fraction_quantized,
            "dense": [e.name for e in report.skipped]}
