"""Codes <-> fp32 for every weight format of the fused step, and rounding onto a format's grid, as Triton functions.

Every float -> code encoder is written with integer bit operations: Triton's interpreter gets its built-in fp8 and
bf16 casts wrong (ties, carries into the exponent, subnormals, overflow; bf16 truncates), and bit operations are
also what makes the GPU's results the reference's regardless of the hardware's conversion instructions. Decoders
build the fp32 bit pattern (normal values) or multiply a small integer by a power of two (fp8 subnormals), both
exact. The helpers mirror ``ecoptim/csrc/codecs.h`` (the CPU kernel), which is bit-identical to the reference path
(``ecoptim/rounding.py``, ``ecoptim/formats.py``).

Codes travel as integer tensors: fp8 as uint8, int8 as int8, packed int4 and fp4 as uint8 (element 2i in the
low nibble; int4 stored q + 8, fp4 E2M1 as sign bit 3, exponent bits 2:1, mantissa bit 0), bf16 as int16. Block
scales are fp32 (absmax) or E8M0 bytes (the MX formats: X = 2^(code - 127), ``e8m0_value`` / ``e8m0_code``).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["FP8_E4M3", "FP8_E5M2", "INT8", "BF16", "INT4", "FP4_E2M1", "FORMAT_IDS", "PACKED", "ABSMAX_SCALE",
           "E8M0_FLOOR", "E8M0_CEIL", "SCALE_IDS", "bits_of", "float_of", "bf16_to_f32", "f32_to_bf16", "decode",
           "round_nearest", "round_stochastic", "code_of", "block_scale", "e8m0_value", "e8m0_code", "is_finite",
           "load_f32", "load_weight"]

# format ids (the kernels' FMT constexpr); the values of ecoptim/backends/cpu/abi.py's eco_format
FP8_E4M3: tl.constexpr = tl.constexpr(0)
FP8_E5M2: tl.constexpr = tl.constexpr(1)
INT8: tl.constexpr = tl.constexpr(2)
BF16: tl.constexpr = tl.constexpr(3)
INT4: tl.constexpr = tl.constexpr(4)
FP4_E2M1: tl.constexpr = tl.constexpr(5)
# the kernels' FMT of each op format name: an MX format steps its element format's grid and codes
FORMAT_IDS = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2, "bf16": 3, "int4": 4, "fp4_e2m1": 5, "mxfp8": 0, "mxfp4": 5}
# the formats whose codes are nibbles, two per byte
PACKED = frozenset({INT4.value, FP4_E2M1.value})
# scale formats (the kernels' SCALE constexpr; ecoptim/backends/cpu/abi.py's eco_scale_format values)
ABSMAX_SCALE: tl.constexpr = tl.constexpr(0)
E8M0_FLOOR: tl.constexpr = tl.constexpr(1)
E8M0_CEIL: tl.constexpr = tl.constexpr(2)
SCALE_IDS = {"absmax": 0, "e8m0": 1, "e8m0_ceil": 2}


@triton.jit
def bits_of(x):
    """The bits of fp32 ``x`` as uint32."""
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def float_of(u):
    """The fp32 whose bits are uint32 ``u``."""
    return u.to(tl.float32, bitcast=True)


@triton.jit
def is_finite(x):
    """|x| <= FLT_MAX, from the bits (a NaN or Inf has an all-ones exponent)."""
    return (bits_of(x) & 0x7F800000) != 0x7F800000


@triton.jit
def bf16_to_f32(h):
    """int16 bf16 bits -> fp32 (exact: the top half of an fp32)."""
    return float_of(h.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def f32_to_bf16(x):
    """fp32 -> int16 bf16 bits, c10::BFloat16's rounding: to nearest even on the bit pattern, NaN -> 0x7FC0."""
    u = bits_of(x)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _fp8_decode(c, MAN: tl.constexpr, BIAS: tl.constexpr, SPECIAL_E5M2: tl.constexpr):
    # c: the code as uint32 in 0..255. Normal: the fp32 with the code's exponent re-biased and its mantissa at the
    # top; subnormal (exponent field 0): mantissa * 2^(1 - bias - man), an exact product of small integer and
    # power of two (a normal fp32). E4M3 (fn): S.1111.111 is NaN; E5M2: exponent 31 is Inf / NaN.
    sign = (c & 0x80) << 24
    e = (c >> MAN) & ((1 << (7 - MAN)) - 1)
    mnt = c & ((1 << MAN) - 1)
    normal = float_of(sign | ((e + (127 - BIAS)) << 23) | (mnt << (23 - MAN)))
    sub = mnt.to(tl.float32) * (2.0 ** (1 - BIAS - MAN))
    sub = tl.where(sign != 0, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    if SPECIAL_E5M2:
        special = tl.where(mnt == 0, float_of(sign | 0x7F800000), float("nan"))
        v = tl.where(e == 31, special, v)
    else:
        v = tl.where((e == 15) & (mnt == 7), float("nan"), v)
    return v


@triton.jit
def decode(codes, j, mask, FMT: tl.constexpr):
    """Elements ``j`` (int64 indices, ``mask``: which exist) of ``codes`` as their exact fp32 values."""
    if FMT == INT4:
        byte = tl.load(codes + (j >> 1), mask=mask, other=0).to(tl.int32)
        v = ((byte >> ((j & 1) * 4).to(tl.int32)) & 0xF) - 8
        return v.to(tl.float32)
    elif FMT == FP4_E2M1:
        # the fields placed as an fp32's exponent and mantissa give the value * 2^-126 (0.5 lands on an fp32
        # subnormal); one multiply by 2^126 is exact
        byte = tl.load(codes + (j >> 1), mask=mask, other=0).to(tl.uint32)
        n = (byte >> ((j & 1) * 4).to(tl.uint32)) & 0xF
        return float_of(((n & 7) << 22) | ((n & 8) << 28)) * (2.0 ** 126)
    elif FMT == INT8:
        return tl.load(codes + j, mask=mask, other=0).to(tl.float32)
    elif FMT == BF16:
        return bf16_to_f32(tl.load(codes + j, mask=mask, other=0))
    elif FMT == FP8_E4M3:
        return _fp8_decode(tl.load(codes + j, mask=mask, other=0).to(tl.uint32), 3, 7, False)
    else:
        return _fp8_decode(tl.load(codes + j, mask=mask, other=0).to(tl.uint32), 2, 15, True)


@triton.jit
def _grid_exponent(y, MAN: tl.constexpr, EMIN: tl.constexpr):
    # the biased fp32 exponent of the grid spacing at y: 2^(max(floor(log2|y|), emin) - man)
    e = ((bits_of(y) >> 23) & 0xFF).to(tl.int32)
    return tl.maximum(e, EMIN + 127) - MAN


@triton.jit
def round_nearest(y, FMT: tl.constexpr):
    """``y`` (already divided by the scale and clamped to +-max) rounded to the nearest grid value, ties to even,
    keeping the sign of y (a -0 has its own code): rounding.round_nearest. Grid formats: (|y| + M) - M with
    M = 1.5 * 2^23 * spacing is spacing * round_half_even(|y| / spacing) exactly (|y| < 2^22 * spacing)."""
    if FMT == BF16:
        u = bits_of(y)
        return float_of((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000)
    else:
        ay = tl.abs(y)
        if FMT == FP8_E4M3:
            magic = float_of(((_grid_exponent(y, 3, -6) + 23) << 23).to(tl.uint32) | 0x400000)
        elif FMT == FP8_E5M2:
            magic = float_of(((_grid_exponent(y, 2, -14) + 23) << 23).to(tl.uint32) | 0x400000)
        elif FMT == FP4_E2M1:
            magic = float_of(((_grid_exponent(y, 1, 0) + 23) << 23).to(tl.uint32) | 0x400000)
        else:
            magic = 12582912.0  # 1.5 * 2^23: integer grids
        q = (ay + magic) - magic
        return float_of(bits_of(q) | (bits_of(y) & 0x80000000))


@triton.jit
def round_stochastic(y, u, FMT: tl.constexpr):
    """``y`` (scaled and clamped) rounded up to the next grid value with probability (y - floor) / spacing, given
    the uniform ``u``: rounding.round_stochastic's comparisons (y / spacing and the fraction are exact).

    On NVIDIA GPUs ``tl.floor`` compiles to ``cvt.rmi.ftz`` (a subnormal argument flushed to zero first). That
    changes the floor of a negative subnormal r only (-0 instead of -1), and the result is +0 either way: with -1,
    r - floor rounds to 1 > u and -1 + 1 = +0; with -0, r - floor = r < 0 <= u and -0 + 0 = +0."""
    if FMT == BF16:
        # the bf16 spacing is the unit of bit 16 (subnormals included): the fraction is L / 2^16 above zero and
        # 1 - L / 2^16 below (L = the low 16 bits); "up" adds a grid step to the magnitude above zero, "not up"
        # below zero
        b = bits_of(y)
        low = b & 0xFFFF
        top = b & 0xFFFF0000
        neg = (b >> 31) != 0
        fl = low.to(tl.float32) * (2.0 ** -16)
        up = u < tl.where(neg, 1.0 - fl, fl)
        q = top + tl.where(up != neg, 0x10000, 0).to(tl.uint32)
        q = tl.where(low == 0, b, q)
        # the reference computes floor + {0, 1}, which is +0 where the result is zero (-0 + 0 = +0, -1 + 1 = +0)
        return float_of(tl.where(q == 0x80000000, 0, q))
    elif FMT == INT8 or FMT == INT4:
        f = tl.floor(y)
        return f + tl.where(u < y - f, 1.0, 0.0)
    else:
        if FMT == FP8_E4M3:
            k = _grid_exponent(y, 3, -6)
        elif FMT == FP4_E2M1:
            k = _grid_exponent(y, 1, 0)
        else:
            k = _grid_exponent(y, 2, -14)
        sp = float_of((k << 23).to(tl.uint32))
        r = y * float_of(((254 - k) << 23).to(tl.uint32))  # y / sp, exactly
        f = tl.floor(r)
        return (f + tl.where(u < r - f, 1.0, 0.0)) * sp


@triton.jit
def _fp8_code(q, MAN: tl.constexpr, BIAS: tl.constexpr):
    # q on the grid, |q| <= max. Normal: exponent re-biased, top mantissa bits. Subnormal in the format (a normal
    # fp32): |q| / 2^(1 - bias - man) is the integer (2^23 + f) >> (151 - bias - man - e), exact on the grid.
    u = bits_of(q)
    sign = (u >> 24) & 0x80
    au = u & 0x7FFFFFFF
    e = (au >> 23).to(tl.int32)
    big_e = e - 127 + BIAS
    normal = (big_e.to(tl.uint32) << MAN) | ((au >> (23 - MAN)) & ((1 << MAN) - 1))
    shift = tl.minimum(tl.maximum(151 - BIAS - MAN - e, 0), 31).to(tl.uint32)
    sub = tl.where(au == 0, 0, ((au & 0x7FFFFF) | 0x800000) >> shift)
    return (sign | tl.where(big_e >= 1, normal, sub)).to(tl.uint8)


@triton.jit
def code_of(q, FMT: tl.constexpr):
    """The code of grid value ``q``: uint8 (fp8), int8, int16 (bf16 bits) or, for int4 and fp4, the nibble as
    int32 (q + 8; fp4: the E2M1 fields with the sign in bit 3; the caller packs two per byte)."""
    if FMT == BF16:
        return (bits_of(q) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
    elif FMT == INT8:
        return q.to(tl.int32).to(tl.int8)
    elif FMT == INT4:
        return q.to(tl.int32) + 8
    elif FMT == FP4_E2M1:
        c = _fp8_code(q, 1, 1).to(tl.int32)  # fp8's fields with E2M1's widths, the sign moved from bit 7 to 3
        return (c & 0x7) | ((c >> 4) & 0x8)
    elif FMT == FP8_E4M3:
        return _fp8_code(q, 3, 7)
    else:
        return _fp8_code(q, 2, 15)


@triton.jit
def block_scale(amax, fmax):
    """codec.compute_scale of one block (formats.AbsmaxScale.encode): max(amax / max, 2^-126), one ulp down where
    scale * max would overflow."""
    s = tl.div_rn(amax, fmax)
    s = tl.where(s < 2.0 ** -126, 2.0 ** -126, s)
    over = (~is_finite(s * fmax)) & is_finite(s)
    return tl.where(over, float_of(bits_of(s) - 1), s)


@triton.jit
def e8m0_value(c):
    """2^(c - 127) for E8M0 code ``c`` (uint32; 0 is the fp32 subnormal 2^-127; 255, NaN, is never written)."""
    return tl.where(c == 0, float_of(c * 0 + 0x400000), float_of(c << 23))


@triton.jit
def e8m0_code(amax, fmax, EMAX: tl.constexpr, CEIL: tl.constexpr):
    """formats.E8M0Scale.encode of one block (as int32 code e + 127): e = floor(log2(amax)) - emax, plus one
    where the ceil rule finds amax > max * 2^e, -127 for an all-zero block, clamped to [-127, 127 - emax].
    floor(log2) is the exponent field (a subnormal amax gives e < -127 either way, clamped); max * 2^e is exact
    for every e the clamp does not override (2^-127 as 2^-126 / 2)."""
    ex = ((bits_of(amax) >> 23) & 0xFF).to(tl.int32)
    e = tl.where(ex == 0, -127, ex - 127) - EMAX
    if CEIL:
        k = tl.maximum(e, -126)
        lim = fmax * float_of(((k + 127) << 23).to(tl.uint32))
        lim = tl.where(e < -126, lim * 0.5, lim)
        e = tl.where(amax > lim, e + 1, e)
    e = tl.where(amax > 0, e, -127)
    return tl.minimum(tl.maximum(e, -127), 127 - EMAX) + 127


@triton.jit
def load_f32(ptr, j, mask, IS_BF16: tl.constexpr):
    """Elements ``j`` of an fp32 array, or of a bf16 one passed as int16 bits, as fp32."""
    if IS_BF16:
        return bf16_to_f32(tl.load(ptr + j, mask=mask, other=0))
    else:
        return tl.load(ptr + j, mask=mask, other=0.0)


@triton.jit
def load_weight(codes, scale, master, carried, j, mask, FMT: tl.constexpr, HAS_MASTER: tl.constexpr,
                HAS_CARRIED: tl.constexpr):
    """The weight an update starts from at elements ``j``: decode(code) * scale, or the master weight (mode
    'master'), plus the carried error (mode 'exact')."""
    if HAS_MASTER:
        w = tl.load(master + j, mask=mask, other=0.0)
    else:
        w = decode(codes, j, mask, FMT) * scale
    if HAS_CARRIED:
        w = w + tl.load(carried + j, mask=mask, other=0.0)
    return w
