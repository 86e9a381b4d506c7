"""The one definition of the CPU kernel's argument structs, from which both sides are generated.

``ecoptim/csrc/eco_abi.h`` (the C side) is generated from the tables below by ``header()`` and committed;
``tests/test_ops.py`` regenerates it and checks it is identical, and the build refuses a header that is out of
date. The ctypes Structures (the Python side) are built from the same tables at import. ``ABI_HASH`` is a hash
of the generated text: the C library returns it from ``eco_abi_hash()``, and a library whose hash differs
(built from another definition) is not loaded.

One tensor's step is an ``eco_step_args``: a few named sub-structs, each holding one kind of argument.
"""
from __future__ import annotations

import ctypes
import hashlib
import textwrap
from pathlib import Path

__all__ = ["ENUMS", "STRUCTS", "ENTRY_POINTS", "HEADER_PATH", "ABI_HASH", "header", "write_header", "declare",
           "ctype_of", "Format", "ScaleFormat", "Dtype", "StateStorage", "Optimizer", "Weights", "Gradient", "Moments",
           "State8Codec", "ModeBuffers", "Hyper", "Result", "StepArgs"]

HEADER_PATH = Path(__file__).resolve().parents[2] / "csrc" / "eco_abi.h"

# name -> [(constant, value, comment)]
ENUMS: dict[str, list[tuple[str, int, str]]] = {
    "eco_format": [
        ("ECO_FORMAT_FP8_E4M3", 0, "fp8 codes (3 mantissa bits, bias 7, max 448)"),
        ("ECO_FORMAT_FP8_E5M2", 1, "fp8 codes (2 mantissa bits, bias 15, max 57344)"),
        ("ECO_FORMAT_INT8", 2, "int8 codes in [-127, 127]"),
        ("ECO_FORMAT_BF16", 3, "bf16 bits, unscaled (scales is NULL)"),
        ("ECO_FORMAT_INT4", 4, "two codes per byte, q + 8, element 2i in the low nibble (blocks start at even "
                               "indices)"),
        ("ECO_FORMAT_FP4_E2M1", 5, "fp4 codes (1 mantissa bit, bias 1, max 6; sign in bit 3), packed as INT4's"),
    ],
    "eco_scale_format": [
        ("ECO_SCALE_ABSMAX", 0, "fp32 X = absmax / format_max per block (formats.AbsmaxScale)"),
        ("ECO_SCALE_E8M0_FLOOR", 1, "one E8M0 byte per block, X = 2^(code - 127), OCP MX's floor rule"),
        ("ECO_SCALE_E8M0_CEIL", 2, "as ECO_SCALE_E8M0_FLOOR, the exponent raised where floor's would clamp"),
        ("ECO_SCALE_E4M3_TENSOR", 3, "E4M3 s_b per block, then fp32 s_t's 4 bytes: X = s_b * s_t (NVFP4)"),
    ],
    "eco_dtype": [
        ("ECO_DTYPE_FP32", 0, "float"),
        ("ECO_DTYPE_BF16", 1, "bfloat16 bits (uint16)"),
        ("ECO_DTYPE_FP16", 2, "float16 bits (uint16; the reductions only)"),
    ],
    "eco_state_storage": [
        ("ECO_STATE_FP32", 0, "moments in fp32"),
        ("ECO_STATE_BF16", 1, "moments in bf16"),
        ("ECO_STATE_EIGHT_BIT", 2, "8-bit block-wise moments (AdamW): codes + absmax, see eco_state8_codec"),
    ],
    "eco_optimizer": [
        ("ECO_OPTIMIZER_ADAMW", 0, "AdamW"),
        ("ECO_OPTIMIZER_SGD", 1, "SGD (momentum, dampening, nesterov)"),
    ],
}

# struct -> (comment, [(field, C type, comment)]); a type "T[n]" is an array, "T *" a pointer, an "eco_*" name a
# struct defined above it. Fields in C order.
STRUCTS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "eco_weights": ("the weight: its codes and per-block scales", [
        ("codes", "void *", "num_blocks * block_size elements in `format`, updated in place"),
        ("scales", "void *", "the num_blocks scales in `scale_format`'s layout, updated in place; NULL for "
                             "unscaled bf16"),
        ("fp8_table", "const float *", "fp8 formats: the fp32 value of each of the 256 codes (torch's decode)"),
        ("num_blocks", "int64_t", "blocks (rows, groups or the tensor), one scale each"),
        ("block_size", "int64_t", "elements per block"),
        ("format", "int32_t", "eco_format"),
        ("format_max", "float", "the format's largest finite value (the scale maps the block absmax onto it)"),
        ("scale_format", "int32_t", "eco_scale_format: how a block's scale is chosen and stored"),
    ]),
    "eco_gradient": ("the gradient, read once", [
        ("values", "const void *", "num_blocks * block_size elements"),
        ("dtype", "int32_t", "eco_dtype: fp32 or bf16"),
    ]),
    "eco_moments": ("the optimizer's moments, read and written once", [
        ("exp_avg", "void *", "AdamW's first moment, SGD's momentum buffer (NULL: SGD without momentum)"),
        ("exp_avg_sq", "void *", "AdamW's second moment (unused by SGD)"),
        ("storage", "int32_t", "eco_state_storage"),
    ]),
    "eco_state8_codec": ("8-bit moments (storage ECO_STATE_EIGHT_BIT; ecoptim/optim/state8.py is the definition): one "
                         "fp32 absmax per block_size elements (a power of two >= 8 dividing the weight's "
                         "block_size) and the codec's search tables (state8.search_tables)", [
        ("exp_avg_absmax", "float *", "the first moment's block absmax, updated in place"),
        ("exp_avg_sq_absmax", "float *", "the second moment's block absmax, updated in place"),
        ("signed_magnitudes", "const float *", "the first moment's 128 magnitudes (+ an Inf pad)"),
        ("unsigned_magnitudes", "const float *", "the second moment's 256 magnitudes (+ an Inf pad)"),
        ("signed_buckets_nearest", "const int32_t *", "per bucket: (midpoints below) << 17 | boundary"),
        ("signed_buckets_stochastic", "const int32_t *", "per bucket: (entries below) << 17 | boundary"),
        ("unsigned_buckets_nearest", "const int32_t *", "as signed_buckets_nearest, second moment"),
        ("unsigned_buckets_stochastic", "const int32_t *", "as signed_buckets_stochastic, second moment"),
        ("block_size", "int64_t", "elements per absmax"),
        ("num_buckets", "int32_t", "entries of each bucket table"),
        ("stochastic", "int32_t", "1: stochastic rounding of the moments with the keys below"),
        ("exp_avg_key", "uint32_t[2]", "the first moment's stochastic-rounding key"),
        ("exp_avg_sq_key", "uint32_t[2]", "the second moment's stochastic-rounding key"),
    ]),
    "eco_mode_buffers": ("the buffers of modes 'master', 'exact' and 'kahan' (NULL where unused)", [
        ("master", "float *", "'master': fp32 master weights, read instead of the codes and written with w_til"),
        ("carried_error", "float *", "'exact': fp32 error, added to the decoded weight, replaced by w_til - w_hat"),
        ("compensation_codes", "void *", "'kahan': the compensation, stored like the weight (codes in its format), "
                                         "added to w_til and replaced by the rounded error; blocks of at most "
                                         "65536 elements"),
        ("compensation_scales", "void *", "'kahan': the compensation's num_blocks scales, stored like the weight's "
                                          "(NULL if unscaled)"),
    ]),
    "eco_hyper": ("the step's scalars, already rounded to fp32 as ATen rounds Python scalars", [
        ("optimizer", "int32_t", "eco_optimizer"),
        ("stochastic", "int32_t", "1: stochastic rounding of the weight with sr_key, 0: to nearest"),
        ("inject", "int32_t", "1: ECO's error injection into the momentum (mode 'eco')"),
        ("sr_key", "uint32_t[2]", "the weight's stochastic-rounding key (rng.draw_key)"),
        ("grad_scale", "float", "every gradient element is multiplied by it as it is read (a pending clip; 1: none)"),
        ("injection_coef", "float", "ECO's injection coefficient (eco_adamw_coef / eco_sgd_coef)"),
        ("decay_factor", "float", "AdamW: 1 - lr * weight_decay"),
        ("one_minus_beta1", "float", "AdamW: the lerp weight of the first moment"),
        ("beta2", "float", "AdamW"),
        ("one_minus_beta2", "float", "AdamW"),
        ("bias_correction2_sqrt", "float", "AdamW: sqrt(1 - beta2^step)"),
        ("eps", "float", "AdamW"),
        ("neg_step_size", "float", "AdamW: -lr / (1 - beta1^step)"),
        ("weight_decay", "float", "SGD"),
        ("momentum", "float", "SGD"),
        ("one_minus_dampening", "float", "SGD"),
        ("neg_lr", "float", "SGD: -lr"),
        ("nesterov", "int32_t", "SGD"),
        ("first_step", "int32_t", "SGD: the momentum buffer is written whole (torch's buf = g)"),
    ]),
    "eco_result": ("what the step reports", [
        ("nonfinite_blocks", "int64_t", "blocks whose w_til held NaN/Inf: left exactly as they were"),
    ]),
    "eco_step_args": ("one tensor's step", [
        ("weights", "eco_weights", ""),
        ("gradient", "eco_gradient", ""),
        ("moments", "eco_moments", ""),
        ("state8", "eco_state8_codec", ""),
        ("modes", "eco_mode_buffers", ""),
        ("hyper", "eco_hyper", ""),
        ("result", "eco_result", ""),
    ]),
}

# the library's entry points: name -> (result type, [(argument, C type)])
ENTRY_POINTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "eco_step_many": ("int32_t", [("args", "eco_step_args *const *"), ("n", "int32_t"), ("nthreads", "int32_t")]),
    "eco_uniform": ("void", [("k1", "uint32_t"), ("k2", "uint32_t"), ("n", "int64_t"), ("out", "float *")]),
    "eco_all_finite": ("int32_t", [("ptrs", "void *const *"), ("numels", "const int64_t *"),
                                   ("dtypes", "const int32_t *"), ("n", "int32_t"), ("nthreads", "int32_t")]),
    "eco_sumsq": ("int32_t", [("ptrs", "void *const *"), ("numels", "const int64_t *"), ("dtypes", "const int32_t *"),
                              ("n", "int32_t"), ("nthreads", "int32_t"), ("out", "double *")]),
    "eco_state8": ("void", [("x", "float *"), ("codes", "uint8_t *"), ("absmax", "float *"), ("table", "const float *"),
                            ("brtn", "const int32_t *"), ("bsr", "const int32_t *"), ("nbkt", "int32_t"),
                            ("n", "int64_t"), ("bs", "int64_t"), ("ntab", "int32_t"), ("is_signed", "int32_t"),
                            ("sr", "int32_t"), ("k1", "uint32_t"), ("k2", "uint32_t"), ("decode", "int32_t"),
                            ("nthreads", "int32_t")]),
    "eco_vector_lanes": ("int32_t", []),
    "eco_abi_hash": ("uint32_t", []),
}


def _comment(text: str, indent: str = "") -> list[str]:
    lines = textwrap.wrap(text, 116 - len(indent), initial_indent="/* ", subsequent_indent=" * ")
    lines[-1] += " */"
    return [indent + ln for ln in lines]


def _declaration(ctype: str, name: str) -> str:
    base, _, count = ctype.partition("[")
    return f"{base}{'' if base.endswith('*') else ' '}{name}" + (f"[{count}" if count else "")


def _body() -> str:
    out = []
    for name, consts in ENUMS.items():
        out.append(f"/* {name} */")
        out += [f"#define {c} {v} /* {doc} */" for c, v, doc in consts]
        out.append("")
    for name, (doc, fields) in STRUCTS.items():
        out += _comment(f"{name}: {doc}")
        out.append("typedef struct {")
        for field, ctype, fdoc in fields:
            line = f"    {_declaration(ctype, field)};"
            if fdoc and len(f"{line} /* {fdoc} */") <= 120:
                line += f" /* {fdoc} */"
            elif fdoc:
                out += _comment(fdoc, "    ")
            out.append(line)
        out.append(f"}} {name};")
        out.append("")
    for name, (res, args) in ENTRY_POINTS.items():
        params = [_declaration(t, a) for a, t in args] or ["void"]
        line = f"{res} {name}("
        for k, param in enumerate(params):  # broken after a comma where the line would pass 116 characters
            piece = param + (", " if k + 1 < len(params) else ");")
            if len(line) + len(piece.rstrip()) > 116:
                out.append(line.rstrip())
                line = "    "
            line += piece
        out.append(line)
    return "\n".join(out) + "\n"


ABI_HASH = int(hashlib.sha256(_body().encode()).hexdigest()[:8], 16)


def header() -> str:
    """The text of ``ecoptim/csrc/eco_abi.h``."""
    return ("/* Generated by ecoptim/backends/cpu/abi.py from its tables: edit those and regenerate\n"
            " * (ecoptim.backends.cpu.abi.write_header()), never this file. */\n"
            "#ifndef ECO_ABI_H\n#define ECO_ABI_H\n#include <stdint.h>\n\n"
            f"#define ECO_ABI_HASH 0x{ABI_HASH:08x}u\n\n" + _body() + "\n#endif\n")


_CTYPES = {"int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "uint32_t": ctypes.c_uint32,
           "float": ctypes.c_float, "double": ctypes.c_double, "void": None}


def ctype_of(ctype: str):
    """The ctypes type of a C type written as in the tables (any pointer is a c_void_p)."""
    base, _, count = ctype.partition("[")
    if base.strip().endswith("*"):
        t = ctypes.c_void_p
    else:
        t = _STRUCT_TYPES.get(base.strip()) or _CTYPES[base.strip()]
    return t * int(count.rstrip("]")) if count else t


_STRUCT_TYPES: dict[str, type] = {}


def _make_struct(name: str, py_name: str) -> type:
    doc, fields = STRUCTS[name]
    cls = type(py_name, (ctypes.Structure,), {"_fields_": [(f, ctype_of(t)) for f, t, _ in fields],
                                              "__doc__": f"``{name}`` of ecoptim/csrc/eco_abi.h: {doc}."})
    _STRUCT_TYPES[name] = cls
    return cls


Weights = _make_struct("eco_weights", "Weights")
Gradient = _make_struct("eco_gradient", "Gradient")
Moments = _make_struct("eco_moments", "Moments")
State8Codec = _make_struct("eco_state8_codec", "State8Codec")
ModeBuffers = _make_struct("eco_mode_buffers", "ModeBuffers")
Hyper = _make_struct("eco_hyper", "Hyper")
Result = _make_struct("eco_result", "Result")
StepArgs = _make_struct("eco_step_args", "StepArgs")


class _Enum:
    def __init__(self, name: str, prefix: str):
        for const, value, _ in ENUMS[name]:
            setattr(self, const[len(prefix):], value)


Format = _Enum("eco_format", "ECO_FORMAT_")
ScaleFormat = _Enum("eco_scale_format", "ECO_SCALE_")
Dtype = _Enum("eco_dtype", "ECO_DTYPE_")
StateStorage = _Enum("eco_state_storage", "ECO_STATE_")
Optimizer = _Enum("eco_optimizer", "ECO_OPTIMIZER_")


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of ``lib``'s entry points from ``ENTRY_POINTS``."""
    for name, (res, args) in ENTRY_POINTS.items():
        fn = getattr(lib, name)
        fn.argtypes = [ctype_of(t) for _, t in args]
        fn.restype = ctype_of(res)
    return lib


def write_header() -> None:
    """Regenerate ``ecoptim/csrc/eco_abi.h`` from the tables."""
    HEADER_PATH.write_text(header())


if __name__ == "__main__":
    write_header()
    print(f"wrote {HEADER_PATH} (ABI hash 0x{ABI_HASH:08x})")
