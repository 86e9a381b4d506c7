"""Training runs that reproduce the paper's comparison on a small byte-level Llama model.

``METHODS`` holds the paper's rows (dense baseline; FP8 with master weights, naive removal, ECO; each with
round-to-nearest or stochastic rounding). ``train_run`` trains one method with the paper's recipe
(AdamW (0.9, 0.98), eps 1e-9, wd 0.1, clip 1.0, 10% warm-up from 0.01x then cosine to 0.1x peak) and returns
a ``RunResult``; every method gets the same initial weights and the same batches. ``finetune`` starts every
method from one dense checkpoint, quantizes it (INT4 by default) and fine-tunes it on another corpus.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..checkpoint import load_checkpoint, save_checkpoint
from ..convert import quantize_
from ..formats import get_format, get_granularity
from ..memory import memory_report
from ..optim import AdamW, State8bit, muon_with_adamw
from .corpus import eval_batches, get_batch, load_split, load_user_text, split_bytes
from .model import LlamaConfig, LlamaLM, is_block_linear

__all__ = ["Method", "METHODS", "MUON_METHODS", "ROWS", "FORMAT_TAGS", "DEFAULT_GRANULARITY", "make_methods",
           "resolve_methods", "Corpus", "load_corpus", "load_text_corpus", "RunResult", "ModelConfig", "build_model",
           "train_run", "lr_lambda", "evaluate", "pretrain", "finetune", "BETAS", "EPS", "WEIGHT_DECAY", "GRAD_CLIP",
           "FINAL_LR_FRAC"]

# The paper's optimizer recipe (Section 5 / the reference notes); shared by every method.
BETAS = (0.9, 0.98)
EPS = 1e-9
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
WARMUP_FRAC = 0.1      # of the total steps
WARMUP_START = 0.01    # x peak lr at step 0 (must be > 0: ECO divides the injected error by lr)
FINAL_LR_FRAC = 0.1    # x peak lr at the last step

#: Short names used in method names ("fp8_eco_sr", "int4_eco_sr", ...).
FORMAT_TAGS = {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8e5m2", "int8": "int8", "int4": "int4", "mxfp8": "mxfp8",
               "mxfp4": "mxfp4", "nvfp4": "nvfp4"}
#: The paper's scale granularity per format: per-row FP8 for pre-training, per-tensor INT4 for fine-tuning.
DEFAULT_GRANULARITY = {"fp8_e4m3": "row", "fp8_e5m2": "row", "int8": "row", "int4": "tensor", "mxfp8": "group32",
                       "mxfp4": "group32", "nvfp4": "group16"}
_TAG_TO_FORMAT = {**{v: k for k, v in FORMAT_TAGS.items()}, "e5m2": "fp8_e5m2", "e4m3": "fp8_e4m3"}
_FORMAT_LABELS = {"fp8_e4m3": "FP8", "fp8_e5m2": "FP8-E5M2", "int8": "INT8", "int4": "INT4", "mxfp8": "MXFP8",
                  "mxfp4": "MXFP4", "nvfp4": "NVFP4"}


@dataclass(frozen=True)
class Method:
    """One row of the comparison: how weights are stored and updated.

    ``format`` None means a dense fp32 model (plain AdamW); otherwise the block linears are stored in
    ``format`` with ``granularity`` scales and updated by ``ecoptim.AdamW(mode=mode, rounding=rounding)``.
    """

    name: str
    label: str
    format: str | None = None
    granularity: str | None = None
    mode: str = "master"
    rounding: str = "nearest"
    #: "adamw" (the paper's recipe), "muon" (Muon on the block linears, AdamW on the rest, ``muon_with_adamw``
    #: with adjust_lr_fn="match_rms_adamw" so that AdamW's lr and decay carry over) or "muon_unit" (the same with
    #: ECO's unit-gain injection)
    optimizer: str = "adamw"
    #: the AdamW state precision of this row (a ``--state-dtype`` name, from a ``@<state>`` name suffix); None:
    #: the command's ``--state-dtype``
    state_dtype: str | None = None

    @property
    def dense(self) -> bool:
        return self.format is None


#: The paper's quantized rows: (row key, optimizer mode, rounding, label suffix).
ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("mw_rtn", "master", "nearest", "w/ MW + RTN"),
    ("mw_sr", "master", "stochastic", "w/ MW + SR"),
    ("naive_rtn", "naive", "nearest", "w/o MW + RTN (naive)"),
    ("naive_sr", "naive", "stochastic", "w/o MW + SR (naive)"),
    ("eco_rtn", "eco", "nearest", "ECO + RTN"),
    ("eco_sr", "eco", "stochastic", "ECO + SR"),
)
DENSE = Method("fp32_mw", "FP32 w/ master weights (dense)")


def _canonical_format(fmt: str) -> str:
    name = get_format(_TAG_TO_FORMAT.get(fmt.lower(), fmt)).name  # raises a clear ValueError if unknown
    if name not in FORMAT_TAGS:
        raise ValueError(f"format {fmt!r} is not a low-bit training format here; choose one of {sorted(FORMAT_TAGS)}")
    return name


def make_methods(format: str = "fp8_e4m3", granularity: str | int | None = None) -> dict[str, Method]:
    """The paper's seven rows with the quantized ones retargeted to ``format`` / ``granularity``.

    ``granularity`` None picks the paper's choice for the format (``DEFAULT_GRANULARITY``).
    """
    fmt = _canonical_format(format)
    gran = str(get_granularity(granularity if granularity is not None else DEFAULT_GRANULARITY[fmt],
                               get_format(fmt)))
    tag, flabel = FORMAT_TAGS[fmt], _FORMAT_LABELS[fmt]
    suffix = "" if gran == DEFAULT_GRANULARITY[fmt] else f" [{gran}]"
    methods = {DENSE.name: DENSE}
    for key, mode, rounding, label in ROWS:
        methods[f"{tag}_{key}"] = Method(f"{tag}_{key}", f"{flabel} {label}{suffix}", fmt, gran, mode, rounding)
    return methods


#: The paper's table: fp32_mw, fp8_mw_rtn, fp8_mw_sr, fp8_naive_rtn, fp8_naive_sr, fp8_eco_rtn, fp8_eco_sr.
METHODS: dict[str, Method] = make_methods()
ROW_KEYS = tuple(r[0] for r in ROWS)
#: Muon rows (FP8 E4M3, per-row scales; named as they are, not retargeted by --format).
MUON_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("muon_fp32", "Muon FP32 (dense)", optimizer="muon"),
    Method("muon_mw", "Muon FP8 w/ MW + SR", "fp8_e4m3", "row", "master", "stochastic", "muon"),
    Method("muon_naive_sr", "Muon FP8 w/o MW + SR (naive)", "fp8_e4m3", "row", "naive", "stochastic", "muon"),
    Method("muon_naive_rtn", "Muon FP8 w/o MW + RTN (naive)", "fp8_e4m3", "row", "naive", "nearest", "muon"),
    Method("muon_eco_sr", "Muon FP8 ECO + SR", "fp8_e4m3", "row", "eco", "stochastic", "muon"),
    Method("muon_eco_rtn", "Muon FP8 ECO + RTN", "fp8_e4m3", "row", "eco", "nearest", "muon"),
    Method("muon_eco_unit_sr", "Muon FP8 ECO (unit gain) + SR", "fp8_e4m3", "row", "eco", "stochastic",
           "muon_unit"),
)}


def resolve_methods(names: Sequence[str], format: str | None = None,
                    granularity: str | int | None = None) -> list[Method]:
    """Turn method names into ``Method`` rows in the requested format.

    A name is ``fp32_mw`` or ``[<format tag>_]<row>`` with row in ``ROW_KEYS`` (e.g. ``fp8_eco_sr``,
    ``int4_naive_rtn``, ``eco_sr``). The ``fp8_`` names are the paper's rows and are retargeted by
    ``format`` (so ``--format int4`` turns ``fp8_eco_sr`` into ``int4_eco_sr``); any other tag must agree with
    ``format``. ``format`` None is inferred from such tags, else FP8 E4M3. The full names ``fp8_e4m3_`` /
    ``fp8_e5m2_`` pin a row to that format with its default granularity, whatever ``format`` (e.g. the paper's
    FP8 MW + SR reference next to NVFP4 rows: ``fp8_e4m3_mw_sr``). A quantized row may end in ``@<state>`` (e.g.
    ``fp8_e4m3_mw_sr@fp32``): its AdamW state precision, instead of the command's (checked by the caller).
    """
    if not names:
        raise ValueError("no methods given")
    parsed: list[tuple[str | None, str]] = []
    pinned: dict[int, str] = {}  # position -> the format a full-name tag pins its row to
    states: dict[int, str] = {}  # position -> the row's own state precision (@<state>)
    for raw in names:
        name, at, state = raw.strip().lower().partition("@")
        if at:
            if not state or name == DENSE.name or name in MUON_METHODS:
                raise ValueError(f"method {raw!r}: a state precision suffix @<state> applies to the quantized AdamW "
                                 "rows only (e.g. fp8_e4m3_mw_sr@fp32)")
            states[len(parsed)] = state
        if name in MUON_METHODS:  # fixed rows, any --format
            parsed.append(("muon", name))
            continue
        if name == DENSE.name:
            parsed.append((None, name))
            continue
        tag, row = None, name
        for key in ROW_KEYS:
            if name == key:
                break
            if name.endswith("_" + key):
                tag, row = name[: -len(key) - 1], key
                break
        else:
            raise ValueError(f"unknown method {raw!r}; use fp32_mw or [<format>_]<row> with row one of "
                             f"{', '.join(ROW_KEYS)} (e.g. {', '.join(METHODS)})")
        if tag is not None and tag in FORMAT_TAGS and tag != FORMAT_TAGS[tag]:  # a full format name: pinned
            pinned[len(parsed)] = tag
            parsed.append((None, row))
            continue
        if tag is not None and tag not in _TAG_TO_FORMAT:
            raise ValueError(f"unknown format tag {tag!r} in method {raw!r}; use one of {sorted(_TAG_TO_FORMAT)}")
        parsed.append((None if tag is None else _TAG_TO_FORMAT[tag], row))
    explicit = {f for f, _ in parsed if f is not None and f not in ("fp8_e4m3", "muon")}
    if format is None:
        if len(explicit) > 1:
            raise ValueError(f"methods mix formats {sorted(explicit)}; run one format at a time")
        format = explicit.pop() if explicit else "fp8_e4m3"
    fmt = _canonical_format(format)
    for (f, row), raw in zip(parsed, names):
        if f is not None and f not in ("fp8_e4m3", "muon", fmt):
            raise ValueError(f"method {raw!r} is a {f} row but the format is {fmt}; drop the prefix or change "
                             "--format")
    table = make_methods(fmt, granularity)
    out: list[Method] = []
    for i, (f, row) in enumerate(parsed):
        m = (MUON_METHODS[row] if f == "muon" else DENSE if row == DENSE.name
             else make_methods(pinned[i])[f"{FORMAT_TAGS[pinned[i]]}_{row}"] if i in pinned
             else table[f"{FORMAT_TAGS[fmt]}_{row}"])
        if i in states:
            m = replace(m, name=f"{m.name}@{states[i]}", label=f"{m.label}, {states[i]} states",
                        state_dtype=states[i])
        if m in out:
            raise ValueError(f"method {m.name!r} given twice")
        out.append(m)
    return out


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Train / validation byte tokens of one corpus."""

    name: str
    train: torch.Tensor
    val: torch.Tensor


def load_corpus(name: str) -> Corpus:
    """One of the embedded corpora (``corpus.CORPORA``) with its fixed split."""
    return Corpus(name, load_split(name, "train"), load_split(name, "val"))


def load_text_corpus(path: str | os.PathLike) -> Corpus:
    """The user's own text (a file, or a folder of files read in sorted order) as bytes, split
    deterministically by ``corpus.split_bytes`` (every 16th block to validation)."""
    data = load_user_text(path)
    train, val = split_bytes(data)
    return Corpus(str(path), train, val)


# --------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What one training run measured. Losses are mean cross-entropy in nats per byte."""

    method: str
    label: str
    format: str | None
    granularity: str | None
    mode: str | None
    rounding: str | None
    steps: int                 # steps requested
    steps_done: int            # fewer when the run diverged
    status: str                # "ok" | "diverged"
    final_val_loss: float | None
    initial_val_loss: float | None
    final_train_loss: float | None   # EMA of the training loss at the end
    val_curve: list[tuple[int, float | None]] = field(default_factory=list)  # (step, loss on the small eval set)
    train_curve: list[tuple[int, float | None]] = field(default_factory=list)
    bytes_per_param: float = 0.0     # static: weights + scales + optimizer state, measured after step 1
    total_bytes: int = 0
    numel: int = 0
    tokens_per_s: float = 0.0        # training steps only (evaluation excluded)
    wall_s: float = 0.0
    skipped_steps: int = 0           # steps the optimizer skipped for non-finite gradients
    threads: int = 0                 # torch intra-op threads used
    diverged_at: int | None = None
    seed: int = 0                    # initial weights, batch order and SR stream
    peak_lr: float = 0.0
    resumed_from: int | None = None  # the checkpoint step this run continued from (None: trained in one go)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # only with keep_state=True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, state_dict=None))
        d.pop("state_dict")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        """Inverse of ``to_dict`` (JSON turns the curves' (step, loss) pairs into lists; they come back as tuples)."""
        d = dict(d)
        for key in ("val_curve", "train_curve"):
            d[key] = [(int(s), v) for s, v in d.get(key, [])]
        return cls(**d)


def lr_lambda(steps: int, final_frac: float = FINAL_LR_FRAC) -> Callable[[int], float]:
    """LR multiplier for LambdaLR: linear warm-up from WARMUP_START to 1 over the first WARMUP_FRAC of the
    steps, then cosine from 1 to ``final_frac`` (default FINAL_LR_FRAC, the paper's 0.1) at the last step.
    Never 0 (ECO needs lr > 0)."""
    if not 0 < final_frac <= 1:
        raise ValueError(f"final_frac must be in (0, 1], got {final_frac}")
    warmup = max(1, round(WARMUP_FRAC * steps))
    decay = max(1, steps - warmup)

    def fn(step: int) -> float:
        if step < warmup:
            return WARMUP_START + (1 - WARMUP_START) * step / warmup
        progress = min(1.0, (step - warmup) / decay)
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation loss over fixed batches (nan if the model produces non-finite losses)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        _, loss = model(x, y)
        total += float(loss)
    model.train(was_training)
    return total / max(len(batches), 1)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class ModelConfig(Protocol):
    """A model other than the app's Llama that ``train_run`` can train (e.g. ``moe.MoeConfig``): its ``build()``
    returns a module with ``forward(x, y) -> (logits, loss)`` and ``num_params()``, as ``LlamaLM``;
    ``quantize_filter(model)`` selects the parameters that the quantized methods store in low precision."""

    vocab_size: int
    max_seq_len: int

    def build(self) -> nn.Module: ...

    def quantize_filter(self, model: nn.Module) -> Callable[[nn.Module, str, str], bool]: ...

    def to_dict(self) -> dict[str, Any]: ...


def build_model(cfg: LlamaConfig | ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg`` (from torch's global RNG)."""
    return LlamaLM(cfg) if isinstance(cfg, LlamaConfig) else cfg.build()


def _build(method: Method, cfg: LlamaConfig | ModelConfig, seed: int, lr: float,
           init_state: dict[str, torch.Tensor] | None,
           state_dtype: torch.dtype | State8bit = torch.float32,
           device: torch.device = torch.device("cpu")) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Model (same init for every method: seeded here) on ``device``, and its optimizer."""
    if method.optimizer != "adamw" and not isinstance(cfg, LlamaConfig):
        raise ValueError(f"method {method.name!r}: the Muon rows split the Llama's block linears from the rest; "
                         "other models run the AdamW rows")
    torch.manual_seed(seed)
    model = build_model(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    if not method.dense:
        # RTN for the initial cast (the paper quantizes the initial weights once, deterministically).
        quantize_(model, method.format, method.granularity,
                  filter_fn=is_block_linear if isinstance(cfg, LlamaConfig) else cfg.quantize_filter(model))
    # initialised and quantized on CPU, then moved: the same initial weights and codes on every device
    model.to(device)
    # Weight decay on matrices only (nanoGPT convention): norms' gains are not decayed.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    if method.optimizer in ("muon", "muon_unit"):
        block = {id(m.weight) for n, m in model.named_modules() if is_block_linear(m, n)}
        return model, muon_with_adamw(
            model, lr=lr, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw", adamw_lr=lr, adamw_betas=BETAS,
            adamw_eps=EPS, adamw_weight_decay=WEIGHT_DECAY, muon_filter=lambda name, p: id(p) in block,
            mode="master" if method.dense else method.mode, rounding=method.rounding, seed=seed,
            injection="unit" if method.optimizer == "muon_unit" else "secant")
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = AdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                mode="master" if method.dense else method.mode, rounding=method.rounding, seed=seed,
                nonfinite="skip", state_dtype=state_dtype)
    return model, opt


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _busy_cpus(interval: float = 0.2) -> float | None:
    """CPUs kept busy by other processes right now, sampled from /proc/stat (Linux only, else None)."""
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def default_threads() -> int:
    """Intra-op threads for a run: the usable cores that other processes are not already keeping busy.

    Why not simply all cores: torch's CPU kernels split work evenly and wait for the slowest thread, so on
    a small shared machine (2 cores, another job on one of them) two threads run 2-3x *slower* than one.
    """
    cores = usable_cores()
    busy = _busy_cpus() if cores > 1 else None
    if busy is None:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def train_run(method: Method, cfg: LlamaConfig | ModelConfig, steps: int, batch_size: int, seq_len: int, lr: float,
              seed: int, data: Corpus, progress: bool = True, *, eval_every: int = 50, eval_batches_n: int = 8,
              final_eval_batches_n: int = 32, init_state: dict[str, torch.Tensor] | None = None,
              diverge_loss: float | None = None, max_nonfinite: int = 10, threads: int | None = None,
              keep_state: bool = False, state_dtype: torch.dtype | State8bit = torch.float32,
              checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 0,
              stop_after: int | None = None, final_lr_frac: float = FINAL_LR_FRAC,
              device: str | torch.device = "cpu") -> RunResult | None:
    """Train ``method`` for ``steps`` steps and measure it (see ``RunResult``).

    Same ``seed`` => same initial weights (before quantization), same batch order (a ``torch.Generator``
    seeded with ``seed``) and same stochastic-rounding stream, whatever the method.
    ``cfg``: the app's Llama, or another model (``ModelConfig``, e.g. the MoE of ``moe.py``).
    ``init_state``: a dense state_dict loaded before quantizing (fine-tuning). ``state_dtype``: AdamW moments
    of the quantized weights (fp32, or bf16 to save 4 B/param; dense parameters keep fp32). ``final_lr_frac``:
    the LR at the last step, as a fraction of ``lr`` (``lr_lambda``). ``device``: where the model, its optimizer
    state and the batches live (e.g. "cuda"); initial weights, batches and the SR stream are the same on every
    device (drawn on CPU), and the step times include waiting for the device.
    Divergence (the run stops, status "diverged", no exception): the EMA of the training loss exceeds
    ``diverge_loss`` (default ln(vocab) + 1, i.e. clearly worse than a uniform guess), a validation loss
    is non-finite, or ``max_nonfinite`` consecutive training losses are non-finite.

    Interruption: with ``checkpoint_path`` and ``checkpoint_every`` > 0, the model, optimizer (its SR
    generator included), scheduler, batch generator and the measurements so far are written atomically
    (``ecoptim.save_checkpoint``) every ``checkpoint_every`` steps; if the file exists when the run starts, the
    run continues from it and ends with the same losses and curves as an uninterrupted run. ``stop_after``
    (for tests of exactly that) returns None after that many steps, as an interruption would.
    """
    if steps < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError("steps, batch_size and seq_len must be positive")
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    device = torch.device(device)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    if diverge_loss is None:
        diverge_loss = math.log(cfg.vocab_size) + 1.0
    t_start = time.perf_counter()
    model, opt = _build(method, cfg, seed, lr, init_state, state_dtype, device)
    sched = LambdaLR(opt, lr_lambda(steps, final_lr_frac))
    gen = torch.Generator().manual_seed(seed)
    val_small = [(x.to(device), y.to(device)) for x, y in eval_batches(data.val, batch_size, seq_len, eval_batches_n)]
    val_final = [(x.to(device), y.to(device))
                 for x, y in eval_batches(data.val, batch_size, seq_len, final_eval_batches_n)]

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start, resumed_from = 0, None
    if ckpt is not None and ckpt.exists():
        loaded = load_checkpoint(ckpt, model, opt, sched)
        loop = loaded["extra"]
        if loop.get("steps") != steps or loop.get("method") != method.name or loop.get("seed") != seed:
            raise ValueError(f"checkpoint {str(ckpt)!r} is of another run ({loop.get('method')}, seed "
                             f"{loop.get('seed')}, {loop.get('steps')} steps); delete it or use another --out")
        gen.set_state(loop["generator"])
        start = resumed_from = int(loaded["step"])
        initial = loop["initial"]
        val_curve = [(int(a), b) for a, b in loop["val_curve"]]
        train_curve = [(int(a), b) for a, b in loop["train_curve"]]
        ema, nonfinite_run, train_time = loop["ema"], int(loop["nonfinite_run"]), float(loop["train_time"])
        report_fields: dict[str, Any] | None = loop["report"]
    else:
        initial = evaluate(model, val_small)
        val_curve = [(0, _finite(initial))]
        train_curve = []
        ema, nonfinite_run, train_time = None, 0, 0.0
        report_fields = None
    status, diverged_at = "ok", None
    steps_done = start

    from tqdm.auto import tqdm  # the `app` extra; imported on first use so the app imports without it
    bar = tqdm(total=steps, initial=start, desc=f"{method.name:>14s}", disable=not progress, dynamic_ncols=True,
               leave=True)
    model.train()
    for step in range(start + 1, steps + 1):
        x, y = get_batch(data.train, batch_size, seq_len, gen)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        # Every method, the dense torch.optim baseline included, clips with torch's norm (per-tensor fp32 norms):
        # the comparison then differs only in how weights are stored. `opt.clip_grad_norm_` (the library's fused
        # clip, accumulated in fp64) computes a norm that can differ from torch's in its last bits, which would
        # make the methods' clipping differ. Non-finite gradients pass through clipping as NaN; the optimizer then
        # skips the step (nonfinite="skip").
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's GPU work is queued, not done, when step() returns
        train_time += time.perf_counter() - t0
        steps_done = step
        if report_fields is None:  # after the first step, so the optimizer state exists
            rep = memory_report(model, opt)
            report_fields = {"bytes_per_param": rep.bytes_per_param, "total_bytes": rep.total_bytes,
                             "numel": rep.numel}

        lv = loss.detach().item()
        if math.isfinite(lv):
            nonfinite_run = 0
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        else:
            nonfinite_run += 1
        diverged = nonfinite_run >= max_nonfinite or (ema is not None and ema > diverge_loss and step > 1)
        if step % eval_every == 0 and step < steps and not diverged:
            v = evaluate(model, val_small)
            val_curve.append((step, _finite(v)))
            train_curve.append((step, ema))
            diverged = not math.isfinite(v)
        if diverged:
            status, diverged_at = "diverged", step
            break
        bar.update(1)
        if step % 5 == 0 or step == steps:
            bar.set_postfix(loss=f"{ema:.3f}" if ema is not None else "nan", refresh=False)
        if ckpt is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            loop = {"method": method.name, "seed": seed, "steps": steps, "generator": gen.get_state(),
                    "initial": initial, "val_curve": [list(p) for p in val_curve],
                    "train_curve": [list(p) for p in train_curve], "ema": ema, "nonfinite_run": nonfinite_run,
                    "train_time": train_time, "report": report_fields}
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, model, opt, sched, step=step, extra=loop)
        if stop_after is not None and step >= stop_after:
            bar.close()
            return None
    bar.close()

    # The curve's last point uses the same batches as the others (no step in the curve from a change of
    # eval set); the reported final loss uses 4x more batches for a less noisy comparison between methods.
    val_curve.append((steps_done, _finite(evaluate(model, val_small))))
    final = evaluate(model, val_final)
    if status == "ok" and not math.isfinite(final):
        status, diverged_at = "diverged", steps_done
    train_curve.append((steps_done, ema))
    assert report_fields is not None
    return RunResult(
        method=method.name, label=method.label, format=method.format, granularity=method.granularity,
        mode=None if method.dense else method.mode, rounding=None if method.dense else method.rounding,
        steps=steps, steps_done=steps_done, status=status, final_val_loss=_finite(final),
        initial_val_loss=_finite(initial), final_train_loss=ema, val_curve=val_curve, train_curve=train_curve,
        bytes_per_param=report_fields["bytes_per_param"], total_bytes=report_fields["total_bytes"],
        numel=report_fields["numel"],
        tokens_per_s=steps_done * batch_size * seq_len / max(train_time, 1e-9),
        wall_s=time.perf_counter() - t_start, skipped_steps=opt.skipped_steps, threads=threads,
        diverged_at=diverged_at, seed=seed, peak_lr=lr, resumed_from=resumed_from,
        state_dict={k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if keep_state else None,
    )


# --------------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------------

def pretrain(cfg: LlamaConfig | ModelConfig, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
             data: Corpus, progress: bool = True, **kwargs: Any) -> RunResult:
    """Train a dense fp32 model (the ``fp32_mw`` row) and keep its state_dict in ``result.state_dict``."""
    result = train_run(DENSE, cfg, steps, batch_size, seq_len, lr, seed, data, progress, keep_state=True, **kwargs)
    assert result is not None  # None only with stop_after
    return result


def finetune(base_state: dict[str, torch.Tensor], cfg: LlamaConfig | ModelConfig, methods: Sequence[Method],
             steps: int, batch_size: int, seq_len: int, lr: float, seed: int, data: Corpus, progress: bool = True,
             **kwargs: Any) -> list[RunResult]:
    """Fine-tune every method from the same dense checkpoint on ``data``.

    Each quantized method first casts the checkpoint's block linears to its format (RTN), so its
    ``initial_val_loss`` is the loss of the quantized checkpoint before any fine-tuning, and
    ``final_val_loss`` the loss after; the dense ``fp32_mw`` row's ``initial_val_loss`` is the checkpoint's own.
    """
    results = [train_run(m, cfg, steps, batch_size, seq_len, lr, seed, data, progress, init_state=base_state,
                         **kwargs) for m in methods]
    return [r for r in results if r is not None]
