/* The stochastic-rounding uniforms: a counter-based hash of (key, element index), the function of
 * ecoptim/rng.py (which is its definition; tests/test_kernels.py checks the two agree). */
#ifndef ECO_RNG_H
#define ECO_RNG_H
#include <stdint.h>
#include "vec.h"

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* the uniform in [0, 1) of element idx of a tensor stepped with key (k1, k2): 24 bits of two rounds of a
 * 32-bit mixer */
static inline float uniform(uint32_t k1, uint32_t k2, uint64_t idx) {
    uint32_t h = mix32((uint32_t)idx ^ k1);
    h = mix32(h ^ (k2 + (uint32_t)(idx >> 32)));
    return (float)(h >> 8) * 0x1p-24f;
}

#if ECO_VEC
static inline vi v_mix32(vi x) {
    x = vi_xor(x, vi_srli(x, 16));
    x = vi_mullo(x, vi_set1((int)0x7feb352dU));
    x = vi_xor(x, vi_srli(x, 15));
    x = vi_mullo(x, vi_set1((int)0x846ca68bU));
    x = vi_xor(x, vi_srli(x, 16));
    return x;
}

/* the uniforms of VL consecutive indices: idx holds their low 32-bit words, hi_k2 = k2 + their (common) high
 * word, as in uniform() */
static inline vf v_uniform(vi idx, vi vk1, vi hi_k2) {
    vi h = v_mix32(vi_xor(idx, vk1));
    h = v_mix32(vi_xor(h, hi_k2));
    return vf_mul(vf_of_i(vi_srli(h, 8)), vf_set1(0x1p-24f));
}
#endif /* ECO_VEC */
#endif
