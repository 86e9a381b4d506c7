"""Command line: ``ecoptim compare`` (the paper's pre-training table) and ``ecoptim finetune`` (INT4 fine-tuning).

    ecoptim compare                                  # 7 methods, FP8 E4M3 per-row, ~10-15 min on 2 CPU cores
    ecoptim compare --format int4 --granularity group128 --methods fp32_mw,mw_sr,eco_sr
    ecoptim compare --save-checkpoint                # also keep the dense model for `finetune --checkpoint`
    ecoptim finetune --checkpoint runs/compare/checkpoint.pt
    ecoptim finetune --pretrain-steps 400            # pre-train a dense model first

Each command writes ``results.json``, ``results.md`` and PNG plots into ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import __version__
from ..formats import QuantSpec
from ..optim import State8bit
from .corpus import CORPORA
from .model import PRESETS, LlamaConfig, LlamaLM, is_block_linear
from .moe import add_moe_args, run_moe_finetune
from .plots import plot_loss_curves, plot_memory_vs_loss
from .train import (BETAS, EPS, GRAD_CLIP, METHODS, WEIGHT_DECAY, Method, RunResult, finetune, load_corpus,
                    pretrain, resolve_methods, train_run, usable_cores)

__all__ = ["main", "build_parser", "format_table", "write_outputs", "load_dense_model", "save_dense_model"]

# Defaults, calibrated on a 2-core CPU: the small preset (2.4M params) takes 0.25-0.45 s per 16x64-byte step
# (dense / quantized, 1-2 threads), so 7 methods x 300 steps plus evaluation is ~10-15 min. 300 steps already
# separate the methods clearly (naive RTN several % worse; ECO+SR within ~0.1-0.5% of MW+SR in pilots).
# Peak lr: a dense sweep at 300 steps gave val 1.996 / 2.002 / 2.018 for 8e-4 / 1.2e-3 / 2e-3, so the
# paper's 1.2e-3 is within 0.4% of the best and is kept.
COMPARE_STEPS = 300
BATCH_SIZE = 16
SEQ_LEN = 64
PEAK_LR = 1.2e-3
EVAL_EVERY = 30
# Fine-tuning: INT4 per-tensor from the 300-step dense model, on Milton. Pilots (lr 5e-4): ECO+SR was +1.3% /
# +0.55% from MW+SR after 150 / 300 steps; 200 steps keeps `finetune` at ~6-8 min including pre-training.
# Pre-training uses the compare defaults, so it reproduces `compare --save-checkpoint`'s dense model.
FINETUNE_STEPS = 200
FINETUNE_LR = 5e-4
PRETRAIN_STEPS = COMPARE_STEPS
FINETUNE_METHODS = "fp32_mw,mw_rtn,mw_sr,naive_rtn,naive_sr,eco_rtn,eco_sr"
DENSE_MODEL_KIND = "ecoptim-llama-checkpoint-v1"
# --state-dtype: how AdamW keeps the moments of the quantized weights
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": State8bit(),
                "8bit-sr": State8bit(rounding="stochastic")}


# --------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _granularity(s: str) -> str | int:
    """'row' | 'tensor' | 'group128' | '128' (a bare number is a group size)."""
    return int(s) if s.isdigit() else s


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model size (a preset, optionally overridden field by field; "
                             "`finetune --checkpoint` uses the checkpoint's own size instead)")
    g.add_argument("--preset", default="small", choices=sorted(PRESETS),
                   help="model preset: tiny ~115k params (tests), small ~2.4M (default), base ~10.8M")
    g.add_argument("--d-model", type=_positive_int, help="width")
    g.add_argument("--n-layers", type=_positive_int, help="transformer blocks")
    g.add_argument("--n-heads", type=_positive_int, help="attention heads (must divide --d-model)")
    g.add_argument("--ffn-hidden", type=_positive_int, help="SwiGLU hidden width")
    g.add_argument("--max-seq-len", type=_positive_int, help="longest sequence (RoPE table); default from preset")


def _add_run_args(p: argparse.ArgumentParser, *, steps: int, lr: float, methods: str, fmt: str | None,
                  out: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=steps, help=f"optimizer steps per method (default {steps})")
    g.add_argument("--batch-size", type=_positive_int, default=BATCH_SIZE,
                   help=f"sequences per step (default {BATCH_SIZE})")
    g.add_argument("--seq-len", type=_positive_int, default=SEQ_LEN, help=f"bytes per sequence (default {SEQ_LEN})")
    g.add_argument("--lr", type=_positive_float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--methods", default=methods,
                   help=f"comma-separated methods (default: {methods}); fp32_mw or [<format>_]<row>, rows: "
                        "mw_rtn, mw_sr, naive_rtn, naive_sr, eco_rtn, eco_sr")
    g.add_argument("--format", default=fmt,
                   choices=["fp8_e4m3", "fp8_e5m2", "int8", "int4", "mxfp8", "mxfp4", "nvfp4"],
                   help=f"storage format of the quantized rows (default {fmt or 'fp8_e4m3'})")
    g.add_argument("--granularity", type=_granularity, default=None,
                   help="scale granularity: row, tensor, group<G> or G (default: per-row for FP8/INT8, "
                        "per-tensor for INT4, as in the paper; group32 for MXFP8/MXFP4, group16 for NVFP4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batch order and SR (default 0)")
    g.add_argument("--state-dtype", choices=list(STATE_DTYPES), default="fp32",
                   help="AdamW moments of the quantized weights: fp32 (default), bf16 (-4 B/param), 8bit (8-bit "
                        "block-wise, round to nearest, -5.97 B/param) or 8bit-sr (the same with "
                        "stochastic rounding)")
    g.add_argument("--eval-every", type=_positive_int, default=EVAL_EVERY,
                   help=f"steps between validation-loss points (default {EVAL_EVERY})")
    g.add_argument("--eval-batches", type=_positive_int, default=8,
                   help="validation batches per curve point (the final loss uses 4x as many; default 8)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: the usable cores not already busy with other processes, "
                        "sampled at the start of each run)")
    g.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecoptim", description="Quantized training without master weights (ECO): reproduce the paper's "
                                    "comparisons on a small byte-level Llama model (CPU-friendly).")
    parser.add_argument("--version", action="version", version=f"ecoptim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compare,finetune}")

    c = sub.add_parser("compare", help="pre-train every method from the same init and compare (paper Table/Fig. 1)",
                       description="Pre-train one model per method on Shakespeare from the same initial weights "
                                   "and batches, then report final validation loss, memory and speed.")
    _add_model_args(c)
    _add_run_args(c, steps=COMPARE_STEPS, lr=PEAK_LR, methods=",".join(METHODS), fmt=None, out="runs/compare")
    c.add_argument("--corpus", default="shakespeare", choices=CORPORA, help="training corpus (default shakespeare)")
    c.add_argument("--save-checkpoint", nargs="?", const="", default=None, metavar="PATH",
                   help="save the dense fp32_mw model (default PATH: OUT/checkpoint.pt) for `finetune --checkpoint`")

    f = sub.add_parser("finetune", help="quantize a dense checkpoint to INT4 and fine-tune it on a second corpus",
                       description="Start every method from one dense checkpoint (loaded with --checkpoint, or "
                                   "pre-trained here for --pretrain-steps), cast it to INT4 and fine-tune on "
                                   "Milton; report validation loss before and after.")
    _add_model_args(f)
    _add_run_args(f, steps=FINETUNE_STEPS, lr=FINETUNE_LR, methods=FINETUNE_METHODS, fmt="int4",
                  out="runs/finetune")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="dense checkpoint written by `compare --save-checkpoint`")
    src.add_argument("--pretrain-steps", type=_positive_int, default=None,
                     help=f"pre-train a dense model for this many steps first (default {PRETRAIN_STEPS} "
                          "when no --checkpoint is given)")
    f.add_argument("--pretrain-lr", type=_positive_float, default=PEAK_LR,
                   help=f"pre-training peak lr (default {PEAK_LR:g})")
    f.add_argument("--pretrain-corpus", default="shakespeare", choices=CORPORA, help="(default shakespeare)")
    f.add_argument("--corpus", default="milton", choices=CORPORA, help="fine-tuning corpus (default milton)")
    f.add_argument("--save-checkpoint", nargs="?", const="", default=None, metavar="PATH",
                   help="save the pre-trained dense model (default PATH: OUT/pretrained.pt)")
    add_moe_args(f)
    return parser


def _model_config(args: argparse.Namespace) -> LlamaConfig:
    max_seq = args.max_seq_len if args.max_seq_len is not None else max(PRESETS[args.preset]["max_seq_len"],
                                                                         args.seq_len)
    return LlamaConfig.preset(args.preset, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                              ffn_hidden=args.ffn_hidden, max_seq_len=max_seq)


def _check_quantizable(cfg: LlamaConfig, methods: Sequence[Method]) -> None:
    """Fail before training (not after the dense run) if a granularity does not fit the model's shapes."""
    model = LlamaLM(cfg)  # cheap at these sizes (a meta-device model would pull in torch's compiler stack)
    for m in methods:
        if m.dense:
            continue
        spec = QuantSpec.make(m.format, m.granularity)
        for fqn, module in model.named_modules():
            if is_block_linear(module, fqn):
                try:
                    spec.granularity.validate(module.weight.shape)
                except ValueError as e:
                    raise ValueError(f"{m.name}: {fqn}.weight: {e}") from None


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[LlamaConfig, list[Method]]:
    try:
        cfg = _model_config(args)
        methods = resolve_methods([s for s in args.methods.split(",") if s.strip()], args.format, args.granularity)
        _check_quantizable(cfg, methods)
    except ValueError as e:
        parser.error(str(e))
    if args.seq_len > cfg.max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds --max-seq-len {cfg.max_seq_len}")
    return cfg, methods


# --------------------------------------------------------------------------------------------------------
# Dense model files (`compare --save-checkpoint` / `finetune --checkpoint`)
# --------------------------------------------------------------------------------------------------------

def save_dense_model(path: Path, cfg: LlamaConfig, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a dense (unquantized) model for ``finetune --checkpoint``: {'kind', 'config', 'model' (state_dict),
    'meta'}, loadable with ``weights_only=True``. Not an ``ecoptim.save_checkpoint`` file: no optimizer, no
    quantized weights, just what the app needs to rebuild the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": DENSE_MODEL_KIND, "config": cfg.to_dict(), "model": state_dict, "meta": meta}, path)


def load_dense_model(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by ``save_dense_model``: (model config, state_dict, meta). Raises ValueError for a
    missing file or one of another kind."""
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; create one with "
                         "`ecoptim compare --save-checkpoint` or use --pretrain-steps")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != DENSE_MODEL_KIND:
        raise ValueError(f"{str(path)!r} is not a dense model file written by `ecoptim compare "
                         "--save-checkpoint` (an ecoptim.save_checkpoint file is read by ecoptim.load_checkpoint)")
    return LlamaConfig.from_dict(ckpt["config"]), ckpt["model"], ckpt.get("meta", {})


# --------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    return {"torch": torch.__version__, "ecoptim": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cores": usable_cores()}


def _gap(loss: float | None, base: float | None) -> float | None:
    """Relative gap in percent (positive: worse than the baseline)."""
    if loss is None or base is None or base == 0:
        return None
    return 100.0 * (loss - base) / base


def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per method: losses and gaps to the dense baseline and to the same-format MW+SR row."""
    by_name = {r.method: r for r in results}
    dense = by_name.get("fp32_mw")
    base = dense.final_val_loss if dense is not None and dense.status == "ok" else None
    rows = []
    for r in results:
        mw_sr = next((o for o in results if o.format == r.format and o.granularity == r.granularity
                      and o.mode == "master" and o.rounding == "stochastic"), None)
        mw_sr_loss = mw_sr.final_val_loss if mw_sr is not None and mw_sr.status == "ok" else None
        rows.append({"method": r.method, "label": r.label, "initial_val_loss": r.initial_val_loss,
                     "final_val_loss": r.final_val_loss, "gap_vs_fp32_mw_pct": _gap(r.final_val_loss, base),
                     "gap_vs_mw_sr_pct": None if r.format is None else _gap(r.final_val_loss, mw_sr_loss),
                     "bytes_per_param": r.bytes_per_param, "tokens_per_s": r.tokens_per_s,
                     "skipped_steps": r.skipped_steps, "status": r.status, "wall_s": r.wall_s})
    return rows


def _fmt(v: float | None, spec: str, none: str = "n/a", suffix: str = "") -> str:
    return none if v is None else format(v, spec) + suffix


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False, before: bool = False) -> str:
    """The results table as fixed-width text (or markdown). ``before`` adds the loss before training."""
    head = ["method", "description"] + (["val before"] if before else []) + [
        "val loss", "gap vs fp32 MW", "gap vs MW+SR", "B/param", "tok/s", "skipped", "status"]
    body = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}"
        body.append([r["method"], r["label"]] + ([_fmt(r["initial_val_loss"], ".4f")] if before else []) + [
            _fmt(r["final_val_loss"], ".4f", "-"), _fmt(r["gap_vs_fp32_mw_pct"], "+.2f", suffix="%"),
            _fmt(r["gap_vs_mw_sr_pct"], "+.2f", "-", "%"), f"{r['bytes_per_param']:.2f}", f"{r['tokens_per_s']:.0f}",
            str(r["skipped_steps"]), status])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    right = {i for i in range(len(head)) if i >= 2}
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(row) for row in body])


def _json_safe(x: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(out: Path, command: str, config: dict[str, Any], results: Sequence[RunResult],
                  rows: Sequence[dict[str, Any]], title: str, before: bool = False,
                  extra: dict[str, Any] | None = None) -> list[Path]:
    """results.json, results.md, memory_vs_loss.png, loss_curves.png; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "config": config, "machine": machine_info(), "summary": list(rows),
               "results": [r.to_dict() for r in results], **(extra or {})}
    (out / "results.json").write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    info = payload["machine"]
    wall = f"{extra['wall_s'] / 60:.1f} min, " if extra and "wall_s" in extra else ""
    md = [f"# ecoptim {command}", "", title, "", format_table(rows, markdown=True, before=before), "",
          "Losses: mean cross-entropy in nats per byte on the validation split. Gaps are relative "
          "(+ = worse). B/param: static memory (weights + scales + AdamW state) measured after step 1.",
          f"Run: {wall}torch {info['torch']}, {info['cpu_count']} CPUs, {info['platform']}.", ""]
    (out / "results.md").write_text("\n".join(md))
    plot_memory_vs_loss(results, out / "memory_vs_loss.png", title)
    plot_loss_curves(results, out / "loss_curves.png", title)
    return [out / n for n in ("results.json", "results.md", "memory_vs_loss.png", "loss_curves.png")]


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------

def _run_config(args: argparse.Namespace, cfg: LlamaConfig, methods: Sequence[Method]) -> dict[str, Any]:
    return {"model": cfg.to_dict(), "params": LlamaLM(cfg).num_params(), "methods": [m.name for m in methods],
            "format": next((m.format for m in methods if not m.dense), None),
            "granularity": next((m.granularity for m in methods if not m.dense), None),
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "peak_lr": args.lr,
            "seed": args.seed, "state_dtype": args.state_dtype, "eval_every": args.eval_every,
            "eval_batches": args.eval_batches,
            "final_eval_batches": 4 * args.eval_batches, "corpus": args.corpus,
            "optimizer": {"betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                          "schedule": "10% linear warm-up from 0.01x peak, cosine to 0.1x peak"}}


def _state_note(args: argparse.Namespace) -> str:
    return "" if args.state_dtype == "fp32" else f", {args.state_dtype} AdamW states"


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"eval_every": args.eval_every, "eval_batches_n": args.eval_batches,
            "final_eval_batches_n": 4 * args.eval_batches, "threads": args.threads,
            "state_dtype": STATE_DTYPES[args.state_dtype]}


def cmd_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cfg, methods = _resolve(parser, args)
    if args.save_checkpoint is not None and not any(m.dense for m in methods):
        parser.error("--save-checkpoint saves the dense fp32_mw model; include fp32_mw in --methods")
    data = load_corpus(args.corpus)
    config = _run_config(args, cfg, methods)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"ecoptim compare: {config['params'] / 1e6:.2f}M-param model {cfg.to_dict()}, {len(methods)} methods x "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} bytes, peak lr {args.lr:g}, corpus {args.corpus}")
    t0 = time.perf_counter()
    results = []
    for m in methods:
        keep = m.dense and args.save_checkpoint is not None
        r = train_run(m, cfg, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, data,
                      progress=not args.quiet, keep_state=keep, **_train_kwargs(args))
        if keep:
            path = Path(args.save_checkpoint) if args.save_checkpoint else args.out / "checkpoint.pt"
            save_dense_model(path, cfg, r.state_dict or {}, {"steps": args.steps, "corpus": args.corpus,
                                                             "final_val_loss": r.final_val_loss})
            r.state_dict = None
            say(f"saved dense checkpoint to {path}")
        results.append(r)
    wall = time.perf_counter() - t0
    rows = summarize(results)
    fmt = config["format"] or "-"
    title = (f"{config['params'] / 1e6:.2f}M-param Llama, {args.corpus}, {args.steps} steps x "
             f"{args.batch_size}x{args.seq_len} bytes, {fmt}/{config['granularity']}, peak lr {args.lr:g}"
             + _state_note(args))
    paths = write_outputs(args.out, "compare", config, results, rows, title, extra={"wall_s": wall})
    print(title)
    print(format_table(rows))
    print(f"total {wall / 60:.1f} min; wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_finetune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.arch != "llama":  # the MoE fine-tune (app/moe.py), written and printed as below
        config, results, title, wall = run_moe_finetune(parser, args, STATE_DTYPES[args.state_dtype])
        rows = summarize(results)
        paths = write_outputs(args.out, "finetune", config, results, rows, title, before=True, extra={"wall_s": wall})
        print(f"{title}\n{format_table(rows, before=True)}\ntotal {wall / 60:.1f} min; wrote "
              + ", ".join(str(p) for p in paths))
        return 0
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    pre_info: dict[str, Any]
    if args.checkpoint is not None:
        try:
            cfg, state, meta = load_dense_model(args.checkpoint)
        except ValueError as e:
            parser.error(str(e))
        if args.seq_len > cfg.max_seq_len:
            parser.error(f"--seq-len {args.seq_len} exceeds the checkpoint's max_seq_len {cfg.max_seq_len}")
        try:
            methods = resolve_methods([s for s in args.methods.split(",") if s.strip()], args.format,
                                      args.granularity)
            _check_quantizable(cfg, methods)
        except ValueError as e:
            parser.error(str(e))
        pre_info = {"checkpoint": str(args.checkpoint), "meta": meta}
    else:
        cfg, methods = _resolve(parser, args)
        steps = args.pretrain_steps or PRETRAIN_STEPS
        say(f"pre-training a dense {LlamaLM(cfg).num_params() / 1e6:.2f}M-param model on {args.pretrain_corpus} "
            f"for {steps} steps")
        pre = pretrain(cfg, steps, args.batch_size, args.seq_len, args.pretrain_lr, args.seed,
                       load_corpus(args.pretrain_corpus), progress=not args.quiet, **_train_kwargs(args))
        if pre.status != "ok" or pre.state_dict is None:
            print(f"pre-training diverged (val loss {pre.final_val_loss}); lower --pretrain-lr", file=sys.stderr)
            return 1
        state = pre.state_dict
        pre_info = {"pretrain_steps": steps, "pretrain_lr": args.pretrain_lr, "pretrain_corpus": args.pretrain_corpus,
                    "pretrain_val_loss": pre.final_val_loss}
        if args.save_checkpoint is not None:
            path = Path(args.save_checkpoint) if args.save_checkpoint else args.out / "pretrained.pt"
            save_dense_model(path, cfg, state, {"steps": steps, "corpus": args.pretrain_corpus,
                                               "final_val_loss": pre.final_val_loss})
            say(f"saved dense checkpoint to {path}")
    data = load_corpus(args.corpus)
    config = {**_run_config(args, cfg, methods), "source": pre_info}
    t0 = time.perf_counter()
    results = finetune(state, cfg, methods, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, data,
                       progress=not args.quiet, **_train_kwargs(args))
    wall = time.perf_counter() - t0
    rows = summarize(results)
    title = (f"fine-tune {config['params'] / 1e6:.2f}M-param Llama on {args.corpus}: {config['format']}/"
             f"{config['granularity']}, {args.steps} steps x {args.batch_size}x{args.seq_len} bytes, "
             f"peak lr {args.lr:g}" + _state_note(args))
    paths = write_outputs(args.out, "finetune", config, results, rows, title, before=True, extra={"wall_s": wall})
    print(title)
    print(format_table(rows, before=True))
    print("val before: the checkpoint after casting to the method's format (fp32_mw: the dense checkpoint)")
    print(f"total {wall / 60:.1f} min; wrote {', '.join(str(p) for p in paths)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ecoptim`` console script and ``python -m ecoptim``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return cmd_compare(parser, args)
    return cmd_finetune(parser, args)
