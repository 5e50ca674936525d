/*
 * qg_match_avx2.c - AVX2 + FMA engine of the fused correlation + two-way max (qg_match.h).
 * Compiled with -mavx2 -mfma (setup.py, x86-64 only) and chosen at run time through the table in
 * qg_match.c when ctx->isa >= QG_ISA_AVX2; elsewhere this file compiles to nothing.
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
 *   - Micro-kernel: MR x NR = 6 x 16 tile in 12 ymm accumulators, Z[s, r] = fma chain over
 *     c = 0..C-1 in order (vfmadd231ps, one rounding per channel), B vectors loaded, A broadcast.
 *     Every Z element is the same float32 FMA chain whatever its position in a tile, the unit
 *     layout or the thread count, so results are bit-identical for any n_threads on this path
 *     (they may differ from the portable path, which rounds the product and the sum separately).
 *   - Epilogue from registers: column maxima (over the tile's rows, per row owner) merged into a
 *     per-unit running array; row maxima kept as per-lane running vectors (value + index) per row
 *     until the column map ends, then reduced across lanes. Ties: strict '>' while indices increase
 *     and, across lanes, the smallest index among equal maxima, so the first index wins.
 *   - S < 16 (a panel may hold several column maps): the tile goes through a scalar epilogue.
 *   - Threads: units in a fixed order, schedule(dynamic); each pair belongs to exactly one unit.
 *     A thread keeps its packed row block while consecutive units share it.
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

/* ------------------------------------------------------------------ micro-kernel */

/* t[2i + h] = lanes 8h..8h+7 of row i of the 6 x 16 tile A_panel^T B_panel. */
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

int qg_match_pairs_avx2(const qg_pairs_job *job, const qg_ctx *ctx)
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
 *     (~8% less time on the re-ID and faces class sides; a row's sums do not depend on when it runs).
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

/* acc[0..Cp) (= 0 if fresh) += sum_k t[k].w * t[k].src[0..Cp), in k order, double accumulators in
 * registers. */
static void qg_bwd_accumulate(double *acc, const qg_term *t, int64_t n, int64_t Cp, int fresh)
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
        _mm256_storeu_pd(acc + c0, a0), _mm256_storeu_pd(acc + c0 + 4, a1);
        _mm256_storeu_pd(acc + c0 + 8, a2), _mm256_storeu_pd(acc + c0 + 12, a3);
        _mm256_storeu_pd(acc + c0 + 16, a4), _mm256_storeu_pd(acc + c0 + 20, a5);
        _mm256_storeu_pd(acc + c0 + 24, a6), _mm256_storeu_pd(acc + c0 + 28, a7);
    }
    for (; c0 < Cp; c0 += 8) { /* Cp is a multiple of 8 */
        __m256d a0 = qg_bwd_start(acc, c0, fresh), a1 = qg_bwd_start(acc, c0 + 4, fresh);
        for (int64_t k = 0; k < n; ++k) {
            const __m256d w = _mm256_set1_pd(t[k].w);
            const float *x = t[k].src + c0;
            a0 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x)), a0);
            a1 = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm_loadu_ps(x + 4)), a1);
        }
        _mm256_storeu_pd(acc + c0, a0), _mm256_storeu_pd(acc + c0 + 4, a1);
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

/* Pairs [i0, i1) of row t into acc (the row's accumulator): bucket the terms by output location
 * (stable counting sort: pair order, then probe- before gallery-direction terms), then sum each
 * location's terms with register accumulators. far(i) is the transposed far map of pair i. */
static void qg_bwd_row_chunk(const qg_bwd_job *job, int64_t t, int64_t i0, int64_t i1, const float *const *farp,
                             double *acc, unsigned char *seen, const qg_bwd_scr *sc, int64_t Cp)
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
    for (int64_t s = 0; s < S; ++s)
        if (start[s + 1] > start[s]) {
            qg_bwd_accumulate(acc + s * Cp, terms + start[s], start[s + 1] - start[s], Cp, !seen[s]);
            seen[s] = 1;
        }
}

/* Round row t's accumulator once and transpose it back [S][Cp] -> [C][S] into the output (in place over
 * acc: the floats of row s end before the doubles of row s start). */
static void qg_bwd_row_store(const qg_bwd_job *job, int64_t t, double *acc, const unsigned char *seen, int64_t Cp)
{
    const int64_t C = job->C, S = job->S;
    const int64_t row = job->rowid ? job->rowid[t] : t;
    float *o = job->out + row * C * S;
    float *accf = (float *)acc;
    for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < Cp; c += 4)
            _mm_storeu_ps(accf + s * Cp + c,
                          seen[s] ? _mm256_cvtpd_ps(_mm256_loadu_pd(acc + s * Cp + c)) : _mm_setzero_ps());
    const int64_t C8 = C & ~(int64_t)7, S8 = S & ~(int64_t)7;
    for (int64_t c0 = 0; c0 < C8; c0 += 8)
        for (int64_t s0 = 0; s0 < S8; s0 += 8) qg_tr8x8(accf + s0 * Cp + c0, Cp, o + c0 * S + s0, S);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t s = (c < C8 ? S8 : 0); s < S; ++s) o[c * S + s] = accf[s * Cp + c];
    if (job->ytab) /* the row is still in L2: its normalisation backward now, not in a pass over memory */
        for (int64_t s0 = 0; s0 < S; s0 += QG_NORM_SB)
            qg_norm_bwd_item_avx2(o + s0, job->ytab + job->yrow[row] * C * S + s0, 1, job->ynorm + row * S + s0,
                                  qg_min(QG_NORM_SB, S - s0), C, S, o + s0);
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
                    qg_bwd_row_chunk(job, t0 + r, i0, i1, farp, sc.acc + r * S * Cp, sc.seen + r * S, &sc, Cp);
            }
            for (int64_t r = 0; r < nr; ++r) qg_bwd_row_store(job, t0 + r, sc.acc + r * S * Cp, sc.seen + r * S, Cp);
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
 * run over c in order with a separate multiply and add (products of two floats are exact in double,
 * and this file is compiled in ISO C mode, so nothing is contracted into an FMA); sqrt and the
 * divisions are correctly rounded: the same bits as the portable items.
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
            const __m256 y = qg_norm_y8(yr + s, fden + s, raw), g = _mm256_loadu_ps(gr + s);
            const __m256d lo = _mm256_mul_pd(qg_lo_pd(y), qg_lo_pd(g)), hi = _mm256_mul_pd(qg_hi_pd(y), qg_hi_pd(g));
            _mm256_storeu_pd(dot + s, _mm256_add_pd(_mm256_loadu_pd(dot + s), lo));
            _mm256_storeu_pd(dot + s + 4, _mm256_add_pd(_mm256_loadu_pd(dot + s + 4), hi));
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
            const __m256 y = qg_norm_y8(yr + s, fden + s, raw), g = _mm256_loadu_ps(gr + s);
            const __m128 lo = qg_norm_gx4(qg_lo_pd(g), qg_lo_pd(y), dot + s, inv + s);
            const __m128 hi = qg_norm_gx4(qg_hi_pd(g), qg_hi_pd(y), dot + s + 4, inv + s + 4);
            _mm256_storeu_ps(xr + s, _mm256_set_m128(hi, lo));
        }
        for (; s < n; ++s) {
            const float y = raw ? yr[s] / fden[s] : yr[s];
            xr[s] = (float)(((double)gr[s] - (double)y * dot[s]) * inv[s]);
        }
    }
}

#endif /* __AVX2__ && __FMA__ */
