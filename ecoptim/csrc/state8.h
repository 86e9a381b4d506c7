/* 8-bit block-wise optimizer states (ecoptim/optim/state8.py, whose torch code is the definition): encode
 * an fp32 state into codes + per-block absmax, and decode it back, with the same IEEE operations as the
 * torch code (absmax; |x| / absmax, correctly rounded; the comparisons torch.bucketize makes; the SR
 * fraction), so the results are identical. table: the ntab magnitudes. Searching: y in [0, 1] falls in a
 * "bucket" named by its top 16 bits (exponent and 7 mantissa bits; below 2^-27 all in bucket 0), and
 * state8.py has checked that no bucket holds more than one table entry or midpoint (none in bucket 0) and
 * tabulated per bucket how many lie below it and where the one inside sits (its low 16 bits: within a
 * bucket, floats order like their low bits). So the search is one lookup and one integer comparison. */
#ifndef ECO_STATE8_H
#define ECO_STATE8_H
#include <math.h>
#include <stdint.h>
#include "blockstat.h"
#include "codecs.h"
#include "rng.h"
#include "vec.h"

#define S8_BKT0 0x3200 /* top 16 bits of 2^-27 */

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
        astat_acc acc = astat_acc_start(); /* the same accumulators as a sweep's block statistics */
        for (; k + VL <= hi - lo; k += VL) astat_acc_add(&acc, vf_load(x + k));
        bmax = vi_hmaxu(acc.max);
        bmin = vi_hminu(acc.min);
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
    const int mk = bmin == 0xFFFFFFFFu ||
                   (bits_f(bmin + 1u) >= 0x1p-90f && (double)bits_f(bmin + 1u) >= (double)d * 0x1p-124);
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

#endif
