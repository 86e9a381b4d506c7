"""ecoptim.AdamW and ecoptim.SGD against torch's own optimizer test database (``optim_db``).

For every input of ``optim_inputs_func`` (with torch's fused/differentiable variants and a foreach one), with a
dense parameter and with weights stored in the FP32 identity format (modes eco and master): ecoptim either
reproduces torch.optim bit for bit over several steps (two parameter groups, torch's LR schedulers) or refuses
the input at construction with an error that says what is not supported; the refusals are listed below, so
any change is deliberate. Every input of ``optim_error_inputs_func`` raises (or warns) what torch raises, with torch's message.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("expecttest")  # torch's optim_db imports it
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum, OptimizerInput, _get_optim_inputs_including_global_cliquey_kwargs, optim_db)

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
       for desc in _PLAIN_SGD for suffix in ("", " & fused", " & foreach")},
}


def _with_foreach(info):
    """torch's inputs with its cliquey variants; torch's CPU list has no foreach variant (torch's foreach kernels
    are for accelerators), so one is added per input: torch's foreach code runs on CPU as well."""
    out = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    for oi in info.optim_inputs_func("cpu"):
        out.append(OptimizerInput(params=None, kwargs=dict(copy.deepcopy(oi.kwargs), foreach=True),
                                  desc=f"{oi.desc} & foreach"))
    return out


def _inputs():
    out = []
    for name, info in INFOS.items():
        for i, oi in enumerate(_with_foreach(info)):
            for kind in KINDS:  # the inputs take torch's scheduler combinations in turn
                scheds = info.scheduler_inputs[i % len(info.scheduler_inputs)]
                out.append(pytest.param(name, oi, kind, scheds, id=f"{name}-{oi.desc}-{kind}"))
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


@pytest.mark.parametrize("name,oi,kind,scheds", _inputs())
def test_optim_db_input_reproduces_torch_or_is_refused(name, oi, kind, scheds):
    info = INFOS[name]
    kwargs = copy.deepcopy(oi.kwargs)
    mode = kind.split("-")[1] if "-" in kind else "eco"
    ours = _model(kind)
    refused = REFUSED.get((name, oi.desc, kind))
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            OURS[name](_groups(ours, kwargs), **kwargs, mode=mode)
        return
    o_ours = _run(lambda g, **kw: OURS[name](g, **kw, mode=mode), ours, kwargs, scheds)
    # torch's single-tensor (or foreach) code is the reference; torch's fused CPU kernel rounds differently in places
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


# -- beyond optim_db: every hyper-parameter checked at construction, torch's flags on the fused kernel -----------
BAD = [("lr", float("nan")), ("lr", float("inf")), ("lr", -1.0), ("lr", True), ("lr", "0.1"),
       ("lr", torch.tensor(float("nan"))), ("eps", float("nan")), ("eps", -1e-8), ("weight_decay", float("inf")),
       ("betas", (float("nan"), 0.99)), ("betas", (0.9, 1.0)), ("betas", (0.9,)), ("amsgrad", 1),
       ("maximize", "yes"), ("foreach", 0), ("capturable", True), ("differentiable", True)]
BAD_SGD = [("lr", float("nan")), ("momentum", float("nan")), ("momentum", 1.0), ("momentum", -0.5),
           ("dampening", float("inf")), ("weight_decay", float("nan")), ("weight_decay", torch.tensor(0.1)),
           ("nesterov", 1), ("maximize", None), ("differentiable", True)]


@pytest.mark.parametrize("name,kw", [("AdamW", kw) for kw in BAD] + [("SGD", kw) for kw in BAD_SGD],
                         ids=[f"{n}-{k}={v!r}" for n, bad in (("AdamW", BAD), ("SGD", BAD_SGD)) for k, v in bad])
def test_every_hyperparameter_is_checked_at_construction_and_in_added_groups(name, kw):
    key, value = kw
    extra = {"momentum": 0.9} if name == "SGD" and key != "momentum" else {}
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="Invalid|must be|not supported|pair"):
        OURS[name](lin.parameters(), **extra, **{key: value})
    opt = OURS[name]([lin.weight], **extra)
    with pytest.raises(ValueError, match="Invalid|must be|not supported|pair"):
        opt.add_param_group({"params": [lin.bias], key: value})
    assert len(opt.param_groups) == 1  # the bad group was not kept


def test_named_parameters_work_as_in_torch():
    model = ecoptim.quantize_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "fp8",
                              filter_fn=lambda m, n: isinstance(m, nn.Linear))
    opt = ecoptim.AdamW(model.named_parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    ecoptim.AdamW(model.named_parameters(), lr=1e-2).load_state_dict(sd)


def _fp8_run(cls, kw, fused, clip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16))
    ecoptim.quantize_(model, "fp8", filter_fn=lambda m, n: isinstance(m, nn.Linear))
    opt = cls(model.parameters(), fused=fused, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
        if clip:
            opt.clip_grad_norm_(0.01)
        opt.step()
    out = []
    for p in model.parameters():
        out += [p.codes.view(torch.uint8), p.scale] if isinstance(p, QuantizedTensor) else [p.detach()]
    return out, opt


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("name,kw", [
    ("AdamW", dict(lr=3e-3, maximize=True, weight_decay=0.1)),
    ("AdamW", dict(lr=torch.tensor(3e-3), maximize=True)),
    ("AdamW", dict(lr=3e-3, amsgrad=True, weight_decay=0.1)),
    ("SGD", dict(lr=torch.tensor(0.05), momentum=0.9, maximize=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
], ids=["adamw-maximize", "adamw-tensor-lr-maximize", "adamw-amsgrad", "sgd-tensor-lr-maximize", "sgd-nesterov-max"])
def test_torch_flags_on_fp8_weights_kernel_equals_reference(name, kw, clip, monkeypatch):
    """maximize (a negated gradient factor in the kernel, composed with the clip factor) takes the fused kernel
    with the reference path's bits; amsgrad (the kernel keeps no running maximum of v) and a Tensor lr (the
    step's scalars in the lr tensor's fp32 arithmetic) take the reference path."""
    from ecoptim import kernels
    from ecoptim.optim import fused
    calls = []
    real = fused.run
    monkeypatch.setattr(fused, "run", lambda jobs, **k: calls.append(len(jobs)) or real(jobs, **k))
    fast, o_fast = _fp8_run(OURS[name], kw, None, clip)
    uses_kernel = bool(calls)
    ref, _ = _fp8_run(OURS[name], kw, False, clip)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    # amsgrad (no running maximum of v in the kernel) and a Tensor lr (its fp32 arithmetic) take the reference
    assert uses_kernel == (not kw.get("amsgrad", False) and not isinstance(kw["lr"], torch.Tensor)
                           and kernels.available())


def test_amsgrad_eco_injects_with_the_amsgrad_denominator():
    """ECO's AdamW injection with amsgrad uses the denominator the step used, sqrt(max_v / bc2) + eps."""
    from ecoptim.optim.adamw import adamw_update_, eco_adamw_coef, sqrt_rn
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    ecoptim.quantize_(lin, "fp8", filter_fn=lambda m, n: True)
    w = lin.weight
    opt = ecoptim.AdamW([w], lr=1e-2, amsgrad=True, weight_decay=0.1, rounding="nearest")
    w.grad = torch.randn(8, 16)
    opt.step()
    w.grad = 0.01 * torch.randn(8, 16)  # smaller: max_v stays above v, so the two denominators differ
    st = opt.state[w]
    m, v, vmax, w0 = (st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st["max_exp_avg_sq"].clone(),
                      w.dequantize())
    opt.step()
    w_til = w0.clone()
    denom = adamw_update_(w_til, w.grad, m, v, step=2.0, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, sqrt=sqrt_rn, max_exp_avg_sq=vmax)
    assert bool((vmax > v).any())
    m.addcmul_(w_til - w.dequantize(), denom, value=eco_adamw_coef(2.0, 1e-2, 0.9, 0.1))
    assert torch.equal(st["exp_avg"], m) and torch.equal(st["max_exp_avg_sq"], vmax)


def test_amsgrad_with_narrow_states_is_refused():
    lin = ecoptim.quantize_(nn.Sequential(nn.Linear(4, 4)), "fp8", filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="amsgrad=True keeps the running maximum"):
        ecoptim.AdamW(lin.parameters(), amsgrad=True, state_dtype=torch.bfloat16)
