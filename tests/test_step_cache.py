"""A param group's planned step (``QuantOptimizer._step_planned``: the kernel's op call kept from one step to the
next) and the CPU backend's kept argument structs: every change between steps (storage, dtypes, shapes, group
membership, state, mode buffers, lr, clip) is detected before the step, and every step stays bit-identical to
the reference path (``fused=False``) and to an optimizer that plans nothing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim import kernels, ops
from ecoptim.backends.cpu import ops as cpu_ops
from ecoptim.formats import QuantSpec
from ecoptim.optim import fused
from ecoptim.qtensor import QuantizedTensor

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the C kernels")

SHAPES = [(8, 32), (4, 32), (16, 32), (8, 64)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(s[1], s[0]) for s in SHAPES])
    ecoptim.quantize_(m, "fp8_e4m3", "row")  # weights quantized, biases dense
    return m


def _trio(opt_cls=ecoptim.AdamW, **kw):
    """The planning optimizer, one that never plans, and the reference path, on three copies of one model."""
    m = _model()
    models = [copy.deepcopy(m) for _ in range(3)]
    opts = [opt_cls(models[0].parameters(), **kw), opt_cls(models[1].parameters(), **kw),
            opt_cls(models[2].parameters(), fused=False, **kw)]
    opts[1]._plan = lambda group, params, kernel_step: None
    return models, opts


def _grads(models, step: int, dtype=torch.float32, bad_row: bool = False) -> None:
    for ps in zip(*(m.parameters() for m in models)):
        g = torch.randn(ps[0].shape, generator=torch.Generator().manual_seed(step * 100 + ps[0].numel()))
        if bad_row and ps[0].dim() == 2:
            g[1, 3] = float("nan")
        for p in ps:
            if isinstance(p, QuantizedTensor):  # dense parameters keep their dtype's gradients (as torch wants)
                p.grad_dtype = None  # torch refuses a gradient of another dtype otherwise
                p.grad = g.to(dtype)
            else:
                p.grad = g.clone()  # a new gradient tensor every step, as after zero_grad(set_to_none=True)


def _assert_same(models, opts, what: str, kernel_only: bool = False) -> None:
    # kernel_only: the reference path is left out (nonfinite='skip_blocks' skips a weight outside the kernel whole,
    # the kernel a block)
    first, others = models[0], models[1:2] if kernel_only else models[1:]
    for other, o in zip(others, opts[1:]):
        for a, b in zip(first.parameters(), other.parameters()):
            if isinstance(a, QuantizedTensor):
                assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), what
                assert torch.equal(a.scale, b.scale), what
            else:
                assert torch.equal(a, b), what
            for k, v in opts[0].state[a].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, o.state[b][k]), f"{what}: state {k!r}"
        assert opts[0].generator(torch.device("cpu")).get_state().equal(o.generator(torch.device("cpu")).get_state())
    assert opts[0].skipped_blocks == opts[1].skipped_blocks


def _planned(monkeypatch, opt) -> list:
    results = []
    real = type(opt)._step_planned
    monkeypatch.setattr(opt, "_step_planned", lambda *a: results.append(real(opt, *a)) or results[-1])
    return results


def _step(models, opts, step: int, clip: float | None = None, **grad_kw) -> None:
    _grads(models, step, **grad_kw)
    for o in opts:
        if clip is not None:
            o.clip_grad_norm_(clip)
        o.step()
    _assert_same(models, opts, f"step {step}", kernel_only=grad_kw.get("bad_row", False))


@pytest.mark.parametrize("opt_cls,kw", [
    (ecoptim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (ecoptim.AdamW, dict(lr=1e-2, rounding="nearest", maximize=True)),
    (ecoptim.AdamW, dict(lr=1e-2, mode="exact", state_dtype=torch.bfloat16)),
    (ecoptim.AdamW, dict(lr=1e-2, mode="kahan")),
    (ecoptim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (ecoptim.SGD, dict(lr=1e-2, momentum=0.9, mode="master")),
], ids=["adamw", "adamw-rtn-max", "adamw-exact-bf16", "adamw-kahan", "sgd-nesterov", "sgd-master"])
def test_planned_steps_equal_the_reference_and_an_unplanned_optimizer(opt_cls, kw, monkeypatch):
    models, opts = _trio(opt_cls, **kw)
    planned = _planned(monkeypatch, opts[0])
    for step in range(6):
        for o in opts:  # an lr schedule: lr changes every step
            o.param_groups[0]["lr"] = 1e-2 / (step + 1)
        _step(models, opts, step, clip=0.5 if step % 2 else None)
    # the first step plans the group (SGD: the second, after its momentum buffers exist); later ones are planned
    assert planned and all(r is not None for r in planned[-4:])


def _replace_codes(models, opts):
    for m in models:
        p = m[0].weight
        p.codes = p.codes.clone()  # new storage for the weight


def _grad_dtype(models, opts):
    pass  # the gradients of the next step are bf16 (see the test)


def _reshape(models, opts):
    for m, o in zip(models, opts):
        new = QuantizedTensor.from_float(torch.randn(8, 48, generator=torch.Generator().manual_seed(5)) * 0.1,
                                         m[1].weight.spec)
        m[1].weight = nn.Parameter(new, requires_grad=True)
        group = o.param_groups[0]["params"]
        group[[id(p) for p in group].index(id(o.param_groups[0]["params"][2]))] = m[1].weight
        m[1].in_features = 48


def _add_group(models, opts):
    for m, o in zip(models, opts):
        extra = nn.Linear(32, 8, bias=False)
        extra.weight = nn.Parameter(QuantizedTensor.from_float(
            torch.randn(8, 32, generator=torch.Generator().manual_seed(6)) * 0.1, m[0].weight.spec))
        m.append(extra)
        o.add_param_group({"params": [extra.weight]})


def _remove_param(models, opts):
    for m, o in zip(models, opts):
        params = o.param_groups[0]["params"]
        del params[[id(p) for p in params].index(id(m[3].weight))]
        o.state.pop(m[3].weight, None)
        m[3].weight.requires_grad_(False)


def _load_state(models, opts):
    for o in opts:
        o.load_state_dict(copy.deepcopy(o.state_dict()))


def _replace_state(models, opts):
    for m, o in zip(models, opts):
        st = o.state[m[2].weight]
        st["exp_avg"] = st["exp_avg"].clone()
        st = o.state[m[0].weight]
        st["exp_avg_sq"].data = st["exp_avg_sq"].data.clone()  # same tensor object, new storage


def _replace_mode_buffer(models, opts):
    for m, o in zip(models, opts):
        st = o.state[m[1].weight]
        st["error"] = st["error"].clone()


def _edit_codes_in_place(models, opts):
    for m in models:
        m[0].weight.codes.view(torch.uint8)[:4] = 0x38  # version bumped, same storage


CHANGES = {"codes": _replace_codes, "grad-dtype": _grad_dtype, "shape": _reshape, "add-group": _add_group,
           "remove-param": _remove_param, "load-state-dict": _load_state, "state-tensors": _replace_state,
           "mode-buffer": _replace_mode_buffer, "codes-edited": _edit_codes_in_place}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_steps_is_detected(change, monkeypatch):
    kw = dict(lr=1e-2, mode="exact" if change == "mode-buffer" else "eco")
    models, opts = _trio(**kw)
    planned = _planned(monkeypatch, opts[0])
    for step in range(3):
        _step(models, opts, step)
    assert planned[-1] is not None  # planned before the change
    CHANGES[change](models, opts)
    n = len(planned)
    _step(models, opts, 3, dtype=torch.bfloat16 if change == "grad-dtype" else torch.float32)
    if change != "add-group":  # the change was seen: the full route stepped the group (a replaced group: unplanned)
        assert len(planned) == n or planned[n] is None
    for step in range(4, 7):
        _step(models, opts, step, dtype=torch.bfloat16 if change == "grad-dtype" else torch.float32)
    assert planned[-1] is not None  # planned again


def test_skip_blocks_on_a_planned_step_equals_the_reference(monkeypatch):
    models, opts = _trio(lr=1e-2, nonfinite="skip_blocks")
    planned = _planned(monkeypatch, opts[0])
    for step in range(3):
        _step(models, opts, step)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _step(models, opts, 3, bad_row=True)
    assert planned[-1] is not None and opts[0].skipped_blocks > 0


def _adamw_args(n: int, step: float, lr: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n):
        p = QuantizedTensor.from_float(torch.randn(4, 16, generator=g), QuantSpec.make("fp8_e4m3", "row"))
        jobs.append(fused.adamw_job(p, torch.randn(4, 16, generator=g), p.spec, torch.zeros(4, 16),
                                    torch.zeros(4, 16), (i, 7 + i), step=step, lr=lr, beta1=0.9, beta2=0.99,
                                    eps=1e-8, weight_decay=0.1, coef=0.5, inject=True))
    return fused.GroupCall(jobs).args


def test_kept_structs_equal_freshly_packed_ones(monkeypatch):
    """The strided writes of a kept call's fields give the bytes the per-tensor packing gives."""
    lib = kernels.load()

    class NoKernel:  # the structs are compared, the tensors left alone
        def __getattr__(self, name):
            return getattr(lib, name)

        def eco_step_many(self, *args):
            return 0

    monkeypatch.setattr(kernels, "load", lambda: NoKernel())
    cpu_ops.clear_packed()
    args = _adamw_args(3, 1.0, 1e-3, 0)
    ops.adamw_step_(**args)
    later = dict(args, steps=[5.0, 5.0, 6.0], lr=3e-3, grad_scales=[0.25, 0.25, -0.25], injection_coefs=[1.0, 2.0, 3.0],
                 sr_keys=[2 ** 32 - 1, 2 ** 31, 5, 6, 7, 8], grads=[g.to(torch.bfloat16) for g in args["grads"]])
    ops.adamw_step_(**later)
    assert len(cpu_ops._PACKED) == 1  # the second call reused the first one's structs
    kept = bytes(next(iter(cpu_ops._PACKED.values())).array)
    cpu_ops.clear_packed()
    monkeypatch.setattr(cpu_ops._Packed, "set", lambda *a: None)  # the per-tensor packing alone
    monkeypatch.setattr(cpu_ops._Packed, "set_keys", lambda *a: None)
    ops.adamw_step_(**later)
    assert bytes(next(iter(cpu_ops._PACKED.values())).array) == kept
    cpu_ops.clear_packed()
