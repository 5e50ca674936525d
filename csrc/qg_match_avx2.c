/*
 * qg_match_avx2.c - the AVX2 + FMA record of the match family (qg_match_kernels_avx2, qg_match_impl.h):
 * the fused correlation + two-way max (the engine of qg_match_simd.h with a 6 x 16 tile in 12 ymm
 * accumulators), the backward through the argmax and the normalisation work items. Compiled with
 * -mavx2 -mfma (setup.py, x86-64 only); qg_match.c picks the record when ctx->isa is QG_ISA_AVX2, and the
 * AVX-512 record reuses its backward and normalisation items. Elsewhere this file compiles to nothing.
 */
#include "qg_match_impl.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QG_AI static inline __attribute__((always_inline))
#define MR 6
#define NR 16
#define QG_FWD_ENGINE qg_match_pairs_avx2

/* t[2i + h] = lanes 8h..8h+7 of row i of the 6 x 16 tile A_panel^T B_panel: two B vectors loaded and six
 * A values broadcast per channel for 12 FMAs. */
QG_AI void qg_ukernel(const float *restrict a, const float *restrict b, int64_t C, __m256 t[2 * MR])
{
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int64_t c = 0; c < C; ++c) {
        const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        __m256 x;
        x = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
        a += MR;
        b += NR;
    }
    t[0] = c00, t[1] = c01, t[2] = c10, t[3] = c11, t[4] = c20, t[5] = c21;
    t[6] = c30, t[7] = c31, t[8] = c40, t[9] = c41, t[10] = c50, t[11] = c51;
}

#include "qg_match_simd.h"

/* ------------------------------------------------------------------ backward */

/*
 * Backward through the argmax (qg_bwd_job in qg_match_impl.h). Every term of an output element is
 * w * far[c, r] for one (pair, location), w a float gradient; the portable engine sums them in double
 * per element in pair order (within a pair: probe-direction terms, then gallery-direction terms).
 * This engine sums the same terms in the same order, so the results are the same bits, but:
 *   - the far-side maps that occur are transposed once to [S][Cp] float (Cp = C rounded up to 8), so
 *     a term is a contiguous row of C values;
 *   - the terms of a row's pairs are bucketed by output location (stable counting sort, chunks of
 *     QG_BWD_PAIRS pairs), and each location's terms are summed with double accumulators held in
 *     registers across the terms (4 x 8 doubles per pass), instead of one load/store per term.
 *   - consecutive rows that read the same far maps (side 0: probes with one candidate list) form a run
 *     of up to QG_BWD_RUN rows that share each chunk's transposed maps (one transpose per run);
 *   - the class side's rows (CSR lists) are visited in the order of the probes they read (first, last,
 *     count), so rows that read the same transposed probe maps follow each other while those are in L2
 *     (~8% less time on the re-ID and faces class sides; a row's sums do not depend on when it runs);
 *   - a row's last chunk rounds each location's sums straight to float, [S][Cp] at the start of the
 *     row's accumulator (location s's floats end before its doubles start and overlap only doubles of
 *     locations already rounded), which is then transposed back to [C][S];
 *   - with the class rows' normalisation backward fused in (ytab), that transpose goes to the free
 *     second half of the accumulator and the normalisation item writes the output once, in order.
 * Memory: the transposed far maps (distinct ones only, at most QG_BWD_GLOBAL_BYTES; else per chunk) + per
 * thread QG_BWD_RUN * S*Cp doubles and the term lists.
 */
#define QG_BWD_PAIRS 8
/* At most this many rows share the transposed far maps of a chunk (their accumulators are live at once). */
#define QG_BWD_RUN 4
/* Largest up-front buffer of transposed far maps; beyond it the maps are transposed per chunk (the class
 * side of a faces step would otherwise copy every candidate row once more: 8052 rows = 808 MB). */
#define QG_BWD_GLOBAL_BYTES (64.0 * 1024.0 * 1024.0)
/* Terms ahead whose source rows are prefetched. */
#define QG_BWD_AHEAD 4

typedef struct qg_term {
    const float *src; /* transposed far row (Cp floats) */
    double w;
} qg_term;

/* Accumulator value to start from: acc[c0..c0+4) (or 0.0 for the location's first terms, so the
 * per-row accumulator is never cleared: each location starts with its first chunk of terms). */
QG_AI __m256d qg_bwd_start(const double *acc, int64_t c0, int fresh)
{
    return fresh ? _mm256_setzero_pd() : _mm256_loadu_pd(acc + c0);
}

/* Sums of lanes c..c+3: kept as doubles in acc, or (fout) rounded once into fout as floats. */
QG_AI void qg_bwd_put(double *acc, float *fout, int64_t c, __m256d a)
{
    if (fout)
        _mm_storeu_ps(fout + c, _mm256_cvtpd_ps(a));
    else
        _mm256_storeu_pd(acc + c, a);
}

/* acc[0..Cp) (= 0 if fresh) += sum_k t[k].w * t[k].src[0..Cp), in k order, double accumulators in
 * registers. With fout (the location's last terms), the sums are rounded once and stored there as floats
 * instead (fout[0..Cp) may overlap acc[0..Cp) from its start: each pass writes below what later passes
 * read). */
static void qg_bwd_accumulate(double *acc, const qg_term *t, int64_t n, int64_t Cp, int fresh, float *fout)
{
    int64_t c0 = 0;
    for (; c0 + 32 <= Cp; c0 += 32) {
        __m256d a0 = qg_bwd_start(acc, c0, fresh), a1 = qg_bwd_start(acc, c0 + 4, fresh);
        __m256d a2 = qg_bwd_start(acc, c0 + 8, fresh), a3 = qg_bwd_start(acc, c0 + 12, fresh);
        __m256d a4 = qg_bwd_start(acc, c0 + 16, fresh), a5 = qg_bwd_start(acc, c0 + 20, fresh);
        __m256d a6 = qg_bwd_start(acc, c0 + 24, fresh), a7 = qg_bwd_start(acc, c0 + 28, fresh);
        for (int64_t k = 0; k < n; ++k) {
            const __m256d w = _mm256_set1_pd(t[k].w);
            const float *x = t[k].src + c0;
            /* terms point into far maps all over L2/L3 in no order a prefetcher can follow */
            if (k + QG_BWD_AHEAD < n) {
                _mm_prefetch((const char *)(t[k + QG_BWD_AHEAD].src + c0), _MM_HINT_T0);
                _mm_prefetch((const char *)(t[k + QG_BWD_AHEAD].src + c0 + 16), _MM_HINT_T0);
            }
            a0 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x)), a0);
            a1 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 4)), a1);
            a2 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 8)), a2);
            a3 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 12)), a3);
            a4 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 16)), a4);
            a5 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 20)), a5);
            a6 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 24)), a6);
            a7 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 28)), a7);
        }
        qg_bwd_put(acc, fout, c0, a0), qg_bwd_put(acc, fout, c0 + 4, a1);
        qg_bwd_put(acc, fout, c0 + 8, a2), qg_bwd_put(acc, fout, c0 + 12, a3);
        qg_bwd_put(acc, fout, c0 + 16, a4), qg_bwd_put(acc, fout, c0 + 20, a5);
        qg_bwd_put(acc, fout, c0 + 24, a6), qg_bwd_put(acc, fout, c0 + 28, a7);
    }
    for (; c0 < Cp; c0 += 8) { /* Cp is a multiple of 8 */
        __m256d a0 = qg_bwd_start(acc, c0, fresh), a1 = qg_bwd_start(acc, c0 + 4, fresh);
        for (int64_t k = 0; k < n; ++k) {
            const __m256d w = _mm256_set1_pd(t[k].w);
            const float *x = t[k].src + c0;
            a0 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x)), a0);
            a1 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 4)), a1);
        }
        qg_bwd_put(acc, fout, c0, a0), qg_bwd_put(acc, fout, c0 + 4, a1);
    }
}

/* 8 x 8 block: d[j * ldd + i] = a[i * lda + j]. */
QG_AI void qg_tr8x8(const float *a, int64_t lda, float *d, int64_t ldd)
{
    __m256 r0 = _mm256_loadu_ps(a), r1 = _mm256_loadu_ps(a + lda), r2 = _mm256_loadu_ps(a + 2 * lda);
    __m256 r3 = _mm256_loadu_ps(a + 3 * lda), r4 = _mm256_loadu_ps(a + 4 * lda);
    __m256 r5 = _mm256_loadu_ps(a + 5 * lda), r6 = _mm256_loadu_ps(a + 6 * lda);
    __m256 r7 = _mm256_loadu_ps(a + 7 * lda);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    r0 = _mm256_shuffle_ps(t0, t2, 0x44), r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    r2 = _mm256_shuffle_ps(t1, t3, 0x44), r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    r4 = _mm256_shuffle_ps(t4, t6, 0x44), r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    r6 = _mm256_shuffle_ps(t5, t7, 0x44), r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(r0, r4, 0x20));
    _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(r1, r5, 0x20));
    _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(r2, r6, 0x20));
    _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(r3, r7, 0x20));
    _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(r0, r4, 0x31));
    _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(r1, r5, 0x31));
    _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(r2, r6, 0x31));
    _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(r3, r7, 0x31));
}

/* dst [S][Cp] = src [C][S] transposed, zero for c >= C. With next (NULL: none), the lines of the next
 * map to transpose (another [C][S] map) are prefetched, spread over the 8 x 8 blocks: the maps lie
 * at random places in memory, so the hardware prefetcher cannot run ahead across them (measured:
 * ~10% less time on the feature side of a faces step, ~5% on re-ID). */
static void qg_transpose(const float *src, int64_t C, int64_t S, int64_t Cp, float *dst, const float *next)
{
    const int64_t C8 = C & ~(int64_t)7, S8 = S & ~(int64_t)7;
    const int64_t bytes = next ? C * S * (int64_t)sizeof(float) : 0, nblk = (S8 / 8) * (C8 / 8);
    const char *nx = (const char *)next;
    int64_t b = 0, k = 0;
    for (int64_t s0 = 0; s0 < S8; s0 += 8)
        for (int64_t c0 = 0; c0 < C8; c0 += 8) {
            qg_tr8x8(src + c0 * S + s0, S, dst + s0 * Cp + c0, Cp);
            for (const int64_t e = ++k * bytes / nblk; b < e; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
        }
    for (int64_t s = S8; s < S; ++s) /* edge rows of dst */
        for (int64_t c = 0; c < C8; ++c) dst[s * Cp + c] = src[c * S + s];
    for (int64_t s = 0; s < S; ++s) { /* edge columns of dst, and the zero padding */
        for (int64_t c = C8; c < C; ++c) dst[s * Cp + c] = src[c * S + s];
        for (int64_t c = C; c < Cp; ++c) dst[s * Cp + c] = 0.0f;
    }
}

/* Pair i of row t (in summation order). */
static int64_t qg_bwd_pair_id(const qg_bwd_job *job, int64_t t, int64_t i)
{
    if (job->off) return job->list[job->off[t] + i];
    return job->side == 0 ? t * job->K + i : i * job->K + t;
}

static int64_t qg_bwd_npairs(const qg_bwd_job *job, int64_t t)
{
    if (job->off) return job->off[t + 1] - job->off[t];
    return job->side == 0 ? job->K : job->nA;
}

static int64_t qg_bwd_far_id(const qg_bwd_job *job, int64_t q)
{
    if (job->side == 0) return job->cand ? job->cand[q] : q % job->K;
    return q / job->K;
}

/* Rows t and u read the same far maps in the same order (side 0 of a restricted job: the two probes
 * have the same candidate list; all pairs: every probe reads every gallery map). */
static int qg_bwd_same_far(const qg_bwd_job *job, int64_t t, int64_t u)
{
    if (job->side != 0 || job->off) return 0;
    if (!job->cand) return 1;
    return memcmp(job->cand + t * job->K, job->cand + u * job->K, (size_t)job->K * sizeof(int64_t)) == 0;
}

/* Per-thread scratch of the backward. */
typedef struct qg_bwd_scr {
    double *acc;          /* [QG_BWD_RUN][S][Cp] */
    unsigned char *seen;  /* [QG_BWD_RUN][S]: acc row s of that output holds terms */
    qg_term *terms;       /* [2 * pch * S] */
    int64_t *start, *pos; /* [S + 1], [S] */
    float *tb;            /* [pch][S][Cp] transposed far maps of a chunk (local mode) */
} qg_bwd_scr;

/* A location without terms in the row's last chunk: its sums (if any) rounded once into fout, else zeros
 * (fout may overlap acc from its start, as in qg_bwd_accumulate). */
static void qg_bwd_round(const double *acc, int seen, int64_t Cp, float *fout)
{
    for (int64_t c = 0; c < Cp; c += 4)
        _mm_storeu_ps(fout + c, seen ? _mm256_cvtpd_ps(_mm256_loadu_pd(acc + c)) : _mm_setzero_ps());
}

/* Pairs [i0, i1) of row t into acc (the row's accumulator): bucket the terms by output location
 * (stable counting sort: pair order, then probe- before gallery-direction terms), then sum each
 * location's terms with register accumulators. far(i) is the transposed far map of pair i. In the row's
 * last chunk (last), every location's sums are rounded to float into the start of acc. */
static void qg_bwd_row_chunk(const qg_bwd_job *job, int64_t t, int64_t i0, int64_t i1, const float *const *farp,
                             double *acc, unsigned char *seen, const qg_bwd_scr *sc, int64_t Cp, int last)
{
    const int64_t S = job->S;
    int64_t *start = sc->start, *pos = sc->pos;
    qg_term *terms = sc->terms;
    memset(start, 0, (size_t)(S + 1) * sizeof(int64_t));
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t q = qg_bwd_pair_id(job, t, i);
        const uint16_t *ap = job->ap + q * S, *ag = job->ag + q * S;
        if (job->side == 0) {
            for (int64_t s = 0; s < S; ++s) start[s + 1] += 1;
            for (int64_t r = 0; r < S; ++r) start[ag[r] + 1] += 1;
        } else {
            for (int64_t s = 0; s < S; ++s) start[ap[s] + 1] += 1;
            for (int64_t r = 0; r < S; ++r) start[r + 1] += 1;
        }
    }
    for (int64_t s = 0; s < S; ++s) {
        start[s + 1] += start[s];
        pos[s] = start[s];
    }
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t q = qg_bwd_pair_id(job, t, i);
        const uint16_t *ap = job->ap + q * S, *ag = job->ag + q * S;
        const float *gp = job->gmp + q * S, *gg = job->gmg + q * S;
        const float *T = farp[i - i0];
        if (job->side == 0) { /* acc[s] += gmp[s] T[ap[s]];  acc[ag[r]] += gmg[r] T[r] */
            for (int64_t s = 0; s < S; ++s) terms[pos[s]++] = (qg_term){T + ap[s] * Cp, gp[s]};
            for (int64_t r = 0; r < S; ++r) terms[pos[ag[r]]++] = (qg_term){T + r * Cp, gg[r]};
        } else { /* acc[ap[s]] += gmp[s] T[s];  acc[r] += gmg[r] T[ag[r]] */
            for (int64_t s = 0; s < S; ++s) terms[pos[ap[s]]++] = (qg_term){T + s * Cp, gp[s]};
            for (int64_t r = 0; r < S; ++r) terms[pos[r]++] = (qg_term){T + ag[r] * Cp, gg[r]};
        }
    }
    float *accf = (float *)acc;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t n = start[s + 1] - start[s];
        if (!last) {
            if (n) qg_bwd_accumulate(acc + s * Cp, terms + start[s], n, Cp, !seen[s], NULL);
            seen[s] |= n > 0;
        } else if (n) {
            qg_bwd_accumulate(acc + s * Cp, terms + start[s], n, Cp, !seen[s], accf + s * Cp);
        } else {
            qg_bwd_round(acc + s * Cp, seen[s], Cp, accf + s * Cp);
        }
    }
}

/* Transpose row t's rounded sums (floats [S][Cp] at the start of its accumulator) back to [C][S] into the
 * output. */
static void qg_bwd_row_store(const qg_bwd_job *job, int64_t t, double *acc, int64_t Cp)
{
    const int64_t C = job->C, S = job->S;
    const int64_t row = job->rowid ? job->rowid[t] : t;
    float *const out = job->out + row * C * S;
    float *accf = (float *)acc;
    /* with the normalisation backward to follow, the transposed gradient goes to the free second half of
     * the accumulator (L2) and the output is written once, in order, by the normalisation item */
    float *o = job->ytab ? accf + S * Cp : out;
    const int64_t C8 = C & ~(int64_t)7, S8 = S & ~(int64_t)7;
    for (int64_t c0 = 0; c0 < C8; c0 += 8)
        for (int64_t s0 = 0; s0 < S8; s0 += 8) qg_tr8x8(accf + s0 * Cp + c0, Cp, o + c0 * S + s0, S);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t s = (c < C8 ? S8 : 0); s < S; ++s) o[c * S + s] = accf[s * Cp + c];
    if (job->ytab) /* the row is still in L2: its normalisation backward now, not in a pass over memory */
        for (int64_t s0 = 0; s0 < S; s0 += QG_NORM_SB)
            qg_norm_bwd_item_avx2(o + s0, job->ytab + job->yrow[row] * C * S + s0, 1, job->ynorm + row * S + s0,
                                  qg_min(QG_NORM_SB, S - s0), C, S, out + s0);
}

/* Sort key of a CSR row (class side): the probe maps its pairs read, (first, last, count), so rows that
 * read the same probes' transposed maps run one after another and find them in L2. */
typedef struct qg_rowkey {
    int64_t first, last, n, t;
} qg_rowkey;

static int qg_rowkey_cmp(const void *pa, const void *pb)
{
    const qg_rowkey *a = (const qg_rowkey *)pa, *b = (const qg_rowkey *)pb;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    if (a->last != b->last) return a->last < b->last ? -1 : 1;
    if (a->n != b->n) return a->n < b->n ? -1 : 1;
    return (a->t > b->t) - (a->t < b->t);
}

int qg_match_bwd_avx2(const qg_bwd_job *job, const qg_ctx *ctx)
{
    const int64_t C = job->C, S = job->S, cs = C * S, Cp = qg_rup(C, 8), nfar = job->nfar;
    if (job->nrows == 0) return QG_OK;
    int64_t *slot = (int64_t *)qg_malloc(nfar * (int64_t)sizeof(int64_t));
    int64_t *run = (int64_t *)qg_malloc((job->nrows + 1) * (int64_t)sizeof(int64_t));
    if (!slot || !run) {
        qg_free(slot);
        qg_free(run);
        return QG_ENOMEM;
    }
    for (int64_t f = 0; f < nfar; ++f) slot[f] = -1;
    int64_t maxp = 0, total = 0;
    for (int64_t t = 0; t < job->nrows; ++t) {
        const int64_t n = qg_bwd_npairs(job, t);
        if (n > maxp) maxp = n;
        total += n;
        for (int64_t i = 0; i < n; ++i) slot[qg_bwd_far_id(job, qg_bwd_pair_id(job, t, i))] = 0;
    }
    int64_t nslots = 0;
    for (int64_t f = 0; f < nfar; ++f)
        if (slot[f] == 0) slot[f] = nslots++;
        else slot[f] = -1;
    /* Far maps used by many pairs (the probe side, a few popular classes) are transposed once up front;
     * otherwise each chunk transposes its own pairs' maps into a per-thread buffer that stays in L2
     * (no large buffer to fault in and stream back from memory), shared by a run of up to QG_BWD_RUN
     * consecutive rows that read the same far maps (probes with one candidate list). Same values and
     * the same summation order per output element either way. */
    const int global = nslots * 8 <= total && (double)nslots * (double)(S * Cp) * 4.0 <= QG_BWD_GLOBAL_BYTES;
    int64_t nrun = 0;
    for (int64_t t = 0; t < job->nrows;) {
        int64_t u = t + 1;
        if (!global)
            while (u < job->nrows && u - t < QG_BWD_RUN && qg_bwd_same_far(job, t, u)) ++u;
        run[nrun++] = t;
        t = u;
    }
    run[nrun] = job->nrows;
    /* class side (CSR rows, runs of one row): visit the rows in probe order; each row is still summed in
     * its own pair order, so the bits do not change (without memory for the order: id order) */
    int64_t *order = NULL;
    if (job->off) {
        qg_rowkey *keys = (qg_rowkey *)qg_malloc(job->nrows * (int64_t)sizeof(qg_rowkey));
        order = (int64_t *)qg_malloc(job->nrows * (int64_t)sizeof(int64_t));
        if (keys && order) {
            for (int64_t t = 0; t < job->nrows; ++t) {
                const int64_t n = qg_bwd_npairs(job, t);
                keys[t].first = n ? qg_bwd_far_id(job, qg_bwd_pair_id(job, t, 0)) : -1;
                keys[t].last = n ? qg_bwd_far_id(job, qg_bwd_pair_id(job, t, n - 1)) : -1;
                keys[t].n = n;
                keys[t].t = t;
            }
            qsort(keys, (size_t)job->nrows, sizeof(qg_rowkey), qg_rowkey_cmp);
            for (int64_t t = 0; t < job->nrows; ++t) order[t] = keys[t].t;
        } else {
            qg_free(order);
            order = NULL;
        }
        qg_free(keys);
    }
    const int64_t rmax = global ? 1 : QG_BWD_RUN;
    const int64_t pch = qg_min(maxp, global ? QG_BWD_PAIRS : 4);
    const int64_t nterms = 2 * pch * S;
    int64_t l_far = 0, tmp;
    if (qg_mul_overflow(global ? nslots : pch, S * Cp, &l_far) ||
        qg_mul_overflow(l_far, (int64_t)sizeof(float), &tmp)) {
        qg_free(slot);
        qg_free(run);
        return QG_EOVERFLOW;
    }
    float *farT = global ? (float *)qg_malloc(l_far * (int64_t)sizeof(float)) : NULL;
    /* threads: one per run at most, and not for tiny jobs */
    const double macs = 2.0 * (double)total * (double)cs;
    const int nt = qg_match_threads(ctx, macs * 4.0, nrun);
    const int64_t l_acc = rmax * S * Cp * (int64_t)sizeof(double);
    const int64_t l_terms = nterms * (int64_t)sizeof(qg_term), l_idx = (2 * S + 1) * (int64_t)sizeof(int64_t);
    const int64_t l_tb = global ? 0 : l_far * (int64_t)sizeof(float);
    const int64_t per = qg_rup(l_acc + l_terms + l_idx + l_tb + rmax * S, 64);
    char *scratch = (char *)qg_malloc(per * nt);
    if ((global && !farT) || !scratch) {
        qg_free(slot);
        qg_free(run);
        qg_free(farT);
        qg_free(scratch);
        return QG_ENOMEM;
    }
    int stop = 0;
    if (global) {
        const int ntt = qg_match_threads(ctx, (double)nslots * (double)cs * 16.0, nfar);
        QG_OMP(parallel for schedule(dynamic, 16) num_threads(ntt))
        for (int64_t f = 0; f < nfar; ++f) {
            if (slot[f] < 0 || qg_stop_requested(&stop)) continue;
            qg_transpose(job->far + f * cs, C, S, Cp, farT + slot[f] * S * Cp, NULL);
            qg_poll_block(ctx, &stop);
        }
    }
    if (!stop) {
        QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
        for (int64_t ru = 0; ru < nrun; ++ru) {
            if (qg_stop_requested(&stop)) continue;
            char *base = scratch + (int64_t)qg_thread_num() * per;
            qg_bwd_scr sc;
            sc.acc = (double *)base;
            sc.terms = (qg_term *)(base + l_acc);
            sc.start = (int64_t *)(base + l_acc + l_terms);
            sc.pos = sc.start + S + 1;
            sc.tb = (float *)(base + l_acc + l_terms + l_idx);
            sc.seen = (unsigned char *)(base + l_acc + l_terms + l_idx + l_tb);
            const int64_t t0 = order ? order[ru] : run[ru], nr = order ? 1 : run[ru + 1] - run[ru];
            memset(sc.seen, 0, (size_t)(nr * S));
            const int64_t np = qg_bwd_npairs(job, t0); /* the same for every row of a run */
            const float *farp[QG_BWD_PAIRS];
            for (int64_t i0 = 0; i0 < np; i0 += pch) {
                const int64_t i1 = qg_min(np, i0 + pch);
                for (int64_t i = i0; i < i1; ++i) {
                    const int64_t f = qg_bwd_far_id(job, qg_bwd_pair_id(job, t0, i));
                    if (global) {
                        farp[i - i0] = farT + slot[f] * S * Cp;
                    } else {
                        farp[i - i0] = sc.tb + (i - i0) * S * Cp;
                        const float *nx = NULL; /* the map after this one (of this chunk or the next) */
                        if (i + 1 < np) nx = job->far + qg_bwd_far_id(job, qg_bwd_pair_id(job, t0, i + 1)) * cs;
                        qg_transpose(job->far + f * cs, C, S, Cp, sc.tb + (i - i0) * S * Cp, nx);
                    }
                }
                for (int64_t r = 0; r < nr; ++r)
                    qg_bwd_row_chunk(job, t0 + r, i0, i1, farp, sc.acc + r * S * Cp, sc.seen + r * S, &sc, Cp,
                                     i1 == np);
            }
            if (np == 0) /* no chunk rounded these rows: their sums are zero */
                for (int64_t r = 0; r < nr; ++r) memset(sc.acc + r * S * Cp, 0, (size_t)(S * Cp) * sizeof(float));
            for (int64_t r = 0; r < nr; ++r) qg_bwd_row_store(job, t0 + r, sc.acc + r * S * Cp, Cp);
            qg_poll_block(ctx, &stop);
        }
    }
    qg_free(slot);
    qg_free(run);
    qg_free(order);
    qg_free(farT);
    qg_free(scratch);
    return stop ? QG_EINTR : QG_OK;
}

/* ------------------------------------------------------------------ normalisation items */

/*
 * The normalisation work items of qg_match.c, four locations per double vector. Each location's sums
 * run over c in order. A product of two floats is exact in double, so a sum term rounds once whether
 * it is a multiply then an add (the portable items; this file is compiled in ISO C mode, so nothing is
 * contracted behind our back) or an explicit fused multiply-add (the backward's dot products); sqrt
 * and the divisions are correctly rounded: the same bits as the portable items. Floats that are only
 * read are converted with a memory operand (qg_cvt4), not loaded 8-wide and split: in a hot-cache
 * micro-benchmark the backward item took 14 % less time on re-ID maps, 9 % on faces maps.
 */
void qg_norm_fwd_item_avx2(const float *xm, int64_t n, int64_t C, int64_t S, float *ym, float *nm)
{
    /* rows of the map (c) outermost, so the map streams through in memory order; the per-location
     * sums stay in L1 */
    double acc[QG_NORM_SB];
    float den[QG_NORM_SB];
    const int64_t n4 = n & ~(int64_t)3, n8 = n & ~(int64_t)7;
    int64_t s;
    for (s = 0; s < n; ++s) acc[s] = 0.0;
    for (int64_t c = 0; c < C; ++c) {
        const float *xr = xm + c * S;
        for (s = 0; s < n4; s += 4) {
            const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(xr + s));
            _mm256_storeu_pd(acc + s, _mm256_add_pd(_mm256_loadu_pd(acc + s), _mm256_mul_pd(v, v)));
        }
        for (; s < n; ++s) acc[s] += (double)xr[s] * (double)xr[s];
    }
    const __m128 eps = _mm_set1_ps(QG_NORM_EPS);
    for (s = 0; s < n4; s += 4) {
        const __m128 nr = _mm256_cvtpd_ps(_mm256_sqrt_pd(_mm256_loadu_pd(acc + s)));
        _mm_storeu_ps(nm + s, nr);
        _mm_storeu_ps(den + s, _mm_max_ps(nr, eps)); /* nr > eps ? nr : eps (NaN -> eps) */
    }
    qg_norm_fwd_den(acc, s, n, nm, den);
    for (int64_t c = 0; c < C; ++c) {
        const float *xr = xm + c * S;
        float *yr = ym + c * S;
        for (s = 0; s < n8; s += 8)
            _mm256_storeu_ps(yr + s, _mm256_div_ps(_mm256_loadu_ps(xr + s), _mm256_loadu_ps(den + s)));
        for (; s < n; ++s) yr[s] = xr[s] / den[s];
    }
    qg_norm_fwd_overflow(xm, acc, nm, n, C, S, ym);
}

/* y of 8 locations: loaded (raw == 0) or rebuilt as x / fden, the forward's float32 division (one
 * division instruction per 8 lanes instead of per 4). */
QG_AI __m256 qg_norm_y8(const float *yr, const float *fden, int raw)
{
    const __m256 v = _mm256_loadu_ps(yr);
    return raw ? _mm256_div_ps(v, _mm256_loadu_ps(fden)) : v;
}

QG_AI __m256d qg_lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
QG_AI __m256d qg_hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
/* 4 floats from memory as doubles (a conversion with a memory operand: no extract) */
QG_AI __m256d qg_cvt4(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

/* gx of 4 locations: (float)((g - y * dot) * inv), a separate multiply, subtract and multiply. */
QG_AI __m128 qg_norm_gx4(__m256d g, __m256d y, const double *dot, const double *inv)
{
    const __m256d t = _mm256_sub_pd(g, _mm256_mul_pd(y, _mm256_loadu_pd(dot)));
    return _mm256_cvtpd_ps(_mm256_mul_pd(t, _mm256_loadu_pd(inv)));
}

void qg_norm_bwd_item_avx2(const float *gym, const float *ym, int raw, const float *nm, int64_t n, int64_t C,
                           int64_t S, float *gxm)
{
    double dot[QG_NORM_SB];
    double inv[QG_NORM_SB];
    float fden[QG_NORM_SB];
    const int64_t n8 = n & ~(int64_t)7;
    int64_t s;
    for (s = 0; s < n; ++s) dot[s] = 0.0;
    qg_norm_bwd_fden(nm, n, fden);
    for (int64_t c = 0; c < C; ++c) {
        const float *gr = gym + c * S, *yr = ym + c * S;
        for (s = 0; s < n8; s += 8) {
            const __m256 y = qg_norm_y8(yr + s, fden + s, raw);
            _mm256_storeu_pd(dot + s, _mm256_fmadd_pd(qg_lo_pd(y), qg_cvt4(gr + s), _mm256_loadu_pd(dot + s)));
            _mm256_storeu_pd(dot + s + 4,
                             _mm256_fmadd_pd(qg_hi_pd(y), qg_cvt4(gr + s + 4), _mm256_loadu_pd(dot + s + 4)));
        }
        for (; s < n; ++s) {
            const float y = raw ? yr[s] / fden[s] : yr[s];
            dot[s] += (double)y * (double)gr[s];
        }
    }
    qg_norm_bwd_inv(nm, n, dot, inv);
    for (int64_t c = 0; c < C; ++c) {
        const float *gr = gym + c * S, *yr = ym + c * S;
        float *xr = gxm + c * S;
        for (s = 0; s < n8; s += 8) {
            const __m256 y = qg_norm_y8(yr + s, fden + s, raw);
            _mm_storeu_ps(xr + s, qg_norm_gx4(qg_cvt4(gr + s), qg_lo_pd(y), dot + s, inv + s));
            _mm_storeu_ps(xr + s + 4, qg_norm_gx4(qg_cvt4(gr + s + 4), qg_hi_pd(y), dot + s + 4, inv + s + 4));
        }
        for (; s < n; ++s) {
            const float y = raw ? yr[s] / fden[s] : yr[s];
            xr[s] = (float)(((double)gr[s] - (double)y * dot[s]) * inv[s]);
        }
    }
}

const qg_match_kernels qg_match_kernels_avx2 = {
    .pairs = qg_match_pairs_avx2,
    .bwd = qg_match_bwd_avx2,
    .norm_fwd_item = qg_norm_fwd_item_avx2,
    .norm_bwd_item = qg_norm_bwd_item_avx2,
};

#endif /* __AVX2__ && __FMA__ */
