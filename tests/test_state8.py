"""8-bit block-wise AdamW states: the table, the quantizer against its definition, the optimizer's plumbing
against an fp32-state step, memory, checkpoints and refusals."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecoptim
from ecoptim import State4bit, State8bit
from ecoptim.checkpoint import load_checkpoint, save_checkpoint
from ecoptim import kernels
from ecoptim.optim.state8 import (dequantize_state, dequantize_state_torch, magnitude_table, quantize_state,
                                 quantize_state_torch, state_key)
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss, train


@pytest.mark.parametrize("bits", [7, 8])
def test_magnitude_table_is_the_dynamic_tree(bits):
    t = magnitude_table(bits).double()
    assert t.numel() == 2 ** bits and t[0] == 0 and t[-1] == 1.0 and bool((t[1:] > t[:-1]).all())
    for e in range(bits):  # decade (10^-(e+1), 10^-e]: 2^(bits-1-e) evenly spaced points ending at 10^-e
        d = t[(t > 10.0 ** -(e + 1) * (1 + 1e-6)) & (t <= 10.0 ** -e * (1 + 1e-6))]
        assert d.numel() == 2 ** (bits - 1 - e)
        assert torch.allclose(d[-1], torch.tensor(10.0 ** -e, dtype=torch.float64), rtol=1e-6)
        if d.numel() > 1:
            step = d[1:] - d[:-1]
            assert torch.allclose(step, step.mean().expand_as(step), rtol=1e-4)


def _grid_values(codes, signed):
    t = magnitude_table(7 if signed else 8)
    c = codes.reshape(-1).long()
    return torch.where(c >= 128, -t[c & 0x7F], t[c & 0x7F]) if signed else t[c]


def _blocks(x, bs):
    flat = x.reshape(-1)
    pad = (-flat.numel()) % bs
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, bs)


floats = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(xs=st.lists(floats, min_size=1, max_size=700), bs=st.sampled_from([1, 3, 64, 256]),
       signed=st.booleans())
def test_nearest_picks_the_closest_table_entry_of_each_block(xs, bs, signed):
    x = torch.tensor(xs, dtype=torch.float32)
    if not signed:
        x = x.abs()
    cfg = State8bit(block_size=bs)
    codes, absmax = quantize_state(x, signed, cfg)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (cfg.blocks(x.numel()),)
    assert torch.equal(absmax, _blocks(x.abs(), bs).amax(1))  # the fp32 absmax of every block
    back = dequantize_state(codes, absmax, signed, cfg)
    # grid membership: sign * T[index] * absmax, bit for bit
    a = absmax.repeat_interleave(bs)[: x.numel()]
    assert torch.equal(back, _grid_values(codes, signed) * a)
    # nearest: no table entry is closer to |x|/absmax than the chosen one (brute force over the table)
    y = (x.abs() / torch.where(a > 0, a, torch.ones_like(a)))
    t = magnitude_table(7 if signed else 8)
    chosen = _grid_values(codes, signed).abs()
    best = (y[:, None] - t[None, :]).abs().min(1).values
    ok = (y - chosen).abs() <= best
    if not signed:  # except: a positive value below the smallest entry is stored as that entry (never 0)
        ok |= (y > 0) & (y < t[1]) & (chosen == t[1])
    assert bool(ok.all())
    # each block's absmax element is stored exactly, and signs are kept
    assert bool(((back.abs() == a) | (x.abs() != a)).all())
    assert bool((torch.sign(back) * torch.sign(x) >= 0).all())


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch code is all there is")


@needs_kernels
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n, bs", [(1, 256), (1000, 256), (70001, 256), (70001, 100), (300, 1)])
def test_c_codec_equals_the_torch_definition(rounding, signed, n, bs):
    torch.manual_seed(n)
    x = torch.randn(n) * torch.rand(n) ** 6 * 10.0 ** torch.randint(-8, 8, (n,)).float()
    x[: n // 7] = 0.0  # zeros, a -0, ties on midpoints and exact table entries
    x[n // 7:: 11] = -0.0
    t = magnitude_table(7 if signed else 8)
    k = min(n, t.numel() - 1)
    x[-k:] = ((t[:-1] + t[1:]) * 0.5)[:k]
    x[-1] = 1.0
    if not signed:
        x = x.abs()
    cfg = State8bit(block_size=bs, rounding=rounding)
    key = state_key(7, 3, signed, 11)
    c1, a1 = quantize_state(x, signed, cfg, key)
    c2, a2 = quantize_state_torch(x, signed, cfg, key)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert torch.equal(dequantize_state(c1, a1, signed, cfg), dequantize_state_torch(c1, a1, signed, cfg))


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_sends_a_value_on_a_midpoint_to_the_smaller_entry(signed):
    t = magnitude_table(7 if signed else 8)
    mid = (t[:-1] + t[1:]) * 0.5  # the rounding boundaries (fp32)
    x = torch.cat([torch.tensor([1.0]), mid, torch.nextafter(mid, torch.tensor(2.0))])
    codes, absmax = quantize_state(x if not signed else -x, signed, State8bit(block_size=x.numel()))
    idx = (codes.long() & 0x7F) if signed else codes.long()
    n = mid.numel()
    below = torch.arange(n)
    if not signed:  # a positive value is never stored as 0
        below = below.clamp(min=1)
    assert absmax.item() == 1.0 and torch.equal(idx[1:n + 1], below) and torch.equal(idx[n + 1:], torch.arange(n) + 1)


def test_a_positive_second_moment_is_never_stored_as_zero():
    v = torch.tensor([1.0, 1e-9, 1e-20, 0.0, 3e-8], dtype=torch.float32)
    for rounding in ("nearest", "stochastic"):
        cfg = State8bit(block_size=8, rounding=rounding)
        codes, absmax = quantize_state(v, False, cfg, (1, 2))
        back = dequantize_state(codes, absmax, False, cfg)
        assert torch.equal(back == 0, v == 0)
    # the first moment has no such floor: tiny values round to zero (a zero update, harmless)
    codes, absmax = quantize_state(torch.tensor([1.0, 1e-9]), True, State8bit())
    assert codes.tolist() == [127, 0]


def test_stochastic_rounding_is_unbiased_and_stays_on_the_two_neighbours():
    t = magnitude_table(7)
    torch.manual_seed(0)
    y = torch.rand(64) * 0.98 + 0.01
    x = torch.cat([torch.tensor([1.0]), -y])  # block absmax 1: the stored magnitudes are the table's
    cfg = State8bit(block_size=x.numel(), rounding="stochastic")
    n = 4000
    acc = torch.zeros_like(x, dtype=torch.float64)
    lo_i = torch.bucketize(y, t, right=True) - 1
    lo, hi = t[lo_i], t[lo_i + 1]
    for step in range(n):
        codes, absmax = quantize_state(x, True, cfg, state_key(1, 0, True, step))
        back = dequantize_state(codes, absmax, True, cfg)
        assert back[0] == 1.0
        mag = -back[1:]
        assert bool(((mag == lo) | (mag == hi)).all())
        acc += back.double()
    mean = -acc[1:] / n
    p = ((y - lo) / (hi - lo)).double()
    sigma = (hi - lo).double() * torch.sqrt(p * (1 - p) / n)
    assert bool(((mean - y.double()).abs() <= 5 * sigma + 1e-12).all())


def test_state8bit_validates_its_fields():
    with pytest.raises(ValueError, match="block_size"):
        State8bit(block_size=0)
    with pytest.raises(ValueError, match="rounding"):
        State8bit(rounding="up")
    with pytest.raises(ValueError, match="state_dtype"):
        ecoptim.AdamW(TinyLM().parameters(), state_dtype="8bit")


@pytest.mark.parametrize("mode", ["eco", "naive", "master"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_step_is_the_fp32_state_step_on_the_dequantized_moments(mode, rounding):
    """Each step of the 8-bit optimizer equals an fp32-state step started from its dequantized moments,
    followed by quantize_state of the new moments: nothing else happens to them."""
    torch.manual_seed(0)
    m8 = ecoptim.quantize_(TinyLM(), "fp8", "row")
    cfg = State8bit(block_size=64, rounding=rounding)
    o8 = ecoptim.AdamW(m8.parameters(), lr=3e-3, weight_decay=0.1, mode=mode, rounding="stochastic",
                       state_dtype=cfg, seed=3)
    q8 = [p for p in m8.parameters() if isinstance(p, QuantizedTensor)]
    for idx in batches(4):
        m32 = copy.deepcopy(m8)
        o32 = ecoptim.AdamW(m32.parameters(), lr=3e-3, weight_decay=0.1, mode=mode, rounding="stochastic",
                            fused=False, seed=3)
        if o8.state:  # a copy: load_state_dict would share the tensors
            with pytest.warns(UserWarning, match="decoded 8-bit moments to torch.float32"):
                o32.load_state_dict(copy.deepcopy(o8.state_dict()))
        for p8, p32 in zip(m8.parameters(), m32.parameters()):
            st8, st32 = o8.state.get(p8), o32.state.get(p32)
            if st8 and st8["exp_avg"].dtype == torch.uint8:  # loading decoded them into the fp32 optimizer
                assert torch.equal(st32["exp_avg"], dequantize_state(st8["exp_avg"], st8["exp_avg_absmax"], True, cfg))
                assert torch.equal(st32["exp_avg_sq"],
                                   dequantize_state(st8["exp_avg_sq"], st8["exp_avg_sq_absmax"], False, cfg))
                assert not {"exp_avg_absmax", "exp_avg_sq_absmax", "state8_stream"} & set(st32)
        o32.param_groups[0]["state_dtype"] = torch.float32
        for mm, oo in ((m8, o8), (m32, o32)):
            oo.zero_grad()
            lm_loss(mm, idx).backward()
        o32.step()
        o8.step()
        for p8, p32 in zip(m8.parameters(), m32.parameters()):
            if isinstance(p8, QuantizedTensor):
                assert torch.equal(p8.codes.view(torch.uint8), p32.codes.view(torch.uint8))
                assert torch.equal(p8.scale, p32.scale)
            else:
                assert torch.equal(p8, p32)
        # the moments: quantize_state of the fp32 run's new moments (SR: under the parameter's own key)
        for p8, p32 in zip(m8.parameters(), m32.parameters()):
            if not isinstance(p8, QuantizedTensor):
                continue
            st = o8.state[p8]
            for k, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                key = state_key(3, int(st["state8_stream"]), signed, int(st["step"])) if rounding != "nearest" else None
                codes, absmax = quantize_state(o32.state[p32][k], signed, cfg, key)
                assert torch.equal(st[k], codes) and torch.equal(st[k + "_absmax"], absmax), k
    assert all(o8.state[p]["exp_avg"].dtype == torch.uint8 for p in q8)


def test_eight_bit_states_cut_memory_to_measured_bytes_and_still_train():
    torch.manual_seed(0)
    base = ecoptim.quantize_(TinyLM(d=128), "fp8")
    data = batches(30)
    out = {}
    for sd in (torch.float32, State8bit(), State8bit(rounding="stochastic")):
        m = copy.deepcopy(base)
        opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, state_dtype=sd)
        train(m, opt, data)
        rep = ecoptim.memory_report(m, opt)
        q = [r for r in rep.params if r.kind.startswith("fp8")]
        out[str(sd)] = (sum(r.total_bytes for r in q) / sum(r.numel for r in q), lm_loss(m, data[0]).item())
        if isinstance(sd, State8bit):  # exactly: 2 codes + 2 fp32 absmax per 256 elements
            for r in q:  # + the step counter (fp32) and the SR stream number (int64)
                assert r.state_bytes == 2 * r.numel + 2 * 4 * sd.blocks(r.numel) + 4 + 8
    assert out["8bit/block256"][0] <= 3.1  # 1 (codes) + 2 x (1 + 4/256) + row scales
    for k in ("8bit/block256", "8bit/block256/sr"):
        assert out[k][1] < 1.05 * out[str(torch.float32)][1]


@pytest.mark.parametrize("fmt,gran,state_cls", [("fp8", "row", State8bit), ("nvfp4", "group16", State4bit)],
                         ids=["8bit", "4bit"])
def test_checkpoint_resume_with_low_bit_states_is_exact(tmp_path, fmt, gran, state_cls):
    def fresh(seed):
        torch.manual_seed(seed)
        m = ecoptim.quantize_(TinyLM(), fmt, gran)
        return m, ecoptim.AdamW(m.parameters(), lr=3e-3, state_dtype=state_cls(rounding="stochastic"), seed=seed)
    data = batches(6)
    ref, ref_opt = fresh(0)
    train(ref, ref_opt, data)
    a, a_opt = fresh(0)
    train(a, a_opt, data[:3])
    save_checkpoint(tmp_path / "ck.pt", a, a_opt)  # torch.load(weights_only=True) must rebuild the state config
    b, b_opt = fresh(5)
    load_checkpoint(tmp_path / "ck.pt", b, b_opt)
    assert b_opt.param_groups[0]["state_dtype"] == state_cls(rounding="stochastic")
    train(b, b_opt, data[3:])
    for p, q in zip(ref.parameters(), b.parameters()):
        if isinstance(p, QuantizedTensor):
            assert torch.equal(p.codes.view(torch.uint8), q.codes.view(torch.uint8))
        for k, v in ref_opt.state[p].items():
            assert v.dtype == b_opt.state[q][k].dtype and torch.equal(v, b_opt.state[q][k]), k


def test_distributed_optimizers_refuse_eight_bit_states():
    from ecoptim.distributed.fsdp import FSDPAdamW
    from ecoptim.distributed.onebit import OneBitAdamW
    with pytest.raises(ValueError, match="8-bit states"):
        FSDPAdamW(TinyLM().parameters(), state_dtype=State8bit())
    with pytest.raises(ValueError, match="8-bit states"):
        OneBitAdamW([{"params": list(TinyLM().parameters()), "state_dtype": State8bit()}])


@needs_kernels
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_step_with_eight_bit_states_equals_the_reference_bit_for_bit(rounding):
    torch.manual_seed(0)
    base = ecoptim.quantize_(TinyLM(), "fp8", "row")
    runs = []
    for fused in (None, False):
        m = copy.deepcopy(base)
        opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, rounding=rounding, fused=fused, seed=1,
                            state_dtype=State8bit(block_size=32, rounding=rounding))
        train(m, opt, batches(5))
        runs.append((m, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        if isinstance(p, QuantizedTensor):
            assert torch.equal(p.codes.view(torch.uint8), q.codes.view(torch.uint8)) and torch.equal(p.scale, q.scale)
        else:
            assert torch.equal(p, q)
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k


def test_skip_blocks_is_refused_with_eight_bit_states():
    with pytest.raises(ValueError, match="skip_blocks"):
        ecoptim.AdamW(TinyLM().parameters(), state_dtype=State8bit(), nonfinite="skip_blocks")
