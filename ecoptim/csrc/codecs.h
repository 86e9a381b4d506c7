/* Encode and decode: codes <-> their fp32 values for every weight format (eco_format), bf16 <-> fp32, and the
 * rounding of a value (already divided by its block's scale and clamped to the format's range) onto the
 * format's grid, to nearest (ties to even) or stochastically with a given uniform u in [0, 1). Each helper has
 * a scalar version and, where the build has one, a VL-lane version (v_*) that performs the same IEEE
 * operations, so that both give the same bits. */
#ifndef ECO_CODECS_H
#define ECO_CODECS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "eco_abi.h"
#include "vec.h"

/* the small float formats' grids: mantissa bits, smallest normal exponent, exponent bias (FP8_E4M3, FP8_E5M2 and
 * FP4_E2M1 in formats.py) */
static inline int fp8_mantissa_bits(const int fmt) {
    return fmt == ECO_FORMAT_FP8_E4M3 ? 3 : fmt == ECO_FORMAT_FP4_E2M1 ? 1 : 2;
}
static inline int fp8_min_exponent(const int fmt) {
    return fmt == ECO_FORMAT_FP8_E4M3 ? -6 : fmt == ECO_FORMAT_FP4_E2M1 ? 0 : -14;
}
static inline int fp8_bias(const int fmt) {
    return fmt == ECO_FORMAT_FP8_E4M3 ? 7 : fmt == ECO_FORMAT_FP4_E2M1 ? 1 : 15;
}
/* formats whose codes are packed two per byte, element 2i in the low nibble */
static inline int packed_nibbles(const int fmt) { return fmt == ECO_FORMAT_INT4 || fmt == ECO_FORMAT_FP4_E2M1; }

/* the bits of an fp32 and back */
static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

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
/* element j of an fp32 (bf == 0) or bf16 (bf == 1) array, as fp32 */
static inline float ld_scalar(const void *p, int64_t j, const int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

/* an fp4 E2M1 code (bit 3 the sign, bits 2:1 the exponent, bit 0 the mantissa) as its fp32 value: the fields
 * placed as an fp32's exponent and mantissa fields give the value * 2^-126 (code 1, 0.5, lands on an fp32
 * subnormal), so one exact multiply by 2^126 finishes the decode (as the vector e4m3 decode below) */
static inline float fp4_value(uint32_t n) { return bits_f(((n & 7u) << 22) | ((n & 8u) << 28)) * 0x1p126f; }

/* an E4M3 code as its fp32 value, the same way (the NVFP4 block scales) */
static inline float e4m3_value(uint8_t c) {
    return bits_f(((uint32_t)(int32_t)(int8_t)c << 20) & 0x87F00000u) * 0x1p120f;
}

/* code j as its exact fp32 value (fp8 through torch's own decode table) */
static inline float decode_scalar(const void *codes, const float *lut, int64_t j, const int fmt) {
    const uint8_t *c = (const uint8_t *)codes;
    if (fmt == ECO_FORMAT_INT8) return (float)((const int8_t *)c)[j];
    if (fmt == ECO_FORMAT_BF16) return bf16_to_f32(((const uint16_t *)c)[j]);
    if (fmt == ECO_FORMAT_INT4) return (float)((int)((c[j >> 1] >> (4 * (j & 1))) & 0xF) - 8);
    if (fmt == ECO_FORMAT_FP4_E2M1) return fp4_value((c[j >> 1] >> (4 * (j & 1))) & 0xFu);
    return lut[c[j]];
}
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
/* y (clamped to +-fmax, on the format's scale) rounded to the nearest grid value, ties to even
 * (nearbyintf rounds ties to even and keeps the sign of zero) */
static inline float round_nearest(float y, const int fmt) {
    if (fmt == ECO_FORMAT_BF16) return bits_f((f_bits(y) + 0x7FFFu + ((f_bits(y) >> 16) & 1u)) & 0xFFFF0000u);
    if (fmt == ECO_FORMAT_INT8 || fmt == ECO_FORMAT_INT4) return nearbyintf(y);
    const int man = fp8_mantissa_bits(fmt), emin = fp8_min_exponent(fmt);
    const int32_t e = (int32_t)((f_bits(y) >> 23) & 0xFFu) - 127, k = (e < emin ? emin : e) - man;
    const float sp = bits_f((uint32_t)(k + 127) << 23);
    return nearbyintf(y / sp) * sp; /* y / sp and the product are exact: sp is a power of two */
}

/* y (clamped to +-fmax, on the format's scale) rounded stochastically with the uniform u: up to the next grid
 * value with probability (y - floor) / spacing (the same comparisons as rounding.py's stochastic rounding) */
static inline float round_stochastic(float y, float u, const int fmt) {
    if (fmt == ECO_FORMAT_BF16) {
        /* the bf16 grid spacing is the unit of bit 16 (subnormals included), so floor and fraction come from the
         * bit pattern: the fraction is L/2^16 above zero, 1 - L/2^16 below (L = the low 16 bits) */
        const uint32_t b = f_bits(y), L = b & 0xFFFFu, T = b & 0xFFFF0000u;
        const int neg = (b >> 31) != 0;
        const float fl = (float)L * 0x1p-16f;
        const int up = u < (neg ? 1.0f - fl : fl);
        const uint32_t q = L == 0 ? b : T + ((up != neg) ? 0x10000u : 0u);
        /* a zero result is +0, as the reference's floor(y) + {0, 1} gives it (-0 + 0 = +0), also from -0 */
        return bits_f((q & 0x7FFFFFFFu) == 0 ? 0u : q);
    }
    if (fmt == ECO_FORMAT_INT8 || fmt == ECO_FORMAT_INT4) {
        const float f = floorf(y);
        return f + (float)(u < y - f);
    }
    const int man = fp8_mantissa_bits(fmt), emin = fp8_min_exponent(fmt);
    const int32_t e = (int32_t)((f_bits(y) >> 23) & 0xFFu) - 127, k = (e < emin ? emin : e) - man;
    const float sp = bits_f((uint32_t)(k + 127) << 23);
    const float r = y / sp; /* exact: a power of two */
    const float f = floorf(r);
    return (f + (float)(u < r - f)) * sp;
}

/* grid value q (on the format's scale) -> code j */
static inline void store_code(void *codes, int64_t j, float q, const int fmt) {
    if (fmt == ECO_FORMAT_BF16) {
        ((uint16_t *)codes)[j] = (uint16_t)(f_bits(q) >> 16);
    } else if (fmt == ECO_FORMAT_INT8) {
        ((int8_t *)codes)[j] = (int8_t)q;
    } else if (packed_nibbles(fmt)) {
        /* one nibble: blocks and thread ranges start at even indices, so no byte is shared */
        uint8_t *byte = (uint8_t *)codes + (j >> 1);
        const int sh = 4 * (int)(j & 1);
        /* fp4: encode_fp8's fields with the sign moved from bit 7 to bit 3 */
        const int nib =
            fmt == ECO_FORMAT_INT4 ? (int)q + 8 : encode_fp8(fabsf(q), 1, 1) | (int)((f_bits(q) >> 28) & 8u);
        *byte = (uint8_t)((*byte & ~(0xF << sh)) | (nib << sh));
    } else {
        ((uint8_t *)codes)[j] = encode_fp8(q, fp8_mantissa_bits(fmt), fp8_bias(fmt));
    }
}

#if ECO_VEC
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

/* the E4M3 codes' sign, exponent and mantissa fields in fp32's layout, i.e. the values times 2^-120 (exactly:
 * subnormal codes become fp32 subnormals) */
static inline vf v_e4m3_fields(const uint8_t *p) {
    return vf_cast(vi_and(vi_slli(vi_ld_i8(p), 20), vi_set1((int)0x87F00000u)));
}
/* codes j .. j+VL-1 as fp32, exactly. e4m3: the sign-extended code shifted left by 20 and masked is the fp32
 * whose exponent and mantissa fields are the e4m3 fields (sign at bit 31): its value is the e4m3 value * 2^-120,
 * e4m3 subnormals landing on fp32 subnormals, so one multiply by 2^120 (exact) finishes the decode.
 * e5m2 is the top byte of an fp16; bf16 is the top half of an fp32; int8/int4 convert through int32. */
static inline vf v_decode_p(const void *codes, int64_t j, const int fmt) {
    const uint8_t *c = (const uint8_t *)codes;
    if (fmt == ECO_FORMAT_BF16) return v_ld(codes, j, 1);
    if (fmt == ECO_FORMAT_INT4) return vf_of_i(vi_sub(v_nibbles(c + j / 2), vi_set1(8))); /* j is even */
    if (fmt == ECO_FORMAT_FP4_E2M1) { /* fp4_value, VL lanes */
        const vi n = v_nibbles(c + j / 2);
        const vi f = vi_or(vi_slli(vi_and(n, vi_set1(7)), 22), vi_slli(vi_and(n, vi_set1(8)), 28));
        return vf_mul(vf_cast(f), vf_set1(0x1p126f));
    }
    if (fmt == ECO_FORMAT_INT8) return vf_of_i(vi_ld_i8(c + j));
    if (fmt == ECO_FORMAT_FP8_E5M2) return v_e5m2(c + j);
    return vf_mul(v_e4m3_fields(c + j), vf_set1(0x1p120f));
}
static inline void v_store_codes(void *codes, int64_t j, vf q, const int fmt, const int bias) {
    uint8_t *c = (uint8_t *)codes;
    if (fmt == ECO_FORMAT_BF16) { /* q is on the bf16 grid: its top 16 bits are the code */
        vi_st_u16((uint16_t *)codes + j, vi_srli(vi_cast(q), 16));
        return;
    }
    if (fmt == ECO_FORMAT_INT4) { /* q + 8 in 1 .. 15 */
        v_st_nibbles(c + j / 2, vi_add(vi_of_f(q), vi_set1(8)));
        return;
    }
    if (fmt == ECO_FORMAT_FP4_E2M1) { /* q * 2^-126 puts the fp4 fields at bits 24..22 (the higher exponent bits
                                       * are zero), as for fp8 below; t >> 28 brings the sign to bit 3 */
        const vi t = vi_cast(vf_mul(q, vf_set1(0x1p-126f)));
        v_st_nibbles(c + j / 2, vi_select(vi_set1(7), vi_srli(t, 22), vi_srli(t, 28)));
        return;
    }
    if (fmt == ECO_FORMAT_INT8) { /* q is an integer in [-127, 127] */
        vi_st_i8(c + j, vi_of_f(q));
        return;
    }
    /* q * 2^(bias - 127) moves the fp8 grid onto fp32's bit layout (fp8 subnormals become fp32 subnormals,
     * exactly; the sign is q's): the 7 bits from bit 20 (e4m3; bit 21 for e5m2) up are the fp8 exponent and
     * mantissa fields, the exponent bits above them are zero, and t >> 24 brings the sign to bit 7. */
    const vi t = vi_cast(vf_mul(q, vf_cast(vi_set1(bias << 23))));
    vi_st_u8(c + j, vi_select(vi_set1(0x7f), vi_srli(t, fmt == ECO_FORMAT_FP8_E4M3 ? 20 : 21), vi_srli(t, 24)));
}

/* y (clamped to +-fmax, on the format's scale) rounded to the nearest grid value, ties to even; sgnsrc: the
 * value whose sign a y that rounds to zero keeps (as round() keeps it: -0 has its own fp8 code) */
static inline __attribute__((always_inline)) vf v_round_nearest(vf y, vf sgnsrc, const int fmt, vi vexpmask,
                                                                vi vminexp, vi vmagic) {
    if (fmt == ECO_FORMAT_BF16) { /* round to nearest even on the bit pattern (c10::BFloat16's rounding) */
        const vi u = vi_cast(y);
        const vi r = vi_add(u, vi_add(vi_set1(0x7FFF), vi_and(vi_srli(u, 16), vi_set1(1))));
        return vf_cast(vi_andnot(vi_set1(0xFFFF), r));
    }
    if (fmt == ECO_FORMAT_INT8 || fmt == ECO_FORMAT_INT4) return vf_rint(y);
    /* grid spacing sp = 2^(max(floor(log2|y|), emin) - man), built directly in the exponent field; y rounded to
     * a multiple of sp, ties to even: (y + M) - M with M = 1.5 * 2^23 * sp (|y| < 2^22 sp) is exactly
     * sp * round_half_even(y / sp). The sign is sgnsrc's, which v_div_mk may have dropped from a -0. */
    const vf magic = vf_cast(vi_add(vi_max(vi_and(vi_cast(y), vexpmask), vminexp), vmagic));
    return vf_or(vf_sub(vf_add(y, magic), magic), vf_and(sgnsrc, vf_set1(-0.0f)));
}

/* round_stochastic, VL lanes; vexpmask and vminexp as for v_round_nearest */
static inline __attribute__((always_inline)) vf v_round_stochastic(vf y, vf u, const int fmt, vi vexpmask,
                                                                   vi vminexp) {
    const vf one = vf_set1(1.0f);
    if (fmt == ECO_FORMAT_BF16) {
        const vi b = vi_cast(y), L = vi_and(b, vi_set1(0xFFFF)), T = vi_andnot(vi_set1(0xFFFF), b);
        const vf fl = vf_mul(vf_of_i(L), vf_set1(0x1p-16f));
        const vm neg = vi_neg(b);
        const vm up = vf_lt(u, vf_blend(fl, vf_sub(one, fl), neg));
        /* above zero "up" adds one grid step to the magnitude, below zero "not up" does */
        const vi qb = vi_add(T, vi_maskz(vm_xor(up, neg), vi_set1(0x10000)));
        const vi q = vi_blend(qb, b, vi_eq(L, vi_zero())); /* on the grid already: exact */
        /* a zero result is +0, as in round_stochastic */
        return vf_cast(vi_blend(q, vi_zero(), vi_eq(vi_and(q, vi_set1(0x7FFFFFFF)), vi_zero())));
    }
    if (fmt == ECO_FORMAT_INT8 || fmt == ECO_FORMAT_INT4) {
        const vf f = vf_floor(y);
        return vf_add(f, vf_maskz(vf_lt(u, vf_sub(y, f)), one));
    }
    /* the grid spacing sp as in v_round_nearest; y / sp is exact, and so is y * (1/sp) */
    const vi spb = vi_sub(vi_max(vi_and(vi_cast(y), vexpmask), vminexp), vi_set1(fp8_mantissa_bits(fmt) << 23));
    const vf r = vf_mul(y, vf_cast(vi_sub(vi_set1(254 << 23), spb)));
    const vf f = vf_floor(r), sp = vf_cast(spb);
    /* (f + up) * sp as f * sp + (up ? sp : +0) in one fma: the exact sum is a grid value, so it is the same
     * bits, and a zero result is +0 either way (-0 + +0, -sp + sp) */
    return vf_fmadd(f, sp, vf_maskz(vf_lt(u, vf_sub(r, f)), sp));
}
#endif /* ECO_VEC */
#endif
