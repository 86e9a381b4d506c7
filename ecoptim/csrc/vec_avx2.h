/* The vector layer on AVX2/FMA/F16C: 8 lanes (a mask is a vector of all-ones / all-zero lanes). Included by
 * vec.h only; every name means the same IEEE (or integer) operation as in vec_avx512.h. */
#ifndef ECO_VEC_AVX2_H
#define ECO_VEC_AVX2_H

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
#define vf_clamp_sym(y, neg_lim, lim) vf_min(vf_max((y), (neg_lim)), (lim)) /* y clamped to [-lim, lim] */
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
#define vi_select(m, a, b) vi_or(vi_and((m), (a)), vi_andnot((m), (b))) /* a where m's bits are set, else b */
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
    const __m128i pair =
        _mm_or_si128(_mm_and_si128(p8, _mm_set1_epi16(0x0F)), _mm_slli_epi16(_mm_srli_epi16(p8, 8), 4));
    const uint32_t packed = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(pair, pair));
    memcpy(p, &packed, 4);
}
static inline vf v_s8_absmax(const float *am, int64_t j, int sh) { return _mm256_set1_ps(am[j >> sh]); }

/* a lookup table of 128 or 256 floats (the 8-bit states' magnitude tables) for lanes of indices: a gather */
typedef struct {
    const float *p;
} vtab;
static inline void vtab_load(vtab *t, const float *table, const int n) { (void)n; t->p = table; }
static inline vf vtab_get(const vtab *t, vi idx, const int n) { (void)n; return vf_gather(t->p, idx); }
#endif
