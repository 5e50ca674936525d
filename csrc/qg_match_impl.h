/*
 * qg_match_impl.h - private to qg_match*.c: the jobs the drivers (qg_match.c) hand to the engines, the
 * contract every engine honours, and the one record of engines per ISA level (qg_match_kernels):
 * portable (qg_match_portable.c), AVX2 (qg_match_avx2.c), AVX-512 (qg_match_avx512.c). Not part of the
 * kernel API.
 *
 * A job is a validated list of pairs: pair q (0 <= q < nA*K) is A[q / K] against
 * B[cand ? cand[q] : q % K] (all pairs: cand == NULL and K == nB). Outputs are either the maxima
 * (mp, mg [npairs, S], ap/ag or both NULL) or fused scores (w != NULL: out[npairs]).
 */
#ifndef QG_MATCH_IMPL_H
#define QG_MATCH_IMPL_H
#include "qg_cpu.h"
#include "qg_match.h"

#include <float.h>
#include <math.h>

typedef struct qg_pairs_job {
    const float *A;
    int64_t nA;
    const float *B;
    int64_t nB;
    const int64_t *cand; /* NULL: all pairs */
    int64_t K;
    int64_t C, S;
    float *mp, *mg;
    uint16_t *ap, *ag;
    const float *w;
    float bias;
    float *out;
} qg_pairs_job;

/*
 * Generic backward over "rows": row t owns output map out[rowid[t]] (C x S); its contributions are the
 * pairs list[off[t]..off[t+1]) (pair ids in the order to sum), each with far-side map
 * far[farid(pair)]. How an engine splits the rows into work items is its own choice (portable: (row,
 * channel block), or whole rows with ytab; AVX2: runs of rows that read the same far maps).
 */
typedef struct qg_bwd_job {
    int64_t nrows;
    const int64_t *off;   /* NULL: row t has pairs t*K .. t*K+K-1 (side 0), or t, t+K, ... (side 1) */
    const int64_t *list;  /* pair ids, CSR order (with off) */
    const int64_t *rowid; /* output map of row t (NULL: t) */
    int64_t K;            /* pairs per probe-side map */
    int64_t nA;           /* probe-side maps (side 1, off == NULL: pairs t + i*K for i < nA) */
    const int64_t *cand;  /* far-side map of pair q for side 0 (NULL: q % K) */
    const float *far;
    int64_t nfar;         /* far-side maps (far has nfar maps of C x S) */
    int side;
    int64_t C, S;
    const float *gmp, *gmg;
    const uint16_t *ap, *ag;
    float *out;
    /* Optional (NULL: off): after an output map is complete, the engine applies the normalisation backward
     * to it in place, with y rebuilt from the raw table: out map m <- norm_bwd(out[m], ytab[yrow[m]],
     * ynorm[m]), the bits of qg_norm_backward_rows_f32 on the finished output. Maps of no row are not
     * touched (the restricted driver zeroes them; zeros stay zeros through the normalisation backward). */
    const float *ytab;
    const int64_t *yrow;
    const float *ynorm;
} qg_bwd_job;

/* Locations per normalisation work item. */
#define QG_NORM_SB 256

/* Normalisation work items: n <= QG_NORM_SB locations starting at the given pointers (map row
 * stride S), as described at qg_norm_fwd_item / qg_norm_bwd_item in qg_match_portable.c; every engine
 * gives the same bits. */
typedef void (*qg_norm_fwd_item_fn)(const float *xm, int64_t n, int64_t C, int64_t S, float *ym, float *nm);
typedef void (*qg_norm_bwd_item_fn)(const float *gym, const float *ym, int raw, const float *nm, int64_t n,
                                    int64_t C, int64_t S, float *gxm);

/* Locations [s0, n) of a normalisation-forward item: norm = (float)sqrt(sum of squares), the divisor
 * den = max(norm, eps) (scalar tail of the vector engines, whole item of the portable one). */
static inline void qg_norm_fwd_den(const double *acc, int64_t s0, int64_t n, float *nm, float *den)
{
    for (int64_t s = s0; s < n; ++s) {
        const float nr = (float)sqrt(acc[s]);
        nm[s] = nr;
        den[s] = nr > QG_NORM_EPS ? nr : QG_NORM_EPS;
    }
}

/* Locations of a normalisation-forward item whose norm overflows float32 (nm = +Inf from finite inputs
 * near FLT_MAX): the float32 divisor would be Inf and y all zeros, so y = x / norm is taken in double from
 * the double norm instead, rounded once (every engine and the reference do this after their division
 * pass). The backward through such a location is 0 (its 1 / norm rounds to 0 in qg_norm_bwd_inv). */
static inline void qg_norm_fwd_overflow(const float *xm, const double *acc, const float *nm, int64_t n,
                                        int64_t C, int64_t S, float *ym)
{
    for (int64_t s = 0; s < n; ++s) {
        if (!(isinf(nm[s]) && acc[s] <= DBL_MAX)) continue;
        const double d = sqrt(acc[s]);
        for (int64_t c = 0; c < C; ++c) ym[c * S + s] = (float)((double)xm[c * S + s] / d);
    }
}

/* Divisors of a normalisation-backward item (n locations): fden = the forward's float32 max(norm, eps),
 * to rebuild y = x / fden from a raw table; inv = 1 / norm in double, or 1 / eps where the norm was
 * clamped, with dot = 0 there (y = x / eps does not depend on the norm). The gradient is
 * (g - y * dot) * inv: a multiply by the correctly rounded double reciprocal instead of a double
 * division per element (with the vector engine's 8-lane float divisions, ~25% less time per item on the
 * faces step; the extra double rounding is ~1e-16 relative, far below the float32 result's). Shared so
 * every engine, and the reference, computes alike. */
static inline void qg_norm_bwd_fden(const float *nm, int64_t n, float *fden)
{
    for (int64_t s = 0; s < n; ++s) fden[s] = nm[s] > QG_NORM_EPS ? nm[s] : QG_NORM_EPS;
}

static inline void qg_norm_bwd_inv(const float *nm, int64_t n, double *dot, double *inv)
{
    for (int64_t s = 0; s < n; ++s) {
        if (nm[s] >= QG_NORM_EPS) {
            inv[s] = 1.0 / (double)nm[s];
        } else {
            inv[s] = 1.0 / (double)QG_NORM_EPS;
            dot[s] = 0.0;
        }
    }
}

/* The engines of one ISA level. Contract, the same for every record (so that a driver never asks which
 * record it runs, and every level gives the bits the tests pin):
 *   pairs: the maxima (and argmax) or the fused scores of a validated job (sizes checked, no overflow,
 *          candidates in range, npairs > 0); every pair's values do not depend on the thread count, and the
 *          AVX2 and AVX-512 engines give the same bits (the same float32 FMA chain per element).
 *   bwd:   the backward of a validated job (argmax in range, nrows > 0): every output element the same sum
 *          in the same order in every engine; with job->ytab, every output map it writes also gets the
 *          normalisation backward (qg_norm_bwd_item on the finished map, raw = 1), maps it does not write
 *          are left alone.
 *   norm_fwd_item / norm_bwd_item: the normalisation work items (above), the same bits in every engine. */
typedef int (*qg_pairs_engine)(const qg_pairs_job *job, const qg_ctx *ctx);
typedef int (*qg_bwd_engine)(const qg_bwd_job *job, const qg_ctx *ctx);

typedef struct qg_match_kernels {
    qg_pairs_engine pairs;
    qg_bwd_engine bwd;
    qg_norm_fwd_item_fn norm_fwd_item;
    qg_norm_bwd_item_fn norm_bwd_item;
} qg_match_kernels;

extern const qg_match_kernels qg_match_kernels_portable;
#if QG_X86
extern const qg_match_kernels qg_match_kernels_avx2, qg_match_kernels_avx512;
/* The AVX2 pieces the AVX-512 record reuses (bound by memory traffic and gathers, not by vector width). */
int qg_match_bwd_avx2(const qg_bwd_job *job, const qg_ctx *ctx);
void qg_norm_fwd_item_avx2(const float *xm, int64_t n, int64_t C, int64_t S, float *ym, float *nm);
void qg_norm_bwd_item_avx2(const float *gym, const float *ym, int raw, const float *nm, int64_t n, int64_t C,
                           int64_t S, float *gxm);
#endif

/* Fused score of one pair from its maxima: sum_s w[s] mp[s] + sum_r w[S+r] mg[r] + bias, in double,
 * in index order, rounded once (shared so that every engine gives the same score for the same maxima). */
static inline float qg_pair_score(const float *w, float bias, const float *mp, const float *mg, int64_t S)
{
    double acc = 0.0;
    for (int64_t s = 0; s < S; ++s) acc += (double)w[s] * (double)mp[s];
    for (int64_t r = 0; r < S; ++r) acc += (double)w[S + r] * (double)mg[r];
    return (float)(acc + (double)bias);
}

/* Threads for a job of `macs` multiply-adds split into `units` independent units: at most
 * ctx->n_threads and units, and one thread per ~2^21 multiply-adds (~0.1 ms) so that small calls
 * do not pay for waking an OpenMP team. */
static inline int qg_match_threads(const qg_ctx *ctx, double macs, int64_t units)
{
    int nt = qg_threads_for(ctx, units);
    const double per = 2097152.0;
    if (macs < per * nt) nt = macs < per ? 1 : (int)(macs / per);
    return nt < 1 ? 1 : nt;
}

#endif
