/*
 * qg_neighbors_avx2.c - AVX2+FMA block-pair kernel for qg_neighbors_topk_f32 (x86-64-v3): the kernel of
 * qg_neighbors_simd.h with a 6 x 16 micro-kernel in 12 ymm accumulators (per d two 8-wide loads of B,
 * 6 broadcasts of A, 12 FMAs; K-loop unrolled 4x), and the FMA peak probe of the benchmarks.
 * Compiled with -mavx2 -mfma (setup.py, x86-64 only); chosen by qg_neighbors.c when
 * ctx->isa >= QG_ISA_AVX2 (and on AVX-512 CPUs when forced down to avx2).
 */
#include "qg_neighbors_impl.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <string.h>

/* Rows per block: multiples of 6 and 16. 288 keeps the copy of I (288 KiB) and the accumulator
 * (324 KiB) in the 1 MiB L2 of a Zen 4 core and reads each row from memory 1.5x less often than 192
 * (measured at N = 10,572, D = 8,192: 74 -> 81 GF/s on one thread, 138 -> 152 on two); 192 for tables
 * with few blocks (qg_nb_variant). */
#define QG_NB2_BLOCK 288
#define QG_NB2_BLOCK_SMALL 192
#define QG_NB2_MR 6
#define QG_NB2_NR 16

#define QG_NB2_NOINLINE __attribute__((noinline))

#define QG_NB2_STEP(dd)                                                                        \
    do {                                                                                       \
        const __m256 b0 = _mm256_load_ps(bp + (dd) * 16), b1 = _mm256_load_ps(bp + (dd) * 16 + 8); \
        __m256 x;                                                                              \
        x = _mm256_broadcast_ss(a0 + d + (dd));                                                \
        c00 = _mm256_fmadd_ps(x, b0, c00);                                                     \
        c01 = _mm256_fmadd_ps(x, b1, c01);                                                     \
        x = _mm256_broadcast_ss(a1 + d + (dd));                                                \
        c10 = _mm256_fmadd_ps(x, b0, c10);                                                     \
        c11 = _mm256_fmadd_ps(x, b1, c11);                                                     \
        x = _mm256_broadcast_ss(a2 + d + (dd));                                                \
        c20 = _mm256_fmadd_ps(x, b0, c20);                                                     \
        c21 = _mm256_fmadd_ps(x, b1, c21);                                                     \
        x = _mm256_broadcast_ss(a3 + d + (dd));                                                \
        c30 = _mm256_fmadd_ps(x, b0, c30);                                                     \
        c31 = _mm256_fmadd_ps(x, b1, c31);                                                     \
        x = _mm256_broadcast_ss(a4 + d + (dd));                                                \
        c40 = _mm256_fmadd_ps(x, b0, c40);                                                     \
        c41 = _mm256_fmadd_ps(x, b1, c41);                                                     \
        x = _mm256_broadcast_ss(a5 + d + (dd));                                                \
        c50 = _mm256_fmadd_ps(x, b0, c50);                                                     \
        c51 = _mm256_fmadd_ps(x, b1, c51);                                                     \
    } while (0)

static inline void qg_nb2_addrow(float *c, __m256 lo, __m256 hi)
{
    _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), lo));
    _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), hi));
}

/* c[a * ldc + b] += sum_d ap[a * QG_NB_PANEL + d] * bp[d * 16 + b] for a < ma, b < nb (float32 FMA
 * chain per lane, d ascending, then one float32 add into c). A is row-major (broadcast loads need no
 * transpose), B is d-major. Out of line so the 12 accumulators get the registers. */
QG_NB2_NOINLINE static void qg_nb2_micro(int64_t dp, const float *restrict ap, const float *restrict bp,
                                         float *restrict c, int64_t ldc, int ma, int nb)
{
    const int64_t lda = QG_NB_PANEL;
    const float *a0 = ap, *a1 = ap + lda, *a2 = ap + 2 * lda, *a3 = ap + 3 * lda, *a4 = ap + 4 * lda,
                *a5 = ap + 5 * lda;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    int64_t d = 0;
    for (; d + 4 <= dp; d += 4, bp += 64) {
        QG_NB2_STEP(0);
        QG_NB2_STEP(1);
        QG_NB2_STEP(2);
        QG_NB2_STEP(3);
    }
    for (; d < dp; ++d, bp += 16) QG_NB2_STEP(0);

    if (ma == QG_NB2_MR && nb == QG_NB2_NR) {
        qg_nb2_addrow(c + 0 * ldc, c00, c01);
        qg_nb2_addrow(c + 1 * ldc, c10, c11);
        qg_nb2_addrow(c + 2 * ldc, c20, c21);
        qg_nb2_addrow(c + 3 * ldc, c30, c31);
        qg_nb2_addrow(c + 4 * ldc, c40, c41);
        qg_nb2_addrow(c + 5 * ldc, c50, c51);
        return;
    }
    float t[QG_NB2_MR][QG_NB2_NR];
    _mm256_storeu_ps(t[0], c00), _mm256_storeu_ps(t[0] + 8, c01);
    _mm256_storeu_ps(t[1], c10), _mm256_storeu_ps(t[1] + 8, c11);
    _mm256_storeu_ps(t[2], c20), _mm256_storeu_ps(t[2] + 8, c21);
    _mm256_storeu_ps(t[3], c30), _mm256_storeu_ps(t[3] + 8, c31);
    _mm256_storeu_ps(t[4], c40), _mm256_storeu_ps(t[4] + 8, c41);
    _mm256_storeu_ps(t[5], c50), _mm256_storeu_ps(t[5] + 8, c51);
    for (int a = 0; a < ma; ++a)
        for (int b = 0; b < nb; ++b) c[a * ldc + b] += t[a][b];
}

#include "qg_neighbors_simd.h"

double qg_nb_fma_probe_avx2(int64_t iters, float *sink)
{
    const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-3f);
    __m256 a0 = y, a1 = y, a2 = y, a3 = y, a4 = y, a5 = y, a6 = y, a7 = y, a8 = y, a9 = y, a10 = y, a11 = y;
    for (int64_t it = 0; it < iters; ++it) {
        a0 = _mm256_fmadd_ps(a0, x, y), a1 = _mm256_fmadd_ps(a1, x, y), a2 = _mm256_fmadd_ps(a2, x, y);
        a3 = _mm256_fmadd_ps(a3, x, y), a4 = _mm256_fmadd_ps(a4, x, y), a5 = _mm256_fmadd_ps(a5, x, y);
        a6 = _mm256_fmadd_ps(a6, x, y), a7 = _mm256_fmadd_ps(a7, x, y), a8 = _mm256_fmadd_ps(a8, x, y);
        a9 = _mm256_fmadd_ps(a9, x, y), a10 = _mm256_fmadd_ps(a10, x, y), a11 = _mm256_fmadd_ps(a11, x, y);
        /* keep the 12 chains in registers and the loop from being folded */
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7),
                         "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    t = _mm256_add_ps(t, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    if (sink) *sink = _mm256_cvtss_f32(t);
    return (double)iters * 12.0 * 8.0 * 2.0;
}

const qg_nb_variant qg_nb_variant_avx2 = {QG_NB2_BLOCK, QG_NB2_BLOCK_SMALL, (int64_t)sizeof(qg_nb2_scratch),
                                          qg_nb2_match};

#endif
