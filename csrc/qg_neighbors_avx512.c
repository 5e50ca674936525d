/*
 * qg_neighbors_avx512.c - AVX-512 block-pair kernel for qg_neighbors_topk_f32 (x86-64-v4): the kernel of
 * qg_neighbors_simd.h with a 12 x 16 micro-kernel in 12 zmm accumulators (per d one 16-wide load of B
 * and 12 FMAs whose A value is an embedded broadcast), and a 512-bit FMA peak probe. A lane's FMA chain
 * is the AVX2 kernel's, so both give the same bits. Compiled with the AVX-512 F/BW/DQ/VL flags
 * (setup.py, x86-64 only); chosen by qg_neighbors.c when ctx->isa >= QG_ISA_AVX512.
 */
#include "qg_neighbors_impl.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && defined(__FMA__)
#include <immintrin.h>
#include <string.h>

/* Multiples of 12 and 16, the AVX2 kernel's sizes (the same L2 budget). */
#define QG_NB2_BLOCK 288
#define QG_NB2_BLOCK_SMALL 192
#define QG_NB2_MR 12
#define QG_NB2_NR 16

#define QG_NB5_STEP(dd)                                                                                  \
    do {                                                                                                 \
        const __m512 bv = _mm512_loadu_ps(bp + (dd) * 16);                                               \
        const float *ad = ap + d + (dd);                                                                 \
        c0 = _mm512_fmadd_ps(_mm512_set1_ps(ad[0 * QG_NB_PANEL]), bv, c0);                               \
        c1 = _mm512_fmadd_ps(_mm512_set1_ps(ad[1 * QG_NB_PANEL]), bv, c1);                               \
        c2 = _mm512_fmadd_ps(_mm512_set1_ps(ad[2 * QG_NB_PANEL]), bv, c2);                               \
        c3 = _mm512_fmadd_ps(_mm512_set1_ps(ad[3 * QG_NB_PANEL]), bv, c3);                               \
        c4 = _mm512_fmadd_ps(_mm512_set1_ps(ad[4 * QG_NB_PANEL]), bv, c4);                               \
        c5 = _mm512_fmadd_ps(_mm512_set1_ps(ad[5 * QG_NB_PANEL]), bv, c5);                               \
        c6 = _mm512_fmadd_ps(_mm512_set1_ps(ad[6 * QG_NB_PANEL]), bv, c6);                               \
        c7 = _mm512_fmadd_ps(_mm512_set1_ps(ad[7 * QG_NB_PANEL]), bv, c7);                               \
        c8 = _mm512_fmadd_ps(_mm512_set1_ps(ad[8 * QG_NB_PANEL]), bv, c8);                               \
        c9 = _mm512_fmadd_ps(_mm512_set1_ps(ad[9 * QG_NB_PANEL]), bv, c9);                               \
        c10 = _mm512_fmadd_ps(_mm512_set1_ps(ad[10 * QG_NB_PANEL]), bv, c10);                            \
        c11 = _mm512_fmadd_ps(_mm512_set1_ps(ad[11 * QG_NB_PANEL]), bv, c11);                            \
    } while (0)

/* c[a * ldc + b] += sum_d ap[a * QG_NB_PANEL + d] * bp[d * 16 + b] for a < ma, b < nb (float32 FMA
 * chain per lane, d ascending, then one float32 add into c). The A rows are QG_NB_PANEL floats apart,
 * so every broadcast is one base register plus a constant displacement. Out of line so the 12
 * accumulators get the registers. */
__attribute__((noinline)) static void qg_nb2_micro(int64_t dp, const float *restrict ap, const float *restrict bp,
                                                  float *restrict c, int64_t ldc, int ma, int nb)
{
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    __m512 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    int64_t d = 0;
    for (; d + 4 <= dp; d += 4, bp += 64) {
        QG_NB5_STEP(0);
        QG_NB5_STEP(1);
        QG_NB5_STEP(2);
        QG_NB5_STEP(3);
    }
    for (; d < dp; ++d, bp += 16) QG_NB5_STEP(0);

    const __m512 r[QG_NB2_MR] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
    if (ma == QG_NB2_MR && nb == QG_NB2_NR) {
        for (int a = 0; a < QG_NB2_MR; ++a)
            _mm512_storeu_ps(c + a * ldc, _mm512_add_ps(_mm512_loadu_ps(c + a * ldc), r[a]));
        return;
    }
    const __mmask16 m = (__mmask16)((1u << nb) - 1u);
    for (int a = 0; a < ma; ++a)
        _mm512_mask_storeu_ps(c + a * ldc, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + a * ldc), r[a]));
}

#include "qg_neighbors_simd.h"

double qg_nb_fma_probe_avx512(int64_t iters, float *sink)
{
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-3f);
    __m512 a0 = y, a1 = y, a2 = y, a3 = y, a4 = y, a5 = y, a6 = y, a7 = y, a8 = y, a9 = y, a10 = y, a11 = y;
    for (int64_t it = 0; it < iters; ++it) {
        a0 = _mm512_fmadd_ps(a0, x, y), a1 = _mm512_fmadd_ps(a1, x, y), a2 = _mm512_fmadd_ps(a2, x, y);
        a3 = _mm512_fmadd_ps(a3, x, y), a4 = _mm512_fmadd_ps(a4, x, y), a5 = _mm512_fmadd_ps(a5, x, y);
        a6 = _mm512_fmadd_ps(a6, x, y), a7 = _mm512_fmadd_ps(a7, x, y), a8 = _mm512_fmadd_ps(a8, x, y);
        a9 = _mm512_fmadd_ps(a9, x, y), a10 = _mm512_fmadd_ps(a10, x, y), a11 = _mm512_fmadd_ps(a11, x, y);
        /* keep the 12 chains in registers and the loop from being folded */
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7),
                         "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
    }
    __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    t = _mm512_add_ps(t, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    if (sink) *sink = _mm512_cvtss_f32(t);
    return (double)iters * 12.0 * 16.0 * 2.0;
}

const qg_nb_variant qg_nb_variant_avx512 = {QG_NB2_BLOCK, QG_NB2_BLOCK_SMALL, (int64_t)sizeof(qg_nb2_scratch),
                                            qg_nb2_match};

#endif /* AVX-512 F/DQ/VL + FMA */
