/*
 * qg_match.c - location normalisation, the fused QAConv correlation + two-way max (driver, ISA
 * table and portable engine) and the backward.
 *
 * Forward layering: qg_match_*_f32 validate and build a qg_pairs_job (qg_match_impl.h), then run
 * the engine of ctx->isa from a small table: qg_match_pairs_avx512 / qg_match_pairs_avx2
 * (qg_match_avx512.c / qg_match_avx2.c, both from qg_match_simd.h: register-tiled with the maxima in
 * the epilogue) on x86-64 CPUs that have them, else the portable engine below (also the fallback on
 * other architectures).
 * Portable engine:
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
 * Backward: gather/scatter through the recorded argmax. Work items are (map, channel block);
 * each output element is owned by one item and summed in double over pairs in a fixed order.
 */
#include "qg_match.h"
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

/* ------------------------------------------------------------------ normalisation */


/* Row m of a normalisation call: x + rows[m] * cs (rows == NULL: m). */
static const float *qg_norm_row(const float *x, const int64_t *rows, int64_t m, int64_t cs)
{
    return x + (rows ? rows[m] : m) * cs;
}

/* One work item of the forward: n <= QG_NORM_SB locations of one map, portable C (the AVX2 item in
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

/* Shared by qg_norm_forward_f32 and qg_norm_forward_rows_f32 (sizes validated, M > 0). */
static int qg_norm_fwd(const float *x, const int64_t *rows, int64_t M, int64_t C, int64_t S, float *y,
                       float *norm, const qg_ctx *ctx)
{
    const int64_t cs = C * S;
    const int64_t nsb = (S + QG_NORM_SB - 1) / QG_NORM_SB;
    const int64_t items = M * nsb;
    const int nt = qg_threads_for(ctx, items);
    qg_norm_fwd_item_fn item = qg_norm_fwd_item;
#if QG_X86
    if (ctx && ctx->isa >= QG_ISA_AVX2) item = qg_norm_fwd_item_avx2;
#endif
    int stop = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t it = 0; it < items; ++it) {
        if (qg_stop_requested(&stop)) continue;
        const int64_t m = it / nsb;
        const int64_t s0 = (it % nsb) * QG_NORM_SB;
        const int64_t n = qg_min64(QG_NORM_SB, S - s0);
        item(qg_norm_row(x, rows, m, cs) + s0, n, C, S, y + m * cs + s0, norm + m * S + s0);
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
    return qg_norm_fwd(x, NULL, M, C, S, y, norm, ctx);
}

int qg_norm_forward_rows_f32(const float *E, int64_t N, const int64_t *rows, int64_t R, int64_t C,
                             int64_t S, float *y, float *norm, const qg_ctx *ctx)
{
    int empty;
    int st = qg_norm_check(R, C, S, &empty);
    if (st != QG_OK || empty) return st;
    if (!E || !y || !norm) return QG_EINVAL;
    if ((st = qg_norm_check_rows(rows, R, N, C * S)) != QG_OK) return st;
    return qg_norm_fwd(E, rows, R, C, S, y, norm, ctx);
}

/* One work item of the backward (n <= QG_NORM_SB locations of one map): y is given (raw == 0) or
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

/* Shared by the two backward entry points (rows == NULL: y given; else y rebuilt from x[rows]). */
static int qg_norm_bwd(const float *gy, const float *y, const int64_t *rows, const float *norm, int64_t M,
                       int64_t C, int64_t S, float *gx, const qg_ctx *ctx)
{
    const int64_t cs = C * S;
    const int64_t nsb = (S + QG_NORM_SB - 1) / QG_NORM_SB;
    const int64_t items = M * nsb;
    const int nt = qg_threads_for(ctx, items);
    qg_norm_bwd_item_fn item = qg_norm_bwd_item;
#if QG_X86
    if (ctx && ctx->isa >= QG_ISA_AVX2) item = qg_norm_bwd_item_avx2;
#endif
    int stop = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t it = 0; it < items; ++it) {
        if (qg_stop_requested(&stop)) continue;
        const int64_t m = it / nsb;
        const int64_t s0 = (it % nsb) * QG_NORM_SB;
        const int64_t n = qg_min64(QG_NORM_SB, S - s0);
        item(gy + m * cs + s0, qg_norm_row(y, rows, m, cs) + s0, rows != NULL, norm + m * S + s0, n, C, S,
             gx + m * cs + s0);
        qg_poll_block(ctx, &stop);
    }
    return stop ? QG_EINTR : QG_OK;
}

int qg_norm_backward_f32(const float *gy, const float *y, const float *norm,
                         int64_t M, int64_t C, int64_t S, float *gx, const qg_ctx *ctx)
{
    int empty;
    const int st = qg_norm_check(M, C, S, &empty);
    if (st != QG_OK || empty) return st;
    if (!gy || !y || !norm || !gx) return QG_EINVAL;
    return qg_norm_bwd(gy, y, NULL, norm, M, C, S, gx, ctx);
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
    return qg_norm_bwd(gy, E, rows, norm, R, C, S, gx, ctx);
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

/* Engines by ISA level (ctx->isa): the best one compiled for a level at or below it. */
static qg_pairs_engine qg_pairs_engine_for(int isa)
{
    static const qg_pairs_engine table[] = {
        [QG_ISA_PORTABLE] = qg_match_pairs_portable,
#if QG_X86
        [QG_ISA_AVX2] = qg_match_pairs_avx2,
        [QG_ISA_AVX512] = qg_match_pairs_avx512,
#else
        [QG_ISA_AVX2] = qg_match_pairs_portable,
        [QG_ISA_AVX512] = qg_match_pairs_portable,
#endif
    };
    if (isa < QG_ISA_PORTABLE) isa = QG_ISA_PORTABLE;
    if (isa > QG_ISA_AVX512) isa = QG_ISA_AVX512;
    return table[isa];
}

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
    return qg_pairs_engine_for(ctx ? ctx->isa : QG_ISA_PORTABLE)(job, ctx);
}

int qg_match_maxima_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                        int64_t C, int64_t S, float *mp, float *mg,
                        uint16_t *ap, uint16_t *ag, const qg_ctx *ctx)
{
    qg_pairs_job job = {P, nP, G, nG, NULL, nG, C, S, mp, mg, ap, ag, NULL, 0.0f, NULL};
    return qg_run_pairs(&job, ctx);
}

int qg_match_maxima_restricted_f32(const float *X, int64_t B, const float *E, int64_t N,
                                   const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                   float *mp, float *mg, uint16_t *ap, uint16_t *ag,
                                   const qg_ctx *ctx)
{
    if (B > 0 && K > 0 && !cand) return QG_EINVAL;
    qg_pairs_job job = {X, B, E, N, cand, K, C, S, mp, mg, ap, ag, NULL, 0.0f, NULL};
    return qg_run_pairs(&job, ctx);
}

int qg_match_scores_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                        int64_t C, int64_t S, const float *w, float bias,
                        float *out, const qg_ctx *ctx)
{
    if (!w) return QG_EINVAL;
    qg_pairs_job job = {P, nP, G, nG, NULL, nG, C, S, NULL, NULL, NULL, NULL, w, bias, out};
    return qg_run_pairs(&job, ctx);
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

static int qg_check_argmax(const uint16_t *a, int64_t n, int64_t S)
{
    for (int64_t i = 0; i < n; ++i)
        if ((int64_t)a[i] >= S) return 0;
    return 1;
}

static int qg_run_bwd_portable(const qg_bwd_job *job, const qg_ctx *ctx)
{
    const int64_t C = job->C, S = job->S, cs = C * S;
    if (job->nrows == 0) return QG_OK;
    int64_t cb = QG_BWD_ELEMS / S;
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
        qg_poll_block(ctx, &stop);
    }
    qg_free(scratch);
    return stop ? QG_EINTR : QG_OK;
}

/* Whether qg_run_bwd's engine applies job->ytab itself (the AVX2 one, to each finished row in cache). */
static int qg_bwd_fuses_norm(const qg_ctx *ctx)
{
#if QG_X86
    return ctx && ctx->isa >= QG_ISA_AVX2;
#else
    (void)ctx;
    return 0;
#endif
}

/* Backward engine of ctx->isa (the AVX2 one on x86-64 CPUs that have it). The portable engine ignores
 * job->ytab: the caller applies it (qg_bwd_fuses_norm). */
static int qg_run_bwd(const qg_bwd_job *job, const qg_ctx *ctx)
{
    if (job->nrows == 0) return QG_OK;
#if QG_X86
    if (qg_bwd_fuses_norm(ctx)) return qg_match_bwd_avx2(job, ctx);
#endif
    return qg_run_bwd_portable(job, ctx);
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
    qg_bwd_job jp = {nP, NULL, NULL, NULL, nG, nP, NULL, G, nG, 0, C, S, gmp, gmg, ap, ag, gP, NULL, NULL, NULL};
    st = qg_run_bwd(&jp, ctx);
    if (st != QG_OK) return st;
    qg_bwd_job jg = {nG, NULL, NULL, NULL, nG, nP, NULL, P, nP, 1, C, S, gmp, gmg, ap, ag, gG, NULL, NULL, NULL};
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
        qg_bwd_job jx = {B, NULL, NULL, NULL, K, B, cand, E, N, 0, C, S, gmp, gmg, ap, ag, gX, NULL, NULL, NULL};
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
        qg_bwd_job je = {nrows, roff, list, rows, K, B, NULL, X, B, 1, C, S, gmp, gmg, ap, ag, gE, ytab, yrow, ynorm};
        st = qg_run_bwd(&je, ctx);
    }
    /* rows without pairs are zeros, whose normalisation backward is zeros again: one pass over all N */
    if (st == QG_OK && ytab && !qg_bwd_fuses_norm(ctx)) st = qg_norm_bwd(gE, ytab, yrow, ynorm, N, C, S, gE, ctx);
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
