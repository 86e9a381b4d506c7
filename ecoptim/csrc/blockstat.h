/* What a sweep learns about a block of values (w_til, or the kahan error): its absmax, its smallest nonzero
 * magnitude (for the division shortcut, markstein_ok) and whether any element is NaN/Inf. */
#ifndef ECO_BLOCKSTAT_H
#define ECO_BLOCKSTAT_H
#include <math.h>
#include <stdint.h>
#include "codecs.h"
#include "vec.h"

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
/* the vector accumulators of a sweep: per lane, the max of the |w| bits and the min of the |w| bits - 1 (which
 * puts zeros last); non-negative floats order like their bits */
typedef struct {
    vi max, min;
} astat_acc;

static inline __attribute__((always_inline)) astat_acc astat_acc_start(void) {
    const astat_acc acc = {vi_zero(), vi_set1(-1)};
    return acc;
}

static inline __attribute__((always_inline)) void astat_acc_add(astat_acc *acc, vf w) {
    const vi wb = vi_and(vi_cast(w), vi_set1(0x7fffffff));
    acc->max = vi_max(acc->max, wb);
    acc->min = vi_minu(acc->min, vi_sub(wb, vi_set1(1)));
}

/* fold the accumulators into st */
static inline void astat_acc_fold(astat *st, astat_acc acc) {
    const uint32_t mx = vi_hmaxu(acc.max), mn = vi_hminu(acc.min) + 1u;
    astat o = {bits_f(mx), mn == 0u ? INFINITY : bits_f(mn), mx >= 0x7F800000u};
    if (o.bad) o.amax = 0.0f;
    astat_merge(st, o);
}
#endif
/* May a sweep divide the block by s with v_div_mk? Every nonzero |w| <= amax ~ s*fmax, so the quotient cannot
 * overflow; it must not be subnormal (|w|/s >= 2^-124) and the residual must be normal (|w| >= 2^-90); s itself
 * must be normal (an E8M0 or NVFP4 scale can be an fp32 subnormal, whose reciprocal may overflow). */
static inline int markstein_ok(float s, astat st) {
    return s >= 0x1p-126f &&
           (st.minnz == INFINITY || (st.minnz >= 0x1p-90f && (double)st.minnz >= (double)s * 0x1p-124));
}
#endif
