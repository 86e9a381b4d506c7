/* The sweeps after sweep A, shared by both optimizers.
 *   sweep B  the block's new scale -> round (to nearest or stochastically) -> codes; e = w_til - w_hat; ECO's
 *            injection of e into the momentum; the moments written back (8-bit ones encoded a state block at a
 *            time); modes 'master' / 'exact' write their buffers
 *   sweep C  mode 'kahan': the error e, kept in the scratch by sweep B, quantized to nearest with a scale of its
 *            own into the compensation */
#ifndef ECO_QUANTIZE_SWEEPS_H
#define ECO_QUANTIZE_SWEEPS_H
#include <math.h>
#include <stdint.h>
#include "blockstat.h"
#include "codecs.h"
#include "eco_abi.h"
#include "rng.h"
#include "scales.h"
#include "state8.h"
#include "vec.h"

/* codec.compute_scale for one block of absmax amax, in the weight's scale format (tensor_scale: the new s_t of
 * an E4M3_TENSOR scale) */
static inline scale_pick block_scale(const eco_step_args *a, float amax, float tensor_scale) {
    if (a->weights.scales == NULL) { /* unscaled (bf16): the absmax only served the finiteness check */
        const scale_pick one = {1.0f, 0u};
        return one;
    }
    return pick_scale(a->weights.scale_format, amax, a->weights.format_max, tensor_scale);
}

/* encode both 8-bit moments of elements [lo, hi) of block b (in the scratch: m8 and vn), one state block
 * (aligned with the range) at a time */
static inline void state8_encode_range(const eco_step_args *a, int64_t base, int64_t lo, int64_t hi, const float *m8,
                                       const float *vn) {
    const eco_state8_codec *c = &a->state8;
    for (int64_t r = lo; r < hi; r += c->block_size) {
        const int64_t r1 = r + c->block_size < hi ? r + c->block_size : hi, sb = (base + r) / c->block_size;
        s8_encode(m8 + (r - lo), (uint8_t *)a->moments.exp_avg, c->exp_avg_absmax + sb, base + r, base + r1,
                  c->signed_magnitudes, c->signed_buckets_nearest, c->signed_buckets_stochastic, 128, c->num_buckets,
                  1, c->stochastic, c->exp_avg_key[0], c->exp_avg_key[1]);
        s8_encode(vn + (r - lo), (uint8_t *)a->moments.exp_avg_sq, c->exp_avg_sq_absmax + sb, base + r, base + r1,
                  c->unsigned_magnitudes, c->unsigned_buckets_nearest, c->unsigned_buckets_stochastic, 256,
                  c->num_buckets, 0, c->stochastic, c->exp_avg_sq_key[0], c->exp_avg_sq_key[1]);
    }
}

#if ECO_VEC
/* sweep B's vector operands */
typedef struct {
    vf scale, rcp_scale, format_max, neg_format_max, injection_coef;
    vi expmask, minexp, magic; /* the grid constants of v_round_nearest / v_round_stochastic */
    vi key1, key2_hi;          /* the SR key (key2_hi: k2 + the range's high index word, as in uniform()) */
    void *codes, *exp_avg, *exp_avg_sq;
    float *master, *carried_error;
    float *exp_avg_out; /* 8-bit moments: the final m goes back to its scratch, to be encoded */
    int divide_mk;      /* divide by the scale with v_div_mk (markstein_ok) */
} quantize_vec;

/* the VL elements base + i ..: quantize w_til, write the codes and the moments (has_m: there is a momentum;
 * inject: ECO's injection into it; kahan: e replaces w_til in the scratch, for sweep C); vidx: the SR counters
 * (the low words of the indices), advanced by VL */
static inline __attribute__((always_inline)) void quantize_update_vec(
    const quantize_vec *c, int64_t base, int64_t i, int64_t lo, float *wt, const float *dn, const float *mf,
    const float *vn, astat_acc *acc, vi *vidx, const int has_m, const int inject, const int kahan, const int storage,
    const int fmt, const int sr, const int adam) {
    const int64_t j = base + i;
    const vf w = vf_load(wt + (i - lo));
    vf y = w;
    if (fmt != ECO_FORMAT_BF16) y = c->divide_mk ? v_div_mk(w, c->scale, c->rcp_scale) : vf_div(w, c->scale);
    y = vf_clamp_sym(y, c->neg_format_max, c->format_max);
    const vf q = sr ? v_round_stochastic(y, v_uniform(*vidx, c->key1, c->key2_hi), fmt, c->expmask, c->minexp)
                    : v_round_nearest(y, w, fmt, c->expmask, c->minexp, c->magic);
    v_store_codes(c->codes, j, q, fmt, fp8_bias(fmt));
    const vf err = vf_sub(w, vf_mul(q, c->scale)); /* w_til - w_hat (dropped by the compiler if unused) */
    if (c->master) vf_store(c->master + j, w);
    if (c->carried_error) vf_store(c->carried_error + j, err);
    if (kahan) {
        vf_store(wt + (i - lo), err);
        astat_acc_add(acc, err);
    }
    if (adam && storage != ECO_STATE_EIGHT_BIT) v_st(c->exp_avg_sq, j, vf_load(vn + (i - lo)), storage);
    if (has_m) {
        vf m = vf_load(mf + (i - lo));
        if (inject) {
            if (adam) m = vf_fmadd(vf_mul(c->injection_coef, err), vf_load(dn + (i - lo)), m);
            else m = vf_fmadd(c->injection_coef, err, m);
        }
        if (storage == ECO_STATE_EIGHT_BIT) vf_store(c->exp_avg_out + (i - lo), m); /* encoded after the sweep */
        else v_st(c->exp_avg, j, m, storage);
    }
    if (sr) *vidx = vi_add(*vidx, vi_set1(VL));
}

/* the vector part of sweep B over [*i, vhi): 16 elements per iteration (one 64-byte line of fp32 per stream),
 * each requesting the next block's (the arrays are contiguous: one block ahead) second moment and codes (sweep A
 * requests its gradient and first moment, see prefetch_range) */
static inline __attribute__((always_inline)) void quantize_sweep_vec(
    const quantize_vec *c, int64_t base, int64_t *i, int64_t lo, int64_t hi, int64_t vhi, float *wt,
    const float *dn, const float *mf, const float *vn, astat_acc *acc, vi *vidx, const int has_m, const int inject,
    const int kahan, const int storage, const int fmt, const int sr, const int adam) {
    const char *pf_codes = (const char *)c->codes, *pf_v = (const char *)c->exp_avg_sq;
    const int state_bytes = storage == ECO_STATE_EIGHT_BIT ? 1 : storage ? 2 : 4;
    const int64_t ahead = hi - lo; /* the next block, or the next range of a large one */
    int64_t k = *i;
    for (; k + 16 <= vhi; k += 16) {
        const int64_t n = base + k + ahead;
        if (adam) _mm_prefetch(pf_v + n * state_bytes, PF_HINT);
        if ((k & 63) == 0)
            _mm_prefetch(pf_codes + (fmt == ECO_FORMAT_BF16 ? 2 * n : packed_nibbles(fmt) ? n / 2 : n), PF_HINT);
        for (int u = 0; u < 16; u += VL)
            quantize_update_vec(c, base, k + u, lo, wt, dn, mf, vn, acc, vidx, has_m, inject, kahan, storage, fmt, sr,
                                adam);
    }
    for (; k + VL <= vhi; k += VL)
        quantize_update_vec(c, base, k, lo, wt, dn, mf, vn, acc, vidx, has_m, inject, kahan, storage, fmt, sr, adam);
    *i = k;
}
#endif

/* sweep B over elements [lo, hi) of block b with scale s (mk: divide by s with v_div_mk, see markstein_ok; storage:
 * the moments' eco_state_storage; fmt: the eco_format; sr: stochastic rounding; adam: AdamW, else SGD). Mode
 * 'kahan' (compensation_codes): the error w_til - w_hat replaces w_til in the scratch, for sweep C; returns its
 * statistics. */
static inline __attribute__((always_inline)) astat sweep_b(const eco_step_args *a, int64_t b, int64_t lo, int64_t hi,
                                                           float s, int mk, float *wt, const float *dn,
                                                           const float *mf, const float *vn, const int storage,
                                                           const int fmt, const int sr, const int adam) {
    const int64_t base = b * a->weights.block_size;
    const float fmax = a->weights.format_max, coef = a->hyper.injection_coef;
    const int inject = a->hyper.inject, has_m = a->moments.exp_avg != NULL, unscaled = fmt == ECO_FORMAT_BF16,
              kahan = a->modes.compensation_codes != NULL;
    const uint32_t k1 = a->hyper.sr_key[0], k2 = a->hyper.sr_key[1];
    void *const codes = a->weights.codes, *const mp = a->moments.exp_avg, *const vp = a->moments.exp_avg_sq;
    float *const m8 = (float *)mf; /* 8-bit moments: the final m goes back to its scratch, to be encoded */
    float *const mst = a->modes.master, *const erp = a->modes.carried_error;
    astat st = {0.0f, INFINITY, 0}; /* kahan: of the error */
    int64_t i = lo;
#if ECO_VEC
    int64_t vhi = hi;
    /* the SR counter's low word must not wrap inside a vector: leave such a (>4G-element) range to the scalars */
    if (sr && ((uint64_t)(base + lo) >> 32) != ((uint64_t)(base + hi + VL) >> 32)) vhi = lo;
    {
        const int man = fp8_mantissa_bits(fmt), emin = fp8_min_exponent(fmt);
        quantize_vec c;
        c.scale = vf_set1(s);
        c.rcp_scale = vf_set1(1.0f / s);
        c.format_max = vf_set1(fmax);
        c.neg_format_max = vf_set1(-fmax);
        c.injection_coef = vf_set1(coef);
        /* the constants live in registers: made opaque, so that the compiler cannot rebuild them inside the
         * loop (GCC does, at four instructions each, when it thinks a register is better used elsewhere) */
        vi vminexp = vi_set1((emin + 127) << 23), vexpmask = vi_set1(0x7F800000),
           vmagic = vi_set1(((23 - man) << 23) | 0x400000);
        __asm__("" : "+v"(vminexp), "+v"(vexpmask), "+v"(vmagic));
        c.minexp = vminexp;
        c.expmask = vexpmask;
        c.magic = vmagic;
        /* SR counters: the low words of this vector's indices (advanced by VL per vector); the high word is
         * the same for the whole range (checked above) */
        vi vidx = vi_add(vi_set1((int)(uint32_t)(base + i)), vi_iota());
        c.key1 = vi_set1((int)k1);
        c.key2_hi = vi_set1((int)(k2 + (uint32_t)((uint64_t)(base + i) >> 32)));
        c.codes = codes;
        c.exp_avg = mp;
        c.exp_avg_sq = vp;
        c.master = mst;
        c.carried_error = erp;
        c.exp_avg_out = m8;
        c.divide_mk = mk;
        astat_acc acc = astat_acc_start();
        /* one loop per momentum/injection/kahan case, so that the loop body has no branches */
#define QUANTIZE_SWEEP(HM, INJ, KH) \
    quantize_sweep_vec(&c, base, &i, lo, hi, vhi, wt, dn, mf, vn, &acc, &vidx, HM, INJ, KH, storage, fmt, sr, adam)
        const int hm = adam || has_m;
        if (kahan) {
            if (hm) QUANTIZE_SWEEP(1, 0, 1);
            else QUANTIZE_SWEEP(0, 0, 1);
        } else if (hm) {
            if (inject) QUANTIZE_SWEEP(1, 1, 0);
            else QUANTIZE_SWEEP(1, 0, 0);
        } else {
            QUANTIZE_SWEEP(0, 0, 0);
        }
#undef QUANTIZE_SWEEP
        if (kahan) astat_acc_fold(&st, acc);
    }
#endif
    (void)mk;
    for (; i < hi; i++) {
        const int64_t j = base + i;
        const float w = wt[i - lo];
        float y = unscaled ? w : w / s;
        y = y < -fmax ? -fmax : (y > fmax ? fmax : y);
        const float q = sr ? round_stochastic(y, uniform(k1, k2, (uint64_t)j), fmt) : round_nearest(y, fmt);
        store_code(codes, j, q, fmt);
        const float err = w - q * s; /* w_til - w_hat */
        if (mst) mst[j] = w;
        if (erp) erp[j] = err;
        if (kahan) {
            wt[i - lo] = err;
            astat_scalar(&st, err);
        }
        if (adam && storage != ECO_STATE_EIGHT_BIT) {
            if (storage) ((uint16_t *)vp)[j] = f32_to_bf16(vn[i - lo]);
            else ((float *)vp)[j] = vn[i - lo];
        }
        if (has_m) {
            float m = mf[i - lo];
            if (inject) {
                if (adam) m = fmaf(coef * err, dn[i - lo], m); /* addcmul_(e, denom, value=coef) */
                else m = fmaf(coef, err, m);                   /* add_(e, alpha=coef) */
            }
            if (storage == ECO_STATE_EIGHT_BIT) m8[i - lo] = m;
            else if (storage) ((uint16_t *)mp)[j] = f32_to_bf16(m);
            else ((float *)mp)[j] = m;
        }
    }
    if (storage == ECO_STATE_EIGHT_BIT) state8_encode_range(a, base, lo, hi, m8, vn);
    return st;
}

/* sweep C (mode 'kahan'): the error e (in the scratch) quantized to nearest with its own block scale cs into
 * the compensation's codes, as the reference's quantize(w_til - w_hat) (mk: divide by cs with v_div_mk) */
static inline __attribute__((always_inline)) void sweep_c(const eco_step_args *a, int64_t b, int64_t n, float cs,
                                                          int mk, const float *e, const int fmt) {
    const int64_t base = b * a->weights.block_size;
    const float fmax = a->weights.format_max;
    void *const comp = a->modes.compensation_codes;
    int64_t i = 0;
#if ECO_VEC
    {
        const int man = fp8_mantissa_bits(fmt), emin = fp8_min_exponent(fmt);
        const vf vs = vf_set1(cs), vrs = vf_set1(1.0f / cs), vhi = vf_set1(fmax), vlo = vf_set1(-fmax);
        const vi vminexp = vi_set1((emin + 127) << 23), vexpmask = vi_set1(0x7F800000),
                 vmagic = vi_set1(((23 - man) << 23) | 0x400000);
        for (; i + VL <= n; i += VL) {
            const vf x = vf_load(e + i);
            vf y = fmt == ECO_FORMAT_BF16 ? x : mk ? v_div_mk(x, vs, vrs) : vf_div(x, vs);
            y = vf_clamp_sym(y, vlo, vhi);
            v_store_codes(comp, base + i, v_round_nearest(y, x, fmt, vexpmask, vminexp, vmagic), fmt, fp8_bias(fmt));
        }
    }
#endif
    (void)mk;
    for (; i < n; i++) {
        float y = fmt == ECO_FORMAT_BF16 ? e[i] : e[i] / cs;
        y = y < -fmax ? -fmax : (y > fmax ? fmax : y);
        store_code(comp, base + i, round_nearest(y, fmt), fmt);
    }
}
#endif
