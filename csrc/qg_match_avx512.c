/*
 * qg_match_avx512.c - AVX-512 engine of the fused correlation + two-way max (qg_match.h): the engine of
 * qg_match_simd.h with a 12 x 16 tile in 12 zmm accumulators. Per channel it loads one B vector and
 * folds each of the 12 A values into its FMA as an embedded broadcast, where the AVX2 tile needs two
 * loads and six broadcasts for 12 half-width FMAs: fewer instructions per FLOP on CPUs whose 512-bit
 * FMA rate equals the 256-bit one (Zen 4), twice the FLOPs per cycle where it is double (Intel server
 * cores). Every Z element is the same float32 FMA chain over c as in the AVX2 engine, so the two give
 * the same bits. The file's record, qg_match_kernels_avx512, names the AVX2 backward and normalisation
 * items (they are bound by memory traffic and double-precision conversions, not by vector width).
 * Compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma (setup.py, x86-64 only);
 * qg_match.c picks the record when ctx->isa >= QG_ISA_AVX512. Elsewhere this file compiles to nothing.
 */
#include "qg_match_impl.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && defined(__FMA__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define QG_AI static inline __attribute__((always_inline))
#define MR 12
#define NR 16
#define QG_FWD_ENGINE qg_match_pairs_avx512

/* t[2i + h] = lanes 8h..8h+7 of row i of the 12 x 16 tile A_panel^T B_panel (the epilogue's 8-lane
 * halves of each zmm row). */
QG_AI void qg_ukernel(const float *restrict a, const float *restrict b, int64_t C, __m256 t[2 * MR])
{
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps();
    __m512 c3 = _mm512_setzero_ps(), c4 = _mm512_setzero_ps(), c5 = _mm512_setzero_ps();
    __m512 c6 = _mm512_setzero_ps(), c7 = _mm512_setzero_ps(), c8 = _mm512_setzero_ps();
    __m512 c9 = _mm512_setzero_ps(), c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t c = 0; c < C; ++c) {
        const __m512 bv = _mm512_loadu_ps(b);
        c0 = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), bv, c0);
        c1 = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), bv, c1);
        c2 = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), bv, c2);
        c3 = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), bv, c3);
        c4 = _mm512_fmadd_ps(_mm512_set1_ps(a[4]), bv, c4);
        c5 = _mm512_fmadd_ps(_mm512_set1_ps(a[5]), bv, c5);
        c6 = _mm512_fmadd_ps(_mm512_set1_ps(a[6]), bv, c6);
        c7 = _mm512_fmadd_ps(_mm512_set1_ps(a[7]), bv, c7);
        c8 = _mm512_fmadd_ps(_mm512_set1_ps(a[8]), bv, c8);
        c9 = _mm512_fmadd_ps(_mm512_set1_ps(a[9]), bv, c9);
        c10 = _mm512_fmadd_ps(_mm512_set1_ps(a[10]), bv, c10);
        c11 = _mm512_fmadd_ps(_mm512_set1_ps(a[11]), bv, c11);
        a += MR;
        b += NR;
    }
    const __m512 r[MR] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
    for (int i = 0; i < MR; ++i) {
        t[2 * i] = _mm512_castps512_ps256(r[i]);
        t[2 * i + 1] = _mm512_extractf32x8_ps(r[i], 1);
    }
}

#include "qg_match_simd.h"

const qg_match_kernels qg_match_kernels_avx512 = {
    .pairs = qg_match_pairs_avx512,
    .bwd = qg_match_bwd_avx2,              /* reused: qg_match_avx2.c */
    .norm_fwd_item = qg_norm_fwd_item_avx2, /* reused */
    .norm_bwd_item = qg_norm_bwd_item_avx2, /* reused */
};

#endif /* AVX-512 F/DQ/VL + FMA */
