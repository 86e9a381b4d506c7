"""Property-based tests: formats x granularities x awkward shapes and magnitudes, for the codec, stochastic
rounding, non-finite input, saturation, and one optimizer step of every mode."""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn

import ecoptim
from ecoptim import formats as F
from ecoptim.codec import dequantize, quantize, saturation_threshold
from ecoptim.optim.base import MODES
from ecoptim.qtensor import QuantizedTensor
from ecoptim.rounding import round_nearest

FORMATS = ["fp8_e4m3", "fp8_e5m2", "int8", "int4", "bf16", "fp16"]
SHAPES = [(), (0,), (1,), (0, 5), (5, 0), (1, 1), (3,), (7,), (5, 7), (4, 6), (3, 2, 5), (1, 9), (9, 1), (2, 12),
          (16, 32)]
FLT_MAX = torch.finfo(torch.float32).max
# ECOPTIM_FUZZ_EXAMPLES=5000 for a deep local run; the default keeps the file at a few seconds
SETTINGS = settings(max_examples=int(os.environ.get("ECOPTIM_FUZZ_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _cols(shape):
    c = 1
    for s in shape[1:]:
        c *= s
    return c


def _grid(fmt):
    """Every finite grid value of an enumerable format (FP8 from its 256 bit patterns, integers)."""
    if isinstance(fmt, F.IntFormat):
        return torch.arange(-fmt.max, fmt.max + 1)
    v = torch.arange(256, dtype=torch.uint8).view(fmt.storage_dtype).to(torch.float32)
    return torch.unique(v[torch.isfinite(v)])


GRIDS = {n: _grid(F.get_format(n)) for n in ("fp8_e4m3", "fp8_e5m2", "int8", "int4")}


@st.composite
def specs(draw, shape):
    fmt = draw(st.sampled_from(FORMATS))
    cols = _cols(shape) if len(shape) else 1
    groups = [g for g in (1, 2, 3, 4, 6, 7, 12, 16) if cols % g == 0]
    gran = draw(st.sampled_from(["tensor", "row", "none"] + [f"group{g}" for g in groups]))
    return F.QuantSpec.make(fmt, gran)


@st.composite
def weights(draw, shape=None, exp_range=(-140, 120)):
    """A float32 tensor with rows of very different magnitudes (down to fp32 subnormals, up to ~FLT_MAX),
    optional zeros / special values, possibly non-contiguous."""
    shape = draw(st.sampled_from(SHAPES)) if shape is None else shape
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    noncontig = draw(st.booleans())
    base = torch.randn((*shape, 2), generator=g)[..., 0] if noncontig else torch.randn(shape, generator=g)
    lo, hi = exp_range
    e = draw(st.integers(lo, hi))
    spread = draw(st.integers(0, 30))
    if base.dim() >= 1 and base.shape[0] > 0:  # per-row magnitudes 2^(e .. e+spread)
        row_e = torch.randint(0, spread + 1, (base.shape[0],), generator=g).to(torch.float32) + e
        row_e = row_e.clamp(max=hi)
        base.mul_(torch.exp2(row_e).reshape(-1, *([1] * (base.dim() - 1))))
    else:
        base.mul_(2.0 ** e)
    kind = draw(st.sampled_from(["plain", "zeros", "sparse", "specials", "constant"]))
    # special values within the magnitude range asked for (by default: fp32 subnormals up to FLT_MAX)
    keep = lambda vals: [v for v in vals if v == 0 or 2.0 ** (lo - 10) <= abs(v) <= 2.0 ** (hi + 9)]
    if kind == "zeros":
        base.zero_()
    elif kind == "sparse":
        base.mul_((torch.rand(base.shape, generator=g) < 0.2).to(base.dtype))
    elif kind == "constant":
        base.fill_(draw(st.sampled_from(keep([1.0, -3.0, 2.0 ** -140, 1e-45, FLT_MAX, -FLT_MAX, 448.0, 7.0]))))
    elif kind == "specials" and base.numel():
        vals = keep([0.0, -0.0, 1e-45, -1e-45, 2.0 ** -126, FLT_MAX, -FLT_MAX, 0.5, 1.5, 2.5])
        for i in draw(st.lists(st.integers(0, base.numel() - 1), min_size=1, max_size=4)):
            base[torch.unravel_index(torch.tensor(i), base.shape)] = draw(st.sampled_from(vals))
    assert torch.isfinite(base).all()
    return base


def _scaled(w, spec, scale):
    w32 = w.to(torch.float32)
    if scale is None:
        return w32.reshape(-1)
    nb, bs = spec.granularity.blocks(w32.shape)
    return (w32.reshape(nb, bs) / scale[:, None]).reshape(-1)


def _values(codes, spec, numel):
    return spec.format.decode(codes.reshape(-1), numel)


def _on_grid(v, fmt):
    return torch.equal(round_nearest(v, fmt), v) and bool((v.abs() <= fmt.max).all())


def _bits(codes):
    return codes.view(torch.uint8) if codes.dtype.itemsize == 1 else codes


@st.composite
def cases(draw):
    w = draw(weights())
    return w, draw(specs(tuple(w.shape)))


@SETTINGS
@given(case=cases(), seed=st.integers(0, 2 ** 31 - 1))
def test_quantize_dequantize_and_sr_properties(case, seed):
    w, spec = case
    fmt, n = spec.format, w.numel()
    stats = {}
    codes, scale = quantize(w, spec, stats=stats)
    assert stats["numel"] == n
    if spec.scaled:
        assert scale.shape == (spec.granularity.blocks(w.shape)[0],)
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
        assert stats["saturated"] == 0  # an absmax scale never clips
    v = _values(codes, spec, n)
    assert _on_grid(v, fmt)
    w_hat = dequantize(codes, scale, spec, w.shape)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32 and bool(torch.isfinite(w_hat).all())
    # RTN: within half a grid step of the (saturated) scaled value
    y = _scaled(w, spec, scale).clamp(-fmt.max, fmt.max)
    assert bool(((v - y).abs() <= 0.5 * fmt.spacing(y)).all())
    # re-quantizing the dequantized weight with the same scale is exact
    codes2, _ = quantize(w_hat, spec, scale=scale)
    assert torch.equal(_bits(codes2), _bits(codes))
    assert torch.equal(dequantize(codes2, scale, spec, w.shape), w_hat)
    # stochastic rounding lands on one of the two grid neighbours of the scaled value
    gen = torch.Generator().manual_seed(seed)
    codes_sr, scale_sr = quantize(w, spec, "stochastic", gen)
    assert (scale_sr is None) == (scale is None) and (scale is None or torch.equal(scale_sr, scale))
    v_sr = _values(codes_sr, spec, n)
    assert _on_grid(v_sr, fmt)
    if fmt.name in GRIDS:
        g = GRIDS[fmt.name]
        i = torch.searchsorted(g, y, right=True)
        lo, hi = g[(i - 1).clamp(min=0)], g[i.clamp(max=len(g) - 1)]
        assert bool(((v_sr == lo) | (v_sr == hi)).all())
        assert bool((v_sr[lo == y] == y[lo == y]).all())  # values on the grid stay put
    else:
        assert bool(((v_sr - y).abs() < fmt.spacing(y)).all())
    # the same through QuantizedTensor
    if n:
        q = QuantizedTensor.from_float(w, spec)
        assert torch.equal(q.dequantize(), w_hat)


@SETTINGS
@given(w=weights(exp_range=(-20, 20)), data=st.data())
def test_nonfinite_weights_are_refused_not_turned_into_nan_scales(w, data):
    if w.numel() == 0:
        return
    spec = data.draw(specs(tuple(w.shape)))
    w = w.contiguous().clone()
    i = data.draw(st.integers(0, w.numel() - 1))
    w.view(-1)[i] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    with pytest.raises(ValueError, match="non-finite values \\(1 of"):
        quantize(w, spec)
    with pytest.raises(ValueError, match="non-finite"):
        QuantizedTensor.from_float(w, spec)
    q = QuantizedTensor.from_float(torch.zeros(w.shape), spec)
    before = q.codes.clone(), None if q.scale is None else q.scale.clone()
    with pytest.raises(ValueError, match="non-finite"):
        q.requantize_(w)
    assert torch.equal(_bits(q.codes), _bits(before[0]))  # nothing was written


def test_quantize_refuses_nonfinite_weights_and_leaves_the_model_untouched():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        m[1].weight[2, 3] = float("nan")
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="1.weight: cannot quantize a weight holding non-finite values"):
        ecoptim.quantize_(m, "fp8", filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
    assert not any(isinstance(p, QuantizedTensor) for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) or (k == "1.weight" and torch.equal(v.isnan(), before[k].isnan()))


@SETTINGS
@given(w=weights(shape=(6, 16), exp_range=(-30, 30)), fmt=st.sampled_from(FORMATS),
       shrink=st.sampled_from([1.0, 1.5, 4.0, 100.0]))
def test_saturation_is_counted_exactly_when_a_given_scale_clips(w, fmt, shrink):
    """With a caller-given scale that is too small, the count is the number of values whose error exceeds what
    rounding alone can cause (half the grid step at max); with the absmax scale (shrink=1) it is 0."""
    spec = F.QuantSpec.make(fmt, "row")
    _, scale = quantize(w, spec)
    small = scale / shrink
    stats = {}
    codes, _ = quantize(w, spec, scale=small, stats=stats)
    y = _scaled(w, spec, small)
    v = _values(codes, spec, w.numel())
    half_step_at_max = saturation_threshold(spec) - spec.format.max
    assert stats["saturated"] == int(((v - y).abs() > half_step_at_max).sum())
    if shrink == 1.0:
        assert stats["saturated"] == 0
    if shrink == 100.0 and w.abs().max() > 1e-30 and fmt != "bf16":  # (scales are floored at fp32's tiny)
        assert stats["saturated"] > 0


@SETTINGS
@given(w=weights(shape=(8, 16), exp_range=(-30, 30)), fmt=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "int8", "int4"]),
       row=st.integers(0, 7), growth=st.sampled_from([1.01, 2.0, 37.0, 1e3, 1e6]))
def test_a_row_growing_past_its_range_gets_a_new_scale_not_clipped(w, fmt, row, growth):
    """FP8/INT overflow of a weight row cannot happen silently: the optimizer re-quantizes with a fresh absmax
    scale, so a row that grows far beyond its old range keeps its largest value (up to rounding)."""
    lin = nn.Linear(16, 8, bias=False)
    lin.weight = nn.Parameter(w.clone())
    ecoptim.quantize_(lin, fmt, "row", filter_fn=lambda m, n: True)
    p = lin.weight
    w0, s0 = p.dequantize(), p.scale.clone()
    if not bool((w0[row] != 0).any()):
        return
    opt = ecoptim.SGD([p], lr=1.0, momentum=0.0, mode="naive", rounding="nearest")
    p.grad = torch.zeros(8, 16)
    p.grad[row] = -(growth - 1) * w0[row]
    w_til = w0 - p.grad  # what SGD computes (lr = 1, no momentum)
    assume(bool(torch.isfinite(w_til).all()))
    opt.step()
    stats = {}
    codes, scale = quantize(w_til, p.spec, stats=stats)
    assert stats["saturated"] == 0
    assert torch.equal(p.scale, scale) and torch.equal(p.dequantize(), dequantize(codes, scale, p.spec, p.shape))
    assert p.scale[row] > s0[row]
    top = w_til[row].abs().max()
    rel = 2.0 ** -(p.spec.format.man_bits + 1) if hasattr(p.spec.format, "man_bits") else 0.5 / p.spec.format.max
    assert abs(p.dequantize()[row].abs().max() - top) <= rel * top * 1.0001
    others = [r for r in range(8) if r != row]
    assert torch.equal(p.dequantize()[others], w0[others])


# Weights up to 2^49, gradients up to 2^8 x the weights: ECO's injection divides the rounding error by lr (and
# AdamW's multiplies it by sqrt(v)), so weights near FLT_MAX would overflow the fp32 momentum by design.
OPT_SHAPES = [(1, 1), (0, 4), (3, 5), (7, 9), (4, 12), (16, 32), (5,)]


@st.composite
def step_cases(draw):
    shape = draw(st.sampled_from(OPT_SHAPES))
    spec = draw(specs(shape))
    w = draw(weights(shape=shape, exp_range=(-140, 40)))
    return dict(spec=spec, w=w, mode=draw(st.sampled_from(MODES)), opt=draw(st.sampled_from(["sgd", "adamw"])),
                rounding=draw(st.sampled_from(["nearest", "stochastic"])), lr=draw(st.sampled_from([1e-4, 1e-2, 0.3])),
                gexp=draw(st.integers(-8, 8)), gseed=draw(st.integers(0, 2 ** 31 - 1)),
                noncontig_grad=draw(st.booleans()), steps=draw(st.integers(1, 2)),
                states=draw(st.sampled_from([torch.float32, torch.bfloat16, ecoptim.State8bit(16),
                                             ecoptim.State8bit(8, "stochastic")])))


def _make_opt(kind, params, mode, rounding, lr, states=torch.float32):
    if kind == "sgd":
        return ecoptim.SGD(params, lr=lr, momentum=0.9, mode=mode, rounding=rounding, seed=1)
    return ecoptim.AdamW(params, lr=lr, weight_decay=0.01, mode=mode, rounding=rounding, seed=1, state_dtype=states)


@SETTINGS
@given(case=step_cases())
def test_one_optimizer_step_of_every_mode_keeps_weights_finite_and_on_grid(case):
    spec, w = case["spec"], case["w"]
    real = nn.Parameter(QuantizedTensor.from_float(w, spec))
    fake = nn.Parameter(w.clone())
    holder = nn.Linear(1, 1)
    holder.weight = fake
    ecoptim.quantize_(holder, spec.format, spec.granularity, filter_fn=lambda m, n: True, storage="fake")
    bias = nn.Parameter(torch.randn(3))  # a dense parameter in the same optimizer
    opts = [_make_opt(case["opt"], [real, bias], case["mode"], case["rounding"], case["lr"], case["states"]),
            _make_opt(case["opt"], [fake], case["mode"], case["rounding"], case["lr"], case["states"])]
    g = torch.Generator().manual_seed(case["gseed"])
    mag = (w.abs().max().item() if w.numel() else 1.0) or 1.0
    for _ in range(case["steps"]):
        grad = torch.randn(w.shape, generator=g) * mag * 2.0 ** case["gexp"]
        if case["noncontig_grad"] and grad.dim() == 2:
            grad = grad.t().contiguous().t()
        real.grad, fake.grad, bias.grad = grad.clone(), grad.clone(), torch.randn(3, generator=g)
        for o in opts:
            o.step()
    w_hat = real.dequantize()
    assert bool(torch.isfinite(w_hat).all())
    assert _on_grid(_values(real.codes, spec, w.numel()), spec.format)
    if real.scale is not None:
        assert bool(torch.isfinite(real.scale).all()) and bool((real.scale > 0).all())
    # fake storage holds exactly the values real storage dequantizes to
    assert torch.equal(fake.detach(), w_hat)
    for o in opts:
        for s in o.state.values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert bool(torch.isfinite(v.to(torch.float32)).all()), k
