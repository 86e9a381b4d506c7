"""The MX and NVFP4 formats in the fused C kernel, bit for bit against the reference path (fused=False).

MXFP8 (E4M3 codes), MXFP4 and NVFP4 (packed E2M1 codes) with their block scales: E8M0 under the ceil rule (the
MX formats' default) and OCP's floor rule, and NVFP4's E4M3 block scale times an fp32 tensor scale, which the
kernel derives from the whole tensor's absmax in a first pass. Every test compares codes, scales and optimizer
states with ``torch.equal`` after every step.
"""
import copy

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim import formats as F
from ecoptim import kernels, ops
from ecoptim.optim import fused
from ecoptim.qtensor import QuantizedTensor

import test_kernels as tk

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler")

# name -> spec: the formats' own specs, the OCP floor rule, and FP4 elements with the plain absmax scale
SPECS = {
    "mxfp8": F.QuantSpec.make("mxfp8"),
    "mxfp4": F.QuantSpec.make("mxfp4"),
    "nvfp4": F.QuantSpec.make("nvfp4"),
    "mxfp8-floor": F.QuantSpec.make("mxfp8", scale="e8m0"),
    "mxfp4-floor": F.QuantSpec.make("mxfp4", scale="e8m0"),
    "fp4-absmax": F.QuantSpec.make("fp4_e2m1", "row"),
    # the scale formats with other element formats: the kernel's scale code takes any element grid
    "e5m2-e8m0": F.QuantSpec(F.FP8_E5M2, F.PerGroup(32), F.E8M0Scale("floor")),
    "int8-e8m0": F.QuantSpec(F.INT8, F.PerGroup(32), F.E8M0Scale("ceil")),
    "int4-e8m0": F.QuantSpec(F.INT4, F.PerRow(), F.E8M0Scale("floor")),
    "e4m3-nvscale": F.QuantSpec(F.FP8_E4M3, F.PerGroup(16), F.E4M3TensorScale()),
}
MODES = ["eco", "naive", "master", "exact", "kahan"]
CASES = ["adamw", "adamw-bf16-states", "adamw-8bit-states", "sgd", "sgd-nesterov"]


def _weights(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (1e-30 .. 1e4: E8M0 exponents far below and above 0, NVFP4 block scales
    clamped to E4M3's smallest subnormal), a zero row, and a zero block inside a row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w *= torch.logspace(-30, 4, shape[0])[:, None]
    w[shape[0] // 2] = 0
    w[1, :16] = 0
    return w


def _pair(name: str, shape: tuple[int, int], opt_cls, **kw):
    """Two identical one-layer models quantized with SPECS[name], with a reference and a fused optimizer."""
    spec = SPECS[name]
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight = nn.Parameter(QuantizedTensor.from_float(_weights(shape), spec))
    m = nn.Sequential(lin)
    ref, fast = copy.deepcopy(m), copy.deepcopy(m)
    return ref, fast, opt_cls(ref.parameters(), fused=False, **kw), opt_cls(fast.parameters(), **kw)


def _applies(fast, o_fast) -> bool:
    p = next(fast.parameters())
    grad, p.grad = p.grad, torch.zeros(p.shape)
    try:
        return fused.applies(p, p.spec, o_fast.param_groups[0])
    finally:
        p.grad = grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", MODES)
def test_mx_and_nvfp4_fused_step_is_bit_identical_to_reference(case, name, rounding, mode):
    opt_cls, kw = tk.CASES[case]
    shape = (24, 96)
    ref, fast, o_ref, o_fast = _pair(name, shape, opt_cls, mode=mode, rounding=rounding, seed=3, **kw)
    # NVFP4 in mode 'kahan' stays on the reference path: its compensation would need a tensor pass of its own
    two_level = isinstance(SPECS[name].scale, F.E4M3TensorScale)
    assert _applies(fast, o_fast) == (not (two_level and mode == "kahan"))
    tk._run(ref, fast, o_ref, o_fast, shape, steps=4)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "nvfp4", "mxfp4-floor"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_mx_fused_step_with_low_precision_gradients(name, grad_dtype):
    shape = (16, 64)
    ref, fast, o_ref, o_fast = _pair(name, shape, ecoptim.AdamW, rounding="stochastic", **tk.ADAMW)
    tk._run(ref, fast, o_ref, o_fast, shape, steps=3, grad_dtype=grad_dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name,shape", [("nvfp4", (300, 320)), ("mxfp4", (300, 320)), ("mxfp8", (64, 1024)),
                                        ("nvfp4", (7, 16))])
def test_mx_fused_threads_give_the_same_bits(threads, name, shape):
    """NVFP4's two passes share the tensor's blocks among the threads and meet at barriers to derive s_t."""
    with tk._threads(threads):
        for opt_cls, kw in (tk.CASES["adamw"], tk.CASES["sgd"]):
            ref, fast, o_ref, o_fast = _pair(name, shape, opt_cls, rounding="stochastic", **kw)
            tk._run(ref, fast, o_ref, o_fast, shape, steps=2)


def _block_view(t: torch.Tensor, nb: int) -> torch.Tensor:
    return t.reshape(nb, -1)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "mxfp8-floor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_mx_blocks_are_left_unchanged_and_counted(name, bad):
    """nonfinite='skip_blocks': a block whose update is NaN/Inf keeps its codes, scale and moments; the others
    step as the reference steps them (blocks are independent)."""
    shape = (8, 64)  # 16 blocks of 32
    _, fast, _, o_fast = _pair(name, shape, ecoptim.AdamW, rounding="stochastic", nonfinite="skip_blocks",
                               **tk.ADAMW)
    ref, _, o_ref, _ = _pair(name, shape, ecoptim.AdamW, rounding="stochastic", **tk.ADAMW)
    p, r = next(fast.parameters()), next(ref.parameters())
    g = torch.randn(shape) * 1e-2
    for q in (p, r):
        q.grad = g.clone()
    o_fast.step()
    o_ref.step()  # a first step with finite gradients, so that the moments are not zero
    before_codes, before_scale = p.codes.clone(), p.scale.clone()
    st = o_fast.state[p]
    before_m, before_v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    g = torch.randn(shape) * 1e-2
    p.grad = g.clone()
    p.grad[2, 40] = bad  # block 5
    p.grad[5, 3] = bad  # block 10
    r.grad = g.clone()
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        o_fast.step()
    o_ref.step()
    assert o_fast.skipped_blocks == 2
    nb = 16
    bad_blocks = torch.zeros(nb, dtype=torch.bool)
    bad_blocks[[5, 10]] = True
    good = ~bad_blocks
    codes, ref_codes, old = (_block_view(c.view(torch.uint8), nb) for c in (p.codes, r.codes, before_codes))
    assert torch.equal(codes[bad_blocks], old[bad_blocks]) and torch.equal(codes[good], ref_codes[good])
    sc, ref_sc, old_sc = (s.view(torch.uint8) for s in (p.scale, r.scale, before_scale))
    assert torch.equal(sc[bad_blocks], old_sc[bad_blocks]) and torch.equal(sc[good], ref_sc[good])
    for k, old_k in (("exp_avg", before_m), ("exp_avg_sq", before_v)):
        mine, theirs, old = (_block_view(t, nb) for t in (st[k], o_ref.state[r][k], old_k))
        assert torch.equal(mine[bad_blocks], old[bad_blocks]) and torch.equal(mine[good], theirs[good])


def test_a_nonfinite_nvfp4_block_leaves_the_whole_tensor_unchanged():
    """NVFP4: every block's scale depends on the tensor scale s_t, so a NaN/Inf update anywhere leaves the whole
    tensor as it was (a new s_t would change every other block's value), all its blocks counted, and its step
    count stays."""
    shape = (8, 64)
    _, fast, _, o_fast = _pair("nvfp4", shape, ecoptim.AdamW, rounding="stochastic", nonfinite="skip_blocks",
                               **tk.ADAMW)
    p = next(fast.parameters())
    p.grad = torch.randn(shape) * 1e-2
    o_fast.step()
    st = o_fast.state[p]
    before = [t.clone() for t in (p.codes, p.scale, st["exp_avg"], st["exp_avg_sq"])]
    step = int(st["step"])
    p.grad = torch.randn(shape) * 1e-2
    p.grad[3, 7] = float("nan")
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        o_fast.step()
    assert o_fast.skipped_blocks == 32  # 512 elements in blocks of 16
    after = (p.codes, p.scale, st["exp_avg"], st["exp_avg_sq"])
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, after))
    assert int(st["step"]) == step


def test_nvfp4_kahan_and_large_blocks_are_refused_by_the_kernel_touching_nothing():
    """What fused.applies keeps from the kernel (NVFP4 in mode 'kahan', or with blocks over 65536 elements), the
    kernel refuses too, before writing anything."""
    shape = (2, 70000)
    spec = F.QuantSpec.make("nvfp4", "row")
    p = QuantizedTensor.from_float(torch.randn(shape), spec)
    p.grad = torch.randn(shape)
    assert not fused.applies(p, spec, {"lr": 1e-3, "mode": "eco"})
    m, v = torch.zeros(shape), torch.zeros(shape)
    job = fused.adamw_job(p, p.grad, spec, m, v, None, step=1, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-9,
                          weight_decay=0.0, coef=0.0, inject=False)
    before = (p.codes.clone(), p.scale.clone())
    with pytest.raises(ValueError, match="two-level"):
        fused.run([job])
    assert torch.equal(before[0], p.codes) and torch.equal(before[1], p.scale) and not m.any()


def test_a_scale_of_the_wrong_size_is_refused_before_anything_is_modified():
    spec = F.QuantSpec.make("mxfp8")
    p = QuantizedTensor.from_float(torch.randn(4, 64), spec)
    codes = p.codes.clone()
    m, v = torch.zeros(4, 64), torch.zeros(4, 64)
    with pytest.raises(ValueError, match="scales holds 4 bytes, but a scale of 8 blocks"):
        ops.adamw_step_([p.codes], [p.scale[:4]], [torch.ones(4, 64)], [m], [v], *[[None]] * 6, ["mxfp8"],
                        ["e8m0_ceil"], [32], [1.0], [0.0], [1.0], [], [0], [], [], lr=1e-3, beta1=0.9, beta2=0.98,
                        eps=1e-9, weight_decay=0.0, inject=False, stochastic=False, state8_stochastic=False)
    assert torch.equal(codes, p.codes) and not m.any()


def test_mx_weights_in_a_model_take_the_kernel():
    """quantize_ with the MX / NVFP4 formats: every quantized weight goes to the kernel (one call per group)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    for name in ("mxfp8", "mxfp4", "nvfp4"):
        m = ecoptim.quantize_(copy.deepcopy(model), name)
        opt = ecoptim.AdamW(m.parameters(), lr=1e-3)
        m(torch.randn(4, 64)).square().mean().backward()
        for p in m.parameters():
            if isinstance(p, QuantizedTensor):
                assert fused.applies(p, p.spec, opt.param_groups[0])


# the subset of the matrix that the scalar and the AVX2 builds run in a fresh process (test_kernels'
# _in_another_build): every format and rounding, both optimizers, each mode, threads
_OTHER_BUILD_SCRIPT = (
    "import itertools, torch, test_mx_kernel as t\n"
    "from ecoptim import kernels\n"
    "assert kernels.vector_isa() == {isa!r}\n"
    "for name, rnd in itertools.product(('mxfp8', 'mxfp4', 'nvfp4', 'mxfp8-floor', 'fp4-absmax'),\n"
    "                                   ('nearest', 'stochastic')):\n"
    "    for case, mode in (('adamw', 'eco'), ('sgd-nesterov', 'eco'), ('adamw-bf16-states', 'naive'),\n"
    "                       ('adamw-8bit-states', 'eco'), ('adamw', 'master'), ('sgd', 'exact'), ('adamw', 'kahan')):\n"
    "        t.test_mx_and_nvfp4_fused_step_is_bit_identical_to_reference(case, name, rnd, mode)\n"
    "for threads in (2, 3):\n"
    "    t.test_mx_fused_threads_give_the_same_bits(threads, 'nvfp4', (300, 320))\n"
    "    t.test_mx_fused_threads_give_the_same_bits(threads, 'mxfp4', (300, 320))\n"
    "print('ok')\n")


@pytest.mark.parametrize("march,isa", [("x86-64", "scalar"), ("x86-64-v3", "avx2")])
def test_mx_formats_in_the_scalar_and_avx2_builds(tmp_path, march, isa):
    """Where this CPU has AVX-512 the tests above run the 16-lane sweeps; the 8-lane AVX2 ones and the portable
    scalar code (the vector sweeps' tails everywhere) are checked here."""
    if isa == "avx2" and kernels.vector_isa() not in ("avx2", "avx512"):
        pytest.skip("this CPU has no AVX2")
    cc = None
    if isa == "scalar":  # and a compiler without OpenMP: the thread team's own barriers (NVFP4's two passes)
        cc = tmp_path / "cc-without-openmp"
        cc.write_text(f"#!/bin/sh\ncase \"$*\" in *-fopenmp*) echo 'no OpenMP here' >&2; exit 1;; esac\n"
                      f"exec {kernels.compiler()} \"$@\"\n")
        cc.chmod(0o755)
        cc = str(cc)
    tk._in_another_build(tmp_path, march, _OTHER_BUILD_SCRIPT.format(isa=isa), cc=cc)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_mx_scales_at_the_ends_of_the_fp32_range(name, rounding):
    """Blocks near fp32's largest value (E8M0 exponents clamped at 127 - emax, where even the ceil rule clamps)
    and of fp32 subnormals (exponents clamped at -127, scales that are fp32 subnormals themselves)."""
    shape = (6, 64)
    spec = SPECS[name]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    w[0] *= 3e38 / w[0].abs().max()
    w[1] *= 1e-40
    w[2] *= 1e-44
    w[3, :32] *= 1e30
    for opt_cls, kw in (tk.CASES["adamw"], tk.CASES["sgd"]):
        lin = nn.Linear(shape[1], shape[0], bias=False)
        lin.weight = nn.Parameter(QuantizedTensor.from_float(w, spec))
        ref, fast = nn.Sequential(lin), copy.deepcopy(nn.Sequential(lin))
        o_ref = opt_cls(ref.parameters(), fused=False, rounding=rounding, **kw)
        o_fast = opt_cls(fast.parameters(), rounding=rounding, **kw)
        assert _applies(fast, o_fast)
        tk._run(ref, fast, o_ref, o_fast, shape, steps=3, scales=(1e-3, 1e-40, 0.0))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec,shape", [(F.QuantSpec(F.FP8_E4M3, F.PerTensor(), F.E8M0Scale("ceil")), (300, 301)),
                                        (F.QuantSpec(F.FP4_E2M1, F.PerRow(), F.E8M0Scale("floor")), (2, 70000)),
                                        (F.QuantSpec(F.FP4_E2M1, F.PerTensor(), F.E4M3TensorScale()), (64, 1000))])
def test_mx_scales_of_large_blocks(threads, spec, shape):
    """E8M0 scales over blocks larger than the kernel's in-cache limit (swept in ranges by all threads), and a
    per-tensor two-level scale (one block, at the limit's side)."""
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight = nn.Parameter(QuantizedTensor.from_float(torch.randn(shape), spec))
    ref, fast = nn.Sequential(lin), copy.deepcopy(nn.Sequential(lin))
    with tk._threads(threads):
        o_ref = ecoptim.AdamW(ref.parameters(), fused=False, rounding="stochastic", **tk.ADAMW)
        o_fast = ecoptim.AdamW(fast.parameters(), rounding="stochastic", **tk.ADAMW)
        assert _applies(fast, o_fast)
        tk._run(ref, fast, o_ref, o_fast, shape, steps=2)


@pytest.mark.parametrize("spec,shape", [(F.QuantSpec(F.FP4_E2M1, F.PerTensor()), (5, 7)),
                                        (F.QuantSpec(F.FP4_E2M1, F.PerTensor(), F.E4M3TensorScale()), (5, 7)),
                                        (F.QuantSpec(F.FP4_E2M1, F.PerTensor(), F.E8M0Scale("ceil")), (5, 7)),
                                        (F.QuantSpec(F.FP4_E2M1, F.PerRow(), F.E8M0Scale("floor")), (13, 46)),
                                        (F.QuantSpec(F.FP4_E2M1, F.PerRow(), F.E4M3TensorScale()), (13, 46))])
@pytest.mark.parametrize("case", ["adamw", "adamw-8bit-states-b8", "sgd"])
def test_mx_tails_and_odd_sizes(spec, shape, case):
    """Rows that are not a multiple of the vector width (scalar tails) and a packed tensor of odd size (its last
    byte's high nibble is padding, which both paths leave as the code of +0); 8-bit moments in blocks of 8, which
    tile none of these blocks, are decoded to fp32 around the kernel."""
    opt_cls, kw = tk.CASES[case]
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight = nn.Parameter(QuantizedTensor.from_float(_weights(shape), spec))
    ref, fast = nn.Sequential(lin), copy.deepcopy(nn.Sequential(lin))
    o_ref = opt_cls(ref.parameters(), fused=False, rounding="stochastic", **kw)
    o_fast = opt_cls(fast.parameters(), rounding="stochastic", **kw)
    assert _applies(fast, o_fast)
    tk._run(ref, fast, o_ref, o_fast, shape, steps=3)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nvfp4_with_8bit_moments_that_tile_its_blocks(rounding):
    """8-bit moments in blocks of 8 or 16 tile NVFP4's blocks of 16: the kernel reads and writes them in both
    passes' sweeps."""
    for case in ("adamw-8bit-states-b8", "adamw-8bit-sr-states"):
        opt_cls, kw = tk.CASES[case]
        shape = (24, 96)
        ref, fast, o_ref, o_fast = _pair("nvfp4", shape, opt_cls, rounding=rounding, **kw)
        p = next(fast.parameters())
        assert fused.state8_fits(p, p.spec, kw["state_dtype"].block_size)
        tk._run(ref, fast, o_ref, o_fast, shape, steps=3)
