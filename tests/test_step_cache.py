"""A param group's planned step (``QuantOptimizer._step_planned``, consulted inside ``step_group``: the kernel's
op call kept from one step to the next), the kept ``ParamStep`` list of ``_params_to_step`` and the CPU backend's
kept argument structs: every change between steps (storage, dtypes, shapes, group membership, state, specs,
mode buffers, lr, clip) is detected before the step, every step goes through ``step_group``, and every step
stays bit-identical to the reference path (``fused=False``) and to an optimizer that plans nothing."""
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


def _replace_state_dict(models, opts):
    for m, o in zip(models, opts):  # a new state dict (new tensors, same values) for one weight
        o.state[m[2].weight] = {k: v.clone() for k, v in o.state[m[2].weight].items()}


def _replace_step_count_storage(models, opts):
    for m, o in zip(models, opts):  # the same count tensor, given its own storage (out of the group's shared one)
        count = o.state[m[2].weight]["step"]
        count.data = count.data.clone()


def _replace_spec(models, opts):
    for m in models:  # an equal spec, another object: what the plan was derived from is no longer the weight's
        p = m[1].weight
        p.spec = QuantSpec.make("fp8_e4m3", "row")


CHANGES = {"codes": _replace_codes, "grad-dtype": _grad_dtype, "shape": _reshape, "add-group": _add_group,
           "remove-param": _remove_param, "load-state-dict": _load_state, "state-tensors": _replace_state,
           "mode-buffer": _replace_mode_buffer, "codes-edited": _edit_codes_in_place,
           "state-dict": _replace_state_dict, "step-count": _replace_step_count_storage, "spec": _replace_spec}
# changes the plan serves as they are: the kernel reads each step's gradient dtype (fp32, bf16 or fp16), and an
# added group leaves the first group's plan as it was
SERVED = {"grad-dtype", "add-group"}


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
    dtype = torch.bfloat16 if change == "grad-dtype" else torch.float32
    _step(models, opts, 3, dtype=dtype)
    if change in SERVED:
        assert planned[n] is not None
    else:  # the change was seen: the full route stepped the group
        assert len(planned) == n or planned[n] is None
    for step in range(4, 7):
        _step(models, opts, step, dtype=dtype)
    assert planned[-1] is not None  # planned again


@pytest.mark.parametrize("layout", ["fp16", "transposed"])
def test_planned_steps_read_fp16_and_strided_gradients_as_the_full_route(layout, monkeypatch):
    """Gradients in fp16 or not contiguous are converted for the kernel (exactly) on a planned step too."""
    models, opts = _trio(lr=1e-2)
    planned = _planned(monkeypatch, opts[0])
    for step in range(5):
        _grads(models, step)
        for m in models:
            for p in m.parameters():
                if isinstance(p, QuantizedTensor):
                    p.grad = (p.grad.half() if layout == "fp16" else
                              p.grad.t().contiguous().t())  # same values, column-major
        for o in opts:
            o.step()
        _assert_same(models, opts, f"step {step}")
    assert len(planned) == 4 and all(r is not None for r in planned)


def test_skip_blocks_on_a_planned_step_equals_the_reference(monkeypatch):
    models, opts = _trio(lr=1e-2, nonfinite="skip_blocks")
    planned = _planned(monkeypatch, opts[0])
    for step in range(3):
        _step(models, opts, step)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _step(models, opts, 3, bad_row=True)
    assert planned[-1] is not None and opts[0].skipped_blocks > 0


def test_every_step_goes_through_step_group(monkeypatch):
    """One step route: ``step()`` hands every group's ``ParamStep`` list to ``step_group`` each step, planned steps
    included (the plan is consulted inside it)."""
    models, opts = _trio()
    planned = _planned(monkeypatch, opts[0])
    calls = []
    real = opts[0].step_group
    monkeypatch.setattr(opts[0], "step_group", lambda group, params, **kw: calls.append(
        [p.param for p in params]) or real(group, params, **kw))
    for step in range(4):
        _step(models, opts, step)
    stepped = [p for p in models[0].parameters()]
    assert [list(map(id, c)) for c in calls] == [list(map(id, stepped))] * 4
    assert len(planned) == 3 and all(r is not None for r in planned)  # steps 2-4 repeated step 1's plan


def test_a_parameter_without_gradient_is_detected(monkeypatch):
    models, opts = _trio()
    planned = _planned(monkeypatch, opts[0])
    for step in range(3):
        _step(models, opts, step)
    _grads(models, 3)
    for m in models:
        m[2].weight.grad = None  # not stepped this time
    for o in opts:
        o.step()
    _assert_same(models, opts, "step 3")
    assert planned[-1] is None  # seen: the full route stepped the group
    for step in range(4, 7):
        _step(models, opts, step)
    assert planned[-1] is not None


def test_step_group_with_other_params_takes_the_full_route(monkeypatch):
    """``step_group`` checks what it is handed against the plan, not what ``step()`` would hand it: a subset of the
    group's parameters (as a subclass may pass) is stepped by the full route, bit-identical."""
    models, opts = _trio()
    planned = _planned(monkeypatch, opts[0])
    for step in range(3):
        _step(models, opts, step)
    _grads(models, 3)
    for o in opts:
        group = o.param_groups[0]
        with o._params_to_step(group) as params:
            assert o.step_group(group, params[::2]) == 0
    _assert_same(models, opts, "subset")
    assert planned[-1] is None
    for step in range(4, 7):
        _step(models, opts, step)
    assert planned[-1] is not None


def test_nothing_kept_holds_a_steps_gradients():
    """Between steps, what is kept (the ParamStep list, the plan's op call) holds no gradient: zero_grad frees them."""
    models, opts = _trio()
    for step in range(3):
        _step(models, opts, step)
    grads = [p.grad for p in models[0].parameters()]
    for o in opts:
        o.zero_grad()
    kept = opts[0]._step_lists[id(opts[0].param_groups[0])].steps
    assert all(s.grad is None for s in kept)
    call = opts[0]._step_plans[id(opts[0].param_groups[0])].call
    assert not any(t is g for t in call.args["grads"] for g in grads)


def test_plans_of_replaced_groups_are_dropped():
    """What is kept between steps belongs to the optimizer's current groups: groups replaced by
    ``load_state_dict`` leave nothing (and no tensors) behind."""
    models, opts = _trio()
    for step in range(2):
        _step(models, opts, step)
    old = opts[0].param_groups[0]
    opts[0].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    _step(models, opts, 2)
    live = {id(g) for g in opts[0].param_groups}
    for kept in (opts[0]._step_plans, opts[0]._step_lists):
        assert set(kept) <= live and all(v.group is not old for v in kept.values())


def test_short_forms_of_the_op_lists_give_the_same_bits():
    """One entry for equal per-tensor values and empty optional tensor lists (``ecoptim.ops``) step exactly as the
    written-out lists do."""
    full = _adamw_args(3, 4.0, 1e-3, 1)  # a GroupCall's arguments: in short form where allowed
    for name in ops.SHARED_VALUE_LISTS:
        if name in full and len(full[name]) == 1:
            full[name] = full[name] * 3
    for name in ops.OPTIONAL_TENSOR_LISTS:
        if name in full and not full[name]:
            full[name] = [None] * 3
    assert len(full["steps"]) == len(full["formats"]) == len(full["master_weights"]) == 3
    short = {k: v[:1] if k in ops.SHARED_VALUE_LISTS and len(v) == 3 else
             [] if k in ops.OPTIONAL_TENSOR_LISTS and all(t is None for t in v) else v for k, v in full.items()}
    assert short["steps"] == [4.0] and short["master_weights"] == []
    copies = {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] if k in (
        "codes", "scales", "exp_avg", "exp_avg_sq") else v for k, v in full.items()}
    copies = dict(copies, **{k: v for k, v in short.items() if k not in ("codes", "scales", "exp_avg", "exp_avg_sq")})
    assert ops.adamw_step_(**full).tolist() == ops.adamw_step_(**copies).tolist() == [0, 0, 0]
    for k in ("codes", "scales", "exp_avg", "exp_avg_sq"):
        for a, b in zip(full[k], copies[k]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k
    with pytest.raises(ValueError, match="grads has 1 entries for 3 tensors"):
        ops.adamw_step_(**dict(full, grads=full["grads"][:1]))  # gradients have no short form


def _adamw_args(n: int, step: float, lr: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n):
        p = QuantizedTensor.from_float(torch.randn(4, 16, generator=g), QuantSpec.make("fp8_e4m3", "row"))
        jobs.append(fused.adamw_job(p, torch.randn(4, 16, generator=g), p.spec, torch.zeros(4, 16),
                                    torch.zeros(4, 16), (i, 7 + i), step=step, lr=lr, beta1=0.9, beta2=0.99,
                                    eps=1e-8, weight_decay=0.1, coef=0.5, inject=True))
    return dict(fused.GroupCall(jobs).args, grads=[j.grad for j in jobs], sr_keys=[k for j in jobs for k in j.sr_key])


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
                 sr_keys=[2 ** 32 - 1, 2 ** 31, 5, 6, 7, 8],
                 grads=[g if i == 0 else g.to(torch.bfloat16) for i, g in enumerate(args["grads"])])  # mixed dtypes
    ops.adamw_step_(**later)
    assert len(cpu_ops._PACKED) == 1  # the second call reused the first one's structs
    kept = bytes(next(iter(cpu_ops._PACKED.values())).array)
    cpu_ops.clear_packed()
    monkeypatch.setattr(cpu_ops._Packed, "set", lambda *a: None)  # the per-tensor packing alone
    monkeypatch.setattr(cpu_ops._Packed, "set_keys", lambda *a: None)
    ops.adamw_step_(**later)
    assert bytes(next(iter(cpu_ops._PACKED.values())).array) == kept
    cpu_ops.clear_packed()


def test_a_setting_edited_in_place_is_detected(monkeypatch):
    """betas set as a list in the group and edited in place (``group["betas"][0] = ...``) between steps: the plan,
    made with the old values, is not repeated, and every step keeps the reference's bits."""
    models, opts = _trio(lr=1e-2)
    for o in opts:
        o.param_groups[0]["betas"] = [0.9, 0.98]
    planned = _planned(monkeypatch, opts[0])
    for step in range(3):
        _step(models, opts, step)
    assert planned[-1] is not None
    for o in opts:
        o.param_groups[0]["betas"][0] = 0.8
    n = len(planned)
    _step(models, opts, 3)
    assert len(planned) == n or planned[n] is None


def test_a_view_at_the_same_address_is_not_written_by_a_planned_step():
    """``.data =`` bumps no version; a view of the old storage keeps its address: the kept structs would write the
    old size. The plan compares bytes too, so the full route runs and refuses the scale, writing nothing."""
    models, opts = _trio(lr=1e-2)
    for step in range(3):
        _step(models, opts, step)
    p = models[0][0].weight
    full = p.scale.data
    p.scale.data = full[:4]  # same data pointer, same version, half the rows
    codes, tail = p.codes.clone(), full[4:].clone()
    _grads(models, 3)
    with pytest.raises(ValueError, match="scale"):
        opts[0].step()
    assert torch.equal(full[4:], tail) and torch.equal(p.codes.view(torch.uint8), codes.view(torch.uint8))


def test_sgd_first_step_with_skipped_blocks_leaves_no_uninitialised_momentum():
    """nonfinite='skip_blocks' on SGD's first step (mode naive: the buffer is g): rows the kernel leaves
    unchanged hold zeros in the new momentum buffer (dampening 0: the next step's momentum * 0 + g is the first
    step's g), and a weight none of whose rows moved has no buffer and no step, as if never stepped."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 8, bias=False), nn.Linear(32, 4, bias=False))
    ecoptim.quantize_(m, "fp8_e4m3", "row")
    opt = ecoptim.SGD(m.parameters(), lr=1e-2, momentum=0.9, mode="naive", nonfinite="skip_blocks")
    a, b = m[0].weight, m[1].weight
    a.grad, b.grad = torch.randn(8, 32), torch.full((4, 32), float("nan"))
    a.grad[2, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    buf = opt.state[a]["momentum_buffer"]
    assert torch.equal(buf[2], torch.zeros(32)) and torch.equal(buf[0], a.grad[0])
    assert opt.state[b]["momentum_buffer"] is None and float(opt.state[b]["step"]) == 0
    assert opt.skipped_blocks == 1 + 4
