/*
 * qg_neighbors.c - blocked, symmetric cosine kNN between the rows of E (contract in qg_neighbors.h):
 * the driver, the portable block-pair kernel, and the choice of the ISA variant.
 *
 * Plan (memory beyond E: O(N) norms + O(N*k) top-k + O(threads * block scratch) + one byte per
 * block pair for the schedule):
 *   1. One pass over E: per row, the sum of squares in double (also the NaN/Inf check), the
 *      power-of-two scale that brings the row to norm ~1 (exact, so no overflow/underflow in the
 *      float32 products even for |x| ~ 1e30), and the weight w_i = 2^e_i / max(||x_i||, 1e-12).
 *   2. Rows are cut into blocks of variant->block rows (128 portable, 288 AVX2 / AVX-512; 192 when a
 *      table has fewer than 4 blocks per thread: see qg_nb_variant; no pair's value depends on
 *      it). Every block pair (I, J), I <= J, is computed exactly once ("match") by the variant's
 *      kernel: per D-panel of QG_NB_PANEL columns, packed panels and a register-
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
 *
 * The cross kernel (qg_neighbors_cross_topk_f32, two disjoint tables A and B, for the sharded
 * neighbour ring) is the same three steps on a two-sided job: step 1 on each table, step 2 over
 * every (block of A, block of B) pair with the same variant kernels, step 3 with a Latin-square
 * match order (a match holds one block of each side). A similarity depends only on its two rows
 * (their scales and weights, the panel sums in d order; products, FMAs and w_i * w_j are
 * commutative, so a row's side does not matter): the cross kernel gives a pair the bits the
 * symmetric kernel gives it on the concatenated table.
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
    const qg_nb_side *A = &job->a, *B = &job->b;
    const int64_t D = job->D;
    const int64_t blk = job->block; /* <= QG_NB_BLOCK */
    const int64_t i0 = bi * blk, j0 = bj * blk;
    const int64_t ni = (A->n - i0 < blk) ? A->n - i0 : blk;
    const int64_t nj = (B->n - j0 < blk) ? B->n - j0 : blk;
    const int diag = job->sym && (bi == bj);
    const int64_t ldc = QG_NB_BLOCK;

    for (int64_t i = 0; i < ni; ++i)
        for (int64_t j = 0; j < nj; ++j) acc[i * ldc + j] = 0.0;

    for (int64_t d0 = 0; d0 < D; d0 += QG_NB_PANEL) {
        int64_t dp = (D - d0 < QG_NB_PANEL) ? D - d0 : QG_NB_PANEL;
        qg_nb_pack(A->E, D, i0, ni, d0, dp, A->scale, QG_NB_MR, packA);
        qg_nb_pack(B->E, D, j0, nj, d0, dp, B->scale, QG_NB_NR, packB);
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

    /* epilogue: one similarity per pair, fed to both rows (w_i * w_j is commutative, so the
     * value does not depend on which side a row is on) */
    for (int64_t i = 0; i < ni; ++i) {
        const int64_t li = i0 + i;
        const double wi = A->w[li];
        float *si = A->tops + li * A->k;
        int64_t *xi = A->topi + li * A->k;
        for (int64_t j = diag ? i + 1 : 0; j < nj; ++j) {
            const int64_t lj = j0 + j;
            const float s = (float)(acc[i * ldc + j] * (wi * B->w[lj]));
            qg_nb_push(si, xi, A->kth + li, A->k, s, B->id0 + lj);
            qg_nb_push(B->tops + lj * B->k, B->topi + lj * B->k, B->kth + lj, B->k, s, A->id0 + li);
        }
    }
}

static const qg_nb_variant qg_nb_variant_portable = {QG_NB_BLOCK, QG_NB_BLOCK, (int64_t)sizeof(qg_nb_scratch),
                                                     qg_nb_match};

static const qg_nb_variant *qg_nb_pick(const qg_ctx *ctx)
{
#if QG_X86
    if (ctx && ctx->isa >= QG_ISA_AVX512) return &qg_nb_variant_avx512;
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
    if (ctx && ctx->isa >= QG_ISA_AVX512) return qg_nb_fma_probe_avx512(iters, sink);
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

/* The fixed match list of a job.
 *   sym: the round-robin tournament over T (even) blocks (circle method, T - 1 rounds of T/2
 *        matches, a block past nblk is a "bye"), then the nblk diagonal matches;
 *   cross: with ns blocks on the shorter side and nl on the longer, nl rounds of ns matches: in
 *        round r block q of the shorter side meets block (q + r) mod nl of the longer (no byes).
 * Consecutive matches of a round share no block, which keeps the scheduler's scan short; the
 * cheap diagonal matches last even out the threads' finishing times. */
typedef struct qg_nb_plan {
    int sym;
    int64_t nba, nbb; /* blocks of sides a and b (equal when sym) */
    int64_t T;        /* sym: teams, nba rounded up to even */
    int64_t nmatch;   /* entries of the list, byes included */
    int64_t nreal;    /* real matches */
    int64_t nbusy;    /* busy flags: one per block of a, then (cross) one per block of b */
} qg_nb_plan;

static void qg_nb_plan_init(qg_nb_plan *p, int sym, int64_t nba, int64_t nbb)
{
    p->sym = sym;
    p->nba = nba;
    p->nbb = nbb;
    if (sym) {
        p->T = nba + (nba & 1); /* a dummy "bye" block when odd */
        p->nmatch = (p->T - 1) * (p->T / 2) + nba;
        p->nreal = nba * (nba + 1) / 2;
        p->nbusy = nba;
    } else {
        p->T = 0;
        p->nmatch = p->nreal = nba * nbb;
        p->nbusy = nba + nbb;
    }
}

/* Match m of the list: block *a of side a, block *b of side b, and the busy flags they take
 * (*fa, *fb). Returns 0 for a bye. */
static int qg_nb_plan_at(const qg_nb_plan *p, int64_t m, int64_t *a, int64_t *b, int64_t *fa, int64_t *fb)
{
    if (!p->sym) {
        const int64_t ns = p->nba < p->nbb ? p->nba : p->nbb, nl = p->nba < p->nbb ? p->nbb : p->nba;
        const int64_t r = m / ns, q = m % ns, o = (q + r) % nl;
        *a = p->nba <= p->nbb ? q : o;
        *b = p->nba <= p->nbb ? o : q;
        *fa = *a;
        *fb = p->nba + *b;
        return 1;
    }
    const int64_t T = p->T, per = T / 2, nrr = (T - 1) * per;
    if (m >= nrr) {
        *a = *b = *fa = *fb = m - nrr;
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
    if (x >= p->nba || y >= p->nba) return 0;
    *a = *fa = x < y ? x : y;
    *b = *fb = x < y ? y : x;
    return 1;
}

/* Minimum multiply-adds per thread before a second thread is worth waking. */
#define QG_NB_MIN_WORK_PER_THREAD ((int64_t)1 << 23)

/* Steps 2./3. on a prepared job (weights computed, lists initialised to the sentinel): every
 * match of the plan once, by a list scheduler. `macs` is the job's multiply-add count (it caps
 * the threads of small problems). Returns QG_OK, QG_ENOMEM or QG_EINTR. */
static int qg_nb_run(const qg_nb_job *job_in, const qg_nb_variant *var, double macs, const qg_ctx *ctx)
{
    qg_nb_job jb = *job_in;
    const qg_nb_job *job = &jb;
    const int64_t rows = (jb.sym || jb.a.n < jb.b.n) ? jb.a.n : jb.b.n; /* the side that bounds concurrency */
    const int64_t want = (ctx && ctx->n_threads > 0) ? ctx->n_threads : 1;
    jb.block = (rows + var->block - 1) / var->block < 4 * want ? var->block_small : var->block;
    const int64_t B = jb.block;
    qg_nb_plan plan;
    qg_nb_plan_init(&plan, job->sym, (job->a.n + B - 1) / B, (job->b.n + B - 1) / B);
    const double cap = macs / (double)QG_NB_MIN_WORK_PER_THREAD;
    int nt = qg_threads_for(ctx, plan.nreal);
    if ((double)nt > cap) nt = cap < 1.0 ? 1 : (int)cap;
    /* a cross match holds a block of each side: no more than the shorter side's blocks run at once */
    const int64_t conc = plan.nba < plan.nbb ? plan.nba : plan.nbb;
    if (!plan.sym && nt > conc) nt = (int)conc;
    const int64_t per_thread = (var->scratch_bytes + 63) / 64 * 64;

    unsigned char *claimed = (unsigned char *)qg_calloc(plan.nmatch + plan.nbusy);
    char *scratch = (char *)qg_malloc(per_thread * nt);
    int status = QG_OK;
    if (!claimed || !scratch) {
        status = QG_ENOMEM;
        goto done;
    }
    unsigned char *busy = claimed + plan.nmatch;

    int stop = 0;
    int64_t first = 0; /* every match before it is claimed */
    /* A thread claims the first unclaimed match whose two blocks no running match holds, so each
     * row's top-k list has one writer at a time (the critical section orders one match's writes
     * before the next claimant's reads). Which thread runs which match varies; the result does not:
     * every pair's value is computed once by the same code, and a top-k list under a total order
     * does not depend on the push order. */
    QG_OMP(parallel num_threads(nt))
    {
        void *mine = scratch + (int64_t)qg_thread_num() * per_thread;
        int64_t a = -1, b = -1, fa = -1, fb = -1;
        for (;;) {
            int64_t got = -1;
            int finished = 0;
            const int stopping = qg_stop_requested(&stop);
            QG_OMP(critical(qg_nb_sched))
            {
                if (fa >= 0) busy[fa] = busy[fb] = 0;
                a = b = fa = fb = -1;
                while (first < plan.nmatch && claimed[first]) ++first;
                if (first == plan.nmatch || stopping) {
                    finished = 1;
                } else {
                    for (int64_t m = first; m < plan.nmatch; ++m) {
                        if (claimed[m]) continue;
                        int64_t x, y, gx, gy;
                        if (!qg_nb_plan_at(&plan, m, &x, &y, &gx, &gy)) {
                            claimed[m] = 1; /* bye */
                            continue;
                        }
                        if (busy[gx] || busy[gy]) continue;
                        claimed[m] = 1;
                        busy[gx] = busy[gy] = 1;
                        a = x;
                        b = y;
                        fa = gx;
                        fb = gy;
                        got = m;
                        break;
                    }
                }
            }
            if (finished) break;
            if (got < 0) continue; /* the remaining matches wait for a running one */
            var->match(job, a, b, mine);
            qg_poll_block(ctx, &stop);
        }
    }
    if (stop) status = QG_EINTR;

done:
    qg_free(scratch);
    qg_free(claimed);
    return status;
}

/* Step 1 for the n rows of E: per row the power-of-two prescale and the weight (one row per
 * iteration, owned by one thread; a row's values depend on that row only, so the symmetric and
 * the cross kernel give a row the same bits). Returns nonzero if a row holds NaN/Inf. */
static int qg_nb_norms(const float *E, int64_t n, int64_t D, float *scale, double *w, const qg_ctx *ctx)
{
    int bad = 0;
    QG_OMP(parallel for schedule(static) num_threads(qg_threads_for(ctx, (n * D) >> 16)) reduction(|:bad))
    for (int64_t i = 0; i < n; ++i) {
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
    return bad;
}

/* Every list empty: the sentinel (-inf, INT64_MAX) loses to any candidate. */
static void qg_nb_lists_init(float *tops, int64_t *topi, float *kth, int64_t n, int64_t k)
{
    for (int64_t t = 0; t < n * k; ++t) {
        tops[t] = -INFINITY;
        topi[t] = INT64_MAX;
    }
    for (int64_t i = 0; i < n; ++i) kth[i] = -INFINITY;
}

/* ------------------------------------------------------------------ kernels */

int qg_neighbors_topk_f32(const float *E, int64_t N, int64_t D, int64_t k, int64_t *idx, float *sim,
                          const qg_ctx *ctx)
{
    if (!E || !idx || N < 2 || D < 1 || k < 1 || k > N - 1) return QG_EINVAL;
    int64_t nd, nk;
    if (qg_mul_overflow(N, D, &nd) || qg_mul_overflow(N, k, &nk)) return QG_EOVERFLOW;
    if (nk > INT64_MAX / 8 || N > INT64_MAX / 16) return QG_EOVERFLOW;

    const qg_nb_variant *var = qg_nb_pick(ctx);
    /* w [N] double, kth [N] float, scale [N] float */
    char *small = (char *)qg_malloc(N * (int64_t)(sizeof(double) + 2 * sizeof(float)));
    float *tops = sim ? sim : (float *)qg_malloc(nk * (int64_t)sizeof(float));
    int status = QG_OK;
    if (!small || !tops) {
        status = QG_ENOMEM;
        goto done;
    }
    double *w = (double *)small;
    float *kth = (float *)(w + N);
    float *scale = kth + N;

    if (qg_nb_norms(E, N, D, scale, w, ctx)) {
        status = QG_ENONFINITE;
        goto done;
    }
    if (qg_poll(ctx)) {
        status = QG_EINTR;
        goto done;
    }
    qg_nb_lists_init(tops, idx, kth, N, k);
    const qg_nb_side side = {E, N, 0, k, scale, w, tops, idx, kth};
    const qg_nb_job job = {D, 1, side, side, 0};
    /* work in multiply-adds: N^2 D / 2 (in double: saturates instead of overflowing) */
    status = qg_nb_run(&job, var, 0.5 * (double)N * (double)N * (double)D, ctx);

done:
    if (tops && tops != sim) qg_free(tops);
    qg_free(small);
    return status;
}

int qg_neighbors_cross_topk_f32(const float *A, int64_t na, int64_t a_id0, const float *B, int64_t nb,
                                int64_t b_id0, int64_t D, int64_t ka, int64_t *idx_a, float *sim_a, int64_t kb,
                                int64_t *idx_b, float *sim_b, const qg_ctx *ctx)
{
    int64_t nka, nkb;
    const int chk = qg_nb_cross_check(A, na, a_id0, B, nb, b_id0, D, ka, idx_a, kb, idx_b, &nka, &nkb);
    if (chk != QG_OK) return chk;

    const qg_nb_variant *var = qg_nb_pick(ctx);
    /* w [na + nb] double, kth [na + nb] float, scale [na + nb] float */
    const int64_t n = na + nb;
    char *small = (char *)qg_malloc(n * (int64_t)(sizeof(double) + 2 * sizeof(float)));
    float *tops_a = sim_a ? sim_a : (float *)qg_malloc(nka * (int64_t)sizeof(float));
    float *tops_b = sim_b ? sim_b : (float *)qg_malloc(nkb * (int64_t)sizeof(float));
    int status = QG_OK;
    if (!small || !tops_a || !tops_b) {
        status = QG_ENOMEM;
        goto done;
    }
    double *w = (double *)small;
    float *kth = (float *)(w + n);
    float *scale = kth + n;

    if (qg_nb_norms(A, na, D, scale, w, ctx) | qg_nb_norms(B, nb, D, scale + na, w + na, ctx)) {
        status = QG_ENONFINITE;
        goto done;
    }
    if (qg_poll(ctx)) {
        status = QG_EINTR;
        goto done;
    }
    qg_nb_lists_init(tops_a, idx_a, kth, na, ka);
    qg_nb_lists_init(tops_b, idx_b, kth + na, nb, kb);
    const qg_nb_job job = {D,
                           0,
                           {A, na, a_id0, ka, scale, w, tops_a, idx_a, kth},
                           {B, nb, b_id0, kb, scale + na, w + na, tops_b, idx_b, kth + na},
                           0};
    status = qg_nb_run(&job, var, (double)na * (double)nb * (double)D, ctx);

done:
    if (tops_b && tops_b != sim_b) qg_free(tops_b);
    if (tops_a && tops_a != sim_a) qg_free(tops_a);
    qg_free(small);
    return status;
}
