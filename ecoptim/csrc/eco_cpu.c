/* ecoptim CPU kernels: one fused pass per block (row / group / tensor) for quantized-weight AdamW and SGD.
 *
 * Each block is processed in two sweeps over data that stays in L1/L2:
 *   sweep A  dequantize -> optimizer update -> w_til (kept in a block-sized fp32 scratch) + block absmax
 *   sweep B  new scale -> round (RTN or SR) -> codes; e = w_til - w_hat; ECO injection into the momentum
 * so memory sees every stored byte read once and written once.
 *
 * Numerics: every operation is the IEEE operation ATen's CPU kernels perform for the reference path
 * (ecoptim/optim/adamw.py, sgd.py, codec.py, rounding.py), in the same order, with fused multiply-adds
 * exactly where ATen's vectorised kernels use them (lerp, addcmul), and none elsewhere: the file is built
 * with -ffp-contract=off so the compiler cannot add any. Square roots are IEEE (the reference uses
 * adamw.sqrt_rn for quantized weights because torch.sqrt on fp32 is not correctly rounded). Divisions by a
 * per-block constant use a reciprocal and one fma correction that provably gives the IEEE quotient (see
 * v_div_rn). tests/test_kernels.py checks bit equality of codes, scales and states.
 * Stochastic rounding uses the counter-based uniforms of ecoptim/rng.py (same hash, same element index).
 *
 * Layout: scalar helpers; AVX2/FMA/F16C helpers (8 lanes; the scalar code handles tails and other CPUs);
 * sweep A (AdamW, SGD); sweep B; dispatch on dtypes/format; the thread team; the gradient finiteness check.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ECO_AVX2 1
#else
#define ECO_AVX2 0
#endif

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
    int32_t man_bits, emin, optimizer; /* optimizer: 0 AdamW, 1 SGD (momentum, dampening, nesterov below) */
    int32_t nesterov, first_step;
    float fmax;
    /* AdamW scalars (already rounded to fp32, as ATen does with Python scalars) */
    float decay, w1, b2, omb2, bc2s, eps, neg_step, coef;
    /* SGD scalars */
    float wd, mom, omd, neg_lr;
    uint32_t k1, k2;      /* stochastic-rounding key (drawn from the optimizer's torch.Generator) */
    int64_t nonfinite;    /* out: blocks whose w_til held NaN/Inf (left unquantized) */
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
static inline float decode_scalar(const eco_args *a, int64_t j, const int fmt) {
    const uint8_t *c = (const uint8_t *)a->codes;
    if (fmt == FMT_INT8) return (float)((const int8_t *)c)[j];
    if (fmt == FMT_BF16) return bf16_to_f32(((const uint16_t *)c)[j]);
    if (fmt == FMT_INT4) return (float)((int)((c[j >> 1] >> (4 * (j & 1))) & 0xF) - 8);
    return a->lut[c[j]];
}
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }


#if ECO_AVX2
/* 8-lane versions of the helpers above: the same IEEE operations, eight at a time. */
static inline __m256 v_ld(const void *p, int64_t j, const int bf) {
    if (bf) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    return _mm256_loadu_ps((const float *)p + j);
}

static inline void v_st(void *p, int64_t j, __m256 x, const int bf) {
    if (bf) {
        __m256i u = _mm256_castps_si256(x);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                         _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                          _mm256_set1_epi32(1))));
        r = _mm256_srli_epi32(r, 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + j), packed);
        return;
    }
    _mm256_storeu_ps((float *)p + j, x);
}

/* codes j .. j+7 as fp32, exactly; e4m3 comes out divided by 256 (the caller folds 256 into the scale):
 * e5m2 is the top byte of an fp16; e4m3 moved into fp16's bit positions (sign to bit 15, the rest shifted
 * by 7) is the fp16 whose value is the e4m3 value / 256, subnormals included, so F16C converts both.
 * bf16 is the top half of an fp32; int8/int4 convert through int32. */
static inline __m256 v_decode_p(const void *codes, int64_t j, const int fmt) {
    if (fmt == FMT_BF16) return v_ld(codes, j, 1);
    if (fmt == FMT_INT4) { /* j is even: 8 codes in 4 bytes */
        uint32_t packed;
        memcpy(&packed, (const uint8_t *)codes + j / 2, 4);
        const __m128i x = _mm_cvtsi32_si128((int)packed), m4 = _mm_set1_epi8(0x0F);
        const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), _mm256_set1_epi32(8)));
    }
    __m128i c8 = _mm_loadl_epi64((const __m128i *)((const uint8_t *)codes + j));
    if (fmt == FMT_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8));
    __m128i c16 = _mm_cvtepu8_epi16(c8);
    if (fmt == FMT_E5M2) return _mm256_cvtph_ps(_mm_slli_epi16(c16, 8));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c16, _mm_set1_epi16(0x80)), 8),
                             _mm_slli_epi16(_mm_and_si128(c16, _mm_set1_epi16(0x7F)), 7));
    return _mm256_cvtph_ps(h);
}

static inline __m256i v_mix32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7feb352dU));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bU));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    return x;
}

/* the largest of the 8 lanes (the lanes hold |w| >= 0, NaN tracked separately) */
static inline float v_hmax(__m256 x) {
    float tmp[8], mx = 0.0f;
    _mm256_storeu_ps(tmp, x);
    for (int t = 0; t < 8; t++) mx = tmp[t] > mx ? tmp[t] : mx;
    return mx;
}

/* a / b, correctly rounded, for a divisor b shared by the whole block (rinv = 1/b, correctly rounded):
 * q0 = a*rinv is within one ulp of a/b, the residual a - b*q0 is exact in an fma, and one correction
 * q0 + r*rinv rounds to exactly RN(a/b) (Markstein's theorem). The theorem needs no underflow/overflow,
 * so lanes with |a| outside [2^-90, 2^90] (zeros, to keep the sign of -0, and NaN/Inf) take a true division.
 * Two fmas and a multiply instead of a divide: the divider is the bottleneck of this kernel. */
static inline __m256 v_div_rn(__m256 a, __m256 b, __m256 rinv) {
    const __m256 q0 = _mm256_mul_ps(a, rinv);
    const __m256 r = _mm256_fnmadd_ps(q0, b, a);
    __m256 q = _mm256_fmadd_ps(r, rinv, q0);
    const __m256 aa = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(aa, _mm256_set1_ps(0x1p-90f), _CMP_GE_OQ),
                                    _mm256_cmp_ps(aa, _mm256_set1_ps(0x1p90f), _CMP_LE_OQ));
    if (_mm256_movemask_ps(ok) != 0xFF) q = _mm256_blendv_ps(_mm256_div_ps(a, b), q, ok);
    return q;
}

/* sqrt(v) / b for the AdamW denominator: a = sqrt(v) is +0 (for which the correction is exact too) or at
 * least 2^-75, so only a huge (or infinite) a needs the true division. */
static inline __m256 v_div_sqrt_rn(__m256 a, __m256 b, __m256 rinv) {
    const __m256 q0 = _mm256_mul_ps(a, rinv);
    __m256 q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, b, a), rinv, q0);
    const __m256 big = _mm256_cmp_ps(a, _mm256_set1_ps(0x1p90f), _CMP_GT_OQ);
    if (_mm256_movemask_ps(big)) q = _mm256_blendv_ps(q, _mm256_div_ps(a, b), big);
    return q;
}

/* uniforms for indices j .. j+7 (the caller guarantees the low 32 bits do not wrap inside the vector) */
static inline __m256 v_uniform(uint32_t k1, uint32_t k2, uint64_t j) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i h = v_mix32(_mm256_xor_si256(idx, _mm256_set1_epi32((int)k1)));
    h = v_mix32(_mm256_xor_si256(h, _mm256_set1_epi32((int)(k2 + (uint32_t)(j >> 32)))));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
}

static inline void v_store_codes(const eco_args *a, int64_t j, __m256 q, const int fmt, int man, int bias) {
    __m256i code;
    if (fmt == FMT_BF16) { /* q is on the bf16 grid: its top 16 bits are the code */
        __m256i c = _mm256_srli_epi32(_mm256_castps_si256(q), 16);
        _mm_storeu_si128((__m128i *)((uint16_t *)a->codes + j),
                         _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
        return;
    }
    if (fmt == FMT_INT4) {
        __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(q), _mm256_set1_epi32(8)); /* 1 .. 15 */
        __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        __m128i p8 = _mm_packus_epi16(p16, p16); /* one code per byte */
        /* 16-bit lanes now hold (code 2i, code 2i+1): low | high << 4 gives the packed byte */
        __m128i pair = _mm_or_si128(_mm_and_si128(p8, _mm_set1_epi16(0x0F)),
                                    _mm_slli_epi16(_mm_srli_epi16(p8, 8), 4));
        const uint32_t packed = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(pair, pair));
        memcpy((uint8_t *)a->codes + j / 2, &packed, 4);
        return;
    }
    if (fmt == FMT_INT8) {
        __m256i c = _mm256_cvtps_epi32(q); /* q is an integer in [-127, 127] */
        __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64((__m128i *)((int8_t *)a->codes + j), _mm_packs_epi16(p16, p16));
        return;
    }
    /* |q| * 2^(bias - 127) moves the fp8 grid onto fp32's bit layout (fp8 subnormals become fp32 subnormals,
     * exactly), so the top bits of the product are the fp8 exponent and mantissa fields. */
    const __m256 absq = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), q);
    const __m256 shift = _mm256_castsi256_ps(_mm256_set1_epi32(bias << 23));
    __m256i mag = _mm256_srl_epi32(_mm256_castps_si256(_mm256_mul_ps(absq, shift)), _mm_cvtsi32_si128(23 - man));
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(q), 24), _mm256_set1_epi32(0x80));
    code = _mm256_or_si256(sign, mag);
    __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64((__m128i *)((uint8_t *)a->codes + j), _mm_packus_epi16(p16, p16));
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
/* sweep A for AdamW over elements [lo, hi) of block b; returns absmax of w_til (NaN if any is NaN)      */
static inline __attribute__((always_inline)) float adamw_sweep_a(const eco_args *a, int64_t b, int64_t lo,
                                                                  int64_t hi, float *wt, float *dn, float *mf,
                                                                  const int gbf, const int sbf, const int fmt) {
    const int64_t base = b * a->bs;
    const float sc = a->scale ? a->scale[b] : 1.0f; /* unscaled: x * 1 is exact, as no multiply at all */
    const float decay = a->decay, w1 = a->w1, b2 = a->b2, omb2 = a->omb2, bc2s = a->bc2s, eps = a->eps,
                ns = a->neg_step;
    const int small = w1 < 0.5f;
    const float coeff = small ? w1 : w1 - 1.0f;
    float amax = 0.0f;
    int bad = 0;
    int64_t i = lo;
#if ECO_AVX2
    {
        /* (code/256) * (256*sc) == code * sc exactly: both round the same real product once */
        const __m256 vsc = _mm256_set1_ps(fmt == FMT_E4M3 ? sc * 256.0f : sc), vdecay = _mm256_set1_ps(decay),
                     vcoeff = _mm256_set1_ps(coeff),
                     vb2 = _mm256_set1_ps(b2), vomb2 = _mm256_set1_ps(omb2), vbc2s = _mm256_set1_ps(bc2s),
                     veps = _mm256_set1_ps(eps), vns = _mm256_set1_ps(ns), vrbc2s = _mm256_set1_ps(1.0f / bc2s),
                     absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
        const __m256 vsmall = small ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_setzero_ps();
        /* local copies: stores through float pointers could alias the struct, which would force a reload
         * of every pointer in every iteration */
        const void *codes = a->codes, *grad = a->grad;
        void *mp = a->m, *vp = a->v;
        for (; i + 8 <= hi; i += 8) {
            const int64_t j = base + i;
            __m256 w = _mm256_mul_ps(_mm256_mul_ps(v_decode_p(codes, j, fmt), vsc), vdecay);
            const __m256 g = v_ld(grad, j, gbf);
            __m256 m = v_ld(mp, j, sbf);
            __m256 v = v_ld(vp, j, sbf);
            m = _mm256_fmadd_ps(vcoeff, _mm256_sub_ps(g, m), _mm256_blendv_ps(g, m, vsmall));
            v = _mm256_fmadd_ps(_mm256_mul_ps(vomb2, g), g, _mm256_mul_ps(v, vb2));
            const __m256 d = _mm256_add_ps(v_div_sqrt_rn(_mm256_sqrt_ps(v), vbc2s, vrbc2s), veps);
            w = _mm256_add_ps(w, _mm256_div_ps(_mm256_mul_ps(vns, m), d));
            _mm256_storeu_ps(wt + i, w);
            _mm256_storeu_ps(dn + i, d);
            _mm256_storeu_ps(mf + i, m); /* the state is written once, by sweep B, after the injection */
            v_st(vp, j, v, sbf);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(w, absmask));
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(w, w, _CMP_UNORD_Q));
        }
        amax = v_hmax(vmax);
        bad |= _mm256_movemask_ps(vbad) != 0;
    }
#endif
    for (; i < hi; i++) {
        const int64_t j = base + i;
        float w = decode_scalar(a, j, fmt) * sc;
        w = w * decay;
        const float g = ld_scalar(a->grad, j, gbf);
        float m = ld_scalar(a->m, j, sbf);
        float v = ld_scalar(a->v, j, sbf);
        /* lerp_(g, w1): ATen's lerp_vec = fmadd(coeff, end - self, base) */
        m = fmaf(coeff, g - m, small ? m : g);
        /* mul_(b2).addcmul_(g, g, value=1-b2) */
        v = v * b2;
        v = fmaf(omb2 * g, g, v);
        /* denom = sqrt(v) / sqrt(bc2) + eps */
        const float d = sqrtf(v) / bc2s + eps;
        /* addcdiv_(m, d, value=-step_size) */
        w = w + ns * m / d;
        wt[i] = w;
        dn[i] = d;
        mf[i] = m;
        if (sbf) ((uint16_t *)a->v)[j] = f32_to_bf16(v);
        else ((float *)a->v)[j] = v;
        const float aw = fabsf(w);
        amax = aw > amax ? aw : amax;
        bad |= (w != w);
    }
    return bad ? NAN : amax;
}

/* SGD sweep A: torch.optim.SGD single-tensor ops (grad.add(w, alpha=wd); buf.mul_(mom).add_(g, alpha=1-d);
 * nesterov: g.add(buf, alpha=mom); w.add_(d, alpha=-lr)). ATen's add with alpha is a + alpha*b via fmadd. */
static inline __attribute__((always_inline)) float sgd_sweep_a(const eco_args *a, int64_t b, int64_t lo,
                                                                int64_t hi, float *wt, float *mf,
                                                                const int gbf, const int sbf, const int fmt) {
    const int64_t base = b * a->bs;
    const float sc = a->scale ? a->scale[b] : 1.0f; /* unscaled: x * 1 is exact, as no multiply at all */
    const float wd = a->wd, mom = a->mom, omd = a->omd, nl = a->neg_lr;
    const int first = a->first_step, nest = a->nesterov, has_mom = mom != 0.0f;
    float amax = 0.0f;
    int bad = 0;
    int64_t i = lo;
#if ECO_AVX2
    {
        const __m256 vsc = _mm256_set1_ps(fmt == FMT_E4M3 ? sc * 256.0f : sc), vwd = _mm256_set1_ps(wd),
                     vmom = _mm256_set1_ps(mom), vomd = _mm256_set1_ps(omd), vnl = _mm256_set1_ps(nl),
                     absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
        const void *codes = a->codes, *grad = a->grad;
        const void *mp = a->m;
        for (; i + 8 <= hi; i += 8) {
            const int64_t j = base + i;
            __m256 w = _mm256_mul_ps(v_decode_p(codes, j, fmt), vsc);
            __m256 g = v_ld(grad, j, gbf);
            if (wd != 0.0f) g = _mm256_fmadd_ps(vwd, w, g);
            __m256 d = g;
            if (has_mom) {
                __m256 m = first ? g : _mm256_fmadd_ps(vomd, g, _mm256_mul_ps(v_ld(mp, j, sbf), vmom));
                d = nest ? _mm256_fmadd_ps(vmom, m, g) : m;
                _mm256_storeu_ps(mf + i, m);
            }
            w = _mm256_fmadd_ps(vnl, d, w);
            _mm256_storeu_ps(wt + i, w);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(w, absmask));
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(w, w, _CMP_UNORD_Q));
        }
        amax = v_hmax(vmax);
        bad |= _mm256_movemask_ps(vbad) != 0;
    }
#endif
    for (; i < hi; i++) {
        const int64_t j = base + i;
        float w = decode_scalar(a, j, fmt) * sc;
        float g = ld_scalar(a->grad, j, gbf);
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
            mf[i] = m;
        }
        w = fmaf(nl, d, w);
        wt[i] = w;
        const float aw = fabsf(w);
        amax = aw > amax ? aw : amax;
        bad |= (w != w);
    }
    return bad ? NAN : amax;
}

/* codec.compute_scale for one block */
static inline float block_scale(const eco_args *a, float amax) {
    if (a->scale == NULL) return 1.0f; /* unscaled (bf16): the absmax only served the finiteness check */
    float s = amax / a->fmax;
    if (s < 0x1p-126f) s = 0x1p-126f;
    if (isinf(s * a->fmax) && !isinf(s)) s = nextafterf(s, 0.0f);
    return s;
}

/* sweep B: quantize w_til with scale s, write codes, inject s-scaled error into the momentum */
static inline __attribute__((always_inline)) void sweep_b(const eco_args *a, int64_t b, int64_t lo, int64_t hi,
                                                          float s, const float *wt, const float *dn, float *mf,
                                                          const int sbf, const int fmt, const int sr,
                                                          const int adam) {
    const int64_t base = b * a->bs;
    const float fmax = a->fmax, coef = a->coef;
    const int man = a->man_bits, emin = a->emin, bias = fmt == FMT_E4M3 ? 7 : 15;
    const int inject = a->inject, has_m = a->m != NULL, unscaled = a->scale == NULL;
    const uint32_t k1 = a->k1, k2 = a->k2;
    int64_t i = lo;
#if ECO_AVX2
    {
        const __m256 vs = _mm256_set1_ps(s), vrs = _mm256_set1_ps(1.0f / s), vhi = _mm256_set1_ps(fmax),
                     vlo = _mm256_set1_ps(-fmax),
                     vcoef = _mm256_set1_ps(coef), one = _mm256_set1_ps(1.0f);
        const __m256i vminexp = _mm256_set1_epi32((emin + 127) << 23), vmanexp = _mm256_set1_epi32(man << 23);
        /* Sweep B touches only in-cache data, so memory would idle: prefetch the next block's inputs now
         * (the arrays are contiguous, so that is one block ahead of j). */
        const char *pf_codes = (const char *)a->codes, *pf_g = (const char *)a->grad, *pf_m = (const char *)a->m,
                   *pf_v = (const char *)a->v;
        const int esz_g = a->grad_bf16 ? 2 : 4, esz_s = sbf ? 2 : 4;
        const int64_t ahead = a->bs;
        for (; i + 8 <= hi; i += 8) {
            const int64_t j = base + i;
            if (sr && (uint32_t)j > 0xFFFFFFF8u) break; /* the counter's low word wraps inside this vector */
            if ((i & 15) == 0) {
                const int64_t n = j + ahead;
                _mm_prefetch(pf_g + n * esz_g, _MM_HINT_T0);
                if (pf_m) _mm_prefetch(pf_m + n * esz_s, _MM_HINT_T0);
                if (pf_v) _mm_prefetch(pf_v + n * esz_s, _MM_HINT_T0);
                if ((i & 31) == 0)
                    _mm_prefetch(pf_codes + (fmt == FMT_BF16 ? 2 * n : fmt == FMT_INT4 ? n / 2 : n), _MM_HINT_T0);
            }
            const __m256 w = _mm256_loadu_ps(wt + i);
            const __m256 y = _mm256_min_ps(_mm256_max_ps(unscaled ? w : v_div_rn(w, vs, vrs), vlo), vhi);
            __m256 q;
            if (fmt == FMT_BF16) {
                const __m256i u = _mm256_castps_si256(y);
                if (sr) {
                    /* the bf16 grid spacing is the unit of bit 16 (subnormals included), so floor/frac come
                     * from the bit pattern: frac = L/2^16 above zero, 1 - L/2^16 below (L = low 16 bits) */
                    const __m256i L = _mm256_and_si256(u, _mm256_set1_epi32(0xFFFF));
                    const __m256i T = _mm256_andnot_si256(_mm256_set1_epi32(0xFFFF), u);
                    const __m256 fl = _mm256_mul_ps(_mm256_cvtepi32_ps(L), _mm256_set1_ps(0x1p-16f));
                    const __m256 neg = _mm256_castsi256_ps(_mm256_srai_epi32(u, 31));
                    const __m256 frac = _mm256_blendv_ps(fl, _mm256_sub_ps(one, fl), neg);
                    const __m256 up = _mm256_cmp_ps(v_uniform(k1, k2, (uint64_t)j), frac, _CMP_LT_OQ);
                    /* above zero "up" adds one grid step to the magnitude, below zero "not up" does */
                    const __m256 grow = _mm256_xor_ps(up, neg);
                    __m256i qb = _mm256_add_epi32(
                        T, _mm256_and_si256(_mm256_castps_si256(grow), _mm256_set1_epi32(0x10000)));
                    const __m256i exact = _mm256_cmpeq_epi32(L, _mm256_setzero_si256());
                    q = _mm256_castsi256_ps(_mm256_blendv_epi8(qb, u, exact));
                } else { /* round to nearest even on the bit pattern (c10::BFloat16's rounding) */
                    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                        _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
                    q = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_set1_epi32(0xFFFF), r));
                }
            } else if (fmt == FMT_INT8 || fmt == FMT_INT4) {
                if (sr) {
                    const __m256 f = _mm256_floor_ps(y);
                    const __m256 up = _mm256_cmp_ps(v_uniform(k1, k2, (uint64_t)j), _mm256_sub_ps(y, f), _CMP_LT_OQ);
                    q = _mm256_add_ps(f, _mm256_and_ps(up, one));
                } else {
                    q = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                }
            } else {
                /* grid spacing sp = 2^(max(floor(log2|y|), emin) - man), built directly in the exponent field */
                const __m256i spb = _mm256_sub_epi32(
                    _mm256_max_epi32(_mm256_and_si256(_mm256_castps_si256(y), _mm256_set1_epi32(0x7F800000)), vminexp),
                    vmanexp);
                const __m256 sp = _mm256_castsi256_ps(spb);
                if (sr) {
                    /* y / sp is exact (sp is a power of two), so multiplying by 1/sp (also exact) is the same */
                    const __m256 r = _mm256_mul_ps(
                        y, _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(254 << 23), spb)));
                    const __m256 f = _mm256_floor_ps(r);
                    const __m256 up = _mm256_cmp_ps(v_uniform(k1, k2, (uint64_t)j), _mm256_sub_ps(r, f), _CMP_LT_OQ);
                    q = _mm256_mul_ps(_mm256_add_ps(f, _mm256_and_ps(up, one)), sp);
                } else {
                    /* round y to a multiple of sp, ties to even: (y + M) - M with M = 1.5 * 2^23 * sp (|y| < 2^22 sp)
                     * is exactly sp * round_half_even(y / sp) */
                    const __m256 magic =
                        _mm256_castsi256_ps(_mm256_add_epi32(spb, _mm256_set1_epi32((23 << 23) | 0x400000)));
                    q = _mm256_sub_ps(_mm256_add_ps(y, magic), magic);
                    /* a y that rounds to zero keeps its sign, as round() does (-0 has its own fp8 code) */
                    q = _mm256_or_ps(q, _mm256_and_ps(y, _mm256_set1_ps(-0.0f)));
                }
            }
            v_store_codes(a, j, q, fmt, man, bias);
            if (has_m) {
                __m256 m = _mm256_loadu_ps(mf + i);
                if (inject) {
                    const __m256 err = _mm256_sub_ps(w, _mm256_mul_ps(q, vs));
                    if (adam) m = _mm256_fmadd_ps(_mm256_mul_ps(vcoef, err), _mm256_loadu_ps(dn + i), m);
                    else m = _mm256_fmadd_ps(vcoef, err, m);
                }
                v_st(a->m, j, m, sbf);
            }
        }
    }
#endif
    for (; i < hi; i++) {
        const int64_t j = base + i;
        const float w = wt[i];
        float y = unscaled ? w : w / s;
        y = y < -fmax ? -fmax : (y > fmax ? fmax : y);
        float q;
        if (fmt == FMT_BF16) {
            const uint32_t u = f_bits(y), L = u & 0xFFFFu, T = u & 0xFFFF0000u;
            uint32_t qb;
            if (sr) {
                const int neg = (u >> 31) != 0;
                const float fl = (float)L * 0x1p-16f;
                const int up = uniform(k1, k2, (uint64_t)j) < (neg ? 1.0f - fl : fl);
                qb = L == 0 ? u : T + ((up != neg) ? 0x10000u : 0u);
            } else {
                qb = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
            }
            q = bits_f(qb);
            ((uint16_t *)a->codes)[j] = (uint16_t)(qb >> 16);
        } else if (fmt == FMT_INT8 || fmt == FMT_INT4) {
            if (sr) {
                const float f = floorf(y);
                q = f + (float)(uniform(k1, k2, (uint64_t)j) < y - f);
            } else {
                q = nearbyintf(y);
            }
            if (fmt == FMT_INT8) {
                ((int8_t *)a->codes)[j] = (int8_t)q;
            } else { /* one nibble: blocks and thread ranges start at even indices, so no byte is shared */
                uint8_t *byte = (uint8_t *)a->codes + (j >> 1);
                const int sh = 4 * (int)(j & 1);
                *byte = (uint8_t)((*byte & ~(0xF << sh)) | (((int)q + 8) << sh));
            }
        } else {
            int32_t e = (int32_t)((f_bits(y) >> 23) & 0xFFu) - 127;
            const int32_t k = (e < emin ? emin : e) - man;
            const float sp = bits_f((uint32_t)(k + 127) << 23);
            const float r = y / sp; /* exact: a power of two */
            float n;
            if (sr) {
                const float f = floorf(r);
                n = f + (float)(uniform(k1, k2, (uint64_t)j) < r - f);
            } else {
                n = nearbyintf(r);
            }
            q = n * sp;
            ((uint8_t *)a->codes)[j] = encode_fp8(q, man, bias);
        }
        if (has_m) {
            float m = mf[i];
            if (inject) {
                const float err = w - q * s;
                if (adam) m = fmaf(coef * err, dn[i], m); /* addcmul_(e, denom, value=coef) */
                else m = fmaf(coef, err, m);              /* add_(e, alpha=coef) */
            }
            if (sbf) ((uint16_t *)a->m)[j] = f32_to_bf16(m);
            else ((float *)a->m)[j] = m;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Dispatch on the compile-time flags so that each combination gets its own vectorised loop.             */
static float sweep_a(const eco_args *a, int64_t b, int64_t lo, int64_t hi, float *wt, float *dn, float *mf) {
#define A_CASE(G, S, F)                                                                  \
    if (a->grad_bf16 == G && a->state_bf16 == S && a->fmt == F)                          \
        return a->optimizer == 0 ? adamw_sweep_a(a, b, lo, hi, wt, dn, mf, G, S, F)      \
                                 : sgd_sweep_a(a, b, lo, hi, wt, mf, G, S, F);
#define A_FMTS(G, S) A_CASE(G, S, FMT_E4M3) A_CASE(G, S, FMT_E5M2) A_CASE(G, S, FMT_INT8) A_CASE(G, S, FMT_BF16) \
    A_CASE(G, S, FMT_INT4)
    A_FMTS(0, 0) A_FMTS(0, 1) A_FMTS(1, 0) A_FMTS(1, 1)
    return NAN;
#undef A_FMTS
#undef A_CASE
}

static void sweep_b_any(const eco_args *a, int64_t b, int64_t lo, int64_t hi, float s, const float *wt,
                        const float *dn, float *mf) {
    const int adam = a->optimizer == 0;
#define B_CASE(S, F, R)                                                                          \
    if (a->state_bf16 == S && a->fmt == F && a->stochastic == R) {                               \
        if (adam) sweep_b(a, b, lo, hi, s, wt, dn, mf, S, F, R, 1);                              \
        else sweep_b(a, b, lo, hi, s, wt, dn, mf, S, F, R, 0);                                   \
        return;                                                                                  \
    }
#define B_FMTS(S, R) B_CASE(S, FMT_E4M3, R) B_CASE(S, FMT_E5M2, R) B_CASE(S, FMT_INT8, R) B_CASE(S, FMT_BF16, R) \
    B_CASE(S, FMT_INT4, R)
    B_FMTS(0, 0) B_FMTS(0, 1) B_FMTS(1, 0) B_FMTS(1, 1)
#undef B_FMTS
#undef B_CASE
}

/* ---------------------------------------------------------------------------------------------------- */
/* Threading: one team of threads steps every tensor of the call (one thread creation per optimizer step,  */
/* not per tensor). Blocks of up to SPLIT elements are dealt out in contiguous ranges, each thread sweeping */
/* its blocks in its own in-cache scratch; a larger block (a per-tensor scale) is swept by all threads in   */
/* two phases, with a barrier in between to combine the absmax.                                           */
#define SPLIT 65536

/* fn(items[0]) .. fn(items[n-1]) concurrently (item t at base + t*size); the caller runs item 0 */
static void run_parallel(void *(*fn)(void *), void *base, size_t size, int n) {
    pthread_t th[64];
    int started[64] = {0};
    char *items = (char *)base;
    for (int t = 1; t < n; t++) started[t] = pthread_create(&th[t], NULL, fn, items + t * size) == 0;
    for (int t = 1; t < n; t++) if (!started[t]) fn(items + t * size); /* no thread: do it here */
    fn(items);
    for (int t = 1; t < n; t++) if (started[t]) pthread_join(th[t], NULL);
}

typedef struct {
    eco_args *const *args;
    int n, nt, tid;
    pthread_barrier_t *bar;
    float *scratch;       /* this thread's: 3 x the largest small block */
    float *big;           /* shared: 3 x the largest large block */
    float *partial;       /* shared: one absmax per thread */
} team;

static void *team_run(void *p) {
    team *tm = (team *)p;
    const int nt = tm->nt, tid = tm->tid;
    for (int k = 0; k < tm->n; k++) {
        eco_args *a = tm->args[k];
        if (a->nb <= 0 || a->bs <= 0) continue;
        const int64_t bs = a->bs;
        if (bs <= SPLIT) {
            const int64_t per = (a->nb + nt - 1) / nt;
            const int64_t lo = tid * per, hi = lo + per < a->nb ? lo + per : a->nb;
            int64_t bad = 0;
            float *wt = tm->scratch, *dn = wt + bs, *mf = dn + bs;
            for (int64_t b = lo; b < hi; b++) {
                float amax = sweep_a(a, b, 0, bs, wt, dn, mf);
                if (!isfinite(amax)) { bad++; continue; }
                float s = block_scale(a, amax);
                if (a->scale) a->scale[b] = s;
                sweep_b_any(a, b, 0, bs, s, wt, dn, mf);
            }
            if (bad) __atomic_fetch_add(&a->nonfinite, bad, __ATOMIC_RELAXED);
            continue;
        }
        int64_t per = (bs + nt - 1) / nt;
        per = (per + 63) / 64 * 64;
        const int64_t lo = tid * per < bs ? tid * per : bs, hi = lo + per < bs ? lo + per : bs;
        float *wt = tm->big, *dn = wt + bs, *mf = dn + bs;
        for (int64_t b = 0; b < a->nb; b++) {
            tm->partial[tid] = lo < hi ? sweep_a(a, b, lo, hi, wt, dn, mf) : 0.0f;
            pthread_barrier_wait(tm->bar);
            float amax = 0.0f;
            int bad = 0;
            for (int t = 0; t < nt; t++) { /* every thread combines the same partials: the same scale */
                bad |= !isfinite(tm->partial[t]);
                amax = tm->partial[t] > amax ? tm->partial[t] : amax;
            }
            if (!bad) {
                float s = block_scale(a, amax);
                if (tid == 0 && a->scale) a->scale[b] = s;
                if (lo < hi) sweep_b_any(a, b, lo, hi, s, wt, dn, mf);
            } else if (tid == 0) {
                a->nonfinite++;
            }
            pthread_barrier_wait(tm->bar); /* partials and scratch are reused by the next block */
        }
    }
    return NULL;
}

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

/* Step n tensors with up to nthreads threads. Returns 0, or -1 if scratch memory could not be allocated
 * (then nothing was modified). Each args->nonfinite counts the blocks left unquantized (NaN/Inf w_til). */
int eco_step_many(eco_args *const *args, int32_t n, int32_t nthreads) {
    int64_t small = 0, big = 0, total = 0;
    for (int k = 0; k < n; k++) {
        args[k]->nonfinite = 0;
        if (args[k]->nb <= 0 || args[k]->bs <= 0) continue;
        total += args[k]->nb * args[k]->bs;
        if (args[k]->bs <= SPLIT) small = args[k]->bs > small ? args[k]->bs : small;
        else big = args[k]->bs > big ? args[k]->bs : big;
    }
    int nt = nthreads < 1 ? 1 : (nthreads > 64 ? 64 : nthreads);
    if (total < 32768) nt = 1; /* starting a thread costs more than sweeping this little */
    float *scratch = (float *)malloc(sizeof(float) * (3 * (size_t)small * nt + 3 * (size_t)big + nt) + 64);
    if (!scratch) return -1;
    pthread_barrier_t bar;
    if (big && pthread_barrier_init(&bar, NULL, (unsigned)nt) != 0) { free(scratch); return -1; }
    team tm[64];
    for (int t = 0; t < nt; t++) {
        tm[t].args = args; tm[t].n = n; tm[t].nt = nt; tm[t].tid = t; tm[t].bar = &bar;
        tm[t].scratch = scratch + 3 * (size_t)small * t;
        tm[t].big = scratch + 3 * (size_t)small * nt;
        tm[t].partial = tm[t].big + 3 * (size_t)big;
    }
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
            return eco_step_many(args, n, 1);
        }
    } else {
        run_parallel(team_run, tm, sizeof(team), nt);
    }
    free(scratch);
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

int eco_abi_version(void) { return 6; }
