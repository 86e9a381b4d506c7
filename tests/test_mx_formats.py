"""MXFP8 / MXFP4 / NVFP4: E2M1 codes, E8M0 and E4M3 x fp32 block scales, checked against their definitions
(OCP MX v1.0, NVFP4), brute force over the grids, torch's own casts and reference converters, and through
quantize_, memory_report, checkpoints and ECO's optimizers."""
import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import ecoptim
from ecoptim import formats as F
from ecoptim.codec import block_absmax, dequantize, quantize
from ecoptim.optim import fused
from ecoptim.qtensor import QuantizedTensor
from ecoptim.rounding import round_nearest, round_stochastic
from conftest import TinyLM, batches, lm_loss, train

SETTINGS = settings(max_examples=int(os.environ.get("ECOPTIM_FUZZ_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FLT_MAX = torch.finfo(torch.float32).max
E2M1_GRID = torch.tensor(sorted({s * v for v in F.E2M1_VALUES for s in (1.0, -1.0)}))
E4M3_GRID = torch.unique(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().nan_to_num(0.0))
ELEMENTS = {"mxfp8": (F.FP8_E4M3, E4M3_GRID), "mxfp4": (F.FP4_E2M1, E2M1_GRID), "nvfp4": (F.FP4_E2M1, E2M1_GRID)}
FLOAT4_REF = pytest.importorskip("torch.testing._internal.common_quantized")


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _brute_nearest_even(y: float, grid: torch.Tensor, fmt: F.FloatFormat) -> float:
    """Nearest grid value to clamp(y), ties to the one with an even last mantissa bit (even code)."""
    y = min(max(y, -fmt.max), fmt.max)
    d = (grid.double() - y).abs()
    best = grid[d == d.min()]
    if best.numel() == 1:
        return float(best[0])
    # a tie between two neighbours: the even one is the one whose value / its spacing is an even integer
    for b in best.tolist():
        s = float(fmt.spacing(torch.tensor([b if b != 0 else 0.0]))[0]) if b != 0 else 1.0
        if b == 0 or round(abs(b) / s) % 2 == 0:
            return b
    raise AssertionError(f"no even neighbour among {best}")


# -- E2M1 codes ---------------------------------------------------------------------------------------
def test_every_e2m1_code_decodes_to_a_grid_value_and_encodes_back():
    codes = torch.arange(256, dtype=torch.uint8)
    v = F.FP4_E2M1.decode(codes, 512)
    assert set(v.abs().tolist()) == set(F.E2M1_VALUES)
    assert torch.equal(F.FP4_E2M1.encode(v), codes)  # -0.0 (codes 8) keeps its sign bit
    assert F.FP4_E2M1.code_numel(7) == 4 and F.FP4_E2M1.encode(torch.ones(7)).numel() == 4


def test_e2m1_byte_layout_is_torchs_float4_e2m1fn_x2():
    """Element 2i in the low nibble, 2i+1 in the high one, E2M1 bits as torch's reference packer writes them."""
    y = E2M1_GRID[torch.randperm(E2M1_GRID.numel(), generator=torch.Generator().manual_seed(0))].repeat(4)
    ours = F.FP4_E2M1.encode(y)
    ref = FLOAT4_REF.pack_uint4(FLOAT4_REF._f32_to_floatx_unpacked(y, 2, 1))
    assert torch.equal(ours, ref)
    assert ours.view(torch.float4_e2m1fn_x2).shape == ours.shape
    back = FLOAT4_REF._floatx_unpacked_to_f32(torch.stack([ours & 15, ours >> 4], -1).reshape(-1), 2, 1)
    assert torch.equal(back, F.FP4_E2M1.decode(ours, y.numel()))


@SETTINGS
@given(y=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=64))
def test_e2m1_round_to_nearest_even_matches_brute_force_and_torchs_reference(y):
    t = torch.tensor(y, dtype=torch.float32)
    q = round_nearest(t, F.FP4_E2M1)
    expect = torch.tensor([_brute_nearest_even(v, E2M1_GRID, F.FP4_E2M1) for v in y])
    assert torch.equal(q.abs(), expect.abs())
    # torch's reference converter (round to nearest even, saturating): the same codes
    ref = FLOAT4_REF._floatx_unpacked_to_f32(FLOAT4_REF._f32_to_floatx_unpacked(t, 2, 1), 2, 1)
    assert torch.equal(q.abs(), ref.abs())


@SETTINGS
@given(y=st.lists(st.floats(-600, 600, width=32), min_size=1, max_size=64))
def test_e4m3_elements_round_like_torchs_cast(y):
    t = torch.tensor(y, dtype=torch.float32)
    assert torch.equal(round_nearest(t, F.MXFP8), t.clamp(-448, 448).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
@SETTINGS
@given(y=st.floats(-500, 500, width=32))
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(name, y):
    fmt, grid = ELEMENTS[name]
    c = min(max(y, -fmt.max), fmt.max)
    lo, hi = float(grid[grid <= c].max()), float(grid[grid >= c].min())
    n = 4096
    noise = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # an even spread of uniforms: the mean is exact
    q = round_stochastic(torch.full((n,), y), fmt, noise=noise)
    assert set(q.unique().tolist()) <= {lo, hi}
    assert abs(q.double().mean().item() - c) <= (hi - lo) / n + 1e-6 * abs(c)
    g = torch.Generator().manual_seed(1)
    r = round_stochastic(torch.full((n,), y), fmt, generator=g)
    assert set(r.unique().tolist()) <= {lo, hi}
    assert abs(r.double().mean().item() - c) <= 5 * (hi - lo) * 0.5 / math.sqrt(n) + 1e-9


# -- E8M0 scales: the OCP rule, the non-clamping rule, torch's casts and reference ----------------------
@pytest.mark.parametrize("fmt,emax", [(F.FP8_E4M3, 8), (F.FP4_E2M1, 2), (F.INT8, 6)])
@SETTINGS
@given(a=st.floats(2.0 ** -149, FLT_MAX, width=32))
def test_e8m0_exponent_follows_the_ocp_floor_rule_and_the_ceil_rule(fmt, emax, a):
    absmax = torch.tensor([a])
    floor = int(F.E8M0Scale("floor").exponent(absmax, fmt)[0])
    assert F.largest_normal_exponent(fmt) == emax
    # OCP MX v1.0: floor(log2(absmax)) - emax (float64 log2 of an fp32 value is never rounded onto an integer)
    assert floor == max(min(math.floor(math.log2(a)) - emax, 127 - emax), -127)
    ceil = int(F.E8M0Scale("ceil").exponent(absmax, fmt)[0])
    # the smallest e with a <= max * 2^e (exact in float64)
    e = math.frexp(a)[1] - 1 - emax
    e = e if a <= fmt.max * 2.0 ** e else e + 1
    assert ceil == max(min(e, 127 - emax), -127)
    for rule in ("floor", "ceil"):
        stored = F.E8M0Scale(rule).encode(absmax, fmt)
        ex = F.E8M0Scale(rule).exponent(absmax, fmt)
        assert stored.dtype == torch.float8_e8m0fnu
        # torch's own cast of the power of two stores the same byte, and decodes to it
        assert torch.equal(stored.view(torch.uint8), torch.ldexp(torch.ones(1), ex).to(torch.float8_e8m0fnu)
                           .view(torch.uint8))
        assert torch.equal(F.E8M0Scale(rule).decode(stored), torch.ldexp(torch.ones(1), ex))


def test_e8m0_scale_edges():
    s = F.E8M0Scale("ceil")
    e = s.exponent(torch.tensor([0.0, 1e-45, FLT_MAX, 448.0, 448.00003]), F.FP8_E4M3)
    assert e.tolist() == [-127, -127, 127 - 8, 0, 1]
    x = s.decode(s.encode(torch.tensor([FLT_MAX]), F.FP8_E4M3))
    assert math.isfinite(448.0 * float(x))  # the top exponent keeps every dequantized value finite


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
def test_ceil_rule_matches_torchs_reference_mx_converter(name):
    """torch's ``to_mxfp`` (RCEIL scales, saturating element casts) on bf16-representable data: the same E8M0
    bytes and the same element codes."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 128, generator=g) * torch.logspace(-3, 3, 8)[:, None]).bfloat16().float()
    ref_scale, ref_data = FLOAT4_REF.to_mxfp(w, 32, name)
    codes, scale = quantize(w, F.QuantSpec.make(name))
    assert torch.equal(scale.view(torch.uint8), ref_scale.reshape(-1).view(torch.uint8))
    assert torch.equal(codes.view(torch.uint8), ref_data.reshape(-1).view(torch.uint8))


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), log_mag=st.floats(-30, 30))
def test_floor_rule_clamps_and_counts_it_ceil_rule_never_clamps(seed, log_mag):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 64, generator=g) * 2.0 ** log_mag
    for name in ("mxfp8", "mxfp4"):
        fmt = F.get_format(name)
        for rule in ("floor", "ceil"):
            spec = F.QuantSpec.make(name, scale=F.E8M0Scale(rule))
            stats: dict = {}
            codes, scale = quantize(w, spec, stats=stats)
            y = (w.reshape(-1, 32) / spec.scale.decode(scale)[:, None]).abs()
            assert stats["clamped"] == int((y > fmt.max).sum())
            if rule == "ceil":
                assert stats["clamped"] == 0 and stats["saturated"] == 0
            else:  # absmax / 2^e lies in [2^emax, 2^(emax+1))
                top = y.amax(dim=1)
                emax = F.largest_normal_exponent(fmt)
                assert bool(((top >= 2.0 ** emax) & (top < 2.0 ** (emax + 1))).all())


def test_clamping_under_the_floor_rule_is_what_the_ocp_definition_says():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 500.0, 1.0
    spec = F.QuantSpec.make("mxfp8", scale="e8m0")
    stats: dict = {}
    codes, scale = quantize(w, spec, stats=stats)
    assert float(scale.float()) == 1.0  # floor(log2 500) - 8 = 0
    assert dequantize(codes, scale, spec, w.shape)[0, 0] == 448.0  # clamped to E4M3's max
    assert stats["clamped"] == 1 and stats["saturated"] == 1
    codes, scale = quantize(w, F.QuantSpec.make("mxfp8"))  # the default, ceil: 2^1, 500 / 2 = 250 -> 256
    assert float(scale.float()) == 2.0 and dequantize(codes, scale, F.QuantSpec.make("mxfp8"), w.shape)[0, 0] == 512


def test_floor_rule_cannot_grow_a_blocks_largest_weight_by_small_steps():
    """Why the MX formats default to the ceil rule: under the floor rule a block's largest element sits at
    most at max * 2^e, a step below the next binade 2^(e+emax+1), so any step under +33% (E2M1: 8/6)
    re-quantizes back onto the clamp, forever; the ceil rule moves on to the next scale."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 5.5, 0.1
    for rule, grows in (("floor", False), ("ceil", True)):
        spec = F.QuantSpec.make("mxfp4", scale=F.E8M0Scale(rule))
        cur = dequantize(*quantize(w, spec), spec, w.shape)
        assert float(cur[0, 0]) == 6.0
        for _ in range(20):
            cur = dequantize(*quantize(cur * 1.25, spec), spec, w.shape)  # +25% per step, RTN
        assert (float(cur[0, 0]) > 6.0) == grows, rule


# -- NVFP4 -------------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), log_mag=st.floats(-20, 20), spread=st.floats(0, 12))
def test_nvfp4_matches_its_direct_definition(seed, log_mag, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 64, generator=g) * 2.0 ** (log_mag + spread * torch.rand(4, 64, generator=g))
    spec = F.QuantSpec.make("nvfp4")
    codes, stored = quantize(w, spec)
    assert stored.dtype == torch.uint8 and stored.shape == (16 + 4,)
    # the definition, written out
    blocks = w.reshape(16, 16)
    s_t = _fp32(float(w.abs().max()) / 2688.0)
    s_t = max(s_t, torch.finfo(torch.float32).tiny)
    r = (blocks.abs().amax(1) / (torch.tensor(s_t) * 6.0)).clamp(max=448.0)
    s_b = r.to(torch.float8_e4m3fn).float()
    s_b = torch.where(s_b > 0, s_b, torch.tensor(2.0 ** -9))
    x = s_b * torch.tensor(s_t)
    y = blocks / x[:, None]
    q = torch.tensor([_brute_nearest_even(v, E2M1_GRID, F.FP4_E2M1) for v in y.reshape(-1).tolist()]).reshape(16, 16)
    got_sb, got_st = spec.scale.parts(stored)
    assert float(got_st) == s_t and torch.equal(got_sb, s_b)
    assert torch.equal(dequantize(codes, stored, spec, w.shape).abs(), (q * x[:, None]).reshape(4, 64).abs())


def test_nvfp4_edges_zero_tensor_tiny_blocks_and_the_top_of_the_range():
    spec = F.QuantSpec.make("nvfp4")
    for w in (torch.zeros(2, 32), torch.tensor([[1.0] + [1e-12] * 15]), torch.full((1, 16), FLT_MAX)):
        codes, stored = quantize(w, spec)
        x = spec.scale.decode(stored)
        assert bool((x > 0).all()) and bool(torch.isfinite(x).all())
        assert bool(torch.isfinite(dequantize(codes, stored, spec, w.shape)).all())
        assert spec.scale.problem(stored, w.numel() // 16) is None


# -- quantize_, memory, checkpoints -----------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))


@pytest.mark.parametrize("name,code_bytes,scale_bytes", [
    ("mxfp8", lambda n: n, lambda n, rows: n // 32),
    ("mxfp4", lambda n: n // 2, lambda n, rows: n // 32),
    ("nvfp4", lambda n: n // 2, lambda n, rows: n // 16 + 4)])
def test_quantize_real_and_fake_storage_agree_and_memory_counts_real_bytes(name, code_bytes, scale_bytes):
    real, fake = _model(), _model()
    everything = lambda m, n: isinstance(m, nn.Linear)
    ecoptim.quantize_(real, name, filter_fn=everything)
    ecoptim.quantize_(fake, F.get_format(name), filter_fn=everything, storage="fake")
    for (n, pr), pf in zip(real.named_parameters(), fake.parameters()):
        if isinstance(pr, QuantizedTensor):
            assert torch.equal(pr.dequantize(), pf.detach()), n
            assert str(pr.spec) == str(ecoptim.spec_of(pf))
    rep = ecoptim.memory_report(real)
    for p in rep.params:
        if p.name.endswith("weight"):
            assert p.kind == str(F.QuantSpec.make(name))
            assert p.weight_bytes == code_bytes(p.numel) and p.scale_bytes == scale_bytes(p.numel, None)
    cfg = ecoptim.QuantConfig(name)
    assert cfg.spec == F.QuantSpec.make(name) and cfg.spec.scale == F.get_format(name).default_scale


@pytest.mark.parametrize("spec", [F.QuantSpec.make("mxfp8"), F.QuantSpec.make("mxfp4"), F.QuantSpec.make("nvfp4"),
                                  F.QuantSpec.make("mxfp4", scale="e8m0"),
                                  F.QuantSpec(F.FP8_E4M3, F.PerGroup(32), F.E8M0Scale("floor"))],
                         ids=str)
def test_checkpoints_and_safetensors_round_trip_bit_for_bit(tmp_path, spec):
    a = _model()
    ecoptim.quantize_(a, ecoptim.QuantConfig(spec.format, spec.granularity), filter_fn=lambda m, n: True)
    if spec.scale != spec.format.default_scale:  # a non-default scale: re-quantize with the spec itself
        for m in a:
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(QuantizedTensor.from_float(m.weight.dequantize(), spec))
    opt = ecoptim.AdamW(a.parameters(), lr=1e-3, rounding="stochastic")
    x = torch.randn(8, 64)
    for _ in range(2):
        opt.zero_grad()
        a(x).square().mean().backward()
        opt.step()
    b = copy.deepcopy(a)
    for m in b:
        if isinstance(m, nn.Linear):
            m.weight.requantize_(torch.randn(m.weight.shape))
    ecoptim.save_checkpoint(tmp_path / "c.pt", a, opt)
    ecoptim.load_checkpoint(tmp_path / "c.pt", b, ecoptim.AdamW(b.parameters(), lr=1e-3))
    c = copy.deepcopy(b)
    for m in c:
        if isinstance(m, nn.Linear):
            m.weight.requantize_(torch.randn(m.weight.shape))
    ecoptim.export_safetensors(a, tmp_path / "m.safetensors")
    ecoptim.load_safetensors(c, tmp_path / "m.safetensors")
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        if isinstance(pa, QuantizedTensor):
            assert pa.spec == pb.spec == pc.spec == spec
            for other in (pb, pc):
                assert torch.equal(pa.codes.view(torch.uint8), other.codes.view(torch.uint8))
                assert other.scale.dtype == pa.scale.dtype
                assert torch.equal(pa.scale.view(torch.uint8), other.scale.view(torch.uint8))


def test_a_checkpoint_with_another_scale_rule_is_refused(tmp_path):
    a, b = _model(), _model()
    ecoptim.quantize_(a, "mxfp4", filter_fn=lambda m, n: True)
    ecoptim.quantize_(b, ecoptim.QuantConfig("mxfp4"), filter_fn=lambda m, n: True)
    b[0].weight = nn.Parameter(QuantizedTensor.from_float(b[0].weight.dequantize(),
                                                          F.QuantSpec.make("mxfp4", scale="e8m0")))
    ecoptim.save_checkpoint(tmp_path / "c.pt", a)
    with pytest.raises(ValueError, match="scale format differs"):
        ecoptim.load_checkpoint(tmp_path / "c.pt", b)


def test_spec_names_and_bad_input():
    assert str(F.QuantSpec.make("mxfp8")) == "mxfp8/group32"
    assert str(F.QuantSpec.make("nvfp4")) == "nvfp4/group16"
    assert str(F.QuantSpec.make("mxfp4", scale="e8m0")) == "mxfp4/group32/e8m0"
    assert str(F.QuantSpec.make("fp8_e4m3", "row")) == "fp8_e4m3/row"
    with pytest.raises(ValueError, match="unknown scale format"):
        F.QuantSpec.make("mxfp8", scale="e9m0")
    with pytest.raises(ValueError, match="rule"):
        F.E8M0Scale("round")
    with pytest.raises(ValueError, match="does not divide"):
        ecoptim.quantize_(nn.Sequential(nn.Linear(20, 4)), "mxfp8", filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="scale that is"):
        quantize(torch.ones(2, 32), F.QuantSpec.make("mxfp8"), scale=torch.ones(2))


# -- optimizers --------------------------------------------------------------------------------------
def test_the_fused_kernel_takes_mx_and_nvfp4_weights_but_not_nvfp4_in_kahan_mode():
    """The kernel computes E8M0 and NVFP4 scales (tests/test_mx_kernel.py checks its bits against the reference
    path); NVFP4's compensation in mode 'kahan' would need a tensor pass of its own, so it stays on the reference."""
    w = torch.randn(8, 64)
    for spec in (F.QuantSpec.make("mxfp8"), F.QuantSpec.make("mxfp4"), F.QuantSpec.make("nvfp4"),
                 F.QuantSpec(F.FP8_E4M3, F.PerGroup(32), F.E8M0Scale("ceil")),
                 F.QuantSpec(F.FP8_E5M2, F.PerGroup(32), F.E8M0Scale("floor"))):
        p = QuantizedTensor.from_float(w, spec)
        p.grad = torch.ones(8, 64)
        for mode in ("eco", "naive", "master", "exact", "kahan"):
            group = {"lr": 1e-3, "mode": mode}
            assert fused.applies(p, spec, group) == (not (spec.format is F.NVFP4 and mode == "kahan"))


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_eco_sgd_virtual_iterate_follows_gradient_descent(fmt, rounding):
    """x = w_hat - (lr*beta/(1-beta))*m obeys x <- x - lr*g exactly (to fp32 round-off) whatever q did."""
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(), fmt)
    lr, beta = 0.05, 0.9
    a = lr * beta / (1 - beta)
    opt = ecoptim.SGD(model.parameters(), lr=lr, momentum=beta, dampening=beta, mode="eco", rounding=rounding)
    qparams = [p for p in model.parameters() if isinstance(p, QuantizedTensor)]
    assert qparams and all(str(p.spec.format) == fmt for p in qparams)
    x_prev, worst, moved = None, 0.0, 0
    for idx in batches(10):
        opt.zero_grad()
        lm_loss(model, idx).backward()
        grads = [p.grad.double().clone() for p in qparams]
        before = [p.dequantize().clone() for p in qparams]
        opt.step()
        x = [p.dequantize().double() - a * opt.state[p]["momentum_buffer"].double() for p in qparams]
        if x_prev is not None:
            for xp, xn, g in zip(x_prev, x, grads):
                worst = max(worst, (xn - (xp - lr * g)).abs().max().item() / (xp.abs().max().item() + 1e-12))
        moved += sum(int((p.dequantize() != b).sum()) for p, b in zip(qparams, before))
        x_prev = x
    assert moved > 0
    assert worst < 2e-5


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_eco_adamw_trains_mx_and_nvfp4_weights(fmt):
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(), fmt)
    opt = ecoptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, rounding="stochastic")
    data = batches(2)
    with torch.no_grad():
        before = lm_loss(model, data[0]).item()
    train(model, opt, data * 15)
    with torch.no_grad():
        after = lm_loss(model, data[0]).item()
    assert after < before
    for p in model.parameters():
        if isinstance(p, QuantizedTensor):
            assert p.scale.dtype == p.spec.scale.storage_dtype
            assert bool(torch.isfinite(p.dequantize()).all())
            assert p.spec.scale.problem(p.scale, p.spec.granularity.blocks(p.shape)[0]) is None


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_exact_mode_reproduces_master_quantized_weights(fmt):
    torch.manual_seed(0)
    a = ecoptim.quantize_(TinyLM(), fmt)
    b = copy.deepcopy(a)
    mk = lambda m, mode: ecoptim.SGD(m.parameters(), lr=0.05, momentum=0.9, mode=mode, rounding="stochastic", seed=3)
    data = batches(12)
    train(a, mk(a, "master"), data)
    train(b, mk(b, "exact"), data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        if isinstance(pa, QuantizedTensor):
            assert torch.equal(pa.codes, pb.codes)
            assert torch.equal(pa.scale.view(torch.uint8), pb.scale.view(torch.uint8))


def test_block_absmax_is_what_the_scales_see():
    w = torch.arange(64.0).reshape(2, 32) - 20
    assert block_absmax(w, F.QuantSpec.make("mxfp8")).tolist() == [20.0, 43.0]


def test_fsdp_refuses_block_scaled_weights_before_sharding():
    from ecoptim.distributed.fsdp import check_shardable

    for spec in (F.QuantSpec.make("mxfp8"), F.QuantSpec.make("nvfp4"), F.QuantSpec.make("fp4_e2m1", "row"),
                 F.QuantSpec(F.FP8_E4M3, F.PerRow(), F.E8M0Scale("ceil"))):
        with pytest.raises(ValueError, match="not supported"):
            check_shardable(spec, torch.Size((8, 64)), 2)
    check_shardable(F.QuantSpec.make("fp8_e4m3", "row"), torch.Size((8, 64)), 2)


def test_compare_takes_the_block_scaled_formats_with_their_own_block_sizes():
    from ecoptim.app.cli import build_parser
    from ecoptim.app.train import make_methods

    for name, gran in (("mxfp8", "group32"), ("mxfp4", "group32"), ("nvfp4", "group16")):
        args = build_parser().parse_args(["compare", "--format", name])
        assert args.format == name
        m = make_methods(name)[f"{name}_eco_sr"]
        assert (m.format, m.granularity, m.mode, m.rounding) == (name, gran, "eco", "stochastic")
        assert F.QuantSpec.make(m.format, m.granularity) == F.QuantSpec.make(name)
