/* Reductions over the gradients, each one threaded read pass: eco_all_finite (may the step go ahead?) and
 * eco_sumsq (the gradient norm of QuantOptimizer.clip_grad_norm_). dtypes are eco_dtype values. */
#include <stdint.h>
#include <stdlib.h>
#include "codecs.h"
#include "eco_abi.h"
#include "team.h"
#include "vec.h"

/* All gradients finite? One threaded read pass (the optimizer must decide to skip a step before touching  */
/* anything). dtypes: 0 fp32, 1 bf16.                                                                     */
typedef struct {
    void *const *ptrs;
    const int64_t *numels;
    const int32_t *dtypes;
    int32_t n, part, parts;
    int bad;
} finite_work;

static int finite_range(const void *p, int64_t lo, int64_t hi, int bf) {
    if (bf) {
        const uint16_t *h = (const uint16_t *)p;
        int bad = 0;
        for (int64_t i = lo; i < hi; i++) bad |= (h[i] & 0x7F80) == 0x7F80;
        return bad;
    }
    const uint32_t *u = (const uint32_t *)p;
    int64_t i = lo;
    int bad = 0;
#if ECO_AVX2
    const __m256i em = _mm256_set1_epi32(0x7F800000);
    __m256i acc = _mm256_setzero_si256();
    for (; i + 32 <= hi; i += 32) {
        for (int k = 0; k < 4; k++) {
            __m256i x = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(u + i + 8 * k)), em);
            acc = _mm256_or_si256(acc, _mm256_cmpeq_epi32(x, em));
        }
    }
    bad = !_mm256_testz_si256(acc, acc);
#endif
    for (; i < hi; i++) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
    return bad;
}

static void *finite_worker(void *p) {
    finite_work *w = (finite_work *)p;
    for (int32_t t = 0; t < w->n && !w->bad; t++) {
        int64_t n = w->numels[t];
        int64_t per = (n + w->parts - 1) / w->parts;
        int64_t lo = per * w->part, hi = lo + per < n ? lo + per : n;
        if (lo < hi) w->bad |= finite_range(w->ptrs[t], lo, hi, w->dtypes[t]);
    }
    return NULL;
}

/* 1 if every element of every tensor is finite, else 0 */
int32_t eco_all_finite(void *const *ptrs, const int64_t *numels, const int32_t *dtypes, int32_t n, int32_t nthreads) {
    int nt = nthreads < 1 ? 1 : (nthreads > ECO_MAX_THREADS ? ECO_MAX_THREADS : nthreads);
    int64_t total = 0;
    for (int32_t t = 0; t < n; t++) total += numels[t];
    if (total < 262144) nt = 1; /* one core reads this much faster than a thread starts */
    finite_work ws[ECO_MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        ws[t].ptrs = ptrs; ws[t].numels = numels; ws[t].dtypes = dtypes; ws[t].n = n;
        ws[t].part = t; ws[t].parts = nt; ws[t].bad = 0;
    }
    eco_run_parallel(finite_worker, ws, sizeof(finite_work), nt);
    int bad = 0;
    for (int t = 0; t < nt; t++) bad |= ws[t].bad;
    return !bad;
}

/* Sum of squares of gradients, in double (QuantOptimizer.clip_grad_norm_): one threaded read pass that also */
/* tells whether every element is finite (x*x is exact in double and cannot overflow for any fp32/bf16/fp16 */
/* x, so the sum is finite iff every element is). Deterministic whatever the thread count and build: each     */
/* tensor is cut into chunks of NORM_CHUNK elements; element i of a chunk goes to lane i % 16 (sequential    */
/* sums, the same in the AVX2 and the scalar code), the lanes are added 0..15, the chunks in order.         */
#define NORM_CHUNK 65536
typedef struct {
    void *const *ptrs;
    const int64_t *numels, *cfirst; /* cfirst[t]: number of the tensor's first chunk (cfirst[n]: total) */
    const int32_t *dtypes;          /* 0 fp32, 1 bf16, 2 fp16 */
    int32_t n;
    int64_t *next;
    double *chunk;                  /* out: one sum per chunk */
} sumsq_work;

static inline float ld_any(const void *p, int64_t i, int dt) {
    if (dt != 2) return ld_scalar(p, i, dt);
    /* fp16 -> fp32, exactly (subnormals, inf, NaN) */
    const uint16_t h = ((const uint16_t *)p)[i];
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, mant = h & 0x3FF;
    if (e == 0x1F) return bits_f(sign | 0x7F800000u | (mant << 13));
    if (e == 0) { const float f = (float)mant * 0x1p-24f; return sign ? -f : f; }
    return bits_f(sign | ((e + 112) << 23) | (mant << 13));
}

static double sumsq_range(const void *p, int64_t lo, int64_t hi, int dt) {
    double acc[16] = {0};
    int64_t i = lo;
#if ECO_AVX2
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 16 <= hi; i += 16) {
        __m256 x, y;
        if (dt == 2) {
            x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
            y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i + 8)));
        } else if (dt == 1) { /* bf16: the top halves of fp32 values */
            x = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
            y = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i + 8))), 16));
        } else {
            x = _mm256_loadu_ps((const float *)p + i);
            y = _mm256_loadu_ps((const float *)p + i + 8);
        }
        const __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
        const __m256d x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        const __m256d y0 = _mm256_cvtps_pd(_mm256_castps256_ps128(y));
        const __m256d y1 = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
        a0 = _mm256_add_pd(a0, _mm256_mul_pd(x0, x0)); /* the product is exact: one rounding, as in the scalar sum */
        a1 = _mm256_add_pd(a1, _mm256_mul_pd(x1, x1));
        a2 = _mm256_add_pd(a2, _mm256_mul_pd(y0, y0));
        a3 = _mm256_add_pd(a3, _mm256_mul_pd(y1, y1));
    }
    _mm256_storeu_pd(acc, a0);
    _mm256_storeu_pd(acc + 4, a1);
    _mm256_storeu_pd(acc + 8, a2);
    _mm256_storeu_pd(acc + 12, a3);
#endif
    for (; i < hi; i++) {
        const double x = (double)ld_any(p, i, dt);
        acc[(i - lo) & 15] += x * x;
    }
    double s = 0.0;
    for (int k = 0; k < 16; k++) s += acc[k];
    return s;
}

static void *sumsq_worker(void *p) {
    sumsq_work *w = (sumsq_work *)p;
    const int64_t total = w->cfirst[w->n];
    for (int32_t t = 0;;) {
        const int64_t c = __atomic_fetch_add(w->next, 1, __ATOMIC_RELAXED);
        if (c >= total) break;
        while (c >= w->cfirst[t + 1]) t++; /* a thread's chunks come in increasing order */
        const int64_t lo = (c - w->cfirst[t]) * NORM_CHUNK, n = w->numels[t];
        w->chunk[c] = sumsq_range(w->ptrs[t], lo, lo + NORM_CHUNK < n ? lo + NORM_CHUNK : n, w->dtypes[t]);
    }
    return NULL;
}

/* out[t] = sum of the squares of tensor t's elements (NaN/Inf if it holds any). Returns 0, or -1 if memory
 * could not be allocated. */
int32_t eco_sumsq(void *const *ptrs, const int64_t *numels, const int32_t *dtypes, int32_t n, int32_t nthreads,
              double *out) {
    int64_t *cfirst = (int64_t *)malloc(sizeof(int64_t) * ((size_t)n + 1)), next = 0;
    if (!cfirst) return -1;
    cfirst[0] = 0;
    for (int32_t t = 0; t < n; t++) cfirst[t + 1] = cfirst[t] + (numels[t] + NORM_CHUNK - 1) / NORM_CHUNK;
    double *chunk = (double *)malloc(sizeof(double) * (size_t)(cfirst[n] > 0 ? cfirst[n] : 1));
    if (!chunk) { free(cfirst); return -1; }
    int nt = nthreads < 1 ? 1 : (nthreads > ECO_MAX_THREADS ? ECO_MAX_THREADS : nthreads);
    if (cfirst[n] < 4) nt = 1; /* one core reads this much faster than a thread starts */
    sumsq_work ws[ECO_MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        sumsq_work w = {ptrs, numels, cfirst, dtypes, n, &next, chunk};
        ws[t] = w;
    }
    eco_run_parallel(sumsq_worker, ws, sizeof(sumsq_work), nt);
    for (int32_t t = 0; t < n; t++) {
        double s = 0.0;
        for (int64_t c = cfirst[t]; c < cfirst[t + 1]; c++) s += chunk[c];
        out[t] = s;
    }
    free(chunk);
    free(cfirst);
    return 0;
}
