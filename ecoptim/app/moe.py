"""The paper's Mixture-of-Experts fine-tune in miniature: ``ecoptim finetune --arch qwen3-moe``.

The paper fine-tunes DeepSeek-MoE-16B with INT4 weights: naive master-weight removal diverges with RTN and SR,
ECO matches master weights. Here a small ``transformers`` Qwen3-MoE (experts fused into 3-D parameters
[E, out, in], a top-k router) is pre-trained dense on the embedded corpus, its experts are cast to INT4 (one
scale per expert row by default) and every method fine-tunes it on a second corpus with the paper's AdamW
recipe (``train.py``); attention, router, norms, embeddings and head stay dense and train with master weights.
The table and plots are those of ``ecoptim finetune`` (``cli.write_outputs``).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..convert import default_filter, quantize_
from ..memory import memory_report
from ..optim import AdamW, State8bit
from .corpus import eval_batches, get_batch
from .train import (BETAS, DENSE, EPS, GRAD_CLIP, WEIGHT_DECAY, Corpus, Method, RunResult, default_threads,
                    evaluate, load_corpus, lr_lambda, resolve_methods)

__all__ = ["ARCHS", "MoeConfig", "MoeLM", "is_expert_weight", "moe_train_run", "add_moe_args", "run_moe_finetune"]

#: ``--arch`` choices: the app's own Llama (``model.py``) and transformers' Qwen3-MoE.
ARCHS = ("llama", "qwen3-moe")
#: INT4 scales of the experts: one per expert output row (the paper's per-tensor INT4 would share one scale
#: across all experts of a layer; pass --granularity tensor for it).
MOE_GRANULARITY = "row"


@dataclass(frozen=True)
class MoeConfig:
    """A small byte-level Qwen3-MoE: every layer's MLP is ``num_experts`` SwiGLU experts, ``top_k`` per token."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    expert_hidden: int = 64
    num_experts: int = 4
    top_k: int = 2
    max_seq_len: int = 64
    vocab_size: int = 256

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must divide d_model {self.d_model} and be a multiple of "
                             f"n_kv_heads {self.n_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "qwen3-moe", **asdict(self)}


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
            tie_word_embeddings=False)
        self.lm = transformers.Qwen3MoeForCausalLM(hf)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.lm(input_ids=x).logits
        loss = None if y is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_expert_weight(model: nn.Module) -> Callable[[nn.Module, str, str], bool]:
    """``quantize_`` filter: the experts' 3-D weights only (what the paper's MoE fine-tune stores in INT4)."""
    base = default_filter(model)

    def fn(module: nn.Module, fqn: str, name: str) -> bool:
        p = module._parameters.get(name)
        return p is not None and p.ndim >= 3 and base(module, fqn, name)

    return fn


def _build(method: Method, cfg: MoeConfig, seed: int, lr: float, init_state: dict[str, torch.Tensor] | None,
           state_dtype: torch.dtype | State8bit) -> tuple[MoeLM, AdamW]:
    torch.manual_seed(seed)
    model = MoeLM(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    if not method.dense:
        quantize_(model, method.format, method.granularity, filter_fn=is_expert_weight(model))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = AdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                mode="master" if method.dense else method.mode, rounding=method.rounding, seed=seed,
                nonfinite="skip", state_dtype=state_dtype)
    return model, opt


def moe_train_run(method: Method, cfg: MoeConfig, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
                  data: Corpus, progress: bool = True, *, eval_every: int = 50, eval_batches_n: int = 8,
                  final_eval_batches_n: int = 32, init_state: dict[str, torch.Tensor] | None = None,
                  max_nonfinite: int = 10, threads: int | None = None, keep_state: bool = False,
                  state_dtype: torch.dtype | State8bit = torch.float32) -> RunResult:
    """``train.train_run`` for the MoE: the same recipe, batches, divergence rule and measurements."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    diverge_loss = math.log(cfg.vocab_size) + 1.0
    t_start = time.perf_counter()
    model, opt = _build(method, cfg, seed, lr, init_state, state_dtype)
    sched = LambdaLR(opt, lr_lambda(steps))
    gen = torch.Generator().manual_seed(seed)
    val_small = list(eval_batches(data.val, batch_size, seq_len, eval_batches_n))
    val_final = list(eval_batches(data.val, batch_size, seq_len, final_eval_batches_n))

    def finite(v: float) -> float | None:
        return v if math.isfinite(v) else None

    initial = evaluate(model, val_small)
    val_curve: list[tuple[int, float | None]] = [(0, finite(initial))]
    train_curve: list[tuple[int, float | None]] = []
    ema: float | None = None
    nonfinite_run, status, diverged_at, report = 0, "ok", None, None
    train_time, steps_done = 0.0, 0
    from tqdm.auto import tqdm  # the `app` extra, as in train.py
    bar = tqdm(total=steps, desc=f"{method.name:>14s}", disable=not progress, dynamic_ncols=True, leave=True)
    model.train()
    for step in range(1, steps + 1):
        x, y = get_batch(data.train, batch_size, seq_len, gen)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # torch's clip for every method, as train.py
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_time += time.perf_counter() - t0
        steps_done = step
        if report is None:
            report = memory_report(model, opt)
        lv = loss.detach().item()
        if math.isfinite(lv):
            nonfinite_run = 0
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        else:
            nonfinite_run += 1
        diverged = nonfinite_run >= max_nonfinite or (ema is not None and ema > diverge_loss and step > 1)
        if step % eval_every == 0 and step < steps and not diverged:
            v = evaluate(model, val_small)
            val_curve.append((step, finite(v)))
            train_curve.append((step, ema))
            diverged = not math.isfinite(v)
        if diverged:
            status, diverged_at = "diverged", step
            break
        bar.update(1)
    bar.close()
    val_curve.append((steps_done, finite(evaluate(model, val_small))))
    final = evaluate(model, val_final)
    if status == "ok" and not math.isfinite(final):
        status, diverged_at = "diverged", steps_done
    train_curve.append((steps_done, ema))
    assert report is not None
    return RunResult(
        method=method.name, label=method.label, format=method.format, granularity=method.granularity,
        mode=None if method.dense else method.mode, rounding=None if method.dense else method.rounding,
        steps=steps, steps_done=steps_done, status=status, final_val_loss=finite(final),
        initial_val_loss=finite(initial), final_train_loss=ema, val_curve=val_curve, train_curve=train_curve,
        bytes_per_param=report.bytes_per_param, total_bytes=report.total_bytes, numel=report.numel,
        tokens_per_s=steps_done * batch_size * seq_len / max(train_time, 1e-9),
        wall_s=time.perf_counter() - t_start, skipped_steps=opt.skipped_steps, threads=threads,
        diverged_at=diverged_at,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()} if keep_state else None)


def add_moe_args(p: argparse.ArgumentParser) -> None:
    """``--arch`` and the MoE's own sizes, added to ``ecoptim finetune``."""
    g = p.add_argument_group("architecture (--arch qwen3-moe: a transformers Qwen3-MoE; --d-model, --n-layers, "
                             "--n-heads, --ffn-hidden (per expert) and --max-seq-len size it, the preset does not)")
    g.add_argument("--arch", default="llama", choices=ARCHS,
                   help="model: the app's Llama (default) or a transformers Qwen3-MoE whose experts are quantized")
    g.add_argument("--experts", type=int, default=MoeConfig.num_experts, help="experts per MoE layer (default 4)")
    g.add_argument("--top-k", type=int, default=MoeConfig.top_k, help="experts per token (default 2)")


def _moe_config(args: argparse.Namespace) -> MoeConfig:
    d = MoeConfig()
    return MoeConfig(d_model=args.d_model or d.d_model, n_layers=args.n_layers or d.n_layers,
                     n_heads=args.n_heads or d.n_heads, n_kv_heads=min(d.n_kv_heads, args.n_heads or d.n_heads),
                     expert_hidden=args.ffn_hidden or d.expert_hidden, num_experts=args.experts, top_k=args.top_k,
                     max_seq_len=max(args.max_seq_len or d.max_seq_len, args.seq_len))


def run_moe_finetune(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     state_dtype: torch.dtype | State8bit) -> tuple[dict[str, Any], list[RunResult], str, float]:
    """``finetune --arch qwen3-moe``: pre-train the dense MoE, then fine-tune every method from it (AdamW moments
    of the experts in ``state_dtype``). Returns (config, results, title, wall seconds) for ``cli`` to write."""
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.checkpoint is not None or args.save_checkpoint is not None:
        parser.error("--checkpoint / --save-checkpoint hold the Llama model; --arch qwen3-moe pre-trains its own "
                     "MoE each run (--pretrain-steps)")
    try:
        cfg = _moe_config(args)
        methods = resolve_methods([s for s in args.methods.split(",") if s.strip()], args.format,
                                  args.granularity if args.granularity is not None else MOE_GRANULARITY)
        probe = MoeLM(cfg)
        for m in methods:  # a granularity that does not fit the experts fails here, not after pre-training
            if not m.dense:
                quantize_(MoeLM(cfg), m.format, m.granularity, filter_fn=is_expert_weight(probe))
    except ValueError as e:
        parser.error(str(e))
    kw = dict(eval_every=args.eval_every, eval_batches_n=args.eval_batches, final_eval_batches_n=4 * args.eval_batches,
              threads=args.threads)
    steps = args.pretrain_steps or 300
    say(f"pre-training a dense {probe.num_params() / 1e6:.2f}M-param Qwen3-MoE ({cfg.num_experts} experts, top "
        f"{cfg.top_k}) on {args.pretrain_corpus} for {steps} steps")
    t0 = time.perf_counter()
    pre = moe_train_run(DENSE, cfg, steps, args.batch_size, args.seq_len, args.pretrain_lr, args.seed,
                        load_corpus(args.pretrain_corpus), not args.quiet, keep_state=True, **kw)
    if pre.status != "ok" or pre.state_dict is None:
        parser.exit(1, f"pre-training diverged (val loss {pre.final_val_loss}); lower --pretrain-lr\n")
    data = load_corpus(args.corpus)
    results = [moe_train_run(m, cfg, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, data,
                             not args.quiet, init_state=pre.state_dict, state_dtype=state_dtype, **kw)
               for m in methods]
    wall = time.perf_counter() - t0
    quantized = next((m for m in methods if not m.dense), None)
    config = {"model": cfg.to_dict(), "params": probe.num_params(), "methods": [m.name for m in methods],
              "format": quantized.format if quantized else None,
              "granularity": quantized.granularity if quantized else None, "quantized": "experts",
              "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "peak_lr": args.lr,
              "seed": args.seed, "state_dtype": args.state_dtype, "eval_every": args.eval_every,
              "eval_batches": args.eval_batches, "final_eval_batches": 4 * args.eval_batches, "corpus": args.corpus,
              "source": {"pretrain_steps": steps, "pretrain_lr": args.pretrain_lr,
                         "pretrain_corpus": args.pretrain_corpus, "pretrain_val_loss": pre.final_val_loss},
              "optimizer": {"betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                            "schedule": "10% linear warm-up from 0.01x peak, cosine to 0.1x peak"}}
    title = (f"fine-tune {probe.num_params() / 1e6:.2f}M-param Qwen3-MoE ({cfg.num_experts} experts, top {cfg.top_k}) "
             f"on {args.corpus}: experts in {config['format']}/{config['granularity']}, {args.steps} steps x "
             f"{args.batch_size}x{args.seq_len} bytes, peak lr {args.lr:g}")
    return config, results, title, wall

