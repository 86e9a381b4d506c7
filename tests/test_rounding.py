"""Every quantizer against its definition: grid membership, RNE ties, torch casts, SR neighbours and bias."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ecoptim import formats as F
from ecoptim.rounding import round_nearest, round_stochastic

TORCH_FLOAT = [F.FP8_E4M3, F.FP8_E5M2, F.BF16, F.FP16]


def all_fp8_values(fmt):
    """Every finite value of an FP8 format, from its 256 bit patterns."""
    v = torch.arange(256, dtype=torch.uint8).view(fmt.storage_dtype).to(torch.float32)
    return v[torch.isfinite(v)]


def grid(fmt):
    """The sorted finite grid of a format small enough to enumerate."""
    if isinstance(fmt, F.IntFormat):
        return torch.arange(-fmt.max, fmt.max + 1)
    return torch.unique(all_fp8_values(fmt))


@pytest.mark.parametrize("fmt", [F.FP8_E4M3, F.FP8_E5M2])
def test_every_fp8_value_round_trips_exactly(fmt):
    v = all_fp8_values(fmt)
    assert torch.equal(round_nearest(v, fmt), v)
    assert torch.equal(round_stochastic(v, fmt, torch.Generator().manual_seed(0)), v)
    assert fmt.max == v.max().item()


@pytest.mark.parametrize("fmt", TORCH_FLOAT)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_rtn_equals_torch_cast_within_range(fmt, data):
    xs = data.draw(st.lists(st.floats(-fmt.max, fmt.max, width=32, allow_subnormal=True), min_size=1, max_size=64))
    x = torch.tensor(xs, dtype=torch.float32)
    # add values with tiny magnitudes (subnormals of the target format) and exact ties
    x = torch.cat([x, x * 2.0 ** -10, x * 2.0 ** -20])
    ref = x.to(fmt.storage_dtype).to(torch.float32)
    assert torch.equal(round_nearest(x, fmt), ref)


@pytest.mark.parametrize("fmt", [F.FP8_E4M3, F.FP8_E5M2])
def test_rtn_ties_go_to_even_including_subnormals(fmt):
    g = grid(fmt)
    mids = (g[:-1] + g[1:]) / 2  # exact in fp32: all midpoints of neighbours
    r = round_nearest(mids, fmt)
    # the winner is the neighbour whose code (bit pattern) is even
    lo, hi = g[:-1], g[1:]
    lo_code = lo.to(fmt.storage_dtype).view(torch.uint8) & 1
    expect = torch.where(lo_code == 0, lo, hi)
    assert torch.equal(r, expect)
    assert torch.equal(r, mids.to(fmt.storage_dtype).to(torch.float32))


def test_e4m3_grid_spacing_matches_reference():
    # binade [2^k, 2^(k+1)) has spacing 2^(k-3) for k >= -6, subnormals 2^-9
    for k in range(-6, 8):
        y = torch.tensor([2.0 ** k * 1.3])
        assert F.FP8_E4M3.spacing(y).item() == 2.0 ** (k - 3)
    assert F.FP8_E4M3.spacing(torch.tensor([2.0 ** -8])).item() == 2.0 ** -9


@pytest.mark.parametrize("fmt", [F.FP8_E4M3, F.FP8_E5M2, F.INT8, F.INT4, F.BF16, F.FP16])
def test_saturation_at_format_max(fmt):
    x = torch.tensor([fmt.max * 1.5, -fmt.max * 4, fmt.max * 1.001, -fmt.max * 1.001])
    expect = torch.tensor([fmt.max, -fmt.max, fmt.max, -fmt.max])
    assert torch.equal(round_nearest(x, fmt), expect)
    assert torch.equal(round_stochastic(x, fmt, torch.Generator().manual_seed(1)), expect)


@pytest.mark.parametrize("fmt", [F.INT8, F.INT4])
def test_int_rtn_is_round_half_even_on_integers(fmt):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, -6.6, 3.0])
    assert torch.equal(round_nearest(x, fmt), torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, 2.0, -7.0, 3.0]))


@pytest.mark.parametrize("fmt", [F.FP8_E4M3, F.FP8_E5M2, F.INT8, F.INT4])
@settings(max_examples=40, deadline=None)
@given(xs=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=200), seed=st.integers(0, 2 ** 31))
def test_sr_lands_on_one_of_the_two_neighbours(fmt, xs, seed):
    x = torch.tensor(xs, dtype=torch.float32).clamp(-fmt.max, fmt.max)
    g = grid(fmt)
    q = round_stochastic(x, fmt, torch.Generator().manual_seed(seed))
    i = torch.searchsorted(g, x, right=True).clamp(1, len(g) - 1)
    lo, hi = g[i - 1], g[i]
    lo = torch.where(x == g[i], g[i], lo)  # exactly representable: both neighbours are x itself
    on_grid = torch.isin(q, g)
    assert on_grid.all()
    assert ((q == lo) | (q == hi) | (q == x)).all()


@pytest.mark.parametrize("fmt,x", [(F.FP8_E4M3, 1.03), (F.FP8_E4M3, -0.0041), (F.FP8_E4M3, 2.0 ** -8 + 2.0 ** -11),
                                   (F.FP8_E5M2, 300.7), (F.INT4, 2.3), (F.BF16, 1.0 + 2.0 ** -9),
                                   (F.FP16, 3.0e-6)])
def test_sr_is_unbiased(fmt, x):
    n = 200_000
    y = torch.full((n,), x, dtype=torch.float32)
    q = round_stochastic(y, fmt, torch.Generator().manual_seed(123)).double()
    lo, hi = q.min().item(), q.max().item()
    assert lo <= x <= hi and set(torch.unique(q).tolist()) <= {lo, hi}
    p = (x - lo) / (hi - lo)
    # standard error of the mean of a two-point distribution; 5 sigma fails with prob ~6e-7 if unbiased,
    # while a biased rounding (e.g. RTN, or off-by-one ulp) misses by far more than this
    se = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(q.mean().item() - x) < 5 * se + 1e-12
    assert round_nearest(torch.tensor([x]), fmt).item() in (lo, hi)


def test_sr_is_reproducible_with_generator():
    x = torch.randn(1000) * 10
    a = round_stochastic(x, F.FP8_E4M3, torch.Generator().manual_seed(7))
    b = round_stochastic(x, F.FP8_E4M3, torch.Generator().manual_seed(7))
    c = round_stochastic(x, F.FP8_E4M3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=50, deadline=None)
@given(codes=st.lists(st.integers(-7, 7), min_size=0, max_size=101))
def test_int4_packing_round_trips(codes):
    q = torch.tensor(codes, dtype=torch.float32)
    packed = F.INT4.encode(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(F.INT4.decode(packed, len(codes)), q)


def test_bad_format_and_granularity_names():
    with pytest.raises(ValueError, match="unknown format"):
        F.get_format("fp7")
    with pytest.raises(ValueError, match="unknown granularity"):
        F.get_granularity("per_banana", F.FP8_E4M3)
    with pytest.raises(ValueError, match="group_size"):
        F.PerGroup(0)
    assert F.get_granularity("group64", F.INT4) == F.PerGroup(64)
    assert F.get_granularity(None, F.BF16) == F.Unscaled()
