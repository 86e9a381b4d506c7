"""4-bit block-wise AdamW states (State4bit): the maps, the codec against its definition, the optimizer against a
plain-torch re-implementation of the same maths, memory, checkpoints, conversions, the fused kernel's refusal and
the command line."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecoptim
from ecoptim import State4bit, State8bit
from ecoptim.checkpoint import load_checkpoint, save_checkpoint
from ecoptim.codec import dequantize, quantize
from ecoptim.convert import spec_of
from ecoptim.optim import fused
from ecoptim.optim.state8 import (dequantize_state, linear_table, magnitude_table, pack_nibbles, quantize_state,
                                  state_key, unpack_nibbles)
from ecoptim.qtensor import QuantizedTensor
from ecoptim.rng import uniform
from conftest import TinyLM, batches, lm_loss, train

# the maps, written out: m = sign bit + this 3-bit dynamic tree; v = the linear map without zero
M_MAP = torch.tensor([0.0, 0.01, 0.055, 0.1, 0.325, 0.55, 0.775, 1.0], dtype=torch.float32)
V_MAP = torch.tensor([k / 16 for k in range(1, 17)], dtype=torch.float32)


def test_the_maps():
    assert torch.equal(magnitude_table(3), M_MAP)
    assert torch.equal(linear_table(16), V_MAP)
    assert State4bit().magnitudes(True) is magnitude_table(3) and State4bit().magnitudes(False) is linear_table(16)
    assert State4bit().block_size == 128 and str(State4bit(rounding="stochastic")) == "4bit/block128/sr"
    assert State4bit(64) != State8bit(64) and State4bit(64).nearest() == State4bit(64, "nearest")


def test_nibbles_pack_two_codes_per_byte_low_first():
    idx = torch.tensor([1, 2, 15, 0, 7])
    packed = pack_nibbles(idx)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x21, 0x0F, 0x07]
    assert unpack_nibbles(packed, 5).tolist() == idx.tolist()
    assert State4bit().code_shape((3, 5)) == (8,) and State4bit().code_shape((4,)) == (2,)


# -- the codec against its definition --------------------------------------------------------------------

def _blocks(x, bs):
    flat = x.reshape(-1)
    pad = (-flat.numel()) % bs
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, bs)


def _decode(codes, absmax, signed, bs, n):
    """The stored values, from the definition: nibble 2i low, 2i+1 high; sign bit 3 for m."""
    c = torch.stack([codes.long() & 15, codes.long() >> 4], 1).reshape(-1)[:n]
    mag = M_MAP[c & 7] if signed else V_MAP[c]
    a = absmax.repeat_interleave(bs)[:n]
    val = mag * a
    return torch.where(c >= 8, -val, val) if signed else val


floats = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(floats, min_size=1, max_size=600), bs=st.sampled_from([1, 3, 16, 128]), signed=st.booleans())
def test_nearest_decodes_to_the_closest_map_entry_of_each_block(xs, bs, signed):
    x = torch.tensor(xs, dtype=torch.float32)
    if not signed:
        x = x.abs()
    n = x.numel()
    cfg = State4bit(block_size=bs)
    codes, absmax = quantize_state(x, signed, cfg)
    assert codes.dtype == torch.uint8 and codes.shape == (-(-n // 2),) and absmax.shape == (cfg.blocks(n),)
    if n % 2:
        assert codes[-1].item() >> 4 == 0  # the unused last high nibble is 0
    assert torch.equal(absmax, _blocks(x.abs(), bs).amax(1))  # the fp32 absmax of every block, exactly
    back = dequantize_state(codes, absmax, signed, cfg, x.shape)
    assert torch.equal(back, _decode(codes, absmax, signed, bs, n))  # on the map, bit for bit
    a = absmax.repeat_interleave(bs)[:n]
    y = x.abs() / torch.where(a > 0, a, torch.ones_like(a))
    table = M_MAP if signed else V_MAP
    idx = torch.stack([codes.long() & 15, codes.long() >> 4], 1).reshape(-1)[:n]
    chosen = table[idx & 7] if signed else table[idx]
    # nearest: no map entry is closer to |x|/absmax than the chosen one (brute force over the map)
    best = (y[:, None] - table[None, :]).abs().min(1).values
    assert bool((((y - chosen).abs() <= best) | (a == 0)).all())
    assert bool(((back.abs() == a) | (x.abs() != a)).all())  # each block's absmax element stored exactly
    assert bool((torch.sign(back) * torch.sign(x) >= 0).all())  # signs kept (m); v stays >= 0
    assert bool((back[a == 0] == 0).all())  # an all-zero block decodes to zeros
    if signed:
        assert bool((back[x == 0] == 0).all())  # m: a zero is stored as zero
    else:  # v: nothing is stored below absmax/16 (no zero point: 1/sqrt(v) stays bounded)
        assert bool((back >= a / 16).all())


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_sends_a_value_on_a_midpoint_to_the_smaller_entry(signed):
    t = M_MAP if signed else V_MAP
    mid = (t[:-1] + t[1:]) * 0.5
    x = torch.cat([torch.tensor([1.0]), mid, torch.nextafter(mid, torch.tensor(2.0))])
    codes, absmax = quantize_state(-x if signed else x, signed, State4bit(block_size=x.numel()))
    idx = unpack_nibbles(codes, x.numel())
    n = mid.numel()
    if signed:
        assert bool((idx >= 8).all())  # all negative
        idx = idx & 7
    assert absmax.item() == 1.0 and idx[0] == t.numel() - 1
    assert torch.equal(idx[1:n + 1], torch.arange(n)) and torch.equal(idx[n + 1:], torch.arange(n) + 1)


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased_and_stays_on_the_two_neighbours(signed):
    t = M_MAP if signed else V_MAP
    torch.manual_seed(0)
    y = torch.rand(64) * 0.9 + 0.08  # inside [1/16, 1) for v
    x = torch.cat([torch.tensor([1.0]), -y if signed else y])
    cfg = State4bit(block_size=x.numel(), rounding="stochastic")
    lo_i = torch.bucketize(y, t, right=True) - 1
    lo, hi = t[lo_i], t[lo_i + 1]
    n, acc = 3000, torch.zeros(x.numel(), dtype=torch.float64)
    for step in range(n):
        codes, absmax = quantize_state(x, signed, cfg, state_key(1, 0, signed, step))
        back = dequantize_state(codes, absmax, signed, cfg, x.shape)
        assert back[0] == 1.0
        mag = back[1:].abs()
        assert bool(((mag == lo) | (mag == hi)).all())
        acc += back.double()
    mean = acc[1:].abs() / n
    p = ((y - lo) / (hi - lo)).double()
    sigma = (hi - lo).double() * torch.sqrt(p * (1 - p) / n)
    assert bool(((mean - y.double()).abs() <= 5 * sigma + 1e-12).all())


def test_a_second_moment_below_the_map_is_stored_as_its_smallest_entry():
    v = torch.tensor([1.0, 1e-3, 1e-30, 0.0, 0.06], dtype=torch.float32)
    for rounding in ("nearest", "stochastic"):
        cfg = State4bit(block_size=8, rounding=rounding)
        codes, absmax = quantize_state(v, False, cfg, (1, 2))
        assert dequantize_state(codes, absmax, False, cfg, v.shape).tolist() == [1.0] + [1 / 16] * 4
    codes, absmax = quantize_state(torch.zeros(5), False, State4bit(block_size=8))  # all zero: stays zero
    assert absmax.item() == 0 and dequantize_state(codes, absmax, False, State4bit(8), (5,)).eq(0).all()


def test_codec_refusals():
    from ecoptim.optim.state8 import BlockwiseState
    with pytest.raises(TypeError, match="State8bit"):
        BlockwiseState()
    with pytest.raises(ValueError, match="block_size"):
        State4bit(block_size=0)
    with pytest.raises(ValueError, match="rounding"):
        State4bit(rounding="up")
    codes, absmax = quantize_state(torch.ones(6), True, State4bit())
    with pytest.raises(ValueError, match="shape"):
        dequantize_state(codes, absmax, True, State4bit())
    with pytest.raises(ValueError, match="do not hold"):
        dequantize_state(codes, absmax, True, State4bit(), (7, 2))


# -- the optimizer against a plain-torch re-implementation --------------------------------------------------

class PlainAdamW4:
    """AdamW (ECO or naive) on one quantized weight with 4-bit moments, written from the equations: decode
    m and v, m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, denom = sqrt(v)/sqrt(1-b2^t) + eps,
    w_til = w (1 - lr wd) - lr/(1-b1^t) m/denom, w_hat = q(w_til) to nearest, ECO: m += coef denom (w_til - w_hat),
    then encode m and v (nearest midpoint rule, or stochastic with the parameter's state keys)."""

    def __init__(self, p, lr, betas, eps, wd, cfg, mode, seed, stream):
        self.spec, self.shape, self.n = spec_of(p), p.shape, p.numel()
        self.codes, self.scale = p.codes.clone(), None if p.scale is None else p.scale.clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.cfg, self.mode = lr, betas, eps, wd, cfg, mode
        self.seed, self.stream, self.t = seed, stream, 0
        nb = -(-self.n // cfg.block_size)
        self.m = (torch.zeros(-(-self.n // 2), dtype=torch.uint8), torch.zeros(nb))
        self.v = (torch.zeros(-(-self.n // 2), dtype=torch.uint8), torch.zeros(nb))

    def _encode(self, x, signed):
        bs, table = self.cfg.block_size, (M_MAP if signed else V_MAP)
        absmax = _blocks(x.abs(), bs).amax(1)
        a = absmax.repeat_interleave(bs)[: self.n]
        y = x.abs().reshape(-1) / torch.where(a > 0, a, torch.ones_like(a))
        if self.cfg.rounding == "nearest":
            idx = (y[:, None] > ((table[:-1] + table[1:]) * 0.5)[None, :]).sum(1)
        else:
            lo = ((y[:, None] >= table[None, :]).sum(1) - 1).clamp(0, table.numel() - 2)
            u = uniform(state_key(self.seed, self.stream, signed, self.t), self.n)
            idx = lo + (u < (y - table[lo]) / (table[lo + 1] - table[lo])).long()
        if signed:
            idx = idx | ((x.reshape(-1) < 0).long() << 3)
        idx = torch.cat([idx, idx.new_zeros(self.n % 2)]).view(-1, 2)
        return (idx[:, 0] | (idx[:, 1] << 4)).to(torch.uint8), absmax

    def step(self, g):
        self.t += 1
        t, lr, b1, b2 = self.t, self.lr, self.b1, self.b2
        m = _decode(*self.m, True, self.cfg.block_size, self.n).view(self.shape)
        v = _decode(*self.v, False, self.cfg.block_size, self.n).view(self.shape)
        w = dequantize(self.codes, self.scale, self.spec, self.shape)
        w.mul_(1 - lr * self.wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.double().sqrt().float() / (1 - b2 ** t) ** 0.5).add_(self.eps)  # correctly rounded sqrt
        w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        self.codes, self.scale = quantize(w, self.spec)
        if self.mode == "eco":
            w_hat = dequantize(self.codes, self.scale, self.spec, self.shape)
            m.addcmul_(w - w_hat, denom, value=(1 - lr * self.wd) * ((1 - b1 ** t) / lr) * (1 - 1 / b1))
        self.m, self.v = self._encode(m, True), self._encode(v, False)


@pytest.mark.parametrize("fmt, gran, shape, bs", [("nvfp4", "group16", (8, 48), 128), ("fp8", "row", (5, 25), 32)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["eco", "naive"])
def test_the_optimizer_is_the_plain_torch_maths_bit_for_bit(fmt, gran, shape, bs, rounding, mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    model = ecoptim.quantize_(torch.nn.Sequential(lin), fmt, gran)
    p = model[0].weight
    cfg = State4bit(block_size=bs, rounding=rounding)
    opt = ecoptim.AdamW([p], lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, mode=mode, rounding="nearest",
                        seed=3, state_dtype=cfg)
    ref = PlainAdamW4(p, 3e-3, (0.9, 0.98), 1e-9, 0.1, cfg, mode, seed=3, stream=0)
    for step in range(6):
        g = torch.randn(shape) * 10.0 ** (step % 3 - 2)
        g[0, :3] = 0.0  # zero gradients: v's smallest map entry, m's zero
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        st_ = opt.state[p]
        assert torch.equal(p.codes.view(torch.uint8), ref.codes.view(torch.uint8)), step
        assert p.scale is None or torch.equal(p.scale.view(torch.uint8), ref.scale.view(torch.uint8)), step
        assert torch.equal(st_["exp_avg"], ref.m[0]) and torch.equal(st_["exp_avg_absmax"], ref.m[1]), step
        assert torch.equal(st_["exp_avg_sq"], ref.v[0]) and torch.equal(st_["exp_avg_sq_absmax"], ref.v[1]), step


# -- memory, checkpoints, conversions ------------------------------------------------------------------

def test_memory_report_counts_the_packed_bytes_and_the_moonshot_fits():
    torch.manual_seed(0)
    for fmt, gran in (("nvfp4", "group16"), ("mxfp4", "group32"), ("fp8", "row")):
        m = ecoptim.quantize_(TinyLM(d=128), fmt, gran)
        cfg = State4bit()
        opt = ecoptim.AdamW(m.parameters(), lr=3e-3, state_dtype=cfg)
        train(m, opt, batches(2))
        rep = ecoptim.memory_report(m, opt)
        q = [r for r in rep.params if r.quantized]
        for r in q:  # 2 x (ceil(n/2) code bytes + 4 per block) + the step (fp32) and the SR stream (int64)
            assert r.state_bytes == 2 * (-(-r.numel // 2)) + 2 * 4 * cfg.blocks(r.numel) + 4 + 8
        bpp = sum(r.total_bytes for r in q) / sum(r.numel for r in q)
        if fmt != "fp8":  # the moonshot: FP4 weights + 4-bit states <= 1.7 B/param on the quantized layers
            assert bpp <= 1.7, (fmt, bpp)


def test_four_bit_states_train(tmp_path):
    torch.manual_seed(0)
    base = ecoptim.quantize_(TinyLM(d=64), "nvfp4", "group16")
    data = batches(30)
    losses = {}
    for sd in (torch.float32, State4bit(), State4bit(rounding="stochastic")):
        m = copy.deepcopy(base)
        opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, state_dtype=sd)
        train(m, opt, data)
        losses[str(sd)] = lm_loss(m, data[0]).item()
    for k in ("4bit/block128", "4bit/block128/sr"):
        assert losses[k] < 1.1 * losses[str(torch.float32)], losses


def test_a_checkpoint_for_another_shape_is_refused(tmp_path):
    torch.manual_seed(0)
    a = ecoptim.quantize_(TinyLM(), "nvfp4", "group16")
    a_opt = ecoptim.AdamW(a.parameters(), lr=3e-3, state_dtype=State4bit())
    train(a, a_opt, batches(1))
    save_checkpoint(tmp_path / "ck.pt", a, a_opt)
    b = ecoptim.quantize_(TinyLM(d=64), "nvfp4", "group16")
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_checkpoint(tmp_path / "ck.pt", b, ecoptim.AdamW(b.parameters(), lr=3e-3, state_dtype=State4bit()))


def test_moments_convert_between_four_bits_fp32_and_eight_bits():
    torch.manual_seed(0)
    m4 = ecoptim.quantize_(TinyLM(), "nvfp4", "group16")
    o4 = ecoptim.AdamW(m4.parameters(), lr=3e-3, state_dtype=State4bit())
    train(m4, o4, batches(2))
    q = [p for p in m4.parameters() if isinstance(p, QuantizedTensor)]
    decoded = {p: dequantize_state(o4.state[p]["exp_avg"], o4.state[p]["exp_avg_absmax"], True, State4bit(), p.shape)
               for p in q}
    # to torch.optim.AdamW: decoded to fp32 in the parameter's shape
    sd = ecoptim.to_torch_state_dict(o4)
    ids = {id(p): i for i, p in enumerate(m4.parameters())}
    for p in q:
        assert torch.equal(sd["state"][ids[id(p)]]["exp_avg"], decoded[p])
    # into fp32 states (exact), and into 8 bits (rounding: asked for)
    m32 = copy.deepcopy(m4)
    o32 = ecoptim.AdamW(m32.parameters(), lr=3e-3)
    with pytest.warns(UserWarning, match="decoded 4-bit moments"):
        o32.load_state_dict(copy.deepcopy(o4.state_dict()))
    for p, p32 in zip(m4.parameters(), m32.parameters()):
        if p in decoded:
            assert torch.equal(o32.state[p32]["exp_avg"], decoded[p])
    m8 = copy.deepcopy(m4)
    o8 = ecoptim.AdamW(m8.parameters(), lr=3e-3, state_dtype=State8bit())
    with pytest.raises(ValueError, match="8 bits"):
        o8.load_state_dict(copy.deepcopy(o4.state_dict()))
    with pytest.warns(UserWarning, match="rounded moments to 8 bits"):
        ecoptim.from_torch_state_dict(o8, copy.deepcopy(o4.state_dict()), round_states=True)
    for p, p8 in zip(m4.parameters(), m8.parameters()):
        if p in decoded:
            codes, absmax = quantize_state(decoded[p], True, State8bit())
            assert torch.equal(o8.state[p8]["exp_avg"], codes) and torch.equal(o8.state[p8]["exp_avg_absmax"], absmax)
    # and back from torch.optim.AdamW's fp32 state into 4 bits
    m4b = copy.deepcopy(m4)
    o4b = ecoptim.AdamW(m4b.parameters(), lr=3e-3, state_dtype=State4bit())
    with pytest.warns(UserWarning, match="rounded moments to 4 bits"):
        ecoptim.from_torch_state_dict(o4b, sd, round_states=True)
    for p, pb in zip(m4.parameters(), m4b.parameters()):
        if p in decoded:  # the decoded values re-encode to the same values (a -0 code may come back as +0)
            st4 = o4b.state[pb]
            assert torch.equal(dequantize_state(st4["exp_avg"], st4["exp_avg_absmax"], True, State4bit(), p.shape),
                               decoded[p])


# -- refusals and the fused kernel --------------------------------------------------------------------

def test_refusals():
    from ecoptim.distributed.fsdp import FSDPAdamW
    from ecoptim.distributed.onebit import OneBitAdamW
    with pytest.raises(ValueError, match="4-bit states"):
        FSDPAdamW(TinyLM().parameters(), state_dtype=State4bit())
    with pytest.raises(ValueError, match="4-bit states"):
        OneBitAdamW([{"params": list(TinyLM().parameters()), "state_dtype": State4bit()}])
    with pytest.raises(ValueError, match="skip_blocks"):
        ecoptim.AdamW(TinyLM().parameters(), state_dtype=State4bit(), nonfinite="skip_blocks")
    m = ecoptim.quantize_(TinyLM(), "fp8", "row")
    with pytest.raises(ValueError, match="amsgrad"):
        ecoptim.AdamW(m.parameters(), amsgrad=True, state_dtype=State4bit())


def test_the_fused_kernel_refuses_four_bit_states_and_the_reference_runs():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8", "row")
    train(m, ecoptim.AdamW(m.parameters(), lr=3e-3), batches(1))  # gradients present
    p = next(p for p in m.parameters() if isinstance(p, QuantizedTensor))
    opt = ecoptim.AdamW(m.parameters(), lr=3e-3, state_dtype=State4bit())
    assert not fused.applies(p, spec_of(p), opt.param_groups[0])
    opt8 = ecoptim.AdamW(m.parameters(), lr=3e-3, state_dtype=State8bit())
    assert fused.applies(p, spec_of(p), opt8.param_groups[0]) == ecoptim.kernels.available()
    # fused=None and fused=False give the same bits (both the reference path)
    runs = []
    for flag in (None, False):
        torch.manual_seed(0)
        mm = ecoptim.quantize_(TinyLM(), "fp8", "row")
        o = ecoptim.AdamW(mm.parameters(), lr=3e-3, fused=flag, state_dtype=State4bit(rounding="stochastic"))
        train(mm, o, batches(3))
        runs.append((mm, o))
    (a, oa), (b, ob) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.codes.view(torch.uint8), q.codes.view(torch.uint8)) if isinstance(p, QuantizedTensor) \
            else torch.equal(p, q)
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k


# -- the command line --------------------------------------------------------------------------------

def test_cli_state_dtype_4bit_and_pinned_fp8_rows():
    from ecoptim.app.cli import STATE_DTYPES, build_parser
    from ecoptim.app.train import resolve_methods
    assert STATE_DTYPES["4bit"] == State4bit() and STATE_DTYPES["4bit-sr"] == State4bit(rounding="stochastic")
    args = build_parser().parse_args(["compare", "--state-dtype", "4bit", "--format", "nvfp4"])
    assert args.state_dtype == "4bit"
    ms = resolve_methods(["fp8_e4m3_mw_sr@fp32", "eco_sr", "fp8_naive_sr", "eco_sr@4bit-sr"], "nvfp4")
    assert [m.name for m in ms] == ["fp8_mw_sr@fp32", "nvfp4_eco_sr", "nvfp4_naive_sr", "nvfp4_eco_sr@4bit-sr"]
    assert (ms[0].format, ms[0].granularity, ms[0].mode, ms[0].state_dtype) == ("fp8_e4m3", "row", "master", "fp32")
    assert ms[1].format == "nvfp4" and ms[1].state_dtype is None and ms[3].state_dtype == "4bit-sr"
    with pytest.raises(ValueError, match="quantized AdamW rows"):
        resolve_methods(["fp32_mw@fp32"], "nvfp4")


def test_compare_pairs_fp4_rows_with_the_fp8_mw_sr_row_when_no_same_format_one_ran():
    from ecoptim.app.cli import summarize
    from ecoptim.app.train import RunResult

    def run(method, fmt, gran, mode, seed, loss):
        return RunResult(method, method, fmt, gran, mode, "stochastic", 10, 10, "ok", loss, 5.0, loss, seed=seed,
                         peak_lr=1e-3)
    results = [run("fp8_mw_sr@fp32", "fp8_e4m3", "row", "master", s, 2.0 + 0.01 * s) for s in range(3)]
    results += [run("nvfp4_eco_sr", "nvfp4", "group16", "eco", s, 2.1 + 0.01 * s + 0.001 * s * s) for s in range(3)]
    rows = {r["method"]: r for r in summarize(results)}
    d = rows["nvfp4_eco_sr"]["diff_vs_mw_sr"]
    assert d is not None and abs(d["mean"] - (0.1 + 0.005 / 3)) < 1e-9 and d["lo"] < d["mean"] < d["hi"]
    # a same-format MW + SR row, when run, is the reference instead
    results += [run("nvfp4_mw_sr", "nvfp4", "group16", "master", s, 2.05) for s in range(3)]
    rows = {r["method"]: r for r in summarize(results)}
    assert abs(rows["nvfp4_eco_sr"]["diff_vs_mw_sr"]["mean"] - (2.1 + 0.01 + 0.005 / 3 - 2.05)) < 1e-9
