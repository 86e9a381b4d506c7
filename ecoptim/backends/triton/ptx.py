"""The kernels compiled for an NVIDIA GPU without one: what the PTX says about their floating-point operations.

Triton's interpreter computes every operation exactly as written, so it cannot see what the GPU compiler does to
the kernels. The PTX can: with the launch options (``ops.LAUNCH_OPTIONS``) every fp32 multiply, add and subtract
must carry an explicit rounding mode (``mul.rn.f32``: ptxas never contracts those into an fma), the fmas must be
exactly the ones the kernels ask for (``tl.fma``: so many per element), division and square root must be the IEEE
forms (``div.rn.f32``, ``sqrt.rn.f32``), and nothing may flush subnormals but the ``floor`` of stochastic
rounding (``cvt.rmi.ftz``, whose result cannot differ: see ``codecs.round_stochastic``).

``python -m ecoptim.backends.triton.ptx`` compiles the variants of ``VARIANTS`` for sm_90 (ptxas ships with
triton) and prints, per variant, the counts of ``OPCODES`` and the elements each thread steps, as JSON;
``tests/test_triton.py`` checks them. Needs triton with its NVIDIA backend; must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import step
from .codecs import FORMAT_IDS, SCALE_IDS
from .ops import LAUNCH_OPTIONS

__all__ = ["VARIANTS", "OPCODES", "TARGET", "compile_ptx", "opcode_counts", "main"]

TARGET = GPUTarget("cuda", 90, 32)
BPP, TILE = 8, 128
# name -> (kernel, constexprs, fmas per element the kernel asks for)
_STEP_DEFAULTS = dict(SCALED=True, GRAD_BF16=False, STATE_BF16=False, SR=False, HAS_MASTER=False, HAS_CARRIED=False,
                      KAHAN=False, INJECT=False, FROM_M=False, HAS_WD=False, HAS_MOM=True, FIRST=False,
                      NESTEROV=False, SCALE=SCALE_IDS["absmax"], EMAX=0, BPP=BPP, TILE=TILE)
VARIANTS = {
    # lerp and addcmul
    "adamw-stats-fp8_e4m3": ("step", dict(PHASE=0, ADAMW=True, FMT=FORMAT_IDS["fp8_e4m3"]), 2),
    # + the injection (addcmul)
    "adamw-quantize-fp8_e4m3-sr-eco": ("step", dict(PHASE=1, ADAMW=True, FMT=FORMAT_IDS["fp8_e4m3"], SR=True,
                                                   INJECT=True), 3),
    "adamw-quantize-bf16-states-bf16": ("step", dict(PHASE=1, ADAMW=True, FMT=FORMAT_IDS["bf16"], SCALED=False,
                                                    STATE_BF16=True, GRAD_BF16=True, INJECT=True), 3),
    # weight decay, momentum, nesterov, the step, the injection
    "sgd-quantize-int4-sr-nesterov-kahan": ("step", dict(PHASE=1, ADAMW=False, FMT=FORMAT_IDS["int4"], SR=True,
                                                        HAS_WD=True, NESTEROV=True, INJECT=True, KAHAN=True), 5),
    "sgd-stats-int8-master": ("step", dict(PHASE=0, ADAMW=False, FMT=FORMAT_IDS["int8"], HAS_WD=True,
                                           HAS_MASTER=True), 3),
    "compensation-fp8_e5m2": ("compensation", dict(FMT=FORMAT_IDS["fp8_e5m2"], SCALED=True,
                                                   SCALE=SCALE_IDS["absmax"], EMAX=0, BPP=BPP, TILE=TILE), 0),
    # the MX formats: E8M0 scales (emax 2 for E2M1, 8 for E4M3), packed fp4 codes
    "adamw-quantize-mxfp4-sr-e8m0_ceil": ("step", dict(PHASE=1, ADAMW=True, FMT=FORMAT_IDS["mxfp4"], SR=True,
                                                      INJECT=True, SCALE=SCALE_IDS["e8m0_ceil"], EMAX=2), 3),
    "compensation-mxfp8-e8m0": ("compensation", dict(FMT=FORMAT_IDS["mxfp8"], SCALED=True, SCALE=SCALE_IDS["e8m0"],
                                                     EMAX=8, BPP=BPP, TILE=TILE), 0),
}
OPCODES = ("fma.rn.f32", "mul.rn.f32", "add.rn.f32", "sub.rn.f32", "div.rn.f32", "sqrt.rn.f32", "mul.f32",
           "add.f32", "sub.f32", "div.approx", "div.full", "sqrt.approx", "rcp.approx", "ex2.approx", "lg2.approx",
           "ftz")
_CODE_TYPES = {FORMAT_IDS["int8"]: "*i8", FORMAT_IDS["bf16"]: "*i16"}


def _signature(kind: str, consts: dict) -> dict:
    code = _CODE_TYPES.get(consts["FMT"], "*u8")
    scale = "*fp32" if consts["SCALE"] == SCALE_IDS["absmax"] else "*u8"
    if kind == "compensation":
        sig = dict(comp=code, new_comp_scales=scale, ebuf="*fp32", block_eamax="*fp32", block_bad="*i32",
                   num_blocks="i32", block_size="i32", ntiles="i32", fmax="i32")
    else:
        state = "*i16" if consts["STATE_BF16"] else "*fp32"
        sig = dict(codes=code, scales=scale, grad="*i16" if consts["GRAD_BF16"] else "*fp32", exp_avg=state,
                   exp_avg_sq=state, master="*fp32", carried="*fp32", comp=code, comp_scales=scale, ebuf="*fp32",
                   tile_amax="*fp32", tile_bad="*i32", block_amax="*fp32", block_bad="*i32", new_scales=scale,
                   num_blocks="i32", block_size="i32", ntiles="i32", **{name: "i32" for name in step.BIT_ARGS})
    sig.update({name: "constexpr" for name in consts})
    return sig


def compile_ptx(name: str) -> str:
    """The PTX of variant ``name`` compiled for ``TARGET`` with the launch options."""
    kind, consts, _ = VARIANTS[name]
    if kind == "step":
        consts = {**_STEP_DEFAULTS, **consts}
    fn = step.step_kernel if kind == "step" else step.compensation_kernel
    src = ASTSource(fn, _signature(kind, consts), consts)
    return triton.compile(src, target=TARGET, options=dict(LAUNCH_OPTIONS)).asm["ptx"]


def opcode_counts(ptx: str) -> dict[str, int]:
    """How many instructions of each of ``OPCODES`` (``ftz``: any instruction with a .ftz modifier)."""
    counts = {op: len(re.findall(r"(?<![\w.])" + re.escape(op) + r"(?![\w])", ptx)) for op in OPCODES if op != "ftz"}
    counts["ftz"] = len(re.findall(r"\.ftz\b", ptx))
    counts["floor_ftz"] = len(re.findall(r"\bcvt\.rmi\.ftz\.f32\.f32\b", ptx))
    return counts


def main() -> None:
    """Print every variant's opcode counts, fmas asked per element and elements per thread, as JSON."""
    per_thread = BPP * TILE // (32 * LAUNCH_OPTIONS["num_warps"])
    out = {name: dict(opcode_counts(compile_ptx(name)), fma_per_element=VARIANTS[name][2], elements=per_thread)
           for name in VARIANTS}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
