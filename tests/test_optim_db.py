"""ecoptim.AdamW and ecoptim.SGD against torch's own optimizer test database (``optim_db``).

For every input of ``optim_inputs_func`` (with torch's fused/differentiable variants), with a dense parameter and
with a weight stored in the FP32 identity format (modes eco and master): ecoptim either reproduces torch.optim
bit for bit over several steps (two parameter groups, torch's LR schedulers) or refuses the input at
construction with an error that says what is not supported; the refusals are listed below, so any change is
deliberate. Every input of ``optim_error_inputs_func`` raises (or warns) what torch raises, with torch's message.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("expecttest")  # torch's optim_db imports it
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum, _get_optim_inputs_including_global_cliquey_kwargs, optim_db)

import ecoptim  # noqa: E402
from ecoptim.qtensor import QuantizedTensor  # noqa: E402

INFOS = {info.name: info for info in optim_db if info.name in ("AdamW", "SGD")}
OURS = {"AdamW": ecoptim.AdamW, "SGD": ecoptim.SGD}
KINDS = ("dense", "fp32-eco", "fp32-master")
STEPS = 6

# (optimizer, input description, kind) -> what the refusal must say. Everything else must match torch's bits.
_PLAIN_SGD = ("default", "non-default lr", "tensor lr", "non-zero weight_decay", "maximize")  # momentum 0
REFUSED = {
    **{(n, f"{oi.desc} & differentiable", k): "differentiable=True is not supported"
       for n, info in INFOS.items() for oi in info.optim_inputs_func("cpu") for k in KINDS},
    **{("SGD", desc + suffix, "fp32-eco"): "momentum must be > 0 for quantized weights"
       for desc in _PLAIN_SGD for suffix in ("", " & fused")},
}


def _inputs():
    out = []
    for name, info in INFOS.items():
        for oi in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info):
            for kind in KINDS:
                out.append(pytest.param(name, oi, kind, id=f"{name}-{oi.desc}-{kind}"))
    return out


def _model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    if kind != "dense":
        ecoptim.quantize_(model, "fp32", filter_fn=lambda m, n: isinstance(m, nn.Linear))
        assert isinstance(model[0].weight, QuantizedTensor)
    return model


def _groups(model, kwargs):
    """Two groups, the second with half the learning rate (torch's own tests also step several groups)."""
    lr = kwargs.get("lr", 1e-3)
    half = lr.clone() * 0.5 if isinstance(lr, torch.Tensor) else lr * 0.5
    return [{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias], "lr": half}]


def _run(make, model, kwargs, sched_makers):
    opt = make(_groups(model, kwargs), **kwargs)
    scheds = [mk(opt) for mk in sched_makers]
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, 5, generator=g)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        for s in scheds:
            s.step(loss.item()) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
    return opt


def _weights(model):
    return [p.dequantize() if isinstance(p, QuantizedTensor) else p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name,oi,kind", _inputs())
def test_optim_db_input_reproduces_torch_or_is_refused(name, oi, kind):
    info = INFOS[name]
    kwargs = copy.deepcopy(oi.kwargs)
    mode = kind.split("-")[1] if "-" in kind else "eco"
    ours = _model(kind)
    refused = REFUSED.get((name, oi.desc, kind))
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            OURS[name](_groups(ours, kwargs), **kwargs, mode=mode)
        return
    scheds = info.scheduler_inputs[hash(oi.desc) % len(info.scheduler_inputs)]
    o_ours = _run(lambda g, **kw: OURS[name](g, **kw, mode=mode), ours, kwargs, scheds)
    # torch's single-tensor code is the reference; torch's own fused CPU kernel rounds differently in places
    ref_kwargs = dict(copy.deepcopy(oi.kwargs), fused=False)
    ref = _model("dense")
    o_ref = _run(info.optim_cls, ref, ref_kwargs, scheds)
    for a, b in zip(_weights(ref), _weights(ours)):
        assert torch.equal(a, b)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        s_ref, s_ours = o_ref.state[p_ref], o_ours.state[p_ours]
        assert set(s_ref) <= set(s_ours)
        for k, v in s_ref.items():
            assert (v is None and s_ours[k] is None) or torch.equal(v, s_ours[k]), k
    for g_ref, g_ours in zip(o_ref.param_groups, o_ours.param_groups):
        assert float(g_ref["lr"]) == float(g_ours["lr"])
    if oi.kwargs.get("fused"):  # and torch's fused kernel agrees with both to its own tests' tolerance
        fused = _model("dense")
        _run(info.optim_cls, fused, copy.deepcopy(oi.kwargs), scheds)
        for a, b in zip(_weights(fused), _weights(ours)):
            torch.testing.assert_close(b, a)


def _error_inputs():
    out = []
    for name, info in INFOS.items():
        for ei in info.optim_error_inputs_func("cpu", torch.float32):
            for kind in ("dense", "fp8"):
                out.append(pytest.param(name, ei, kind, id=f"{name}-{ei.optimizer_error_input.desc}-{kind}"))
    return out


@pytest.mark.parametrize("name,ei,kind", _error_inputs())
def test_optim_db_error_input_raises_what_torch_raises(name, ei, kind):
    oi = ei.optimizer_error_input
    params = oi.params
    if params is None:
        lin = nn.Linear(2, 2, bias=False)
        if kind == "fp8":
            ecoptim.quantize_(lin, "fp8", filter_fn=lambda m, n: True)
        params = [lin.weight]
    make = lambda: OURS[name](params, **oi.kwargs)  # noqa: E731
    if issubclass(ei.error_type, Warning):
        with pytest.warns(ei.error_type, match=ei.error_regex):
            make()
        return
    if ei.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt = make()
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        with pytest.raises(ei.error_type, match=ei.error_regex):
            opt.step()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ei.error_type, match=ei.error_regex):
            make()
