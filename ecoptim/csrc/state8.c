/* eco_state8: encode an fp32 state tensor into 8-bit codes + block absmax, or decode it, block by block on the
 * thread team (the codec itself is state8.h's, shared with the fused step). */
#include <stdint.h>
#include "eco_abi.h"
#include "state8.h"
#include "team.h"

typedef struct {
    const float *x;      /* encode: in; decode: out (as float *) */
    uint8_t *codes;
    float *absmax;
    const float *table;
    const int32_t *brtn, *bsr;
    int64_t n, bs;
    int32_t ntab, nbkt, is_signed, sr;
    uint32_t k1, k2;
    int32_t part, parts, decode;
} s8_work;

static void s8_block(const s8_work *w, int64_t b) {
    const int64_t lo = b * w->bs, hi = lo + w->bs < w->n ? lo + w->bs : w->n;
    if (!w->decode) {
        s8_encode(w->x + lo, w->codes, &w->absmax[b], lo, hi, w->table, w->brtn, w->bsr, w->ntab, w->nbkt,
                  w->is_signed, w->sr, w->k1, w->k2);
        return;
    }
    float *out = (float *)w->x;
    int64_t i = lo;
#if ECO_VEC
    vtab tab;
    vtab_load(&tab, w->table, w->is_signed ? 128 : 256);
    if (w->is_signed)
        for (; i + VL <= hi; i += VL) vf_store(out + i, s8_decode_vec(w->codes, &tab, vf_set1(w->absmax[b]), i, 1));
    else
        for (; i + VL <= hi; i += VL) vf_store(out + i, s8_decode_vec(w->codes, &tab, vf_set1(w->absmax[b]), i, 0));
#endif
    for (; i < hi; i++) out[i] = s8_decode_scalar(w->codes, w->table, w->absmax, i, w->bs, w->is_signed);
}


static void *s8_worker(void *p) {
    const s8_work *w = (const s8_work *)p;
    const int64_t nb = (w->n + w->bs - 1) / w->bs, per = (nb + w->parts - 1) / w->parts;
    const int64_t b0 = per * w->part, b1 = b0 + per < nb ? b0 + per : nb;
    for (int64_t b = b0; b < b1; b++) s8_block(w, b);
    return NULL;
}

/* decode = 0: x (fp32, n) -> codes + absmax; decode = 1: codes + absmax -> x. Threads share the blocks. */
void eco_state8(float *x, uint8_t *codes, float *absmax, const float *table, const int32_t *brtn,
                const int32_t *bsr, int32_t nbkt, int64_t n, int64_t bs, int32_t ntab, int32_t is_signed, int32_t sr,
                uint32_t k1, uint32_t k2, int32_t decode, int32_t nthreads) {
    int nt = nthreads < 1 ? 1 : (nthreads > ECO_MAX_THREADS ? ECO_MAX_THREADS : nthreads);
    if (n < 65536) nt = 1;
    s8_work ws[ECO_MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        s8_work w = {x, codes, absmax, table, brtn, bsr, n, bs, ntab, nbkt, is_signed, sr, k1, k2, t, nt, decode};
        ws[t] = w;
    }
    eco_run_parallel(s8_worker, ws, sizeof(s8_work), nt);
}

