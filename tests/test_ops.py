"""The declared op boundary (``ecoptim.ops``): the schemas, the fake implementations, the argument structs
generated from one definition, and the op called directly against the reference path."""
import copy
import shutil

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import ecoptim
from ecoptim import kernels, ops
from ecoptim.backends.cpu import abi
from ecoptim.backends.cpu import build as cpu_build
from ecoptim.optim import fused
from ecoptim.optim.adamw import eco_adamw_coef


def _mutated(op) -> list[str]:
    return [a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def test_ops_are_registered_with_their_schemas():
    assert _mutated(ops.adamw_step_) == ["codes", "scales", "exp_avg", "exp_avg_sq", "exp_avg_absmax",
                                         "exp_avg_sq_absmax", "master_weights", "carried_errors",
                                         "compensation_codes", "compensation_scales"]
    assert _mutated(ops.sgd_step_) == ["codes", "scales", "momentum_buffers", "master_weights", "carried_errors",
                                       "compensation_codes", "compensation_scales"]
    for op in (ops.adamw_step_, ops.sgd_step_):
        schema = op.default._schema
        assert str(schema.returns[0].type) == "Tensor"
        names = [a.name for a in schema.arguments]
        assert names[:3] == ["codes", "scales", "grads"] and "formats" in names and "block_sizes" in names
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")
    kw = [a.name for a in ops.adamw_step_.default._schema.arguments if a.kwarg_only]
    assert kw == ["lr", "beta1", "beta2", "eps", "weight_decay", "inject", "stochastic", "state8_stochastic"]


def _sgd_inputs(n=2, device="cpu"):
    codes = [torch.zeros(4, 8, dtype=torch.int8, device=device) for _ in range(n)]
    scales = [torch.ones(4, device=device) for _ in range(n)]
    grads = [torch.full((4, 8), 1e-3, device=device) for _ in range(n)]
    bufs = [torch.zeros(4, 8, device=device) for _ in range(n)]
    none = [None] * n
    return ((codes, scales, grads, bufs, none, none, none, none, ["int8"] * n, ["absmax"] * n, [8] * n, [True] * n,
             [0.0] * n, [1.0] * n, []),
            dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, inject=False,
                 stochastic=False))


def test_fake_implementation_gives_the_result_shape_and_dtype():
    with FakeTensorMode():
        args, kw = _sgd_inputs(3)
        out = ops.sgd_step_(*args, **kw)
        assert out.shape == (3,) and out.dtype == torch.int64
    args, kw = _sgd_inputs(2, device="meta")
    out = ops.sgd_step_(*args, **kw)
    assert out.shape == (2,) and out.dtype == torch.int64 and out.device.type == "meta"


def _adamw_inputs(n=2):
    (codes, scales, grads, _, none, *_), _ = _sgd_inputs(n)
    moments = [torch.zeros(4, 8) for _ in range(n)], [torch.zeros(4, 8) for _ in range(n)]
    return ((codes, scales, grads, *moments, none, none, none, none, none, none, ["int8"] * n, ["absmax"] * n, [8] * n,
             [1.0] * n, [0.0] * n, [1.0] * n, [], [0] * n, [], []),
            dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1, inject=True, stochastic=False,
                 state8_stochastic=False))


@pytest.mark.skipif(not kernels.available(), reason="no C kernels")
@pytest.mark.parametrize("op, inputs", [(ops.sgd_step_, _sgd_inputs), (ops.adamw_step_, _adamw_inputs)])
def test_opcheck(op, inputs):
    """The schema's mutation annotations are the kernel's (what it writes is declared, nothing else is written)
    and the fake implementation agrees with the kernel."""
    args, kw = inputs(2)
    torch.library.opcheck(op.default, args, kw,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_generated_header_is_in_sync_with_the_definition():
    assert abi.HEADER_PATH.read_text() == abi.header(), "regenerate with python -m ecoptim.backends.cpu.abi"
    assert f"0x{abi.ABI_HASH:08x}u" in abi.header()
    # the ctypes side: every field of every struct, in order
    for name, (_, fields) in abi.STRUCTS.items():
        cls = abi.ctype_of(name)
        assert [f for f, _ in cls._fields_] == [f for f, _, _ in fields]


def test_build_cache_key_covers_every_source_file(tmp_path):
    shutil.copytree(cpu_build.SOURCE_DIR, tmp_path / "csrc")
    names = [p.name for p in cpu_build.sources(tmp_path / "csrc")]
    assert "step.c" in names and "vec_avx2.h" in names and "eco_abi.h" in names
    before = cpu_build.source_digest(tmp_path / "csrc")
    for name in names:  # a change to any file, header or source, changes the key
        f = tmp_path / "csrc" / name
        text = f.read_text()
        f.write_text(text + "\n")
        assert cpu_build.source_digest(tmp_path / "csrc") != before, name
        f.write_text(text)
    assert cpu_build.source_digest(tmp_path / "csrc") == before


@pytest.mark.skipif(not kernels.available(), reason="no C kernels")
def test_library_was_built_from_this_definition():
    assert kernels.load().eco_abi_hash() == abi.ABI_HASH


@pytest.mark.skipif(not kernels.available(), reason="no C kernels")
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_op_called_directly_equals_the_reference_path(rounding):
    torch.manual_seed(0)
    lin = nn.Linear(24, 6, bias=False)
    model = ecoptim.quantize_(nn.Sequential(lin), "fp8_e4m3", "row",
                              filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
    ref = model[0].weight
    p = copy.deepcopy(ref)
    hyper = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
    opt = ecoptim.AdamW([ref], fused=False, rounding=rounding, **hyper)
    grad = torch.randn(6, 24) * 1e-2
    ref.grad = grad.clone()
    gen = opt.generator(torch.device("cpu"))
    gen_state = gen.get_state()
    key = ecoptim.rng.draw_key(gen) if rounding == "stochastic" else None  # the key the reference draws
    gen.set_state(gen_state)
    opt.step()
    m, v = torch.zeros(6, 24), torch.zeros(6, 24)
    none = [None]
    bad = ops.adamw_step_([p.codes], [p.scale], [grad], [m], [v], none, none, none, none, none, none,
                          ["fp8_e4m3"], ["absmax"], [24], [1.0], [eco_adamw_coef(1.0, 3e-3, 0.9, 0.1)], [1.0],
                          list(key) if key else [], [0], [], [], lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-9,
                          weight_decay=0.1, inject=True, stochastic=key is not None, state8_stochastic=False)
    assert bad.tolist() == [0]
    assert torch.equal(p.codes.view(torch.uint8), ref.codes.view(torch.uint8))
    assert torch.equal(p.scale, ref.scale)
    assert torch.equal(m, opt.state[ref]["exp_avg"]) and torch.equal(v, opt.state[ref]["exp_avg_sq"])


def test_bad_op_arguments_are_refused_before_anything_is_modified():
    args, kw = _sgd_inputs(2)
    codes = [c.clone() for c in args[0]]
    bad = (args[0], args[1], args[2][:1], *args[3:])
    with pytest.raises(ValueError, match="grads has 1 entries for 2 tensors"):
        ops.sgd_step_(*bad, **kw)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(args[0], codes))
    assert fused.applies  # the fused path's public API stays importable
