/*
 * qg_match.c - the match family's drivers: location normalisation, the fused QAConv correlation + two-way
 * max (maxima, or fused scores), and its backward through the argmax.
 *
 * Layering: an entry point validates its arguments, builds a job (qg_pairs_job or qg_bwd_job, with
 * designated initialisers) and runs it on the engines of the record qg_match_pick(ctx) returns, one record
 * per ISA level (qg_match_impl.h): qg_match_kernels_portable (qg_match_portable.c),
 * qg_match_kernels_avx2 (qg_match_avx2.c) and qg_match_kernels_avx512 (qg_match_avx512.c, which reuses the
 * AVX2 backward and normalisation items). Every record's engines honour the same contract, so this file
 * never asks which one runs.
 */
#include "qg_match.h"
#include "qg_match_impl.h"

#include <math.h>
#include <string.h>

static int64_t qg_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The engines of ctx->isa: the best record compiled for a level at or below it. */
static const qg_match_kernels *qg_match_pick(const qg_ctx *ctx)
{
#if QG_X86
    if (ctx && ctx->isa >= QG_ISA_AVX512) return &qg_match_kernels_avx512;
    if (ctx && ctx->isa >= QG_ISA_AVX2) return &qg_match_kernels_avx2;
#endif
    (void)ctx;
    return &qg_match_kernels_portable;
}

/* ------------------------------------------------------------------ normalisation */

/* One normalisation call (sizes validated, M > 0): the forward when gy == NULL (x -> y, norms), else the
 * backward (gy, y or the raw table x[rows] it was computed from, norms -> gx). Map m reads x + rows[m] * cs
 * (rows == NULL: m). Work items are n <= QG_NORM_SB locations of one map, run by the record's items. */
typedef struct qg_norm_job {
    const float *x;      /* forward: the maps; backward: y, or (rows) the raw table y is rebuilt from */
    const int64_t *rows; /* NULL: map m is x's map m */
    const float *gy;     /* backward: the gradient of y; NULL: forward */
    const float *nin;    /* backward: the forward's norms [M, S] */
    float *out;          /* forward: y; backward: gx (may be gy) [M, C, S] */
    float *nout;         /* forward: the norms [M, S] */
    int64_t M, C, S;
} qg_norm_job;

static int qg_norm_run(const qg_norm_job *job, const qg_ctx *ctx)
{
    const int64_t C = job->C, S = job->S, cs = C * S;
    const int64_t nsb = (S + QG_NORM_SB - 1) / QG_NORM_SB;
    const int64_t items = job->M * nsb;
    const int nt = qg_threads_for(ctx, items);
    const qg_match_kernels *k = qg_match_pick(ctx);
    int stop = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t it = 0; it < items; ++it) {
        if (qg_stop_requested(&stop)) continue;
        const int64_t m = it / nsb, s0 = (it % nsb) * QG_NORM_SB, n = qg_min64(QG_NORM_SB, S - s0);
        const float *xm = job->x + (job->rows ? job->rows[m] : m) * cs + s0;
        if (job->gy)
            k->norm_bwd_item(job->gy + m * cs + s0, xm, job->rows != NULL, job->nin + m * S + s0, n, C, S,
                             job->out + m * cs + s0);
        else
            k->norm_fwd_item(xm, n, C, S, job->out + m * cs + s0, job->nout + m * S + s0);
        qg_poll_block(ctx, &stop);
    }
    return stop ? QG_EINTR : QG_OK;
}

/* Sizes of a normalisation call; QG_OK with *empty set when there is nothing to do. */
static int qg_norm_check(int64_t M, int64_t C, int64_t S, int *empty)
{
    int64_t cs, total;
    *empty = 0;
    if (M < 0 || C < 1 || S < 1) return QG_EINVAL;
    if (qg_mul_overflow(C, S, &cs) || qg_mul_overflow(cs, M, &total)) return QG_EOVERFLOW;
    *empty = M == 0;
    return QG_OK;
}

/* QG_ERANGE unless every rows[i] is in [0, N). */
static int qg_norm_check_rows(const int64_t *rows, int64_t R, int64_t N, int64_t cs)
{
    int64_t tmp;
    if (!rows || N < 0) return QG_EINVAL;
    if (qg_mul_overflow(N, cs, &tmp)) return QG_EOVERFLOW;
    for (int64_t i = 0; i < R; ++i)
        if (rows[i] < 0 || rows[i] >= N) return QG_ERANGE;
    return QG_OK;
}

int qg_norm_forward_f32(const float *x, int64_t M, int64_t C, int64_t S,
                        float *y, float *norm, const qg_ctx *ctx)
{
    int empty;
    const int st = qg_norm_check(M, C, S, &empty);
    if (st != QG_OK || empty) return st;
    if (!x || !y || !norm) return QG_EINVAL;
    const qg_norm_job job = {.x = x, .out = y, .nout = norm, .M = M, .C = C, .S = S};
    return qg_norm_run(&job, ctx);
}

int qg_norm_forward_rows_f32(const float *E, int64_t N, const int64_t *rows, int64_t R, int64_t C,
                             int64_t S, float *y, float *norm, const qg_ctx *ctx)
{
    int empty;
    int st = qg_norm_check(R, C, S, &empty);
    if (st != QG_OK || empty) return st;
    if (!E || !y || !norm) return QG_EINVAL;
    if ((st = qg_norm_check_rows(rows, R, N, C * S)) != QG_OK) return st;
    const qg_norm_job job = {.x = E, .rows = rows, .out = y, .nout = norm, .M = R, .C = C, .S = S};
    return qg_norm_run(&job, ctx);
}

int qg_norm_backward_f32(const float *gy, const float *y, const float *norm,
                         int64_t M, int64_t C, int64_t S, float *gx, const qg_ctx *ctx)
{
    int empty;
    const int st = qg_norm_check(M, C, S, &empty);
    if (st != QG_OK || empty) return st;
    if (!gy || !y || !norm || !gx) return QG_EINVAL;
    const qg_norm_job job = {.x = y, .gy = gy, .nin = norm, .out = gx, .M = M, .C = C, .S = S};
    return qg_norm_run(&job, ctx);
}

int qg_norm_backward_rows_f32(const float *gy, const float *E, int64_t N, const int64_t *rows,
                              const float *norm, int64_t R, int64_t C, int64_t S, float *gx,
                              const qg_ctx *ctx)
{
    int empty;
    int st = qg_norm_check(R, C, S, &empty);
    if (st != QG_OK || empty) return st;
    if (!gy || !E || !norm || !gx) return QG_EINVAL;
    if ((st = qg_norm_check_rows(rows, R, N, C * S)) != QG_OK) return st;
    const qg_norm_job job = {.x = E, .rows = rows, .gy = gy, .nin = norm, .out = gx, .M = R, .C = C, .S = S};
    return qg_norm_run(&job, ctx);
}

/* ------------------------------------------------------------------ forward */

/* Validate a job, then run it on the engine of ctx->isa. */
static int qg_run_pairs(const qg_pairs_job *job, const qg_ctx *ctx)
{
    const int64_t C = job->C, S = job->S, K = job->K;
    int64_t cs, npairs, tmp;
    if (job->nA < 0 || job->nB < 0 || K < 0 || C < 1 || S < 1) return QG_EINVAL;
    if (S > QG_MAX_LOCATIONS) return QG_EINVAL;
    if (qg_mul_overflow(C, S, &cs) || qg_mul_overflow(job->nA, K, &npairs) ||
        qg_mul_overflow(npairs, S, &tmp) || qg_mul_overflow(cs, job->nA, &tmp) ||
        qg_mul_overflow(cs, job->nB, &tmp) || qg_mul_overflow(npairs, 2 * S, &tmp))
        return QG_EOVERFLOW;
    if (npairs == 0) return QG_OK;
    if (!job->A || !job->B) return QG_EINVAL;
    if (job->w ? !job->out : (!job->mp || !job->mg)) return QG_EINVAL;
    if ((job->ap == NULL) != (job->ag == NULL)) return QG_EINVAL;
    if (job->cand) {
        for (int64_t q = 0; q < npairs; ++q)
            if (job->cand[q] < 0 || job->cand[q] >= job->nB) return QG_ERANGE;
    } else if (job->nB != K) {
        return QG_EINVAL;
    }
    return qg_match_pick(ctx)->pairs(job, ctx);
}

int qg_match_maxima_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                        int64_t C, int64_t S, float *mp, float *mg,
                        uint16_t *ap, uint16_t *ag, const qg_ctx *ctx)
{
    const qg_pairs_job job = {.A = P, .nA = nP, .B = G, .nB = nG, .K = nG, .C = C, .S = S,
                              .mp = mp, .mg = mg, .ap = ap, .ag = ag};
    return qg_run_pairs(&job, ctx);
}

int qg_match_maxima_restricted_f32(const float *X, int64_t B, const float *E, int64_t N,
                                   const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                   float *mp, float *mg, uint16_t *ap, uint16_t *ag,
                                   const qg_ctx *ctx)
{
    if (B > 0 && K > 0 && !cand) return QG_EINVAL;
    const qg_pairs_job job = {.A = X, .nA = B, .B = E, .nB = N, .cand = cand, .K = K, .C = C, .S = S,
                              .mp = mp, .mg = mg, .ap = ap, .ag = ag};
    return qg_run_pairs(&job, ctx);
}

int qg_match_scores_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                        int64_t C, int64_t S, const float *w, float bias,
                        float *out, const qg_ctx *ctx)
{
    if (!w) return QG_EINVAL;
    const qg_pairs_job job = {.A = P, .nA = nP, .B = G, .nB = nG, .K = nG, .C = C, .S = S,
                              .w = w, .bias = bias, .out = out};
    return qg_run_pairs(&job, ctx);
}

/* ------------------------------------------------------------------ backward */

static int qg_check_argmax(const uint16_t *a, int64_t n, int64_t S)
{
    for (int64_t i = 0; i < n; ++i)
        if ((int64_t)a[i] >= S) return 0;
    return 1;
}

/* The backward engine of ctx->isa (with job->ytab it also applies the rows' normalisation backward). */
static int qg_run_bwd(const qg_bwd_job *job, const qg_ctx *ctx)
{
    if (job->nrows == 0) return QG_OK;
    return qg_match_pick(ctx)->bwd(job, ctx);
}

static int qg_bwd_check(int64_t nA, int64_t nB, int64_t K, int64_t C, int64_t S, int64_t *npairs)
{
    int64_t cs, tmp;
    if (nA < 0 || nB < 0 || K < 0 || C < 1 || S < 1 || S > QG_MAX_LOCATIONS) return QG_EINVAL;
    if (qg_mul_overflow(C, S, &cs) || qg_mul_overflow(nA, K, npairs) || qg_mul_overflow(*npairs, S, &tmp) ||
        qg_mul_overflow(cs, nA, &tmp) || qg_mul_overflow(cs, nB, &tmp))
        return QG_EOVERFLOW;
    return QG_OK;
}

int qg_match_backward_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                          int64_t C, int64_t S, const float *gmp, const float *gmg,
                          const uint16_t *ap, const uint16_t *ag,
                          float *gP, float *gG, const qg_ctx *ctx)
{
    int64_t npairs;
    int st = qg_bwd_check(nP, nG, nG, C, S, &npairs);
    if (st != QG_OK) return st;
    if (npairs == 0) { /* no pairs: gradients are zero */
        if (nP > 0 && gP) memset(gP, 0, (size_t)(nP * C * S) * sizeof(float));
        if (nG > 0 && gG) memset(gG, 0, (size_t)(nG * C * S) * sizeof(float));
        return QG_OK;
    }
    if (!P || !G || !gmp || !gmg || !ap || !ag || !gP || !gG) return QG_EINVAL;
    if (!qg_check_argmax(ap, npairs * S, S) || !qg_check_argmax(ag, npairs * S, S)) return QG_ERANGE;
    /* side 0: probe p sums its pairs with every gallery map g in g order; side 1: gallery map g its pairs
     * with every probe in p order */
    const qg_bwd_job jp = {.nrows = nP, .K = nG, .nA = nP, .far = G, .nfar = nG, .side = 0, .C = C, .S = S,
                           .gmp = gmp, .gmg = gmg, .ap = ap, .ag = ag, .out = gP};
    st = qg_run_bwd(&jp, ctx);
    if (st != QG_OK) return st;
    const qg_bwd_job jg = {.nrows = nG, .K = nG, .nA = nP, .far = P, .nfar = nP, .side = 1, .C = C, .S = S,
                           .gmp = gmp, .gmg = gmg, .ap = ap, .ag = ag, .out = gG};
    return qg_run_bwd(&jg, ctx);
}

/* The restricted backward; with ytab the class side's output rows get the normalisation backward of
 * qg_norm_backward_rows_f32 (ytab [.., C, S] raw table, yrow [N] its rows, ynorm [N, S]) applied. */
static int qg_bwd_restricted(const float *X, int64_t B, const float *E, int64_t N, const int64_t *cand, int64_t K,
                             int64_t C, int64_t S, const float *gmp, const float *gmg, const uint16_t *ap,
                             const uint16_t *ag, float *gX, float *gE, const float *ytab, const int64_t *yrow,
                             const float *ynorm, const qg_ctx *ctx)
{
    int64_t npairs;
    int st = qg_bwd_check(B, N, K, C, S, &npairs);
    if (st != QG_OK) return st;
    const int64_t cs = C * S;
    if (!gX && !gE) return QG_EINVAL;
    if (npairs == 0) {
        if (B > 0 && gX) memset(gX, 0, (size_t)(B * cs) * sizeof(float));
        if (N > 0 && gE) memset(gE, 0, (size_t)(N * cs) * sizeof(float));
        return QG_OK;
    }
    if (!X || (gX && !E) || !cand || !gmp || !gmg || !ap || !ag) return QG_EINVAL;
    for (int64_t q = 0; q < npairs; ++q)
        if (cand[q] < 0 || cand[q] >= N) return QG_ERANGE;
    if (!qg_check_argmax(ap, npairs * S, S) || !qg_check_argmax(ag, npairs * S, S)) return QG_ERANGE;

    if (gX) { /* gX: row b sums its pairs j = 0..K-1 in order. */
        const qg_bwd_job jx = {.nrows = B, .K = K, .nA = B, .cand = cand, .far = E, .nfar = N, .side = 0,
                               .C = C, .S = S, .gmp = gmp, .gmg = gmg, .ap = ap, .ag = ag, .out = gX};
        st = qg_run_bwd(&jx, ctx);
        if (st != QG_OK || !gE) return st;
    }

    /* gE: CSR of pairs per E row (counting sort keeps (b, j) order), only rows that occur. */
    int64_t *off = (int64_t *)qg_malloc((N + 1) * (int64_t)sizeof(int64_t));
    int64_t *list = (int64_t *)qg_malloc(npairs * (int64_t)sizeof(int64_t));
    int64_t *rows = (int64_t *)qg_malloc(npairs * (int64_t)sizeof(int64_t));
    int64_t *roff = (int64_t *)qg_malloc((npairs + 1) * (int64_t)sizeof(int64_t));
    if (!off || !list || !rows || !roff) {
        st = QG_ENOMEM;
        goto done;
    }
    memset(off, 0, (size_t)(N + 1) * sizeof(int64_t));
    for (int64_t q = 0; q < npairs; ++q) off[cand[q] + 1] += 1;
    int64_t nrows = 0;
    for (int64_t n = 0; n < N; ++n) {
        if (off[n + 1] > 0) {
            rows[nrows] = n;
            roff[nrows] = off[n]; /* prefix sum so far = start of row n */
            ++nrows;
        }
        off[n + 1] += off[n];
    }
    roff[nrows] = npairs;
    {
        /* fill: off[n] becomes the next free slot of row n */
        for (int64_t q = 0; q < npairs; ++q) list[off[cand[q]]++] = q;
    }
    /* rows that are no candidate: zero (parallel over rows, each row owned by one thread) */
    {
        const int nt = qg_threads_for(ctx, N);
        QG_OMP(parallel for schedule(static) num_threads(nt))
        for (int64_t n = 0; n < N; ++n) {
            const int64_t end = off[n];              /* after the fill: end of row n */
            const int64_t start = n > 0 ? off[n - 1] : 0;
            if (end == start) memset(gE + n * cs, 0, (size_t)cs * sizeof(float));
        }
    }
    if (qg_poll(ctx)) {
        st = QG_EINTR;
        goto done;
    }
    {
        const qg_bwd_job je = {.nrows = nrows, .off = roff, .list = list, .rowid = rows, .K = K, .nA = B,
                               .far = X, .nfar = B, .side = 1, .C = C, .S = S, .gmp = gmp, .gmg = gmg,
                               .ap = ap, .ag = ag, .out = gE, .ytab = ytab, .yrow = yrow, .ynorm = ynorm};
        st = qg_run_bwd(&je, ctx);
    }
done:
    qg_free(off);
    qg_free(list);
    qg_free(rows);
    qg_free(roff);
    return st;
}

int qg_match_backward_restricted_f32(const float *X, int64_t B, const float *E, int64_t N,
                                     const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                     const float *gmp, const float *gmg,
                                     const uint16_t *ap, const uint16_t *ag,
                                     float *gX, float *gE, const qg_ctx *ctx)
{
    return qg_bwd_restricted(X, B, E, N, cand, K, C, S, gmp, gmg, ap, ag, gX, gE, NULL, NULL, NULL, ctx);
}

int qg_match_backward_restricted_rows_f32(const float *X, int64_t B, const float *E, int64_t NE,
                                          const int64_t *rows, const float *norm, int64_t R,
                                          const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                          const float *gmp, const float *gmg,
                                          const uint16_t *ap, const uint16_t *ag,
                                          float *gE, const qg_ctx *ctx)
{
    int empty;
    int st = qg_norm_check(R, C, S, &empty);
    if (st != QG_OK) return st;
    if (!empty) {
        if (!gE || !norm || !E) return QG_EINVAL;
        if ((st = qg_norm_check_rows(rows, R, NE, C * S)) != QG_OK) return st;
    }
    return qg_bwd_restricted(X, B, NULL, R, cand, K, C, S, gmp, gmg, ap, ag, NULL, gE, E, rows, norm, ctx);
}
