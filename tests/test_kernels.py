"""The fused C kernels against the reference path, bit for bit, and their building blocks.

The fused step (``ecoptim/optim/fused.py`` + the op ``ecoptim.ops`` and its C kernel in ``ecoptim/csrc``) must
give *identical* codes, scales and optimizer states to the per-tensor reference path, for round-to-nearest and
stochastic rounding alike.
Every test feeds both paths the same gradients and compares with ``torch.equal`` after every step.
"""
import contextlib
import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import ecoptim
from ecoptim import kernels, rng
from ecoptim.backends.cpu import ops as cpu_ops
from ecoptim.optim import fused
from ecoptim.optim.adamw import sqrt_rn
from ecoptim.qtensor import QuantizedTensor

# CI machines have gcc; where a compiler exists, a kernel that fails to build fails these tests
pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler")


def _pair(shape, fmt, gran, opt_cls, **kw):
    """Two identical quantized single-layer models with a reference (fused=False) and a fused optimizer."""
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 0, shape[0])[:, None])  # rows of very different magnitudes
    m = ecoptim.quantize_(nn.Sequential(lin), fmt, gran, filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
    ref, fast = copy.deepcopy(m), copy.deepcopy(m)
    return ref, fast, opt_cls(ref.parameters(), fused=False, **kw), opt_cls(fast.parameters(), **kw)


def _assert_same(o_ref, o_fast, ref, fast, where):
    for a, b in zip(ref.parameters(), fast.parameters()):
        assert isinstance(b, QuantizedTensor)
        assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), f"codes differ {where}"
        assert (a.scale is None and b.scale is None) or torch.equal(a.scale, b.scale), f"scales differ {where}"
        sa, sb = o_ref.state[a], o_fast.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"state {k!r} differs {where}"


def _run(ref, fast, o_ref, o_fast, shape, steps, grad_dtype=torch.float32, seed=1, scales=(1e-3, 1e-1, 1e-5)):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grad = torch.randn(shape, generator=g) * scales[step % len(scales)]
        if step == 1:
            grad[: shape[0] // 3] = 0  # zero gradients: m = v = 0 rows, w_til = decayed w
        for p in (*ref.parameters(), *fast.parameters()):
            if grad_dtype != torch.float32:
                p.grad_dtype = None
            p.grad = grad.to(grad_dtype).clone()
        o_ref.step()
        o_fast.step()
        _assert_same(o_ref, o_fast, ref, fast, f"at step {step}")


ADAMW = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
CASES = {
    "adamw": (ecoptim.AdamW, ADAMW),
    "adamw-bf16-states": (ecoptim.AdamW, dict(ADAMW, state_dtype=torch.bfloat16)),
    # 8-bit moments read and written by the kernel where their blocks tile the weight's (32 | 96-element rows,
    # group32, a 3552-element tensor), else decoded around it (bf16 rows of 40)
    "adamw-8bit-states": (ecoptim.AdamW, dict(ADAMW, state_dtype=ecoptim.State8bit(block_size=32))),
    "adamw-8bit-sr-states": (ecoptim.AdamW, dict(ADAMW, state_dtype=ecoptim.State8bit(16, "stochastic"))),
    # state blocks of 8: a 16-lane (AVX-512) vector spans two of them, each with its own absmax
    "adamw-8bit-states-b8": (ecoptim.AdamW, dict(ADAMW, state_dtype=ecoptim.State8bit(block_size=8))),
    "sgd": (ecoptim.SGD, dict(lr=3e-2, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (ecoptim.SGD, dict(lr=3e-2, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt,gran", list(itertools.product(["fp8_e4m3", "fp8_e5m2", "int8", "int4"],
                                                            ["row", "group32", "tensor"])))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["eco", "naive", "master", "exact", "kahan"])
def test_fused_step_is_bit_identical_to_reference(case, fmt, gran, rounding, mode):
    opt_cls, kw = CASES[case]
    shape = (37, 96)
    ref, fast, o_ref, o_fast = _pair(shape, fmt, gran, opt_cls, mode=mode, rounding=rounding, seed=3, **kw)
    _run(ref, fast, o_ref, o_fast, shape, steps=4)


@pytest.mark.parametrize("shape,gran", [((13, 45), "row"), ((5, 7), "tensor"), ((300, 301), "tensor"),
                                        ((3, 40000), "row")])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4"])
def test_fused_tails_and_whole_tensor_blocks(shape, gran, rounding, fmt):
    """Row lengths that are not multiples of the vector width (scalar tails), and blocks larger than the
    kernel's in-cache limit (a per-tensor scale over 90k elements: two threaded phases). INT4 rows of odd
    length start mid-byte: the reference path takes them (asserted), odd per-tensor sizes go to the kernel."""
    ref, fast, o_ref, o_fast = _pair(shape, fmt, gran, ecoptim.AdamW, rounding=rounding, **ADAMW)
    p = next(fast.parameters())
    p.grad = torch.zeros(shape)
    odd_int4_rows = fmt == "int4" and gran == "row" and shape[1] % 2
    assert fused.applies(p, ecoptim.convert.spec_of(p), o_fast.param_groups[0]) != odd_int4_rows
    _run(ref, fast, o_ref, o_fast, shape, steps=3)


@pytest.mark.parametrize("shape,gran,fits", [((300, 301), "tensor", False), ((2, 70000), "row", False),
                                             ((64, 1030), "row", True), ((2, 65536), "row", True)])
def test_kahan_blocks_beyond_the_kernels_scratch_take_the_reference_path(shape, gran, fits):
    """Mode 'kahan' quantizes each block's rounding error while it is still in the kernel's scratch, so blocks
    of more than 65536 elements take the reference path (and the kernel refuses them, touching nothing)."""
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", gran, ecoptim.AdamW, mode="kahan", rounding="stochastic",
                                     **ADAMW)
    p = next(fast.parameters())
    p.grad = torch.randn(shape)
    assert fused.applies(p, ecoptim.convert.spec_of(p), o_fast.param_groups[0]) == fits
    _run(ref, fast, o_ref, o_fast, shape, steps=2)
    if not fits:  # handed to the kernel anyway
        st = o_fast.state[p]
        job = fused.adamw_job(p, p.grad, ecoptim.convert.spec_of(p), st["exp_avg"], st["exp_avg_sq"], None,
                              step=3, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.0, coef=0.0,
                              inject=False)
        fused.attach_compensation(job, p, st["comp_codes"], st.get("comp_scale"))
        before = [t.clone() for t in (p.codes.view(torch.uint8), p.scale, st["exp_avg"], st["comp_codes"])]
        with pytest.raises(ValueError, match="kahan blocks too large"):
            fused.run([job])
        after = (p.codes.view(torch.uint8), p.scale, st["exp_avg"], st["comp_codes"])
        assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(before, after))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["eco", "naive", "master", "exact", "kahan"])
def test_fused_bf16_weights_bit_identical(case, rounding, mode):
    """BF16 storage (unscaled): rounding on the bit pattern must equal the reference's grid rounding,
    including bf16 subnormals (the middle rows are scaled to ~1e-39) and the sign of zero."""
    opt_cls, kw = CASES[case]
    shape = (21, 40)
    ref, fast, o_ref, o_fast = _pair(shape, "bf16", None, opt_cls, mode=mode, rounding=rounding, seed=4, **kw)
    for m in (ref, fast):
        w = next(m.parameters())
        w.requantize_(torch.cat([w.dequantize()[:7], w.dequantize()[7:14] * 1e-37, w.dequantize()[14:] * 0]))
    _run(ref, fast, o_ref, o_fast, shape, steps=4, scales=(1e-3, 1e-38, 1.0))
    p = next(fast.parameters())
    assert fused.applies(p, ecoptim.convert.spec_of(p), o_fast.param_groups[0])  # the kernel did run


@pytest.mark.parametrize("opt_cls,kw", [(ecoptim.SGD, dict(lr=0.1, momentum=0.9)), (ecoptim.AdamW, ADAMW)])
def test_fused_bf16_stochastic_zero_results_are_positive_zero(opt_cls, kw):
    """Stochastic rounding of -0, and of a negative value that rounds to zero, gives +0 on both paths (the
    reference's floor(y) + {0, 1} makes +0); zero gradients keep -0 and the bf16 subnormals in play."""
    shape = (4, 40)
    ref, fast, o_ref, o_fast = _pair(shape, "bf16", None, opt_cls, rounding="stochastic", **kw)
    tiny = -torch.rand(shape[1], generator=torch.Generator().manual_seed(3)) * 2.0 ** -133  # below half a step
    for m in (ref, fast):
        w = next(m.parameters())
        w.requantize_(torch.stack([torch.full((shape[1],), -0.0), tiny, -tiny, w.dequantize()[3]]))
    for step in range(3):
        for p in (*ref.parameters(), *fast.parameters()):
            p.grad = torch.zeros(shape)
        o_ref.step()
        o_fast.step()
        _assert_same(o_ref, o_fast, ref, fast, f"at step {step}")
    assert not torch.signbit(next(fast.parameters()).dequantize()[0]).any()


def test_fused_bf16_gradients():
    shape = (24, 64)
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", "row", ecoptim.AdamW, **ADAMW)
    _run(ref, fast, o_ref, o_fast, shape, steps=3, grad_dtype=torch.bfloat16)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 70),
       fmt=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "int8", "int4", "bf16"]),
       lr=st.floats(1e-5, 1.0), b1=st.floats(0.05, 0.999), b2=st.floats(0.0, 0.9999),
       eps=st.sampled_from([1e-12, 1e-8, 1e-3]), wd=st.sampled_from([0.0, 0.1, 2.0]),
       gscale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6]), rounding=st.sampled_from(["nearest", "stochastic"]),
       seed=st.integers(0, 2 ** 31))
def test_fused_adamw_matches_reference_for_any_hyperparameters(rows, cols, fmt, lr, b1, b2, eps, wd, gscale,
                                                              rounding, seed):
    """Includes b1 < 0.5 (lerp's other branch), tiny/huge gradients and weight decay > 1/lr."""
    shape = (rows, cols)
    ref, fast, o_ref, o_fast = _pair(shape, fmt, None if fmt == "bf16" else "row", ecoptim.AdamW, lr=lr,
                                     betas=(b1, b2), eps=eps,
                                     weight_decay=wd, rounding=rounding, seed=seed % 1000)
    try:
        _run(ref, fast, o_ref, o_fast, shape, steps=2, seed=seed, scales=(gscale,))
    except ValueError as e:  # the update overflowed to inf: both paths must refuse it the same way
        assert "non-finite" in str(e)


@contextlib.contextmanager
def _threads(n):
    """torch's (and so the kernel's) thread count set to n inside the block (the suite runs single-threaded)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("shape,gran", [((300, 301), "tensor"), ((64, 1030), "row"), ((2, 70000), "row")])
def test_fused_threads_give_the_same_bits(threads, shape, gran):
    """The kernel's thread team (the suite otherwise runs single-threaded): rows shared out in chunks from a
    counter, a per-tensor block split among the threads with its absmax met at a barrier (two passes), rows
    longer than one in-cache block; 3 threads split unevenly."""
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", gran, ecoptim.AdamW, rounding="stochastic", **ADAMW)
    with _threads(threads):
        _run(ref, fast, o_ref, o_fast, shape, steps=3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,gran", [((64, 1024), "row"), ((2, 65536), "row"), ((300, 301), "tensor")])
def test_fused_eight_bit_states_with_threads(threads, shape, gran):
    """8-bit moments in the kernel (rows of 1024 and of 65536, the largest in-cache block, in state blocks of
    256) and around it (a per-tensor block beyond the in-cache limit), with the thread team."""
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", gran, ecoptim.AdamW, rounding="stochastic",
                                     **dict(ADAMW, state_dtype=ecoptim.State8bit(rounding="stochastic")))
    p = next(fast.parameters())
    assert fused.state8_fits(p, ecoptim.convert.spec_of(p), 256) == (gran == "row")
    with _threads(threads):
        _run(ref, fast, o_ref, o_fast, shape, steps=3)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_exact_fallbacks_match_reference(rounding):
    """The kernel's shortcuts have preconditions, and blocks that break them take exact code: rows of weights
    below 2^-90 (outside the reciprocal division's proven range: a true division), and gradients whose square
    overflows (v = Inf makes the sqrt(v)/sqrt(bc2) shortcut NaN: the block is re-run exactly; without the
    re-run this test fails), and rows whose scale is 2^8 or more (the vector decode of E4M3 multiplies by 2^120
    times the scale, which must be finite: scalar code). All must still give the reference's bits, Inf/NaN
    moments included."""
    shape = (12, 40)
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", "row", ecoptim.AdamW, rounding=rounding, **ADAMW)
    for m in (ref, fast):
        w = next(m.parameters())
        d = w.dequantize()
        w.requantize_(torch.cat([d[:4] * 1e-28, d[4:6] * 1e9, d[6:]]))
    assert next(fast.parameters()).scale[4:6].min() >= 2 ** 8
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    grad[:4] = 0  # the tiny rows stay tiny (decay only)
    grad[8, :5] = 3e20  # (1 - b2) * g^2 overflows fp32: v = Inf
    for p in (*ref.parameters(), *fast.parameters()):
        p.grad = grad.clone()
    o_ref.step()
    o_fast.step()
    a, b = next(ref.parameters()), next(fast.parameters())
    assert b.dequantize()[:4].abs().max() < 2 ** -90
    assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)) and torch.equal(a.scale, b.scale)
    for k in ("exp_avg", "exp_avg_sq"):  # bit patterns: NaN == NaN
        assert torch.equal(o_ref.state[a][k].view(torch.int32), o_fast.state[b][k].view(torch.int32))
    assert torch.isinf(o_fast.state[b]["exp_avg_sq"][8, :5]).all()


def test_update_that_overflows_is_refused_by_the_fused_path():
    shape = (4, 16)
    _, fast, _, o_fast = _pair(shape, "fp8_e4m3", "row", ecoptim.AdamW, lr=1e38, betas=(0.9, 0.98), eps=1e-30,
                               weight_decay=0.0)
    p = next(fast.parameters())
    p.grad = torch.full(shape, 1e-30)
    o_fast.param_groups[0]["lr"] = 1e-3
    o_fast.step()  # a first, ordinary step, so that the moments are not zero
    o_fast.param_groups[0]["lr"] = 1e38
    before = [t.clone() for t in (p.codes, p.scale, o_fast.state[p]["exp_avg"], o_fast.state[p]["exp_avg_sq"])]
    with pytest.raises(ValueError, match="non-finite"):
        o_fast.step()
    after = (p.codes, p.scale, o_fast.state[p]["exp_avg"], o_fast.state[p]["exp_avg_sq"])
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(before, after))  # untouched


def test_fused_path_is_taken_and_can_be_turned_off(monkeypatch):
    shape = (8, 32)
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", "row", ecoptim.AdamW, **ADAMW)
    p = next(fast.parameters())
    assert not fused.applies(p, ecoptim.convert.spec_of(p), o_fast.param_groups[0])  # no gradient yet
    p.grad = torch.zeros(shape)
    assert fused.applies(p, ecoptim.convert.spec_of(p), o_fast.param_groups[0])
    assert not fused.applies(p, ecoptim.convert.spec_of(p), o_ref.param_groups[0])  # fused=False
    calls, op_calls = [], []
    # the CPU backend's prepared call: what the op's CPU kernel runs, and what a planned step runs again
    real = cpu_ops.PreparedCall.run
    monkeypatch.setattr(cpu_ops.PreparedCall, "run", lambda self, grads, *a: calls.append(len(grads)) or real(
        self, grads, *a))
    real_op = ecoptim.ops.adamw_step_
    monkeypatch.setattr(ecoptim.ops, "adamw_step_", lambda **kw: op_calls.append(len(kw["codes"])) or real_op(**kw))
    _run(ref, fast, o_ref, o_fast, shape, steps=3)
    assert calls == [1, 1, 1]  # one tensor per step from the fused optimizer, none from the reference one
    assert op_calls == [1]  # the first step through the op; the planned ones run its kept call


def test_bad_fused_argument_is_refused_at_construction():
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="fused must be"):
        ecoptim.AdamW([p], fused="yes")
    with pytest.raises(ValueError, match="fused must be"):
        ecoptim.SGD([p], lr=0.1, fused=1.5)


def test_without_compiler_the_reference_path_runs(monkeypatch):
    """No kernels (no compiler, or ECOPTIM_DISABLE_KERNELS=1): same results, from the reference path."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", True)
    assert not kernels.available() and kernels.all_finite([torch.ones(3)]) is None
    shape = (8, 32)
    ref, fast, o_ref, o_fast = _pair(shape, "fp8_e4m3", "row", ecoptim.AdamW, **ADAMW)
    _run(ref, fast, o_ref, o_fast, shape, steps=2)
    monkeypatch.setenv("ECOPTIM_DISABLE_KERNELS", "1")
    monkeypatch.setattr(kernels, "_tried", False)
    assert kernels.load() is None


def _sumsq_inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, generator=g).to(dt) for n, dt in ((70001, torch.float32), (33, torch.bfloat16),
                                                               (131075, torch.float16))]


def test_kernel_threads_run_on_torchs_openmp_pool():
    """Where torch runs on GNU libgomp (its Linux CPU builds), the kernels are linked to that very runtime: one
    libgomp in the process, and the kernel's threads are its pool's."""
    rt = kernels.openmp_runtime()
    if rt is None:  # another OpenMP runtime: the kernels start threads of their own (checked by the next test)
        assert kernels.threading_model() == "pthreads"
        return
    assert kernels.threading_model() == "openmp"
    with open("/proc/self/maps") as f:
        gomps = {ln.split()[-1] for ln in f if "/libgomp" in ln}
    assert gomps == {rt}


def test_openmp_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ECOPTIM_KERNEL_OPENMP", "0")
    assert kernels.openmp_runtime() is None


def _in_another_build(tmp_path, march, script, cc=None):
    """Run ``script`` (which prints 'ok') in a fresh process whose kernel is built with ``-march=march`` (and
    the compiler ``cc``) into its own cache."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, ECOPTIM_KERNEL_MARCH=march, ECOPTIM_CACHE_DIR=str(tmp_path), CC=cc or kernels.compiler())
    out = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert list(tmp_path.glob("eco_cpu-*.so"))  # built with those flags, in its own cache


def test_portable_scalar_build_is_bit_identical_too(tmp_path):
    """The kernel built without AVX2 (-march=x86-64: the scalar code every other CPU runs) by a compiler without
    OpenMP (so with threads of its own: the thread team and its barriers, with 2 and 3 threads) in a fresh
    process."""
    script = (
        "import torch, test_kernels as t\n"
        "from ecoptim import kernels\n"
        "assert kernels.available() and kernels.threading_model() == 'pthreads'\n"
        "assert kernels.vector_isa() == 'scalar'\n"
        "for threads in (2, 3):\n"
        "    for shape, gran in (((300, 301), 'tensor'), ((64, 1030), 'row'), ((2, 70000), 'row')):\n"
        "        t.test_fused_threads_give_the_same_bits(threads, shape, gran)\n"
        "    t.test_fused_eight_bit_states_with_threads(threads, (64, 1024), 'row')\n"
        "    t.test_all_finite_kernel_agrees_with_torch(threads)\n"
        "    with t._threads(threads):\n"
        f"        assert kernels.sumsq(t._sumsq_inputs()) == {kernels.sumsq(_sumsq_inputs())!r}\n"
        "for case in t.CASES:\n"
        "    for fmt in ('fp8_e4m3', 'fp8_e5m2', 'int8', 'bf16', 'int4'):\n"
        "        for rnd in ('nearest', 'stochastic'):\n"
        "            cls, kw = t.CASES[case]\n"
        "            gran = None if fmt == 'bf16' else 'row'\n"
        "            r, f, o_r, o_f = t._pair((13, 46), fmt, gran, cls, rounding=rnd, **kw)\n"
        "            t._run(r, f, o_r, o_f, (13, 46), steps=2)\n"
        "for case in ('adamw-8bit-states', 'adamw-8bit-sr-states'):\n"  # rows the 8-bit blocks tile: in the kernel
        "    cls, kw = t.CASES[case]\n"
        "    r, f, o_r, o_f = t._pair((13, 64), 'fp8_e4m3', 'row', cls, rounding='stochastic', **kw)\n"
        "    t._run(r, f, o_r, o_f, (13, 64), steps=2)\n"
        "for mode in ('master', 'exact', 'kahan'):\n"  # master weights / the carried error / the compensation
        "    for cls, kw in (t.CASES['adamw'], t.CASES['sgd']):\n"
        "        r, f, o_r, o_f = t._pair((13, 46), 'fp8_e4m3', 'row', cls, mode=mode, rounding='stochastic', **kw)\n"
        "        t._run(r, f, o_r, o_f, (13, 46), steps=2)\n"
        "import test_clip as c\n"  # clipping folded into the step
        "for cls, kw in c.CASES:\n"
        "    c.test_clip_then_step_equals_scaling_the_gradients_first(cls, kw, 'fp8_e4m3', 'row', 'stochastic', None,\n"
        "                                                             torch.bfloat16)\n"
        f"assert kernels.sumsq(t._sumsq_inputs()) == {kernels.sumsq(_sumsq_inputs())!r}\n"  # the AVX2 build's bits
        "print('ok')\n")
    cc = tmp_path / "cc-without-openmp"  # a compiler that refuses -fopenmp (e.g. clang without libomp)
    cc.write_text(f"#!/bin/sh\ncase \"$*\" in *-fopenmp*) echo 'no OpenMP here' >&2; exit 1;; esac\n"
                  f"exec {kernels.compiler()} \"$@\"\n")
    cc.chmod(0o755)
    _in_another_build(tmp_path, "x86-64", script, cc=str(cc))


def test_vector_isa_is_the_widest_the_cpu_has():
    """-march=native gives the 16-lane AVX-512 sweeps where the CPU has AVX-512 F/BW/DQ/VL, else the 8-lane
    AVX2 ones (the machines this suite runs on have AVX2 at least)."""
    with open("/proc/cpuinfo") as f:
        flags = set(next(ln for ln in f if ln.startswith("flags")).split(":")[1].split())
    assert {"avx2", "fma", "f16c"} <= flags
    wide = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    assert kernels.vector_isa() == ("avx512" if wide else "avx2")


def test_avx2_build_is_bit_identical_too(tmp_path):
    """The 8-lane sweeps (-march=x86-64-v3: AVX2/FMA/F16C, no AVX-512), on torch's OpenMP pool, against the
    reference path in a fresh process: where this CPU has AVX-512 the rest of the suite runs the 16-lane ones,
    so both instantiations of the vector layer are checked here: the whole bit-identity matrix (every case,
    format, granularity, rounding and mode), the tails, BF16 weights, threads, 8-bit states, clipping."""
    script = (
        "import itertools, torch, test_kernels as t, test_clip as c\n"
        "from ecoptim import kernels\n"
        "assert kernels.vector_isa() == 'avx2'\n"
        "for case, fmt, gran, rnd, mode in itertools.product(t.CASES, ('fp8_e4m3', 'fp8_e5m2', 'int8', 'int4'),\n"
        "        ('row', 'group32', 'tensor'), ('nearest', 'stochastic'),\n"
        "        ('eco', 'naive', 'master', 'exact', 'kahan')):\n"
        "    t.test_fused_step_is_bit_identical_to_reference(case, fmt, gran, rnd, mode)\n"
        "for shape, gran in (((13, 45), 'row'), ((5, 7), 'tensor'), ((300, 301), 'tensor'), ((3, 40000), 'row')):\n"
        "    for rnd, fmt in itertools.product(('nearest', 'stochastic'), ('fp8_e4m3', 'int4')):\n"
        "        t.test_fused_tails_and_whole_tensor_blocks(shape, gran, rnd, fmt)\n"
        "for case, rnd, mode in itertools.product(t.CASES, ('nearest', 'stochastic'), ('eco', 'master')):\n"
        "    t.test_fused_bf16_weights_bit_identical(case, rnd, mode)\n"
        "for threads in (2, 3):\n"
        "    t.test_fused_threads_give_the_same_bits(threads, (300, 301), 'tensor')\n"
        "    t.test_fused_eight_bit_states_with_threads(threads, (64, 1024), 'row')\n"
        "for case in ('adamw-8bit-states', 'adamw-8bit-sr-states'):\n"
        "    cls, kw = t.CASES[case]\n"
        "    r, f, o_r, o_f = t._pair((13, 64), 'fp8_e4m3', 'row', cls, rounding='stochastic', **kw)\n"
        "    t._run(r, f, o_r, o_f, (13, 64), steps=2)\n"
        "for cls, kw in c.CASES:\n"
        "    c.test_clip_then_step_equals_scaling_the_gradients_first(cls, kw, 'fp8_e4m3', 'row', 'stochastic', None,\n"
        "                                                             torch.bfloat16)\n"
        "print('ok')\n")
    _in_another_build(tmp_path, "x86-64-v3", script)


def test_stochastic_rounding_uniforms_c_equals_torch():
    for key in [(0, 0), (1, 2), (0xFFFFFFFF, 0xDEADBEEF), (12345, 67890)]:
        for n in (1, 7, 8, 1000, 100003):
            assert torch.equal(kernels.uniform(key, n), rng.uniform_torch(key, n))


def test_stochastic_rounding_uniforms_are_uniform_and_independent():
    n = 1 << 20
    u = rng.uniform_torch((7, 11), n).double()
    assert ((u >= 0) & (u < 1)).all()
    assert torch.equal(u * 2 ** 24, torch.floor(u * 2 ** 24))  # 24-bit resolution, as torch.rand
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) ~ 1e-5
    sd = (1 / 12 / n) ** 0.5
    assert abs(float(u.mean()) - 0.5) < 5 * sd
    for lag in (1, 2, 8, 1024):  # neighbouring elements
        c = float(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1])
        assert abs(c) < 5 / n ** 0.5
    v = rng.uniform_torch((8, 11), n).double()  # the next key (e.g. the next step)
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 5 / n ** 0.5


def test_keys_come_from_the_generator():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert rng.draw_key(g1) == rng.draw_key(g2)
    assert rng.draw_key(g1) != rng.draw_key(torch.Generator().manual_seed(6))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2 ** 32))
def test_draw_keys_gives_the_keys_and_state_of_one_by_one_draws(n, seed):
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert rng.draw_keys(g1, n) == [rng.draw_key(g2) for _ in range(n)]
    assert torch.equal(g1.get_state(), g2.get_state())


def _many_params_model(reference_between: bool) -> nn.Module:
    """Linears of several formats and block sizes, biases and a LayerNorm (dense), in one param group; with
    ``reference_between`` the third Linear is stored as FP16, which takes the reference path."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 40), nn.LayerNorm(40), nn.Linear(40, 32), nn.Linear(32, 48, bias=False),
                      nn.Linear(48, 16), nn.Linear(16, 40, bias=False))
    ecoptim.quantize_(m, "fp8_e4m3", "row", filter_fn=lambda mod, n: n in ("0", "3"))
    ecoptim.quantize_(m, "fp16" if reference_between else "int4", "none" if reference_between else "group8",
                      filter_fn=lambda mod, n: n == "2")
    ecoptim.quantize_(m, "bf16", filter_fn=lambda mod, n: n == "4")
    ecoptim.quantize_(m, "int8", "tensor", filter_fn=lambda mod, n: n == "5")
    return m


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("reference_between", [False, True])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_a_group_of_many_parameters_is_bit_identical_to_reference(rounding, reference_between, opt_name,
                                                                   monkeypatch):
    """The fused path prepares a group's kernel parameters at once (one step-count add, one key draw); with a
    quantized parameter on the reference path between them (FP16 storage: its own key drawn in its turn), one
    by one. Either way every bit equals the reference path's, dense parameters included."""
    m = _many_params_model(reference_between)
    ref, fast = copy.deepcopy(m), copy.deepcopy(m)
    opt_cls, kw = CASES[opt_name]
    o_ref = opt_cls(ref.parameters(), fused=False, rounding=rounding, seed=4, **kw)
    o_fast = opt_cls(fast.parameters(), rounding=rounding, seed=4, **kw)
    prepared, planned = [], []
    real = o_fast._start_kernel_steps
    monkeypatch.setattr(o_fast, "_start_kernel_steps",
                        lambda group, params: prepared.append(len(params)) or real(group, params))
    real_planned = o_fast._step_planned
    monkeypatch.setattr(o_fast, "_step_planned", lambda *a: planned.append(real_planned(*a)) or planned[-1])
    x = torch.randn(8, 24)
    for step in range(3):
        for net in (ref, fast):
            net.zero_grad()
            net(x * (step + 1)).square().mean().backward()
        o_ref.step()
        o_fast.step()
        for a, b in zip(ref.parameters(), fast.parameters()):
            if isinstance(a, QuantizedTensor):
                assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), f"step {step}"
                assert (a.scale is None and b.scale is None) or torch.equal(a.scale, b.scale)
            else:
                assert torch.equal(a, b)
            for k, v in o_ref.state[a].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, o_fast.state[b][k]), f"state {k!r} at step {step}"
    # the kernel's parameters prepared together and planned (all keys in one draw) from the next step on (SGD: from
    # the second, once its momentum buffers exist), or one by one each step when an FP16 weight stands between them
    # (never planned)
    full = 2 if opt_name == "sgd" else 1
    assert prepared == ([1] * 12 if reference_between else [5] * full)
    assert planned == ([] if reference_between else [0] * (3 - full))
    assert o_fast.generator(torch.device("cpu")).get_state().equal(o_ref.generator(torch.device("cpu")).get_state())


def _mixed_group_model(reference_between: bool) -> nn.Module:
    """``_many_params_model``; with ``reference_between`` also a fake-quantized FP8 weight (dense storage: the
    reference path) after the others."""
    m = _many_params_model(reference_between)
    if reference_between:
        m.append(nn.Linear(40, 24))
        ecoptim.quantize_(m, "fp8_e4m3", "row", mode="fake", filter_fn=lambda mod, n: n == "6")
    return m


@pytest.mark.parametrize("mode", ["eco", "naive", "master", "exact", "kahan"])
@pytest.mark.parametrize("reference_between", [False, True])
@pytest.mark.parametrize("case", ["adamw", "adamw-8bit-states", "adamw-8bit-sr-states", "sgd", "sgd-nesterov"])
def test_a_mixed_group_in_every_mode_with_clipping_equals_the_all_reference_group(mode, reference_between, case):
    """One param group of kernel parameters (FP8 / INT4 / BF16 / INT8, 8-bit moments read by the kernel or
    decoded around it), dense parameters and, with ``reference_between``, quantized parameters on the reference
    path (FP16 storage, a fake-quantized weight), stepped by ``step_group`` with a folded clip: every bit, and
    the generator, equal the same group stepped on the reference path alone."""
    m = _mixed_group_model(reference_between)
    ref, fast = copy.deepcopy(m), copy.deepcopy(m)
    opt_cls, kw = CASES[case]
    o_ref = opt_cls(ref.parameters(), fused=False, mode=mode, rounding="stochastic", seed=9, **kw)
    o_fast = opt_cls(fast.parameters(), mode=mode, rounding="stochastic", seed=9, **kw)
    x = torch.randn(8, 24)
    for step in range(3):
        norms = []
        for net, opt in ((ref, o_ref), (fast, o_fast)):
            net.zero_grad()
            net(x * (step + 1)).square().mean().backward()
            norms.append(opt.clip_grad_norm_(0.05))
        assert torch.equal(*norms)
        o_ref.step()
        o_fast.step()
        for a, b in zip(ref.parameters(), fast.parameters()):
            if isinstance(a, QuantizedTensor):
                assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), f"step {step}"
                assert (a.scale is None and b.scale is None) or torch.equal(a.scale, b.scale)
            else:
                assert torch.equal(a, b), f"step {step}"
            assert o_ref.state[a].keys() == o_fast.state[b].keys()
            for k, v in o_ref.state[a].items():
                if isinstance(v, torch.Tensor):
                    assert v.dtype == o_fast.state[b][k].dtype and torch.equal(v, o_fast.state[b][k]), \
                        f"state {k!r} at step {step}"
        assert o_fast.generator(torch.device("cpu")).get_state().equal(o_ref.generator(torch.device("cpu")).get_state())


def test_step_group_steps_tensors_that_are_not_the_optimizers_parameters():
    """``step_group`` steps whatever ``ParamStep``s it is given (FSDP hands it the ranks' shards): stepping
    copies of a group's parameters with their own states equals the optimizer's own step, bit for bit."""
    from ecoptim.optim.base import ParamStep
    from ecoptim.convert import spec_of
    m = _mixed_group_model(True)
    ref, other = copy.deepcopy(m), copy.deepcopy(m)
    o_ref = ecoptim.AdamW(ref.parameters(), rounding="stochastic", seed=2, **ADAMW)
    o_other = ecoptim.AdamW([nn.Parameter(torch.zeros(1))], rounding="stochastic", seed=2, **ADAMW)
    states = [{} for _ in other.parameters()]
    x = torch.randn(8, 24)
    for step in range(3):
        for net in (ref, other):
            net.zero_grad()
            net(x * (step + 1)).square().mean().backward()
        o_ref.step()
        params = [ParamStep(p, p.grad, st, spec_of(p)) for p, st in zip(other.parameters(), states)]
        assert o_other.step_group(o_other.param_groups[0], params) == 0
        for a, b, st in zip(ref.parameters(), other.parameters(), states):
            if isinstance(a, QuantizedTensor):
                assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), f"step {step}"
                assert (a.scale is None and b.scale is None) or torch.equal(a.scale, b.scale)
            else:
                assert torch.equal(a, b), f"step {step}"
            assert o_ref.state[a].keys() == st.keys()
            assert all(torch.equal(v, st[k]) for k, v in o_ref.state[a].items())
    assert not o_other.state  # the optimizer's own parameters were not touched


def test_sqrt_rn_is_correctly_rounded_on_two_full_binades():
    """Every fp32 in [1, 4): sqrt(4x) = 2 sqrt(x) exactly, so these cover all normal inputs."""
    x = torch.arange(0x3F800000, 0x40800000, dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert np.array_equal(sqrt_rn(x).numpy(), np.sqrt(x.numpy()))  # numpy: the IEEE (hardware) sqrt


@pytest.mark.parametrize("threads", [1, 3])
def test_all_finite_kernel_agrees_with_torch(threads):
    a, b = torch.randn(300007), torch.randn(77).bfloat16()  # enough elements for the thread team
    with _threads(threads):
        assert kernels.all_finite([a, b]) is True
        for bad in (float("nan"), float("inf"), -float("inf")):
            for i in (0, 31, 100001, 300006):
                c = a.clone()
                c[i] = bad
                assert kernels.all_finite([b, c]) is False
            d = b.clone()
            d[76] = bad
            assert kernels.all_finite([a, d]) is False
        assert kernels.all_finite([a[::2]]) is None  # not contiguous: the caller falls back to torch


@pytest.mark.parametrize("gran", ["tensor", "row"])
def test_an_empty_weight_steps_on_both_paths(gran):
    """A weight with no elements (e.g. a 0-row layer) has no block: both paths step it without touching its scale."""
    ref, fast, o_ref, o_fast = _pair((0, 4), "fp8_e4m3", gran, ecoptim.SGD, lr=1e-4, momentum=0.9)
    _run(ref, fast, o_ref, o_fast, (0, 4), steps=2)


def test_a_scale_of_another_size_at_a_kept_address_is_refused_before_the_kernel_writes():
    """The CPU op keeps its packed structs between calls with the same tensors; a scale view of another size at the
    same address must be checked again (and refused), never handed to the kernel with the kept block count."""
    import dataclasses
    ref, fast, o_ref, o_fast = _pair((8, 32), "fp8_e4m3", "row", ecoptim.AdamW, **ADAMW)
    _run(ref, fast, o_ref, o_fast, (8, 32), steps=1)
    p = next(fast.parameters())
    st = o_fast.state[p]
    kw = dict(step=2, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.0, coef=0.0, inject=False)
    job = fused.adamw_job(p, torch.zeros(8, 32), ecoptim.convert.spec_of(p), st["exp_avg"], st["exp_avg_sq"],
                          None, **kw)
    fused.run([job])
    fused.run([job])  # the kept structs
    short = dataclasses.replace(job, scales=p.scale[:1])  # same data pointer, 1 scale instead of 8
    before = p.scale.clone()
    with pytest.raises(ValueError, match="scales holds 4 bytes"):
        fused.run([short])
    assert torch.equal(p.scale, before)
