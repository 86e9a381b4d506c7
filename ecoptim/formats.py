"""Number formats and scale granularities, as small immutable value objects.

A *format* says which values a stored code can take (its grid) and how codes are kept in memory.
A *granularity* says which elements share one absmax scale. Together they make a ``QuantSpec``:

    scale = absmax(block) / format.max          (one fp32 scale per block)
    code  = round(w / scale)                    (onto the format's grid, see ``ecoptim.rounding``)
    w_hat = code * scale                        (dequantized value, computed in fp32)

Every grid here is symmetric, so the rounding code only needs the spacing between neighbouring grid points
at a given magnitude (``spacing``), the largest finite value (``max``) and whether the grid holds every fp32
value (``is_identity``): ``ecoptim.rounding`` works on that much (its ``Grid`` protocol), imports nothing from
here, and ``Format.round`` delegates to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .rounding import round_to_grid

__all__ = [
    "Format", "FloatFormat", "IntFormat", "FP8_E4M3", "FP8_E5M2", "BF16", "FP16", "FP32", "INT8", "INT4",
    "FORMATS", "get_format", "Granularity", "PerTensor", "PerRow", "PerGroup", "Unscaled", "get_granularity",
    "QuantSpec", "IN_DIMS", "with_in_dim",
]


class Format:
    """Base class of a number format. Subclasses are frozen dataclasses."""

    name: str
    bits: int
    max: float

    def spacing(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Distance between the grid points that bracket ``y`` (fp32 tensor, same shape)."""
        raise NotImplementedError

    def encode(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Store grid values ``q`` (fp32, already on the grid) as codes."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, numel: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Codes back to fp32 grid values (flat, ``numel`` elements)."""
        raise NotImplementedError

    def code_numel(self, numel: int) -> int:
        """How many storage elements ``numel`` values need."""
        return numel

    @property
    def is_identity(self) -> bool:
        """True when every fp32 value is on this grid (the FP32 format), so rounding onto it changes nothing."""
        return False

    def round(self, y: torch.Tensor, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Round scaled fp32 values onto this format's grid. A custom quantizer (e.g. a noise model in the
        theory tests) overrides this; the built-in formats use ``ecoptim.rounding``."""
        return round_to_grid(y, self, rounding, generator)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FloatFormat(Format):
    """A binary floating-point format with ``man_bits`` stored mantissa bits and subnormals.

    Grid spacing for |y| in the binade [2^k, 2^(k+1)) is 2^(k - man_bits) for k >= emin; below 2^emin
    (subnormals) it stays 2^(emin - man_bits). Values beyond ``max`` saturate to +-max.
    """

    name: str
    bits: int
    man_bits: int
    emin: int
    max: float
    storage_dtype: torch.dtype
    default_scaled: bool = True

    @property
    def is_identity(self) -> bool:
        # 23 stored mantissa bits (and fp32's exponent range) hold every fp32 value.
        return self.man_bits >= 23

    def spacing(self, y: torch.Tensor) -> torch.Tensor:
        # frexp gives |y| = m * 2^e with m in [0.5, 1), so floor(log2|y|) = e - 1 (exact, no log2 rounding).
        _, e = torch.frexp(y)
        k = (e - 1).clamp_(min=self.emin) - self.man_bits
        return torch.ldexp(torch.ones_like(y), k)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        # q is on the grid, so the cast is exact; it is only a change of storage.
        return q.to(self.storage_dtype)

    def decode(self, codes: torch.Tensor, numel: int) -> torch.Tensor:
        # copy=True: for the fp32 identity format a plain .to() would alias the stored codes.
        return codes.to(torch.float32, copy=True)


@dataclass(frozen=True)
class IntFormat(Format):
    """Symmetric integer grid {-qmax, ..., qmax} (spacing 1). ``bits == 4`` packs two codes per byte."""

    name: str
    bits: int
    max: float
    default_scaled: bool = True

    def spacing(self, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y)

    def code_numel(self, numel: int) -> int:
        return (numel + 1) // 2 if self.bits == 4 else numel

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q.to(torch.int8)
        # INT4: offset codes -7..7 to 1..15 and pack pairs: element 2i in the low nibble, 2i+1 in the high.
        u = (q.reshape(-1) + 8).to(torch.uint8)
        if u.numel() % 2:
            u = torch.cat([u, u.new_full((1,), 8)])  # pad with the code of 0.0
        u = u.view(-1, 2)
        return u[:, 0] | (u[:, 1] << 4)

    def decode(self, codes: torch.Tensor, numel: int) -> torch.Tensor:
        if self.bits == 8:
            return codes.to(torch.float32)
        lo = (codes & 0x0F).to(torch.int16)
        hi = (codes >> 4).to(torch.int16)
        return (torch.stack([lo, hi], dim=-1).reshape(-1)[:numel] - 8).to(torch.float32)


FP8_E4M3 = FloatFormat("fp8_e4m3", 8, man_bits=3, emin=-6, max=448.0, storage_dtype=torch.float8_e4m3fn)
FP8_E5M2 = FloatFormat("fp8_e5m2", 8, man_bits=2, emin=-14, max=57344.0, storage_dtype=torch.float8_e5m2)
BF16 = FloatFormat("bf16", 16, man_bits=7, emin=-126, max=torch.finfo(torch.bfloat16).max,
                   storage_dtype=torch.bfloat16, default_scaled=False)
FP16 = FloatFormat("fp16", 16, man_bits=10, emin=-14, max=65504.0, storage_dtype=torch.float16,
                   default_scaled=False)
#: The identity "format": every fp32 value is on its grid. Used to check optimizers against torch.optim.
FP32 = FloatFormat("fp32", 32, man_bits=23, emin=-126, max=torch.finfo(torch.float32).max,
                   storage_dtype=torch.float32, default_scaled=False)
INT8 = IntFormat("int8", 8, max=127.0)
INT4 = IntFormat("int4", 4, max=7.0)

FORMATS: dict[str, Format] = {f.name: f for f in (FP8_E4M3, FP8_E5M2, BF16, FP16, FP32, INT8, INT4)}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "bfloat16": "bf16", "float16": "fp16",
            "float32": "fp32"}


def get_format(fmt: str | Format) -> Format:
    """Look a format up by name (``"fp8_e4m3"``, ``"fp8"``, ``"int4"``, ...) or pass one through."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise ValueError(f"format must be a name or an ecoptim Format, got {type(fmt).__name__}")
    key = _ALIASES.get(fmt.lower(), fmt.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS) + sorted(_ALIASES)}")
    return FORMATS[key]


class Granularity:
    """Which elements share one scale. ``blocks`` maps a weight shape to (n_blocks, block_size).

    Blocks are consecutive in *storage order*: ``to_storage_order(w)`` (the logical order, except for a
    transposed weight, see ``PerRow.in_dim``) reshaped to ``(n_blocks, block_size)``.
    """

    def blocks(self, shape: torch.Size) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, shape: torch.Size) -> None:
        self.blocks(shape)

    @property
    def transposed(self) -> bool:
        """True when codes are stored in another order than the logical one (``in_dim=-2``): the fused kernel,
        which reads codes, gradient and moments in one order, does not apply to such a weight."""
        return False

    def to_storage_order(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (logical shape) in the order its codes are stored; blocks are consecutive in it."""
        return w

    def from_storage_order(self, v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of ``to_storage_order``: values in storage order back to a contiguous tensor of ``shape``."""
        return v.reshape(shape)


#: The reduction ("input") dimensions a row may run along: None (every dim after dim 0: nn.Linear, conv
#: kernels), -1 (the last dim; all leading dims index rows: stacked expert weights [E, out, in]), -2 (the
#: second to last dim; weights stored (in, out) like GPT-2's Conv1D or transposed experts [E, in, out]).
IN_DIMS = (None, -1, -2)


def _check_in_dim(in_dim: int | None) -> None:
    if in_dim not in IN_DIMS:
        raise ValueError(f"in_dim must be one of {IN_DIMS} (None: every dim after dim 0; -1: the last dim; -2: the "
                         f"second to last dim, a weight stored (in, out)), got {in_dim!r}")


def _prod(dims: tuple[int, ...] | torch.Size) -> int:
    n = 1
    for s in dims:
        n *= s
    return n


def _rows_cols(shape: torch.Size, in_dim: int | None = None) -> tuple[int, int]:
    """(rows, row length): a row is one output channel, its elements run along the reduction dims.

    in_dim None: dim 0 is the output channel and the rest is flattened (nn.Linear, conv kernels, 1-D vectors).
    in_dim -1: every leading dim indexes rows ([E, out, in]: E * out rows of ``in``). in_dim -2: the weight is
    stored (in, out) in its last two dims ([in, out]: ``out`` rows of ``in``; [E, in, out]: E * out rows).
    """
    if len(shape) == 0:
        return 1, 1
    if in_dim is None:
        return shape[0], _prod(shape[1:])
    if in_dim == -1:
        return _prod(shape[:-1]), shape[-1]
    if len(shape) < 2:
        raise ValueError(f"in_dim=-2 (a weight stored (in, out)) needs at least 2 dims, got shape {tuple(shape)}")
    return _prod(shape[:-2]) * shape[-1], shape[-2]


def _storage_order(w: torch.Tensor, in_dim: int | None) -> torch.Tensor:
    return w.transpose(-2, -1) if in_dim == -2 else w


def _from_storage_order(v: torch.Tensor, shape: torch.Size, in_dim: int | None) -> torch.Tensor:
    if in_dim != -2:
        return v.reshape(shape)
    stored = (*shape[:-2], shape[-1], shape[-2])
    return v.reshape(stored).transpose(-2, -1).contiguous()


def _in_dim_suffix(in_dim: int | None) -> str:
    return "" if in_dim is None else f"[in={in_dim}]"


@dataclass(frozen=True)
class Unscaled(Granularity):
    """No scale at all (BF16/FP16 weights, the FP32 identity format): one block of scale 1, not stored."""

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        n = 1
        for s in shape:
            n *= s
        return 1, n

    def __str__(self) -> str:
        return "unscaled"


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor (the paper's INT4 fine-tuning setting)."""

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        return Unscaled().blocks(shape)

    def __str__(self) -> str:
        return "tensor"


class _RowLayout(Granularity):
    """Shared by the per-row and per-group granularities: which dims a row runs along (``in_dim``)."""

    in_dim: int | None

    @property
    def transposed(self) -> bool:
        return self.in_dim == -2

    def to_storage_order(self, w: torch.Tensor) -> torch.Tensor:
        return _storage_order(w, self.in_dim)

    def from_storage_order(self, v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return _from_storage_order(v, shape, self.in_dim)


@dataclass(frozen=True)
class PerRow(_RowLayout):
    """One scale per output channel: the paper's FP8 setting.

    ``in_dim`` says which dims a row runs along (``IN_DIMS``): None, every dim after dim 0 (an ``nn.Linear``
    weight [out, in], a conv kernel); -1, the last dim, so an expert stack [E, out, in] has E * out scales;
    -2, the second to last dim, for a weight stored (in, out) (GPT-2's ``Conv1D``: one scale per output
    column; its codes are stored transposed so that each row's codes are consecutive).
    """

    in_dim: int | None = None

    def __post_init__(self) -> None:
        _check_in_dim(self.in_dim)

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        return _rows_cols(shape, self.in_dim)

    def __str__(self) -> str:
        return "row" + _in_dim_suffix(self.in_dim)


@dataclass(frozen=True)
class PerGroup(_RowLayout):
    """One scale per ``group_size`` consecutive elements along a row (rows as for ``PerRow(in_dim)``)."""

    group_size: int = 128
    in_dim: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        _check_in_dim(self.in_dim)

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        rows, cols = _rows_cols(shape, self.in_dim)
        if cols % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the row length {cols} of a weight of shape "
                f"{tuple(shape)}; pick a group size that divides it or use granularity='row'")
        return rows * cols // self.group_size, self.group_size

    def __str__(self) -> str:
        return f"group{self.group_size}" + _in_dim_suffix(self.in_dim)


def with_in_dim(g: Granularity, in_dim: int | None) -> Granularity:
    """``g`` with its rows running along ``in_dim`` (per-row and per-group granularities; the others, whose
    blocks do not depend on the layout, are returned unchanged)."""
    if isinstance(g, PerRow):
        return PerRow(in_dim)
    if isinstance(g, PerGroup):
        return PerGroup(g.group_size, in_dim)
    return g


def get_granularity(g: str | int | Granularity | None, fmt: Format) -> Granularity:
    """Parse ``"tensor" | "row" | "group128" | 128 | "none"``; ``None`` picks the format's default
    (per-row for FP8/INT, unscaled for BF16/FP16/FP32)."""
    if isinstance(g, Granularity):
        return g
    if g is None:
        return PerRow() if getattr(fmt, "default_scaled", True) else Unscaled()
    if isinstance(g, int) and not isinstance(g, bool):
        return PerGroup(g)
    if isinstance(g, str):
        s = g.lower()
        m = re.fullmatch(r"(.+)\[in=(-?\d+)\]", s)
        if m:  # "row[in=-1]", "group32[in=-2]": the spelling str() gives
            base = get_granularity(m.group(1), fmt)
            if isinstance(base, (PerRow, PerGroup)) and base.in_dim is None and int(m.group(2)) in (-1, -2):
                return with_in_dim(base, int(m.group(2)))
            raise ValueError(f"unknown granularity {g!r}; '[in=-1]' / '[in=-2]' follow 'row' or 'group<G>'")
        if s in ("tensor", "per_tensor", "pertensor"):
            return PerTensor()
        if s in ("row", "per_row", "channel", "per_channel"):
            return PerRow()
        if s in ("none", "unscaled"):
            return Unscaled()
        for prefix in ("per_group", "group", "g"):
            if s.startswith(prefix) and s[len(prefix):].lstrip("_:").isdigit():
                return PerGroup(int(s[len(prefix):].lstrip("_:")))
    raise ValueError(f"unknown granularity {g!r}; use 'tensor', 'row', 'group<G>' (e.g. 'group128'), "
                     "an int group size, or 'none'")


@dataclass(frozen=True)
class QuantSpec:
    """A format plus a granularity: everything needed to quantize one weight."""

    format: Format
    granularity: Granularity

    @staticmethod
    def make(format: str | Format = "fp8_e4m3", granularity: str | int | Granularity | None = None) -> "QuantSpec":
        fmt = get_format(format)
        return QuantSpec(fmt, get_granularity(granularity, fmt))

    @property
    def scaled(self) -> bool:
        return not isinstance(self.granularity, Unscaled)

    def __str__(self) -> str:
        return f"{self.format}/{self.granularity}"
