"""Command line: ``ecoptim compare`` (the paper's pre-training table), ``ecoptim sweep`` (the gaps against the
learning rate) and ``ecoptim finetune`` (INT4 fine-tuning).

    ecoptim compare                                  # MW / naive / ECO with SR, INT4, 3 seeds with 95% intervals
    ecoptim compare --format fp8_e4m3 --seeds 0      # one seed, FP8 E4M3 per row
    ecoptim compare --text my_notes/                 # the user's own text, byte-level
    ecoptim compare --resume                         # finish an interrupted run (same results)
    ecoptim sweep --lrs 1.2e-3,3e-4,1e-4 --seeds 0,1,2
    ecoptim compare --preset small --steps 300 --lr 1.2e-3 --seeds 0 --methods fp32_mw --save-checkpoint
                                                     # the dense model `finetune --checkpoint` starts from
    ecoptim finetune --checkpoint runs/compare/checkpoint.pt
    ecoptim finetune --arch qwen3-moe --seeds 0,1,2  # the paper's MoE fine-tune: INT4 experts of a Qwen3-MoE

Each command writes ``results.json``, ``results.md`` and PNG plots into ``--out`` and prints the table. Every run
of a (learning rate, seed, method) is stored under ``OUT/state/`` when it finishes, and checkpointed there every
``--checkpoint-every`` steps while it trains, so that ``--resume`` redoes nothing that was finished.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import __version__
from ..formats import QuantSpec
from ..optim import State4bit, State8bit
from .corpus import CORPORA
from .model import PRESETS, LlamaConfig, LlamaLM, is_block_linear
from .moe import MOE_GRANULARITY, MoeConfig, add_arch_args, check_quantizable, moe_config_from_args, quantized_summary
from .plots import plot_loss_curves, plot_memory_vs_loss, plot_sweep
from .stats import Interval, mean_interval, paired_interval
from .train import (BETAS, EPS, FINAL_LR_FRAC, GRAD_CLIP, WEIGHT_DECAY, Corpus, Method, RunResult, build_model,
                    load_corpus, load_text_corpus, pretrain, resolve_methods, train_run, usable_cores)

__all__ = ["main", "build_parser", "format_table", "write_outputs", "load_dense_model", "save_dense_model",
           "summarize", "reproducibility_info", "run_grid"]

# compare's defaults: the setting where the paper's central claim shows within ~15 min on 2 CPU cores. On the
# tiny preset (115k params) with INT4 per-tensor weights, 3000 steps and 3 seeds, naive + SR ends +0.10 nats
# behind MW + SR with a 95% interval far from 0, and ECO + SR matches MW + SR; FP8 per row needs longer runs
# for naive + SR's noise floor to show (docs/results/index.md). Only the three SR rows run by default (the
# least time for the claim); `--methods` / `--format` give the paper's full FP8 Table 1.
COMPARE_PRESET = "tiny"
COMPARE_STEPS = 3000
COMPARE_LR = 1e-3
COMPARE_SEEDS = (0, 1, 2)
COMPARE_METHODS = "mw_sr,naive_sr,eco_sr"
COMPARE_FORMAT = "int4"  # the rows' format when neither --format nor a method name gives one
BATCH_SIZE = 16
SEQ_LEN = 64
EVAL_EVERY = 30
# Fine-tuning: INT4 per-tensor from a dense small-preset model pre-trained for 300 steps at peak lr 1.2e-3 (a
# dense sweep at 300 steps gave val 1.996 / 2.002 / 2.018 for 8e-4 / 1.2e-3 / 2e-3: the paper's 1.2e-3 is kept),
# on Milton. Pilots (lr 5e-4): ECO+SR was +1.3% / +0.55% from MW+SR after 150 / 300 steps; 200 steps keeps
# `finetune` at ~6-8 min including pre-training. `compare --preset small --steps 300 --lr 1.2e-3
# --save-checkpoint` writes the same dense model.
FINETUNE_STEPS = 200
FINETUNE_LR = 5e-4
PRETRAIN_STEPS = 300
PEAK_LR = 1.2e-3
FINETUNE_METHODS = "fp32_mw,mw_rtn,mw_sr,naive_rtn,naive_sr,eco_rtn,eco_sr"
DENSE_MODEL_KIND = "ecoptim-llama-checkpoint-v1"
CHECKPOINT_EVERY = 50
# `sweep`: the rows whose gap the theory predicts (naive's SR-noise floor grows like sigma^2 / lr; ECO's does not)
SWEEP_METHODS = "mw_sr,naive_sr,eco_sr"
SWEEP_LRS = [1e-3, 3e-4, 1e-4]
SWEEP_PRESET = "tiny"
SWEEP_STEPS = 600
SWEEP_SEEDS = (0, 1, 2)
FINETUNE_PRESET = "small"
# --state-dtype: how AdamW keeps the moments of the quantized weights
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": State8bit(),
                "8bit-sr": State8bit(rounding="stochastic"), "4bit": State4bit(),
                "4bit-sr": State4bit(rounding="stochastic")}


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


def _seed_list(s: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct integers)."""
    try:
        seeds = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {s!r}")
    return seeds


def _lr_list(s: str) -> list[float]:
    """'1e-3,3e-4' -> [0.001, 0.0003] (distinct positive numbers)."""
    lrs = [_positive_float(v.strip()) for v in s.split(",") if v.strip()]
    if not lrs or len(set(lrs)) != len(lrs):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated learning rates, got {s!r}")
    return lrs


def _device(s: str) -> str:
    try:
        device = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {s!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {s!r}; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {s}: no CUDA GPU is visible to torch "
                                         "(torch.cuda.is_available() is False); use --device cpu")
    return str(device)


def _granularity(s: str) -> str | int:
    """'row' | 'tensor' | 'group128' | '128' (a bare number is a group size)."""
    return int(s) if s.isdigit() else s


def _add_model_args(p: argparse.ArgumentParser, preset: str) -> None:
    g = p.add_argument_group("model size (a preset, optionally overridden field by field; "
                             "`finetune --checkpoint` uses the checkpoint's own size instead)")
    g.add_argument("--preset", default=preset, choices=sorted(PRESETS),
                   help=f"model preset: tiny ~115k params, small ~2.4M, base ~10.8M (default {preset})")
    g.add_argument("--d-model", type=_positive_int, help="width")
    g.add_argument("--n-layers", type=_positive_int, help="transformer blocks")
    g.add_argument("--n-heads", type=_positive_int, help="attention heads (must divide --d-model)")
    g.add_argument("--ffn-hidden", type=_positive_int, help="SwiGLU hidden width")
    g.add_argument("--max-seq-len", type=_positive_int, help="longest sequence (RoPE table); default from preset")


def _add_run_args(p: argparse.ArgumentParser, *, steps: int, lr: float | None, methods: str, fmt: str | None,
                  out: str, seeds: Sequence[int] = (0,)) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=steps, help=f"optimizer steps per method (default {steps})")
    g.add_argument("--batch-size", type=_positive_int, default=BATCH_SIZE,
                   help=f"sequences per step (default {BATCH_SIZE})")
    g.add_argument("--seq-len", type=_positive_int, default=SEQ_LEN, help=f"bytes per sequence (default {SEQ_LEN})")
    if lr is not None:  # sweep takes --lrs instead
        g.add_argument("--lr", type=_positive_float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--final-lr-frac", type=_positive_float, default=FINAL_LR_FRAC, metavar="F",
                   help=f"the cosine schedule ends at F x the peak LR (default {FINAL_LR_FRAC:g}, the paper's); a "
                        "lower F is where the theory puts naive removal's noise floor (~ sigma^2 / lr)")
    g.add_argument("--methods", default=methods,
                   help=f"comma-separated methods (default: {methods}); fp32_mw or [<format>_]<row>[@<state>], "
                        "rows: mw_rtn, mw_sr, naive_rtn, naive_sr, eco_rtn, eco_sr; fp8_ rows follow --format, "
                        "fp8_e4m3_ rows stay FP8 E4M3 per-row (e.g. fp8_e4m3_mw_sr next to --format nvfp4); "
                        "@<state> sets that row's --state-dtype (e.g. fp8_e4m3_mw_sr@fp32)")
    methods_format = getattr(methods, "rows_format", None)
    fmt_default = fmt or (f"{methods_format} with the default --methods, else " if methods_format else "") + (
        "the methods' format tags or fp8_e4m3")
    g.add_argument("--format", default=fmt,
                   choices=["fp8_e4m3", "fp8_e5m2", "int8", "int4", "mxfp8", "mxfp4", "nvfp4"],
                   help=f"storage format of the quantized rows (default {fmt_default})")
    g.add_argument("--granularity", type=_granularity, default=None,
                   help="scale granularity: row, tensor, group<G> or G (default: per-row for FP8/INT8, "
                        "per-tensor for INT4, as in the paper; group32 for MXFP8/MXFP4, group16 for NVFP4)")
    g.add_argument("--seeds", "--seed", dest="seeds", type=_seed_list, default=list(seeds),
                   help=f"comma-separated seeds (default {','.join(map(str, seeds))}); each seed gives every method the same initial weights, "
                        "batches and SR stream; with 2 or more the table reports mean +- sd and 95%% intervals "
                        "of the paired differences")
    g.add_argument("--state-dtype", choices=list(STATE_DTYPES), default="fp32",
                   help="AdamW moments of the quantized weights: fp32 (default), bf16 (-4 B/param), 8bit (8-bit "
                        "block-wise, round to nearest, -5.97 B/param), 4bit (4-bit block-wise, -6.94 B/param) or "
                        "8bit-sr / 4bit-sr (the same with stochastic rounding)")
    g.add_argument("--eval-every", type=_positive_int, default=EVAL_EVERY,
                   help=f"steps between validation-loss points (default {EVAL_EVERY})")
    g.add_argument("--eval-batches", type=_positive_int, default=8,
                   help="validation batches per curve point (the final loss uses 4x as many; default 8)")
    g.add_argument("--device", type=_device, default="cpu",
                   help="where models, optimizer states and batches live: cpu (default) or cuda[:N]; the initial "
                        "weights, batches and stochastic-rounding stream are the same on every device")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: the usable cores not already busy with other processes, "
                        "sampled at the start of each run)")
    g.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
    g.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                   help=f"write each run's checkpoint (atomically, under OUT/state/) every N steps (default "
                        f"{CHECKPOINT_EVERY}; 0: never)")
    g.add_argument("--resume", action="store_true",
                   help="finish an interrupted command with the same --out and options: finished runs are read "
                        "back, an interrupted one continues from its checkpoint (same results as one go); more "
                        "--seeds, --lrs or --methods than before add only the missing runs")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_text_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--text", type=Path, default=None, metavar="PATH",
                   help=f"{what}: your own text file, or a folder of them (read in sorted order), as bytes; split "
                        "deterministically into train / validation (every 16th block); replaces --corpus")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecoptim", description="Quantized training without master weights (ECO): reproduce the paper's "
                                    "comparisons on a small byte-level Llama model (CPU-friendly).")
    parser.add_argument("--version", action="version", version=f"ecoptim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compare,sweep,finetune}")

    c = sub.add_parser("compare", help="pre-train every method from the same init and compare (paper Table/Fig. 1)",
                       description="Pre-train one model per method on Shakespeare from the same initial weights "
                                   "and batches, then report final validation loss, memory and speed.")
    _add_model_args(c, COMPARE_PRESET)
    _add_run_args(c, steps=COMPARE_STEPS, lr=COMPARE_LR, methods=_DefaultMethods(COMPARE_METHODS, COMPARE_FORMAT),
                  fmt=None, out="runs/compare", seeds=COMPARE_SEEDS)
    c.add_argument("--corpus", default="shakespeare", choices=CORPORA, help="training corpus (default shakespeare)")
    _add_text_arg(c, "training data")
    c.add_argument("--save-checkpoint", nargs="?", const="", default=None, metavar="PATH",
                   help="save the dense fp32_mw model of the first seed (default PATH: OUT/checkpoint.pt) for "
                        "`finetune --checkpoint`")

    w = sub.add_parser("sweep", help="the gaps of naive + SR and ECO + SR to MW + SR against the peak learning rate",
                       description="Run compare's methods at several peak learning rates (and seeds) and plot each "
                                   "method's paired difference to MW + SR, with 95% intervals, against the LR.")
    _add_model_args(w, SWEEP_PRESET)
    _add_run_args(w, steps=SWEEP_STEPS, lr=None, methods=SWEEP_METHODS, fmt=None, out="runs/sweep",
                  seeds=SWEEP_SEEDS)
    w.add_argument("--lrs", type=_lr_list, default=SWEEP_LRS,
                   help=f"comma-separated peak learning rates (default {','.join(f'{v:g}' for v in SWEEP_LRS)})")
    w.add_argument("--corpus", default="shakespeare", choices=CORPORA, help="training corpus (default shakespeare)")
    _add_text_arg(w, "training data")

    f = sub.add_parser("finetune", help="quantize a dense checkpoint to INT4 and fine-tune it on a second corpus",
                       description="Start every method from one dense checkpoint (loaded with --checkpoint, or "
                                   "pre-trained here for --pretrain-steps), cast it to INT4 and fine-tune on "
                                   "Milton; report validation loss before and after.")
    _add_model_args(f, FINETUNE_PRESET)
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
    _add_text_arg(f, "fine-tuning data")
    f.add_argument("--save-checkpoint", nargs="?", const="", default=None, metavar="PATH",
                   help="save the pre-trained dense model (default PATH: OUT/pretrained.pt)")
    add_arch_args(f)
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


class _DefaultMethods(str):
    """A command's default --methods, told apart from the same text typed by the user (which keeps the methods'
    own format tags, or FP8)."""

    def __new__(cls, methods: str, rows_format: str) -> "_DefaultMethods":
        self = super().__new__(cls, methods)
        self.rows_format = rows_format
        return self


def _rows_format(args: argparse.Namespace) -> str | None:
    """--format, else the format of the command's default methods (compare: INT4) when --methods is not given,
    else None (the methods' format tags, or FP8)."""
    if args.format is not None:
        return args.format
    return args.methods.rows_format if isinstance(args.methods, _DefaultMethods) else None


def _resolve(parser: argparse.ArgumentParser,
             args: argparse.Namespace) -> tuple[LlamaConfig | MoeConfig, list[Method]]:
    moe = getattr(args, "arch", "llama") == "qwen3-moe"
    try:
        cfg = moe_config_from_args(args) if moe else _model_config(args)
        granularity = MOE_GRANULARITY if moe and args.granularity is None else args.granularity
        methods = resolve_methods([s for s in args.methods.split(",") if s.strip()], _rows_format(args),
                                  granularity)
        if isinstance(cfg, MoeConfig):
            check_quantizable(cfg, methods)
        else:
            _check_quantizable(cfg, methods)
        for m in methods:
            if m.state_dtype is not None and m.state_dtype not in STATE_DTYPES:
                raise ValueError(f"method {m.name!r}: unknown state precision {m.state_dtype!r}; use one of "
                                 f"{', '.join(STATE_DTYPES)}")
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
        raise ValueError(f"checkpoint {str(path)!r} does not exist; create one with `ecoptim compare --preset small "
                         "--steps 300 --lr 1.2e-3 --seeds 0 --methods fp32_mw --save-checkpoint` or use --pretrain-steps")
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
            "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


#: Environment variables that select the numerics' code paths (vector ISA of torch's and MKL's kernels, the fused
#: kernel's build) or the thread pools.
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                "ECOPTIM_KERNEL_MARCH", "ECOPTIM_KERNEL_OPENMP", "ECOPTIM_DISABLE_KERNELS", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS", "ECOPTIM_FP8_MATMUL")


def reproducibility_info(results: Sequence[RunResult], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What decides the bits of a run (see docs/guides/experiments.md#reproducibility): torch's CPU vector ISA,
    the library versions and the numerics environment variables; the thread counts used (which do not change
    the bits) and the command line."""
    blas = next((ln.strip() for ln in torch.__config__.show().splitlines() if "Math Kernel Library" in ln), None)
    return {"command": shlex.join(["ecoptim", *argv]) if argv else None,
            "threads": sorted({r.threads for r in results}),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": {"torch": torch.__version__, "ecoptim": __version__, "python": platform.python_version(),
                         "blas": blas},
            "env": {k: os.environ.get(k) for k in NUMERICS_ENV if os.environ.get(k) is not None},
            "same_bits_when": "same torch/ecoptim versions, same cpu_capability and numerics env; any thread count"}


def _ref_method(results: Sequence[RunResult], r: RunResult) -> str | None:
    """The paired reference of r: the same-format MW + SR method if it was run, else the paper's FP8 E4M3
    per-row MW + SR (e.g. ``fp8_e4m3_mw_sr`` run next to NVFP4 rows), if it was run."""
    mw_sr = [o for o in results if o.mode == "master" and o.rounding == "stochastic" and o.format is not None]
    return next((o.method for o in mw_sr if o.format == r.format and o.granularity == r.granularity),
                next((o.method for o in mw_sr if o.format == "fp8_e4m3" and o.granularity == "row"), None))


def _pct(value: float | None, base: float | None) -> float | None:
    """Relative gap in percent (positive: worse than the baseline)."""
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value - base) / base


def _paired(by_seed: dict[int, float | None], ref_by_seed: dict[int, float | None]) -> Interval | None:
    seeds = [s for s in by_seed if by_seed[s] is not None and ref_by_seed.get(s) is not None]
    if not seeds:
        return None
    return paired_interval([by_seed[s] for s in seeds], [ref_by_seed[s] for s in seeds])  # type: ignore[misc]


def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per (peak LR, method), over its seeds: mean +- sd of the final loss with its 95% interval, and
    the paired differences (same seed) to the dense baseline and to the same-format MW + SR row, with 95%
    t-intervals (``stats.paired_interval``). A diverged seed counts in ``status`` and is left out of the means."""
    lrs = list(dict.fromkeys(r.peak_lr for r in results))
    rows = []
    for lr in lrs:
        at_lr = [r for r in results if r.peak_lr == lr]
        names = list(dict.fromkeys(r.method for r in at_lr))
        loss = {n: {r.seed: (r.final_val_loss if r.status == "ok" else None) for r in at_lr if r.method == n}
                for n in names}
        for name in names:
            runs = [r for r in at_lr if r.method == name]
            first = runs[0]
            ok = [v for v in loss[name].values() if v is not None]
            iv = mean_interval(ok) if ok else None
            ref = _ref_method(at_lr, first) if first.format is not None else None
            vs_ref = _paired(loss[name], loss[ref]) if ref is not None else None
            vs_dense = _paired(loss[name], loss["fp32_mw"]) if "fp32_mw" in loss else None
            # ECO's claim is against naive removal with the same rounding: that paired difference too
            naive = next((o.method for o in at_lr if first.mode == "eco" and o.mode == "naive"
                          and o.rounding == first.rounding and o.format == first.format
                          and o.granularity == first.granularity), None)
            vs_naive = _paired(loss[name], loss[naive]) if naive is not None else None
            ref_iv = mean_interval([v for v in loss[ref].values() if v is not None]) if ref and any(
                v is not None for v in loss[ref].values()) else None
            dense_ok = [v for v in loss.get("fp32_mw", {}).values() if v is not None]
            n_div = sum(r.status != "ok" for r in runs)
            inits = [r.initial_val_loss for r in runs if r.initial_val_loss is not None]
            rows.append({
                "method": name, "label": first.label, "peak_lr": lr, "seeds": [r.seed for r in runs],
                "initial_val_loss": sum(inits) / len(inits) if inits else None,
                "final_val_loss": iv.mean if iv else None, "final_val_loss_sd": iv.sd if iv else None,
                "final_val_loss_ci95": [iv.lo, iv.hi] if iv and iv.lo is not None else None,
                "diff_vs_mw_sr": vs_ref.to_dict() if vs_ref else None,
                "diff_vs_fp32_mw": vs_dense.to_dict() if vs_dense else None,
                "diff_vs_naive": vs_naive.to_dict() if vs_naive else None,
                "gap_vs_fp32_mw_pct": _pct(iv.mean if iv else None, sum(dense_ok) / len(dense_ok) if dense_ok
                                           else None),
                "gap_vs_mw_sr_pct": _pct(iv.mean if iv else None, ref_iv.mean if ref_iv else None),
                "bytes_per_param": first.bytes_per_param,
                "tokens_per_s": sum(r.tokens_per_s for r in runs) / len(runs),
                "skipped_steps": sum(r.skipped_steps for r in runs),
                "status": "ok" if n_div == 0 else ("diverged" if len(runs) == 1 else f"{n_div}/{len(runs)} diverged"),
                "wall_s": sum(r.wall_s for r in runs)})
    return rows


def _fmt(v: float | None, spec: str, none: str = "n/a", suffix: str = "") -> str:
    return none if v is None else format(v, spec) + suffix


def _fmt_diff(d: dict[str, Any] | None) -> str:
    """'+0.0052 [+0.0031, +0.0073]' (a paired difference in nats with its 95% interval), or the value alone."""
    if d is None:
        return "-"
    if d["lo"] is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False, before: bool = False) -> str:
    """The results table as fixed-width text (or markdown). ``before`` adds the loss before training.

    With several seeds, 'val loss' is mean +- sd and the difference to MW+SR is the mean paired difference
    with its 95% interval, in nats; with several learning rates a 'peak lr' column leads."""
    many_lrs = len({r["peak_lr"] for r in rows}) > 1
    head = (["peak lr"] if many_lrs else []) + ["method", "description"] + (["val before"] if before else []) + [
        "val loss", "diff vs MW+SR (nats, 95% CI)", "gap vs fp32 MW", "B/param", "tok/s", "skipped", "seeds",
        "status"]
    body = []
    for r in rows:
        loss = _fmt(r["final_val_loss"], ".4f", "-")
        if r["final_val_loss_sd"] is not None:
            loss += f" +- {r['final_val_loss_sd']:.4f}"
        body.append(([f"{r['peak_lr']:g}"] if many_lrs else []) + [r["method"], r["label"]] + (
            [_fmt(r["initial_val_loss"], ".4f")] if before else []) + [
            loss, _fmt_diff(r["diff_vs_mw_sr"]), _fmt(r["gap_vs_fp32_mw_pct"], "+.2f", suffix="%"),
            f"{r['bytes_per_param']:.2f}", f"{r['tokens_per_s']:.0f}", str(r["skipped_steps"]),
            str(len(r["seeds"])), r["status"]])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    first_num = head.index("method") + 2
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i >= first_num else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
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


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_outputs(out: Path, command: str, config: dict[str, Any], results: Sequence[RunResult],
                  rows: Sequence[dict[str, Any]], title: str, before: bool = False,
                  extra: dict[str, Any] | None = None, argv: Sequence[str] | None = None) -> list[Path]:
    """results.json, results.md, memory_vs_loss.png, loss_curves.png (and sweep.png for a sweep); returns the
    paths written. ``argv``: the command line's arguments, recorded with the results."""
    out.mkdir(parents=True, exist_ok=True)
    repro = reproducibility_info(results, argv)
    payload = {"command": command, "command_line": repro["command"], "config": config, "machine": machine_info(),
               "reproducibility": repro, "summary": list(rows), "results": [r.to_dict() for r in results],
               **(extra or {})}
    _write_json_atomic(out / "results.json", payload)
    info = payload["machine"]
    wall = f"{extra['wall_s'] / 60:.1f} min, " if extra and "wall_s" in extra else ""
    n_seeds = max(len(r["seeds"]) for r in rows)
    seeds_note = (f" With {n_seeds} seeds: val loss is mean +- sd over seeds; the difference to MW+SR is the mean "
                  "of the per-seed differences (same initial weights and batches) with its 95% Student-t interval."
                  if n_seeds > 1 else " One seed: no interval; run with --seeds 0,1,2 for intervals.")
    eco_lines = [f"- {r['label']} minus naive with the same rounding, paired by seed"
                 + (f" (peak lr {r['peak_lr']:g})" if len({x['peak_lr'] for x in rows}) > 1 else "")
                 + f": {_fmt_diff(r['diff_vs_naive'])}" for r in rows if r.get("diff_vs_naive")]
    md = [f"# ecoptim {command}", "", title, "", f"Command: `{repro['command']}`" if repro["command"] else "", "",
          format_table(rows, markdown=True, before=before), "", *eco_lines, "" if eco_lines else None,
          "Losses: mean cross-entropy in nats per byte on the validation split. Differences: + = worse. Gap vs "
          "fp32 MW is relative. B/param: static memory (weights + scales + AdamW state) measured after step 1."
          + seeds_note,
          f"Run: {wall}torch {info['torch']}, CPU capability {repro['cpu_capability']}, threads "
          f"{repro['threads']}, {info['cpu_count']} CPUs, {info['platform']}.", ""]
    (out / "results.md").write_text("\n".join(line for line in md if line is not None))
    plot_memory_vs_loss(results, out / "memory_vs_loss.png", title)
    plot_loss_curves(results, out / "loss_curves.png", title)
    paths = [out / n for n in ("results.json", "results.md", "memory_vs_loss.png", "loss_curves.png")]
    if len({r["peak_lr"] for r in rows}) > 1:
        plot_sweep(rows, out / "sweep.png", title)
        paths.append(out / "sweep.png")
    return paths


# --------------------------------------------------------------------------------------------------------
# Running the grid of (learning rate, seed, method), resumable
# --------------------------------------------------------------------------------------------------------

def _run_key(lr: float, seed: int, method: Method) -> str:
    return f"lr{lr:g}_seed{seed}_{method.name}"


def run_grid(out: Path, identity: dict[str, Any], lrs: Sequence[float], seeds: Sequence[int],
             methods: Sequence[Method], run: Any, *, resume: bool, checkpoint_every: int,
             after_run: Any = None) -> list[RunResult]:
    """Train every (lr, seed, method), learning rate outermost, then seed, so an interruption leaves whole seeds.

    ``run(method, lr, seed, checkpoint_path, checkpoint_every)`` trains one and returns its ``RunResult``. Each
    finished run is written to ``out/state/<key>.json`` (atomically) and its checkpoint removed; ``resume``
    reads finished runs back and lets an interrupted one continue from its checkpoint (and, given more learning
    rates, seeds or methods than before, trains only the missing ones). ``identity`` (everything else that decides
    the results) is stored in ``out/state/run.json``; resuming with other options is refused.
    Without ``resume`` the state folder is cleared first. ``after_run(result)`` is called before the result is
    stored (e.g. to save a model it carries).
    """
    state = out / "state"
    ident_path = state / "run.json"
    ident = json.loads(json.dumps(_json_safe(identity)))
    if resume:
        if not ident_path.is_file():
            raise ValueError(f"--resume: {str(state)!r} holds no interrupted run; run without --resume")
        saved = json.loads(ident_path.read_text())
        if saved != ident:
            diff = sorted(k for k in set(saved) | set(ident) if saved.get(k) != ident.get(k))
            raise ValueError(f"--resume: the run in {str(state)!r} used other options ({', '.join(diff)}); "
                             "resume with the same options, or drop --resume to start again")
    else:
        if state.exists():
            shutil.rmtree(state)
        state.mkdir(parents=True)
        _write_json_atomic(ident_path, ident)
    results = []
    for lr in lrs:
        for seed in seeds:
            for m in methods:
                key = _run_key(lr, seed, m)
                done, ckpt = state / f"{key}.json", state / f"{key}.pt"
                if done.is_file():
                    results.append(RunResult.from_dict(json.loads(done.read_text())))
                    continue
                r = run(m, lr, seed, ckpt, checkpoint_every)
                if after_run is not None:
                    after_run(r)
                _write_json_atomic(done, r.to_dict())
                ckpt.unlink(missing_ok=True)
                results.append(r)
    return results


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------

def _load_data(parser: argparse.ArgumentParser, args: argparse.Namespace, corpus: str) -> Corpus:
    """The embedded corpus, or the user's --text, checked to hold enough bytes for the batches and evaluation."""
    try:
        data = load_text_corpus(args.text) if args.text is not None else load_corpus(corpus)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    need = args.batch_size * args.seq_len + 1
    if data.val.numel() < need or data.train.numel() < args.seq_len + 1:
        parser.error(f"--text {str(args.text)!r}: {data.train.numel()} training / {data.val.numel()} validation "
                     f"bytes; validation needs at least --batch-size x --seq-len + 1 = {need} (a text of about "
                     f"{16 * need} bytes); give more text or lower --batch-size / --seq-len")
    return data


def _data_name(args: argparse.Namespace, corpus: str) -> str:
    return f"text:{args.text}" if args.text is not None else corpus


def _model_label(cfg: LlamaConfig | MoeConfig) -> str:
    return cfg.label if isinstance(cfg, MoeConfig) else "Llama"


def _run_config(args: argparse.Namespace, cfg: LlamaConfig | MoeConfig, methods: Sequence[Method], data: Corpus,
                corpus: str) -> dict[str, Any]:
    quantized = [m for m in methods if not m.dense]
    # the --format rows describe the run (a pinned fp8_e4m3_ reference row may come first)
    main = next((m for m in quantized if m.format == getattr(args, "format", None)), quantized[0] if quantized else None)
    return {"model": cfg.to_dict(), "params": build_model(cfg).num_params(), "methods": [m.name for m in methods],
            "format": main.format if main else None, "granularity": main.granularity if main else None,
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "peak_lrs": list(getattr(args, "lrs", None) or [args.lr]), "seeds": list(args.seeds),
            "state_dtype": args.state_dtype, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
            "final_eval_batches": 4 * args.eval_batches, "corpus": _data_name(args, corpus),
            # named only off the CPU: a run on another device computes other bits (its matmuls), so --resume must
            # not mix them, while the identity of CPU runs stays what it was
            **({} if args.device == "cpu" else {"device": args.device}),
            "data_bytes": {"train": data.train.numel(), "val": data.val.numel()},
            "optimizer": {"betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                          "schedule": f"10% linear warm-up from 0.01x peak, cosine to {args.final_lr_frac:g}x peak"}}


def _identity(config: dict[str, Any], data: Corpus, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What decides a run's results besides its (lr, seed, method) key, for --resume: the config and a fingerprint
    of the data. The learning rates, seeds and methods are left out: each run is stored under its own key, so a
    resume with more of them adds only the missing runs."""
    import hashlib
    digest = hashlib.sha256(data.train.numpy().tobytes() + data.val.numpy().tobytes()).hexdigest()
    per_run = ("params", "peak_lrs", "seeds", "methods", "format", "granularity")
    return {**{k: v for k, v in config.items() if k not in per_run}, "data_sha256": digest, **(extra or {})}


def _state_note(args: argparse.Namespace) -> str:
    return "" if args.state_dtype == "fp32" else f", {args.state_dtype} AdamW states"


def _train_kwargs(args: argparse.Namespace, method: Method | None = None) -> dict[str, Any]:
    """train_run's options from the command line; ``method``'s own state precision (``@<state>``) if it has one."""
    state = method.state_dtype if method is not None and method.state_dtype is not None else args.state_dtype
    return {"eval_every": args.eval_every, "eval_batches_n": args.eval_batches,
            "final_eval_batches_n": 4 * args.eval_batches, "threads": args.threads,
            "state_dtype": STATE_DTYPES[state], "final_lr_frac": args.final_lr_frac,
            "device": args.device}


def _check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.final_lr_frac > 1:
        parser.error(f"--final-lr-frac must be in (0, 1], got {args.final_lr_frac:g}")
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")


def _pretrain_grid(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str,
                   lrs: Sequence[float], corpus: str) -> int:
    """compare and sweep: every (lr, seed, method) from scratch on the training data."""
    _check_run_args(parser, args)
    cfg, methods = _resolve(parser, args)
    save_dense = getattr(args, "save_checkpoint", None)
    if save_dense is not None and not any(m.dense for m in methods):
        parser.error("--save-checkpoint saves the dense fp32_mw model; include fp32_mw in --methods")
    data = _load_data(parser, args, corpus)
    config = _run_config(args, cfg, methods, data, corpus)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"ecoptim {command}: {config['params'] / 1e6:.2f}M-param model {cfg.to_dict()}, {len(methods)} methods x "
        f"{len(args.seeds)} seeds x {len(lrs)} peak lr x {args.steps} steps of {args.batch_size}x{args.seq_len} "
        f"bytes, corpus {config['corpus']}")
    dense_path = (Path(save_dense) if save_dense else args.out / "checkpoint.pt") if save_dense is not None else None

    def run(m: Method, lr: float, seed: int, ckpt: Path, every: int) -> RunResult:
        keep = dense_path is not None and m.dense and seed == args.seeds[0] and lr == lrs[0]
        r = train_run(m, cfg, args.steps, args.batch_size, args.seq_len, lr, seed, data,
                      progress=not args.quiet, keep_state=keep, checkpoint_path=ckpt, checkpoint_every=every,
                      **_train_kwargs(args, m))
        assert r is not None
        return r

    def after_run(r: RunResult) -> None:
        if r.state_dict is not None and dense_path is not None:
            save_dense_model(dense_path, cfg, r.state_dict, {"steps": args.steps, "corpus": config["corpus"],
                                                            "seed": r.seed, "final_val_loss": r.final_val_loss})
            r.state_dict = None
            say(f"saved dense checkpoint to {dense_path}")

    t0 = time.perf_counter()
    try:
        results = run_grid(args.out, _identity(config, data), lrs, args.seeds, methods, run, resume=args.resume,
                           checkpoint_every=args.checkpoint_every, after_run=after_run)
    except ValueError as e:
        parser.error(str(e))
    wall = time.perf_counter() - t0
    rows = summarize(results)
    fmt = config["format"] or "-"
    lr_note = f"peak lr {lrs[0]:g}" if len(lrs) == 1 else f"peak lr {', '.join(f'{v:g}' for v in lrs)}"
    title = (f"{config['params'] / 1e6:.2f}M-param Llama, {config['corpus']}, {args.steps} steps x "
             f"{args.batch_size}x{args.seq_len} bytes, {fmt}/{config['granularity']}, {lr_note}, "
             f"seeds {','.join(map(str, args.seeds))}" + _state_note(args))
    paths = write_outputs(args.out, command, config, results, rows, title, extra={"wall_s": wall}, argv=args.argv)
    print(title)
    print(format_table(rows))
    print(f"total {wall / 60:.1f} min (this invocation); wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    return _pretrain_grid(parser, args, "compare", [args.lr], args.corpus)


def cmd_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    return _pretrain_grid(parser, args, "sweep", args.lrs, args.corpus)


def cmd_finetune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _check_run_args(parser, args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    pre_info: dict[str, Any]
    if args.arch != "llama" and (args.checkpoint is not None or args.save_checkpoint is not None):
        parser.error(f"--checkpoint / --save-checkpoint hold the app's Llama; --arch {args.arch} pre-trains its "
                     "own model each run (--pretrain-steps)")
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
        say(f"pre-training a dense {build_model(cfg).num_params() / 1e6:.2f}M-param {_model_label(cfg)} on "
            f"{args.pretrain_corpus} for {steps} steps")
        pre = pretrain(cfg, steps, args.batch_size, args.seq_len, args.pretrain_lr, args.seeds[0],
                       load_corpus(args.pretrain_corpus), progress=not args.quiet,
                       **{**_train_kwargs(args), "final_lr_frac": FINAL_LR_FRAC})  # compare's dense model
        if pre.status != "ok" or pre.state_dict is None:
            print(f"pre-training diverged (val loss {pre.final_val_loss}); lower --pretrain-lr", file=sys.stderr)
            return 1
        state = pre.state_dict
        pre_info = {"pretrain_steps": steps, "pretrain_lr": args.pretrain_lr, "pretrain_corpus": args.pretrain_corpus,
                    "pretrain_seed": args.seeds[0], "pretrain_val_loss": pre.final_val_loss}
        if args.save_checkpoint is not None:
            path = Path(args.save_checkpoint) if args.save_checkpoint else args.out / "pretrained.pt"
            save_dense_model(path, cfg, state, {"steps": steps, "corpus": args.pretrain_corpus,
                                               "final_val_loss": pre.final_val_loss})
            say(f"saved dense checkpoint to {path}")
    data = _load_data(parser, args, args.corpus)
    config = {**_run_config(args, cfg, methods, data, args.corpus), "source": pre_info}
    quantized = next((m for m in methods if not m.dense), None)
    if isinstance(cfg, MoeConfig) and quantized is not None:
        config["quantized"] = quantized_summary(cfg, quantized)

    def run(m: Method, lr: float, seed: int, ckpt: Path, every: int) -> RunResult:
        r = train_run(m, cfg, args.steps, args.batch_size, args.seq_len, lr, seed, data, progress=not args.quiet,
                      init_state=state, checkpoint_path=ckpt, checkpoint_every=every, **_train_kwargs(args, m))
        assert r is not None
        return r

    import hashlib
    base = hashlib.sha256(b"".join(v.detach().contiguous().numpy().tobytes() for v in state.values()
                                   if v.dtype != torch.bfloat16)).hexdigest()
    t0 = time.perf_counter()
    try:
        results = run_grid(args.out, _identity(config, data, {"base_model_sha256": base}), [args.lr], args.seeds,
                           methods, run, resume=args.resume, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        parser.error(str(e))
    wall = time.perf_counter() - t0
    rows = summarize(results)
    title = (f"fine-tune {config['params'] / 1e6:.2f}M-param {_model_label(cfg)} on {config['corpus']}: "
             f"{config['format']}/{config['granularity']}, {args.steps} steps x {args.batch_size}x{args.seq_len} "
             f"bytes, peak lr {args.lr:g}, seeds {','.join(map(str, args.seeds))}" + _state_note(args))
    paths = write_outputs(args.out, "finetune", config, results, rows, title, before=True, extra={"wall_s": wall},
                          argv=args.argv)
    print(title)
    print(format_table(rows, before=True))
    print("val before: the checkpoint after casting to the method's format (fp32_mw: the dense checkpoint)")
    print(f"total {wall / 60:.1f} min (this invocation); wrote {', '.join(str(p) for p in paths)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ecoptim`` console script and ``python -m ecoptim``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "compare":
        return cmd_compare(parser, args)
    if args.command == "sweep":
        return cmd_sweep(parser, args)
    return cmd_finetune(parser, args)
