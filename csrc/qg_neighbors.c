/*
 * qg_neighbors.c - blocked, symmetric cosine kNN between the rows of E (contract in qg_neighbors.h).
 *
 * Plan (memory beyond E: O(N) norms + O(N*k) top-k + O(threads * block scratch)):
 *   1. One pass over E: per row, the sum of squares in double (also the NaN/Inf check), the
 *      power-of-two scale that brings the row to norm ~1 (exact, so no overflow/underflow in the
 *      float32 products even for |x| ~ 1e30), and the weight w_i = 2^e_i / max(||x_i||, 1e-12).
 *   2. Rows are cut into blocks of QG_NB_BLOCK rows (independent of the thread count). Every
 *      block pair (I, J), I <= J, is computed exactly once ("match"): for each D-panel of
 *      QG_NB_PANEL columns both blocks are packed (scaled, d-major micro-panels) and a register-
 *      blocked MR x NR outer-product micro-kernel accumulates the panel in float32; panel sums
 *      are added into a double [BI, BJ] accumulator. Each similarity is then
 *      (float)(dot * (w_i * w_j)) and feeds the top-k of row i (candidate j) and of row j
 *      (candidate i): one value, the same bits for both rows.
 *   3. Matches are scheduled as a round-robin tournament (circle method) plus one round of the
 *      diagonal blocks (I, I): within a round every block appears at most once, so the top-k
 *      lists of a round's rows are owned by one thread -- no locks, no atomics.
 *
 * Bit-identical for any thread count: the block partition, the panel split, the per-pair
 * summation order (lane (a, b) of the micro-kernel sums d sequentially, whatever the tile
 * position) and the epilogue do not depend on threads; the top-k keeps the total order
 * (similarity desc, index asc), so the insertion order does not matter either.
 */
#include "qg_neighbors.h"

#include <math.h>
#include <string.h>

#define QG_NB_BLOCK 128 /* rows per block (multiple of MR and NR) */
#define QG_NB_PANEL 256 /* D columns per panel (float32 partial sums over at most this many terms) */
#define QG_NB_MR 4
#define QG_NB_NR 8

/* Kept out of line: inlined into the block loop, gcc runs out of xmm registers and spills an
 * accumulator every iteration (measured ~2x slower). */
#if defined(__GNUC__) || defined(__clang__)
#define QG_NB_NOINLINE __attribute__((noinline))
#else
#define QG_NB_NOINLINE
#endif

/* ------------------------------------------------------------------ top-k lists */

/* Row list: s[0..k) descending, ties by ascending index; sentinel (-inf, INT64_MAX). */
static inline void qg_topk_push(float *s, int64_t *ix, int64_t k, float v, int64_t j)
{
    float ws = s[k - 1];
    if (!(v > ws || (v == ws && j < ix[k - 1]))) return;
    int64_t p = k - 1;
    while (p > 0 && (s[p - 1] < v || (s[p - 1] == v && ix[p - 1] > j))) {
        s[p] = s[p - 1];
        ix[p] = ix[p - 1];
        --p;
    }
    s[p] = v;
    ix[p] = j;
}

/* ------------------------------------------------------------------ packing */

/* Pack rows [r0, r0 + nr) x columns [d0, d0 + dp) of E, scaled, into micro-panels of `w` rows,
 * d-major: out[(t * dp + d) * w + a] = E[r0 + t*w + a, d0 + d] * scale[...]; pad rows are 0.
 * The scales are powers of two: the products are exact (barring underflow of negligible
 * entries) and a row gets the same bits wherever it is packed. */
static void qg_nb_pack(const float *E, int64_t D, int64_t r0, int64_t nr, int64_t d0, int64_t dp,
                       const float *scale, int w, float *out)
{
    static const float zeros[QG_NB_PANEL] = {0};
    const float *src[QG_NB_NR];
    float sc[QG_NB_NR];
    int64_t ntile = (nr + w - 1) / w;
    for (int64_t t = 0; t < ntile; ++t) {
        float *o = out + t * dp * w;
        for (int a = 0; a < w; ++a) {
            int64_t r = t * w + a;
            src[a] = r < nr ? E + (r0 + r) * D + d0 : zeros;
            sc[a] = r < nr ? scale[r0 + r] : 0.0f;
        }
        if (w == QG_NB_NR) {
            for (int64_t d = 0; d < dp; ++d)
                for (int a = 0; a < QG_NB_NR; ++a) o[d * QG_NB_NR + a] = src[a][d] * sc[a];
        } else {
            for (int64_t d = 0; d < dp; ++d)
                for (int a = 0; a < QG_NB_MR; ++a) o[d * QG_NB_MR + a] = src[a][d] * sc[a];
        }
    }
}

/* ------------------------------------------------------------------ micro-kernel */

/* acc[a][b] = sum_d a_pan[d][a] * b_pan[d][b], d sequential (one float32 lane per pair), then
 * added into the double accumulator c (row stride ldc). gcc -O3 unrolls and vectorises over b. */
QG_NB_NOINLINE static void qg_nb_micro(int64_t dp, const float *restrict ap, const float *restrict bp,
                               double *restrict c, int64_t ldc, int ma, int nb)
{
    float acc[QG_NB_MR][QG_NB_NR];
    for (int a = 0; a < QG_NB_MR; ++a)
        for (int b = 0; b < QG_NB_NR; ++b) acc[a][b] = 0.0f;
    for (int64_t d = 0; d < dp; ++d) {
        const float *ad = ap + d * QG_NB_MR;
        const float *bd = bp + d * QG_NB_NR;
        for (int a = 0; a < QG_NB_MR; ++a) {
            float x = ad[a];
            for (int b = 0; b < QG_NB_NR; ++b) acc[a][b] += x * bd[b];
        }
    }
    for (int a = 0; a < ma; ++a)
        for (int b = 0; b < nb; ++b) c[a * ldc + b] += (double)acc[a][b];
}

/* ------------------------------------------------------------------ one block pair */

typedef struct qg_nb_job {
    const float *E;
    int64_t N, D, k;
    const float *scale;  /* [N] power-of-two prescale */
    const double *w;     /* [N] 2^e / max(||x||, 1e-12) */
    float *tops;         /* [N, k] */
    int64_t *topi;       /* [N, k] */
} qg_nb_job;

static void qg_nb_match(const qg_nb_job *job, int64_t bi, int64_t bj, float *packA, float *packB,
                        double *acc)
{
    const int64_t N = job->N, D = job->D, k = job->k;
    const int64_t i0 = bi * QG_NB_BLOCK, j0 = bj * QG_NB_BLOCK;
    const int64_t ni = (N - i0 < QG_NB_BLOCK) ? N - i0 : QG_NB_BLOCK;
    const int64_t nj = (N - j0 < QG_NB_BLOCK) ? N - j0 : QG_NB_BLOCK;
    const int diag = (bi == bj);
    const int64_t ldc = QG_NB_BLOCK;

    for (int64_t i = 0; i < ni; ++i)
        for (int64_t j = 0; j < nj; ++j) acc[i * ldc + j] = 0.0;

    for (int64_t d0 = 0; d0 < D; d0 += QG_NB_PANEL) {
        int64_t dp = (D - d0 < QG_NB_PANEL) ? D - d0 : QG_NB_PANEL;
        qg_nb_pack(job->E, D, i0, ni, d0, dp, job->scale, QG_NB_MR, packA);
        qg_nb_pack(job->E, D, j0, nj, d0, dp, job->scale, QG_NB_NR, packB);
        for (int64_t ta = 0; ta * QG_NB_MR < ni; ++ta) {
            int64_t ia = ta * QG_NB_MR;
            int ma = (int)((ni - ia < QG_NB_MR) ? ni - ia : QG_NB_MR);
            for (int64_t tb = 0; tb * QG_NB_NR < nj; ++tb) {
                int64_t jb = tb * QG_NB_NR;
                /* diagonal block: only pairs j > i are used; skip tiles without any */
                if (diag && jb + QG_NB_NR - 1 <= ia) continue;
                int nbn = (int)((nj - jb < QG_NB_NR) ? nj - jb : QG_NB_NR);
                qg_nb_micro(dp, packA + ta * dp * QG_NB_MR, packB + tb * dp * QG_NB_NR,
                            acc + ia * ldc + jb, ldc, ma, nbn);
            }
        }
    }

    /* epilogue: one similarity per pair, fed to both rows */
    for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        const double wi = job->w[gi];
        float *si = job->tops + gi * k;
        int64_t *xi = job->topi + gi * k;
        for (int64_t j = diag ? i + 1 : 0; j < nj; ++j) {
            const int64_t gj = j0 + j;
            const float s = (float)(acc[i * ldc + j] * (wi * job->w[gj]));
            qg_topk_push(si, xi, k, s, gj);
            qg_topk_push(job->tops + gj * k, job->topi + gj * k, k, s, gi);
        }
    }
}

/* Round-robin tournament over T (even) teams: round r in [0, T-1), match m in [0, T/2). */
static inline void qg_nb_pairing(int64_t T, int64_t r, int64_t m, int64_t *a, int64_t *b)
{
    if (m == 0) {
        *a = T - 1;
        *b = r;
    } else {
        *a = (r + m) % (T - 1);
        *b = (r - m + (T - 1)) % (T - 1);
    }
}

/* ------------------------------------------------------------------ kernel */

int qg_neighbors_topk_f32(const float *E, int64_t N, int64_t D, int64_t k, int64_t *idx, float *sim,
                          const qg_ctx *ctx)
{
    if (!E || !idx || N < 2 || D < 1 || k < 1 || k > N - 1) return QG_EINVAL;
    int64_t nd, nk;
    if (qg_mul_overflow(N, D, &nd) || qg_mul_overflow(N, k, &nk)) return QG_EOVERFLOW;
    if (nk > INT64_MAX / 8 || N > INT64_MAX / 16) return QG_EOVERFLOW;
    (void)nd;

    const int64_t nblk = (N + QG_NB_BLOCK - 1) / QG_NB_BLOCK;
    const int64_t T = nblk + (nblk & 1); /* teams incl. a dummy "bye" block when odd */
    const int nt = qg_threads_for(ctx, nblk); /* the largest round (the diagonal one) has nblk matches */

    const int64_t pack_floats = (int64_t)QG_NB_BLOCK * QG_NB_PANEL;
    const int64_t acc_doubles = (int64_t)QG_NB_BLOCK * QG_NB_BLOCK;
    const int64_t per_thread = 2 * pack_floats * (int64_t)sizeof(float) + acc_doubles * (int64_t)sizeof(double);

    double *w = (double *)qg_malloc(N * (int64_t)(sizeof(double) + sizeof(float)));
    float *tops = sim ? sim : (float *)qg_malloc(nk * (int64_t)sizeof(float));
    char *scratch = (char *)qg_malloc(per_thread * nt);
    int status = QG_OK;
    if (!w || !tops || !scratch) {
        status = QG_ENOMEM;
        goto done;
    }
    float *scale = (float *)(w + N);

    /* 1. norms, scales, finiteness (one row per iteration, owned by one thread) */
    int bad = 0;
    QG_OMP(parallel for schedule(static) num_threads(qg_threads_for(ctx, N)) reduction(|:bad))
    for (int64_t i = 0; i < N; ++i) {
        const float *x = E + i * D;
        double ss = 0.0;
        for (int64_t d = 0; d < D; ++d) ss += (double)x[d] * (double)x[d];
        if (!isfinite(ss)) {
            bad |= 1;
            scale[i] = 1.0f;
            w[i] = 0.0;
            continue;
        }
        double nrm = sqrt(ss);
        int e = 0;
        if (nrm > 0.0) (void)frexp(nrm, &e);
        /* |e| <= 126 keeps 2^-e a normal float; the scaled row then has norm in [0.5, 1), at most
         * 4 sqrt(D) (entries near FLT_MAX), or below 1 for rows under 2^-126 (numerically zero
         * rows, whose similarities are ~0 by the 1e-12 floor anyway): no float32 overflow. */
        e = e < -126 ? -126 : (e > 126 ? 126 : e);
        scale[i] = (float)ldexp(1.0, -e);
        w[i] = ldexp(1.0 / (nrm > 1e-12 ? nrm : 1e-12), e);
    }
    if (bad) {
        status = QG_ENONFINITE;
        goto done;
    }
    if (qg_poll(ctx)) {
        status = QG_EINTR;
        goto done;
    }

    for (int64_t t = 0; t < nk; ++t) {
        tops[t] = -INFINITY;
        idx[t] = INT64_MAX;
    }

    qg_nb_job job = {E, N, D, k, scale, w, tops, idx};
    int stop = 0;
    /* 2./3. tournament rounds (T - 1 of them) then the diagonal round */
    QG_OMP(parallel num_threads(nt))
    {
        char *mine = scratch + (int64_t)qg_thread_num() * per_thread;
        float *packA = (float *)mine;
        float *packB = packA + pack_floats;
        double *acc = (double *)(packB + pack_floats);
        for (int64_t r = 0; r < T; ++r) {
            const int64_t nm = (r < T - 1) ? T / 2 : nblk;
            QG_OMP(for schedule(dynamic, 1))
            for (int64_t m = 0; m < nm; ++m) {
                if (qg_stop_requested(&stop)) continue;
                int64_t a, b;
                if (r < T - 1) {
                    qg_nb_pairing(T, r, m, &a, &b);
                    if (a >= nblk || b >= nblk) continue; /* bye */
                    if (a > b) {
                        int64_t t = a;
                        a = b;
                        b = t;
                    }
                } else {
                    a = b = m;
                }
                qg_nb_match(&job, a, b, packA, packB, acc);
                qg_poll_block(ctx, &stop);
            }
        }
    }
    if (stop) status = QG_EINTR;

done:
    if (tops && tops != sim) qg_free(tops);
    qg_free(scratch);
    qg_free(w);
    return status;
}
