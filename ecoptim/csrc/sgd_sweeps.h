/* SGD's sweep A: dequantize a block (or a range of a large block), apply torch.optim.SGD's single-tensor ops
 * (grad.add(w, alpha=wd); buf.mul_(mom).add_(g, alpha=1-dampening); nesterov: g.add(buf, alpha=mom);
 * w.add_(d, alpha=-lr); ATen's add with alpha is a + alpha*b via fmadd) and keep w_til and the new momentum in
 * the block's scratch (nothing in memory is written); returns the block statistics of w_til. Sweep B
 * (quantize_sweeps.h) then quantizes and writes. */
#ifndef ECO_SGD_SWEEPS_H
#define ECO_SGD_SWEEPS_H
#include <math.h>
#include <stdint.h>
#include "blockstat.h"
#include "codecs.h"
#include "eco_abi.h"
#include "scales.h"
#include "vec.h"

/* sweep A over elements [lo, hi) of block b (grad_dtype: the gradient's eco_dtype; storage: the momentum's
 * eco_state_storage; fmt: the eco_format); vec = 0 takes the scalar path only */
static inline __attribute__((always_inline)) astat sgd_sweep_a(const eco_step_args *a, int64_t b, int64_t lo,
                                                                int64_t hi, float *wt, float *mf, int vec,
                                                                const int grad_dtype, const int storage,
                                                                const int fmt) {
    const int64_t base = b * a->weights.block_size;
    const int64_t nb = a->weights.num_blocks;
    const float sc = scale_of(a->weights.scales, a->weights.scale_format, b, nb);
    const float csc = scale_of(a->modes.compensation_scales, a->weights.scale_format, b, nb); /* mode 'kahan' */
    const float wd = a->hyper.weight_decay, mom = a->hyper.momentum, omd = a->hyper.one_minus_dampening,
                nl = a->hyper.neg_lr;
    const int first = a->hyper.first_step, nest = a->hyper.nesterov, has_mom = mom != 0.0f;
    astat st = {0.0f, INFINITY, 0};
    int64_t i = lo;
#if ECO_VEC
    if (vec) {
        const vf vsc = vf_set1(sc), vwd = vf_set1(wd), vmom = vf_set1(mom), vomd = vf_set1(omd), vnl = vf_set1(nl),
                 vgs = vf_set1(a->hyper.grad_scale), vcsc = vf_set1(csc);
        astat_acc acc = astat_acc_start();
        const void *codes = a->weights.codes, *grad = a->gradient.values, *mp = a->moments.exp_avg,
                   *cmp = a->modes.compensation_codes;
        const float *mst = a->modes.master, *erp = a->modes.carried_error;
        const int64_t ahead = hi - lo; /* see prefetch_range */
        for (; i + VL <= hi; i += VL) {
            const int64_t j = base + i;
            prefetch_range(grad, j + ahead, VL, grad_dtype ? 2 : 4);
            if (has_mom) prefetch_range(mp, j + ahead, VL, storage ? 2 : 4);
            vf w = mst ? vf_load(mst + j) : vf_mul(v_decode_p(codes, j, fmt), vsc);
            if (erp) w = vf_add(w, vf_load(erp + j));
            vf g = vf_mul(v_ld(grad, j, grad_dtype), vgs);
            if (wd != 0.0f) g = vf_fmadd(vwd, w, g);
            vf d = g;
            if (has_mom) {
                const vf m = first ? g : vf_fmadd(vomd, g, vf_mul(v_ld(mp, j, storage), vmom));
                d = nest ? vf_fmadd(vmom, m, g) : m;
                vf_store(mf + (i - lo), m);
            }
            w = vf_fmadd(vnl, d, w);
            if (cmp) w = vf_add(w, vf_mul(v_decode_p(cmp, j, fmt), vcsc)); /* kahan: + the compensation */
            vf_store(wt + (i - lo), w);
            astat_acc_add(&acc, w);
        }
        astat_acc_fold(&st, acc);
    }
#endif
    (void)vec;
    for (; i < hi; i++) {
        const int64_t j = base + i;
        float w = a->modes.master ? a->modes.master[j]
                                  : decode_scalar(a->weights.codes, a->weights.fp8_table, j, fmt) * sc;
        if (a->modes.carried_error) w = w + a->modes.carried_error[j];
        float g = ld_scalar(a->gradient.values, j, grad_dtype) * a->hyper.grad_scale;
        if (wd != 0.0f) g = fmaf(wd, w, g);
        float d = g;
        if (has_mom) {
            float m;
            if (first) m = g;
            else {
                m = ld_scalar(a->moments.exp_avg, j, storage);
                m = m * mom;
                m = fmaf(omd, g, m);
            }
            d = nest ? fmaf(mom, m, g) : m;
            mf[i - lo] = m;
        }
        w = fmaf(nl, d, w);
        if (a->modes.compensation_codes) /* kahan: + the compensation */
            w = w + decode_scalar(a->modes.compensation_codes, a->weights.fp8_table, j, fmt) * csc;
        wt[i - lo] = w;
        astat_scalar(&st, w);
    }
    return st;
}

#endif
