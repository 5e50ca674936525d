/*
 * qg_neighbors_simd.h - the SIMD block-pair kernel of qg_neighbors_topk_f32, written once and compiled
 * per ISA file: qg_neighbors_avx2.c (6 x 16 tile in ymm registers) and qg_neighbors_avx512.c (12 x 16
 * tile in zmm registers). No include guard: each of those files includes it once, after defining
 *   QG_NB2_BLOCK, QG_NB2_BLOCK_SMALL (rows per block, multiples of QG_NB2_MR and 16), QG_NB2_MR,
 *   QG_NB2_NR (16) and
 *   qg_nb2_micro(dp, ap, bp, c, ldc, ma, nb): c[a * ldc + b] += sum_d ap[a * QG_NB_PANEL + d] *
 *     bp[d * 16 + b] for a < ma, b < nb, each lane one float32 FMA chain over d = 0, 1, ... from zero,
 *     then one float32 add into c,
 * and including <immintrin.h> and <string.h>.
 *
 * Same driver, block-pair contract and error budget as the portable variant (qg_neighbors_impl.h);
 * only the accumulation inside a panel differs (fused multiply-add, one rounding per term instead of
 * two), so results may differ from the portable path in the last bits but are bit-identical for any
 * thread count, and between the AVX2 and AVX-512 kernels (a lane's chain does not depend on the tile).
 *
 * Per block pair (I, J) of QG_NB2_BLOCK = 288 rows each (192 for small tables), per D-panel of
 * QG_NB_PANEL = 256 columns:
 *   - A side: the rows of I copied row-major and scaled by their power-of-two prescale (288 KiB,
 *     L2); the micro-kernel broadcasts A values straight from the rows, so no transpose.
 *   - B side: for each 16 rows of J, a d-major micro-panel packed just in time through 8x8
 *     in-register transposes (16 KiB: stays in L1 while all A tiles stream past it).
 *   - micro-kernel QG_NB2_MR x 16 (the ISA file's).
 *   - the panel's float32 sums are added, panel after panel, into a float32 [I, J] accumulator
 *     (324 KiB; a double one measured ~5% slower: widening and twice the L2 traffic per call).
 *   - between micro-kernel calls, a few prefetches for what comes next (the next B micro-panel's
 *     rows, the next panel's rows of I, in the last panel the top-k lists of I and J), so DRAM
 *     latency overlaps the arithmetic.
 * Epilogue: sim = (float)(acc * (w_i * w_j)) for 8 candidates at a time, compared (>=) with the
 * row's current k-th value and with the 8 column rows' k-th values; only the lanes that pass
 * reach the scalar insertion (qg_nb_push re-checks the exact order, ties by index).
 * Error: the in-panel chain (<= 256 terms) plus the chain over D/256 panel sums, both float32:
 * |dot error| <= (256 + D/256) * 2^-24 * sum_d |x_d y_d| for rows prescaled to norm ~1, i.e.
 * <= 2.1e-5 for D = 25,088 in the worst case (all rounding errors aligned), ~1e-7 typically.
 * Scratch per thread: ~630 KiB (qg_nb2_scratch).
 */

static const float qg_nb2_zeros[QG_NB_PANEL] __attribute__((aligned(64)));

/* ------------------------------------------------------------------ packing */

static inline void qg_nb2_transpose8(__m256 r[8])
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* out[d * ld + a] = src[a][d] * sc[a] for a < 8, d < dp (rows past the block point at zeros). */
static void qg_nb2_pack8(const float *const src[8], const float sc[8], int64_t dp, float *out, int64_t ld)
{
    int64_t d = 0;
    for (; d + 8 <= dp; d += 8) {
        __m256 r[8];
        for (int a = 0; a < 8; ++a) r[a] = _mm256_mul_ps(_mm256_loadu_ps(src[a] + d), _mm256_set1_ps(sc[a]));
        qg_nb2_transpose8(r);
        for (int t = 0; t < 8; ++t) _mm256_storeu_ps(out + (d + t) * ld, r[t]);
    }
    for (; d < dp; ++d)
        for (int a = 0; a < 8; ++a) out[d * ld + a] = src[a][d] * sc[a];
}

/* Rows [r0, r0 + nr), nr <= 16, x columns [d0, d0 + dp) of E, scaled, into one d-major B
 * micro-panel: out[d * 16 + b] (rows past nr are zero). */
static void qg_nb2_pack(const qg_nb_side *sd, int64_t D, int64_t r0, int64_t nr, int64_t d0, int64_t dp, float *out)
{
    const float *src[8];
    float sc[8];
    for (int64_t g = 0; g < QG_NB2_NR; g += 8) {
        for (int a = 0; a < 8; ++a) {
            const int64_t r = g + a;
            src[a] = r < nr ? sd->E + (r0 + r) * D + d0 : qg_nb2_zeros;
            sc[a] = r < nr ? sd->scale[r0 + r] : 0.0f;
        }
        qg_nb2_pack8(src, sc, dp, out + g, QG_NB2_NR);
    }
}

/* Rows [r0, r0 + nr) x columns [d0, d0 + dp) of E, scaled, row-major with row stride lda; rows
 * [nr, nr_pad) are zero (they feed only the discarded lanes of the last tile). */
static void qg_nb2_copy(const qg_nb_side *sd, int64_t D, int64_t r0, int64_t nr, int64_t nr_pad, int64_t d0,
                        int64_t dp, int64_t lda, float *out)
{
    for (int64_t r = 0; r < nr; ++r) {
        const float *src = sd->E + (r0 + r) * D + d0;
        float *o = out + r * lda;
        const __m256 sc = _mm256_set1_ps(sd->scale[r0 + r]);
        int64_t d = 0;
        for (; d + 8 <= dp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(src + d), sc));
        for (; d < dp; ++d) o[d] = src[d] * sd->scale[r0 + r];
    }
    for (int64_t r = nr; r < nr_pad; ++r) memset(out + r * lda, 0, (size_t)dp * sizeof(float));
}

/* ------------------------------------------------------------------ one block pair */

typedef struct qg_nb2_scratch {
    float packA[QG_NB2_BLOCK * QG_NB_PANEL];
    float packB[QG_NB_PANEL * QG_NB2_NR];
    float acc[QG_NB2_BLOCK * QG_NB2_BLOCK];
} qg_nb2_scratch;

/* Both lists of the pair (row li of side a, row lj of side b) with similarity s. */
static inline void qg_nb2_push2(const qg_nb_side *A, const qg_nb_side *B, int64_t li, int64_t lj, float s)
{
    qg_nb_push(A->tops + li * A->k, A->topi + li * A->k, A->kth + li, A->k, s, B->id0 + lj);
    qg_nb_push(B->tops + lj * B->k, B->topi + lj * B->k, B->kth + lj, B->k, s, A->id0 + li);
}

/* A prefetch stream: `nrows` rows of `lines` cache lines each, `stride` bytes apart, issued a
 * few lines at a time between micro-kernel calls (so the misses overlap the arithmetic and the
 * lines arrive shortly before they are needed, instead of stalling the pack or the epilogue). */
typedef struct qg_nb2_pfs {
    const char *base;
    int64_t stride, nrows, lines, r, l;
} qg_nb2_pfs;

static inline void qg_nb2_pfs_set(qg_nb2_pfs *p, const void *base, int64_t stride, int64_t nrows, int64_t lines)
{
    p->base = (const char *)base;
    p->stride = stride;
    p->nrows = nrows;
    p->lines = lines;
    p->r = p->l = 0;
}

static inline void qg_nb2_pfs_issue(qg_nb2_pfs *p, int64_t n)
{
    for (; n > 0 && p->r < p->nrows; --n) {
        _mm_prefetch(p->base + p->r * p->stride + p->l * 64, _MM_HINT_T0);
        if (++p->l == p->lines) {
            p->l = 0;
            ++p->r;
        }
    }
}

static void qg_nb2_match(const qg_nb_job *job, int64_t bi, int64_t bj, void *scratch)
{
    qg_nb2_scratch *sc = (qg_nb2_scratch *)scratch;
    const qg_nb_side *A = &job->a, *B = &job->b;
    const int64_t D = job->D;
    const int64_t blk = job->block; /* <= QG_NB2_BLOCK */
    const int64_t i0 = bi * blk, j0 = bj * blk;
    const int64_t ni = (A->n - i0 < blk) ? A->n - i0 : blk;
    const int64_t nj = (B->n - j0 < blk) ? B->n - j0 : blk;
    const int diag = job->sym && (bi == bj);
    const int64_t ldc = blk;
    const int64_t ni_pad = (ni + QG_NB2_MR - 1) / QG_NB2_MR * QG_NB2_MR;
    const int64_t ntiles_i = ni_pad / QG_NB2_MR, ntiles_j = (nj + QG_NB2_NR - 1) / QG_NB2_NR;
    /* micro-kernel calls per panel (an upper bound on the diagonal) */
    const int64_t calls = diag ? ntiles_i * ntiles_j / 2 + ntiles_i + 1 : ntiles_i * ntiles_j;
    float *acc = sc->acc;

    for (int64_t i = 0; i < ni; ++i) memset(acc + i * ldc, 0, (size_t)nj * sizeof(float));

    qg_nb2_pfs pa = {0}, pl[4] = {{0}};
    for (int64_t d0 = 0; d0 < D; d0 += QG_NB_PANEL) {
        const int64_t dp = (D - d0 < QG_NB_PANEL) ? D - d0 : QG_NB_PANEL;
        const int64_t dn = d0 + QG_NB_PANEL, dpn = (D - dn < QG_NB_PANEL) ? D - dn : QG_NB_PANEL;
        const int last = dn >= D;
        qg_nb2_copy(A, D, i0, ni, ni_pad, d0, dp, QG_NB_PANEL, sc->packA);
        /* during this panel: the rows of I for the next panel; during the last one, the top-k
         * lists the epilogue updates (contiguous row ranges of tops and topi) */
        int64_t npf;
        if (!last) {
            qg_nb2_pfs_set(&pa, A->E + i0 * D + dn, D * 4, ni, (dpn + 15) / 16);
            npf = ni * ((dpn + 15) / 16);
        } else {
            const int64_t ls = (ni * A->k * 4 + 63) / 64, lx = (ni * A->k * 8 + 63) / 64;
            const int64_t ms = (nj * B->k * 4 + 63) / 64, mx = (nj * B->k * 8 + 63) / 64;
            qg_nb2_pfs_set(&pl[0], A->tops + i0 * A->k, 0, 1, ls);
            qg_nb2_pfs_set(&pl[1], A->topi + i0 * A->k, 0, 1, lx);
            qg_nb2_pfs_set(&pl[2], B->tops + j0 * B->k, 0, diag ? 0 : 1, ms);
            qg_nb2_pfs_set(&pl[3], B->topi + j0 * B->k, 0, diag ? 0 : 1, mx);
            npf = ls + lx + (diag ? 0 : ms + mx);
        }
        const int64_t step = npf / calls + 1;
        for (int64_t tj = 0; tj < ntiles_j; ++tj) {
            const int64_t jb = tj * QG_NB2_NR;
            const int nb = (int)((nj - jb < QG_NB2_NR) ? nj - jb : QG_NB2_NR);
            /* B micro-panel packed just in time (16 KiB, stays in L1 across the A tiles); the
             * next one's source rows are prefetched while this one is used */
            qg_nb2_pack(B, D, j0 + jb, nb, d0, dp, sc->packB);
            qg_nb2_pfs pb = {0};
            int64_t nbn = 0;
            if (tj + 1 < ntiles_j) {
                nbn = (nj - jb - QG_NB2_NR < QG_NB2_NR) ? nj - jb - QG_NB2_NR : QG_NB2_NR;
                qg_nb2_pfs_set(&pb, B->E + (j0 + jb + QG_NB2_NR) * D + d0, D * 4, nbn, (dp + 15) / 16);
                nbn *= (dp + 15) / 16;
            } else if (!last) {
                nbn = nj < QG_NB2_NR ? nj : QG_NB2_NR;
                qg_nb2_pfs_set(&pb, B->E + j0 * D + dn, D * 4, nbn, (dpn + 15) / 16);
                nbn *= (dpn + 15) / 16;
            }
            /* A tiles that hold a pair j > i (all of them off the diagonal) */
            const int64_t ta_end = diag ? ((jb + QG_NB2_NR - 1) / QG_NB2_MR + 1 < ntiles_i
                                               ? (jb + QG_NB2_NR - 1) / QG_NB2_MR + 1
                                               : ntiles_i)
                                        : ntiles_i;
            const int64_t stepb = nbn / (ta_end > 0 ? ta_end : 1) + 1;
            for (int64_t ta = 0; ta < ta_end; ++ta) {
                const int64_t ia = ta * QG_NB2_MR;
                if (!last) {
                    qg_nb2_pfs_issue(&pa, step);
                } else {
                    for (int q = 0, n = (int)step; q < 4 && n > 0; ++q) {
                        const int64_t left = (pl[q].nrows - pl[q].r) * pl[q].lines - pl[q].l;
                        qg_nb2_pfs_issue(&pl[q], n);
                        n -= (int)(left < n ? left : n);
                    }
                }
                qg_nb2_pfs_issue(&pb, stepb);
                const int ma = (int)((ni - ia < QG_NB2_MR) ? ni - ia : QG_NB2_MR);
                qg_nb2_micro(dp, sc->packA + ia * QG_NB_PANEL, sc->packB, acc + ia * ldc + jb, ldc, ma, nb);
            }
        }
    }

    /* epilogue: one similarity per pair, fed to both rows; a vector compare with the rows'
     * current k-th values rejects most candidates without scalar work */
    const double *wb = B->w;
    const float *kthb = B->kth;
    for (int64_t i = 0; i < ni; ++i) {
        const int64_t li = i0 + i;
        const double wi = A->w[li];
        const __m256d wiv = _mm256_set1_pd(wi);
        const float *arow = acc + i * ldc;
        int64_t j = diag ? i + 1 : 0;
        for (; j + 8 <= nj; j += 8) {
            const int64_t lj = j0 + j;
            __m128 s0 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(arow + j)), _mm256_mul_pd(wiv, _mm256_loadu_pd(wb + lj))));
            __m128 s1 = _mm256_cvtpd_ps(
                _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(arow + j + 4)), _mm256_mul_pd(wiv, _mm256_loadu_pd(wb + lj + 4))));
            __m256 s = _mm256_set_m128(s1, s0);
            int m = _mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_set1_ps(A->kth[li]), _CMP_GE_OQ)) |
                    _mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_loadu_ps(kthb + lj), _CMP_GE_OQ));
            if (!m) continue;
            float sv[8];
            _mm256_storeu_ps(sv, s);
            while (m) {
                const int l = __builtin_ctz((unsigned)m);
                m &= m - 1;
                qg_nb2_push2(A, B, li, lj + l, sv[l]);
            }
        }
        for (; j < nj; ++j) {
            const int64_t lj = j0 + j;
            qg_nb2_push2(A, B, li, lj, (float)((double)arow[j] * (wi * wb[lj])));
        }
    }
}

