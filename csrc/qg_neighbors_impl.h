/*
 * qg_neighbors_impl.h - private to qg_neighbors*.c: the block-pair job shared by the driver
 * (qg_neighbors.c) and the ISA variants of the block-pair kernel (portable in qg_neighbors.c,
 * AVX2+FMA in qg_neighbors_avx2.c, AVX-512 in qg_neighbors_avx512.c, both from qg_neighbors_simd.h).
 */
#ifndef QG_NEIGHBORS_IMPL_H
#define QG_NEIGHBORS_IMPL_H
#include "qg_cpu.h"
#include "qg_neighbors.h"

/* D columns per panel: every variant sums a pair's products in float32 over one panel, then adds
 * the panel sums (in double on the portable path, in float32 on the AVX2 path; qg_neighbors.h). */
#define QG_NB_PANEL 256

/* One side of a block-pair job: a table of rows, its per-row prescales and weights, and the top-k
 * lists of its rows. The symmetric kernel's job has the same side twice. */
typedef struct qg_nb_side {
    const float *E;     /* [n, D] rows */
    int64_t n;
    int64_t id0;        /* global id of row 0: the id the other side's lists record (and tie on) */
    int64_t k;          /* list width of this side's rows */
    const float *scale; /* [n] power-of-two prescale */
    const double *w;    /* [n] 2^e / max(||x||, 1e-12) */
    float *tops;        /* [n, k] similarities, descending */
    int64_t *topi;      /* [n, k] global ids */
    float *kth;         /* [n] tops[i, k-1]: the admission threshold of row i, kept in sync */
} qg_nb_side;

/* sym: a and b are one table (qg_neighbors_topk_f32): block pairs bi <= bj, and on the diagonal
 * only the pairs j > i. Otherwise (qg_neighbors_cross_topk_f32) two disjoint row sets: every
 * (block of a, block of b) pair, every row pair, and nothing within one side. */
typedef struct qg_nb_job {
    int64_t D;
    int sym;
    qg_nb_side a, b;
    int64_t block; /* rows per block of this run: the variant's block or block_small (set by the driver) */
} qg_nb_job;

/* One block pair (block bi of side a, block bj of side b; bi <= bj when sym): every pair (i in bi,
 * j in bj), j > i on the symmetric diagonal, is computed once and pushed into the lists of rows i
 * and j. The caller guarantees that no other thread touches the lists of bi's and bj's rows
 * meanwhile. `scratch` holds `scratch_bytes` (64-byte aligned). */
typedef void (*qg_nb_match_fn)(const qg_nb_job *job, int64_t bi, int64_t bj, void *scratch);

/* Block sizes: `block` rows per block (the scratch is sized for it), or `block_small` when a table has too
 * few blocks of `block` rows to keep the threads busy (a match holds two blocks, so at most half the
 * blocks are in use at once). Larger blocks read each row from memory fewer times. A pair's value does
 * not depend on the block size (the panel split and the summation order do not), so neither the
 * choice nor the thread count it looks at changes any bit. */
typedef struct qg_nb_variant {
    int64_t block, block_small;
    int64_t scratch_bytes; /* per thread */
    qg_nb_match_fn match;
} qg_nb_variant;

#if QG_X86
extern const qg_nb_variant qg_nb_variant_avx2, qg_nb_variant_avx512;
double qg_nb_fma_probe_avx2(int64_t iters, float *sink);
double qg_nb_fma_probe_avx512(int64_t iters, float *sink);
#endif

/* Row list: s[0..k) descending, ties by ascending index; sentinel (-inf, INT64_MAX). The final
 * list is the k best of the candidates pushed under the total order (sim desc, index asc), so it
 * does not depend on the order of the pushes. kth mirrors s[k-1]. */
static inline void qg_nb_push(float *s, int64_t *ix, float *kth, int64_t k, float v, int64_t j)
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
    *kth = s[k - 1];
}

/* Argument and size checks of qg_neighbors_cross_topk_f32 (and its reference): QG_OK, QG_EINVAL or
 * QG_EOVERFLOW; *nka = na * ka and *nkb = nb * kb on success. */
static inline int qg_nb_cross_check(const float *A, int64_t na, int64_t a_id0, const float *B, int64_t nb,
                                    int64_t b_id0, int64_t D, int64_t ka, const int64_t *idx_a, int64_t kb,
                                    const int64_t *idx_b, int64_t *nka, int64_t *nkb)
{
    if (!A || !B || !idx_a || !idx_b || na < 1 || nb < 1 || D < 1 || ka < 1 || ka > nb || kb < 1 || kb > na ||
        a_id0 < 0 || b_id0 < 0)
        return QG_EINVAL;
    int64_t t;
    if (qg_mul_overflow(na, D, &t) || qg_mul_overflow(nb, D, &t) || qg_mul_overflow(na, ka, nka) ||
        qg_mul_overflow(nb, kb, nkb))
        return QG_EOVERFLOW;
    if (*nka > INT64_MAX / 8 || *nkb > INT64_MAX / 8 || na > INT64_MAX / 32 || nb > INT64_MAX / 32)
        return QG_EOVERFLOW;
    /* ids stay below the sentinel INT64_MAX */
    if (a_id0 > INT64_MAX - 1 - na || b_id0 > INT64_MAX - 1 - nb) return QG_EOVERFLOW;
    if (a_id0 < b_id0 + nb && b_id0 < a_id0 + na) return QG_EINVAL; /* id ranges overlap */
    return QG_OK;
}

#endif
