/* Checks of the kernel's vector helpers against the scalar definitions (or the longer vector sequence they
 * replace), bit for bit; built and run by tests/test_vector_helpers.py with the kernel's own flags. Prints one
 * line per check, "<name> <inputs checked> <mismatches>", or "novec" where the build has no vector layer. */
#include <stdio.h>
#include <string.h>
#include "codecs.h"

#if !ECO_VEC
int main(void) {
    puts("novec");
    return 0;
}
#else
static int same(vf a, vf b) {
    float x[VL], y[VL];
    vf_store(x, a);
    vf_store(y, b);
    return memcmp(x, y, sizeof x) == 0;
}

static vf lanes_from(uint32_t first) { return vf_cast(vi_add(vi_set1((int)first), vi_iota())); }

/* vf_clamp_sym against vf_min(vf_max(.)) for every finite fp32 and the formats' limits */
static void check_clamp(void) {
    const float lims[] = {448.0f, 57344.0f, 6.0f, 127.0f, 7.0f, 3.40282347e38f};
    long n = 0, bad = 0;
    for (int li = 0; li < 6; li++) {
        const vf hi = vf_set1(lims[li]), lo = vf_set1(-lims[li]);
        for (int sign = 0; sign < 2; sign++) /* the finite patterns: below the all-ones exponent */
            for (uint64_t b = 0; b < 0x7F800000u; b += VL) {
                const vf y = lanes_from((uint32_t)b | (sign ? 0x80000000u : 0u));
                bad += !same(vf_clamp_sym(y, lo, hi), vf_min(vf_max(y, lo), hi));
                n += VL;
            }
    }
    printf("clamp %ld %ld\n", n, bad);
}

/* y values covering every exponent and sign of the fp32 range with varied low mantissa bits: the top 16 bits
 * run through all values, the low 16 are a hash of them */
static float spread(uint32_t h) { return bits_f((h << 16) | ((h * 2654435761u) >> 16)); }

static const int small_formats[] = {ECO_FORMAT_FP8_E4M3, ECO_FORMAT_FP8_E5M2, ECO_FORMAT_FP4_E2M1};

static float format_max(int fmt) {
    return fmt == ECO_FORMAT_FP8_E4M3 ? 448.0f : fmt == ECO_FORMAT_FP8_E5M2 ? 57344.0f : 6.0f;
}

/* spread(h) clamped to +-fmax (a NaN as 0), as sweep B hands values to the rounding */
static float clamped_spread(uint32_t h, float fmax) {
    const float x = spread(h);
    return x != x ? 0.0f : x < -fmax ? -fmax : x > fmax ? fmax : x;
}

/* v_round_stochastic against round_stochastic, on the spread values and on the grid values nearest them (every
 * grid value of the format is one of those), for uniforms that round up whenever possible (0), almost never
 * (1 - 2^-24) and in between */
static void check_round_stochastic(void) {
    const float us[] = {0.0f, 0x1p-24f, 0.5f, 1.0f - 0x1p-24f};
    long n = 0, bad = 0;
    for (int fi = 0; fi < 3; fi++) {
        const int fmt = small_formats[fi];
        const float fmax = format_max(fmt);
        const vi vexpmask = vi_set1(0x7F800000), vminexp = vi_set1((fp8_min_exponent(fmt) + 127) << 23);
        for (uint32_t h = 0; h < 65536; h += VL) {
            float y[VL], grid[VL], q[VL];
            for (int l = 0; l < VL; l++) {
                y[l] = clamped_spread(h + (uint32_t)l, fmax);
                grid[l] = round_nearest(y[l], fmt);
            }
            const float *inputs[2] = {y, grid};
            for (int k = 0; k < 2; k++)
                for (int ui = 0; ui < 4; ui++) {
                    vf_store(q, v_round_stochastic(vf_load(inputs[k]), vf_set1(us[ui]), fmt, vexpmask, vminexp));
                    for (int l = 0; l < VL; l++) {
                        const float r = round_stochastic(inputs[k][l], us[ui], fmt);
                        bad += memcmp(&r, &q[l], 4) != 0;
                        n++;
                    }
                }
        }
    }
    printf("round_stochastic %ld %ld\n", n, bad);
}

/* v_store_codes against store_code for every grid value (round_nearest of the spread values) */
static void check_store_codes(void) {
    long n = 0, bad = 0;
    for (int fi = 0; fi < 3; fi++) {
        const int fmt = small_formats[fi];
        const float fmax = format_max(fmt);
        for (uint32_t h = 0; h < 65536; h += VL) {
            float q[VL];
            uint8_t vec_codes[VL] = {0}, ref_codes[VL] = {0};
            for (int l = 0; l < VL; l++) {
                q[l] = round_nearest(clamped_spread(h + (uint32_t)l, fmax), fmt);
                store_code(ref_codes, l, q[l], fmt);
            }
            v_store_codes(vec_codes, 0, vf_load(q), fmt, fp8_bias(fmt));
            bad += memcmp(vec_codes, ref_codes, packed_nibbles(fmt) ? VL / 2 : VL) != 0;
            n += VL;
        }
    }
    printf("store_codes %ld %ld\n", n, bad);
}

/* the value of an E4M3 code, from its fields (1 sign, 4 exponent with bias 7, 3 mantissa bits): written out
 * rather than codecs.h's e4m3_value, which uses the same fp32-layout trick as the code under test */
static float e4m3_by_fields(uint8_t c) {
    const int e = (c >> 3) & 15, m = c & 7;
    const float mag = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return c & 0x80 ? -mag : mag;
}

/* E4M3 decode with the scale folded in (v_e4m3_fields times 2^120 * s) against the code's value times s (one
 * rounding), for every code and scales up to just below 2^8, subnormal ones included */
static void check_e4m3_decode(void) {
    long n = 0, bad = 0;
    uint8_t codes[256];
    for (int c = 0; c < 256; c++) codes[c] = (uint8_t)c;
    for (uint32_t k = 0; k < 20000; k++) {
        /* scales from 2^-149 (subnormal) to just below 2^8: every exponent, hashed mantissas */
        const uint32_t e = k % 135, m = (k * 2654435761u) >> 9;
        const float s = k == 0 ? 0x1.fffffep7f : bits_f(e == 0 ? (m | 1u) : (e << 23) | m);
        for (int c = 0; c < 256; c += VL) {
            float got[VL];
            vf_store(got, vf_mul(v_e4m3_fields(codes + c), vf_set1(s * 0x1p120f)));
            for (int l = 0; l < VL; l++) {
                const float want = e4m3_by_fields(codes[c + l]) * s;
                bad += memcmp(&want, &got[l], 4) != 0;
                n++;
            }
        }
    }
    printf("e4m3_decode %ld %ld\n", n, bad);
}

int main(void) {
    check_clamp();
    check_round_stochastic();
    check_store_codes();
    check_e4m3_decode();
    return 0;
}
#endif
