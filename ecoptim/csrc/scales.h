/* Block scales (ecoptim/formats.py's ScaleFormat): the fp32 effective scale X of a block as stored (the sweeps
 * dequantize with w_hat = code * X and quantize with y = w / X), and the choice of a new one from the block's
 * absmax, for each eco_scale_format:
 *   ECO_SCALE_ABSMAX       X = max(absmax / format_max, 2^-126), one ulp down where max * X would overflow;
 *                          stored as the fp32 X                                          (formats.AbsmaxScale)
 *   ECO_SCALE_E8M0_*       X = 2^e, e = floor(log2(absmax)) - emax (+1 where the ceil rule needs it), clamped to
 *                          [-127, 127 - emax]; stored as the byte e + 127                 (formats.E8M0Scale)
 *   ECO_SCALE_E4M3_TENSOR  s_t = absmax(tensor) / (448 * format_max), s_b = E4M3(min(absmax / (s_t * format_max),
 *                          448)) (2^-9 where that is 0), X = s_b * s_t; stored as the bytes of s_b per block, then
 *                          the 4 bytes of s_t                                            (formats.E4M3TensorScale)
 * with the same fp32 operations as the reference (frexp gives floor(log2) exactly; ldexp(max, e) is exact for
 * every e that the clamp does not override). */
#ifndef ECO_SCALES_H
#define ECO_SCALES_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "codecs.h"
#include "eco_abi.h"

/* a block's new scale: X and what is stored (the fp32 bits of X, or an 8-bit code) */
typedef struct {
    float x;
    uint32_t stored;
} scale_pick;

/* 2^(c - 127): E8M0 code c (c = 0 is the fp32 subnormal 2^-127; 255, NaN, is never written) */
static inline float e8m0_value(uint32_t c) { return c ? bits_f(c << 23) : bits_f(0x00400000u); }

/* emax of the element format: floor(log2(format_max)) (formats.largest_normal_exponent) */
static inline int largest_normal_exponent(float fmax) {
    int ex;
    frexpf(fmax, &ex);
    return ex - 1;
}

/* the tensor scale s_t of an E4M3_TENSOR scale, as stored */
static inline float stored_tensor_scale(const void *scales, int64_t num_blocks) {
    float st;
    memcpy(&st, (const uint8_t *)scales + num_blocks, 4);
    return st;
}

/* X of block b of `scales` (NULL: unscaled, 1) */
static inline float scale_of(const void *scales, int32_t sf, int64_t b, int64_t num_blocks) {
    if (scales == NULL) return 1.0f; /* x * 1 is exact, as no multiply at all */
    if (sf == ECO_SCALE_ABSMAX) return ((const float *)scales)[b];
    const uint8_t c = ((const uint8_t *)scales)[b];
    if (sf == ECO_SCALE_E4M3_TENSOR) return e4m3_value(c) * stored_tensor_scale(scales, num_blocks);
    return e8m0_value(c);
}

/* the tensor scale s_t of a tensor whose largest block absmax is top (E4M3TensorScale.tensor_scale) */
static inline float pick_tensor_scale(float top, float fmax) {
    float st = top / (448.0f * fmax); /* 448 * max is exact: 2688 for E2M1 */
    if (st < 0x1p-126f) st = 0x1p-126f;
    for (int k = 0; k < 4 && !isfinite((st * 448.0f) * fmax); k++) st = nextafterf(st, 0.0f);
    return st;
}

/* a new scale for a block of absmax amax (finite); tensor_scale: s_t (ECO_SCALE_E4M3_TENSOR only) */
static inline scale_pick pick_scale(int32_t sf, float amax, float fmax, float tensor_scale) {
    scale_pick p;
    if (sf == ECO_SCALE_ABSMAX) {
        float s = amax / fmax;
        if (s < 0x1p-126f) s = 0x1p-126f;
        if (isinf(s * fmax) && !isinf(s)) s = nextafterf(s, 0.0f);
        p.x = s;
        p.stored = f_bits(s);
    } else if (sf == ECO_SCALE_E4M3_TENSOR) {
        float r = amax / (tensor_scale * fmax);
        r = r > 448.0f ? 448.0f : r;
        float sb = round_nearest(r, ECO_FORMAT_FP8_E4M3); /* torch's cast to e4m3: to nearest, ties to even */
        if (!(sb > 0.0f)) sb = 0x1p-9f;                    /* E4M3's smallest subnormal */
        p.stored = encode_fp8(sb, 3, 7);
        p.x = sb * tensor_scale;
    } else {
        const int emax = largest_normal_exponent(fmax);
        int ex;
        frexpf(amax, &ex); /* amax = m * 2^ex, m in [0.5, 1): floor(log2(amax)) = ex - 1 */
        int e = ex - 1 - emax;
        if (sf == ECO_SCALE_E8M0_CEIL && amax > ldexpf(fmax, e)) e++;
        if (!(amax > 0.0f)) e = -127;
        e = e < -127 ? -127 : (e > 127 - emax ? 127 - emax : e);
        p.stored = (uint32_t)(e + 127);
        p.x = e8m0_value(p.stored);
    }
    return p;
}

/* write block b's new scale into `scales` */
static inline void store_scale(void *scales, int32_t sf, int64_t b, scale_pick p) {
    if (sf == ECO_SCALE_ABSMAX) ((float *)scales)[b] = p.x;
    else ((uint8_t *)scales)[b] = (uint8_t)p.stored;
}

/* write an E4M3_TENSOR scale's tensor scale (after every block has read the old one) */
static inline void store_tensor_scale(void *scales, int64_t num_blocks, float st) {
    memcpy((uint8_t *)scales + num_blocks, &st, 4);
}
#endif
