/*
 * qg_neighbors.h - class-neighbour kNN (cosine similarity between flattened class embeddings).
 */
#ifndef QG_NEIGHBORS_H
#define QG_NEIGHBORS_H
#include "qg_common.h"
#ifdef __cplusplus
extern "C" {
#endif

/*
 * For each of the N rows of E ([N, D] row-major float32, not modified, need not be normalised),
 * find the k most cosine-similar OTHER rows (self excluded by index).
 *   idx: [N, k] int64 out, sorted by decreasing similarity; ties go to the lower index.
 *   sim: [N, k] float32 out or NULL.
 * Rows are L2-normalised implicitly (x / max(||x||, 1e-12)); a zero row has similarity 0 to all.
 * Memory beyond the inputs: O(N + N*k + threads * block scratch + (N/block)^2 / 2 bytes); the
 * N x N matrix is never formed. Each block pair (I, J), I <= J, is computed once and feeds the
 * top-k of both I's and J's rows.
 * Precision: float32 products summed in float32 over D-panels of 256 columns (in d order, one
 * chain per pair), then the panel sums added in d order -- in double on the portable path, in
 * float32 on the AVX2 path (multiply-adds fused there) -- then (float)(dot * (w_i * w_j)) with
 * w = 1 / max(||x||, 1e-12) from double norms (rows are prescaled by exact powers of two, so
 * |x| up to FLT_MAX does not overflow). Error of the cosine: <= 256 * 2^-24 (portable) or
 * (256 + D/256) * 2^-24 (AVX2) times sum_d |x_d y_d| / (||x|| ||y||) <= 1, i.e. <= 1.5e-5 /
 * 2.1e-5 (D = 25,088) in the worst case, ~1e-7 typically; tests use rtol 1e-5 / atol 1e-6.
 * The order and the tie rule apply to these returned float32 values; a pair's value is computed
 * once, so it is the same bits in both rows' lists.
 * Threads: ctx->n_threads at most, fewer for small problems; ISA: ctx->isa picks the variant
 * (AVX2+FMA when >= QG_ISA_AVX2 on x86-64, else portable C); results may differ between
 * variants in the last bits, never between thread counts.
 * Requires 1 <= k <= N-1. Bit-identical for any thread count. Polls ctx between blocks.
 * Returns QG_EINVAL for bad sizes, QG_ENONFINITE if E holds NaN/Inf, QG_ENOMEM, QG_EINTR.
 */
int qg_neighbors_topk_f32(const float *E, int64_t N, int64_t D, int64_t k,
                          int64_t *idx, float *sim, const qg_ctx *ctx);

/* Scalar reference (single thread, straightforward loops, double accumulation): same contract. */
int qg_neighbors_topk_ref_f32(const float *E, int64_t N, int64_t D, int64_t k,
                              int64_t *idx, float *sim, const qg_ctx *ctx);

/*
 * Benchmark helper (single thread): `iters` iterations of 12 independent multiply-add chains on
 * the widest vectors of the path chosen by ctx->isa (AVX2: 12 ymm FMA chains, the shape of the
 * 6x16 micro-kernel; portable: what the compiler makes of 12 x 8 float chains). Returns the
 * floating-point operations done (2 per lane and step), so flops / wall time is the measured
 * per-core peak. *sink receives a result-dependent value (keeps the loop alive); may be NULL.
 */
double qg_neighbors_fma_probe(int64_t iters, const qg_ctx *ctx, float *sink);

#ifdef __cplusplus
}
#endif
#endif
