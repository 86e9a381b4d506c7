"""The kernel's vector helpers against the scalar definitions they must equal, bit for bit, over whole input
ranges: ``tests/vector_helpers.c``, built with the kernel's own compiler and flags (its widest vector ISA on
this CPU, and the AVX2 one), checks the clamp for every finite fp32, stochastic rounding and the code writes
for every grid value and a spread of values across every exponent, and the E4M3 decode with its scale folded
in for every code.
The optimizer-level tests (``test_kernels.py``) reach only the inputs a few steps produce."""
import os
import subprocess

import pytest

from ecoptim import kernels
from ecoptim.backends.cpu import build as cpu_build

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler")

CHECKS = {"clamp", "round_stochastic", "store_codes", "e4m3_decode"}


@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_vector_helpers_equal_their_definitions(tmp_path, monkeypatch, march):
    if march != "native" and kernels.vector_isa() not in ("avx2", "avx512"):
        pytest.skip("not an x86 CPU with a vector ISA")
    monkeypatch.setenv("ECOPTIM_KERNEL_MARCH", march)
    exe = tmp_path / "vector_helpers"
    here = os.path.dirname(__file__)
    built = subprocess.run([kernels.compiler(), *cpu_build.flags(), "-I", str(cpu_build.SOURCE_DIR), "-o",
                            str(exe), os.path.join(here, "vector_helpers.c"), "-lm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=600).stdout.split("\n")
    if out[0] == "novec":
        pytest.skip("this build has no vector layer (the scalar code is the definition)")
    results = {name: (int(n), int(bad)) for name, n, bad in (line.split() for line in out if line)}
    assert set(results) == CHECKS
    for name, (n, bad) in results.items():
        assert n > 0 and bad == 0, f"{name}: {bad} of {n} inputs differ from the definition"
