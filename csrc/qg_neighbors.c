/*
 * qg_neighbors.c - blocked, symmetric cosine kNN between the rows of E (contract in qg_neighbors.h):
 * the driver, the portable block-pair kernel, and the choice of the ISA variant.
 *
 * Plan (memory beyond E: O(N) norms + O(N*k) top-k + O(threads * block scratch) + one byte per
 * block pair for the schedule):
 *   1. One pass over E: per row, the sum of squares in double (also the NaN/Inf check), the
 *      power-of-two scale that brings the row to norm ~1 (exact, so no overflow/underflow in the
 *      float32 products even for |x| ~ 1e30), and the weight w_i = 2^e_i / max(||x_i||, 1e-12).
 *   2. Rows are cut into blocks of variant->block rows (128 portable, 192 AVX2; independent of
 *      the thread count). Every block pair (I, J), I <= J, is computed exactly once ("match") by
 *      the variant's kernel: per D-panel of QG_NB_PANEL columns, packed panels and a register-
 *      blocked micro-kernel accumulate the panel in float32, panel sums are added into a double
 *      [BI, BJ] accumulator; each similarity is then (float)(dot * (w_i * w_j)) and feeds the
 *      top-k of row i (candidate j) and of row j (candidate i): one value, the same bits for both.
 *   3. Scheduling: a list scheduler over a fixed list of matches (round-robin tournament order,
 *      then the diagonal blocks). A thread claims, in a critical section, the first unclaimed
 *      match whose two blocks no running match holds, so a row's top-k list has one writer at a
 *      time -- no locks on the lists, no atomics, no barrier per round (threads never idle while
 *      another finishes a round; only the last matches can wait). Small problems run on fewer
 *      threads (QG_NB_MIN_WORK_PER_THREAD) so they do not pay the OpenMP wake-up.
 *
 * Bit-identical for any thread count: the block partition, the panel split, the per-pair
 * summation order (lane (a, b) of the micro-kernel sums d sequentially, whatever the tile
 * position) and the epilogue do not depend on threads; the top-k keeps the total order
 * (similarity desc, index asc), so the insertion order (which does vary) does not matter.
 * Different ISA variants may differ in the last bits (FMA vs separate multiply and add).
 */
#include "qg_neighbors_impl.h"

#include <math.h>
#include <string.h>

#define QG_NB_BLOCK 128 /* rows per block of the portable variant (multiple of MR and NR) */
#define QG_NB_MR 4
#define QG_NB_NR 8

/* Kept out of line: inlined into the block loop, gcc runs out of xmm registers and spills an
 * accumulator every iteration (measured ~2x slower). */
#if defined(__GNUC__) || defined(__clang__)
#define QG_NB_NOINLINE __attribute__((noinline))
#else
#define QG_NB_NOINLINE
#endif

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

typedef struct qg_nb_scratch {
    float packA[QG_NB_BLOCK * QG_NB_PANEL];
    float packB[QG_NB_BLOCK * QG_NB_PANEL];
    double acc[QG_NB_BLOCK * QG_NB_BLOCK];
} qg_nb_scratch;

static void qg_nb_match(const qg_nb_job *job, int64_t bi, int64_t bj, void *scratch)
{
    qg_nb_scratch *sc = (qg_nb_scratch *)scratch;
    float *packA = sc->packA, *packB = sc->packB;
    double *acc = sc->acc;
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
            qg_nb_push(si, xi, job->kth + gi, k, s, gj);
            qg_nb_push(job->tops + gj * k, job->topi + gj * k, job->kth + gj, k, s, gi);
        }
    }
}

static const qg_nb_variant qg_nb_variant_portable = {QG_NB_BLOCK, (int64_t)sizeof(qg_nb_scratch), qg_nb_match};

static const qg_nb_variant *qg_nb_pick(const qg_ctx *ctx)
{
#if QG_X86
    if (ctx && ctx->isa >= QG_ISA_AVX2) return &qg_nb_variant_avx2;
#endif
    (void)ctx;
    return &qg_nb_variant_portable;
}

/* ------------------------------------------------------------------ peak probe */

double qg_neighbors_fma_probe(int64_t iters, const qg_ctx *ctx, float *sink)
{
    if (iters < 0) iters = 0;
#if QG_X86
    if (ctx && ctx->isa >= QG_ISA_AVX2) return qg_nb_fma_probe_avx2(iters, sink);
#endif
    (void)ctx;
    float a[12][8];
    for (int c = 0; c < 12; ++c)
        for (int l = 0; l < 8; ++l) a[c][l] = 1e-3f;
    for (int64_t it = 0; it < iters; ++it)
        for (int c = 0; c < 12; ++c)
            for (int l = 0; l < 8; ++l) a[c][l] = a[c][l] * 0.999f + 1e-3f;
    float t = 0.0f;
    for (int c = 0; c < 12; ++c)
        for (int l = 0; l < 8; ++l) t += a[c][l];
    if (sink) *sink = t;
    return (double)iters * 12.0 * 8.0 * 2.0;
}

/* ------------------------------------------------------------------ schedule */

/* Match m of the fixed list: the round-robin tournament over T (even) blocks (circle method,
 * T - 1 rounds of T/2 matches, a block past nblk is a "bye"), then the nblk diagonal matches.
 * Consecutive matches of a round share no block, which keeps the scheduler's scan short; the
 * cheap diagonal matches last even out the threads' finishing times. Returns 0 for a bye. */
static int qg_nb_match_at(int64_t nblk, int64_t T, int64_t m, int64_t *a, int64_t *b)
{
    const int64_t per = T / 2, nrr = (T - 1) * per;
    if (m >= nrr) {
        *a = *b = m - nrr;
        return 1;
    }
    const int64_t r = m / per, q = m % per;
    int64_t x, y;
    if (q == 0) {
        x = T - 1;
        y = r;
    } else {
        x = (r + q) % (T - 1);
        y = (r - q + (T - 1)) % (T - 1);
    }
    if (x >= nblk || y >= nblk) return 0;
    *a = x < y ? x : y;
    *b = x < y ? y : x;
    return 1;
}

/* Minimum multiply-adds per thread before a second thread is worth waking. */
#define QG_NB_MIN_WORK_PER_THREAD ((int64_t)1 << 23)

/* ------------------------------------------------------------------ kernel */

int qg_neighbors_topk_f32(const float *E, int64_t N, int64_t D, int64_t k, int64_t *idx, float *sim,
                          const qg_ctx *ctx)
{
    if (!E || !idx || N < 2 || D < 1 || k < 1 || k > N - 1) return QG_EINVAL;
    int64_t nd, nk;
    if (qg_mul_overflow(N, D, &nd) || qg_mul_overflow(N, k, &nk)) return QG_EOVERFLOW;
    if (nk > INT64_MAX / 8 || N > INT64_MAX / 16) return QG_EOVERFLOW;

    const qg_nb_variant *var = qg_nb_pick(ctx);
    const int64_t B = var->block;
    const int64_t nblk = (N + B - 1) / B;
    const int64_t T = nblk + (nblk & 1); /* teams incl. a dummy "bye" block when odd */
    const int64_t nmatch = (T - 1) * (T / 2) + nblk;
    /* work in multiply-adds (N^2 D / 2, saturating); small problems stay on one thread */
    const double macs = 0.5 * (double)N * (double)N * (double)D;
    const double cap = macs / (double)QG_NB_MIN_WORK_PER_THREAD;
    int nt = qg_threads_for(ctx, nblk * (nblk + 1) / 2);
    if ((double)nt > cap) nt = cap < 1.0 ? 1 : (int)cap;
    const int64_t per_thread = (var->scratch_bytes + 63) / 64 * 64;

    /* w [N] double, kth [N] float, scale [N] float; then the schedule's flags */
    char *small = (char *)qg_malloc(N * (int64_t)(sizeof(double) + 2 * sizeof(float)) + nmatch + nblk);
    float *tops = sim ? sim : (float *)qg_malloc(nk * (int64_t)sizeof(float));
    char *scratch = (char *)qg_malloc(per_thread * nt);
    int status = QG_OK;
    if (!small || !tops || !scratch) {
        status = QG_ENOMEM;
        goto done;
    }
    double *w = (double *)small;
    float *kth = (float *)(w + N);
    float *scale = kth + N;
    unsigned char *claimed = (unsigned char *)(scale + N);
    unsigned char *busy = claimed + nmatch;

    /* 1. norms, scales, finiteness (one row per iteration, owned by one thread) */
    int bad = 0;
    QG_OMP(parallel for schedule(static) num_threads(qg_threads_for(ctx, nd >> 16)) reduction(|:bad))
    for (int64_t i = 0; i < N; ++i) {
        const float *x = E + i * D;
        /* 8 interleaved double partial sums (lane = d mod 8, vectorisable without reassociation),
         * combined in a fixed tree: deterministic, and ~4x faster than one dependent chain */
        double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            for (int l = 0; l < 8; ++l) part[l] += (double)x[d + l] * (double)x[d + l];
        for (; d < D; ++d) part[0] += (double)x[d] * (double)x[d];
        const double ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
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
    for (int64_t i = 0; i < N; ++i) kth[i] = -INFINITY;
    memset(claimed, 0, (size_t)(nmatch + nblk));

    qg_nb_job job = {E, N, D, k, scale, w, tops, idx, kth};
    int stop = 0;
    int64_t first = 0; /* every match before it is claimed */
    /* 2./3. a list scheduler over the fixed match list: a thread claims the first unclaimed match
     * whose two blocks no running match holds, so each row's top-k list has one writer at a time
     * (the critical section orders one match's writes before the next claimant's reads). Which
     * thread runs which match varies; the result does not: every pair's value is computed once by
     * the same code, and a top-k list under a total order does not depend on the push order. */
    QG_OMP(parallel num_threads(nt))
    {
        void *mine = scratch + (int64_t)qg_thread_num() * per_thread;
        int64_t a = -1, b = -1;
        for (;;) {
            int64_t got = -1;
            int finished = 0;
            const int stopping = qg_stop_requested(&stop);
            QG_OMP(critical(qg_nb_sched))
            {
                if (a >= 0) busy[a] = busy[b] = 0;
                a = b = -1;
                while (first < nmatch && claimed[first]) ++first;
                if (first == nmatch || stopping) {
                    finished = 1;
                } else {
                    for (int64_t m = first; m < nmatch; ++m) {
                        if (claimed[m]) continue;
                        int64_t x, y;
                        if (!qg_nb_match_at(nblk, T, m, &x, &y)) {
                            claimed[m] = 1; /* bye */
                            continue;
                        }
                        if (busy[x] || busy[y]) continue;
                        claimed[m] = 1;
                        busy[x] = busy[y] = 1;
                        a = x;
                        b = y;
                        got = m;
                        break;
                    }
                }
            }
            if (finished) break;
            if (got < 0) continue; /* the remaining matches wait for a running one */
            var->match(&job, a, b, mine);
            qg_poll_block(ctx, &stop);
        }
    }
    if (stop) status = QG_EINTR;

done:
    if (tops && tops != sim) qg_free(tops);
    qg_free(scratch);
    qg_free(small);
    return status;
}
