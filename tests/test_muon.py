"""ecoptim.Muon against torch.optim.Muon, its modes against each other, and the ECO injection's properties."""
import copy

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim.optim.muon import (MuonWithAdamW, adjusted_lr, eco_muon_coef, muon_update_, secant_gain,
                                zeropower_via_newtonschulz)
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss, train

HIDDEN = ("qkv", "proj", "up", "down")


def hidden(model):
    return [p for n, p in model.named_parameters() if any(k in n for k in HIDDEN)]


def weights(params):
    return [p.dequantize() if isinstance(p, QuantizedTensor) else p.detach() for p in params]


def hidden_quantized(fmt="fp8_e4m3", storage=None, seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    kw = {} if storage is None else {"storage": storage}
    ecoptim.quantize_(model, fmt, filter_fn=lambda m, n: any(k in n for k in HIDDEN), **kw)
    return model


@pytest.mark.parametrize("storage", ["real", "fake", "dense"])
@pytest.mark.parametrize("kw", [dict(), dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw", weight_decay=0.3),
                                dict(adjust_lr_fn="original", nesterov=False, weight_decay=0.0, momentum=0.8)])
@pytest.mark.parametrize("mode", ["eco", "master", "naive", "exact"])
def test_identity_format_and_dense_reproduce_torch_muon_bit_for_bit(storage, kw, mode):
    torch.manual_seed(0)
    ref = TinyLM()
    ours = copy.deepcopy(ref)
    if storage != "dense":
        ecoptim.quantize_(ours, "fp32", filter_fn=lambda m, n: any(k in n for k in HIDDEN), storage=storage)
    o_ref = torch.optim.Muon(hidden(ref), lr=0.02, **kw)
    o_ours = ecoptim.Muon(hidden(ours), lr=0.02, mode=mode, **kw)
    s_ref = torch.optim.lr_scheduler.CosineAnnealingLR(o_ref, 6, eta_min=1e-3)
    s_ours = torch.optim.lr_scheduler.CosineAnnealingLR(o_ours, 6, eta_min=1e-3)
    data = batches(6)
    train(ref, o_ref, data, s_ref)
    train(ours, o_ours, data, s_ours)
    for a, b in zip(weights(hidden(ref)), weights(hidden(ours))):
        assert torch.equal(a, b)
    for a, b in zip(hidden(ref), hidden(ours)):
        assert torch.equal(o_ref.state[a]["momentum_buffer"], o_ours.state[b]["momentum_buffer"])


def test_newton_schulz_is_torchs():
    from torch.optim import _muon as tm  # torch's own function, the oracle
    g = torch.Generator().manual_seed(3)
    for shape in [(8, 5), (5, 8), (16, 16)]:
        x = torch.randn(*shape, generator=g)
        coefs = (tm.DEFAULT_A, tm.DEFAULT_B, tm.DEFAULT_C)
        assert torch.equal(zeropower_via_newtonschulz(x), tm._zeropower_via_newtonschulz(x, coefs, 5, tm.EPS))
        for fn in (None, "original", "match_rms_adamw"):
            assert adjusted_lr(0.02, fn, shape) == tm._adjust_lr(0.02, fn, torch.Size(shape))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_exact_mode_reproduces_master_mode_bit_for_bit(fmt, nesterov):
    models = {m: hidden_quantized(fmt) for m in ("master", "exact")}
    opts = {m: ecoptim.Muon(hidden(models[m]), lr=0.03, weight_decay=0.1, nesterov=nesterov, mode=m,
                            rounding="stochastic", seed=5) for m in models}
    data = batches(8)
    for m in models:
        train(models[m], opts[m], data)
    for a, b in zip(weights(hidden(models["master"])), weights(hidden(models["exact"]))):
        assert torch.equal(a, b)
    for a, b in zip(hidden(models["master"]), hidden(models["exact"])):
        assert torch.equal(opts["master"].state[a]["momentum_buffer"], opts["exact"].state[b]["momentum_buffer"])


def test_eco_coefficient_is_sgd_momentums_with_decay_factor():
    lr, lr_a, beta, wd = 0.02, 0.05, 0.9, 0.1
    assert eco_muon_coef(lr, lr_a, beta, False, 0.0) == pytest.approx(ecoptim.optim.eco_sgd_coef(lr_a, beta, False))
    assert eco_muon_coef(lr, lr_a, beta, True, 0.0) == pytest.approx(ecoptim.optim.eco_sgd_coef(lr_a, beta, True))
    assert eco_muon_coef(lr, lr_a, beta, False, wd, gain=2.0) == pytest.approx(
        (1 - lr * wd) * ecoptim.optim.eco_sgd_coef(2 * lr_a, beta, False))


@pytest.mark.parametrize("nesterov", [False, True])
def test_linear_model_virtual_iterate_is_exact_without_decay(nesterov):
    # With the orthogonaliser replaced by a linear map of gain k the update is SGD-M, and the coefficient must make
    # x = w_hat - a*m follow the master-weight recurrence exactly, whatever the quantizer did (the argument the
    # injection rests on; Muon's NS only approximates this model).
    g = torch.Generator().manual_seed(0)
    beta, lr_a, k = 0.9, 0.05, 0.3
    q = lambda x: torch.round(x / 0.01) * 0.01
    a = lr_a * k * (beta ** 2 if nesterov else beta) / (1 - beta)
    w_eco = w_mw = q(torch.randn(64, dtype=torch.float64, generator=g))
    m_eco = torch.zeros(64, dtype=torch.float64)
    m_mw = m_eco.clone()
    c = eco_muon_coef(lr_a, lr_a, beta, nesterov, 0.0, gain=k)
    for _ in range(50):
        grad = torch.randn(64, dtype=torch.float64, generator=g)
        for name in ("eco", "mw"):
            m = m_eco if name == "eco" else m_mw
            m.lerp_(grad, 1 - beta)
            u = grad.lerp(m, beta) if nesterov else m
            if name == "eco":
                w_til = w_eco - lr_a * k * u
                w_eco = q(w_til)
                m.add_(w_til - w_eco, alpha=c)
            else:
                w_mw = w_mw - lr_a * k * u
        assert torch.allclose(w_eco - a * m_eco, w_mw - a * m_mw, rtol=0, atol=1e-12)


def test_step_too_small_to_move_a_weight_accumulates_in_the_momentum():
    # u proportional to an orthogonal matrix: NS(u) ~ gain*u, and the secant injection gives SGD's m -> m/beta
    # (up to NS's bf16 rounding) for every weight the step could not move.
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    lin = nn.Linear(16, 16, bias=False)
    # bf16 (no scale to recompute): 2^-20 is on its grid (spacing 2^-27), and steps of ~1e-11 cannot leave it, while
    # fp32 still resolves them (w_til's ulp there is 2^-43)
    lin.weight.data.fill_(2.0 ** -20)
    ecoptim.quantize_(nn.Sequential(lin), "bf16", filter_fn=lambda m, n: True)
    beta = 0.9
    opt = ecoptim.Muon([lin.weight], lr=1e-10, weight_decay=0.0, momentum=beta, nesterov=False, mode="eco",
                       rounding="nearest")
    before = lin.weight.dequantize().clone()
    lin.weight.grad = q * 1e-3
    opt.step()
    assert torch.equal(lin.weight.dequantize(), before)  # nothing moved
    m_bar = (1 - beta) * q * 1e-3  # the momentum before the injection
    expected = m_bar / beta
    torch.testing.assert_close(opt.state[lin.weight]["momentum_buffer"], expected, rtol=2e-2,
                               atol=2e-2 * float(expected.abs().max()))


def test_unit_injection_uses_the_plain_coefficient():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    grad = torch.randn(8, 6)
    buf = torch.zeros(8, 6)
    u, o = muon_update_(w.clone(), grad, buf.clone(), lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True)
    assert secant_gain(u, o) == pytest.approx(float(o.float().norm() / u.norm()))
    assert secant_gain(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize("injection", ["secant", "unit"])
def test_eco_lowers_the_loss(injection):
    model = hidden_quantized()
    opt = ecoptim.Muon(hidden(model), lr=0.02, mode="eco", injection=injection)
    data = batches(6)
    first = lm_loss(model, data[0]).item()
    train(model, opt, data * 2)
    assert lm_loss(model, data[0]).item() < first


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1.0), "learning rate"), (dict(momentum=-0.1), "momentum"), (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-0.1), "weight decay"), (dict(adjust_lr_fn="rms"), "Adjust learning rate"),
    (dict(ns_steps=100), "ns_steps"), (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
    (dict(eps=float("nan")), "eps"), (dict(injection="jacobian"), "injection"), (dict(mode="bogus"), "mode"),
    (dict(nesterov=1), "nesterov"), (dict(momentum=0.0), "momentum must be > 0")])
def test_validation_errors(bad, match):
    model = hidden_quantized()
    with pytest.raises(ValueError, match=match):
        ecoptim.Muon(hidden(model), **bad)


def test_refuses_non_matrix_parameters_before_keeping_the_group():
    model = hidden_quantized()
    opt = ecoptim.Muon(hidden(model), lr=0.02)
    with pytest.raises(ValueError, match="2D parameters"):
        opt.add_param_group({"params": [model.norm.weight]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="2D parameters"):
        ecoptim.Muon(model.parameters())


def test_never_takes_the_fused_kernel(monkeypatch):
    from ecoptim.optim import fused
    model = hidden_quantized()
    opt = ecoptim.Muon(hidden(model), lr=0.02, mode="eco")
    kernel_calls, reference = [], []
    monkeypatch.setattr(fused, "run", lambda jobs, **kw: kernel_calls.append(jobs))
    real = opt._step_reference
    monkeypatch.setattr(opt, "_step_reference", lambda p, *a: reference.append(p.param) or real(p, *a))
    train(model, opt, batches(1))
    assert not kernel_calls and reference  # every parameter on the reference path
    assert {id(p) for p in reference} == {id(p) for p in hidden(model)}


@pytest.mark.parametrize("mode", ["eco", "master", "exact"])
def test_state_dict_round_trip_resumes_bit_for_bit(mode):
    data = batches(6)
    a = hidden_quantized()
    oa = ecoptim.Muon(hidden(a), lr=0.02, mode=mode, rounding="stochastic", seed=3)
    train(a, oa, data[:3])
    b = copy.deepcopy(a)
    ob = ecoptim.Muon(hidden(b), lr=0.5, mode=mode, rounding="stochastic", seed=99)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert ob.param_groups[0]["lr"] == 0.02
    train(a, oa, data[3:])
    train(b, ob, data[3:])
    for x, y in zip(weights(hidden(a)), weights(hidden(b))):
        assert torch.equal(x, y)


def test_loads_a_torch_muon_state_dict():
    torch.manual_seed(0)
    ref = TinyLM()
    o_ref = torch.optim.Muon(hidden(ref), lr=0.02)
    train(ref, o_ref, batches(2))
    ours = copy.deepcopy(ref)
    o_ours = ecoptim.Muon(hidden(ours), lr=0.02, mode="master")
    o_ours.load_state_dict(copy.deepcopy(o_ref.state_dict()))  # torch.optim aliases same-dtype tensors it loads
    train(ref, o_ref, batches(2, seed=7))
    train(ours, o_ours, batches(2, seed=7))
    for x, y in zip(weights(hidden(ref)), weights(hidden(ours))):
        assert torch.equal(x, y)


def test_exports_a_state_dict_torch_muon_resumes_bit_for_bit():
    torch.manual_seed(0)
    ours = TinyLM()
    o_ours = ecoptim.Muon(hidden(ours), lr=0.02, mode="master")
    train(ours, o_ours, batches(2))
    ref = copy.deepcopy(ours)
    o_ref = torch.optim.Muon(hidden(ref), lr=0.02)
    o_ref.load_state_dict(copy.deepcopy(ecoptim.to_torch_state_dict(o_ours)))
    train(ref, o_ref, batches(2, seed=7))
    train(ours, o_ours, batches(2, seed=7))
    for x, y in zip(weights(hidden(ref)), weights(hidden(ours))):
        assert torch.equal(x, y)


def test_muon_with_adamw_splits_the_model_and_steps_both():
    model = hidden_quantized()
    opt = ecoptim.muon_with_adamw(model, lr=0.02, adamw_lr=1e-3, mode="eco")
    assert isinstance(opt, MuonWithAdamW)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in hidden(model)}  # embedding, head, norms go to AdamW
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert adamw_ids == {id(p) for p in model.parameters()} - muon_ids
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    before = [p.detach().clone() if not isinstance(p, QuantizedTensor) else p.dequantize()
              for p in model.parameters()]
    train(model, opt, batches(2), sched)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    after = weights(model.parameters())
    assert all(not torch.equal(x, y) for x, y in zip(before, after))
    assert len(opt.state) == len(list(model.parameters()))
    report = ecoptim.memory_report(model, opt)
    assert report.total_bytes > 0
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = ecoptim.muon_with_adamw(model2, lr=0.02, adamw_lr=1e-3, mode="eco")
    opt2.load_state_dict(sd)
    train(model, opt, batches(1, seed=4))
    train(model2, opt2, batches(1, seed=4))
    for x, y in zip(weights(model.parameters()), weights(model2.parameters())):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="'muon' and 'adamw'"):
        opt2.load_state_dict(opt.muon.state_dict())


def test_compare_resolves_the_muon_rows():
    from ecoptim.app.train import MUON_METHODS, resolve_methods
    rows = resolve_methods(["muon_mw", "muon_eco_sr", "fp8_mw_sr"])
    assert [m.name for m in rows] == ["muon_mw", "muon_eco_sr", "fp8_mw_sr"]
    assert rows[1].optimizer == "muon" and rows[1].mode == "eco" and rows[2].optimizer == "adamw"
    assert resolve_methods(["muon_eco_sr", "eco_sr"], "int4")[0] is MUON_METHODS["muon_eco_sr"]  # fixed FP8 rows
