/* The vector layer: which ISA the sweeps' vector code uses, and the helpers common to every ISA.
 *
 * ECO_VEC is 1 where the build has AVX2/FMA/F16C (vec_avx2.h, 8 lanes) or also AVX-512 F/BW/DQ/VL
 * (vec_avx512.h, 16 lanes), else 0: the sweeps then run their scalar loops only (the same IEEE operations one
 * element at a time; those loops also take every vector build's tails). */
#ifndef ECO_VEC_H
#define ECO_VEC_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ECO_AVX2 1
#else
#define ECO_AVX2 0
#endif
#if ECO_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define ECO_AVX512 1
#else
#define ECO_AVX512 0
#endif
#define ECO_VEC ECO_AVX2

#if ECO_VEC
/* The vector layer: VL lanes of the widest ISA the library is built for (AVX-512: 16 lanes, AVX2: 8) under
 * one set of names, so that the sweeps below are written once. A comparison gives a vm: a mask register on
 * AVX-512, a vector of all-ones / all-zero lanes on AVX2; vf_maskz(m, x) is x where m holds, else +0 (as
 * AND-ing with the AVX2 mask gives), vf_blend(a, b, m) is b where m holds, else a. Each name is the same IEEE
 * (or integer) operation in both ISAs, so both builds give the same bits as the scalar code; tests/
 * test_kernels.py builds and checks each one this CPU can run. */

#if ECO_AVX512
#include "vec_avx512.h"
#else
#include "vec_avx2.h"
#endif

/* Prefetch elements [j, j + n) of an array of esz-byte elements, one 64-byte line at a time. The sweeps run
 * on in-cache data, so memory would idle while they compute: each sweep requests part of the next block's
 * inputs (A the gradient and the first moment, B the second moment and the codes), which keeps it busy
 * through both. The lines are requested into L2, not L1 (PF_HINT): a request into L1 holds one of the core's
 * few L1 miss buffers until its line arrives from memory, which caps the lines in flight per core, and a
 * block's streams and scratch (about 36 KB for an fp32-state row of 1280) do not fit a 32 KB L1 anyway; from L2
 * the sweeps' loads are short waits that out-of-order execution hides (benchmarks/kernel_ab.py compares
 * builds side by side). */
#define PF_HINT _MM_HINT_T1
static inline __attribute__((always_inline)) void prefetch_range(const void *p, int64_t j, int64_t n, const int esz) {
    const char *c = (const char *)p + j * esz;
    for (int64_t o = 0; o < n * esz; o += 64) _mm_prefetch(c + o, PF_HINT);
}

/* a / b, correctly rounded, for a divisor b shared by the whole block (rinv = RN(1/b)): q0 = a*rinv is within
 * one ulp of a/b, the residual a - b*q0 is exact in an fma, and one correction q0 + r*rinv rounds to exactly
 * RN(a/b) (Markstein's theorem). Two fmas and a multiply instead of a divide: the divider is the bottleneck.
 * The theorem needs a normal quotient and an exact (normal) residual; callers establish that for the whole
 * block beforehand (markstein_ok, and AdamW's sqrt(v)/sqrt(bc2) below) or use a true division. A zero a gives
 * +0 (the sign of -0 is lost; callers that need it take it from a). */
static inline vf v_div_mk(vf a, vf b, vf rinv) {
    const vf q0 = vf_mul(a, rinv);
    return vf_fmadd(vf_fnmadd(q0, b, a), rinv, q0);
}
#endif /* ECO_VEC */
#endif
