"""Number formats and scale granularities, as small immutable value objects.

A *format* says which values a stored code can take (its grid) and how codes are kept in memory.
A *granularity* says which elements share one scale. Together they make a ``QuantSpec``:

    scale = absmax(block) / format.max          (one fp32 scale per block)
    code  = round(w / scale)                    (onto the format's grid, see ``ecoptim.rounding``)
    w_hat = code * scale                        (dequantized value, computed in fp32)

A *scale format* (``ScaleFormat``, the spec's third part) says how a block's scale is chosen and stored: the fp32
absmax scale above (``AbsmaxScale``, every format's default but the block-scaled ones), a power of two stored as
E8M0 (``E8M0Scale``: MXFP8, MXFP4) or an E4M3 block scale times an fp32 tensor scale (``E4M3TensorScale``: NVFP4).

Every grid here is symmetric, so the rounding code only needs the spacing between neighbouring grid points
at a given magnitude (``spacing``), the largest finite value (``max``) and whether the grid holds every fp32
value (``is_identity``): ``ecoptim.rounding`` works on that much (its ``Grid`` protocol), imports nothing from
here, and ``Format.round`` delegates to it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .rounding import round_to_grid

__all__ = [
    "Format", "FloatFormat", "IntFormat", "FP8_E4M3", "FP8_E5M2", "BF16", "FP16", "FP32", "INT8", "INT4",
    "FORMATS", "get_format", "Granularity", "PerTensor", "PerRow", "PerGroup", "Unscaled", "get_granularity",
    "QuantSpec", "IN_DIMS", "with_in_dim",
    "QuantSpec", "FP4_E2M1", "FP4Format", "BlockScaledFormat", "MXFP8", "MXFP4", "NVFP4", "ScaleFormat",
    "AbsmaxScale", "E8M0Scale", "E4M3TensorScale", "ABSMAX", "SCALE_FORMATS", "get_scale_format", "E2M1_VALUES",
    "largest_normal_exponent",
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

    @property
    def default_granularity(self) -> "Granularity | None":
        """The granularity ``get_granularity(None, fmt)`` picks; None: per-row if scaled, else unscaled."""
        return None

    @property
    def default_scale(self) -> "ScaleFormat":
        """How a block's scale is chosen and stored when the spec names none: the fp32 absmax scale."""
        return ABSMAX

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


# -- MX / NVFP4: FP4 elements and block scales stored in 8 bits -------------------------------------------
#: FP4 E2M1 magnitudes by 3-bit code (exponent bits 2:1, mantissa bit 0); bit 3 of a code is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class FP4Format(FloatFormat):
    """FP4 E2M1 (OCP MX v1.0): sign, 2 exponent bits (bias 1), 1 mantissa bit, no Inf/NaN; grid
    {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives (spacing 0.5 below 2, 1 in [2, 4), 2 in [4, 6]).

    Codes are packed two per uint8, element 2i in the low nibble and 2i+1 in the high one: the byte layout of
    ``torch.float4_e2m1fn_x2`` (``codes.view(torch.float4_e2m1fn_x2)`` is that dtype). The codes stay uint8
    because torch has no CPU cast, comparison or ``torch.equal`` for the fp4 dtype.
    """

    def code_numel(self, numel: int) -> int:
        return (numel + 1) // 2

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        q = q.reshape(-1)
        table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=q.device)
        # q is on the grid, so bucketize finds its exact index; the sign bit keeps -0.0 as fp8 casts do
        idx = torch.bucketize(q.abs(), table).to(torch.uint8)
        u = idx | (torch.signbit(q).to(torch.uint8) << 3)
        if u.numel() % 2:
            u = torch.cat([u, u.new_zeros(1)])  # pad with the code of +0.0
        u = u.view(-1, 2)
        return u[:, 0] | (u[:, 1] << 4)

    def decode(self, codes: torch.Tensor, numel: int) -> torch.Tensor:
        lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32,
                           device=codes.device)
        nibbles = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(-1)[:numel]
        return lut[nibbles.long()]


FP4_E2M1 = FP4Format("fp4_e2m1", 4, man_bits=1, emin=0, max=6.0, storage_dtype=torch.uint8)
_FP32_TINY = torch.finfo(torch.float32).tiny
_E4M3_MAX = 448.0
_E4M3_MIN_SUBNORMAL = 2.0 ** -9


class ScaleFormat:
    """How each block's scale is chosen from its absmax and stored. The codec sees two things:

        stored = encode(absmax, fmt)     # the scale tensor a QuantizedTensor keeps (its real bytes)
        X      = decode(stored)          # fp32 effective scale per block: y = w / X, w_hat = code * X

    Subclasses are frozen dataclasses whose ``str`` names them in specs and checkpoints.
    """

    name: str
    storage_dtype: torch.dtype

    def encode(self, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:  # pragma: no cover - abstract
        """Stored scale of blocks with fp32 absmax ``absmax`` (shape (n_blocks,)) for elements of ``fmt``."""
        raise NotImplementedError

    def decode(self, stored: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """fp32 effective scale X per block (shape (n_blocks,)) of a stored scale."""
        raise NotImplementedError

    def stored_shape(self, n_blocks: int) -> tuple[int, ...]:
        """Shape of the stored scale of ``n_blocks`` blocks."""
        return (n_blocks,)

    def problem(self, stored: torch.Tensor, n_blocks: int) -> str | None:
        """What is wrong with a stored scale given for ``n_blocks`` blocks (None: it is usable)."""
        if stored.dtype != self.storage_dtype or tuple(stored.shape) != self.stored_shape(n_blocks):
            return (f"is {stored.dtype} of shape {tuple(stored.shape)}, but a {self} scale of {n_blocks} blocks is "
                    f"{self.storage_dtype} of shape {self.stored_shape(n_blocks)}")
        x = self.decode(stored)
        if x.numel() and not bool(((x > 0) & torch.isfinite(x)).all()):
            return "is not finite and positive"
        return None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class AbsmaxScale(ScaleFormat):
    """One fp32 scale per block, X = absmax / fmt.max (so the block's largest element lands on +-max and
    nothing clamps); stored as the fp32 X itself."""

    name = "absmax"
    storage_dtype = torch.float32

    def encode(self, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
        scale = (absmax / fmt.max).clamp_(min=_FP32_TINY)
        # Near the top of the fp32 range absmax/max can round up so far that max*scale overflows to inf
        # (e.g. INT8 with absmax = FLT_MAX): step such scales one ulp down so every dequantized value is finite.
        over = torch.isinf(scale * fmt.max) & torch.isfinite(scale)
        if bool(over.any()):
            scale = torch.where(over, torch.nextafter(scale, torch.zeros_like(scale)), scale)
        return scale

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored


def largest_normal_exponent(fmt: Format) -> int:
    """emax of an element format: floor(log2(fmt.max)) (8 for E4M3's 448, 2 for E2M1's 6)."""
    return math.frexp(fmt.max)[1] - 1


@dataclass(frozen=True)
class E8M0Scale(ScaleFormat):
    """OCP MX shared scale: X = 2^e per block, stored as E8M0 (``torch.float8_e8m0fnu``, exponent bias 127).

    rule="floor" (the OCP MX v1.0 definition): e = floor(log2(absmax)) - emax_elem. Then absmax / X lies in
    [2^emax, 2^(emax+1)), which can exceed the element max (448 for E4M3, 6 for E2M1): such elements clamp
    to +-max. rule="ceil" picks the smallest e with absmax <= max * 2^e (floor's e, plus one where floor's
    would clamp; the RCEIL mode of NVIDIA's MX conversions and torch's reference ``to_mxfp``), so nothing
    clamps, at the price of one binade less resolution in those blocks. Both compute e exactly (frexp, no log2).

    e is clamped to [-127, 127 - emax_elem]: E8M0's range, and the top keeps max * X finite. An all-zero block
    gets e = -127 (any e codes it as zeros).
    """

    rule: str = "floor"
    storage_dtype = torch.float8_e8m0fnu

    def __post_init__(self) -> None:
        if self.rule not in ("floor", "ceil"):
            raise ValueError(f"E8M0Scale rule must be 'floor' (OCP MX) or 'ceil' (no clamping), got {self.rule!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "e8m0" if self.rule == "floor" else "e8m0_ceil"

    def exponent(self, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
        """The shared exponent e per block (int32)."""
        emax = largest_normal_exponent(fmt)
        _, ex = torch.frexp(absmax)  # absmax = m * 2^ex, m in [0.5, 1): floor(log2(absmax)) = ex - 1, exactly
        e = ex - 1 - emax
        if self.rule == "ceil":
            e = e + (absmax > torch.ldexp(torch.full_like(absmax, fmt.max), e)).to(e.dtype)
        e = torch.where(absmax > 0, e, torch.full_like(e, -127))
        return e.clamp_(-127, 127 - emax)

    def encode(self, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
        return (self.exponent(absmax, fmt) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(torch.float32)  # exact: 2^-127 .. 2^127 (code 255, NaN, is never written)


@dataclass(frozen=True)
class E4M3TensorScale(ScaleFormat):
    """NVFP4's two-level scale: an fp32 scale per tensor times an E4M3 scale per block.

        s_t = absmax(tensor) / (448 * fmt.max)               (fp32; at least FLT_MIN)
        s_b = E4M3_rne(min(absmax(block) / (fmt.max * s_t), 448)), and 2^-9 where that rounds to 0
        X   = s_b * s_t                                       (fp32, one rounding)

    s_t maps the tensor's absmax onto E4M3's largest value times the element max, so the block scales use
    E4M3's whole range. Rounding s_b to nearest can round it down, so a block's largest elements can exceed
    fmt.max by up to 1/16 and clamp. A block scale that would round to 0 (a block below 2^-10 of the tensor's
    range) is stored as E4M3's smallest subnormal instead, so every scale is positive and no division is by 0.

    Stored as one uint8 tensor of n_blocks + 4 bytes: the E4M3 block scales, then the four (native-order) bytes
    of the fp32 s_t. One tensor keeps every consumer of a quantized weight's ``scale`` (copies, checkpoints,
    memory counts) unchanged.
    """

    name = "e4m3_fp32"
    storage_dtype = torch.uint8

    def stored_shape(self, n_blocks: int) -> tuple[int, ...]:
        return (n_blocks + 4,)

    def tensor_scale(self, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
        """s_t (fp32, shape (1,)) from the blocks' absmax."""
        top = absmax.amax().reshape(1) if absmax.numel() else absmax.new_zeros(1)
        s_t = (top / (_E4M3_MAX * fmt.max)).clamp_(min=_FP32_TINY)
        for _ in range(4):  # step down an ulp while the largest dequantized value, fmt.max * 448 * s_t, overflows
            if bool(torch.isfinite((s_t * _E4M3_MAX) * fmt.max).all()):
                break
            s_t = torch.nextafter(s_t, torch.zeros_like(s_t))
        return s_t

    def encode(self, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
        s_t = self.tensor_scale(absmax, fmt)
        r = (absmax / (s_t * fmt.max)).clamp_(max=_E4M3_MAX)
        s_b = r.to(torch.float8_e4m3fn)
        s_b = torch.where(s_b.to(torch.float32) > 0, s_b,
                          torch.tensor(_E4M3_MIN_SUBNORMAL, device=r.device).to(torch.float8_e4m3fn))
        return torch.cat([s_b.view(torch.uint8), s_t.view(torch.uint8)])

    def parts(self, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_b as fp32 (n_blocks,), s_t as fp32 (1,)) of a stored scale."""
        nb = stored.numel() - 4
        return (stored[:nb].view(torch.float8_e4m3fn).to(torch.float32),
                stored[nb:].clone().view(torch.float32))

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        s_b, s_t = self.parts(stored)
        return s_b * s_t


ABSMAX = AbsmaxScale()
SCALE_FORMATS: dict[str, ScaleFormat] = {s.name: s for s in (ABSMAX, E8M0Scale("floor"), E8M0Scale("ceil"),
                                                              E4M3TensorScale())}
_SCALE_ALIASES = {"fp32": "absmax", "e8m0_floor": "e8m0", "ocp": "e8m0", "rceil": "e8m0_ceil", "nvfp4": "e4m3_fp32"}


def get_scale_format(s: str | ScaleFormat) -> ScaleFormat:
    """Look a scale format up by name (``"absmax"``, ``"e8m0"``, ``"e8m0_ceil"``, ``"e4m3_fp32"``) or pass one."""
    if isinstance(s, ScaleFormat):
        return s
    key = _SCALE_ALIASES.get(str(s).lower(), str(s).lower())
    if key not in SCALE_FORMATS:
        raise ValueError(f"unknown scale format {s!r}; choose one of {sorted(SCALE_FORMATS)}")
    return SCALE_FORMATS[key]


@dataclass(frozen=True)
class BlockScaledFormat(Format):
    """An element format that comes with its own block size and scale format: the OCP MX formats
    (E8M0 scale per 32 elements) and NVFP4 (E4M3 scale per 16 elements times an fp32 tensor scale).

    The grid, rounding and code storage are the element format's; ``QuantSpec.make("mxfp8")`` picks
    ``PerGroup(block_size)`` and ``scale`` (either can be overridden, e.g. ``QuantSpec.make("mxfp4", scale=
    "e8m0_ceil")``).
    """

    name: str
    element: Format
    block_size: int
    scale: ScaleFormat

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.element.bits

    @property
    def max(self) -> float:  # type: ignore[override]
        return self.element.max

    @property
    def storage_dtype(self) -> torch.dtype:
        return getattr(self.element, "storage_dtype", torch.uint8)

    @property
    def is_identity(self) -> bool:
        return self.element.is_identity

    @property
    def default_granularity(self) -> "Granularity":
        return PerGroup(self.block_size)

    @property
    def default_scale(self) -> ScaleFormat:
        return self.scale

    def spacing(self, y: torch.Tensor) -> torch.Tensor:
        return self.element.spacing(y)

    def code_numel(self, numel: int) -> int:
        return self.element.code_numel(numel)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        return self.element.encode(q)

    def decode(self, codes: torch.Tensor, numel: int) -> torch.Tensor:
        return self.element.decode(codes, numel)


MXFP8 = BlockScaledFormat("mxfp8", FP8_E4M3, 32, E8M0Scale("ceil"))
MXFP4 = BlockScaledFormat("mxfp4", FP4_E2M1, 32, E8M0Scale("ceil"))
NVFP4 = BlockScaledFormat("nvfp4", FP4_E2M1, 16, E4M3TensorScale())

FORMATS: dict[str, Format] = {f.name: f for f in (FP8_E4M3, FP8_E5M2, BF16, FP16, FP32, INT8, INT4)}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "bfloat16": "bf16", "float16": "fp16",
            "float32": "fp32"}
FORMATS.update({f.name: f for f in (FP4_E2M1, MXFP8, MXFP4, NVFP4)})
_ALIASES.update({"fp4": "fp4_e2m1", "e2m1": "fp4_e2m1"})


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
        if getattr(fmt, "default_granularity", None) is not None:  # the MX / NVFP4 block formats
            return fmt.default_granularity
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
    """A format, a granularity and a scale format: everything needed to quantize one weight.

    ``scale`` None (the default) takes the format's own (``Format.default_scale``): the fp32 absmax scale for
    FP8/INT/FP4, E8M0 for MXFP8/MXFP4, E4M3 x fp32 for NVFP4. Unscaled specs ignore it.
    """

    format: Format
    granularity: Granularity
    scale: ScaleFormat | None = None

    def __post_init__(self) -> None:
        if self.scale is None:
            object.__setattr__(self, "scale", getattr(self.format, "default_scale", ABSMAX))
        elif not isinstance(self.scale, ScaleFormat):
            raise ValueError(f"QuantSpec scale must be a ScaleFormat (e.g. get_scale_format('e8m0')), "
                             f"got {type(self.scale).__name__}")

    @staticmethod
    def make(format: str | Format = "fp8_e4m3", granularity: str | int | Granularity | None = None,
             scale: str | ScaleFormat | None = None) -> "QuantSpec":
        fmt = get_format(format)
        return QuantSpec(fmt, get_granularity(granularity, fmt), None if scale is None else get_scale_format(scale))

    @property
    def scaled(self) -> bool:
        return not isinstance(self.granularity, Unscaled)

    def __str__(self) -> str:
        # the format's own scale is implied by its name ("fp8_e4m3/row", "mxfp4/group32"); another one is named
        extra = "" if self.scale == getattr(self.format, "default_scale", ABSMAX) else f"/{self.scale}"
        return f"{self.format}/{self.granularity}{extra}"
