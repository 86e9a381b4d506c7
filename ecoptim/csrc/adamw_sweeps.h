/* AdamW's sweep A: dequantize a block (or a range of a large block), apply the AdamW update of
 * ecoptim/optim/adamw.py with the IEEE operations ATen performs there, and keep w_til, the denominator and the
 * new moments in the block's scratch (nothing in memory is written: a block that turns out non-finite is left as
 * it was); returns the block statistics of w_til. Sweep B (quantize_sweeps.h) then quantizes and writes. */
#ifndef ECO_ADAMW_SWEEPS_H
#define ECO_ADAMW_SWEEPS_H
#include <math.h>
#include <stdint.h>
#include "blockstat.h"
#include "codecs.h"
#include "eco_abi.h"
#include "scales.h"
#include "state8.h"
#include "vec.h"

/* the update's scalars for block b, as the reference passes them to ATen */
typedef struct {
    float scale;              /* the block's scale (1 if unscaled: x * 1 is exact, as no multiply at all) */
    float compensation_scale; /* mode 'kahan': the compensation's block scale */
    float decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, grad_scale;
    int lerp_from_m;          /* lerp's weight < 0.5: ATen's lerp computes from m, else from g */
} adamw_scalars;

static inline adamw_scalars adamw_scalars_of(const eco_step_args *a, int64_t b) {
    const eco_hyper *h = &a->hyper;
    const int from_m = h->one_minus_beta1 < 0.5f;
    const adamw_scalars k = {
        scale_of(a->weights.scales, a->weights.scale_format, b, a->weights.num_blocks),
        scale_of(a->modes.compensation_scales, a->weights.scale_format, b, a->weights.num_blocks),
        h->decay_factor, from_m ? h->one_minus_beta1 : h->one_minus_beta1 - 1.0f, h->beta2, h->one_minus_beta2,
        h->bias_correction2_sqrt, h->eps, h->neg_step_size, h->grad_scale, from_m};
    return k;
}

/* one element: w (the decoded, decayed weight), g (the scaled gradient), the moments m, v in place; returns
 * w_til, *d the denominator */
static inline float adamw_update(const adamw_scalars *k, float w, float g, float *m, float *v, float *d) {
    /* lerp_(g, 1 - beta1): ATen's lerp_vec = fmadd(coeff, end - self, base) */
    *m = fmaf(k->lerp_coeff, g - *m, k->lerp_from_m ? *m : g);
    /* mul_(beta2).addcmul_(g, g, value=1-beta2) */
    *v = *v * k->beta2;
    *v = fmaf(k->one_minus_beta2 * g, g, *v);
    /* denom = sqrt(v) / sqrt(bias_correction2) + eps */
    *d = sqrtf(*v) / k->bias_correction2_sqrt + k->eps;
    /* addcdiv_(m, denom, value=-step_size) */
    return w + k->neg_step_size * *m / *d;
}

#if ECO_VEC
/* the vector sweep's operands: the scalars broadcast, and local copies of the pointers (stores through float
 * pointers could alias the argument struct, which would force a reload of every pointer in every iteration) */
typedef struct {
    /* code_scale: the block's scale, times 2^120 for E4M3 codes (decoded as v_e4m3_fields, their values times
     * 2^-120: one multiply by the exact 2^120 * scale rounds the same product, value * scale, once) */
    vf code_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, rcp_bias_correction2_sqrt, eps,
        neg_step_size, grad_scale, compensation_scale;
    const void *codes, *grad, *exp_avg, *exp_avg_sq, *compensation;
    const float *exp_avg_absmax, *exp_avg_sq_absmax, *master, *carried_error;
    vtab signed_magnitudes, unsigned_magnitudes; /* 8-bit moments: their magnitude tables */
    int state8_shift;                            /* log2 of the 8-bit state block size (a power of two) */
} adamw_vec;

/* the VL elements base + i ..: the update of adamw_update, into the scratch at i - lo */
static inline __attribute__((always_inline)) void adamw_update_vec(const adamw_vec *c, int64_t base, int64_t i,
                                                                   int64_t lo, float *wt, float *dn, float *mf,
                                                                   float *vn, astat_acc *acc, const int from_m,
                                                                   const int grad_dtype, const int storage,
                                                                   const int fmt) {
    const int64_t j = base + i;
    vf w = c->master                   ? vf_load(c->master + j)
           : fmt == ECO_FORMAT_FP8_E4M3 ? vf_mul(v_e4m3_fields((const uint8_t *)c->codes + j), c->code_scale)
                                        : vf_mul(v_decode_p(c->codes, j, fmt), c->code_scale);
    if (c->carried_error) w = vf_add(w, vf_load(c->carried_error + j));
    w = vf_mul(w, c->decay);
    const vf g = vf_mul(v_ld(c->grad, j, grad_dtype), c->grad_scale);
    vf m = storage == ECO_STATE_EIGHT_BIT
               ? s8_decode_vec((const uint8_t *)c->exp_avg, &c->signed_magnitudes,
                               v_s8_absmax(c->exp_avg_absmax, j, c->state8_shift), j, 1)
               : v_ld(c->exp_avg, j, storage);
    vf v = storage == ECO_STATE_EIGHT_BIT
               ? s8_decode_vec((const uint8_t *)c->exp_avg_sq, &c->unsigned_magnitudes,
                               v_s8_absmax(c->exp_avg_sq_absmax, j, c->state8_shift), j, 0)
               : v_ld(c->exp_avg_sq, j, storage);
    m = vf_fmadd(c->lerp_coeff, vf_sub(g, m), from_m ? m : g);
    v = vf_fmadd(vf_mul(c->one_minus_beta2, g), g, vf_mul(v, c->beta2));
    const vf d = vf_add(v_div_mk(vf_sqrt(v), c->bias_correction2_sqrt, c->rcp_bias_correction2_sqrt), c->eps);
    w = vf_add(w, vf_div(vf_mul(c->neg_step_size, m), d));
    if (c->compensation) w = vf_add(w, vf_mul(v_decode_p(c->compensation, j, fmt), c->compensation_scale));
    vf_store(wt + (i - lo), w);
    vf_store(dn + (i - lo), d);
    vf_store(mf + (i - lo), m); /* the moments are written once, by sweep B (after the injection) */
    vf_store(vn + (i - lo), v);
    astat_acc_add(acc, w);
}

/* the vector part of the sweep over [*i, hi): two vectors per iteration, each requesting the next block's (or
 * range's) gradient and first moment (see prefetch_range) */
static inline __attribute__((always_inline)) void adamw_sweep_vec(const adamw_vec *c, int64_t base, int64_t *i,
                                                                  int64_t lo, int64_t hi, float *wt, float *dn,
                                                                  float *mf, float *vn, astat_acc *acc,
                                                                  const int from_m, const int grad_dtype,
                                                                  const int storage, const int fmt) {
    const int64_t ahead = hi - lo, state_bytes = storage == ECO_STATE_EIGHT_BIT ? 1 : storage ? 2 : 4;
    int64_t k = *i;
    for (; k + 2 * VL <= hi; k += 2 * VL) {
        prefetch_range(c->grad, base + k + ahead, 2 * VL, grad_dtype ? 2 : 4);
        prefetch_range(c->exp_avg, base + k + ahead, 2 * VL, state_bytes);
        adamw_update_vec(c, base, k, lo, wt, dn, mf, vn, acc, from_m, grad_dtype, storage, fmt);
        adamw_update_vec(c, base, k + VL, lo, wt, dn, mf, vn, acc, from_m, grad_dtype, storage, fmt);
    }
    for (; k + VL <= hi; k += VL)
        adamw_update_vec(c, base, k, lo, wt, dn, mf, vn, acc, from_m, grad_dtype, storage, fmt);
    *i = k;
}
#endif

/* sweep A over elements [lo, hi) of block b (grad_dtype: the gradient's eco_dtype; storage: the moments'
 * eco_state_storage; fmt: the eco_format). vec = 0 takes the scalar path only (the exact re-run of a block whose
 * fast sweep saw a NaN/Inf). */
static inline __attribute__((always_inline)) astat adamw_sweep_a(const eco_step_args *a, int64_t b, int64_t lo,
                                                                  int64_t hi, float *wt, float *dn, float *mf,
                                                                  float *vn, int vec, const int grad_dtype,
                                                                  const int storage, const int fmt) {
    const int64_t base = b * a->weights.block_size;
    const adamw_scalars k = adamw_scalars_of(a, b);
    astat st = {0.0f, INFINITY, 0};
    int64_t i = lo;
    /* sqrt(v) / bc2s by Markstein: sqrt of a finite v is +0 or in [2^-75, 2^64], so with bc2s in [2^-40, 1]
     * the quotient and residual are normal. v = Inf gives NaN here: the block is re-run exactly. */
    if (!(k.bias_correction2_sqrt >= 0x1p-40f && k.bias_correction2_sqrt <= 1.0f)) vec = 0;
    /* 2^120 * scale must be finite for the E4M3 decode (see adamw_vec) */
    if (fmt == ECO_FORMAT_FP8_E4M3 && !a->modes.master && !(k.scale < 0x1p8f)) vec = 0;
#if ECO_VEC
    if (vec) {
        adamw_vec c;
        c.code_scale = vf_set1(fmt == ECO_FORMAT_FP8_E4M3 ? k.scale * 0x1p120f : k.scale);
        c.decay = vf_set1(k.decay);
        c.lerp_coeff = vf_set1(k.lerp_coeff);
        c.beta2 = vf_set1(k.beta2);
        c.one_minus_beta2 = vf_set1(k.one_minus_beta2);
        c.bias_correction2_sqrt = vf_set1(k.bias_correction2_sqrt);
        c.rcp_bias_correction2_sqrt = vf_set1(1.0f / k.bias_correction2_sqrt);
        c.eps = vf_set1(k.eps);
        c.neg_step_size = vf_set1(k.neg_step_size);
        c.grad_scale = vf_set1(k.grad_scale);
        c.compensation_scale = vf_set1(k.compensation_scale);
        c.codes = a->weights.codes;
        c.grad = a->gradient.values;
        c.exp_avg = a->moments.exp_avg;
        c.exp_avg_sq = a->moments.exp_avg_sq;
        c.compensation = a->modes.compensation_codes;
        c.exp_avg_absmax = a->state8.exp_avg_absmax;
        c.exp_avg_sq_absmax = a->state8.exp_avg_sq_absmax;
        c.master = a->modes.master;
        c.carried_error = a->modes.carried_error;
        c.state8_shift = 0;
        if (storage == ECO_STATE_EIGHT_BIT) {
            vtab_load(&c.signed_magnitudes, a->state8.signed_magnitudes, 128);
            vtab_load(&c.unsigned_magnitudes, a->state8.unsigned_magnitudes, 256);
            c.state8_shift = __builtin_ctzll((unsigned long long)a->state8.block_size);
        }
        astat_acc acc = astat_acc_start();
        if (k.lerp_from_m) adamw_sweep_vec(&c, base, &i, lo, hi, wt, dn, mf, vn, &acc, 1, grad_dtype, storage, fmt);
        else adamw_sweep_vec(&c, base, &i, lo, hi, wt, dn, mf, vn, &acc, 0, grad_dtype, storage, fmt);
        astat_acc_fold(&st, acc);
    }
#endif
    (void)vec;
    const void *codes = a->weights.codes, *comp = a->modes.compensation_codes;
    const float *lut = a->weights.fp8_table;
    for (; i < hi; i++) {
        const int64_t j = base + i;
        float w = a->modes.master ? a->modes.master[j] : decode_scalar(codes, lut, j, fmt) * k.scale;
        if (a->modes.carried_error) w = w + a->modes.carried_error[j];
        w = w * k.decay;
        const float g = ld_scalar(a->gradient.values, j, grad_dtype) * k.grad_scale;
        float m = storage == ECO_STATE_EIGHT_BIT
                      ? s8_decode_scalar((const uint8_t *)a->moments.exp_avg, a->state8.signed_magnitudes,
                                         a->state8.exp_avg_absmax, j, a->state8.block_size, 1)
                      : ld_scalar(a->moments.exp_avg, j, storage);
        float v = storage == ECO_STATE_EIGHT_BIT
                      ? s8_decode_scalar((const uint8_t *)a->moments.exp_avg_sq, a->state8.unsigned_magnitudes,
                                         a->state8.exp_avg_sq_absmax, j, a->state8.block_size, 0)
                      : ld_scalar(a->moments.exp_avg_sq, j, storage);
        float d;
        w = adamw_update(&k, w, g, &m, &v, &d);
        if (comp) w = w + decode_scalar(comp, lut, j, fmt) * k.compensation_scale; /* kahan: + the compensation */
        wt[i - lo] = w;
        dn[i - lo] = d;
        mf[i - lo] = m;
        vn[i - lo] = v;
        astat_scalar(&st, w);
    }
    return st;
}
#endif
