"""Optimizers against plain reference implementations and the paper's invariants."""
import copy

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim.optim.base import MODES
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss, step_expecting_skip, train


def make_pair(seed=0):
    torch.manual_seed(seed)
    ref = TinyLM()
    return ref, copy.deepcopy(ref)




def weights(model):
    return [p.dequantize() if isinstance(p, QuantizedTensor) else p.detach() for p in model.parameters()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("foreach", [False, True])
def test_identity_quantizer_reproduces_torch_adamw_bit_for_bit(mode, rounding, foreach):
    ref, ours = make_pair()
    ecoptim.quantize_(ours, "fp32")  # real QuantizedTensor storage with the identity format
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if "norm" not in n]},
                        {"params": [p for n, p in m.named_parameters() if "norm" in n], "weight_decay": 0.0}]
    o_ref = torch.optim.AdamW(groups(ref), lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, foreach=foreach)
    o_ours = ecoptim.AdamW(groups(ours), lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, mode=mode,
                           rounding=rounding)
    s_ref = torch.optim.lr_scheduler.CosineAnnealingLR(o_ref, 10, eta_min=1e-4)
    s_ours = torch.optim.lr_scheduler.CosineAnnealingLR(o_ours, 10, eta_min=1e-4)
    data = batches(8)
    train(ref, o_ref, data, s_ref)
    train(ours, o_ours, data, s_ours)
    for a, b in zip(weights(ref), weights(ours)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [dict(momentum=0.9, dampening=0.9), dict(momentum=0.9),
                                dict(momentum=0.8, nesterov=True, weight_decay=1e-3)])
def test_identity_quantizer_reproduces_torch_sgd_bit_for_bit(mode, kw):
    ref, ours = make_pair()
    ecoptim.quantize_(ours, "fp32", storage="fake")
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **kw)
    o_ours = ecoptim.SGD(ours.parameters(), lr=0.05, mode=mode, **kw)
    data = batches(8)
    train(ref, o_ref, data)
    train(ours, o_ours, data)
    for a, b in zip(weights(ref), weights(ours)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt,gran,rounding", [("fp8_e4m3", "row", "nearest"), ("fp8_e4m3", "row", "stochastic"),
                                               ("int4", "tensor", "stochastic"), ("int8", "group16", "nearest")])
@pytest.mark.parametrize("kw,k", [(dict(momentum=0.9, dampening=0.9), 1.0), (dict(momentum=0.9), 1 / 0.1),
                                  (dict(momentum=0.9, nesterov=True), 1 / 0.1)])
def test_eco_sgd_virtual_iterate_follows_gradient_descent(fmt, gran, rounding, kw, k):
    """x = w_hat - (lr*a)*m obeys x <- x - k*lr*g exactly (to fp32 round-off) whatever q did."""
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(), fmt, gran)
    lr, beta = 0.05, kw["momentum"]
    a = lr * (beta ** 2 if kw.get("nesterov") else beta) / (1 - beta)
    opt = ecoptim.SGD(model.parameters(), lr=lr, mode="eco", rounding=rounding, **kw)
    qparams = [p for p in model.parameters() if isinstance(p, QuantizedTensor)]
    x_prev = None
    worst, moved = 0.0, 0
    for t, idx in enumerate(batches(12)):
        opt.zero_grad()
        lm_loss(model, idx).backward()
        grads = [p.grad.double().clone() for p in qparams]
        before = [p.dequantize().clone() for p in qparams]
        opt.step()
        x = [p.dequantize().double() - a * opt.state[p]["momentum_buffer"].double() for p in qparams]
        if x_prev is not None:  # step 1 uses torch's buf = g initialisation, the recurrence holds after it
            for xp, xn, g in zip(x_prev, x, grads):
                err = (xn - (xp - k * lr * g)).abs().max().item()
                worst = max(worst, err / (xp.abs().max().item() + 1e-12))
        moved += sum(int((p.dequantize() != b).sum()) for p, b in zip(qparams, before))
        x_prev = x
    assert moved > 0  # the quantizer really changed weights, so the invariant is not vacuous
    assert worst < 2e-5


def test_eco_injection_keeps_sub_grid_progress_in_momentum():
    """A step too small to move a weight: e = -lr*m and the injection turns m into m/beta."""
    w0 = torch.full((4, 8), 0.5)
    w0[:, 0] = 1.0  # the row absmax, given zero gradient so the per-row scale stays put
    lin = nn.Linear(8, 4, bias=False)
    lin.weight = nn.Parameter(w0.clone())
    w = lin.weight
    ecoptim.quantize_(lin, "fp8", "row", filter_fn=lambda m, n: True, storage="fake")
    assert torch.equal(w.detach(), w0)  # both values are on the grid
    opt = ecoptim.SGD(lin.parameters(), lr=1e-4, momentum=0.9, dampening=0.9, mode="eco", rounding="nearest")
    w.grad = torch.ones(4, 8)
    w.grad[:, 0] = 0.0
    opt.step()
    m = opt.state[w]["momentum_buffer"]
    assert torch.equal(w.detach(), w0)  # lr*m = 1e-4 is far below the grid spacing (16/448 at 0.5)
    expect = torch.full((4, 8), 1.0 / 0.9)
    expect[:, 0] = 0.0
    # e = w_til - w_hat is exact, but w_til = 0.5 - 1e-4 was rounded to fp32 (half an ulp, 2^-25), and the
    # injection multiplies that by |c| = (1/lr)(1/beta - 1)
    tol = (1 / 1e-4) * (1 / 0.9 - 1) * 2.0 ** -25 * 1.01
    torch.testing.assert_close(m, expect, rtol=0, atol=tol)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "row"), ("int4", "tensor")])
def test_exact_mode_reproduces_master_quantized_weights(opt_name, rounding, fmt, gran):
    torch.manual_seed(0)
    a = ecoptim.quantize_(TinyLM(), fmt, gran)
    b = copy.deepcopy(a)
    if opt_name == "sgd":
        mk = lambda m, mode: ecoptim.SGD(m.parameters(), lr=0.05, momentum=0.9, mode=mode, rounding=rounding, seed=3)
    else:
        mk = lambda m, mode: ecoptim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, mode=mode, rounding=rounding,
                                           seed=3)
    oa, ob = mk(a, "master"), mk(b, "exact")
    data = batches(30)
    train(a, oa, data)
    train(b, ob, data)
    n_changed = 0
    for (n, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), TinyLM().parameters()):
        if isinstance(pa, QuantizedTensor):
            assert torch.equal(pa.codes.view(torch.uint8), pb.codes.view(torch.uint8)), n
            assert torch.equal(pa.scale, pb.scale), n
        else:
            assert torch.equal(pa, pb), n


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_sub_grid_updates_lost_by_naive_rtn_are_kept_by_eco(opt_name):
    """Regression towards W* several grid steps away with per-step updates far below the grid spacing:
    naive + RTN cannot move, ECO gets as close as master weights do."""
    torch.manual_seed(0)
    w0 = torch.randn(16, 32) * 0.1
    target = w0 + 0.05 * torch.randn(16, 32).sign()
    dist = {}
    for mode in ("naive", "eco", "master"):
        lin = nn.Linear(32, 16, bias=False)
        lin.weight = nn.Parameter(w0.clone())
        ecoptim.quantize_(lin, "fp8", "row", filter_fn=lambda m, n: True)
        start = (lin.weight.dequantize() - target).norm()
        if opt_name == "sgd":
            opt = ecoptim.SGD(lin.parameters(), lr=1e-2, momentum=0.9, dampening=0.9, mode=mode, rounding="nearest")
        else:
            opt = ecoptim.AdamW(lin.parameters(), lr=5e-4, weight_decay=0.0, mode=mode, rounding="nearest")
        for _ in range(400):
            opt.zero_grad()
            (0.5 * (lin.weight - target).pow(2).sum()).backward()
            opt.step()
        dist[mode] = ((lin.weight.dequantize() - target).norm() / start).item()
    assert dist["naive"] > 0.9
    assert dist["master"] < 0.3
    assert dist["eco"] < 0.3


def test_kahan_mode_tracks_master_better_than_naive():
    torch.manual_seed(0)
    base = ecoptim.quantize_(TinyLM(), "bf16")
    out = {}
    for mode in ("master", "kahan", "naive"):
        m = copy.deepcopy(base)
        opt = ecoptim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0, mode=mode, rounding="nearest")
        train(m, opt, batches(30))
        out[mode] = torch.cat([w.flatten() for w in weights(m)])
    d_kahan = (out["kahan"] - out["master"]).abs().mean()
    d_naive = (out["naive"] - out["master"]).abs().mean()
    assert d_kahan < 0.2 * d_naive


def test_bad_hyperparameters_are_rejected_at_construction():
    m = ecoptim.quantize_(TinyLM(), "fp8")
    with pytest.raises(ValueError, match="lr must be > 0"):
        ecoptim.AdamW(m.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="beta1 must be > 0"):
        ecoptim.AdamW(m.parameters(), betas=(0.0, 0.99))
    with pytest.raises(ValueError, match="momentum must be > 0"):
        ecoptim.SGD(m.parameters(), lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="unknown mode"):
        ecoptim.AdamW(m.parameters(), mode="magic")
    with pytest.raises(ValueError, match="unknown rounding"):
        ecoptim.AdamW(m.parameters(), rounding="up")
    ecoptim.AdamW(m.parameters(), lr=0.0, mode="naive")  # fine: nothing is divided by lr
    ecoptim.SGD(m.parameters(), lr=0.1, momentum=0.0, mode="naive")


def test_lr_zero_from_a_scheduler_leaves_weights_and_state_finite():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s == 0 else 1.0)
    w0 = weights(m)
    train(m, opt, batches(1), sched)
    for a, b in zip(w0, weights(m)):
        assert torch.equal(a, b) or a.dim() == 1  # quantized and 2-D dense weights did not move at lr=0
    assert all(torch.isfinite(s["exp_avg"]).all() for s in opt.state.values())
    train(m, opt, batches(2), sched)
    assert all(torch.isfinite(w).all() for w in weights(m))


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradients_never_touch_weights_or_state(policy):
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=1e-3, nonfinite=policy)
    train(m, opt, batches(2))
    w0 = [w.clone() for w in weights(m)]
    st0 = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    lm_loss(m, batches(1)[0]).backward()
    m.blocks[1].up.weight.grad[0, 0] = float("nan")
    m.lm_head.weight.grad[3, 1] = float("inf")
    step_expecting_skip(opt, policy)
    for a, b in zip(w0, weights(m)):
        assert torch.equal(a, b)
    st1 = opt.state_dict()
    for k, s in st0["state"].items():
        for name, v in s.items():
            assert torch.equal(v, st1["state"][k][name])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_skip_blocks_leaves_exactly_the_bad_rows_and_params_untouched(rounding):
    """nonfinite='skip_blocks': a row with a NaN (or Inf) gradient keeps its codes, scale and moments, every other
    row gets exactly the update it would have had (rows are independent under per-row scales), a dense
    parameter with a NaN gradient is skipped whole, and the count and a warning say so."""
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8", "row")
    opt = ecoptim.AdamW(m.parameters(), lr=1e-3, nonfinite="skip_blocks", rounding=rounding)
    train(m, opt, batches(2))
    m2 = copy.deepcopy(m)
    opt2 = ecoptim.AdamW(m2.parameters(), lr=1e-3, nonfinite="skip_blocks", rounding=rounding)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch's load keeps the very same state tensors)
    for model in (m, m2):
        model.zero_grad()
        lm_loss(model, batches(1)[0]).backward()
    up, head, norm = m.blocks[1].up.weight, m.lm_head.weight, m.norm.weight
    before = {k: v.clone() for k, v in opt.state[up].items()}
    rows = lambda c: c.reshape(up.shape[0], -1)  # noqa: E731  (codes are stored flat)
    codes0, scale0, norm0 = rows(up.codes).clone(), up.scale.clone(), norm.detach().clone()
    up.grad[5, 3], head.grad[2, 0], norm.grad[0] = float("nan"), float("inf"), float("nan")
    m2.blocks[1].up.weight.grad[5, 3] = m2.lm_head.weight.grad[2, 0] = 0.0
    m2.norm.weight.grad[0] = 0.0
    with pytest.warns(RuntimeWarning, match="3 blocks"):
        opt.step()
    opt2.step()
    assert opt.skipped_blocks == 3 and opt.skipped_steps == 0
    up2 = m2.blocks[1].up.weight
    keep = torch.arange(up.shape[0]) != 5
    assert torch.equal(rows(up.codes)[5], codes0[5]) and up.scale[5] == scale0[5]
    assert torch.equal(rows(up.codes)[keep], rows(up2.codes)[keep]) and torch.equal(up.scale[keep], up2.scale[keep])
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[up][k][5], before[k][5])
        assert torch.equal(opt.state[up][k][keep], opt2.state[up2][k][keep])
    assert opt.state[up]["step"] == before["step"] + 1  # other rows moved: its step happened
    assert torch.equal(norm.detach(), norm0) and opt.state[norm]["step"] == opt2.state[m2.norm.weight]["step"] - 1
    for w in weights(m):
        assert torch.isfinite(w).all()


def test_skip_blocks_is_refused_where_ranks_must_agree():
    from ecoptim.distributed.onebit import OneBitAdamW
    with pytest.raises(ValueError, match="skip_blocks"):
        OneBitAdamW(TinyLM().parameters(), nonfinite="skip_blocks")
    with pytest.raises(ValueError, match="skip_blocks"):
        ecoptim.AdamW(TinyLM().parameters(), nonfinite="sometimes")


@pytest.mark.parametrize("mode", ["eco", "master", "exact", "kahan"])
def test_state_dict_round_trip_resumes_identically(mode):
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=2e-3, mode=mode, rounding="stochastic", seed=11)
    data = batches(10)
    train(m, opt, data[:5])
    ck_model, ck_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    train(m, opt, data[5:])
    m2 = ecoptim.quantize_(TinyLM(), "fp8")
    m2.load_state_dict(ck_model)
    opt2 = ecoptim.AdamW(m2.parameters(), lr=2e-3, mode=mode, rounding="stochastic", seed=999)
    opt2.load_state_dict(ck_opt)
    saved = [v.dtype for s in ck_opt["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert [v.dtype for s in opt2.state.values() for v in s.values() if torch.is_tensor(v)] == saved
    train(m2, opt2, data[5:])
    for a, b in zip(weights(m), weights(m2)):
        assert torch.equal(a, b)


def test_rng_states_are_what_state_dict_saves_and_set_rng_states_resumes_the_stream():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=2e-3, rounding="stochastic", seed=11)
    data = batches(6)
    train(m, opt, data[:3])
    states = opt.rng_states()
    assert states.keys() == opt.state_dict()["ecoptim"]["rng"].keys() == {"cpu"}
    assert torch.equal(states["cpu"], opt.state_dict()["ecoptim"]["rng"]["cpu"])
    m2 = copy.deepcopy(m)
    opt2 = ecoptim.AdamW(m2.parameters(), lr=2e-3, rounding="stochastic", seed=999)
    sd = copy.deepcopy(opt.state_dict())
    del sd["ecoptim"]  # no generator states: opt2 would round with seed 999's stream
    opt2.load_state_dict(sd)
    opt2.set_rng_states(states)  # opt's stream
    train(m, opt, data[3:])
    train(m2, opt2, data[3:])
    for a, b in zip(weights(m), weights(m2)):
        assert torch.equal(a, b)


def test_bf16_optimizer_states_cut_static_memory_and_still_train():
    torch.manual_seed(0)
    base = ecoptim.quantize_(TinyLM(d=128), "fp8")  # rows of >= 128: per-row scales cost <= 4/128 B/param
    data = batches(30)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(base)
        opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, state_dtype=dt)
        train(m, opt, data)
        q = [p for p in m.parameters() if isinstance(p, QuantizedTensor)]
        assert all(opt.state[p]["exp_avg"].dtype == dt for p in q)
        rep = ecoptim.memory_report(m, opt)
        qbytes = sum(r.total_bytes for r in rep.params if r.kind.startswith("fp8"))
        qnumel = sum(r.numel for r in rep.params if r.kind.startswith("fp8"))
        out[dt] = (qbytes / qnumel, lm_loss(m, data[0]).item())
    assert out[torch.bfloat16][0] <= 5.1  # 1 (codes) + 2 + 2 (bf16 moments) + row scales
    assert out[torch.float32][0] > 9.0
    assert out[torch.bfloat16][1] < 1.05 * out[torch.float32][1]
    with pytest.raises(ValueError, match="state_dtype"):
        ecoptim.AdamW(base.parameters(), state_dtype=torch.float16)
