/*
 * qg_match_portable.c - the portable engines of the match family (qg_match_impl.h): plain C11, used below
 * AVX2 and off x86-64. Its record qg_match_kernels_portable is what qg_match.c picks when ctx->isa is
 * QG_ISA_PORTABLE (or the CPU has nothing better).
 *
 * Forward (qg_match_pairs_portable):
 *   - Each pair (probe map A, gallery map B, both [C, S]) is computed by one thread. The thread
 *     packs A into MR-wide panels [ceil(S/MR)][C][MR] and B into NR-wide panels [ceil(S/NR)][C][NR]
 *     (zero padded) in its own scratch, so the micro-kernel streams contiguous memory.
 *   - The micro-kernel computes one MR x NR tile of Z = A^T B, summing over c = 0..C-1 in order
 *     in float32 (separate multiply and add: the build uses ISO C, so no FMA contraction).
 *     Every Z element is therefore the same sequential float32 sum whatever the tiling, the
 *     thread count or the vector width of this engine.
 *   - The tile epilogue folds the tile into the running maxima of both directions, replacing
 *     only on strictly greater values, visiting indices in increasing order (gallery panels in
 *     the outer loop, probe panels in the inner loop), so ties keep the first index.
 *   - Only the MR x NR tile of Z ever exists.
 * Backward (qg_match_bwd_portable): gather/scatter through the recorded argmax. Work items are (map,
 * channel block), or whole maps when the rows' normalisation backward is fused in (job->ytab); each output
 * element is owned by one item and summed in double over pairs in a fixed order.
 * Normalisation items: the reference operations of qg_match_impl.h, one location at a time.
 */
#include "qg_match_impl.h"

#include <math.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define QG_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define QG_ALWAYS_INLINE static inline
#endif

/* Micro-tile: MR probe locations x NR gallery locations (NR depends on the SIMD path). */
#define QG_MR 6

/* Floats of scratch per packed map, rounded up to a 64-byte multiple. */
static int64_t qg_round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

static int64_t qg_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ normalisation items */

/* One work item of the normalisation forward: n <= QG_NORM_SB locations of one map, portable C (the AVX2 item in
 * qg_match_avx2.c does the same operations, four doubles at a time, so the bits are the same). */
static void qg_norm_fwd_item(const float *xm, int64_t n, int64_t C, int64_t S, float *ym, float *nm)
{
    double acc[QG_NORM_SB];
    float den[QG_NORM_SB];
    for (int64_t s = 0; s < n; ++s) acc[s] = 0.0;
    for (int64_t c = 0; c < C; ++c) {
        const float *xr = xm + c * S;
        for (int64_t s = 0; s < n; ++s) acc[s] += (double)xr[s] * (double)xr[s];
    }
    qg_norm_fwd_den(acc, 0, n, nm, den);
    for (int64_t c = 0; c < C; ++c) {
        const float *xr = xm + c * S;
        float *yr = ym + c * S;
        for (int64_t s = 0; s < n; ++s) yr[s] = xr[s] / den[s];
    }
    qg_norm_fwd_overflow(xm, acc, nm, n, C, S, ym);
}

/* One work item of the normalisation backward (n <= QG_NORM_SB locations of one map): y is given (raw == 0) or
 * rebuilt as x / max(norm, eps), the very float32 division of the forward (raw == 1), so both give
 * the same bits. gym may alias gxm: every element is read before it is written. */
static void qg_norm_bwd_item(const float *gym, const float *ym, int raw, const float *nm, int64_t n, int64_t C,
                             int64_t S, float *gxm)
{
    double dot[QG_NORM_SB];
    double inv[QG_NORM_SB];
    float fden[QG_NORM_SB];
    for (int64_t s = 0; s < n; ++s) dot[s] = 0.0;
    qg_norm_bwd_fden(nm, n, fden);
    for (int64_t c = 0; c < C; ++c) {
        const float *gr = gym + c * S;
        const float *yr = ym + c * S;
        if (raw)
            for (int64_t s = 0; s < n; ++s) dot[s] += (double)(yr[s] / fden[s]) * (double)gr[s];
        else
            for (int64_t s = 0; s < n; ++s) dot[s] += (double)yr[s] * (double)gr[s];
    }
    qg_norm_bwd_inv(nm, n, dot, inv);
    for (int64_t c = 0; c < C; ++c) {
        const float *gr = gym + c * S;
        const float *yr = ym + c * S;
        float *xr = gxm + c * S;
        if (raw)
            for (int64_t s = 0; s < n; ++s)
                xr[s] = (float)(((double)gr[s] - (double)(yr[s] / fden[s]) * dot[s]) * inv[s]);
        else
            for (int64_t s = 0; s < n; ++s) xr[s] = (float)(((double)gr[s] - (double)yr[s] * dot[s]) * inv[s]);
    }
}

/* ------------------------------------------------------------------ forward: packing */

/* A [C, S] -> panels [ceil(S/MR)][C][MR], zero padded. */
static void qg_pack_a(const float *A, int64_t C, int64_t S, float *pa)
{
    const int64_t np = (S + QG_MR - 1) / QG_MR;
    for (int64_t p = 0; p < np; ++p) {
        const int64_t s0 = p * QG_MR;
        const int64_t mv = qg_min64(QG_MR, S - s0);
        float *dst = pa + p * C * QG_MR;
        for (int64_t c = 0; c < C; ++c) {
            const float *src = A + c * S + s0;
            float *d = dst + c * QG_MR;
            int64_t i = 0;
            for (; i < mv; ++i) d[i] = src[i];
            for (; i < QG_MR; ++i) d[i] = 0.0f;
        }
    }
}

/* Width of the last gallery panel: nr/2 when the remainder fits in it (less padding work), else nr. */
static int64_t qg_last_width(int64_t S, int64_t nr)
{
    const int64_t rem = S % nr;
    return (rem > 0 && rem <= nr / 2) ? nr / 2 : nr;
}

/* B [C, S] -> panels [ceil(S/nr)][C][width], zero padded; width = nr except for the last panel,
 * which is qg_last_width(S, nr) wide. Panel p starts at p * C * nr. */
static void qg_pack_b(const float *B, int64_t C, int64_t S, int64_t nr, float *pb)
{
    const int64_t np = (S + nr - 1) / nr;
    for (int64_t p = 0; p < np; ++p) {
        const int64_t r0 = p * nr;
        const int64_t nv = qg_min64(nr, S - r0);
        const int64_t wd = p == np - 1 ? qg_last_width(S, nr) : nr;
        float *dst = pb + p * C * nr;
        for (int64_t c = 0; c < C; ++c) {
            const float *src = B + c * S + r0;
            float *d = dst + c * wd;
            int64_t j = 0;
            for (; j < nv; ++j) d[j] = src[j];
            for (; j < wd; ++j) d[j] = 0.0f;
        }
    }
}

/* ------------------------------------------------------------------ forward: tile epilogue */

/* Fold a tile z [MR][nr] (rows s0.., cols r0.., mv x nv valid) into the running maxima:
 * strict '>' in increasing index order keeps the first argmax. */
QG_ALWAYS_INLINE void qg_epilogue(const float *z, int64_t nr, int64_t s0, int64_t r0, int64_t mv, int64_t nv,
                                  float *mp, float *mg, uint16_t *ap, uint16_t *ag, const int want)
{
    for (int64_t i = 0; i < mv; ++i) {
        const float *zi = z + i * nr;
        float best = mp[s0 + i];
        int64_t bj = -1;
        for (int64_t j = 0; j < nv; ++j) {
            if (zi[j] > best) {
                best = zi[j];
                bj = j;
            }
        }
        if (bj >= 0) {
            mp[s0 + i] = best;
            if (want) ap[s0 + i] = (uint16_t)(r0 + bj);
        }
    }
    for (int64_t j = 0; j < nv; ++j) {
        float best = mg[r0 + j];
        int64_t bi = -1;
        for (int64_t i = 0; i < mv; ++i) {
            if (z[i * nr + j] > best) {
                best = z[i * nr + j];
                bi = i;
            }
        }
        if (bi >= 0) {
            mg[r0 + j] = best;
            if (want) ag[r0 + j] = (uint16_t)(s0 + bi);
        }
    }
}

static void qg_init_maxima(int64_t S, float *mp, float *mg, uint16_t *ap, uint16_t *ag, int want)
{
    for (int64_t s = 0; s < S; ++s) {
        mp[s] = -INFINITY;
        mg[s] = -INFINITY;
    }
    if (want) {
        memset(ap, 0, (size_t)S * sizeof(uint16_t));
        memset(ag, 0, (size_t)S * sizeof(uint16_t));
    }
}

/*
 * QG_DEFINE_PAIR(SUF, ATTR, VT, NV, NR) defines
 *   static int qg_pair_SUF(pa, pb, C, S, mp, mg, ap, ag, want, ctx, stop)
 * computing the maxima of one pair from packed maps (A in MR panels, B in NR panels).
 * The micro-kernel keeps an MR x NR tile in MR*NV vectors of type VT (NR = NV * lanes), summing
 * over c in order with a separate multiply and add, so every SIMD width gives the same bits.
 * Polls between gallery panels; returns nonzero if stopped (outputs then incomplete).
 */
#define QG_DEFINE_KERNEL(NAME, ATTR, VT, VI, NV, NR, OPS)                                                 \
    ATTR QG_ALWAYS_INLINE void NAME##_acc(const float *restrict a, const float *restrict b, int64_t C,   \
                                          VT t[QG_MR][NV])                                               \
    {                                                                                                    \
        const VT zero = {0};                                                                             \
        for (int i = 0; i < QG_MR; ++i)                                                                  \
            for (int v = 0; v < (NV); ++v) t[i][v] = zero;                                               \
        for (int64_t c = 0; c < C; ++c) {                                                                \
            const VT *bc = (const VT *)(b + c * (NR)); /* panels are vector aligned */                   \
            VT bv[NV];                                                                                   \
            for (int v = 0; v < (NV); ++v) bv[v] = bc[v];                                                \
            const float *ac = a + c * QG_MR;                                                             \
            for (int i = 0; i < QG_MR; ++i) {                                                            \
                const float ai = ac[i]; /* scalar op vector broadcasts */                                \
                for (int v = 0; v < (NV); ++v) t[i][v] += ai * bv[v];                                    \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    /* z [MR][NR] = the tile */                                                                          \
    ATTR QG_ALWAYS_INLINE void NAME(const float *restrict a, const float *restrict b, int64_t C,         \
                                    float *restrict z)                                                  \
    {                                                                                                    \
        VT t[QG_MR][NV];                                                                                 \
        NAME##_acc(a, b, C, t);                                                                          \
        memcpy(z, t, sizeof(t));                                                                         \
    }                                                                                                    \
    /* Full tile, values only: fold the tile into mp[0..MR) and mg[0..NR) from registers. */            \
    ATTR QG_ALWAYS_INLINE void NAME##_max(const float *restrict a, const float *restrict b, int64_t C,   \
                                          float *restrict mp, float *restrict mg)                        \
    {                                                                                                    \
        VT t[QG_MR][NV];                                                                                 \
        NAME##_acc(a, b, C, t);                                                                          \
        for (int v = 0; v < (NV); ++v) {                                                                 \
            VT cm = t[0][v], old;                                                                        \
            for (int i = 1; i < QG_MR; ++i) cm = OPS##_MAX(t[i][v], cm);                                      \
            memcpy(&old, mg + v * (int)(sizeof(VT) / sizeof(float)), sizeof(VT));                        \
            old = OPS##_MAX(cm, old);                                                                         \
            memcpy(mg + v * (int)(sizeof(VT) / sizeof(float)), &old, sizeof(VT));                        \
        }                                                                                                \
        for (int i = 0; i < QG_MR; ++i) {                                                                \
            VT rm = t[i][0];                                                                             \
            for (int v = 1; v < (NV); ++v) rm = OPS##_MAX(t[i][v], rm);                                       \
            float lanes[sizeof(VT) / sizeof(float)];                                                     \
            memcpy(lanes, &rm, sizeof(VT));                                                              \
            float x = mp[i];                                                                             \
            for (int l = 0; l < (int)(sizeof(VT) / sizeof(float)); ++l)                                  \
                if (lanes[l] > x) x = lanes[l];                                                          \
            mp[i] = x;                                                                                   \
        }                                                                                                \
    }                                                                                                    \
    /* Full tile with argmax: the tile's column maxima (first row on ties) by vector selects, then a     \
     * scalar merge per column; a row's first argmax is searched only when its maximum improves. */    \
    ATTR QG_ALWAYS_INLINE void NAME##_maxidx(const float *restrict a, const float *restrict b, int64_t C, \
                                             int64_t s0, int64_t r0, float *restrict mp,                 \
                                             float *restrict mg, uint16_t *restrict ap,                  \
                                             uint16_t *restrict ag)                                      \
    {                                                                                                    \
        enum { L = (int)(sizeof(VT) / sizeof(float)) };                                                  \
        VT t[QG_MR][NV];                                                                                 \
        NAME##_acc(a, b, C, t);                                                                          \
        for (int v = 0; v < (NV); ++v) {                                                                 \
            VT cm = t[0][v];                                                                             \
            VI ci = {0};                                                                                 \
            for (int i = 1; i < QG_MR; ++i) {                                                            \
                const VI mk = OPS##_GT(t[i][v], cm);                                                     \
                cm = OPS##_SELF(mk, t[i][v], cm);                                                        \
                ci = OPS##_SELI(mk, ci - ci + i, ci);                                                    \
            }                                                                                            \
            float lanes[L];                                                                              \
            int32_t row[L];                                                                              \
            memcpy(lanes, &cm, sizeof(VT));                                                              \
            memcpy(row, &ci, sizeof(VI));                                                                \
            for (int l = 0; l < L; ++l) {                                                                \
                const int64_t r = r0 + v * L + l;                                                        \
                if (lanes[l] > mg[r]) {                                                                  \
                    mg[r] = lanes[l];                                                                    \
                    ag[r] = (uint16_t)(s0 + row[l]);                                                     \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < QG_MR; ++i) {                                                                \
            VT rm = t[i][0];                                                                             \
            for (int v = 1; v < (NV); ++v) rm = OPS##_MAX(t[i][v], rm);                                       \
            float lanes[L];                                                                              \
            memcpy(lanes, &rm, sizeof(VT));                                                              \
            float x = lanes[0];                                                                          \
            for (int l = 1; l < L; ++l)                                                                  \
                if (lanes[l] > x) x = lanes[l];                                                          \
            if (x > mp[s0 + i]) {                                                                        \
                float zi[(NV) * L];                                                                      \
                memcpy(zi, t[i], sizeof(zi));                                                            \
                int j = 0;                                                                               \
                while (j < (NV) * L - 1 && !(zi[j] == x)) ++j; /* x is one of them: the first */        \
                mp[s0 + i] = x;                                                                          \
                ap[s0 + i] = (uint16_t)(r0 + j);                                                         \
            }                                                                                            \
        }                                                                                                \
    }

/* NV vectors per tile row, NR = NV * lanes; a half-width kernel (NV/2 vectors) serves the last
 * gallery panel when the remainder fits in it. NV must be even. */
#define QG_DEFINE_PAIR(SUF, ATTR, VT, VI, NV, NR, OPS)                                                  \
    QG_DEFINE_KERNEL(qg_kernel_##SUF, ATTR, VT, VI, NV, NR, OPS)                                         \
    QG_DEFINE_KERNEL(qg_kernel_half_##SUF, ATTR, VT, VI, (NV) / 2, (NR) / 2, OPS)                        \
    ATTR QG_ALWAYS_INLINE int qg_pair_body_##SUF(const float *pa, const float *pb, int64_t C, int64_t S, \
                                                 float *mp, float *mg, uint16_t *ap, uint16_t *ag,      \
                                                 const int want, const qg_ctx *ctx, int *stop)          \
    {                                                                                                    \
        const int64_t nsp = (S + QG_MR - 1) / QG_MR;                                                     \
        const int64_t nrp = (S + (NR)-1) / (NR);                                                         \
        float z[QG_MR * (NR)];                                                                           \
        qg_init_maxima(S, mp, mg, ap, ag, want);                                                         \
        for (int64_t rp = 0; rp < nrp; ++rp) {                                                           \
            const int64_t r0 = rp * (NR);                                                                \
            const int64_t nv = qg_min64((NR), S - r0);                                                   \
            const float *b = pb + rp * C * (NR);                                                         \
            for (int64_t sp = 0; sp < nsp; ++sp) {                                                       \
                const int64_t s0 = sp * QG_MR;                                                           \
                const int64_t mv = qg_min64(QG_MR, S - s0);                                              \
                if (mv == QG_MR && nv == (NR)) {                                                         \
                    if (want)                                                                            \
                        qg_kernel_##SUF##_maxidx(pa + sp * C * QG_MR, b, C, s0, r0, mp, mg, ap, ag);     \
                    else                                                                                 \
                        qg_kernel_##SUF##_max(pa + sp * C * QG_MR, b, C, mp + s0, mg + r0);              \
                } else if (nv > (NR) / 2) {                                                              \
                    qg_kernel_##SUF(pa + sp * C * QG_MR, b, C, z);                                       \
                    if (mv == QG_MR && nv == (NR))                                                       \
                        qg_epilogue(z, (NR), s0, r0, QG_MR, (NR), mp, mg, ap, ag, want);                 \
                    else                                                                                 \
                        qg_epilogue(z, (NR), s0, r0, mv, nv, mp, mg, ap, ag, want);                      \
                } else { /* last panel, half width (qg_pack_b packed it so) */                           \
                    qg_kernel_half_##SUF(pa + sp * C * QG_MR, b, C, z);                                  \
                    qg_epilogue(z, (NR) / 2, s0, r0, mv, nv, mp, mg, ap, ag, want);                      \
                }                                                                                        \
            }                                                                                            \
            if (nrp > 1) {                                                                               \
                qg_poll_block(ctx, stop);                                                                \
                if (qg_stop_requested(stop)) return 1;                                                   \
            }                                                                                            \
        }                                                                                                \
        return 0;                                                                                        \
    }                                                                                                    \
    ATTR static int qg_pair_##SUF(const float *pa, const float *pb, int64_t C, int64_t S, float *mp,     \
                                  float *mg, uint16_t *ap, uint16_t *ag, int want, const qg_ctx *ctx,    \
                                  int *stop)                                                             \
    {                                                                                                    \
        if (want) return qg_pair_body_##SUF(pa, pb, C, S, mp, mg, ap, ag, 1, ctx, stop);                 \
        return qg_pair_body_##SUF(pa, pb, C, S, mp, mg, NULL, NULL, 0, ctx, stop);                       \
    }

/* Per-type element operations, OPS##_X: GT(a, b) = all-ones mask where a > b; SELF / SELI select
 * floats / ints by a mask; MAX(a, b) = a > b ? a : b (b kept on ties and NaN). */
#define QG_S_GT(a, b) ((a) > (b) ? -1 : 0)
#define QG_S_SELF(m, a, b) ((m) ? (a) : (b))
#define QG_S_SELI(m, a, b) ((m) ? (a) : (b))
#define QG_S_MAX(a, b) ((a) > (b) ? (a) : (b))

#if (defined(__GNUC__) || defined(__clang__)) && !defined(QG_NO_VECTOR_EXT)
/* GCC/Clang generic vectors (no intrinsics): a comparison gives an all-ones / zero int mask. */
#define QG_VSELI(m, a, b) (((m) & (a)) | (~(m) & (b)))
/* 16-byte vectors, 6 x 8 tile = 12 accumulators. */
typedef float qg_v4f __attribute__((vector_size(16)));
typedef int32_t qg_v4i __attribute__((vector_size(16)));
#define QG_V4_GT(a, b) ((qg_v4i)((a) > (b)))
#define QG_V4_SELF(m, a, b) ((qg_v4f)QG_VSELI((m), (qg_v4i)(a), (qg_v4i)(b)))
#define QG_V4_SELI(m, a, b) QG_VSELI((m), (a), (b))
#define QG_V4_MAX(a, b) QG_V4_SELF(QG_V4_GT((a), (b)), (a), (b))
#define QG_NR_BASE 8
QG_DEFINE_PAIR(base, , qg_v4f, qg_v4i, 2, 8, QG_V4)
#else
/* Portable scalar fallback: "vectors" of one float. */
#define QG_NR_BASE 8
QG_DEFINE_PAIR(base, , float, int32_t, 8, 8, QG_S)
#endif

/* ------------------------------------------------------------------ forward: pair drivers */

/* Portable engine: each pair computed by one thread from its packed maps (A in MR panels, packed once
 * per block of pairs sharing the probe; B in QG_NR_BASE panels). */
static int qg_match_pairs_portable(const qg_pairs_job *job, const qg_ctx *ctx)
{
    const int64_t C = job->C, S = job->S, K = job->K, cs = C * S, npairs = job->nA * K;
    const int64_t nsp = (S + QG_MR - 1) / QG_MR;
    const int64_t nr = QG_NR_BASE;
    const int64_t nrp = (S + nr - 1) / nr;
    int64_t la, lb;
    if (qg_mul_overflow(nsp * QG_MR, C, &la) || qg_mul_overflow(nrp * nr, C, &lb)) return QG_EOVERFLOW;
    la = qg_round16(la);
    lb = qg_round16(lb);
    const int64_t lm = job->w ? qg_round16(2 * S) : 0; /* scores: mp, mg scratch */
    const int64_t per = la + lb + lm;

    /* Blocks of consecutive pairs share the probe map; small enough to balance the threads. */
    const double macs = (double)npairs * (double)C * (double)S * (double)S;
    int nt = qg_match_threads(ctx, macs, npairs);
    int64_t bs = npairs / ((int64_t)nt * 8);
    if (bs < 1) bs = 1;
    if (bs > K) bs = K;
    if (bs > 64) bs = 64;
    const int64_t nblk = (npairs + bs - 1) / bs;
    nt = qg_match_threads(ctx, macs, nblk);

    int64_t nbytes;
    if (qg_mul_overflow(per, (int64_t)nt * (int64_t)sizeof(float), &nbytes)) return QG_EOVERFLOW;
    float *scratch = (float *)qg_malloc(nbytes);
    if (!scratch) return QG_ENOMEM;

    int stop = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        float *pa = scratch + (int64_t)qg_thread_num() * per;
        float *pb = pa + la;
        float *tm = pb + lb;
        int64_t packed_a = -1;
        const int64_t q1 = qg_min64(npairs, (blk + 1) * bs);
        for (int64_t q = blk * bs; q < q1; ++q) {
            const int64_t ia = q / K;
            const int64_t ib = job->cand ? job->cand[q] : q % K;
            if (ia != packed_a) {
                qg_pack_a(job->A + ia * cs, C, S, pa);
                packed_a = ia;
            }
            qg_pack_b(job->B + ib * cs, C, S, nr, pb);
            int stopped;
            if (job->w) {
                stopped = qg_pair_base(pa, pb, C, S, tm, tm + S, NULL, NULL, 0, ctx, &stop);
                if (!stopped) job->out[q] = qg_pair_score(job->w, job->bias, tm, tm + S, S);
            } else if (job->ap) {
                stopped = qg_pair_base(pa, pb, C, S, job->mp + q * S, job->mg + q * S, job->ap + q * S,
                                       job->ag + q * S, 1, ctx, &stop);
            } else {
                stopped = qg_pair_base(pa, pb, C, S, job->mp + q * S, job->mg + q * S, NULL, NULL, 0, ctx, &stop);
            }
            if (stopped) break;
        }
        qg_poll_block(ctx, &stop);
    }
    qg_free(scratch);
    return stop ? QG_EINTR : QG_OK;
}

/* ------------------------------------------------------------------ backward */

/* Double accumulators per work item: CB channels x S locations, CB*S <= QG_BWD_ELEMS (or CB = 1). */
#define QG_BWD_ELEMS 8192

/* acc[c, :] += gather/scatter of one pair for channels c of `other` (the map on the far side).
 * side 0 (gradient of the probe-side map M, other = gallery map O):
 *   acc[c, s] += gmp[s] * O[c, ap[s]];     acc[c, ag[r]] += gmg[r] * O[c, r]
 * side 1 (gradient of the gallery-side map, other = probe map O):
 *   acc[c, ap[s]] += gmp[s] * O[c, s];     acc[c, r] += gmg[r] * O[c, ag[r]] */
static void qg_bwd_pair(double *acc, int64_t nc, const float *O, int64_t S, const float *gmp,
                        const float *gmg, const uint16_t *ap, const uint16_t *ag, int side)
{
    for (int64_t c = 0; c < nc; ++c) {
        double *a = acc + c * S;
        const float *o = O + c * S;
        if (side == 0) {
            for (int64_t s = 0; s < S; ++s) a[s] += (double)gmp[s] * (double)o[ap[s]];
            for (int64_t r = 0; r < S; ++r) a[ag[r]] += (double)gmg[r] * (double)o[r];
        } else {
            for (int64_t s = 0; s < S; ++s) a[ap[s]] += (double)gmp[s] * (double)o[s];
            for (int64_t r = 0; r < S; ++r) a[r] += (double)gmg[r] * (double)o[ag[r]];
        }
    }
}

/* The backward of a validated job. With job->ytab, a work item is a whole output map, and the map gets its
 * normalisation backward (qg_norm_bwd_item, as qg_norm_backward_rows_f32 applies it) as soon as its sums are
 * rounded, like the AVX2 engine's rows: the same bits as a separate pass over the finished output. */
static int qg_match_bwd_portable(const qg_bwd_job *job, const qg_ctx *ctx)
{
    const int64_t C = job->C, S = job->S, cs = C * S;
    if (job->nrows == 0) return QG_OK;
    int64_t cb = job->ytab ? C : QG_BWD_ELEMS / S;
    if (cb < 1) cb = 1;
    if (cb > C) cb = C;
    const int64_t ncb = (C + cb - 1) / cb;
    const int64_t items = job->nrows * ncb;
    const int nt = qg_threads_for(ctx, items);
    double *scratch = (double *)qg_malloc((int64_t)nt * cb * S * (int64_t)sizeof(double));
    if (!scratch) return QG_ENOMEM;
    int stop = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t it = 0; it < items; ++it) {
        if (qg_stop_requested(&stop)) continue;
        const int64_t t = it / ncb;
        const int64_t c0 = (it % ncb) * cb;
        const int64_t nc = qg_min64(cb, C - c0);
        double *acc = scratch + (int64_t)qg_thread_num() * cb * S;
        for (int64_t i = 0; i < nc * S; ++i) acc[i] = 0.0;
        int64_t n, first = 0;
        if (job->off) {
            first = job->off[t];
            n = job->off[t + 1] - first;
        } else {
            n = job->side == 0 ? job->K : job->nA;
        }
        for (int64_t i = 0; i < n; ++i) {
            int64_t q;
            if (job->off)
                q = job->list[first + i];
            else
                q = job->side == 0 ? t * job->K + i : i * job->K + t;
            int64_t f;
            if (job->side == 0)
                f = job->cand ? job->cand[q] : q % job->K;
            else
                f = q / job->K;
            qg_bwd_pair(acc, nc, job->far + f * cs + c0 * S, S, job->gmp + q * S, job->gmg + q * S,
                        job->ap + q * S, job->ag + q * S, job->side);
        }
        const int64_t row = job->rowid ? job->rowid[t] : t;
        float *o = job->out + row * cs + c0 * S;
        for (int64_t i = 0; i < nc * S; ++i) o[i] = (float)acc[i];
        if (job->ytab) /* o is the whole map (c0 = 0) */
            for (int64_t s0 = 0; s0 < S; s0 += QG_NORM_SB)
                qg_norm_bwd_item(o + s0, job->ytab + job->yrow[row] * cs + s0, 1, job->ynorm + row * S + s0,
                                 qg_min64(QG_NORM_SB, S - s0), C, S, o + s0);
        qg_poll_block(ctx, &stop);
    }
    qg_free(scratch);
    return stop ? QG_EINTR : QG_OK;
}

const qg_match_kernels qg_match_kernels_portable = {
    .pairs = qg_match_pairs_portable,
    .bwd = qg_match_bwd_portable,
    .norm_fwd_item = qg_norm_fwd_item,
    .norm_bwd_item = qg_norm_bwd_item,
};
