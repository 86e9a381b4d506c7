"""The Triton kernels of the fused step (``ecoptim/backends/triton``) against the reference path, bit for bit.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set only while
the kernel modules are imported, which is when triton reads it), the optimizer's fused route calling the launchers
directly; with a GPU the same tests run on CUDA tensors through the registered op (``ecoptim.ops``), the route
training takes. Each case steps a reference optimizer (``fused=False``) and a fused one on the same gradients and
compares codes, scales and every state tensor with ``torch.equal`` after every step.

The interpreter computes every operation exactly as written (IEEE fp32, true fma), so it checks the kernels' maths
and bit manipulations; that the GPU build keeps them (no contraction into fma, the ``_rn`` division and square
root) only a GPU run shows: ``test_cuda_matches_the_cpu_reference`` does, against the CPU reference.

The default matrix is a covering design (every format and granularity with every mode, roundings and optimizers
alternating); ``pytest -m slow`` adds the rest of the full product.
"""
import contextlib
import copy
import importlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim import kernels, rng
from ecoptim.convert import spec_of
from ecoptim.optim import fused
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss

pytest.importorskip("triton")  # only a guard for machines without triton: the `test` extra installs it
# the interpreter computes masked-off lanes too (e.g. 0/0 where eps = 0), which numpy reports
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@contextlib.contextmanager
def _interpreted():
    """TRITON_INTERPRET=1 while the kernels are defined (without a GPU), the environment restored after."""
    old = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _kernel_modules():
    """The kernel modules, defined under the interpreter without a GPU: imported now, or imported again where
    another test module imported them compiled (a CUDA kernel registered again replaces itself)."""
    names = ("codecs", "rng", "adamw", "sgd", "step", "ops")
    loaded = sys.modules.get("ecoptim.backends.triton.step")
    again = not CUDA and loaded is not None and not type(loaded.step_kernel).__name__.startswith("Interpreted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [importlib.reload(sys.modules[f"ecoptim.backends.triton.{n}"]) if again
                else importlib.import_module(f"ecoptim.backends.triton.{n}") for n in names]


with _interpreted():
    import triton
    import triton.language as tl

    from ecoptim.backends import triton as triton_backend

    tcodecs, trng, _, _, _, triton_ops = _kernel_modules()

    @triton.jit(do_not_specialize=["k1", "k2"])
    def _uniform_kernel(out, j0, k1, k2, N: tl.constexpr):
        j = j0 + tl.arange(0, N).to(tl.int64)
        tl.store(out + tl.arange(0, N), trng.uniform(j, k1.to(tl.uint32, bitcast=True), k2.to(tl.uint32, bitcast=True)))

    @triton.jit
    def _codec_kernel(y_ptr, u_ptr, nearest, stochastic, codes, decoded, n, FMT: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, N)
        mask = i < n
        y = tl.load(y_ptr + i, mask=mask, other=0.0)
        q = tcodecs.round_nearest(y, FMT)
        tl.store(nearest + i, q, mask=mask)
        tl.store(stochastic + i, tcodecs.round_stochastic(y, tl.load(u_ptr + i, mask=mask, other=0.0), FMT),
                 mask=mask)
        c = tcodecs.code_of(q, FMT)
        tl.store(codes + i, c, mask=mask)
        tl.store(decoded + i, tcodecs.decode(codes, i.to(tl.int64), mask, FMT), mask=mask)

    @triton.jit
    def _bf16_kernel(x_ptr, out, n, N: tl.constexpr):
        i = tl.arange(0, N)
        mask = i < n
        tl.store(out + i, tcodecs.f32_to_bf16(tl.load(x_ptr + i, mask=mask, other=0.0)), mask=mask)


@pytest.fixture
def triton_route(monkeypatch):
    """The optimizers' fused route through the Triton launchers. On CUDA that is the normal route (the registered
    op, ``fused.applies``); on CPU the launchers stand in for the op and ``supports`` for ``fused.applies``."""
    if not CUDA:
        monkeypatch.setattr(ecoptim.ops, "adamw_step_", triton_ops.adamw_step)
        monkeypatch.setattr(ecoptim.ops, "sgd_step_", triton_ops.sgd_step)
        monkeypatch.setattr(fused, "applies", triton_backend.supports)
    return fused.applies


def _pair(shape, fmt, gran, opt_cls, device=DEVICE, **kw):
    """Two identical quantized single-layer models on ``device``, a reference (fused=False) and a fused optimizer."""
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 0, shape[0])[:, None])  # rows of very different magnitudes
    m = ecoptim.quantize_(nn.Sequential(lin), fmt, gran, filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
    m = m.to(device)
    ref, fast = copy.deepcopy(m), copy.deepcopy(m)
    return ref, fast, opt_cls(ref.parameters(), fused=False, **kw), opt_cls(fast.parameters(), **kw)


def _same_tensor(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in (2, 4):  # bit patterns: NaN == NaN
        view = torch.int16 if a.element_size() == 2 else torch.int32
        return torch.equal(a.cpu().view(view), b.cpu().view(view))
    return torch.equal(a.cpu().view(torch.uint8) if a.element_size() == 1 else a.cpu(),
                       b.cpu().view(torch.uint8) if b.element_size() == 1 else b.cpu())


def _assert_same(o_ref, o_fast, ref, fast, where):
    for a, b in zip(ref.parameters(), fast.parameters()):
        assert isinstance(b, QuantizedTensor)
        assert _same_tensor(a.codes, b.codes), f"codes differ {where}"
        assert (a.scale is None and b.scale is None) or _same_tensor(a.scale, b.scale), f"scales differ {where}"
        sa, sb = o_ref.state[a], o_fast.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert _same_tensor(sa[k], sb[k]), f"state {k!r} differs {where}"


def _grads(shape, steps, seed=1, scales=(1e-3, 1e-1, 1e-5)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grad = torch.randn(shape, generator=g) * scales[step % len(scales)]
        if step == 1:
            grad[: shape[0] // 3] = 0  # zero gradients: m = v = 0 rows, w_til = decayed w
        out.append(grad)
    return out


def _run(ref, fast, o_ref, o_fast, shape, applies, steps=3, grad_dtype=torch.float32, before_step=None, **kw):
    for step, grad in enumerate(_grads(shape, steps, **kw)):
        for p in (*ref.parameters(), *fast.parameters()):
            p.grad = grad.to(device=p.device, dtype=grad_dtype)
        p = next(fast.parameters())
        assert applies(p, spec_of(p), o_fast.param_groups[0])  # the kernel steps this case
        if before_step is not None:
            before_step(o_ref, o_fast)
        o_ref.step()
        o_fast.step()
        _assert_same(o_ref, o_fast, ref, fast, f"at step {step}")


ADAMW = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
OPTIMIZERS = {
    "adamw": (ecoptim.AdamW, ADAMW),
    "sgd": (ecoptim.SGD, dict(lr=3e-2, momentum=0.9, weight_decay=0.01)),
}
FORMATS_GRANS = [(f, g) for f in ("fp8_e4m3", "fp8_e5m2", "int8", "int4") for g in ("row", "group16", "tensor")]
FORMATS_GRANS.append(("bf16", None))
MODES = ("eco", "naive", "master", "exact", "kahan")
ROUNDINGS = ("nearest", "stochastic")
SHAPE = (4, 32)


def _slow_unless_covered(i: int, j: int, rounding: str, opt: str) -> tuple:
    """The marks of the case with the i-th format (or format and variant) and the j-th mode: none on the
    covering design (every format with every mode, the rounding and the optimizer alternating so that every pair
    of values meets), else slow: the interpreter runs about 20 programs a second, and on a GPU each case compiles
    its own kernel variants (about a second each)."""
    cover = ROUNDINGS.index(rounding) == (i + j) % 2 and list(OPTIMIZERS).index(opt) == (i // 2 + j) % 2
    return () if cover else (pytest.mark.slow,)


def _matrix():
    """The full product; the cases off the covering design marked slow (``_slow_unless_covered``)."""
    return [pytest.param(fmt, gran, mode, rounding, opt, id=f"{opt}-{fmt}-{gran}-{mode}-{rounding}",
                         marks=_slow_unless_covered(FORMATS_GRANS.index((fmt, gran)), MODES.index(mode), rounding,
                                                    opt))
            for (fmt, gran), mode, rounding, opt in itertools.product(FORMATS_GRANS, MODES, ROUNDINGS, OPTIMIZERS)]


@pytest.mark.parametrize("fmt,gran,mode,rounding,opt", _matrix())
def test_triton_step_is_bit_identical_to_reference(triton_route, fmt, gran, mode, rounding, opt):
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _pair(SHAPE, fmt, gran, opt_cls, mode=mode, rounding=rounding, seed=3, **kw)
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route)


def _mx_pair(shape, fmt, rule, opt_cls, device=DEVICE, **kw):
    """``_pair`` for an MX format with E8M0 scales of the given rule ('ceil', the formats' default, or 'floor')."""
    ref, fast, o_ref, o_fast = _pair(shape, fmt, None, opt_cls, device=device, **kw)
    if rule == "ceil":
        return ref, fast, o_ref, o_fast
    spec = ecoptim.formats.QuantSpec.make(fmt, scale="e8m0")
    for m in (ref, fast):
        m[0].weight = nn.Parameter(QuantizedTensor.from_float(m[0].weight.dequantize(), spec))
    return ref, fast, opt_cls(ref.parameters(), fused=False, **kw), opt_cls(fast.parameters(), **kw)


MX_FORMATS = ("mxfp8", "mxfp4")
E8M0_RULES = ("ceil", "floor")
MX_SHAPE = (4, 64)  # two blocks of 32 per row, rows of very different magnitudes


def _mx_matrix():
    """MXFP8 / MXFP4 x E8M0 rule x mode x rounding x optimizer; every (format, rule, mode) by default, the
    rounding and the optimizer alternating; the rest marked slow (``_slow_unless_covered``)."""
    return [pytest.param(fmt, rule, mode, rounding, opt, id=f"{opt}-{fmt}-{rule}-{mode}-{rounding}",
                         marks=_slow_unless_covered(MX_FORMATS.index(fmt) * 2 + E8M0_RULES.index(rule),
                                                    MODES.index(mode), rounding, opt))
            for fmt, rule, mode, rounding, opt in itertools.product(MX_FORMATS, E8M0_RULES, MODES, ROUNDINGS,
                                                                    OPTIMIZERS)]


@pytest.mark.parametrize("fmt,rule,mode,rounding,opt", _mx_matrix())
def test_triton_mx_step_is_bit_identical_to_reference(triton_route, fmt, rule, mode, rounding, opt):
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _mx_pair(MX_SHAPE, fmt, rule, opt_cls, mode=mode, rounding=rounding, seed=3, **kw)
    _run(ref, fast, o_ref, o_fast, MX_SHAPE, triton_route, steps=4)


@pytest.mark.parametrize("mode,rounding,opt,gran", [("eco", "stochastic", "adamw", "row"),
                                                    ("naive", "nearest", "sgd", "group16"),
                                                    ("master", "nearest", "adamw", "tensor"),
                                                    ("exact", "stochastic", "sgd", "row"),
                                                    ("kahan", "nearest", "adamw", "group16")])
def test_fp4_with_absmax_scales(triton_route, mode, rounding, opt, gran):
    """FP4 E2M1 codes (MXFP4's elements) with fp32 absmax scales per row, group or tensor."""
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _pair(SHAPE, "fp4_e2m1", gran, opt_cls, mode=mode, rounding=rounding, seed=3, **kw)
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route)


@pytest.mark.parametrize("fmt,rule", [("mxfp8", "floor"), ("mxfp4", "ceil")])
def test_mx_blocks_of_zeros_and_bf16_moments(triton_route, fmt, rule):
    """An all-zero block (scale 2^-127, E8M0 code 0) stays one while its gradient is zero; bf16 moments."""
    def zero_a_block(o_ref, o_fast):
        for o in (o_ref, o_fast):
            p = o.param_groups[0]["params"][0]
            if not hasattr(o, "_zeroed"):
                p.requantize_(torch.cat([torch.zeros(32), p.dequantize().reshape(-1)[32:]]).reshape(p.shape))
                o._zeroed = True
            p.grad.reshape(-1)[:32] = 0
    ref, fast, o_ref, o_fast = _mx_pair(MX_SHAPE, fmt, rule, ecoptim.AdamW, rounding="stochastic",
                                        state_dtype=torch.bfloat16, **ADAMW)
    _run(ref, fast, o_ref, o_fast, MX_SHAPE, triton_route, before_step=zero_a_block)
    assert next(fast.parameters()).scale.view(torch.uint8).reshape(-1)[0] == 0


@pytest.mark.parametrize("fmt,gran,rounding", [("fp8_e4m3", "row", "stochastic"), ("int4", "tensor", "nearest"),
                                               ("bf16", None, "stochastic"), ("int8", "group16", "nearest")])
def test_bf16_moments(triton_route, fmt, gran, rounding):
    ref, fast, o_ref, o_fast = _pair(SHAPE, fmt, gran, ecoptim.AdamW, rounding=rounding,
                                     state_dtype=torch.bfloat16, **ADAMW)
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_low_precision_gradients(triton_route, grad_dtype, opt):
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _pair(SHAPE, "fp8_e4m3", "row", opt_cls, rounding="stochastic", **kw)
    for p in (*ref.parameters(), *fast.parameters()):
        p.grad_dtype = None
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route, grad_dtype=grad_dtype)


@pytest.mark.parametrize("kw", [dict(betas=(0.3, 0.9)), dict(weight_decay=0.0, maximize=True),
                                dict(lr=0.5, eps=1e-3, weight_decay=3.0)], ids=["lerp-from-m", "maximize", "big-lr"])
def test_adamw_hyperparameters(triton_route, kw):
    """beta1 < 0.5 (ATen's lerp from the start point), maximize (a negative gradient factor), large steps."""
    ref, fast, o_ref, o_fast = _pair(SHAPE, "fp8_e4m3", "row", ecoptim.AdamW, rounding="stochastic",
                                     **dict(ADAMW, **kw))
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route)


@pytest.mark.parametrize("kw", [dict(nesterov=True, weight_decay=0.0), dict(dampening=0.5), dict(momentum=0.0)],
                         ids=["nesterov", "dampening", "no-momentum"])
def test_sgd_variants(triton_route, kw):
    mode = "naive" if kw.get("momentum") == 0.0 else "eco"
    ref, fast, o_ref, o_fast = _pair(SHAPE, "int8", "row", ecoptim.SGD, mode=mode, rounding="stochastic",
                                     **dict(OPTIMIZERS["sgd"][1], **kw))
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_pending_clip_is_folded_into_the_gradients(triton_route, opt):
    """clip_grad_norm_ defers its factor to the step, which multiplies every gradient element by it in fp32."""
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _pair(SHAPE, "fp8_e5m2", "group16", opt_cls, rounding="stochastic", **kw)
    _run(ref, fast, o_ref, o_fast, SHAPE, triton_route, scales=(1.0, 3.0, 0.5),
         before_step=lambda a, b: (a.clip_grad_norm_(0.1), b.clip_grad_norm_(0.1)))


@pytest.mark.parametrize("shape,gran", [((5, 7), "tensor"), ((2, 1100), "row"), ((3, 701), "tensor")])
@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3", "fp4_e2m1"])
def test_odd_sizes_and_blocks_of_several_tiles(triton_route, shape, gran, fmt):
    """An odd-sized tensor (packed int4: the last byte's high nibble is padding), and blocks of more than one
    tile (1024 elements) whose statistics meet in the per-block reduction."""
    ref, fast, o_ref, o_fast = _pair(shape, fmt, gran, ecoptim.AdamW, mode="kahan", rounding="stochastic",
                                     **ADAMW)
    _run(ref, fast, o_ref, o_fast, shape, triton_route, steps=2)


def test_a_model_of_several_tensors_in_one_op_call(triton_route):
    """A small transformer (conftest.TinyLM): its quantized linear layers stepped together, one op call per group
    (tensors of several shapes, keys drawn in parameter order), its dense parameters on torch's update."""
    opt_cls, kw = OPTIMIZERS["adamw"]
    torch.manual_seed(0)
    model = ecoptim.quantize_(TinyLM(layers=1), "fp8_e4m3", "row").to(DEVICE)
    ref, fast = copy.deepcopy(model), copy.deepcopy(model)
    o_ref, o_fast = opt_cls(ref.parameters(), fused=False, **kw), opt_cls(fast.parameters(), **kw)
    for step, idx in enumerate(batches(2)):
        for m, o in ((ref, o_ref), (fast, o_fast)):
            o.zero_grad()
            lm_loss(m, idx.to(DEVICE)).backward()
        quantized = [p for p in fast.parameters() if isinstance(p, QuantizedTensor)]
        assert len(quantized) > 1 and all(triton_route(p, spec_of(p), o_fast.param_groups[0]) for p in quantized)
        o_ref.step()
        o_fast.step()
        for a, b in zip(ref.parameters(), fast.parameters()):
            if isinstance(a, QuantizedTensor):
                assert _same_tensor(a.codes, b.codes) and _same_tensor(a.scale, b.scale), f"step {step}"
            else:
                assert torch.equal(a.detach(), b.detach()), f"step {step}"
            for k, v in o_ref.state[a].items():
                if isinstance(v, torch.Tensor):
                    assert _same_tensor(v, o_fast.state[b][k]), f"state {k!r} at step {step}"


@pytest.mark.parametrize("gran", ["row", "tensor"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_nonfinite_blocks_are_left_unchanged_and_counted(triton_route, gran, rounding):
    """nonfinite='skip_blocks': a block whose w_til holds NaN/Inf keeps its codes, scale and moments and is
    counted; every other block gets the reference's update (rows are independent under per-row scales: the
    reference steps a copy whose bad gradient entries are zero)."""
    shape = (4, 32)
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", gran, ecoptim.AdamW, rounding=rounding,
                                     nonfinite="skip_blocks", **ADAMW)
    _run(ref, fast, o_ref, o_fast, shape, triton_route, steps=2)  # some history first
    a, b = next(ref.parameters()), next(fast.parameters())
    before = {k: v.clone() for k, v in o_fast.state[b].items()}
    codes0, scale0 = b.codes.clone(), b.scale.clone()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 1e-2
    bad = grad.clone()
    bad[1, 3], bad[2, 0] = float("nan"), float("inf")
    grad[1, 3] = grad[2, 0] = 0.0
    a.grad, b.grad = grad.to(a.device), bad.to(b.device)
    o_ref.step()
    with pytest.warns(RuntimeWarning, match="blocks"):
        o_fast.step()
    rows = lambda t: t.reshape(shape[0], -1)  # noqa: E731  (codes are stored flat)
    if gran == "tensor":  # the one block: nothing moved, and its step did not happen
        assert o_fast.skipped_blocks == 1
        assert _same_tensor(b.codes, codes0) and _same_tensor(b.scale, scale0)
        for k, v in before.items():
            assert _same_tensor(o_fast.state[b][k], v)
        return
    assert o_fast.skipped_blocks == 2
    keep = torch.tensor([True, False, False, True])
    for r in (1, 2):
        assert _same_tensor(rows(b.codes)[r], rows(codes0)[r]) and b.scale[r] == scale0[r]
        for k in ("exp_avg", "exp_avg_sq"):
            assert _same_tensor(o_fast.state[b][k][r], before[k][r])
    assert _same_tensor(rows(b.codes)[keep], rows(a.codes)[keep]) and _same_tensor(b.scale[keep], a.scale[keep])
    for k in ("exp_avg", "exp_avg_sq"):
        assert _same_tensor(o_fast.state[b][k][keep], o_ref.state[a][k][keep])
    assert o_fast.state[b]["step"] == o_ref.state[a]["step"]


@pytest.mark.skipif(CUDA or kernels.compiler() is None, reason="the CPU kernel runs on CPU tensors")
@pytest.mark.parametrize("mode", ["eco", "kahan"])
def test_nonfinite_blocks_agree_with_the_cpu_kernel(triton_route, monkeypatch, mode):
    """The same NaN/Inf rows through the C kernel and the Triton kernels: the same bits and the same counts."""
    shape = (4, 32)
    c_ref, trt, o_c, o_t = _pair(shape, "int4", "group16", ecoptim.AdamW, rounding="stochastic", mode=mode,
                                 nonfinite="skip_blocks", **ADAMW)
    o_c.param_groups[0]["fused"] = None  # both fused: the C kernel through the op's CPU kernel
    c_step = torch.ops.ecoptim.adamw_step_.default

    def step_c():
        with monkeypatch.context() as m:
            m.setattr(ecoptim.ops, "adamw_step_", c_step)
            m.setattr(fused, "applies", lambda p, spec, group: True)
            o_c.step()

    for step, grad in enumerate(_grads(shape, 3)):
        if step:
            grad[1, 3], grad[3, 20] = float("nan"), float("-inf")
        for p in (*c_ref.parameters(), *trt.parameters()):
            p.grad = grad.clone()
        with contextlib.suppress(RuntimeWarning), pytest.warns(RuntimeWarning) if step else contextlib.nullcontext():
            step_c()
            o_t.step()
        _assert_same(o_c, o_t, c_ref, trt, f"at step {step}")
    assert o_c.skipped_blocks == o_t.skipped_blocks == 4


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("fmt,gran", FORMATS_GRANS)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_cuda_matches_the_cpu_reference(fmt, gran, opt):
    """Round to nearest on CUDA against the CPU reference path: what only a GPU run checks (no fma contraction,
    IEEE division and square root in the compiled kernels)."""
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _pair(SHAPE, fmt, gran, opt_cls, device="cpu", rounding="nearest", **kw)
    fast.to("cuda")
    o_fast = opt_cls(fast.parameters(), rounding="nearest", **kw)
    _run(ref, fast, o_ref, o_fast, SHAPE, fused.applies)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("fmt,rule", list(itertools.product(MX_FORMATS, E8M0_RULES)))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_cuda_mx_matches_the_cpu_reference(fmt, rule, opt):
    """Round to nearest on CUDA against the CPU reference path, MXFP8 / MXFP4 with both E8M0 rules."""
    opt_cls, kw = OPTIMIZERS[opt]
    ref, fast, o_ref, o_fast = _mx_pair(MX_SHAPE, fmt, rule, opt_cls, device="cpu", rounding="nearest", **kw)
    fast.to("cuda")
    o_fast = opt_cls(fast.parameters(), rounding="nearest", **kw)
    _run(ref, fast, o_ref, o_fast, MX_SHAPE, fused.applies)


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="triton without its NVIDIA backend")
def test_compiled_kernels_keep_the_reference_operations():
    """What the interpreter cannot see, from the PTX of the kernels compiled for sm_90 (no GPU needed): every fp32
    multiply / add / subtract carries an explicit rounding mode (never contracted into an fma), the fmas are
    exactly those the kernels ask for, division and square root are IEEE, and nothing flushes subnormals but the
    stochastic rounding's floor (harmless: ``codecs.round_stochastic``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "ecoptim.backends.triton.ptx"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, c in json.loads(run.stdout).items():
        assert c["fma.rn.f32"] == c["fma_per_element"] * c["elements"], name
        assert c["mul.f32"] == c["add.f32"] == c["sub.f32"] == 0, name
        assert not any(c[op] for op in ("div.approx", "div.full", "sqrt.approx", "rcp.approx", "ex2.approx",
                                        "lg2.approx")), name
        assert c["ftz"] == c["floor_ftz"], name
        if name.startswith("adamw"):
            assert c["sqrt.rn.f32"] == c["elements"], name


def test_uniforms_are_the_reference_stream():
    """The Triton uniforms equal ecoptim.rng's, indices past 2^32 included (the high word enters the hash)."""
    n = 64
    for j0, key in ((0, (0, 0)), (12345, (0xDEADBEEF, 0x12345678)), (2 ** 32 - 20, (7, 2 ** 32 - 1))):
        out = torch.empty(n, device=DEVICE)
        _uniform_kernel[(1,)](out, j0, _int32(key[0]), _int32(key[1]), N=n)
        want = []
        for j in range(j0, j0 + n):  # rng's definition, element by element
            h = rng.mix32((j & 0xFFFFFFFF) ^ key[0])
            h = rng.mix32(h ^ ((key[1] + (j >> 32)) & 0xFFFFFFFF))
            want.append((h >> 8) * 2.0 ** -24)
        assert torch.equal(out.cpu(), torch.tensor(want, dtype=torch.float32))
        if j0 == 0:
            assert torch.equal(out.cpu(), rng.uniform_torch(key, n))


def _int32(k: int) -> int:
    k &= 0xFFFFFFFF
    return k - 2 ** 32 if k >= 2 ** 31 else k


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8", "int4", "bf16", "mxfp4"])
def test_codecs_against_the_reference_rounding_and_torch(fmt):
    """Round to nearest / stochastically, encode and decode values spanning the grid (ties, subnormals, the
    top of the range, signed zeros) against rounding.py and the format's own encode / decode."""
    f = ecoptim.formats.FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(300, generator=g) * f.max / 4, torch.rand(100, generator=g) * 2 ** -8,
                   torch.tensor([0.0, -0.0, f.max, -f.max, 0.5, 1.5, 2.5, -2.5, 1.0625, 1.1875, 2 ** -7 * 1.5])])
    if fmt == "bf16":
        y = torch.cat([y, torch.randn(100, generator=g) * 1e-39])
    y = y.clamp(-f.max, f.max)
    u = rng.uniform_torch((3, 4), y.numel())
    n = y.numel()
    code_dtype = {"fp8_e4m3": torch.uint8, "fp8_e5m2": torch.uint8, "int8": torch.int8, "int4": torch.int32,
                  "bf16": torch.int16, "mxfp4": torch.int32}[fmt]
    nearest, stochastic, decoded = (torch.empty(n, device=DEVICE) for _ in range(3))
    codes = torch.empty(n, dtype=code_dtype, device=DEVICE)
    if fmt in ("int4", "mxfp4"):  # decode reads packed bytes: the nibbles are checked below
        codes = torch.empty(n, dtype=torch.int32, device=DEVICE)
    _codec_kernel[(1,)](y.to(DEVICE), u.to(DEVICE), nearest, stochastic, codes, decoded, n,
                        FMT=tcodecs.FORMAT_IDS[fmt], N=triton.next_power_of_2(n))
    want_n = ecoptim.rounding.round_nearest(y, f)
    want_s = ecoptim.rounding.round_stochastic(y, f, noise=u)
    assert torch.equal(nearest.cpu().view(torch.int32), want_n.view(torch.int32))
    assert torch.equal(stochastic.cpu().view(torch.int32), want_s.view(torch.int32))
    if fmt == "int4":
        assert torch.equal(codes.cpu(), want_n.to(torch.int32) + 8)
        return
    if fmt == "mxfp4":  # the nibbles of the reference's packed bytes, element 2i in the low one
        packed = f.encode(want_n)
        assert torch.equal(codes.cpu(), torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)[:n].to(torch.int32))
        return
    want_codes = f.encode(want_n)
    assert torch.equal(codes.cpu(), want_codes.view(code_dtype))
    assert torch.equal(decoded.cpu().view(torch.int32), f.decode(want_codes, n).view(torch.int32))


@pytest.mark.parametrize("fmt,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_every_fp8_code_decodes_as_torch_decodes_it(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(dtype).to(torch.float32)
    out = torch.empty(256, device=DEVICE)
    _decode_kernel[(1,)](codes.to(DEVICE), out, FMT=tcodecs.FORMAT_IDS[fmt], N=256)
    out = out.cpu()
    finite = ~want.isnan()
    assert torch.equal(out[finite].view(torch.int32), want[finite].view(torch.int32))  # signed zeros included
    assert out[~finite].isnan().all()


def test_every_fp4_byte_decodes_as_the_reference_decodes_it():
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(512, device=DEVICE)
    _decode_kernel[(1,)](codes.to(DEVICE), out, FMT=tcodecs.FORMAT_IDS["mxfp4"], N=512)
    want = ecoptim.formats.FP4_E2M1.decode(codes, 512)
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))  # signed zeros included


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_e8m0_scales_are_the_references(fmt):
    """E8M0 exponents of absmax values at every rule boundary (max * 2^e and its neighbours), powers of two,
    subnormals, zero and the top of fp32, both rules, against formats.E8M0Scale."""
    f = ecoptim.formats.FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    e = torch.arange(-160, 128, dtype=torch.int32)
    edges = torch.ldexp(torch.full(e.shape, f.max), e)
    pow2 = torch.ldexp(torch.ones(e.shape), e)
    amax = torch.cat([edges, edges.nextafter(torch.tensor(0.0)), edges.nextafter(torch.tensor(float("inf"))), pow2,
                      torch.rand(500, generator=g).mul(2.0 ** 60).pow(torch.rand(500, generator=g) * 4 - 2),
                      torch.tensor([0.0, 1e-45, 1e-40, 2.0 ** -126, torch.finfo(torch.float32).max])])
    amax = amax[amax.isfinite()]
    for rule in E8M0_RULES:
        out = torch.empty(amax.numel(), dtype=torch.int32, device=DEVICE)
        value = torch.empty(amax.numel(), device=DEVICE)
        _e8m0_kernel[(1,)](amax.to(DEVICE), out, value, amax.numel(), _int32(struct_bits(f.max)),
                           EMAX=ecoptim.formats.largest_normal_exponent(f), CEIL=rule == "ceil",
                           N=triton.next_power_of_2(amax.numel()))
        scale = ecoptim.formats.E8M0Scale(rule)
        want = scale.encode(amax, f)
        assert torch.equal(out.cpu(), want.view(torch.uint8).to(torch.int32)), rule
        assert torch.equal(value.cpu().view(torch.int32), scale.decode(want).view(torch.int32)), rule


def struct_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32)[0])


with _interpreted():
    @triton.jit(do_not_specialize=["fmax"])
    def _e8m0_kernel(amax_ptr, out, value, n, fmax, EMAX: tl.constexpr, CEIL: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, N)
        mask = i < n
        c = tcodecs.e8m0_code(tl.load(amax_ptr + i, mask=mask, other=0.0), fmax.to(tl.float32, bitcast=True), EMAX,
                              CEIL)
        tl.store(out + i, c, mask=mask)
        tl.store(value + i, tcodecs.e8m0_value(c.to(tl.uint32)), mask=mask)


with _interpreted():
    @triton.jit
    def _decode_kernel(codes, out, FMT: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out + i, tcodecs.decode(codes, i.to(tl.int64), i < N, FMT))


@pytest.mark.parametrize("x", [[1.0, -2.5, 1e-40, -1e-45, 3.0e38, 3.4e38, -3.4e38],
                               [1.00390625, 1.01171875, 1.0078125, -1.0078125, 2.0 ** -133]])
def test_bf16_rounding_is_torchs(x):
    g = torch.Generator().manual_seed(1)
    # (no NaN: a block holding one is never stored, and torch's vector conversion keeps the payload)
    x = torch.cat([torch.tensor(x), torch.randn(200, generator=g), torch.tensor([float("inf"), -float("inf")])])
    out = torch.empty(x.numel(), dtype=torch.int16, device=DEVICE)
    _bf16_kernel[(1,)](x.to(DEVICE), out, x.numel(), N=triton.next_power_of_2(x.numel()))
    assert torch.equal(out.cpu(), x.to(torch.bfloat16).view(torch.int16))


def test_the_kernels_are_registered_for_cuda():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ecoptim::adamw_step_", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ecoptim::sgd_step_", "CUDA")


def test_unsupported_cases_take_the_reference_path():
    """What the kernels do not reproduce is refused by the applicability check (the reference path runs)."""
    def check(fmt="fp8_e4m3", gran="row", shape=SHAPE, fused_group=None, **kw):
        ref, fast, o_ref, o = _pair(shape, fmt, gran, ecoptim.AdamW, **dict(ADAMW, **kw))
        p, group = next(fast.parameters()), o.param_groups[0]
        if fused_group is False:  # the reference optimizer's group
            p, group = next(ref.parameters()), o_ref.param_groups[0]
        p.grad = torch.zeros(shape, device=p.device)
        return triton_backend.supports(p, spec_of(p), group)

    assert check()
    assert not check(amsgrad=True)
    assert not check(fused_group=False)
    assert not check(state_dtype=ecoptim.State8bit())
    assert not check(lr=torch.tensor(1e-3))
    assert not check("int4", "row", shape=(4, 31))  # odd rows would share bytes
    assert check("int4", "tensor", shape=(4, 31))
    assert check("mxfp8", None) and check("mxfp4", None)
    assert not check("nvfp4", None)  # the two-level scale is not in the kernels
    assert check("fp4_e2m1", "row") and not check("fp4_e2m1", "row", shape=(4, 31))


def test_bad_arguments_are_refused_before_anything_is_modified():
    _, fast, _, o = _pair(SHAPE, "fp8_e4m3", "row", ecoptim.AdamW, **ADAMW)
    p = next(fast.parameters())
    codes0 = p.codes.clone()
    m8 = torch.zeros(SHAPE, dtype=torch.uint8, device=p.device)
    common = dict(codes=[p.codes], scales=[p.scale], grads=[torch.ones(SHAPE, device=p.device)],
                  exp_avg_absmax=[None], exp_avg_sq_absmax=[None], master_weights=[None], carried_errors=[None],
                  compensation_codes=[None], compensation_scales=[None], formats=["fp8_e4m3"],
                  scale_formats=["absmax"], block_sizes=[32], steps=[1.0], injection_coefs=[0.0], grad_scales=[1.0], sr_keys=[], state8_block_sizes=[0],
                  state8_keys=[], state8_tables=[], lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                  inject=False, stochastic=False, state8_stochastic=False)
    with pytest.raises(ValueError, match="8-bit moments"):
        triton_ops.adamw_step(exp_avg=[m8], exp_avg_sq=[m8.clone()], **common)
    moments = dict(exp_avg=[torch.zeros(SHAPE, device=p.device)], exp_avg_sq=[torch.zeros(SHAPE, device=p.device)])
    with pytest.raises(ValueError, match="scale_formats"):
        triton_ops.adamw_step(**moments, **dict(common, scale_formats=["e8m0_ceil"]))
    with pytest.raises(ValueError, match="scale_formats"):
        triton_ops.adamw_step(**moments, **dict(common, formats=["mxfp8"]))  # MX with an absmax scale
    with pytest.raises(ValueError, match="E8M0 byte"):  # fp32 scales passed as E8M0 ones
        triton_ops.adamw_step(**moments, **dict(common, formats=["mxfp8"], scale_formats=["e8m0"]))
    with pytest.raises(ValueError, match="unknown format"):
        triton_ops.adamw_step(**moments, **dict(common, formats=["nvfp4"], scale_formats=["e4m3_fp32"]))
    with pytest.raises(ValueError, match="unknown format"):
        triton_ops.adamw_step(**moments, **dict(common, formats=["fp7"]))
    with pytest.raises(ValueError, match="two sr_keys"):
        triton_ops.adamw_step(**moments, **dict(common, stochastic=True))
    with pytest.raises(ValueError, match="block size"):
        triton_ops.adamw_step(**moments, **dict(common, block_sizes=[30]))
    with pytest.raises(ValueError, match="has 1 entries for"):
        triton_ops.adamw_step(**moments, **dict(common, scales=[p.scale[:1]]))
    assert torch.equal(p.codes.view(torch.uint8), codes0.view(torch.uint8))
