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

from dataclasses import dataclass

import torch

from .rounding import round_to_grid

__all__ = [
    "Format", "FloatFormat", "IntFormat", "FP8_E4M3", "FP8_E5M2", "BF16", "FP16", "FP32", "INT8", "INT4",
    "FORMATS", "get_format", "Granularity", "PerTensor", "PerRow", "PerGroup", "Unscaled", "get_granularity",
    "QuantSpec",
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
    """Which elements share one scale. ``blocks`` maps a weight shape to (n_blocks, block_size)."""

    def blocks(self, shape: torch.Size) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, shape: torch.Size) -> None:
        self.blocks(shape)


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    # A weight's "row" is one output channel: dim 0; the rest is flattened (conv kernels, 1-D vectors).
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


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


@dataclass(frozen=True)
class PerRow(Granularity):
    """One scale per output channel (row of dim 0): the paper's FP8 setting."""

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        return _rows_cols(shape)

    def __str__(self) -> str:
        return "row"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements along a row."""

    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        rows, cols = _rows_cols(shape)
        if cols % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the row length {cols} of a weight of shape "
                f"{tuple(shape)}; pick a group size that divides it or use granularity='row'")
        return rows * cols // self.group_size, self.group_size

    def __str__(self) -> str:
        return f"group{self.group_size}"


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
