"""Switching a run between torch.optim and ecoptim (and between ecoptim settings) through state_dicts."""
import copy
import math

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim.optim import from_torch_state_dict, to_torch_state_dict
from ecoptim.optim.state8 import dequantize_state
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss, train

TORCH = {"adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, foreach=False, **kw),
         "sgd": lambda ps, **kw: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw)}
OURS = {"adamw": lambda ps, **kw: ecoptim.AdamW(ps, lr=3e-3, weight_decay=0.1, **kw),
        "sgd": lambda ps, **kw: ecoptim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw)}


def index_of(model, param):
    return next(i for i, p in enumerate(model.parameters()) if p is param)


def weights(model):
    return [p.dequantize() if isinstance(p, QuantizedTensor) else p.detach() for p in model.parameters()]


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", ["eco", "master"])
def test_switching_a_torch_run_to_the_fp32_identity_format_continues_it_bit_for_bit(opt_name, mode):
    """torch for 3 steps, then the dense checkpoint and torch's optimizer state loaded into a quantized model
    with an ecoptim optimizer for 3 more == torch for 6 steps (with the identity format nothing is rounded)."""
    torch.manual_seed(0)
    ref = TinyLM()
    half = copy.deepcopy(ref)
    data = batches(6)
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)  # noqa: E731
    o_ref = TORCH[opt_name](ref.parameters())
    train(ref, o_ref, data, sched(o_ref))
    o_half = TORCH[opt_name](half.parameters())
    s_half = sched(o_half)
    train(half, o_half, data[:3], s_half)
    checkpoint = copy.deepcopy({"model": half.state_dict(), "opt": o_half.state_dict(), "sched": s_half.state_dict()})

    model = TinyLM()
    model.load_state_dict(checkpoint["model"])
    ecoptim.quantize_(model, "fp32")
    opt = OURS[opt_name](model.parameters(), mode=mode)
    if mode == "master":  # the master copy starts from the loaded weights, and the warning says so
        with pytest.warns(UserWarning, match="created the fp32 master copy from the stored weights"):
            opt.load_state_dict(checkpoint["opt"])
    else:
        opt.load_state_dict(checkpoint["opt"])
    s = sched(opt)
    s.load_state_dict(checkpoint["sched"])
    train(model, opt, data[3:], s)
    for a, b in zip(weights(ref), weights(model)):
        assert torch.equal(a, b)
    if opt_name == "adamw":
        assert opt.state[model.blocks[0].up.weight]["step"].item() == 6


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_exported_state_continues_in_torch_bit_for_bit(opt_name):
    """ecoptim (identity format) for 3 steps, exported: torch.optim continues exactly as ecoptim would."""
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(), "fp32")
    opt = OURS[opt_name](model.parameters())
    data = batches(6)
    train(model, opt, data[:3])
    dense = TinyLM()
    dense.load_state_dict({k: v.dequantize() if isinstance(v, QuantizedTensor) else v
                           for k, v in model.state_dict().items()})
    o_torch = TORCH[opt_name](dense.parameters())
    o_torch.load_state_dict(copy.deepcopy(to_torch_state_dict(opt)))
    train(model, opt, data[3:])
    train(dense, o_torch, data[3:])
    for a, b in zip(weights(model), weights(dense)):
        assert torch.equal(a, b)


def test_a_bf16_torch_run_moves_to_fp8_eco_and_keeps_training():
    torch.manual_seed(0)
    dense = TinyLM().to(torch.bfloat16)
    o = torch.optim.AdamW(dense.parameters(), lr=3e-3)
    data = batches(12)
    train(dense, o, data[:4])
    ckpt = copy.deepcopy({"model": dense.state_dict(), "opt": o.state_dict()})

    model = TinyLM().to(torch.bfloat16)
    model.load_state_dict(ckpt["model"])
    ecoptim.quantize_(model, "fp8")
    up = model.blocks[0].up.weight
    assert isinstance(up, QuantizedTensor) and up.codes.dtype == torch.float8_e4m3fn
    opt = ecoptim.AdamW(model.parameters(), lr=3e-3, mode="eco")
    with pytest.warns(UserWarning, match=r"converted moments torch.bfloat16 -> torch.float32 \(exactly\)"):
        opt.load_state_dict(ckpt["opt"])
    st = opt.state[up]
    assert st["exp_avg"].dtype == torch.float32 and st["step"].item() == 4
    pid = index_of(model, up)
    assert torch.equal(st["exp_avg"], ckpt["opt"]["state"][pid]["exp_avg"].float())
    assert opt.state[model.emb.weight]["exp_avg"].dtype == torch.bfloat16  # dense: the parameter's dtype
    with torch.no_grad():
        before = sum(lm_loss(model, idx).item() for idx in data[:4])
    train(model, opt, data[4:] + data[:4])
    with torch.no_grad():
        after = sum(lm_loss(model, idx).item() for idx in data[:4])
    assert math.isfinite(after) and after < before
    assert opt.state[up]["step"].item() == 16


def _trained(mode, state_dtype=torch.float32, steps=2):
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(model.parameters(), lr=3e-3, mode=mode, state_dtype=state_dtype)
    train(model, opt, batches(steps))
    return model, opt


def _fresh(model, **kw):
    return ecoptim.AdamW(copy.deepcopy(model).parameters(), lr=3e-3, **kw)


def test_master_state_into_eco_drops_the_master_copy_with_a_warning():
    model, opt = _trained("master")
    target = ecoptim.AdamW(model.parameters(), lr=3e-3, mode="eco")
    with pytest.warns(UserWarning, match=r"mode master -> eco[\s\S]*dropped the fp32 master copy"):
        target.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all("master" not in st for st in target.state.values())
    assert all(g["mode"] == "eco" for g in target.param_groups)
    train(model, target, batches(2, seed=5))


@pytest.mark.parametrize("mode,buffer", [("master", "master"), ("exact", "error"), ("kahan", "comp_codes")])
def test_eco_state_into_a_mode_with_a_buffer_creates_it(mode, buffer):
    model, opt = _trained("eco")
    target = ecoptim.AdamW(model.parameters(), lr=3e-3, mode=mode)
    with pytest.warns(UserWarning, match=f"mode eco -> {mode}"):
        target.load_state_dict(copy.deepcopy(opt.state_dict()))
    up = model.blocks[0].up.weight
    assert buffer in target.state[up]
    if mode == "master":
        assert torch.equal(target.state[up]["master"], up.dequantize())
    train(model, target, batches(2, seed=5))


def test_narrowing_moments_is_refused_unless_asked_for_and_nothing_changes():
    model, opt = _trained("eco")
    sd = copy.deepcopy(opt.state_dict())
    target = ecoptim.AdamW(model.parameters(), lr=3e-3, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rounding them loses information"):
        target.load_state_dict(sd)
    assert not target.state and target.param_groups[0]["state_dtype"] == torch.bfloat16
    with pytest.warns(UserWarning, match=r"rounded moments torch.float32 -> torch.bfloat16"):
        from_torch_state_dict(target, sd, round_states=True)
    up = model.blocks[0].up.weight
    assert target.state[up]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(target.state[up]["exp_avg"], opt.state[up]["exp_avg"].bfloat16())

    eight = ecoptim.AdamW(model.parameters(), lr=3e-3, state_dtype=ecoptim.State8bit(64))
    with pytest.raises(ValueError, match="encoding the state_dict's torch.float32 moments rounds them"):
        eight.load_state_dict(sd)
    with pytest.warns(UserWarning, match="rounded moments to 8 bits"):
        from_torch_state_dict(eight, sd, round_states=True)
    assert eight.state[up]["exp_avg"].dtype == torch.uint8
    train(model, eight, batches(2, seed=5))


def test_8bit_states_widen_to_fp32_and_export_decoded():
    model, opt = _trained("eco", ecoptim.State8bit(64))
    up = model.blocks[0].up.weight
    cfg = ecoptim.State8bit(64)
    decoded = dequantize_state(opt.state[up]["exp_avg"], opt.state[up]["exp_avg_absmax"], True, cfg)
    target = ecoptim.AdamW(model.parameters(), lr=3e-3)
    with pytest.warns(UserWarning, match="decoded 8-bit moments to torch.float32"):
        target.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(target.state[up]["exp_avg"], decoded)
    exported = to_torch_state_dict(opt)
    pid = index_of(model, up)
    assert torch.equal(exported["state"][pid]["exp_avg"], decoded)
    assert set(exported["state"][pid]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.optim.AdamW(TinyLM().parameters()).load_state_dict(exported)


def test_mismatched_state_dicts_are_refused_before_anything_changes():
    model, opt = _trained("eco")
    up = model.blocks[0].up.weight
    pid = index_of(model, up)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][pid]["exp_avg"] = bad["state"][pid]["exp_avg"][:, :3]
    target = _fresh(model)
    with pytest.raises(ValueError, match=rf"parameter {pid}: state 'exp_avg' has shape \(128, 3\), expected "
                                         r"\(128, 32\) for a parameter of shape \(128, 32\)"):
        target.load_state_dict(bad)
    assert not target.state
    sgd = torch.optim.SGD(TinyLM().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"has no \['betas', 'eps'\]: it is not the state of a AdamW"):
        target.load_state_dict(sgd.state_dict())
    adam = torch.optim.Adam(TinyLM().parameters(), weight_decay=0.1)
    with pytest.raises(ValueError, match="torch.optim.Adam with weight_decay=0.1: L2 decay"):
        target.load_state_dict(adam.state_dict())
    target.load_state_dict(torch.optim.Adam(TinyLM().parameters()).state_dict())  # no decay: Adam == AdamW
    nan_lr = copy.deepcopy(opt.state_dict())
    nan_lr["param_groups"][0]["lr"] = float("nan")
    fresh = _fresh(model)
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        fresh.load_state_dict(nan_lr)
    assert not fresh.state and fresh.param_groups[0]["lr"] == 3e-3


def test_export_leaves_out_master_copies_with_a_warning():
    model, opt = _trained("master")
    with pytest.warns(UserWarning, match="fp32 master copy"):
        sd = to_torch_state_dict(opt)
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in sd["state"].values())
    assert sd["param_groups"][0]["decoupled_weight_decay"] is True and "mode" not in sd["param_groups"][0]
    torch.optim.AdamW(TinyLM().parameters()).load_state_dict(sd)


def test_sgd_state_from_torch_without_momentum_loads():
    torch.manual_seed(0)
    dense = nn.Linear(4, 3)
    o = torch.optim.SGD(dense.parameters(), lr=0.1)
    dense(torch.randn(2, 4)).sum().backward()
    o.step()
    lin = copy.deepcopy(dense)
    ecoptim.quantize_(lin, "fp8", filter_fn=lambda m, n: True)
    opt = ecoptim.SGD(lin.parameters(), lr=0.1, mode="naive")
    opt.load_state_dict(o.state_dict())  # torch keeps no state for plain SGD
    assert not opt.state
    o = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    o.step()
    opt = ecoptim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(o.state_dict())  # torch's SGD keeps no step count: ecoptim's starts at 0
    assert opt.state[lin.weight]["step"].item() == 0
    assert torch.equal(opt.state[lin.weight]["momentum_buffer"], dense.weight.grad)
    lin.weight.grad = torch.ones(3, 4)
    opt.step()
    assert opt.state[lin.weight]["step"].item() == 1
