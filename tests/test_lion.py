"""ecoptim.Lion: the plain Lion update bit for bit (identity format, dense), exact = master, the injection's
per-step virtual iterate, training, state_dict round trip and refusals."""
import copy

import pytest
import torch

import ecoptim
from ecoptim import Lion
from ecoptim.optim.lion import eco_lion_coef
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss, train


class PlainLion(torch.optim.Optimizer):
    """Lion as lion-pytorch writes it (the reference): decay, sign of the interpolation, then the momentum."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - lr * wd)
                update = m.clone().mul_(b1).add(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def _weights(model):
    return [p.dequantize(torch.float32) if isinstance(p, QuantizedTensor) else p.detach() for p in model.parameters()]


@pytest.mark.parametrize("storage", ["real", "fake", "dense"])
@pytest.mark.parametrize("mode", ["eco", "master", "naive", "exact"])
@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, betas=(0.95, 0.98))])
def test_identity_format_and_dense_reproduce_plain_lion_bit_for_bit(storage, mode, kw):
    torch.manual_seed(0)
    ref = TinyLM()
    ours = copy.deepcopy(ref)
    if storage != "dense":
        ecoptim.quantize_(ours, "fp32", filter_fn=lambda m, n: isinstance(m, torch.nn.Linear), storage=storage)
    o_ref = PlainLion(ref.parameters(), lr=3e-3, **kw)
    o_ours = Lion(ours.parameters(), lr=3e-3, mode=mode, **kw)
    s_ref = torch.optim.lr_scheduler.CosineAnnealingLR(o_ref, 6, eta_min=1e-4)
    s_ours = torch.optim.lr_scheduler.CosineAnnealingLR(o_ours, 6, eta_min=1e-4)
    data = batches(6)
    train(ref, o_ref, data, s_ref)
    train(ours, o_ours, data, s_ours)
    for a, b in zip(_weights(ref), _weights(ours)):
        assert torch.equal(a, b)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(o_ref.state[a]["exp_avg"], o_ours.state[b]["exp_avg"])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
def test_exact_mode_reproduces_master_mode_bit_for_bit(fmt):
    models, opts = {}, {}
    for mode in ("master", "exact"):
        torch.manual_seed(0)
        models[mode] = ecoptim.quantize_(TinyLM(), fmt, "group16" if fmt == "nvfp4" else "row")
        opts[mode] = Lion(models[mode].parameters(), lr=1e-3, weight_decay=0.1, mode=mode, rounding="stochastic",
                          seed=5)
    data = batches(8)
    for mode in models:
        train(models[mode], opts[mode], data)
    for a, b in zip(models["master"].parameters(), models["exact"].parameters()):
        if isinstance(a, QuantizedTensor):
            assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8))
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_injection_makes_the_steps_virtual_iterate_follow_gradient_descent(rounding):
    """With the step's own secant gain s = lr/|c| (per element), x = w_hat - a*m with a = s*b1/(1-b2) moves by
    exactly -s*g in one ECO step, whatever the quantizer did (the linear model's invariant, checked step by step;
    across steps it does not hold, s changes)."""
    torch.manual_seed(0)
    model = ecoptim.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False)), "int8", "row")
    p = model[0].weight
    b1, b2, lr = 0.9, 0.99, 1e-3
    opt = Lion([p], lr=lr, betas=(b1, b2), mode="eco", rounding=rounding, seed=1)
    for step in range(5):
        g = torch.randn(16, 64)
        w0 = p.dequantize(torch.float32).double()
        m0 = opt.state[p]["exp_avg"].double().clone() if opt.state[p] else torch.zeros(16, 64, dtype=torch.float64)
        c = (m0 * b1 + (1 - b1) * g.double()).abs()
        p.grad = g.clone()
        opt.step()
        w1, m1 = p.dequantize(torch.float32).double(), opt.state[p]["exp_avg"].double()
        keep = c > 1e-3  # a = s*b1/(1-b2) is huge where c is tiny, and the fp32 rounding of m with it
        s = lr / c[keep]
        a = s * b1 / (1 - b2)
        dx = (w1 - w0)[keep] - a * (m1 - m0)[keep]
        assert torch.allclose(dx, -s * g.double()[keep], rtol=1e-4, atol=1e-6 * float(a.max()) * 1e-3), step
    assert eco_lion_coef(lr, b1, b2, 0.0) == -(1 - b2) / (lr * b1)


def _final_loss(fmt, gran, mode, rounding):
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(), fmt, gran)
    opt = Lion(model.parameters(), lr=1e-3, weight_decay=0.1, mode=mode, rounding=rounding)
    data = batches(40)
    before = lm_loss(model, data[0]).item()
    train(model, opt, data)
    return model, before, sum(lm_loss(model, d).item() for d in data[:10]) / 10


@pytest.mark.parametrize("fmt, gran", [("fp8_e4m3", "row"), ("nvfp4", "group16")])
def test_eco_lion_with_sr_trains_like_master_weights(fmt, gran):
    _, before, master = _final_loss(fmt, gran, "master", "stochastic")
    _, _, eco = _final_loss(fmt, gran, "eco", "stochastic")
    assert eco < before - 0.3 and abs(eco - master) < 0.02, (before, master, eco)


def test_eco_lion_with_rtn_cannot_beat_the_sign_saturation():
    """The documented limit: lr below half a grid step, round to nearest. ECO pushes the lost steps into m, but
    the next step is still lr*sign(c): no quantized weight moves, exactly as with naive removal."""
    eco, _, _ = _final_loss("nvfp4", "group16", "eco", "nearest")
    naive, _, _ = _final_loss("nvfp4", "group16", "naive", "nearest")
    for a, b in zip(eco.parameters(), naive.parameters()):
        if isinstance(a, QuantizedTensor):
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))


def test_state_dict_round_trip_resumes_bit_for_bit():
    def fresh():
        torch.manual_seed(0)
        m = ecoptim.quantize_(TinyLM(), "fp8_e4m3", "row")
        return m, Lion(m.parameters(), lr=1e-3, rounding="stochastic", seed=3)
    data = batches(6)
    ref, o_ref = fresh()
    train(ref, o_ref, data)
    a, o_a = fresh()
    train(a, o_a, data[:3])
    b, o_b = fresh()
    b.load_state_dict(a.state_dict())
    o_b.load_state_dict(copy.deepcopy(o_a.state_dict()))
    train(b, o_b, data[3:])
    for p, q in zip(ref.parameters(), b.parameters()):
        if isinstance(p, QuantizedTensor):
            assert torch.equal(p.codes.view(torch.uint8), q.codes.view(torch.uint8))
        else:
            assert torch.equal(p, q)


def test_refusals():
    m = ecoptim.quantize_(TinyLM(), "fp8_e4m3", "row")
    with pytest.raises(ValueError, match="beta1 must be > 0"):
        Lion(m.parameters(), betas=(0.0, 0.99))
    Lion(m.parameters(), betas=(0.0, 0.99), mode="naive")
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        Lion(m.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Lion(m.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="betas must be a pair"):
        Lion(m.parameters(), betas=0.9)
