/* The fused optimizer step (eco_step_many): one fused pass per block (row / group / tensor) for quantized-weight
 * AdamW and SGD, on a team of threads.
 *
 * Each block is processed in two sweeps over data that stays in L1/L2:
 *   sweep A  dequantize -> optimizer update -> w_til and the new moments (kept in a block-sized fp32 scratch;
 *            nothing in memory is written) + block absmax and finiteness          (adamw_sweeps.h, sgd_sweeps.h)
 *   sweep B  new scale -> round (RTN or SR) -> codes; e = w_til - w_hat; ECO injection into the momentum;
 *            the moments written back                                                     (quantize_sweeps.h)
 * so memory sees every stored byte read once and written once, and a block whose update is NaN/Inf is left
 * exactly as it was.
 *
 * Numerics: every operation is the IEEE operation ATen's CPU kernels perform for the reference path
 * (ecoptim/optim/adamw.py, sgd.py, codec.py, rounding.py), in the same order, with fused multiply-adds
 * exactly where ATen's vectorised kernels use them (lerp, addcmul), and none elsewhere: the library is built
 * with -ffp-contract=off so the compiler cannot add any. Square roots are IEEE (the reference uses
 * adamw.sqrt_rn for quantized weights because torch.sqrt on fp32 is not correctly rounded). Divisions by a
 * per-block constant use a reciprocal and one fma correction that provably gives the IEEE quotient (see
 * v_div_mk) where the block's values meet the theorem's conditions, and a true division elsewhere.
 * tests/test_kernels.py checks bit equality of codes, scales and states, for every ISA this CPU can run.
 * Stochastic rounding uses the counter-based uniforms of ecoptim/rng.py (same hash, same element index).
 *
 * Files (one concern each; the library is built from the .c files, see ecoptim/backends/cpu/build.py):
 *   eco_abi.h           the argument structs and entry points, generated from ecoptim/backends/cpu/abi.py
 *   vec.h               the vector layer: vec_avx512.h (16 lanes) or vec_avx2.h (8 lanes), or scalar code only
 *   codecs.h            codes <-> fp32 for every format, bf16, rounding to nearest / stochastic
 *   scales.h            block scales as stored (fp32 absmax, E8M0, NVFP4's E4M3 x fp32) <-> fp32, a new one
 *   rng.h               the stochastic-rounding uniforms
 *   blockstat.h         a block's absmax / smallest magnitude / finiteness
 *   state8.h            the 8-bit state codec (state8.c: its entry point eco_state8)
 *   adamw_sweeps.h, sgd_sweeps.h, quantize_sweeps.h    sweeps A, B and C
 *   team.h / team.c     the thread team (OpenMP or pthreads)
 *   reductions.c        eco_all_finite, eco_sumsq
 *   step.c              this file: dispatch, the step's scheduling, eco_step_many, eco_uniform
 * The sweeps and their helpers are headers of static inline functions, all included into this one translation
 * unit: the compiler must inline them into each specialised loop (a call per vector would cost more than the
 * vector's work), which it can only do within a translation unit. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "adamw_sweeps.h"
#include "blockstat.h"
#include "eco_abi.h"
#include "quantize_sweeps.h"
#include "rng.h"
#include "sgd_sweeps.h"
#include "team.h"
#include "vec.h"

/* Dispatch on the tensor's dtypes, format and rounding, so that each combination gets its own vectorised loop
 * (the sweeps take them as compile-time constants). */
static astat sweep_a(const eco_step_args *a, int64_t b, int64_t lo, int64_t hi, float *wt, float *dn, float *mf,
                     float *vn, int vec) {
#define A_CASE(G, S, F)                                                                                       \
    if (a->gradient.dtype == G && a->moments.storage == S && a->weights.format == F)                          \
        return a->hyper.optimizer == ECO_OPTIMIZER_ADAMW || S == ECO_STATE_EIGHT_BIT                          \
                   ? adamw_sweep_a(a, b, lo, hi, wt, dn, mf, vn, vec, G, S, F)                                \
                   : sgd_sweep_a(a, b, lo, hi, wt, mf, vec, G, S, F);
#define A_FMTS(G, S)                                                                                          \
    A_CASE(G, S, ECO_FORMAT_FP8_E4M3) A_CASE(G, S, ECO_FORMAT_FP8_E5M2) A_CASE(G, S, ECO_FORMAT_INT8)         \
    A_CASE(G, S, ECO_FORMAT_BF16) A_CASE(G, S, ECO_FORMAT_INT4) A_CASE(G, S, ECO_FORMAT_FP4_E2M1)
    A_FMTS(ECO_DTYPE_FP32, ECO_STATE_FP32) A_FMTS(ECO_DTYPE_FP32, ECO_STATE_BF16)
    A_FMTS(ECO_DTYPE_BF16, ECO_STATE_FP32) A_FMTS(ECO_DTYPE_BF16, ECO_STATE_BF16)
    A_FMTS(ECO_DTYPE_FP32, ECO_STATE_EIGHT_BIT) A_FMTS(ECO_DTYPE_BF16, ECO_STATE_EIGHT_BIT)
    astat bad = {0.0f, INFINITY, 1};
    return bad;
#undef A_FMTS
#undef A_CASE
}

/* sweep A, re-run exactly (scalar code: true divisions) if the fast sweep saw a NaN/Inf, which is also how
 * the fast path's shortcuts fail (an Inf second moment); the block is then non-finite only if the exact
 * sweep says so */
static astat sweep_a_checked(const eco_step_args *a, int64_t b, int64_t lo, int64_t hi, float *wt, float *dn,
                             float *mf, float *vn) {
    astat st = sweep_a(a, b, lo, hi, wt, dn, mf, vn, 1);
    if (st.bad) st = sweep_a(a, b, lo, hi, wt, dn, mf, vn, 0);
    return st;
}

/* sweep B, then for mode 'kahan' sweep C and the compensation's new scale (small blocks only: lo = 0, hi = bs) */
static void sweep_b_any(const eco_step_args *a, int64_t b, int64_t lo, int64_t hi, float s, int mk, float *wt,
                        const float *dn, const float *mf, const float *vn) {
    const int adam = a->hyper.optimizer == ECO_OPTIMIZER_ADAMW;
    astat e = {0.0f, INFINITY, 0};
#define B_CASE(S, F, R)                                                                                       \
    if (a->moments.storage == S && a->weights.format == F && a->hyper.stochastic == R)                        \
        e = adam || S == ECO_STATE_EIGHT_BIT ? sweep_b(a, b, lo, hi, s, mk, wt, dn, mf, vn, S, F, R, 1)       \
                                             : sweep_b(a, b, lo, hi, s, mk, wt, dn, mf, vn, S, F, R, 0);      \
    else
#define B_FMTS(S, R)                                                                                          \
    B_CASE(S, ECO_FORMAT_FP8_E4M3, R) B_CASE(S, ECO_FORMAT_FP8_E5M2, R) B_CASE(S, ECO_FORMAT_INT8, R)         \
    B_CASE(S, ECO_FORMAT_BF16, R) B_CASE(S, ECO_FORMAT_INT4, R) B_CASE(S, ECO_FORMAT_FP4_E2M1, R)
    B_FMTS(ECO_STATE_FP32, 0) B_FMTS(ECO_STATE_FP32, 1) B_FMTS(ECO_STATE_BF16, 0) B_FMTS(ECO_STATE_BF16, 1)
    B_FMTS(ECO_STATE_EIGHT_BIT, 0) B_FMTS(ECO_STATE_EIGHT_BIT, 1) {}
#undef B_FMTS
#undef B_CASE
    if (a->modes.compensation_codes == NULL) return;
    /* the compensation is scaled iff the weight is, in its scale format (not E4M3_TENSOR: refused) */
    const scale_pick cp = block_scale(a, e.amax, 0.0f);
    const float cs = cp.x;
    const int cmk = markstein_ok(cs, e);
    switch (a->weights.format) {
    case ECO_FORMAT_FP8_E4M3: sweep_c(a, b, hi - lo, cs, cmk, wt, ECO_FORMAT_FP8_E4M3); break;
    case ECO_FORMAT_FP8_E5M2: sweep_c(a, b, hi - lo, cs, cmk, wt, ECO_FORMAT_FP8_E5M2); break;
    case ECO_FORMAT_INT8: sweep_c(a, b, hi - lo, cs, cmk, wt, ECO_FORMAT_INT8); break;
    case ECO_FORMAT_BF16: sweep_c(a, b, hi - lo, cs, cmk, wt, ECO_FORMAT_BF16); break;
    case ECO_FORMAT_FP4_E2M1: sweep_c(a, b, hi - lo, cs, cmk, wt, ECO_FORMAT_FP4_E2M1); break;
    default: sweep_c(a, b, hi - lo, cs, cmk, wt, ECO_FORMAT_INT4); break;
    }
    if (a->modes.compensation_scales) store_scale(a->modes.compensation_scales, a->weights.scale_format, b, cp);
}

/* a two-level scale (NVFP4's s_b * s_t): every block's scale depends on the whole tensor's absmax */
static inline int two_level(const eco_step_args *a) {
    return a->weights.scales != NULL && a->weights.scale_format == ECO_SCALE_E4M3_TENSOR;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Threading: one team of threads steps every tensor of the call (one thread creation per optimizer step,  */
/* not per tensor). Blocks of up to SPLIT elements are taken in chunks from a shared counter, each thread   */
/* sweeping its blocks in its own in-cache scratch; a larger block (a per-tensor scale) is shared out among */
/* the threads and swept in two passes, with a barrier in between to combine the block statistics.        */
#define SPLIT 65536
#define NSCRATCH 4 /* w_til, denominator, momentum, second moment */
#define CHUNK 16384 /* elements of small blocks per unit of work */
#define RANGE 4096  /* elements of a large block swept at a time: its scratch stays in L1/L2 */
typedef struct {
    eco_step_args *const *args;
    int n, nt, tid;
    pthread_barrier_t *bar; /* unused with OpenMP (its team barrier) */
    float *scratch;       /* this thread's: NSCRATCH x the largest small block (or RANGE) */
    astat *partial;       /* shared: one per thread */
    int64_t *next;        /* shared: the next chunk of small blocks to take */
    const int64_t *cend;  /* per tensor: one past its last chunk (chunks of all tensors numbered in order) */
    const int64_t *cblk;  /* per tensor: blocks per chunk */
} team;

static void team_barrier(team *tm) {
#ifdef _OPENMP
    (void)tm;
#pragma omp barrier
#else
    pthread_barrier_wait(tm->bar);
#endif
}

static void *team_run(void *p) {
    team *tm = (team *)p;
    const int nt = tm->nt, tid = tm->tid;
    /* Small blocks: chunks are taken from a shared counter rather than dealt out in equal shares, so a thread
     * whose core is busier (a noisy neighbour, an interrupt) takes fewer and nobody waits for it at the end. */
    float *wt = tm->scratch;
    for (int k = 0;;) {
        const int64_t c = __atomic_fetch_add(tm->next, 1, __ATOMIC_RELAXED);
        if (k >= tm->n || c >= tm->cend[tm->n - 1]) break;
        while (c >= tm->cend[k]) k++; /* a thread's chunks come in increasing order */
        eco_step_args *a = tm->args[k];
        const int64_t bs = a->weights.block_size, first = (c - (k ? tm->cend[k - 1] : 0)) * tm->cblk[k];
        const int64_t nb = a->weights.num_blocks, last = first + tm->cblk[k] < nb ? first + tm->cblk[k] : nb;
        float *dn = wt + bs, *mf = dn + bs, *vn = mf + bs;
        int64_t bad = 0;
        for (int64_t b = first; b < last; b++) {
            const astat st = sweep_a_checked(a, b, 0, bs, wt, dn, mf, vn);
            if (st.bad) { bad++; continue; } /* nothing of this block was written */
            const scale_pick s = block_scale(a, st.amax, 0.0f);
            if (a->weights.scales) store_scale(a->weights.scales, a->weights.scale_format, b, s);
            sweep_b_any(a, b, 0, bs, s.x, markstein_ok(s.x, st), wt, dn, mf, vn);
        }
        if (bad) __atomic_fetch_add(&a->result.nonfinite_blocks, bad, __ATOMIC_RELAXED);
    }
    /* Large blocks (a per-tensor scale): every thread takes an even share of the block, in ranges of up to
     * RANGE elements. Pass 1 runs sweep A over the share for the statistics only (nothing is kept: a
     * block-sized scratch would not fit any cache); the statistics meet at a barrier; pass 2 runs sweep A again
     * range by range, now followed by sweep B while the range is in cache. Sweep A is deterministic, so both
     * passes see the same w_til. */
    for (int k = 0; k < tm->n; k++) {
        eco_step_args *a = tm->args[k];
        const int64_t bs = a->weights.block_size;
        if (a->weights.num_blocks <= 0 || bs <= SPLIT) continue;
        int64_t per = (bs + nt - 1) / nt;
        per = (per + 63) / 64 * 64;
        const int64_t lo = tid * per < bs ? tid * per : bs, hi = lo + per < bs ? lo + per : bs;
        float *dn = wt + RANGE, *mf = dn + RANGE, *vn = mf + RANGE;
        for (int64_t b = 0; b < a->weights.num_blocks; b++) {
            astat st = {0.0f, INFINITY, 0};
            for (int64_t r = lo; r < hi; r += RANGE)
                astat_merge(&st, sweep_a_checked(a, b, r, r + RANGE < hi ? r + RANGE : hi, wt, dn, mf, vn));
            tm->partial[tid] = st;
            team_barrier(tm);
            st = tm->partial[0];
            for (int t = 1; t < nt; t++) astat_merge(&st, tm->partial[t]); /* every thread gets the same */
            const scale_pick sp = st.bad ? (scale_pick){0.0f, 0u} : block_scale(a, st.amax, 0.0f);
            const float s = sp.x;
            if (!st.bad) {
                const int mk = markstein_ok(s, st);
                for (int64_t r = lo; r < hi; r += RANGE) {
                    const int64_t r1 = r + RANGE < hi ? r + RANGE : hi;
                    sweep_a_checked(a, b, r, r1, wt, dn, mf, vn);
                    sweep_b_any(a, b, r, r1, s, mk, wt, dn, mf, vn);
                }
            }
            team_barrier(tm); /* every pass-2 sweep A has read the old scale; partials are reused */
            if (tid == 0) {
                if (st.bad) a->result.nonfinite_blocks++;
                else if (a->weights.scales) store_scale(a->weights.scales, a->weights.scale_format, b, sp);
            }
        }
    }
    /* Two-level scales (NVFP4): a block's scale s_b * s_t depends on the tensor's absmax through s_t, so the
     * tensor's blocks (each at most SPLIT elements) are shared out evenly and swept twice, as a large block is:
     * pass 1 runs sweep A over every block for the statistics only; they meet at a barrier, where every thread
     * derives the same s_t; pass 2 runs sweep A again block by block, each followed by sweep B with its new scale
     * (the block's own s_b is rewritten right after its sweep A has read it; s_t only after the closing barrier,
     * once every block has read the old one). A NaN/Inf anywhere leaves the whole tensor as it was, every block
     * counted: a new s_t would change the value of every other block. */
    for (int k = 0; k < tm->n; k++) {
        eco_step_args *a = tm->args[k];
        const int64_t bs = a->weights.block_size, nb = a->weights.num_blocks;
        if (nb <= 0 || bs <= 0 || !two_level(a)) continue;
        const int64_t per = (nb + nt - 1) / nt, b0 = tid * per < nb ? tid * per : nb;
        const int64_t b1 = b0 + per < nb ? b0 + per : nb;
        float *dn = wt + bs, *mf = dn + bs, *vn = mf + bs;
        astat st = {0.0f, INFINITY, 0};
        for (int64_t b = b0; b < b1; b++) astat_merge(&st, sweep_a_checked(a, b, 0, bs, wt, dn, mf, vn));
        tm->partial[tid] = st;
        team_barrier(tm);
        st = tm->partial[0];
        for (int t = 1; t < nt; t++) astat_merge(&st, tm->partial[t]); /* every thread gets the same */
        const float tensor_scale = st.bad ? 0.0f : pick_tensor_scale(st.amax, a->weights.format_max);
        if (!st.bad) {
            for (int64_t b = b0; b < b1; b++) {
                const astat sb = sweep_a_checked(a, b, 0, bs, wt, dn, mf, vn);
                const scale_pick s = block_scale(a, sb.amax, tensor_scale);
                store_scale(a->weights.scales, ECO_SCALE_E4M3_TENSOR, b, s);
                sweep_b_any(a, b, 0, bs, s.x, markstein_ok(s.x, sb), wt, dn, mf, vn);
            }
        }
        team_barrier(tm); /* every pass-2 sweep A has read the old s_t; partials are reused */
        if (tid == 0) {
            if (st.bad) a->result.nonfinite_blocks = nb;
            else store_tensor_scale(a->weights.scales, nb, tensor_scale);
        }
    }
    return NULL;
}

/* Step n tensors with up to nthreads threads. Returns 0, -1 if scratch memory could not be allocated, or -2
 * for 8-bit moments whose blocks do not fit, a kahan block larger than SPLIT, or a two-level (NVFP4) scale with
 * blocks larger than SPLIT or in mode 'kahan' (then nothing was modified).
 * Each args->result.nonfinite_blocks counts the blocks whose update came out NaN/Inf: those blocks are left
 * exactly as they were (codes, scale, moments); with a two-level scale, the whole tensor and all its blocks. */
int32_t eco_step_many(eco_step_args *const *args, int32_t n, int32_t nthreads) {
    int64_t small = 0, total = 0; /* small: the largest block of at most SPLIT elements */
    int big = 0;                  /* any larger block (swept RANGE elements at a time, behind barriers)? */
    int coop = 0;                 /* any large block or two-level scale (all threads together, behind barriers)? */
    for (int k = 0; k < n; k++) { /* 8-bit moments: AdamW, state blocks (a power of two >= 8) tiling each block */
        const eco_step_args *a = args[k];
        const int64_t bs = a->weights.block_size, s8bs = a->state8.block_size;
        if (a->moments.storage == ECO_STATE_EIGHT_BIT &&
            (a->hyper.optimizer != ECO_OPTIMIZER_ADAMW || bs > SPLIT || s8bs < 8 || (s8bs & (s8bs - 1)) || bs % s8bs))
            return -2;
        if (a->modes.compensation_codes && bs > SPLIT) return -2; /* kahan: the error must stay in the scratch */
        /* two-level scales: blocks swept whole from the scratch; kahan's compensation would need a pass of its own */
        if (two_level(a) && (bs > SPLIT || a->modes.compensation_codes)) return -2;
    }
    for (int k = 0; k < n; k++) {
        const int64_t nb = args[k]->weights.num_blocks, bs = args[k]->weights.block_size;
        args[k]->result.nonfinite_blocks = 0;
        if (nb <= 0 || bs <= 0) continue;
        total += nb * bs;
        if (bs <= SPLIT) small = bs > small ? bs : small;
        else big = 1;
        coop |= bs > SPLIT || two_level(args[k]);
    }
    int nt = nthreads < 1 ? 1 : (nthreads > ECO_MAX_THREADS ? ECO_MAX_THREADS : nthreads);
    if (total < 32768) nt = 1; /* starting a thread costs more than sweeping this little */
    /* chunks of about CHUNK elements of small blocks, numbered tensor after tensor */
    int64_t *cend = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(n > 0 ? n : 1)), *cblk = cend + n, next = 0;
    if (!cend) return -1;
    for (int k = 0; k < n; k++) {
        const int64_t nb = args[k]->weights.num_blocks, bs = args[k]->weights.block_size;
        const int small_blocks = nb > 0 && bs > 0 && bs <= SPLIT && !two_level(args[k]);
        cblk[k] = small_blocks ? (CHUNK / bs > 1 ? CHUNK / bs : 1) : 1;
        cend[k] = (k ? cend[k - 1] : 0) + (small_blocks ? (nb + cblk[k] - 1) / cblk[k] : 0);
    }
    const size_t per_thread = NSCRATCH * (size_t)(big && RANGE > small ? RANGE : small);
    float *scratch = (float *)malloc(sizeof(float) * per_thread * nt + sizeof(astat) * (size_t)nt + 64);
    if (!scratch) { free(cend); return -1; }
    team tm[ECO_MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        tm[t].args = args; tm[t].n = n; tm[t].nt = nt; tm[t].tid = t; tm[t].bar = NULL;
        tm[t].scratch = scratch + per_thread * t;
        tm[t].partial = (astat *)(scratch + per_thread * nt);
        tm[t].next = &next; tm[t].cend = cend; tm[t].cblk = cblk;
    }
#ifdef _OPENMP
    if (nt > 1) {
        /* one member per thread of the team OpenMP gives (it may be smaller than asked for): the large blocks'
         * shares and barriers are sized by the team actually running */
#pragma omp parallel num_threads(nt)
        {
            const int tid = omp_get_thread_num();
            tm[tid].nt = omp_get_num_threads();
            team_run(&tm[tid]);
        }
    } else {
        team_run(&tm[0]);
    }
#else
    pthread_barrier_t bar;
    if (coop && pthread_barrier_init(&bar, NULL, (unsigned)nt) != 0) { free(scratch); free(cend); return -1; }
    for (int t = 0; t < nt; t++) tm[t].bar = &bar;
    if (coop) {
        /* Barriers need every member running at once: if a thread cannot be created, the step runs on one */
        const int ran = eco_run_together(team_run, tm, sizeof(team), nt);
        pthread_barrier_destroy(&bar);
        if (!ran) {
            free(scratch);
            free(cend);
            return eco_step_many(args, n, 1);
        }
    } else {
        eco_run_parallel(team_run, tm, sizeof(team), nt);
    }
#endif
    free(scratch);
    free(cend);
    return 0;
}

/* the stochastic-rounding uniforms u_0 .. u_{n-1} of a key: rng.uniform on CPU (the reference path's SR) */
void eco_uniform(uint32_t k1, uint32_t k2, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = uniform(k1, k2, (uint64_t)i);
}

/* lanes of the sweeps' vector code in this build: 16 (AVX-512), 8 (AVX2) or 1 (the scalar code) */
int32_t eco_vector_lanes(void) {
#if ECO_VEC
    return VL;
#else
    return 1;
#endif
}

/* the hash of the argument definition this library was built from (ecoptim/backends/cpu/abi.py) */
uint32_t eco_abi_hash(void) { return ECO_ABI_HASH; }
