/*
 * qg_match_simd.h - the SIMD engine of the fused correlation + two-way max (qg_match.h), written
 * once and compiled per ISA file: qg_match_avx2.c (6 x 16 tile in ymm registers) and
 * qg_match_avx512.c (12 x 16 tile in zmm registers). No include guard: each of those files includes
 * it once, after defining
 *   QG_AI, MR (tile rows), NR (tile columns, 16: the epilogue works on two 8-lane halves),
 *   QG_FWD_ENGINE (the engine's name: a static function, the `pairs` of the file's record) and
 *   qg_ukernel(a, b, C, t): t[2i + h] = lanes 8h..8h+7 of row i of the MR x NR tile A_panel^T B_panel,
 *     every element one float32 FMA chain over c = 0..C-1 in order, starting from zero,
 * and including <immintrin.h>, <math.h> and <string.h>.
 *
 * Design (BLIS-like, specialised to the max epilogue):
 *   - Work unit = a block of `na` row maps (probes) x a block of `nb` column maps (galleries /
 *     candidate slots). The row maps are concatenated along locations and packed into MR-row
 *     panels [C][MR]; the column maps are concatenated and packed into NR-column panels [C][NR]
 *     (zero padded at the end of the block only). Concatenation fills the vectors when S is not a
 *     multiple of the tile (faces: S = 49), and the packed column block is sized to stay in L2.
 *     Restricted pairs: a row block is a run of consecutive probes that share their candidate list
 *     (the instances of a class in a graph-sampled batch), so the candidate maps are streamed from
 *     the class table once per run rather than once per probe.
 *   - Micro-kernel: the includer's MR x NR tile, Z[s, r] = fma chain over c in order (one rounding per
 *     channel). Every Z element is the same float32 FMA chain whatever its position in a tile, the
 *     tile shape, the unit layout or the thread count, so results are bit-identical for any n_threads
 *     and between the AVX2 and AVX-512 engines (they may differ from the portable path, which rounds
 *     the product and the sum separately).
 *   - Epilogue from registers: column maxima (over the tile's rows, per row owner) merged into a
 *     per-unit running array; row maxima kept as per-lane running vectors (value + index) per row
 *     until the column map ends, then reduced across lanes. Ties: strict '>' while indices increase
 *     and, across lanes, the smallest index among equal maxima, so the first index wins.
 *   - S < 16 (a panel may hold several column maps): the tile goes through a scalar epilogue.
 *   - Threads: units in a fixed order, schedule(dynamic); each pair belongs to exactly one unit.
 *     A thread keeps its packed row block while consecutive units share it.
 */

/* Packed column block budget (floats): about half of a 1 MiB L2. */
#define QG_COLS_BUDGET 131072
/* Rows per unit (row maps are concatenated until at least this many). */
#define QG_ROWS_LO 256
#define QG_ROWS_HI 512

static int64_t qg_rup(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
static int64_t qg_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* Shared, read-only description of the job plus the block sizes. */
typedef struct qg_geo {
    const qg_pairs_job *job;
    int64_t C, S, K, cs;
    int64_t na, nb;             /* maps per row block / column block */
    int64_t rows_max, cols_max; /* padded rows / columns of a full unit */
} qg_geo;

/* Per-thread scratch. */
typedef struct qg_scr {
    float *pa, *pb;   /* packed row block [rows_pad/MR][C][MR], column block [cols_pad/NR][C][NR] */
    float *cmax;      /* [na][cols_max] running column maxima */
    int32_t *cidx;    /* [na][cols_max] their first row index */
    float *rv;        /* [MR][nb] scalar epilogue (S < NR): row maxima */
    int32_t *ri;      /* [MR][nb] */
    float *z;         /* [MR][NR] tile for the scalar epilogue */
    float *tm;        /* [na][nb][2S] maxima of a unit (fused scores) */
    int64_t packed_i; /* first row map of the packed row block, -1 if none */
} qg_scr;

/* Where a unit writes: pair (a, b) of the unit at offset (base + a*rowmul + b) * stride. */
typedef struct qg_outs {
    float *mp, *mg;
    uint16_t *ap, *ag;
    int64_t base, rowmul, stride;
} qg_outs;

QG_AI int64_t qg_off(const qg_outs *o, int64_t a, int64_t b) { return (o->base + a * o->rowmul + b) * o->stride; }

/* ------------------------------------------------------------------ packing */

/* Rows [0, na*S) of maps i0.. (concatenated) -> panels [rows_pad/MR][C][MR], zero padded. */
static void qg_pack_rows(const qg_geo *g, int64_t i0, int64_t na, float *pa)
{
    const int64_t C = g->C, S = g->S, rows = na * S;
    const float *A = g->job->A;
    const int64_t np = (rows + MR - 1) / MR;
    for (int64_t p = 0; p < np; ++p) {
        const float *src[MR];
        for (int i = 0; i < MR; ++i) {
            const int64_t r = p * MR + i;
            src[i] = r < rows ? A + (i0 + r / S) * g->cs + r % S : NULL;
        }
        float *d = pa + p * C * MR;
        if (p * MR + MR <= rows) {
            for (int64_t c = 0; c < C; ++c)
                for (int i = 0; i < MR; ++i) d[c * MR + i] = src[i][c * S];
        } else {
            for (int64_t c = 0; c < C; ++c)
                for (int i = 0; i < MR; ++i) d[c * MR + i] = src[i] ? src[i][c * S] : 0.0f;
        }
    }
}

/* Column map b of a unit starting at pair slot j0 of row map i0. */
QG_AI const float *qg_col_map(const qg_geo *g, int64_t i0, int64_t j0, int64_t b)
{
    const qg_pairs_job *job = g->job;
    const int64_t id = job->cand ? job->cand[i0 * g->K + j0 + b] : j0 + b;
    return job->B + id * g->cs;
}

/* Columns [0, nb*S) of the unit's column maps -> panels [cols_pad/NR][C][NR], zero padded. Each map is
 * read once, row by row in memory order (maps often come from far away: candidate rows of a table). */
static void qg_pack_cols(const qg_geo *g, int64_t i0, int64_t j0, int64_t nb, float *pb)
{
    const int64_t C = g->C, S = g->S, cols = nb * S, cols_pad = qg_rup(cols, NR);
    for (int64_t b = 0; b < nb; ++b) {
        const float *src = qg_col_map(g, i0, j0, b);
        const int64_t col0 = b * S;
        for (int64_t c = 0; c < C; ++c) {
            const float *sr = src + c * S;
            int64_t r = 0;
            while (r < S) {
                const int64_t col = col0 + r, l = col % NR, len = qg_min(NR - l, S - r);
                float *d = pb + (col / NR) * C * NR + c * NR + l;
                if (len == NR) {
                    _mm256_store_ps(d, _mm256_loadu_ps(sr + r));
                    _mm256_store_ps(d + 8, _mm256_loadu_ps(sr + r + 8));
                } else {
                    for (int64_t k = 0; k < len; ++k) d[k] = sr[r + k];
                }
                r += len;
            }
        }
    }
    if (cols < cols_pad) {
        const int64_t p = cols / NR, l = cols % NR;
        for (int64_t c = 0; c < C; ++c)
            for (int64_t k = l; k < NR; ++k) pb[p * C * NR + c * NR + k] = 0.0f;
    }
}



/* ------------------------------------------------------------------ epilogue helpers */

QG_AI float qg_hmax(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Smallest idx lane among the lanes of v equal to mx (mx is one of them). */
QG_AI int32_t qg_first_idx(__m256 v, __m256i idx, float mx)
{
    const __m256 eq = _mm256_cmp_ps(v, _mm256_set1_ps(mx), _CMP_EQ_OQ);
    const __m256i c = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), idx, _mm256_castps_si256(eq));
    __m128i m = _mm_min_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return _mm_cvtsi128_si32(m);
}

/* Running per-lane maximum (with index): strict '>' keeps the earlier (smaller) index. */
QG_AI void qg_upd(__m256 *m, __m256i *mi, __m256 x, __m256i xi, const int want)
{
    if (want) {
        const __m256 gt = _mm256_cmp_ps(x, *m, _CMP_GT_OQ);
        *m = _mm256_blendv_ps(*m, x, gt);
        *mi = _mm256_blendv_epi8(*mi, xi, _mm256_castps_si256(gt));
    } else {
        *m = _mm256_max_ps(x, *m); /* x > m ? x : m */
    }
}

/* Lanes [lo, hi) of a 16-lane row: mask for half h. */
QG_AI __m256 qg_lanes(int64_t lo, int64_t hi, int h)
{
    const __m256i l = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * h));
    const __m256i ge = _mm256_cmpgt_epi32(l, _mm256_set1_epi32((int32_t)lo - 1));
    const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)hi), l);
    return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
}

/* Row facts of a row panel. */
typedef struct qg_rowinfo {
    int valid[MR];
    int64_t owner[MR]; /* row map within the unit */
    int32_t s[MR];     /* location within it */
    int simple;        /* all rows valid, one owner */
} qg_rowinfo;

static void qg_row_info(int64_t g0, int64_t rows, int64_t S, qg_rowinfo *ri)
{
    for (int i = 0; i < MR; ++i) {
        const int64_t r = g0 + i;
        ri->valid[i] = r < rows;
        ri->owner[i] = r / S;
        ri->s[i] = (int32_t)(r % S);
    }
    ri->simple = ri->valid[MR - 1] && ri->owner[0] == ri->owner[MR - 1];
}

/* Column maxima: fold the tile's rows into cmax/cidx[owner][c0 .. c0+16). Rows in increasing order
 * within and across panels, strict '>': the first row index wins. */
QG_AI void qg_col_epilogue(const __m256 t[2 * MR], const qg_rowinfo *ri, float *cmax, int32_t *cidx,
                           int64_t ldc, int64_t c0, const int want)
{
    if (ri->simple) {
        const int64_t o = ri->owner[0] * ldc + c0;
        for (int h = 0; h < 2; ++h) {
            __m256 m = t[h];
            __m256i mi = _mm256_set1_epi32(ri->s[0]);
            for (int i = 1; i < MR; ++i) qg_upd(&m, &mi, t[2 * i + h], _mm256_set1_epi32(ri->s[0] + i), want);
            __m256 old = _mm256_load_ps(cmax + o + 8 * h);
            __m256i oi = want ? _mm256_load_si256((const __m256i *)(cidx + o + 8 * h)) : _mm256_setzero_si256();
            qg_upd(&old, &oi, m, mi, want);
            _mm256_store_ps(cmax + o + 8 * h, old);
            if (want) _mm256_store_si256((__m256i *)(cidx + o + 8 * h), oi);
        }
        return;
    }
    for (int i = 0; i < MR; ++i) {
        if (!ri->valid[i]) continue;
        const int64_t o = ri->owner[i] * ldc + c0;
        for (int h = 0; h < 2; ++h) {
            __m256 old = _mm256_load_ps(cmax + o + 8 * h);
            __m256i oi = want ? _mm256_load_si256((const __m256i *)(cidx + o + 8 * h)) : _mm256_setzero_si256();
            qg_upd(&old, &oi, t[2 * i + h], _mm256_set1_epi32(ri->s[i]), want);
            _mm256_store_ps(cmax + o + 8 * h, old);
            if (want) _mm256_store_si256((__m256i *)(cidx + o + 8 * h), oi);
        }
    }
}

/* Row maxima of column map b are complete: reduce the lanes and write them; reset the state. */
QG_AI void qg_row_flush(__m256 rm[MR], __m256i rmi[MR], const qg_rowinfo *ri, const qg_outs *o, int64_t b,
                        const int want)
{
    for (int i = 0; i < MR; ++i) {
        if (ri->valid[i]) {
            const float mx = qg_hmax(rm[i]);
            const int64_t off = qg_off(o, ri->owner[i], b) + ri->s[i];
            o->mp[off] = mx;
            if (want) o->ap[off] = (uint16_t)qg_first_idx(rm[i], rmi[i], mx);
        }
        rm[i] = _mm256_set1_ps(-INFINITY);
        rmi[i] = _mm256_setzero_si256();
    }
}

/* ------------------------------------------------------------------ one row panel, S >= NR */

/* Row panel starting at unit row g0 against every column panel of the unit. */
QG_AI void qg_row_panel(const qg_geo *g, const float *pa, const float *pb, int64_t g0, int64_t rows,
                        int64_t cols, int64_t cols_pad, qg_scr *sc, const qg_outs *o, const int want)
{
    const int64_t C = g->C, S = g->S;
    qg_rowinfo ri;
    qg_row_info(g0, rows, S, &ri);
    __m256 rm[MR];
    __m256i rmi[MR];
    for (int i = 0; i < MR; ++i) {
        rm[i] = _mm256_set1_ps(-INFINITY);
        rmi[i] = _mm256_setzero_si256();
    }
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const int64_t ncp = cols_pad / NR;
    for (int64_t p = 0; p < ncp; ++p) {
        __m256 t[2 * MR];
        qg_ukernel(pa, pb + p * C * NR, C, t);
        const int64_t c0 = p * NR;
        qg_col_epilogue(t, &ri, sc->cmax, sc->cidx, cols_pad, c0, want);
        /* row direction: lanes [0, k) belong to column map blo, [k, nv) to blo + 1 */
        const int64_t blo = c0 / S, k = (blo + 1) * S - c0, nv = qg_min(NR, cols - c0);
        const __m256i x0 = _mm256_add_epi32(iota, _mm256_set1_epi32((int32_t)(c0 - blo * S)));
        const __m256i x1 = _mm256_add_epi32(x0, _mm256_set1_epi32(8));
        if (k >= NR) { /* whole tile in map blo (then nv == NR) */
            for (int i = 0; i < MR; ++i) {
                if (want) {
                    qg_upd(&rm[i], &rmi[i], t[2 * i], x0, 1);
                    qg_upd(&rm[i], &rmi[i], t[2 * i + 1], x1, 1);
                } else {
                    qg_upd(&rm[i], &rmi[i], _mm256_max_ps(t[2 * i + 1], t[2 * i]), x0, 0);
                }
            }
            if (k == NR) qg_row_flush(rm, rmi, &ri, o, blo, want);
        } else {
            const __m256 m0 = qg_lanes(0, k, 0), m1 = qg_lanes(0, k, 1);
            for (int i = 0; i < MR; ++i) {
                qg_upd(&rm[i], &rmi[i], _mm256_blendv_ps(ninf, t[2 * i], m0), x0, want);
                qg_upd(&rm[i], &rmi[i], _mm256_blendv_ps(ninf, t[2 * i + 1], m1), x1, want);
            }
            qg_row_flush(rm, rmi, &ri, o, blo, want);
            if (k < nv) { /* the next map starts in this panel (it cannot end here: S >= NR) */
                const __m256 n0 = qg_lanes(k, nv, 0), n1 = qg_lanes(k, nv, 1);
                const __m256i d = _mm256_set1_epi32((int32_t)S);
                for (int i = 0; i < MR; ++i) {
                    qg_upd(&rm[i], &rmi[i], _mm256_blendv_ps(ninf, t[2 * i], n0), _mm256_sub_epi32(x0, d), want);
                    qg_upd(&rm[i], &rmi[i], _mm256_blendv_ps(ninf, t[2 * i + 1], n1), _mm256_sub_epi32(x1, d),
                           want);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ one row panel, S < NR */

static void qg_row_panel_small(const qg_geo *g, const float *pa, const float *pb, int64_t g0, int64_t rows,
                               int64_t cols, int64_t cols_pad, int64_t nb, qg_scr *sc, const qg_outs *o,
                               int want)
{
    const int64_t C = g->C, S = g->S;
    qg_rowinfo ri;
    qg_row_info(g0, rows, S, &ri);
    for (int64_t i = 0; i < MR * nb; ++i) {
        sc->rv[i] = -INFINITY;
        sc->ri[i] = 0;
    }
    const int64_t ncp = cols_pad / NR;
    for (int64_t p = 0; p < ncp; ++p) {
        __m256 t[2 * MR];
        qg_ukernel(pa, pb + p * C * NR, C, t);
        for (int i = 0; i < 2 * MR; ++i) _mm256_storeu_ps(sc->z + 8 * i, t[i]);
        const int64_t c0 = p * NR, nv = qg_min(NR, cols - c0);
        for (int i = 0; i < MR; ++i) { /* rows in order, columns in order: strict '>' keeps the first */
            if (!ri.valid[i]) continue;
            float *cm = sc->cmax + ri.owner[i] * cols_pad + c0;
            int32_t *ci = sc->cidx + ri.owner[i] * cols_pad + c0;
            for (int64_t j = 0; j < nv; ++j) {
                const float v = sc->z[i * NR + j];
                const int64_t b = (c0 + j) / S;
                if (v > sc->rv[i * nb + b]) {
                    sc->rv[i * nb + b] = v;
                    sc->ri[i * nb + b] = (int32_t)((c0 + j) % S);
                }
                if (v > cm[j]) {
                    cm[j] = v;
                    ci[j] = ri.s[i];
                }
            }
        }
    }
    for (int i = 0; i < MR; ++i) {
        if (!ri.valid[i]) continue;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t off = qg_off(o, ri.owner[i], b) + ri.s[i];
            o->mp[off] = sc->rv[i * nb + b];
            if (want) o->ap[off] = (uint16_t)sc->ri[i * nb + b];
        }
    }
}

/* ------------------------------------------------------------------ one unit */

/* Row maps i0 .. i0+na-1 against pair slots j0 .. j0+nb-1. Returns nonzero if stopped. */
QG_AI int qg_unit(const qg_geo *g, qg_scr *sc, int64_t i0, int64_t na, int64_t j0, int64_t nb,
                  const qg_ctx *ctx, int *stop, const int want)
{
    const qg_pairs_job *job = g->job;
    const int64_t C = g->C, S = g->S, K = g->K;
    const int64_t rows = na * S, cols = nb * S;
    const int64_t rows_pad = qg_rup(rows, MR), cols_pad = qg_rup(cols, NR);
    if (sc->packed_i != i0) {
        qg_pack_rows(g, i0, na, sc->pa);
        sc->packed_i = i0;
    }
    qg_pack_cols(g, i0, j0, nb, sc->pb);
    for (int64_t i = 0; i < na * cols_pad; ++i) {
        sc->cmax[i] = -INFINITY;
        sc->cidx[i] = 0;
    }
    qg_outs o;
    if (job->w) {
        o = (qg_outs){sc->tm, sc->tm + S, NULL, NULL, 0, nb, 2 * S};
    } else {
        o = (qg_outs){job->mp, job->mg, job->ap, job->ag, i0 * K + j0, K, S};
    }
    const int64_t nrp = rows_pad / MR;
    for (int64_t p = 0; p < nrp; ++p) {
        const float *pa = sc->pa + p * C * MR;
        if (S >= NR)
            qg_row_panel(g, pa, sc->pb, p * MR, rows, cols, cols_pad, sc, &o, want);
        else
            qg_row_panel_small(g, pa, sc->pb, p * MR, rows, cols, cols_pad, nb, sc, &o, want);
        if ((p & 15) == 15) {
            qg_poll_block(ctx, stop);
            if (qg_stop_requested(stop)) return 1;
        }
    }
    for (int64_t a = 0; a < na; ++a) {
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t off = qg_off(&o, a, b);
            const float *cm = sc->cmax + a * cols_pad + b * S;
            memcpy(o.mg + off, cm, (size_t)S * sizeof(float));
            if (want) {
                const int32_t *ci = sc->cidx + a * cols_pad + b * S;
                for (int64_t r = 0; r < S; ++r) o.ag[off + r] = (uint16_t)ci[r];
            }
        }
    }
    if (job->w) {
        for (int64_t a = 0; a < na; ++a)
            for (int64_t b = 0; b < nb; ++b) {
                const float *t = sc->tm + (a * nb + b) * 2 * S;
                job->out[(i0 + a) * K + j0 + b] = qg_pair_score(job->w, job->bias, t, t + S, S);
            }
    }
    return 0;
}

static int qg_unit_idx(const qg_geo *g, qg_scr *sc, int64_t i0, int64_t na, int64_t j0, int64_t nb,
                       const qg_ctx *ctx, int *stop)
{
    return qg_unit(g, sc, i0, na, j0, nb, ctx, stop, 1);
}

static int qg_unit_val(const qg_geo *g, qg_scr *sc, int64_t i0, int64_t na, int64_t j0, int64_t nb,
                       const qg_ctx *ctx, int *stop)
{
    return qg_unit(g, sc, i0, na, j0, nb, ctx, stop, 0);
}

/* ------------------------------------------------------------------ driver */

/* Fraction of padding when n items are rounded up to a multiple of m. */
static double qg_waste(int64_t n, int64_t m) { return (double)(qg_rup(n, m) - n) / (double)n; }

static int QG_FWD_ENGINE(const qg_pairs_job *job, const qg_ctx *ctx)
{
    qg_geo g;
    g.job = job;
    g.C = job->C;
    g.S = job->S;
    g.K = job->K;
    g.cs = job->C * job->S;
    const int64_t S = g.S, C = g.C, nA = job->nA, K = job->K;
    const int want = job->ap != NULL;

    /* Row block: probes are concatenated (least padding for 256..512 rows). Restricted pairs have
     * their own column maps per probe, so a row block there is a run of consecutive probes with the
     * same candidate list (graph-sampled batches: the instances of a class), split evenly into blocks
     * of at most na: each candidate map is then read and packed once per block instead of once per
     * probe, and the micro-kernel sees more rows per packed column block. */
    int64_t na = 1;
    {
        const int64_t lo = (QG_ROWS_LO + S - 1) / S, hi = (QG_ROWS_HI + S - 1) / S;
        double best = 2.0;
        for (int64_t n = lo; n <= hi; ++n) {
            const double w = qg_waste(n * S, MR);
            if (w < best - 1e-12) {
                best = w;
                na = n;
            }
        }
        if (na > nA) na = nA;
        if (na < 1) na = 1;
    }
    /* Column block: as many maps as fit the L2 budget, least padding among the upper half. */
    int64_t nbmax = QG_COLS_BUDGET / g.cs;
    if (nbmax < 1) nbmax = 1;
    if (nbmax > K) nbmax = K;
    int64_t nb = nbmax;
    {
        double best = 2.0;
        for (int64_t n = nbmax; n >= (nbmax + 1) / 2; --n) {
            const double w = qg_waste(n * S, NR);
            if (w < best - 1e-12) {
                best = w;
                nb = n;
            }
        }
    }
    g.na = na;
    g.nb = nb;
    int64_t rows_max, cols_max, tmp;
    if (qg_mul_overflow(na, S, &rows_max) || qg_mul_overflow(nb, S, &cols_max)) return QG_EOVERFLOW;
    rows_max = qg_rup(rows_max, MR);
    cols_max = qg_rup(cols_max, NR);
    g.rows_max = rows_max;
    g.cols_max = cols_max;

    /* per-thread scratch, each piece a multiple of 16 floats (64 bytes) */
    int64_t l_pa, l_pb, l_cm, l_tm = 0;
    if (qg_mul_overflow(rows_max, C, &l_pa) || qg_mul_overflow(cols_max, C, &l_pb) ||
        qg_mul_overflow(na, cols_max, &l_cm) || qg_mul_overflow(na * nb, 2 * S, &tmp))
        return QG_EOVERFLOW;
    if (job->w) l_tm = tmp;
    const int64_t l_rv = MR * nb;
    l_pa = qg_rup(l_pa, 16);
    l_pb = qg_rup(l_pb, 16);
    l_cm = qg_rup(l_cm, 16);
    l_tm = qg_rup(l_tm, 16);
    const int64_t l_r = qg_rup(l_rv, 16), l_z = MR * NR;
    const int64_t per = l_pa + l_pb + 2 * l_cm + 2 * l_r + l_z + l_tm;

    /* row blocks: [first[i], first[i + 1]) */
    int64_t *first = (int64_t *)qg_malloc((nA + 1) * (int64_t)sizeof(int64_t));
    if (!first) return QG_ENOMEM;
    int64_t nrb = 0;
    if (!job->cand) {
        for (int64_t i = 0; i < nA; i += na) first[nrb++] = i;
    } else {
        const size_t row_bytes = (size_t)K * sizeof(int64_t);
        for (int64_t i = 0; i < nA;) {
            int64_t run = 1;
            while (i + run < nA && memcmp(job->cand + i * K, job->cand + (i + run) * K, row_bytes) == 0) ++run;
            const int64_t parts = (run + na - 1) / na, size = (run + parts - 1) / parts;
            for (int64_t j = 0; j < run; j += size) first[nrb++] = i + j;
            i += run;
        }
    }
    first[nrb] = nA;
    const int64_t ncb = (K + nb - 1) / nb;
    const int64_t units = nrb * ncb;
    const double macs = (double)nA * (double)K * (double)C * (double)S * (double)S;
    const int nt = qg_match_threads(ctx, macs, units);

    int64_t nbytes;
    if (qg_mul_overflow(per, (int64_t)nt * (int64_t)sizeof(float), &nbytes)) {
        qg_free(first);
        return QG_EOVERFLOW;
    }
    float *scratch = (float *)qg_malloc(nbytes);
    qg_scr *scr = (qg_scr *)qg_malloc((int64_t)nt * (int64_t)sizeof(qg_scr));
    if (!scratch || !scr) {
        qg_free(first);
        qg_free(scratch);
        qg_free(scr);
        return QG_ENOMEM;
    }
    for (int t = 0; t < nt; ++t) {
        float *base = scratch + (int64_t)t * per;
        qg_scr *s = &scr[t];
        s->pa = base;
        s->pb = s->pa + l_pa;
        s->cmax = s->pb + l_pb;
        s->cidx = (int32_t *)(s->cmax + l_cm);
        s->rv = (float *)(s->cidx + l_cm);
        s->ri = (int32_t *)(s->rv + l_r);
        s->z = (float *)(s->ri + l_r);
        s->tm = s->z + l_z;
        s->packed_i = -1;
    }

    int stop = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t u = 0; u < units; ++u) {
        if (qg_stop_requested(&stop)) continue;
        qg_scr *sc = &scr[qg_thread_num()];
        const int64_t i0 = first[u / ncb], j0 = (u % ncb) * nb;
        const int64_t nau = first[u / ncb + 1] - i0, nbu = qg_min(nb, K - j0);
        const int stopped = want ? qg_unit_idx(&g, sc, i0, nau, j0, nbu, ctx, &stop)
                                 : qg_unit_val(&g, sc, i0, nau, j0, nbu, ctx, &stop);
        if (!stopped) qg_poll_block(ctx, &stop);
    }
    qg_free(first);
    qg_free(scratch);
    qg_free(scr);
    return stop ? QG_EINTR : QG_OK;
}
