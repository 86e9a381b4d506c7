"""Counter-based uniforms for stochastic rounding: u_i = H(key, i), reproducible by any implementation.

Stochastic rounding needs one U[0, 1) number per element. Drawing them with ``torch.rand`` costs more than
the whole optimizer step (a serial Mersenne-Twister stream, ~4 ns/element here) and cannot be reproduced
inside a fused kernel. Instead each quantization draws one 64-bit *key* from the caller's
``torch.Generator`` (so seeding, ``get_state``/``set_state``, checkpoints and DDP replica sync work exactly as
before) and the uniform for flat element index i is a hash of (key, i):

    h   = mix32(lo32(i) XOR k1)
    h   = mix32(h XOR (k2 + hi32(i)) mod 2^32)
    u_i = (h >> 8) * 2^-24                        (24 bits, the resolution of torch.rand for fp32)

with ``mix32`` the "lowbias32" integer hash (xor-shift / multiply, a bijection on 32 bits with full avalanche).
The fused CPU kernel (``ecoptim/csrc/rng.h``) computes the same function, so the reference and fast paths
round every element with the same number. ``tests/test_kernels.py`` checks uniformity and independence.

The same stream on every device: the uniforms are integer arithmetic (exact on any device, ``uniform_torch``),
and the keys come from a CPU generator (``KEY_DEVICE``) whatever device the rounded tensor lives on: the
optimizers keep one CPU generator (``QuantOptimizer.generator``), because ``torch.randint`` on a CUDA generator
(Philox) gives other numbers than on a CPU one (Mersenne Twister) for the same seed. So a seed gives the same keys,
uniforms and rounded bits on CPU and CUDA (``tests/test_device.py``), and reading a key never waits for a GPU.
"""
from __future__ import annotations

import torch

__all__ = ["KEY_DEVICE", "draw_key", "draw_keys", "draw_key_words", "uniform", "uniform_torch", "mix32"]

KEY_DEVICE = "cpu"
"""Where the optimizers' stochastic-rounding keys are drawn, for tensors on any device (see the module docstring)."""

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_MASK = 0xFFFFFFFF


def draw_key(generator: torch.Generator | None = None) -> tuple[int, int]:
    """One stochastic-rounding key (two 32-bit words) from ``generator`` (the global RNG if None)."""
    return draw_keys(generator, 1)[0]


def draw_keys(generator: torch.Generator | None, n: int) -> list[tuple[int, int]]:
    """``n`` keys in one draw: the same keys, and the same generator state after, as ``n`` calls of ``draw_key``
    (torch draws a CPU tensor's random numbers one element after another, tested); the optimizers draw a param
    group's keys this way, saving a torch call per tensor."""
    k = draw_key_words(generator, n).tolist()
    return [(k[i], k[i + 1]) for i in range(0, 2 * n, 2)]


def draw_key_words(generator: torch.Generator | None, n: int) -> torch.Tensor:
    """``draw_keys(generator, n)`` as one int64 tensor of their 2n words (key k: words 2k and 2k + 1), the same
    draw, for callers that hand the keys on as a tensor."""
    # the generator's own device: a CUDA generator passed in explicitly draws on CUDA (other keys than a CPU one)
    device = generator.device if generator is not None else KEY_DEVICE
    return torch.randint(0, 2 ** 32, (2 * n,), generator=generator, device=device, dtype=torch.int64)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without int64 overflow: split c into 16-bit halves (every product stays < 2^48).
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def mix32(x: int) -> int:
    """``mix32`` on one Python int (its low 32 bits), e.g. to derive keys."""
    x &= _MASK
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def uniform(key: tuple[int, int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n`` uniforms u_0 .. u_{n-1} of ``key`` (fp32, multiples of 2^-24 in [0, 1)).

    On CPU the C kernel computes them (~15x faster than the ~40 int64 tensor passes below, which stay as the
    portable implementation and the oracle: ``tests/test_kernels.py`` checks the two are equal)."""
    if torch.device(device).type == "cpu":
        from . import kernels  # late import: kernels builds C code on first use
        if kernels.available():
            return kernels.uniform(key, n)
    return uniform_torch(key, n, device)


def uniform_torch(key: tuple[int, int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``uniform`` in plain torch integer ops (any device)."""
    k1, k2 = int(key[0]) & _MASK, int(key[1]) & _MASK
    i = torch.arange(n, dtype=torch.int64, device=device)
    h = _mix32((i & _MASK) ^ k1)
    h = _mix32(h ^ ((k2 + (i >> 32)) & _MASK))
    return (h >> 8).to(torch.float32) * 2.0 ** -24
