"""QuantOptimizer.clip_grad_norm_: the norm, the clipping folded into the step, and its safety rules.

The promise: ``n = opt.clip_grad_norm_(c); opt.step()`` gives exactly the bits of scaling every gradient by
torch's factor ``min(1, c / (n + 1e-6))`` first and stepping without clipping, on the fused kernel and the
reference path alike, while ``p.grad`` is left as it is; the norm is torch's quantity (accumulated in fp64)
and doubles as the step's NaN/Inf check.
"""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import ecoptim
from conftest import step_expecting_skip
from ecoptim import kernels
from ecoptim.optim.base import total_grad_norm
from ecoptim.qtensor import QuantizedTensor

ADAMW = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)


def _model(fmt="fp8_e4m3", gran="row", seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40), nn.LayerNorm(40))
    if fmt is not None:  # biases and the norm stay dense fp32: the clip covers them too
        ecoptim.quantize_(m, fmt, gran, filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
    return m


def _state(m, opt):
    out = []
    for p in m.parameters():
        if isinstance(p, QuantizedTensor):
            out += [p.codes.view(torch.uint8).clone(), p.scale.clone() if p.scale is not None else None]
        else:
            out.append(p.detach().clone())
        out += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def _same(a, b):
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                                                  and torch.equal(x, y)) for x, y in zip(a, b))


def _set_grads(m, grads, dtype=torch.float32):
    """bf16 gradients go to the quantized weights only (dense parameters keep gradients of their own dtype)."""
    for p, g in zip(m.parameters(), grads):
        if dtype != torch.float32 and isinstance(p, QuantizedTensor):
            p.grad_dtype = None
            p.grad = g.to(dtype).clone()
        else:
            p.grad = g.clone()


def _grads(m, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * scale for p in m.parameters()]


CASES = [(ecoptim.AdamW, dict(ADAMW)), (ecoptim.AdamW, dict(ADAMW, state_dtype=torch.bfloat16)),
         (ecoptim.SGD, dict(lr=3e-2, momentum=0.9, weight_decay=0.01))]


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "row"), ("int4", "group16"), ("bf16", None), (None, None)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_clip_then_step_equals_scaling_the_gradients_first(cls, kw, fmt, gran, rounding, fused, grad_dtype):
    a, b = _model(fmt, gran), _model(fmt, gran)
    oa = cls(a.parameters(), rounding=rounding, fused=fused, **kw)
    ob = cls(b.parameters(), rounding=rounding, fused=fused, **kw)
    for step, (scale, max_norm) in enumerate([(1.0, 0.5), (1e-3, 1.0), (10.0, 1.0), (1e-2, 3.0)]):
        grads = _grads(a, step, scale)
        _set_grads(a, grads, grad_dtype)
        _set_grads(b, grads, grad_dtype)
        before = [p.grad.clone() for p in a.parameters()]
        n = oa.clip_grad_norm_(max_norm)
        assert n.dtype == torch.float32 and n.shape == ()
        # the reference: torch's factor applied to the (fp32) gradients, then an unclipped step
        coef = float((max_norm / (n + 1e-6)).clamp(max=1.0))
        for p in b.parameters():
            if coef < 1.0:
                p.grad = p.grad.float() * coef if isinstance(p, QuantizedTensor) else p.grad * coef
        oa.step()
        ob.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), before)), "p.grad was modified"
        assert _same(_state(a, oa), _state(b, ob)), f"differs at step {step} (coef {coef})"
        oa.zero_grad()
        ob.zero_grad()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_clipped_fused_step_is_bit_identical_to_the_clipped_reference(rounding):
    a, b = _model(), _model()
    ref = ecoptim.AdamW(a.parameters(), rounding=rounding, fused=False, **ADAMW)
    fast = ecoptim.AdamW(b.parameters(), rounding=rounding, **ADAMW)
    for step in range(4):
        grads = _grads(a, 10 + step, 3.0)
        _set_grads(a, grads)
        _set_grads(b, grads)
        assert torch.equal(ref.clip_grad_norm_(1.0), fast.clip_grad_norm_(1.0))
        ref.step()
        fast.step()
        assert _same(_state(a, ref), _state(b, fast))


def test_norm_is_torchs_quantity_in_fp64():
    m = _model()
    grads = _grads(m, 3, 0.1)
    grads[0][0, :5] = torch.tensor([1e30, -1e-30, 0.0, -0.0, 3.0])  # fp32 squares would overflow/underflow
    _set_grads(m, grads)
    opt = ecoptim.AdamW(m.parameters(), **ADAMW)
    exact = math.sqrt(math.fsum(float(x) ** 2 for g in grads for x in g.double().flatten()))
    assert float(opt.clip_grad_norm_(1.0)) == float(np.float32(exact))
    for p in (1.0, 3.0, math.inf):
        ref = torch.nn.utils.get_total_norm([g.double() for g in grads], p)
        assert float(opt.clip_grad_norm_(1.0, norm_type=p)) == pytest.approx(float(ref), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 70000), min_size=1, max_size=4), seed=st.integers(0, 2 ** 31),
       log_scale=st.integers(-30, 30), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_sumsq_kernel_is_the_exact_sum_to_fp64_rounding_and_independent_of_threads(sizes, seed, log_scale, dtype):
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** (log_scale if dtype != torch.float16 else max(min(log_scale, 6), -10))
    ts = [(torch.randn(n, generator=g) * scale).to(dtype) for n in sizes]
    one = kernels.sumsq(ts)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        three = kernels.sumsq(ts)
    finally:
        torch.set_num_threads(old)
    assert one == three  # the same bits whatever the thread count (fixed chunks and lanes)
    for t, s in zip(ts, one):
        exact = math.fsum(x * x for x in t.double().tolist())  # each square is exact in a double
        assert abs(s - exact) <= 1e-12 * exact


def test_sumsq_flags_every_non_finite_value():
    a = torch.randn(100003)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for i in (0, 15, 16, 65535, 65536, 100002):
                c = a.to(dtype)
                c[i] = bad
                assert not math.isfinite(kernels.sumsq([a, c])[1])
    assert kernels.sumsq([a[::2]]) is None  # not contiguous: the caller uses torch


def test_norm_falls_back_to_torch_for_tensors_the_kernel_cannot_read():
    g = torch.randn(300, 7)
    ours = total_grad_norm([g.t(), g[::2]])  # non-contiguous views
    assert float(ours) == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.flatten(), g[::2].flatten()]))),
                                        rel=1e-6)


@pytest.mark.parametrize("policy", ["skip", "skip_blocks", "raise"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norm_skips_the_step_and_touches_nothing(policy, bad):
    m = _model()
    opt = ecoptim.AdamW(m.parameters(), nonfinite=policy, **ADAMW)
    _set_grads(m, _grads(m, 0, 1e-2))
    opt.step()
    opt.zero_grad()
    grads = _grads(m, 1, 1e-2)
    grads[2][3, 4] = bad
    _set_grads(m, grads)
    before = _state(m, opt)
    assert not math.isfinite(float(opt.clip_grad_norm_(1.0)))
    step_expecting_skip(opt, policy)
    assert _same(before, _state(m, opt))
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_the_clip_replaces_the_steps_own_nan_check(monkeypatch):
    m = _model()
    opt = ecoptim.AdamW(m.parameters(), **ADAMW)
    _set_grads(m, _grads(m, 0, 1e-2))
    calls = []
    real = opt._grads_finite
    monkeypatch.setattr(opt, "_grads_finite", lambda: calls.append(1) or real())
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert calls == []  # the norm pass has checked every gradient
    opt.step()  # no clip pending: the step checks by itself
    assert calls == [1]


def test_gradients_changed_after_the_clip_are_refused_and_nothing_is_updated():
    m = _model()
    opt = ecoptim.AdamW(m.parameters(), **ADAMW)
    first = next(m.parameters())
    for change in ("backward", "inplace", "replace", "drop"):
        _set_grads(m, _grads(m, 0, 1e-2))
        opt.clip_grad_norm_(0.1)
        if change == "backward":
            m(torch.randn(2, 48)).sum().backward()  # accumulates into the existing .grad tensors
        elif change == "inplace":
            first.grad.mul_(2)
        elif change == "replace":
            first.grad = first.grad.clone()
        else:
            first.grad = None
        before = _state(m, opt)
        with pytest.raises(RuntimeError, match="changed after clip_grad_norm_"):
            opt.step()
        assert _same(before, _state(m, opt))
    # the failed step consumed the clip: the next step is an ordinary one
    _set_grads(m, _grads(m, 1, 1e-2))
    opt.step()


def test_zero_grad_drops_a_pending_clip():
    a, b = _model(), _model()
    oa, ob = ecoptim.AdamW(a.parameters(), **ADAMW), ecoptim.AdamW(b.parameters(), **ADAMW)
    _set_grads(a, _grads(a, 0, 1.0))
    oa.clip_grad_norm_(1e-3)  # would scale the gradients down a lot
    oa.zero_grad()
    for m, o in ((a, oa), (b, ob)):
        _set_grads(m, _grads(m, 1, 1e-2))
        o.step()
    assert _same(_state(a, oa), _state(b, ob))  # unclipped in both


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_quantized_and_dense_gradients(set_to_none):
    """``zero_grad`` (torch's, run without QuantizedTensor's Python handler) as torch's on every parameter."""
    m = _model()
    opt = ecoptim.AdamW(m.parameters(), **ADAMW)
    _set_grads(m, _grads(m, 0, 1.0))
    grads = {id(p): p.grad for p in m.parameters()}
    opt.zero_grad(set_to_none=set_to_none)
    assert any(isinstance(p, QuantizedTensor) for p in m.parameters())
    for p in m.parameters():
        if set_to_none:
            assert p.grad is None
        else:  # the same gradient tensor, zeroed in place
            assert p.grad is grads[id(p)] and not p.grad.any()


def test_no_clipping_needed_gives_the_unclipped_step():
    a, b = _model(), _model()
    oa, ob = ecoptim.AdamW(a.parameters(), **ADAMW), ecoptim.AdamW(b.parameters(), **ADAMW)
    for m in (a, b):
        _set_grads(m, _grads(m, 0, 1e-4))
    assert float(oa.clip_grad_norm_(1.0)) < 1.0
    oa.step()
    ob.step()
    assert _same(_state(a, oa), _state(b, ob))


@pytest.mark.parametrize("max_norm", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_max_norm_is_refused(max_norm):
    m = _model()
    opt = ecoptim.AdamW(m.parameters(), **ADAMW)
    _set_grads(m, _grads(m, 0, 1.0))
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(max_norm)
    with pytest.raises(ValueError, match="norm_type"):
        opt.clip_grad_norm_(1.0, norm_type=0)


def test_optimizers_that_exchange_gradients_refuse_the_fused_clip():
    from ecoptim.distributed.fsdp import FSDPAdamW
    from ecoptim.distributed.onebit import OneBitAdamW
    m = _model()
    for cls in (FSDPAdamW, OneBitAdamW):
        opt = cls(copy.deepcopy(m).parameters(), **ADAMW)
        with pytest.raises(NotImplementedError, match="torch.nn.utils.clip_grad_norm_"):
            opt.clip_grad_norm_(1.0)
