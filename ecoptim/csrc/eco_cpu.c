/* ecoptim CPU kernels: one fused pass per block (row / group / tensor) for quantized-weight AdamW and SGD.
 *
 * Each block is processed in two sweeps over data that stays in L1/L2:
 *   sweep A  dequantize -> optimizer update -> w_til and the new moments (kept in a block-sized fp32 scratch;
 *            nothing in memory is written) + block absmax and finiteness
 *   sweep B  new scale -> round (RTN or SR) -> codes; e = w_til - w_hat; ECO injection into the momentum;
 *            the moments written back
 * so memory sees every stored byte read once and written once, and a block whose update is NaN/Inf is left
 * exactly as it was.
 *
 * Numerics: every operation is the IEEE operation ATen's CPU kernels perform for the reference path
 * (ecoptim/optim/adamw.py, sgd.py, codec.py, rounding.py), in the same order, with fused multiply-adds
 * exactly where ATen's vectorised kernels use them (lerp, addcmul), and none elsewhere: the file is built
 * with -ffp-contract=off so the compiler cannot add any. Square roots are IEEE (the reference uses
 * adamw.sqrt_rn for quantized weights because torch.sqrt on fp32 is not correctly rounded). Divisions by a
 * per-block constant use a reciprocal and one fma correction that provably gives the IEEE quotient (see
 * v_div_mk) where the block's values meet the theorem's conditions, and a true division elsewhere.
 * tests/test_kernels.py checks bit equality of codes, scales and states.
 * Stochastic rounding uses the counter-based uniforms of ecoptim/rng.py (same hash, same element index).
 *
 * Layout: scalar helpers; the vector layer and its helpers (AVX-512: 16 lanes, else AVX2/FMA/F16C: 8; the scalar
 * code handles tails and other CPUs);
 * sweep A (AdamW, SGD); sweep B; dispatch on dtypes/format; the thread team; the gradient finiteness check.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ECO_AVX2 1
#else
#define ECO_AVX2 0
#endif
/* the sweeps' vector code (see "The vector layer"): 16 lanes where the CPU has AVX-512 F/BW/DQ/VL, else 8 */
#if ECO_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define ECO_AVX512 1
#else
#define ECO_AVX512 0
#endif
#define ECO_VEC ECO_AVX2

#define FMT_E4M3 0
#define FMT_E5M2 1
#define FMT_INT8 2
#define FMT_BF16 3 /* unscaled bf16 weights: codes are the bf16 bits, scale is NULL */
#define FMT_INT4 4 /* two codes per byte, q + 8, element 2i in the low nibble (blocks start at even indices) */

typedef struct {
    void *codes;          /* fp8 (uint8 bits), int8 or bf16 (uint16 bits), numel elements */
    float *scale;         /* nb scales, updated in place; NULL for bf16 (unscaled) */
    const void *grad;     /* fp32 or bf16 */
    void *m;              /* first moment / momentum buffer: fp32 or bf16 */
    void *v;              /* AdamW second moment: fp32 or bf16 (unused by SGD) */
    const float *lut;     /* 256-entry code -> fp32 table for fp8 formats (torch's own decode) */
    int64_t nb, bs;       /* blocks and block size: numel = nb * bs */
    int32_t fmt, grad_bf16, state_bf16, inject, stochastic;
    int32_t optimizer;    /* 0 AdamW, 1 SGD (momentum, dampening, nesterov below) */
    int32_t nesterov, first_step;
    float fmax;
    /* AdamW scalars (already rounded to fp32, as ATen does with Python scalars) */
    float decay, w1, b2, omb2, bc2s, eps, neg_step, coef;
    /* SGD scalars */
    float wd, mom, omd, neg_lr;
    uint32_t k1, k2;      /* stochastic-rounding key (drawn from the optimizer's torch.Generator) */
    int64_t nonfinite;    /* out: blocks whose w_til held NaN/Inf (left exactly as they were) */
    /* 8-bit moments (state_bf16 == 2, AdamW; ecoptim/optim/state8.py): m and v hold codes, with one fp32
     * absmax per s8bs elements (a power of two >= 8 dividing bs); the codec's tables (see s8_encode: t7 and
     * the buckets b7 for m, t8/b8 for v); s8sr: stochastic rounding with keys mk*, vk* */
    float *m_absmax, *v_absmax;
    const float *t7, *t8;
    const int32_t *b7rtn, *b7sr, *b8rtn, *b8sr;
    int64_t s8bs;
    int32_t nbkt, s8sr;
    uint32_t mk1, mk2, vk1, vk2;
    /* mode 'master': the fp32 master weights, read instead of the codes and written with w_til; mode 'exact':
     * the fp32 carried error, added to the decoded weights and replaced by w_til - w_hat (NULL otherwise) */
    float *master, *err;
    /* every gradient element is multiplied by gscale as it is read (1: exact, x * 1 == x): the clipping
     * factor of QuantOptimizer.clip_grad_norm_, folded into the step instead of a pass that rewrites the grads */
    float gscale;
    /* mode 'kahan': the compensation, stored like the weight (codes in its format, nb scales or NULL), added to
     * w_til before the rounding and replaced by the rounded error (sweep C); NULL otherwise. Blocks of at most
     * SPLIT elements only (the error must stay in the block's scratch). */
    void *comp;
    float *comp_scale;
} eco_args;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* c10::BFloat16's round-to-nearest-even, NaN -> 0x7FC0 */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline float uniform(uint32_t k1, uint32_t k2, uint64_t idx) {
    uint32_t h = mix32((uint32_t)idx ^ k1);
    h = mix32(h ^ (k2 + (uint32_t)(idx >> 32)));
    return (float)(h >> 8) * 0x1p-24f;
}

static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* element j of an fp32 (bf == 0) or bf16 (bf == 1) array, as fp32 */
static inline float ld_scalar(const void *p, int64_t j, const int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

/* code j as its exact fp32 value (fp8 through torch's own decode table) */
static inline float decode_scalar(const void *codes, const float *lut, int64_t j, const int fmt) {
    const uint8_t *c = (const uint8_t *)codes;
    if (fmt == FMT_INT8) return (float)((const int8_t *)c)[j];
    if (fmt == FMT_BF16) return bf16_to_f32(((const uint16_t *)c)[j]);
    if (fmt == FMT_INT4) return (float)((int)((c[j >> 1] >> (4 * (j & 1))) & 0xF) - 8);
    return lut[c[j]];
}
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }


#if ECO_VEC
/* The vector layer: VL lanes of the widest ISA the library is built for (AVX-512: 16 lanes, AVX2: 8) under
 * one set of names, so that the sweeps below are written once. A comparison gives a vm: a mask register on
 * AVX-512, a vector of all-ones / all-zero lanes on AVX2; vf_maskz(m, x) is x where m holds, else +0 (as
 * AND-ing with the AVX2 mask gives), vf_blend(a, b, m) is b where m holds, else a. Each name is the same IEEE
 * (or integer) operation in both ISAs, so both builds give the same bits as the scalar code; tests/
 * test_kernels.py builds and checks each one this CPU can run. */
#if ECO_AVX512
#define VL 16
typedef __m512 vf;
typedef __m512i vi;
typedef __mmask16 vm;
#define vf_set1 _mm512_set1_ps
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_add _mm512_add_ps
#define vf_sub _mm512_sub_ps
#define vf_mul _mm512_mul_ps
#define vf_div _mm512_div_ps
#define vf_fmadd _mm512_fmadd_ps
#define vf_fnmadd _mm512_fnmadd_ps
#define vf_sqrt _mm512_sqrt_ps
#define vf_min _mm512_min_ps
#define vf_max _mm512_max_ps
#define vf_floor _mm512_floor_ps
#define vf_rint(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vf_and _mm512_and_ps
#define vf_or _mm512_or_ps
#define vf_xor _mm512_xor_ps
#define vf_andnot _mm512_andnot_ps
#define vf_lt(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_LT_OQ)
#define vf_gt(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_GT_OQ)
#define vf_isnan(a) _mm512_cmp_ps_mask((a), (a), _CMP_UNORD_Q)
#define vf_maskz(m, x) _mm512_maskz_mov_ps((m), (x))
#define vf_blend(a, b, m) _mm512_mask_blend_ps((m), (a), (b))
#define vf_of_i _mm512_cvtepi32_ps
#define vi_of_f _mm512_cvtps_epi32
#define vf_cast _mm512_castsi512_ps
#define vi_cast _mm512_castps_si512
#define vi_set1 _mm512_set1_epi32
#define vi_zero _mm512_setzero_si512
#define vi_and _mm512_and_si512
#define vi_or _mm512_or_si512
#define vi_xor _mm512_xor_si512
#define vi_andnot _mm512_andnot_si512
#define vi_add _mm512_add_epi32
#define vi_sub _mm512_sub_epi32
#define vi_mullo _mm512_mullo_epi32
#define vi_srli _mm512_srli_epi32
#define vi_slli _mm512_slli_epi32
#define vi_max _mm512_max_epi32
#define vi_min _mm512_min_epi32
#define vi_minu _mm512_min_epu32
#define vi_eq(a, b) _mm512_cmpeq_epi32_mask((a), (b))
#define vi_gt(a, b) _mm512_cmpgt_epi32_mask((a), (b))
#define vi_neg(a) _mm512_movepi32_mask(a) /* the lanes whose sign bit is set */
#define vi_maskz(m, x) _mm512_maskz_mov_epi32((m), (x))
#define vi_blend(a, b, m) _mm512_mask_blend_epi32((m), (a), (b))
#define vm_xor(a, b) ((vm)((a) ^ (b)))
#define vi_gather(base, idx) _mm512_i32gather_epi32((idx), (base), 4)
#define vf_gather(base, idx) _mm512_i32gather_ps((idx), (base), 4)
static inline vi vi_iota(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
static inline uint32_t vi_hmaxu(vi x) { return _mm512_reduce_max_epu32(x); }
static inline uint32_t vi_hminu(vi x) { return _mm512_reduce_min_epu32(x); }
/* VL bytes / halfwords widened to 32-bit lanes, and narrowed back (the lanes hold values that fit) */
static inline vi vi_ld_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vi_ld_i8(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vi_ld_u16(const uint16_t *p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
}
static inline void vi_st_u8(uint8_t *p, vi x) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(x)); }
#define vi_st_i8 vi_st_u8 /* truncation keeps the two's complement byte */
static inline void vi_st_u16(uint16_t *p, vi x) { _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(x)); }
/* e5m2 codes are the top bytes of fp16 values (the F16C conversion handles inf/NaN) */
static inline vf v_e5m2(const uint8_t *p) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8));
}
/* VL int4 codes (two per byte, element 2i in the low nibble) as 0 .. 15 */
static inline vi v_nibbles(const uint8_t *p) {
    const __m128i x = _mm_loadl_epi64((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4)));
}
/* and back: lanes 0 .. 15 -> VL/2 bytes; in each 64-bit lane (c_2k, c_2k+1) a shift by 28 puts c_2k+1 << 4
 * next to c_2k, and the narrowing keeps that low byte */
static inline void v_st_nibbles(uint8_t *p, vi c) {
    _mm_storel_epi64((__m128i *)p, _mm512_cvtepi64_epi8(_mm512_or_si512(c, _mm512_srli_epi64(c, 28))));
}
/* the state-block absmax of each lane: VL elements from a multiple of 8 span VL/8 blocks at most (>= 8 each) */
static inline vf v_s8_absmax(const float *am, int64_t j, int sh) {
    return _mm512_insertf32x8(_mm512_set1_ps(am[j >> sh]), _mm256_set1_ps(am[(j + 8) >> sh]), 1);
}
#else /* AVX2 */
#define VL 8
typedef __m256 vf;
typedef __m256i vi;
typedef __m256 vm;
#define vf_set1 _mm256_set1_ps
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_add _mm256_add_ps
#define vf_sub _mm256_sub_ps
#define vf_mul _mm256_mul_ps
#define vf_div _mm256_div_ps
#define vf_fmadd _mm256_fmadd_ps
#define vf_fnmadd _mm256_fnmadd_ps
#define vf_sqrt _mm256_sqrt_ps
#define vf_min _mm256_min_ps
#define vf_max _mm256_max_ps
#define vf_floor _mm256_floor_ps
#define vf_rint(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vf_and _mm256_and_ps
#define vf_or _mm256_or_ps
#define vf_xor _mm256_xor_ps
#define vf_andnot _mm256_andnot_ps
#define vf_lt(a, b) _mm256_cmp_ps((a), (b), _CMP_LT_OQ)
#define vf_gt(a, b) _mm256_cmp_ps((a), (b), _CMP_GT_OQ)
#define vf_isnan(a) _mm256_cmp_ps((a), (a), _CMP_UNORD_Q)
#define vf_maskz(m, x) _mm256_and_ps((m), (x))
#define vf_blend(a, b, m) _mm256_blendv_ps((a), (b), (m))
#define vf_of_i _mm256_cvtepi32_ps
#define vi_of_f _mm256_cvtps_epi32
#define vf_cast _mm256_castsi256_ps
#define vi_cast _mm256_castps_si256
#define vi_set1 _mm256_set1_epi32
#define vi_zero _mm256_setzero_si256
#define vi_and _mm256_and_si256
#define vi_or _mm256_or_si256
#define vi_xor _mm256_xor_si256
#define vi_andnot _mm256_andnot_si256
#define vi_add _mm256_add_epi32
#define vi_sub _mm256_sub_epi32
#define vi_mullo _mm256_mullo_epi32
#define vi_srli _mm256_srli_epi32
#define vi_slli _mm256_slli_epi32
#define vi_max _mm256_max_epi32
#define vi_min _mm256_min_epi32
#define vi_minu _mm256_min_epu32
#define vi_eq(a, b) _mm256_castsi256_ps(_mm256_cmpeq_epi32((a), (b)))
#define vi_gt(a, b) _mm256_castsi256_ps(_mm256_cmpgt_epi32((a), (b)))
#define vi_neg(a) _mm256_castsi256_ps(_mm256_srai_epi32((a), 31))
#define vi_maskz(m, x) _mm256_and_si256(_mm256_castps_si256(m), (x))
#define vi_blend(a, b, m) _mm256_blendv_epi8((a), (b), _mm256_castps_si256(m))
#define vm_xor _mm256_xor_ps
#define vi_gather(base, idx) _mm256_i32gather_epi32((const int *)(base), (idx), 4)
#define vf_gather(base, idx) _mm256_i32gather_ps((base), (idx), 4)
static inline vi vi_iota(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
static inline uint32_t vi_hmaxu(vi x) {
    uint32_t t[8], m = 0;
    _mm256_storeu_si256((__m256i *)t, x);
    for (int k = 0; k < 8; k++) m = t[k] > m ? t[k] : m;
    return m;
}
static inline uint32_t vi_hminu(vi x) {
    uint32_t t[8], m = 0xFFFFFFFFu;
    _mm256_storeu_si256((__m256i *)t, x);
    for (int k = 0; k < 8; k++) m = t[k] < m ? t[k] : m;
    return m;
}
static inline vi vi_ld_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi vi_ld_i8(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi vi_ld_u16(const uint16_t *p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)); }
/* the packs saturate, which values that fit never meet: unsigned for 0 .. 255 / 65535, signed for int8 */
static inline void vi_st_u8(uint8_t *p, vi x) {
    const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(p16, p16));
}
static inline void vi_st_i8(uint8_t *p, vi x) {
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(p16, p16));
}
static inline void vi_st_u16(uint16_t *p, vi x) {
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
}
static inline vf v_e5m2(const uint8_t *p) {
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8));
}
static inline vi v_nibbles(const uint8_t *p) {
    uint32_t packed;
    memcpy(&packed, p, 4);
    const __m128i x = _mm_cvtsi32_si128((int)packed), m4 = _mm_set1_epi8(0x0F);
    return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4)));
}
static inline void v_st_nibbles(uint8_t *p, vi c) {
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    const __m128i p8 = _mm_packus_epi16(p16, p16); /* one code per byte */
    /* 16-bit lanes now hold (code 2i, code 2i+1): low | high << 4 gives the packed byte */
    const __m128i pair = _mm_or_si128(_mm_and_si128(p8, _mm_set1_epi16(0x0F)), _mm_slli_epi16(_mm_srli_epi16(p8, 8), 4));
    const uint32_t packed = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(pair, pair));
    memcpy(p, &packed, 4);
}
static inline vf v_s8_absmax(const float *am, int64_t j, int sh) { return _mm256_set1_ps(am[j >> sh]); }
#endif

/* A lookup table of 128 or 256 floats (the 8-bit states' magnitude tables) for lanes of indices. AVX-512 keeps
 * the table in 8 or 16 registers and looks it up with two-source permutes (32 entries each) and blends on the
 * index's upper bits, which is several times cheaper than a gather on the CPUs measured; AVX2 gathers. */
#if ECO_AVX512
typedef struct {
    __m512 r[16];
} vtab;
static inline __attribute__((always_inline)) void vtab_load(vtab *t, const float *table, const int n) {
    for (int k = 0; k < n / 16; k++) t->r[k] = _mm512_loadu_ps(table + 16 * k);
}
static inline __attribute__((always_inline)) vf vtab_get(const vtab *t, vi idx, const int n) {
    const vm b5 = _mm512_test_epi32_mask(idx, vi_set1(32)), b6 = _mm512_test_epi32_mask(idx, vi_set1(64));
    vf lo = vf_blend(_mm512_permutex2var_ps(t->r[0], idx, t->r[1]), _mm512_permutex2var_ps(t->r[2], idx, t->r[3]),
                     b5);
    const vf hi = vf_blend(_mm512_permutex2var_ps(t->r[4], idx, t->r[5]),
                           _mm512_permutex2var_ps(t->r[6], idx, t->r[7]), b5);
    lo = vf_blend(lo, hi, b6); /* entries 0 .. 127 */
    if (n == 128) return lo;
    vf up = vf_blend(_mm512_permutex2var_ps(t->r[8], idx, t->r[9]),
                     _mm512_permutex2var_ps(t->r[10], idx, t->r[11]), b5);
    const vf uh = vf_blend(_mm512_permutex2var_ps(t->r[12], idx, t->r[13]),
                           _mm512_permutex2var_ps(t->r[14], idx, t->r[15]), b5);
    up = vf_blend(up, uh, b6); /* entries 128 .. 255 */
    return vf_blend(lo, up, _mm512_test_epi32_mask(idx, vi_set1(128)));
}
#else
typedef struct {
    const float *p;
} vtab;
static inline void vtab_load(vtab *t, const float *table, const int n) { (void)n; t->p = table; }
static inline vf vtab_get(const vtab *t, vi idx, const int n) { (void)n; return vf_gather(t->p, idx); }
#endif

/* Prefetch elements [j, j + n) of an array of esz-byte elements, one 64-byte line at a time. The sweeps run
 * on in-cache data, so memory would idle while they compute: each sweep requests part of the next block's
 * inputs (A the gradient and the first moment, B the second moment and the codes), which keeps it busy
 * through both (measured: the FP8 RTN step 12.5 -> 11.4 ms against B prefetching everything).
 * The lines are requested into L2, not L1 (PF_HINT): a request into L1 holds one of the core's few L1 miss
 * buffers until its line arrives from memory, which caps the lines in flight per core, and a block's streams
 * and scratch (about 36 KB for an fp32-state row of 1280) do not fit a 32 KB L1 anyway; from L2 the sweeps'
 * loads are short waits that out-of-order execution hides (measured side by side on a Zen 4 VM with
 * benchmarks/kernel_ab.py, FP8 RTN step: 21.3 -> 18.6 ms, after a backward 26.4 -> 22.6 ms; see README). */
#define PF_HINT _MM_HINT_T1
static inline __attribute__((always_inline)) void prefetch_range(const void *p, int64_t j, int64_t n, const int esz) {
    const char *c = (const char *)p + j * esz;
    for (int64_t o = 0; o < n * esz; o += 64) _mm_prefetch(c + o, PF_HINT);
}

/* VL-lane versions of the helpers above: the same IEEE operations, VL at a time. */
static inline vf v_ld(const void *p, int64_t j, const int bf) {
    if (bf) return vf_cast(vi_slli(vi_ld_u16((const uint16_t *)p + j), 16));
    return vf_load((const float *)p + j);
}

static inline void v_st(void *p, int64_t j, vf x, const int bf) {
    if (bf) { /* f32_to_bf16 */
        const vi u = vi_cast(x);
        vi r = vi_srli(vi_add(u, vi_add(vi_set1(0x7FFF), vi_and(vi_srli(u, 16), vi_set1(1)))), 16);
        vi_st_u16((uint16_t *)p + j, vi_blend(r, vi_set1(0x7FC0), vf_isnan(x)));
        return;
    }
    vf_store((float *)p + j, x);
}

/* codes j .. j+VL-1 as fp32, exactly. e4m3: the sign-extended code shifted left by 20 and masked is the fp32
 * whose exponent and mantissa fields are the e4m3 fields (sign at bit 31): its value is the e4m3 value * 2^-120,
 * e4m3 subnormals landing on fp32 subnormals, so one multiply by 2^120 (exact) finishes the decode.
 * e5m2 is the top byte of an fp16; bf16 is the top half of an fp32; int8/int4 convert through int32. */
static inline vf v_decode_p(const void *codes, int64_t j, const int fmt) {
    const uint8_t *c = (const uint8_t *)codes;
    if (fmt == FMT_BF16) return v_ld(codes, j, 1);
    if (fmt == FMT_INT4) return vf_of_i(vi_sub(v_nibbles(c + j / 2), vi_set1(8))); /* j is even */
    if (fmt == FMT_INT8) return vf_of_i(vi_ld_i8(c + j));
    if (fmt == FMT_E5M2) return v_e5m2(c + j);
    const vi f = vi_and(vi_slli(vi_ld_i8(c + j), 20), vi_set1((int)0x87F00000u));
    return vf_mul(vf_cast(f), vf_set1(0x1p120f));
}

static inline vi v_mix32(vi x) {
    x = vi_xor(x, vi_srli(x, 16));
    x = vi_mullo(x, vi_set1((int)0x7feb352dU));
    x = vi_xor(x, vi_srli(x, 15));
    x = vi_mullo(x, vi_set1((int)0x846ca68bU));
    x = vi_xor(x, vi_srli(x, 16));
    return x;
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

/* the uniforms of VL consecutive indices: idx holds their low 32-bit words, hi_k2 = k2 + their (common) high
 * word, as in uniform() */
static inline vf v_uniform(vi idx, vi vk1, vi hi_k2) {
    vi h = v_mix32(vi_xor(idx, vk1));
    h = v_mix32(vi_xor(h, hi_k2));
    return vf_mul(vf_of_i(vi_srli(h, 8)), vf_set1(0x1p-24f));
}

static inline void v_store_codes(void *codes, int64_t j, vf q, const int fmt, const int bias) {
    uint8_t *c = (uint8_t *)codes;
    if (fmt == FMT_BF16) { /* q is on the bf16 grid: its top 16 bits are the code */
        vi_st_u16((uint16_t *)codes + j, vi_srli(vi_cast(q), 16));
        return;
    }
    if (fmt == FMT_INT4) { /* q + 8 in 1 .. 15 */
        v_st_nibbles(c + j / 2, vi_add(vi_of_f(q), vi_set1(8)));
        return;
    }
    if (fmt == FMT_INT8) { /* q is an integer in [-127, 127] */
        vi_st_i8(c + j, vi_of_f(q));
        return;
    }
    /* |q| * 2^(bias - 127) moves the fp8 grid onto fp32's bit layout (fp8 subnormals become fp32 subnormals,
     * exactly), so the top bits of the product are the fp8 exponent and mantissa fields. */
    const vi mag = vi_cast(vf_mul(vf_andnot(vf_set1(-0.0f), q), vf_cast(vi_set1(bias << 23))));
    const vi sign = vi_slli(vi_srli(vi_cast(q), 31), 7);
    vi_st_u8(c + j, vi_or(sign, fmt == FMT_E4M3 ? vi_srli(mag, 20) : vi_srli(mag, 21)));
}
#endif

/* fp32 grid value q (|q| <= max, on the grid) -> fp8 code */
static inline uint8_t encode_fp8(float q, int man, int bias) {
    uint32_t u = f_bits(q);
    uint32_t sign = (u >> 24) & 0x80u;
    uint32_t au = u & 0x7fffffffu;
    int32_t E = (int32_t)(au >> 23) - 127 + bias;
    uint32_t mag;
    if (E >= 1) {
        mag = ((uint32_t)E << man) | ((au >> (23 - man)) & ((1u << man) - 1u));
    } else { /* subnormal (or zero): |q| / 2^(1 - bias - man) is an integer 0 .. 2^man - 1 */
        mag = (uint32_t)(bits_f(au) * bits_f((uint32_t)(127 - (1 - bias - man)) << 23));
    }
    return (uint8_t)(sign | mag);
}

/* ---------------------------------------------------------------------------------------------------- */
/* What sweep A learns about a block of w_til: its absmax, its smallest nonzero magnitude (for the division */
/* shortcut in sweep B) and whether any element is NaN/Inf.                                                */
typedef struct {
    float amax, minnz; /* minnz: INFINITY if every element is zero */
    int bad;
} astat;

static inline void astat_scalar(astat *st, float w) {
    const float aw = fabsf(w);
    st->amax = aw > st->amax ? aw : st->amax;
    if (aw > 0.0f && aw < st->minnz) st->minnz = aw;
    st->bad |= !(aw <= 3.40282347e38f); /* NaN or Inf */
}

static inline void astat_merge(astat *st, astat o) {
    st->amax = o.amax > st->amax ? o.amax : st->amax;
    st->minnz = o.minnz < st->minnz ? o.minnz : st->minnz;
    st->bad |= o.bad;
}

#if ECO_VEC
/* fold the vector accumulators (max of |w| bits; min of |w| bits - 1, which puts zeros last) into st */
static inline void astat_vec(astat *st, vi vmax, vi vmin) {
    const uint32_t mx = vi_hmaxu(vmax), mn = vi_hminu(vmin) + 1u;
    astat o = {bits_f(mx), mn == 0u ? INFINITY : bits_f(mn), mx >= 0x7F800000u};
    if (o.bad) o.amax = 0.0f;
    astat_merge(st, o);
}
#define ASTAT_VEC_UPDATE(w)                                                     \
    do {                                                                        \
        const vi wb_ = vi_and(vi_cast(w), vi_set1(0x7fffffff));                 \
        vmax = vi_max(vmax, wb_);                                               \
        vmin = vi_minu(vmin, vi_sub(wb_, vi_set1(1)));                          \
    } while (0)
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* 8-bit block-wise optimizer states (ecoptim/optim/state8.py, whose torch code is the definition): encode  */
/* an fp32 state into codes + per-block absmax, and decode it back, with the same IEEE operations as the    */
/* torch code (absmax; |x| / absmax, correctly rounded; the comparisons torch.bucketize makes; the SR       */
/* fraction), so the results are identical. table: the ntab magnitudes. Searching: y in [0, 1] falls in a   */
/* "bucket" named by its top 16 bits (exponent and 7 mantissa bits; below 2^-27 all in bucket 0), and       */
/* state8.py has checked that no bucket holds more than one table entry or midpoint (none in bucket 0) and  */
/* tabulated per bucket how many lie below it and where the one inside sits (its low 16 bits: within a      */
/* bucket, floats order like their low bits). So the search is one lookup and one integer comparison.       */
#define S8_BKT0 0x3200 /* top 16 bits of 2^-27 */
typedef struct {
    const float *x;      /* encode: in; decode: out (as float *) */
    uint8_t *codes;
    float *absmax;
    const float *table;
    const int32_t *brtn, *bsr;
    int64_t n, bs;
    int32_t ntab, nbkt, is_signed, sr;
    uint32_t k1, k2;
    int32_t part, parts, decode;
} s8_work;

static inline int32_t s8_bucket(float y, int32_t nbkt) {
    const int32_t k = (int32_t)(f_bits(y) >> 16) - S8_BKT0;
    return k < 0 ? 0 : (k >= nbkt ? nbkt - 1 : k);
}

/* encode the state block x[0 .. hi-lo) (flat elements lo .. hi-1 of its tensor) into codes[lo .. hi) and
 * *absmax_out; the SR uniforms are those of the flat indices. brtn / bsr: per bucket, (how many midpoints /
 * entries lie below it) << 17 | k, where y (in that bucket) is above the bucket's one midpoint, or at or above
 * its one entry, iff the low 16 bits of y are >= k (k = 65536: no boundary in the bucket); see state8.py. */
static void s8_encode(const float *x, uint8_t *codes, float *absmax_out, int64_t lo, int64_t hi, const float *table,
                      const int32_t *brtn, const int32_t *bsr, int32_t ntab, int32_t nbkt, int is_signed, int sr,
                      uint32_t k1, uint32_t k2) {
    /* the block's absmax and smallest nonzero |x| (as bit patterns: non-negative floats order like them) */
    uint32_t bmax = 0, bmin = 0xFFFFFFFFu; /* bmin: min of bits - 1, so that zeros drop out */
    int64_t k = 0;
#if ECO_VEC
    {
        vi vmax = vi_zero(), vmin = vi_set1(-1);
        for (; k + VL <= hi - lo; k += VL) ASTAT_VEC_UPDATE(vf_load(x + k)); /* the same accumulators as astat */
        bmax = vi_hmaxu(vmax);
        bmin = vi_hminu(vmin);
    }
#endif
    for (; k < hi - lo; k++) {
        const uint32_t b = f_bits(x[k]) & 0x7FFFFFFFu;
        bmax = b > bmax ? b : bmax;
        bmin = b - 1u < bmin ? b - 1u : bmin;
    }
    const float amax = bits_f(bmax);
    *absmax_out = amax;
    const float d = amax > 0.0f ? amax : 1.0f;
    /* |x| / d by Markstein (see v_div_mk) when every nonzero |x| >= 2^-90 and quotient >= 2^-124 */
    const int mk = bmin == 0xFFFFFFFFu || (bits_f(bmin + 1u) >= 0x1p-90f && (double)bits_f(bmin + 1u) >= (double)d * 0x1p-124);
    (void)mk; /* the vector code's */
    int64_t i = lo;
#if ECO_VEC
    /* SR uniforms need one high index word for the whole range */
    if (!sr || ((uint64_t)lo >> 32) == ((uint64_t)hi >> 32)) {
        const vf vd = vf_set1(d), vrd = vf_set1(1.0f / d), absm = vf_cast(vi_set1(0x7FFFFFFF)), zero = vf_set1(0.0f);
        const vi one = vi_set1(1), top = vi_set1(ntab - 2), b0 = vi_set1(S8_BKT0), blast = vi_set1(nbkt - 1),
                 sgn = vi_set1(is_signed ? 128 : 0), low16 = vi_set1(0xFFFF), low17 = vi_set1(0x1FFFF),
                 vk1 = vi_set1((int)k1), vk2 = vi_set1((int)(k2 + (uint32_t)((uint64_t)lo >> 32)));
        vi vidx = vi_add(vi_set1((int)(uint32_t)lo), vi_iota());
        vtab tab;
        if (sr) vtab_load(&tab, table, ntab);
        for (; i + VL <= hi; i += VL) {
            const vf xv = vf_load(x + (i - lo)), ax = vf_and(xv, absm);
            const vf y = mk ? v_div_mk(ax, vd, vrd) : vf_div(ax, vd);
            const vi yb = vi_cast(y);
            const vi bk = vi_min(vi_max(vi_sub(vi_srli(yb, 16), b0), vi_zero()), blast);
            const vi e = vi_gather(sr ? bsr : brtn, bk);
            /* how many midpoints are < y / entries are <= y: the bucket's base, + 1 if y passes its boundary */
            const vm pass = vi_gt(vi_add(vi_and(yb, low16), one), vi_and(e, low17));
            vi c = vi_add(vi_srli(e, 17), vi_maskz(pass, one));
            if (sr) { /* l = (entries <= y) - 1, clamped; up with probability (y - T[l]) / (T[l+1] - T[l]) */
                c = vi_min(vi_max(vi_sub(c, one), vi_zero()), top);
                const vf tl = ntab == 128 ? vtab_get(&tab, c, 128) : vtab_get(&tab, c, 256);
                const vf th = ntab == 128 ? vtab_get(&tab, vi_add(c, one), 128) : vtab_get(&tab, vi_add(c, one), 256);
                const vf frac = vf_div(vf_sub(y, tl), vf_sub(th, tl));
                c = vi_add(c, vi_maskz(vf_lt(v_uniform(vidx, vk1, vk2), frac), one));
                vidx = vi_add(vidx, vi_set1(VL));
            }
            if (!is_signed) c = vi_max(c, vi_maskz(vf_gt(y, zero), one)); /* a positive v never becomes 0 */
            vi_st_u8(codes + i, vi_or(c, vi_maskz(vf_lt(xv, zero), sgn)));
        }
    }
#endif
    for (; i < hi; i++) {
        const float y = fabsf(x[i - lo]) / d;
        const uint32_t e = (uint32_t)(sr ? bsr : brtn)[s8_bucket(y, nbkt)];
        int32_t idx = (int32_t)(e >> 17) + ((f_bits(y) & 0xFFFFu) >= (e & 0x1FFFFu));
        if (sr) {
            int32_t l = idx - 1;
            l = l < 0 ? 0 : (l > ntab - 2 ? ntab - 2 : l);
            const float tl = table[l], th = table[l + 1];
            idx = l + (uniform(k1, k2, (uint64_t)i) < (y - tl) / (th - tl));
        }
        if (!is_signed && y > 0.0f && idx < 1) idx = 1; /* a positive second moment never becomes 0 */
        codes[i] = (uint8_t)(idx | (is_signed && x[i - lo] < 0.0f ? 128 : 0));
    }
}

/* decode element j (sign bit + 7-bit index if is_signed, else 8-bit index) of a tensor whose state blocks
 * have bs elements */
static inline float s8_decode_scalar(const uint8_t *codes, const float *table, const float *absmax, int64_t j,
                                     int64_t bs, int is_signed) {
    const uint8_t c = codes[j];
    const float v = table[is_signed ? (c & 0x7F) : c] * absmax[j / bs];
    return is_signed && c >= 128 ? -v : v;
}

#if ECO_VEC
/* elements j .. j+VL-1; absmax: each lane's block absmax */
static inline __attribute__((always_inline)) vf s8_decode_vec(const uint8_t *codes, const vtab *table, vf absmax,
                                                              int64_t j, const int is_signed) {
    const vi c = vi_ld_u8(codes + j);
    const vf v = vf_mul(is_signed ? vtab_get(table, vi_and(c, vi_set1(0x7F)), 128) : vtab_get(table, c, 256), absmax);
    /* code bit 7 -> the sign bit: -v */
    return is_signed ? vf_xor(v, vf_cast(vi_slli(vi_and(c, vi_set1(0x80)), 24))) : v;
}
#endif

static void s8_block(const s8_work *w, int64_t b) {
    const int64_t lo = b * w->bs, hi = lo + w->bs < w->n ? lo + w->bs : w->n;
    if (!w->decode) {
        s8_encode(w->x + lo, w->codes, &w->absmax[b], lo, hi, w->table, w->brtn, w->bsr, w->ntab, w->nbkt,
                  w->is_signed, w->sr, w->k1, w->k2);
        return;
    }
    float *out = (float *)w->x;
    int64_t i = lo;
#if ECO_VEC
    vtab tab;
    vtab_load(&tab, w->table, w->is_signed ? 128 : 256);
    if (w->is_signed)
        for (; i + VL <= hi; i += VL) vf_store(out + i, s8_decode_vec(w->codes, &tab, vf_set1(w->absmax[b]), i, 1));
    else
        for (; i + VL <= hi; i += VL) vf_store(out + i, s8_decode_vec(w->codes, &tab, vf_set1(w->absmax[b]), i, 0));
#endif
    for (; i < hi; i++) out[i] = s8_decode_scalar(w->codes, w->table, w->absmax, i, w->bs, w->is_signed);
}

/* sweep A for AdamW over elements [lo, hi) of block b: w_til, the denominator, the new moments into the
 * scratch (nothing in memory is written: a block that turns out non-finite is left as it was). vec = 0 takes
 * the scalar path only (the exact re-run of a block whose fast sweep saw a NaN/Inf, see team_run). */
static inline __attribute__((always_inline)) astat adamw_sweep_a(const eco_args *a, int64_t b, int64_t lo,
                                                                  int64_t hi, float *wt, float *dn, float *mf,
                                                                  float *vn, int vec, const int gbf,
                                                                  const int sbf, const int fmt) {
    const int64_t base = b * a->bs;
    const float sc = a->scale ? a->scale[b] : 1.0f; /* unscaled: x * 1 is exact, as no multiply at all */
    const float csc = a->comp_scale ? a->comp_scale[b] : 1.0f; /* mode 'kahan': the compensation's scale */
    const float decay = a->decay, w1 = a->w1, b2 = a->b2, omb2 = a->omb2, bc2s = a->bc2s, eps = a->eps,
                ns = a->neg_step;
    const int small = w1 < 0.5f;
    const float coeff = small ? w1 : w1 - 1.0f;
    astat st = {0.0f, INFINITY, 0};
    int64_t i = lo;
    /* sqrt(v) / bc2s by Markstein: sqrt of a finite v is +0 or in [2^-75, 2^64], so with bc2s in [2^-40, 1]
     * the quotient and residual are normal. v = Inf gives NaN here: the block is re-run exactly. */
    if (!(bc2s >= 0x1p-40f && bc2s <= 1.0f)) vec = 0;
#if ECO_VEC
    if (vec) {
        const vf vsc = vf_set1(sc), vdecay = vf_set1(decay), vcoeff = vf_set1(coeff), vb2 = vf_set1(b2),
                 vomb2 = vf_set1(omb2), vbc2s = vf_set1(bc2s), veps = vf_set1(eps), vns = vf_set1(ns),
                 vrbc2s = vf_set1(1.0f / bc2s), vgs = vf_set1(a->gscale), vcsc = vf_set1(csc);
        vi vmax = vi_zero(), vmin = vi_set1(-1);
        /* local copies: stores through float pointers could alias the struct, which would force a reload
         * of every pointer in every iteration */
        const void *codes = a->codes, *grad = a->grad, *mp = a->m, *vp = a->v;
        const float *mam = a->m_absmax, *vam = a->v_absmax;
        vtab tab7, tab8; /* 8-bit moments: their magnitude tables */
        if (sbf == 2) {
            vtab_load(&tab7, a->t7, 128);
            vtab_load(&tab8, a->t8, 256);
        }
        const int s8sh = sbf == 2 ? __builtin_ctzll((unsigned long long)a->s8bs) : 0; /* s8bs: a power of two */
        const float *mst = a->master, *erp = a->err;
        const void *cmp = a->comp;
        /* the next block's (or range's) gradient and first moment, see prefetch_range */
        const int64_t ahead = hi - lo, esz_s = sbf == 2 ? 1 : sbf ? 2 : 4;
#define A_VEC(ii, SMALL) /* SMALL: lerp's weight < 0.5 (its base is m, else g) */                           \
    do {                                                                                                \
        const int64_t i_ = (ii), j = base + i_;                                                         \
        vf w = mst ? vf_load(mst + j) : vf_mul(v_decode_p(codes, j, fmt), vsc);                         \
        if (erp) w = vf_add(w, vf_load(erp + j));                                                       \
        w = vf_mul(w, vdecay);                                                                          \
        const vf g = vf_mul(v_ld(grad, j, gbf), vgs);                                                   \
        vf m = sbf == 2 ? s8_decode_vec((const uint8_t *)mp, &tab7, v_s8_absmax(mam, j, s8sh), j, 1)   \
                        : v_ld(mp, j, sbf);                                                             \
        vf v = sbf == 2 ? s8_decode_vec((const uint8_t *)vp, &tab8, v_s8_absmax(vam, j, s8sh), j, 0)   \
                        : v_ld(vp, j, sbf);                                                             \
        m = vf_fmadd(vcoeff, vf_sub(g, m), (SMALL) ? m : g);                                            \
        v = vf_fmadd(vf_mul(vomb2, g), g, vf_mul(v, vb2));                                              \
        const vf d = vf_add(v_div_mk(vf_sqrt(v), vbc2s, vrbc2s), veps);                                 \
        w = vf_add(w, vf_div(vf_mul(vns, m), d));                                                       \
        if (cmp) w = vf_add(w, vf_mul(v_decode_p(cmp, j, fmt), vcsc)); /* kahan: + the compensation */ \
        vf_store(wt + (i_ - lo), w);                                                                    \
        vf_store(dn + (i_ - lo), d);                                                                    \
        vf_store(mf + (i_ - lo), m); /* the moments are written once, by sweep B (after the injection) */ \
        vf_store(vn + (i_ - lo), v);                                                                    \
        ASTAT_VEC_UPDATE(w);                                                                            \
    } while (0)
#define A_LOOP(SMALL)                                                                                   \
    do {                                                                                                \
        for (; i + 2 * VL <= hi; i += 2 * VL) {                                                         \
            prefetch_range(grad, base + i + ahead, 2 * VL, gbf ? 2 : 4);                                \
            prefetch_range(mp, base + i + ahead, 2 * VL, esz_s);                                        \
            A_VEC(i, SMALL);                                                                            \
            A_VEC(i + VL, SMALL);                                                                       \
        }                                                                                               \
        for (; i + VL <= hi; i += VL) A_VEC(i, SMALL);                                                  \
    } while (0)
        if (small) A_LOOP(1);
        else A_LOOP(0);
#undef A_LOOP
#undef A_VEC
        astat_vec(&st, vmax, vmin);
    }
#endif
    (void)vec;
    for (; i < hi; i++) {
        const int64_t j = base + i;
        float w = a->master ? a->master[j] : decode_scalar(a->codes, a->lut, j, fmt) * sc;
        if (a->err) w = w + a->err[j];
        w = w * decay;
        const float g = ld_scalar(a->grad, j, gbf) * a->gscale;
        float m = sbf == 2 ? s8_decode_scalar((const uint8_t *)a->m, a->t7, a->m_absmax, j, a->s8bs, 1)
                           : ld_scalar(a->m, j, sbf);
        float v = sbf == 2 ? s8_decode_scalar((const uint8_t *)a->v, a->t8, a->v_absmax, j, a->s8bs, 0)
                           : ld_scalar(a->v, j, sbf);
        /* lerp_(g, w1): ATen's lerp_vec = fmadd(coeff, end - self, base) */
        m = fmaf(coeff, g - m, small ? m : g);
        /* mul_(b2).addcmul_(g, g, value=1-b2) */
        v = v * b2;
        v = fmaf(omb2 * g, g, v);
        /* denom = sqrt(v) / sqrt(bc2) + eps */
        const float d = sqrtf(v) / bc2s + eps;
        /* addcdiv_(m, d, value=-step_size) */
        w = w + ns * m / d;
        if (a->comp) w = w + decode_scalar(a->comp, a->lut, j, fmt) * csc; /* kahan: w_til + the compensation */
        wt[i - lo] = w;
        dn[i - lo] = d;
        mf[i - lo] = m;
        vn[i - lo] = v;
        astat_scalar(&st, w);
    }
    return st;
}

/* SGD sweep A: torch.optim.SGD single-tensor ops (grad.add(w, alpha=wd); buf.mul_(mom).add_(g, alpha=1-d);
 * nesterov: g.add(buf, alpha=mom); w.add_(d, alpha=-lr)). ATen's add with alpha is a + alpha*b via fmadd. */
static inline __attribute__((always_inline)) astat sgd_sweep_a(const eco_args *a, int64_t b, int64_t lo,
                                                                int64_t hi, float *wt, float *mf, int vec,
                                                                const int gbf, const int sbf, const int fmt) {
    const int64_t base = b * a->bs;
    const float sc = a->scale ? a->scale[b] : 1.0f; /* unscaled: x * 1 is exact, as no multiply at all */
    const float csc = a->comp_scale ? a->comp_scale[b] : 1.0f; /* mode 'kahan': the compensation's scale */
    const float wd = a->wd, mom = a->mom, omd = a->omd, nl = a->neg_lr;
    const int first = a->first_step, nest = a->nesterov, has_mom = mom != 0.0f;
    astat st = {0.0f, INFINITY, 0};
    int64_t i = lo;
#if ECO_VEC
    if (vec) {
        const vf vsc = vf_set1(sc), vwd = vf_set1(wd), vmom = vf_set1(mom), vomd = vf_set1(omd), vnl = vf_set1(nl),
                 vgs = vf_set1(a->gscale), vcsc = vf_set1(csc);
        vi vmax = vi_zero(), vmin = vi_set1(-1);
        const void *codes = a->codes, *grad = a->grad, *mp = a->m, *cmp = a->comp;
        const float *mst = a->master, *erp = a->err;
        const int64_t ahead = hi - lo; /* see prefetch_range */
        for (; i + VL <= hi; i += VL) {
            const int64_t j = base + i;
            prefetch_range(grad, j + ahead, VL, gbf ? 2 : 4);
            if (has_mom) prefetch_range(mp, j + ahead, VL, sbf ? 2 : 4);
            vf w = mst ? vf_load(mst + j) : vf_mul(v_decode_p(codes, j, fmt), vsc);
            if (erp) w = vf_add(w, vf_load(erp + j));
            vf g = vf_mul(v_ld(grad, j, gbf), vgs);
            if (wd != 0.0f) g = vf_fmadd(vwd, w, g);
            vf d = g;
            if (has_mom) {
                const vf m = first ? g : vf_fmadd(vomd, g, vf_mul(v_ld(mp, j, sbf), vmom));
                d = nest ? vf_fmadd(vmom, m, g) : m;
                vf_store(mf + (i - lo), m);
            }
            w = vf_fmadd(vnl, d, w);
            if (cmp) w = vf_add(w, vf_mul(v_decode_p(cmp, j, fmt), vcsc)); /* kahan: + the compensation */
            vf_store(wt + (i - lo), w);
            ASTAT_VEC_UPDATE(w);
        }
        astat_vec(&st, vmax, vmin);
    }
#endif
    (void)vec;
    for (; i < hi; i++) {
        const int64_t j = base + i;
        float w = a->master ? a->master[j] : decode_scalar(a->codes, a->lut, j, fmt) * sc;
        if (a->err) w = w + a->err[j];
        float g = ld_scalar(a->grad, j, gbf) * a->gscale;
        if (wd != 0.0f) g = fmaf(wd, w, g);
        float d = g;
        if (has_mom) {
            float m;
            if (first) m = g;
            else {
                m = ld_scalar(a->m, j, sbf);
                m = m * mom;
                m = fmaf(omd, g, m);
            }
            d = nest ? fmaf(mom, m, g) : m;
            mf[i - lo] = m;
        }
        w = fmaf(nl, d, w);
        if (a->comp) w = w + decode_scalar(a->comp, a->lut, j, fmt) * csc; /* kahan: + the compensation */
        wt[i - lo] = w;
        astat_scalar(&st, w);
    }
    return st;
}

/* codec.compute_scale for one block */
static inline float block_scale(const eco_args *a, float amax) {
    if (a->scale == NULL) return 1.0f; /* unscaled (bf16): the absmax only served the finiteness check */
    float s = amax / a->fmax;
    if (s < 0x1p-126f) s = 0x1p-126f;
    if (isinf(s * a->fmax) && !isinf(s)) s = nextafterf(s, 0.0f);
    return s;
}

/* May sweep B divide the block by s with v_div_mk? Every nonzero |w| <= amax ~ s*fmax, so the quotient cannot
 * overflow; it must not be subnormal (|w|/s >= 2^-124) and the residual must be normal (|w| >= 2^-90). */
static inline int markstein_ok(float s, astat st) {
    return st.minnz == INFINITY || (st.minnz >= 0x1p-90f && (double)st.minnz >= (double)s * 0x1p-124);
}

#if ECO_VEC
/* y (clamped to +-fmax, on the format's scale) rounded to the nearest grid value, ties to even; sgnsrc: the
 * value whose sign a y that rounds to zero keeps (as round() keeps it: -0 has its own fp8 code) */
static inline __attribute__((always_inline)) vf v_round_nearest(vf y, vf sgnsrc, const int fmt, vi vexpmask,
                                                                vi vminexp, vi vmagic) {
    if (fmt == FMT_BF16) { /* round to nearest even on the bit pattern (c10::BFloat16's rounding) */
        const vi u = vi_cast(y);
        const vi r = vi_add(u, vi_add(vi_set1(0x7FFF), vi_and(vi_srli(u, 16), vi_set1(1))));
        return vf_cast(vi_andnot(vi_set1(0xFFFF), r));
    }
    if (fmt == FMT_INT8 || fmt == FMT_INT4) return vf_rint(y);
    /* grid spacing sp = 2^(max(floor(log2|y|), emin) - man), built directly in the exponent field; y rounded to
     * a multiple of sp, ties to even: (y + M) - M with M = 1.5 * 2^23 * sp (|y| < 2^22 sp) is exactly
     * sp * round_half_even(y / sp). The sign is sgnsrc's, which v_div_mk may have dropped from a -0. */
    const vf magic = vf_cast(vi_add(vi_max(vi_and(vi_cast(y), vexpmask), vminexp), vmagic));
    return vf_or(vf_sub(vf_add(y, magic), magic), vf_and(sgnsrc, vf_set1(-0.0f)));
}
#endif

/* the scalar version (nearbyintf rounds ties to even and keeps the sign of zero) */
static inline float round_nearest(float y, const int fmt) {
    if (fmt == FMT_BF16) return bits_f((f_bits(y) + 0x7FFFu + ((f_bits(y) >> 16) & 1u)) & 0xFFFF0000u);
    if (fmt == FMT_INT8 || fmt == FMT_INT4) return nearbyintf(y);
    const int man = fmt == FMT_E4M3 ? 3 : 2, emin = fmt == FMT_E4M3 ? -6 : -14;
    const int32_t e = (int32_t)((f_bits(y) >> 23) & 0xFFu) - 127, k = (e < emin ? emin : e) - man;
    const float sp = bits_f((uint32_t)(k + 127) << 23);
    return nearbyintf(y / sp) * sp; /* y / sp and the product are exact: sp is a power of two */
}

/* grid value q (on the format's scale) -> code j */
static inline void store_code(void *codes, int64_t j, float q, const int fmt) {
    if (fmt == FMT_BF16) {
        ((uint16_t *)codes)[j] = (uint16_t)(f_bits(q) >> 16);
    } else if (fmt == FMT_INT8) {
        ((int8_t *)codes)[j] = (int8_t)q;
    } else if (fmt == FMT_INT4) { /* one nibble: blocks and thread ranges start at even indices, so no byte is shared */
        uint8_t *byte = (uint8_t *)codes + (j >> 1);
        const int sh = 4 * (int)(j & 1);
        *byte = (uint8_t)((*byte & ~(0xF << sh)) | (((int)q + 8) << sh));
    } else {
        ((uint8_t *)codes)[j] = encode_fp8(q, fmt == FMT_E4M3 ? 3 : 2, fmt == FMT_E4M3 ? 7 : 15);
    }
}

/* sweep B: quantize w_til with scale s, write codes, inject s-scaled error into the momentum, write the
 * moments (mk: divide by s with v_div_mk, see markstein_ok). Mode 'kahan' (a->comp): the error
 * w_til - w_hat replaces w_til in the scratch, for sweep C; returns its statistics. */
static inline __attribute__((always_inline)) astat sweep_b(const eco_args *a, int64_t b, int64_t lo, int64_t hi,
                                                           float s, int mk, float *wt, const float *dn,
                                                           const float *mf, const float *vn, const int sbf,
                                                           const int fmt, const int sr, const int adam) {
    const int64_t base = b * a->bs;
    const float fmax = a->fmax, coef = a->coef;
    /* the fp8 grid parameters are the format's constants (FP8_E4M3/E5M2 in formats.py), known at compile time */
    const int man = fmt == FMT_E4M3 ? 3 : 2, emin = fmt == FMT_E4M3 ? -6 : -14;
    const int inject = a->inject, has_m = a->m != NULL, unscaled = fmt == FMT_BF16, kahan = a->comp != NULL;
    const uint32_t k1 = a->k1, k2 = a->k2;
    void *const codes = a->codes, *const mp = a->m, *const vp = a->v;
    float *const m8 = (float *)mf; /* 8-bit moments: the final m goes back to its scratch, to be encoded */
    float *const mst = a->master, *const erp = a->err;
    astat st = {0.0f, INFINITY, 0}; /* kahan: of the error */
    int64_t i = lo;
#if ECO_VEC
    int64_t vhi = hi;
    /* the SR counter's low word must not wrap inside a vector: leave such a (>4G-element) range to the scalars */
    if (sr && ((uint64_t)(base + lo) >> 32) != ((uint64_t)(base + hi + VL) >> 32)) vhi = lo;
    {
        const int bias = fmt == FMT_E4M3 ? 7 : 15;
        const vf vs = vf_set1(s), vrs = vf_set1(1.0f / s), vhi_ = vf_set1(fmax), vlo = vf_set1(-fmax),
                 vcoef = vf_set1(coef), one = vf_set1(1.0f);
        vi vmax = vi_zero(), vmin = vi_set1(-1);
        /* SR counters: the low words of this vector's indices (advanced by VL per vector); the high word is
         * the same for the whole range (checked above) */
        vi vidx = vi_add(vi_set1((int)(uint32_t)(base + i)), vi_iota());
        const vi vk1 = vi_set1((int)k1), vk2 = vi_set1((int)(k2 + (uint32_t)((uint64_t)(base + i) >> 32)));
        /* the constants live in registers: made opaque, so that the compiler cannot rebuild them inside the
         * loop (GCC does, at four instructions each, when it thinks a register is better used elsewhere) */
        vi vminexp = vi_set1((emin + 127) << 23), vexpmask = vi_set1(0x7F800000),
           vmagic = vi_set1(((23 - man) << 23) | 0x400000);
        __asm__("" : "+v"(vminexp), "+v"(vexpmask), "+v"(vmagic));
        /* the next block's (the arrays are contiguous: one block ahead of j) second moment and codes (sweep A
         * requests its gradient and first moment, see prefetch_range) */
        const char *pf_codes = (const char *)codes, *pf_v = (const char *)vp;
        const int esz_s = sbf == 2 ? 1 : sbf ? 2 : 4;
        const int64_t ahead = hi - lo; /* the next block, or the next range of a large one */
#define B_VEC(ii, HM, INJ, KH) /* HM: there is a momentum; INJ: inject the error into it; KH: mode 'kahan' */   \
    do {                                                                                                      \
        const int64_t i_ = (ii), j = base + i_;                                                               \
        const vf w = vf_load(wt + (i_ - lo));                                                                 \
        vf y = w;                                                                                             \
        if (!unscaled) y = mk ? v_div_mk(w, vs, vrs) : vf_div(w, vs);                                         \
        y = vf_min(vf_max(y, vlo), vhi_);                                                                     \
        vf q;                                                                                                 \
        if (!sr) {                                                                                            \
            q = v_round_nearest(y, w, fmt, vexpmask, vminexp, vmagic);                                        \
        } else if (fmt == FMT_BF16) {                                                                         \
            /* the bf16 grid spacing is the unit of bit 16 (subnormals included), so floor/frac come from the \
             * bit pattern: frac = L/2^16 above zero, 1 - L/2^16 below (L = low 16 bits) */                   \
            const vi u = vi_cast(y), L = vi_and(u, vi_set1(0xFFFF)), T = vi_andnot(vi_set1(0xFFFF), u);       \
            const vf fl = vf_mul(vf_of_i(L), vf_set1(0x1p-16f));                                              \
            const vm neg = vi_neg(u);                                                                         \
            const vm up = vf_lt(v_uniform(vidx, vk1, vk2), vf_blend(fl, vf_sub(one, fl), neg));               \
            /* above zero "up" adds one grid step to the magnitude, below zero "not up" does */               \
            const vi qb = vi_add(T, vi_maskz(vm_xor(up, neg), vi_set1(0x10000)));                             \
            q = vf_cast(vi_blend(qb, u, vi_eq(L, vi_zero()))); /* on the grid already: exact */               \
        } else if (fmt == FMT_INT8 || fmt == FMT_INT4) {                                                      \
            const vf f = vf_floor(y);                                                                         \
            q = vf_add(f, vf_maskz(vf_lt(v_uniform(vidx, vk1, vk2), vf_sub(y, f)), one));                     \
        } else { /* the grid spacing sp as in v_round_nearest; y / sp is exact, and so is y * (1/sp) */       \
            const vi spb = vi_sub(vi_max(vi_and(vi_cast(y), vexpmask), vminexp), vi_set1(man << 23));         \
            const vf r = vf_mul(y, vf_cast(vi_sub(vi_set1(254 << 23), spb)));                                 \
            const vf f = vf_floor(r);                                                                         \
            const vm up = vf_lt(v_uniform(vidx, vk1, vk2), vf_sub(r, f));                                     \
            q = vf_mul(vf_add(f, vf_maskz(up, one)), vf_cast(spb));                                           \
        }                                                                                                     \
        v_store_codes(codes, j, q, fmt, bias);                                                                \
        const vf err = vf_sub(w, vf_mul(q, vs)); /* w_til - w_hat (dropped by the compiler if unused) */     \
        if (mst) vf_store(mst + j, w);                                                                        \
        if (erp) vf_store(erp + j, err);                                                                      \
        if (KH) {                                                                                             \
            vf_store(wt + (i_ - lo), err);                                                                    \
            ASTAT_VEC_UPDATE(err);                                                                            \
        }                                                                                                     \
        if (adam && sbf != 2) v_st(vp, j, vf_load(vn + (i_ - lo)), sbf);                                      \
        if (HM) {                                                                                             \
            vf m = vf_load(mf + (i_ - lo));                                                                   \
            if (INJ) {                                                                                        \
                if (adam) m = vf_fmadd(vf_mul(vcoef, err), vf_load(dn + (i_ - lo)), m);                       \
                else m = vf_fmadd(vcoef, err, m);                                                             \
            }                                                                                                 \
            if (sbf == 2) vf_store(m8 + (i_ - lo), m); /* encoded below, a state block at a time */           \
            else v_st(mp, j, m, sbf);                                                                         \
        }                                                                                                     \
        if (sr) vidx = vi_add(vidx, vi_set1(VL));                                                             \
    } while (0)
        /* 16 elements per iteration (one 64-byte line of fp32 per stream): one prefetch per stream */
#define B_LOOP(HM, INJ, KH)                                                                                   \
    do {                                                                                                      \
        for (; i + 16 <= vhi; i += 16) {                                                                      \
            const int64_t n = base + i + ahead;                                                               \
            if (adam) _mm_prefetch(pf_v + n * esz_s, PF_HINT);                                                \
            if ((i & 63) == 0)                                                                                \
                _mm_prefetch(pf_codes + (fmt == FMT_BF16 ? 2 * n : fmt == FMT_INT4 ? n / 2 : n), PF_HINT);    \
            for (int u_ = 0; u_ < 16; u_ += VL) B_VEC(i + u_, HM, INJ, KH);                                   \
        }                                                                                                     \
        for (; i + VL <= vhi; i += VL) B_VEC(i, HM, INJ, KH);                                                 \
    } while (0)
        /* one loop per momentum/injection/kahan case, so that the loop body has no branches */
        const int hm = adam || has_m;
        if (kahan) {
            if (hm) B_LOOP(1, 0, 1);
            else B_LOOP(0, 0, 1);
        } else if (hm) {
            if (inject) B_LOOP(1, 1, 0);
            else B_LOOP(1, 0, 0);
        } else {
            B_LOOP(0, 0, 0);
        }
#undef B_LOOP
#undef B_VEC
        if (kahan) astat_vec(&st, vmax, vmin);
    }
#endif
    (void)mk;
    for (; i < hi; i++) {
        const int64_t j = base + i;
        const float w = wt[i - lo];
        float y = unscaled ? w : w / s;
        y = y < -fmax ? -fmax : (y > fmax ? fmax : y);
        float q;
        if (!sr) {
            q = round_nearest(y, fmt);
        } else if (fmt == FMT_BF16) {
            const uint32_t u = f_bits(y), L = u & 0xFFFFu, T = u & 0xFFFF0000u;
            const int neg = (u >> 31) != 0;
            const float fl = (float)L * 0x1p-16f;
            const int up = uniform(k1, k2, (uint64_t)j) < (neg ? 1.0f - fl : fl);
            q = bits_f(L == 0 ? u : T + ((up != neg) ? 0x10000u : 0u));
        } else if (fmt == FMT_INT8 || fmt == FMT_INT4) {
            const float f = floorf(y);
            q = f + (float)(uniform(k1, k2, (uint64_t)j) < y - f);
        } else {
            int32_t e = (int32_t)((f_bits(y) >> 23) & 0xFFu) - 127;
            const int32_t k = (e < emin ? emin : e) - man;
            const float sp = bits_f((uint32_t)(k + 127) << 23);
            const float r = y / sp; /* exact: a power of two */
            const float f = floorf(r);
            q = (f + (float)(uniform(k1, k2, (uint64_t)j) < r - f)) * sp;
        }
        store_code(codes, j, q, fmt);
        const float err = w - q * s; /* w_til - w_hat */
        if (mst) mst[j] = w;
        if (erp) erp[j] = err;
        if (kahan) {
            wt[i - lo] = err;
            astat_scalar(&st, err);
        }
        if (adam && sbf != 2) {
            if (sbf) ((uint16_t *)vp)[j] = f32_to_bf16(vn[i - lo]);
            else ((float *)vp)[j] = vn[i - lo];
        }
        if (has_m) {
            float m = mf[i - lo];
            if (inject) {
                if (adam) m = fmaf(coef * err, dn[i - lo], m); /* addcmul_(e, denom, value=coef) */
                else m = fmaf(coef, err, m);              /* add_(e, alpha=coef) */
            }
            if (sbf == 2) m8[i - lo] = m;
            else if (sbf) ((uint16_t *)mp)[j] = f32_to_bf16(m);
            else ((float *)mp)[j] = m;
        }
    }
    if (sbf == 2) /* encode both moments, one state block (s8bs elements, aligned with this range) at a time */
        for (int64_t r = lo; r < hi; r += a->s8bs) {
            const int64_t r1 = r + a->s8bs < hi ? r + a->s8bs : hi, sb = (base + r) / a->s8bs;
            s8_encode(m8 + (r - lo), (uint8_t *)mp, a->m_absmax + sb, base + r, base + r1, a->t7, a->b7rtn, a->b7sr,
                      128, a->nbkt, 1, a->s8sr, a->mk1, a->mk2);
            s8_encode(vn + (r - lo), (uint8_t *)vp, a->v_absmax + sb, base + r, base + r1, a->t8, a->b8rtn, a->b8sr,
                      256, a->nbkt, 0, a->s8sr, a->vk1, a->vk2);
        }
    return st;
}

/* sweep C (mode 'kahan'): the error e (in the scratch) quantized to nearest with its own block scale cs into
 * the compensation's codes, as the reference's quantize(w_til - w_hat) (mk: divide by cs with v_div_mk) */
static inline __attribute__((always_inline)) void sweep_c(const eco_args *a, int64_t b, int64_t n, float cs, int mk,
                                                          const float *e, const int fmt) {
    const int64_t base = b * a->bs;
    const float fmax = a->fmax;
    void *const comp = a->comp;
    int64_t i = 0;
#if ECO_VEC
    {
        const int man = fmt == FMT_E4M3 ? 3 : 2, emin = fmt == FMT_E4M3 ? -6 : -14, bias = fmt == FMT_E4M3 ? 7 : 15;
        const vf vs = vf_set1(cs), vrs = vf_set1(1.0f / cs), vhi_ = vf_set1(fmax), vlo = vf_set1(-fmax);
        const vi vminexp = vi_set1((emin + 127) << 23), vexpmask = vi_set1(0x7F800000),
                 vmagic = vi_set1(((23 - man) << 23) | 0x400000);
        for (; i + VL <= n; i += VL) {
            const vf x = vf_load(e + i);
            vf y = fmt == FMT_BF16 ? x : mk ? v_div_mk(x, vs, vrs) : vf_div(x, vs);
            y = vf_min(vf_max(y, vlo), vhi_);
            v_store_codes(comp, base + i, v_round_nearest(y, x, fmt, vexpmask, vminexp, vmagic), fmt, bias);
        }
    }
#endif
    (void)mk;
    for (; i < n; i++) {
        float y = fmt == FMT_BF16 ? e[i] : e[i] / cs;
        y = y < -fmax ? -fmax : (y > fmax ? fmax : y);
        store_code(comp, base + i, round_nearest(y, fmt), fmt);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Dispatch on the compile-time flags so that each combination gets its own vectorised loop.             */
static astat sweep_a(const eco_args *a, int64_t b, int64_t lo, int64_t hi, float *wt, float *dn, float *mf,
                     float *vn, int vec) {
#define A_CASE(G, S, F)                                                                       \
    if (a->grad_bf16 == G && a->state_bf16 == S && a->fmt == F)                               \
        return a->optimizer == 0 || S == 2 ? adamw_sweep_a(a, b, lo, hi, wt, dn, mf, vn, vec, G, S, F) \
                                           : sgd_sweep_a(a, b, lo, hi, wt, mf, vec, G, S, F);
#define A_FMTS(G, S) A_CASE(G, S, FMT_E4M3) A_CASE(G, S, FMT_E5M2) A_CASE(G, S, FMT_INT8) A_CASE(G, S, FMT_BF16) \
    A_CASE(G, S, FMT_INT4)
    A_FMTS(0, 0) A_FMTS(0, 1) A_FMTS(1, 0) A_FMTS(1, 1) A_FMTS(0, 2) A_FMTS(1, 2)
    astat bad = {0.0f, INFINITY, 1};
    return bad;
#undef A_FMTS
#undef A_CASE
}

/* sweep A, re-run exactly (scalar code: true divisions) if the fast sweep saw a NaN/Inf, which is also how
 * the fast path's shortcuts fail (an Inf second moment); the block is then non-finite only if the exact
 * sweep says so */
static astat sweep_a_checked(const eco_args *a, int64_t b, int64_t lo, int64_t hi, float *wt, float *dn,
                             float *mf, float *vn) {
    astat st = sweep_a(a, b, lo, hi, wt, dn, mf, vn, 1);
    if (st.bad) st = sweep_a(a, b, lo, hi, wt, dn, mf, vn, 0);
    return st;
}

/* sweep B, then for mode 'kahan' sweep C and the compensation's new scale (small blocks only: lo = 0, hi = bs) */
static void sweep_b_any(const eco_args *a, int64_t b, int64_t lo, int64_t hi, float s, int mk, float *wt,
                        const float *dn, const float *mf, const float *vn) {
    const int adam = a->optimizer == 0;
    astat e = {0.0f, INFINITY, 0};
#define B_CASE(S, F, R)                                                                          \
    if (a->state_bf16 == S && a->fmt == F && a->stochastic == R)                                 \
        e = adam || S == 2 ? sweep_b(a, b, lo, hi, s, mk, wt, dn, mf, vn, S, F, R, 1)            \
                           : sweep_b(a, b, lo, hi, s, mk, wt, dn, mf, vn, S, F, R, 0);           \
    else
#define B_FMTS(S, R) B_CASE(S, FMT_E4M3, R) B_CASE(S, FMT_E5M2, R) B_CASE(S, FMT_INT8, R) B_CASE(S, FMT_BF16, R) \
    B_CASE(S, FMT_INT4, R)
    B_FMTS(0, 0) B_FMTS(0, 1) B_FMTS(1, 0) B_FMTS(1, 1) B_FMTS(2, 0) B_FMTS(2, 1) {}
#undef B_FMTS
#undef B_CASE
    if (a->comp == NULL) return;
    const float cs = block_scale(a, e.amax); /* the compensation is scaled iff the weight is */
    const int cmk = markstein_ok(cs, e);
    switch (a->fmt) {
    case FMT_E4M3: sweep_c(a, b, hi - lo, cs, cmk, wt, FMT_E4M3); break;
    case FMT_E5M2: sweep_c(a, b, hi - lo, cs, cmk, wt, FMT_E5M2); break;
    case FMT_INT8: sweep_c(a, b, hi - lo, cs, cmk, wt, FMT_INT8); break;
    case FMT_BF16: sweep_c(a, b, hi - lo, cs, cmk, wt, FMT_BF16); break;
    default: sweep_c(a, b, hi - lo, cs, cmk, wt, FMT_INT4); break;
    }
    if (a->comp_scale) a->comp_scale[b] = cs;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Threading: one team of threads steps every tensor of the call (one thread creation per optimizer step,  */
/* not per tensor). Blocks of up to SPLIT elements are taken in chunks from a shared counter, each thread   */
/* sweeping its blocks in its own in-cache scratch; a larger block (a per-tensor scale) is shared out among */
/* the threads and swept in two passes, with a barrier in between to combine the block statistics.        */
#define SPLIT 65536
#define NSCRATCH 4 /* w_til, denominator, momentum, second moment */
#define CHUNK 16384 /* elements of small blocks per unit of work */
#define RANGE 4096  /* elements of a large block swept at a time: its scratch stays in L1/L2 */

/* fn(items[0]) .. fn(items[n-1]) concurrently (item t at base + t*size); the caller runs item 0.
 * Built with OpenMP (kernels.py does where the compiler can), the items run on the OpenMP thread pool, which
 * is torch's own (kernels.py links the library to the libgomp file torch loaded, so the loader reuses it): its
 * workers are already running, and still spinning after torch's last parallel op (backward), so the step
 * does not have to compete with them for the cores, as threads of its own would. */
static void run_parallel(void *(*fn)(void *), void *base, size_t size, int n) {
    char *items = (char *)base;
#ifdef _OPENMP
    if (n > 1) {
#pragma omp parallel num_threads(n)
        { /* a smaller team than asked for (OMP_THREAD_LIMIT, nesting) runs the remaining items in turn */
            const int got = omp_get_num_threads();
            for (int t = omp_get_thread_num(); t < n; t += got) fn(items + t * size);
        }
        return;
    }
#else
    pthread_t th[64];
    int started[64] = {0};
    for (int t = 1; t < n; t++) started[t] = pthread_create(&th[t], NULL, fn, items + t * size) == 0;
    for (int t = 1; t < n; t++) if (!started[t]) fn(items + t * size); /* no thread: do it here */
    for (int t = 1; t < n; t++) if (started[t]) pthread_join(th[t], NULL);
#endif
    fn(items);
}

typedef struct {
    eco_args *const *args;
    int n, nt, tid;
    pthread_barrier_t *bar; /* unused with OpenMP (its team barrier) */
    float *scratch;       /* this thread's: NSCRATCH x the largest small block (or RANGE) */
    astat *partial;       /* shared: one per thread */
    int64_t *next;        /* shared: the next chunk of small blocks to take */
    const int64_t *cend;  /* per tensor: one past its last chunk (chunks of all tensors numbered in order) */
    const int64_t *cblk;  /* per tensor: blocks per chunk */
} team;

static void team_barrier(team *tm) {
#ifdef _OPENMP
    (void)tm;
#pragma omp barrier
#else
    pthread_barrier_wait(tm->bar);
#endif
}

static void *team_run(void *p) {
    team *tm = (team *)p;
    const int nt = tm->nt, tid = tm->tid;
    /* Small blocks: chunks are taken from a shared counter rather than dealt out in equal shares, so a thread
     * whose core is busier (a noisy neighbour, an interrupt) takes fewer and nobody waits for it at the end. */
    float *wt = tm->scratch;
    for (int k = 0;;) {
        const int64_t c = __atomic_fetch_add(tm->next, 1, __ATOMIC_RELAXED);
        if (k >= tm->n || c >= tm->cend[tm->n - 1]) break;
        while (c >= tm->cend[k]) k++; /* a thread's chunks come in increasing order */
        eco_args *a = tm->args[k];
        const int64_t bs = a->bs, first = (c - (k ? tm->cend[k - 1] : 0)) * tm->cblk[k];
        const int64_t last = first + tm->cblk[k] < a->nb ? first + tm->cblk[k] : a->nb;
        float *dn = wt + bs, *mf = dn + bs, *vn = mf + bs;
        int64_t bad = 0;
        for (int64_t b = first; b < last; b++) {
            const astat st = sweep_a_checked(a, b, 0, bs, wt, dn, mf, vn);
            if (st.bad) { bad++; continue; } /* nothing of this block was written */
            const float s = block_scale(a, st.amax);
            if (a->scale) a->scale[b] = s;
            sweep_b_any(a, b, 0, bs, s, markstein_ok(s, st), wt, dn, mf, vn);
        }
        if (bad) __atomic_fetch_add(&a->nonfinite, bad, __ATOMIC_RELAXED);
    }
    /* Large blocks (a per-tensor scale): every thread takes an even share of the block, in ranges of up to
     * RANGE elements. Pass 1 runs sweep A over the share for the statistics only (nothing is kept: a
     * block-sized scratch would not fit any cache); the statistics meet at a barrier; pass 2 runs sweep A again
     * range by range, now followed by sweep B while the range is in cache. Sweep A is deterministic, so both
     * passes see the same w_til. */
    for (int k = 0; k < tm->n; k++) {
        eco_args *a = tm->args[k];
        const int64_t bs = a->bs;
        if (a->nb <= 0 || bs <= SPLIT) continue;
        int64_t per = (bs + nt - 1) / nt;
        per = (per + 63) / 64 * 64;
        const int64_t lo = tid * per < bs ? tid * per : bs, hi = lo + per < bs ? lo + per : bs;
        float *dn = wt + RANGE, *mf = dn + RANGE, *vn = mf + RANGE;
        for (int64_t b = 0; b < a->nb; b++) {
            astat st = {0.0f, INFINITY, 0};
            for (int64_t r = lo; r < hi; r += RANGE)
                astat_merge(&st, sweep_a_checked(a, b, r, r + RANGE < hi ? r + RANGE : hi, wt, dn, mf, vn));
            tm->partial[tid] = st;
            team_barrier(tm);
            st = tm->partial[0];
            for (int t = 1; t < nt; t++) astat_merge(&st, tm->partial[t]); /* every thread gets the same */
            const float s = st.bad ? 0.0f : block_scale(a, st.amax);
            if (!st.bad) {
                const int mk = markstein_ok(s, st);
                for (int64_t r = lo; r < hi; r += RANGE) {
                    const int64_t r1 = r + RANGE < hi ? r + RANGE : hi;
                    sweep_a_checked(a, b, r, r1, wt, dn, mf, vn);
                    sweep_b_any(a, b, r, r1, s, mk, wt, dn, mf, vn);
                }
            }
            team_barrier(tm); /* every pass-2 sweep A has read the old scale; partials are reused */
            if (tid == 0) {
                if (st.bad) a->nonfinite++;
                else if (a->scale) a->scale[b] = s;
            }
        }
    }
    return NULL;
}

#ifndef _OPENMP /* threads of its own: the team is started behind a gate (see eco_step_many) */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; /* 0 wait, 1 go, 2 abort */
} gate;

typedef struct {
    gate *g;
    team *tm;
} gated;

static void *gated_run(void *p) {
    gated *x = (gated *)p;
    pthread_mutex_lock(&x->g->mu);
    while (x->g->state == 0) pthread_cond_wait(&x->g->cv, &x->g->mu);
    int go = x->g->state == 1;
    pthread_mutex_unlock(&x->g->mu);
    if (go) team_run(x->tm);
    return NULL;
}
#endif

/* Step n tensors with up to nthreads threads. Returns 0, -1 if scratch memory could not be allocated, or -2
 * for 8-bit moments whose blocks do not fit or a kahan block larger than SPLIT (then nothing was modified).
 * Each args->nonfinite counts the blocks whose update came out NaN/Inf: those blocks are left exactly as they
 * were (codes, scale, moments). */
int eco_step_many(eco_args *const *args, int32_t n, int32_t nthreads) {
    int64_t small = 0, total = 0; /* small: the largest block of at most SPLIT elements */
    int big = 0;                  /* any larger block (swept RANGE elements at a time, behind barriers)? */
    for (int k = 0; k < n; k++) { /* 8-bit moments: AdamW, state blocks (a power of two >= 8) tiling each block */
        const eco_args *a = args[k];
        if (a->state_bf16 == 2 && (a->optimizer != 0 || a->bs > SPLIT || a->s8bs < 8 || (a->s8bs & (a->s8bs - 1))
                                   || a->bs % a->s8bs))
            return -2;
        if (a->comp && a->bs > SPLIT) return -2; /* kahan: the error must stay in the block's scratch */
    }
    for (int k = 0; k < n; k++) {
        args[k]->nonfinite = 0;
        if (args[k]->nb <= 0 || args[k]->bs <= 0) continue;
        total += args[k]->nb * args[k]->bs;
        if (args[k]->bs <= SPLIT) small = args[k]->bs > small ? args[k]->bs : small;
        else big = 1;
    }
    int nt = nthreads < 1 ? 1 : (nthreads > 64 ? 64 : nthreads);
    if (total < 32768) nt = 1; /* starting a thread costs more than sweeping this little */
    /* chunks of about CHUNK elements of small blocks, numbered tensor after tensor */
    int64_t *cend = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(n > 0 ? n : 1)), *cblk = cend + n, next = 0;
    if (!cend) return -1;
    for (int k = 0; k < n; k++) {
        const eco_args *a = args[k];
        const int small_blocks = a->nb > 0 && a->bs > 0 && a->bs <= SPLIT;
        cblk[k] = small_blocks ? (CHUNK / a->bs > 1 ? CHUNK / a->bs : 1) : 1;
        cend[k] = (k ? cend[k - 1] : 0) + (small_blocks ? (a->nb + cblk[k] - 1) / cblk[k] : 0);
    }
    const size_t per_thread = NSCRATCH * (size_t)(big && RANGE > small ? RANGE : small);
    float *scratch = (float *)malloc(sizeof(float) * per_thread * nt + sizeof(astat) * (size_t)nt + 64);
    if (!scratch) { free(cend); return -1; }
    team tm[64];
    for (int t = 0; t < nt; t++) {
        tm[t].args = args; tm[t].n = n; tm[t].nt = nt; tm[t].tid = t; tm[t].bar = NULL;
        tm[t].scratch = scratch + per_thread * t;
        tm[t].partial = (astat *)(scratch + per_thread * nt);
        tm[t].next = &next; tm[t].cend = cend; tm[t].cblk = cblk;
    }
#ifdef _OPENMP
    if (nt > 1) {
        /* one member per thread of the team OpenMP gives (it may be smaller than asked for): the large blocks'
         * shares and barriers are sized by the team actually running */
#pragma omp parallel num_threads(nt)
        {
            const int tid = omp_get_thread_num();
            tm[tid].nt = omp_get_num_threads();
            team_run(&tm[tid]);
        }
    } else {
        team_run(&tm[0]);
    }
#else
    pthread_barrier_t bar;
    if (big && pthread_barrier_init(&bar, NULL, (unsigned)nt) != 0) { free(scratch); free(cend); return -1; }
    for (int t = 0; t < nt; t++) tm[t].bar = &bar;
    if (big) {
        /* Barriers need every member running at once, so the team is started behind a gate: if a thread
         * cannot be created, the ones already waiting are sent home and the step runs on one thread. */
        gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
        gated tg[64];
        pthread_t th[64];
        int started = 1;
        for (; started < nt; started++) {
            tg[started].g = &g;
            tg[started].tm = &tm[started];
            if (pthread_create(&th[started], NULL, gated_run, &tg[started]) != 0) break;
        }
        pthread_mutex_lock(&g.mu);
        g.state = started == nt ? 1 : 2;
        pthread_cond_broadcast(&g.cv);
        pthread_mutex_unlock(&g.mu);
        if (started == nt) team_run(&tm[0]);
        for (int t = 1; t < started; t++) pthread_join(th[t], NULL);
        pthread_barrier_destroy(&bar);
        if (started != nt) {
            free(scratch);
            free(cend);
            return eco_step_many(args, n, 1);
        }
    } else {
        run_parallel(team_run, tm, sizeof(team), nt);
    }
#endif
    free(scratch);
    free(cend);
    return 0;
}


/* the stochastic-rounding uniforms u_0 .. u_{n-1} of a key: rng.uniform on CPU (the reference path's SR) */
void eco_uniform(uint32_t k1, uint32_t k2, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = uniform(k1, k2, (uint64_t)i);
}

/* ---------------------------------------------------------------------------------------------------- */
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
int eco_all_finite(void *const *ptrs, const int64_t *numels, const int32_t *dtypes, int32_t n, int32_t nthreads) {
    int nt = nthreads < 1 ? 1 : (nthreads > 64 ? 64 : nthreads);
    int64_t total = 0;
    for (int32_t t = 0; t < n; t++) total += numels[t];
    if (total < 262144) nt = 1; /* one core reads this much faster than a thread starts */
    finite_work ws[64];
    for (int t = 0; t < nt; t++) {
        ws[t].ptrs = ptrs; ws[t].numels = numels; ws[t].dtypes = dtypes; ws[t].n = n;
        ws[t].part = t; ws[t].parts = nt; ws[t].bad = 0;
    }
    run_parallel(finite_worker, ws, sizeof(finite_work), nt);
    int bad = 0;
    for (int t = 0; t < nt; t++) bad |= ws[t].bad;
    return !bad;
}

/* ---------------------------------------------------------------------------------------------------- */
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
        const __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        const __m256d y0 = _mm256_cvtps_pd(_mm256_castps256_ps128(y)), y1 = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
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
int eco_sumsq(void *const *ptrs, const int64_t *numels, const int32_t *dtypes, int32_t n, int32_t nthreads,
              double *out) {
    int64_t *cfirst = (int64_t *)malloc(sizeof(int64_t) * ((size_t)n + 1)), next = 0;
    if (!cfirst) return -1;
    cfirst[0] = 0;
    for (int32_t t = 0; t < n; t++) cfirst[t + 1] = cfirst[t] + (numels[t] + NORM_CHUNK - 1) / NORM_CHUNK;
    double *chunk = (double *)malloc(sizeof(double) * (size_t)(cfirst[n] > 0 ? cfirst[n] : 1));
    if (!chunk) { free(cfirst); return -1; }
    int nt = nthreads < 1 ? 1 : (nthreads > 64 ? 64 : nthreads);
    if (cfirst[n] < 4) nt = 1; /* one core reads this much faster than a thread starts */
    sumsq_work ws[64];
    for (int t = 0; t < nt; t++) {
        sumsq_work w = {ptrs, numels, cfirst, dtypes, n, &next, chunk};
        ws[t] = w;
    }
    run_parallel(sumsq_worker, ws, sizeof(sumsq_work), nt);
    for (int32_t t = 0; t < n; t++) {
        double s = 0.0;
        for (int64_t c = cfirst[t]; c < cfirst[t + 1]; c++) s += chunk[c];
        out[t] = s;
    }
    free(chunk);
    free(cfirst);
    return 0;
}

static void *s8_worker(void *p) {
    const s8_work *w = (const s8_work *)p;
    const int64_t nb = (w->n + w->bs - 1) / w->bs, per = (nb + w->parts - 1) / w->parts;
    const int64_t b0 = per * w->part, b1 = b0 + per < nb ? b0 + per : nb;
    for (int64_t b = b0; b < b1; b++) s8_block(w, b);
    return NULL;
}

/* decode = 0: x (fp32, n) -> codes + absmax; decode = 1: codes + absmax -> x. Threads share the blocks. */
void eco_state8(float *x, uint8_t *codes, float *absmax, const float *table, const int32_t *brtn,
                const int32_t *bsr, int32_t nbkt, int64_t n, int64_t bs, int32_t ntab, int32_t is_signed, int32_t sr,
                uint32_t k1, uint32_t k2, int32_t decode, int32_t nthreads) {
    int nt = nthreads < 1 ? 1 : (nthreads > 64 ? 64 : nthreads);
    if (n < 65536) nt = 1;
    s8_work ws[64];
    for (int t = 0; t < nt; t++) {
        s8_work w = {x, codes, absmax, table, brtn, bsr, n, bs, ntab, nbkt, is_signed, sr, k1, k2, t, nt, decode};
        ws[t] = w;
    }
    run_parallel(s8_worker, ws, sizeof(s8_work), nt);
}

int eco_abi_version(void) { return 12; }

/* lanes of the sweeps' vector code in this build: 16 (AVX-512), 8 (AVX2) or 1 (the scalar code) */
int eco_vector_lanes(void) {
#if ECO_VEC
    return VL;
#else
    return 1;
#endif
}
