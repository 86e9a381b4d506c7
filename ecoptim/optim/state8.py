"""Block-wise optimizer states: AdamW's moments in 8 or 4 bits per element plus one fp32 per block.

The scheme of Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022), as in
bitsandbytes' and torchao's 8-bit AdamW, with one safety change for the second moment. A state tensor x is
cut into blocks of ``block_size`` consecutive elements (flat, row-major) and stored as

    absmax_b = max |x| over block b                  (fp32, one per block)
    code_i   = sign(x_i) * index of round(|x_i| / absmax_b) in T      (uint8)
    x_i     ~= sign * T[index] * absmax_b

T is a "dynamic tree" magnitude table on [0, 1]: zero, then per decade E = 0, 1, ... (values in
(10^-(E+1), 10^-E]) 2^F evenly spaced points 10^-E * (0.1 + 0.9 * (k + 1) / 2^F), k < 2^F, with F = bits-1-E
fraction bits: many points near the block's absmax, ever fewer per decade below it, down to 10^-(bits-1). The
first moment (signed) uses a sign bit and a 7-bit index (128 magnitudes, smallest nonzero 1e-6); the second
moment (never negative) all 8 bits (256 magnitudes, smallest nonzero 1e-7). The largest element of a block is
stored exactly (T ends at 1.0).

Rounding of |x| / absmax onto T: to the nearest entry (a value exactly halfway goes to the smaller one), or
stochastic between the two neighbours lo <= y <= hi with P(hi) = (y - lo) / (hi - lo), so E[stored] = y (the
uniforms come from ``ecoptim.rng`` under a key derived from (optimizer seed, parameter, moment, step), see
``state_key``: no draw from the optimizer's generator, so the weights' own stochastic rounding is the same
whichever way the moments are stored). Round-to-nearest loses
an EMA update smaller than half a table step (the moment stops moving); stochastic rounding keeps it in
expectation.

Safety: a positive second moment is never stored as 0. It would turn AdamW's denominator into eps and the
step into m / eps (a blow-up); a v below the smallest table entry is stored as that entry instead (a larger v:
a smaller step), whatever the rounding.

4-bit states (``State4bit``, as in Li et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
and torchao's 4-bit AdamW): the same block-wise scheme with blocks of 128 and two codes packed per byte (element
2i in the low nibble, 2i+1 in the high one; codes flat, ceil(n/2) bytes). The first moment uses a sign bit and the
3-bit dynamic tree T3 = {0, 0.01, 0.055, 0.1, 0.325, 0.55, 0.775, 1.0}. The second moment uses the linear map
without zero L4 = {1/16, 2/16, ..., 16/16}: with 15 magnitudes a dynamic map's zero (or a tiny smallest entry)
would hold many of a block's elements, and 1/sqrt(v) blows up there (Li et al.'s "zero-point problem"); with L4
every element of a block whose absmax is positive is stored as at least absmax/16 (larger v: a smaller, never a
larger, step). An all-zero block stays zero (absmax 0).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..rng import mix32, uniform
from ..rounding import check_rounding

__all__ = ["BlockwiseState", "State8bit", "State4bit", "magnitude_table", "linear_table", "blocked", "quantize_state",
           "dequantize_state", "state_key", "quantize_state_torch", "dequantize_state_torch", "pack_nibbles",
           "unpack_nibbles"]


@dataclass(frozen=True)
class BlockwiseState:
    """AdamW moments of quantized weights stored block-wise in ``bits`` bits per element (see the module
    docstring): the common part of ``State8bit`` and ``State4bit``.

    ``block_size``: elements per fp32 absmax; ``rounding``: 'nearest' or 'stochastic' (unbiased) when a moment
    is stored back."""

    block_size: int = 256
    rounding: str = "nearest"
    bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if type(self) is BlockwiseState:
            raise TypeError("BlockwiseState is the common part of the state formats: use State8bit() or State4bit()")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"{type(self).__name__}.block_size must be a positive int, got {self.block_size!r}")
        check_rounding(self.rounding)

    def blocks(self, numel: int) -> int:
        """Number of absmax blocks of a state of ``numel`` elements."""
        return -(-numel // self.block_size)

    def code_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the uint8 codes of a moment of ``shape``: the shape itself (8 bits), or flat ceil(n/2) bytes
        (4 bits, two codes per byte)."""
        if self.bits == 8:
            return tuple(shape)
        n = 1
        for d in shape:
            n *= int(d)
        return (-(-n // 2),)

    def magnitudes(self, signed: bool) -> torch.Tensor:
        """The magnitude table of the first (``signed``) or second moment, ascending fp32 on [0, 1]."""
        raise NotImplementedError

    def nearest(self) -> "BlockwiseState":
        """The same encoding, rounding to nearest (how converted moments are encoded)."""
        return replace(self, rounding="nearest")

    def __reduce__(self):  # rebuilt by constructor call, which torch.load(weights_only=True) allows (below)
        return (type(self), (self.block_size, self.rounding))

    def __str__(self) -> str:
        return f"{self.bits}bit/block{self.block_size}" + ("/sr" if self.rounding == "stochastic" else "")


@dataclass(frozen=True)
class State8bit(BlockwiseState):
    """8-bit block-wise moments (see the module docstring).

    ``block_size``: elements per fp32 absmax (256 as in bitsandbytes/torchao: 1 + 4/256 B per element per
    moment); ``rounding``: 'nearest' or 'stochastic' (unbiased) when a moment is stored back."""

    block_size: int = 256
    bits: ClassVar[int] = 8

    def magnitudes(self, signed: bool) -> torch.Tensor:
        return magnitude_table(7 if signed else 8)


@dataclass(frozen=True)
class State4bit(BlockwiseState):
    """4-bit block-wise moments, two codes per byte (see the module docstring): the first moment on a sign bit
    and the 3-bit dynamic tree, the second on the linear map without zero {1/16, ..., 1}.

    ``block_size``: elements per fp32 absmax (128 as in torchao's 4-bit AdamW: 0.5 + 4/128 B per element per
    moment); ``rounding``: 'nearest' or 'stochastic' (unbiased) when a moment is stored back. Stepped on the
    reference path (the fused kernel knows only the 8-bit codec)."""

    block_size: int = 128
    bits: ClassVar[int] = 4

    def magnitudes(self, signed: bool) -> torch.Tensor:
        return magnitude_table(3) if signed else linear_table(16)


# optimizer state_dicts hold the group's State8bit / State4bit: let checkpoints load with weights_only=True
torch.serialization.add_safe_globals([State8bit, State4bit])

_TABLES: dict[int, torch.Tensor] = {}


def magnitude_table(bits: int) -> torch.Tensor:
    """The 2^bits magnitudes of the dynamic tree table, ascending, fp32 (entry 0 is 0, the last 1.0)."""
    if bits not in _TABLES:
        vals = [0.0]
        for e in range(bits):  # decade (10^-(e+1), 10^-e] with 2^f points
            f = bits - 1 - e
            vals += [10.0 ** -e * (0.1 + 0.9 * (k + 1) / 2 ** f) for k in range(2 ** f)]
        t = torch.tensor(sorted(vals), dtype=torch.float64).to(torch.float32)
        assert t.numel() == 2 ** bits and bool((t[1:] > t[:-1]).all()) and t[-1].item() == 1.0
        _TABLES[bits] = t
    return _TABLES[bits]


_LINEAR: dict[int, torch.Tensor] = {}


def linear_table(n: int) -> torch.Tensor:
    """The n magnitudes k/n, k = 1..n, ascending fp32 (no zero; the last is 1.0)."""
    if n not in _LINEAR:
        _LINEAR[n] = (torch.arange(1, n + 1, dtype=torch.float64) / n).to(torch.float32)
    return _LINEAR[n]


def state_key(seed: int, stream: int, signed: bool, step: int) -> tuple[int, int]:
    """The stochastic-rounding key of one moment (``signed``: the first) of the parameter with stream number
    ``stream`` at step ``step``: a hash, so resuming from a checkpoint reproduces it without any RNG state."""
    k1 = mix32(mix32(seed ^ (seed >> 32)) ^ mix32(2 * stream + int(signed)) ^ mix32(step + 0x9E3779B9))
    return k1, mix32(k1 ^ (step & 0xFFFFFFFF))


def blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flat view of x as (blocks, block), zero-padded at the end (zeros change no absmax)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def _tables(table: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    table = table.to(device)
    return table, (table[:-1] + table[1:]) * 0.5  # the entries and the rounding boundaries (fp32 midpoints)


_BKT0, _BKT_END = 0x3200, 0x3F80  # top 16 bits of 2^-27 and of 1.0: the buckets of csrc/state8.h's search
_SEARCH: dict[int, tuple[torch.Tensor, ...]] = {}


def search_tables(bits: int) -> tuple[torch.Tensor, ...]:
    """For the C codec: the table padded with +Inf, and per bucket of y values (the top 16 bits of y, from
    2^-27 to 1.0; smaller y all in bucket 0) an int32 (below << 17) | k for the midpoints (round to nearest)
    and for the entries (stochastic rounding): ``below`` of them lie under the bucket, and y in the bucket
    lies above its one midpoint (at or above its one entry) iff the low 16 bits of y are >= k (65536: none
    there). Checks that no bucket holds two of them (bucket 0 at most the entry 0.0), which makes that exact."""
    if bits not in _SEARCH:
        table, mid = _tables(magnitude_table(bits))
        top = torch.arange(_BKT0, _BKT_END + 1, dtype=torch.int32)
        starts = (top << 16).view(torch.float32).clone()
        starts[0] = 0.0  # bucket 0 also holds every y below 2^-27
        ends = torch.cat([starts[1:], torch.tensor([float("inf")])])
        out = []
        for p, strict in ((mid, True), (table, False)):
            below = torch.bucketize(starts, p)  # how many p < start
            inside = torch.bucketize(ends, p) - below  # how many p in [start, end)
            # bucket 0 spans [0, 2^-27 (1 + 2^-7)), not one top-16-bit value: it may only hold the entry 0.0
            # (y >= 0.0 always; its k = 0 says so)
            ok0 = int(inside[0]) == 0 or (not strict and float(p[0]) == 0.0 and int(inside[0]) == 1)
            assert int(inside.max()) <= 1 and ok0, "table boundaries too close for the search"
            b = p.view(torch.int32)[below.clamp(max=p.numel() - 1)]  # the one inside (if any)
            k = (b & 0xFFFF) + int(strict)  # y > mid  <=>  low16(y) >= low16(mid) + 1;  y >= entry: >= low16
            k = torch.where(inside > 0, k, torch.full_like(k, 65536))
            out.append(((below.to(torch.int32) << 17) | k).to(torch.int32))
        _SEARCH[bits] = (torch.cat([table, torch.tensor([float("inf")])]), out[0], out[1])
    return _SEARCH[bits]


def _c_codec(*tensors: torch.Tensor):
    """The C kernels if they apply to these tensors (contiguous, on CPU), else None."""
    if all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        from .. import kernels  # late import: builds C code on first use
        return kernels.load()
    return None


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit codes (values 0..15, any integer dtype) -> uint8 bytes, element 2i in the low nibble and 2i+1
    in the high one (an odd count leaves the last high nibble 0)."""
    c = idx.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.view(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def unpack_nibbles(codes: torch.Tensor, n: int) -> torch.Tensor:
    """``pack_nibbles``' inverse: the first ``n`` 4-bit codes of ``codes``, flat int64."""
    c = codes.reshape(-1).to(torch.int64)
    return torch.stack([c & 0xF, c >> 4], dim=1).reshape(-1)[:n]


def quantize_state(x: torch.Tensor, signed: bool, cfg: BlockwiseState, key: tuple[int, int] | None = None,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 state ``x`` -> (codes uint8 of ``cfg.code_shape(x.shape)``, absmax fp32 of shape (blocks,)).
    ``signed``: the first moment (sign bit + magnitude index); else the second moment (x >= 0, never stored as
    zero where positive). ``key``: the stochastic-rounding key (``state_key``), needed iff ``cfg.rounding`` is
    'stochastic'. ``out``: (codes, absmax) tensors to write into (returned). 8-bit states on CPU: a C loop
    computes it (the same operations, identical results; ``quantize_state_torch`` is the definition, and the
    tests check the two agree); 4-bit states: the torch definition."""
    if x.dtype != torch.float32:
        raise ValueError(f"quantize_state takes an fp32 tensor, got {x.dtype}")
    sr = cfg.rounding == "stochastic"
    if sr and key is None:
        raise ValueError("stochastic rounding of a state needs a key (see state_key)")
    lib = _c_codec(x, *(out or ())) if isinstance(cfg, State8bit) else None
    if lib is None:
        codes, absmax = quantize_state_torch(x, signed, cfg, key)
        if out is None:
            return codes, absmax
        out[0].copy_(codes)
        out[1].copy_(absmax)
        return out
    codes, absmax = out if out is not None else (torch.empty(x.shape, dtype=torch.uint8),
                                                 torch.empty(cfg.blocks(x.numel()), dtype=torch.float32))
    table, brtn, bsr = search_tables(7 if signed else 8)
    k1, k2 = key if sr else (0, 0)
    lib.eco_state8(x.data_ptr(), codes.data_ptr(), absmax.data_ptr(), table.data_ptr(),
                   brtn.data_ptr(), bsr.data_ptr(), brtn.numel(), x.numel(), cfg.block_size, table.numel() - 1,
                   int(signed), int(sr), k1 & 0xFFFFFFFF, k2 & 0xFFFFFFFF, 0, torch.get_num_threads())
    return codes, absmax


def quantize_state_torch(x: torch.Tensor, signed: bool, cfg: BlockwiseState,
                         key: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_state`` in torch ops (any device): the definition."""
    n, bs = x.numel(), cfg.block_size
    xb = blocked(x, bs)
    absmax = xb.abs().amax(dim=1)
    # |x| / absmax per block; an all-zero block divides by 1 (its codes are all 0)
    y = (xb.abs() / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)).reshape(-1)[:n]
    table, mid = _tables(cfg.magnitudes(signed), x.device)
    if cfg.rounding == "nearest":
        idx = torch.bucketize(y, mid)  # y == mid[i] -> i: the smaller entry
    else:
        # below the smallest entry (only a table without zero has room there): lo = 0 and the draw never goes
        # up, so such y is stored as that entry
        lo = (torch.bucketize(y, table, right=True) - 1).clamp_(0, table.numel() - 2)
        t_lo, t_hi = table[lo], table[lo + 1]
        u = uniform(key, n, x.device)
        idx = lo + (u < (y - t_lo) / (t_hi - t_lo)).to(lo.dtype)  # y = 1 (the absmax): always up, to 1.0
    if not signed and isinstance(cfg, State8bit):  # a positive second moment is never stored as zero (the
        idx = torch.where(y > 0, idx.clamp(min=1), idx)  # 4-bit map has no zero to avoid)
    codes = idx.to(torch.uint8)
    if signed:
        codes = codes | ((x.reshape(-1) < 0).to(torch.uint8) << (cfg.bits - 1))
    if cfg.bits == 4:
        return pack_nibbles(codes), absmax
    return codes.view(x.shape), absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, cfg: BlockwiseState,
                     shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """(codes, absmax) -> a fresh fp32 tensor: sign * T[index] * absmax of its block, of codes' shape (8 bits)
    or of ``shape`` (4 bits: the flat codes do not say it; required). 8-bit states on CPU: by the C loop,
    identical to ``dequantize_state_torch``."""
    lib = _c_codec(codes, absmax) if isinstance(cfg, State8bit) else None
    if lib is None:
        return dequantize_state_torch(codes, absmax, signed, cfg, shape)
    table, brtn, bsr = search_tables(7 if signed else 8)
    out = torch.empty(codes.shape, dtype=torch.float32)
    lib.eco_state8(out.data_ptr(), codes.data_ptr(), absmax.data_ptr(), table.data_ptr(), brtn.data_ptr(),
                   bsr.data_ptr(), brtn.numel(), codes.numel(), cfg.block_size, table.numel() - 1,
                   int(signed), 0, 0, 0, 1, torch.get_num_threads())
    return out


def dequantize_state_torch(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, cfg: BlockwiseState,
                           shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """``dequantize_state`` in torch ops (any device): the definition."""
    if cfg.bits == 4:
        if shape is None:
            raise ValueError("4-bit state codes are flat: pass the moment's shape to dequantize them")
        if tuple(codes.shape) != cfg.code_shape(shape):
            raise ValueError(f"4-bit state codes of shape {tuple(codes.shape)} do not hold a moment of shape "
                             f"{tuple(shape)} (expected {cfg.code_shape(shape)})")
        n = 1
        for d in shape:
            n *= int(d)
        c = unpack_nibbles(codes, n)
    else:
        shape, n = codes.shape, codes.numel()
        c = codes.reshape(-1).to(torch.int64)
    sign_bit = 1 << (cfg.bits - 1)
    table = cfg.magnitudes(signed).to(codes.device)
    mag = table[c & (sign_bit - 1)] if signed else table[c]
    val = blocked(mag, cfg.block_size).mul_(absmax.unsqueeze(1)).reshape(-1)[:n]
    if signed:
        val = torch.where(c >= sign_bit, -val, val)
    return val.reshape(shape).contiguous()
