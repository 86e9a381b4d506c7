/* The vector layer on AVX-512 (F/BW/DQ/VL): 16 lanes. Included by vec.h only; every name means the same IEEE
 * (or integer) operation as in vec_avx2.h. */
#ifndef ECO_VEC_AVX512_H
#define ECO_VEC_AVX512_H
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
/* y clamped to [-lim, lim] (lim > 0): vrangeps' min of the magnitudes with y's sign, one operation for the
 * two of vf_min(vf_max(y, neg_lim), lim) and the same bits for every finite or infinite y (a -0 stays -0); a
 * NaN y gives +-lim here, -lim on AVX2, so callers pass no NaN (sweep B's blocks are finite) */
#define vf_clamp_sym(y, neg_lim, lim) _mm512_range_ps((y), (lim), 0x02)
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
#define vi_select(m, a, b) _mm512_ternarylogic_epi32((m), (a), (b), 0xCA) /* a where m's bits are set, else b */
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

/* A lookup table of 128 or 256 floats (the 8-bit states' magnitude tables) for lanes of indices, kept in 8 or
 * 16 registers and looked up with two-source permutes (32 entries each) and blends on the index's upper bits,
 * which is several times cheaper than a gather on the CPUs measured. */
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
#endif
