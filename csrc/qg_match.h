/*
 * qg_match.h - location normalisation and the fused QAConv correlation + two-way max.
 *
 * Layout: a feature map is [C, S] row-major (S = H*W, s = h*W + w), a batch is [M, C, S].
 * Z[s, r] = sum_c P[c, s] * G[c, r] for a probe map P and a gallery map G.
 *   mp[s] = max_r Z[s, r]  (probe-direction maxima), ap[s] = first argmax r
 *   mg[r] = max_s Z[s, r]  (gallery-direction maxima), ag[r] = first argmax s
 * The S x S block Z is never stored beyond a cache-sized tile.
 * Argmax indices are uint16 (S <= QG_MAX_LOCATIONS, else QG_EINVAL).
 * All kernels: inputs never modified, outputs must not alias inputs unless stated,
 * bit-identical for any thread count, float32 storage.
 *
 * Precision: Z[s, r] is summed over c = 0..C-1 in order in float32: one fused multiply-add per
 * channel on the AVX2 and AVX-512 paths (ctx->isa >= QG_ISA_AVX2, qg_match_avx2.c / qg_match_avx512.c,
 * which give the same bits), a separate multiply and add on the portable path. On a given path every
 * Z element is the same bits whatever the thread count, the tiling or the call (all pairs, restricted,
 * fused scores); the FMA and portable paths may differ in the last bits (and so, at near ties, in the
 * argmax).
 * Norms, dot products of the normalisation backward, the backward scatter sums and the fused
 * scores are accumulated in double and rounded once.
 * Threading: the forward splits the pairs into units (a block of probe maps x a block of gallery
 * maps or candidate slots), each computed by one thread (dynamic schedule); calls with little work
 * use fewer threads (about one per 2^21 multiply-adds). The backward gives each (output map,
 * channel block) to one thread (portable), or each output map to one thread (AVX2). Memory beyond
 * the outputs: O(threads * (rows + cols) * C) packed blocks (forward, cols sized to ~512 KiB);
 * backward: O(threads * 8192) doubles (portable), or O(threads * 4 * S * C) doubles plus transposed
 * copies of the far-side maps that are reused by many pairs (AVX2; at most 64 MiB, else per chunk).
 * Statuses: QG_EINVAL (bad sizes, NULL pointers, only one of ap/ag given), QG_EOVERFLOW,
 * QG_ERANGE (candidate outside [0, N), argmax >= S), QG_ENOMEM, QG_EINTR (polled between
 * blocks of pairs and between gallery panels of a pair). Finite inputs are assumed (the Python
 * layer checks); with overflow to Inf/NaN a maximum may stay -Inf with argmax 0.
 */
#ifndef QG_MATCH_H
#define QG_MATCH_H
#include "qg_common.h"
#ifdef __cplusplus
extern "C" {
#endif

/* ---- location normalisation: y[m, :, s] = x[m, :, s] / max(||x[m, :, s]||, 1e-12) ---- */
#define QG_NORM_EPS 1e-12f

/* x: [M, C, S]; y: [M, C, S] out; norm: [M, S] out (the raw norms ||x[m, :, s]||, summed in
 * double, rounded to float32). y = x / max(norm, eps) in float32; where the norm overflows float32
 * (norm = +Inf from finite x near FLT_MAX), y = x / norm in double from the double norm, rounded once. */
int qg_norm_forward_f32(const float *x, int64_t M, int64_t C, int64_t S,
                        float *y, float *norm, const qg_ctx *ctx);
/* gy: [M, C, S] gradient w.r.t. y; y, norm from the forward; gx: [M, C, S] out (may alias gy).
 * gx = (gy - y * <y, gy>) / norm where norm >= eps, gy / eps otherwise; <y, gy> in double, and the
 * division is a multiply by the double reciprocal of the divisor, rounded once to float32. */
int qg_norm_backward_f32(const float *gy, const float *y, const float *norm,
                         int64_t M, int64_t C, int64_t S, float *gx, const qg_ctx *ctx);

/* Rows of a table, without a gathered copy: E [N, C, S], rows [R] in [0, N) (else QG_ERANGE).
 * forward: y [R, C, S] and norm [R, S] are the bits qg_norm_forward_f32 gives for the gathered rows.
 * backward: y is rebuilt from E[rows[m]] and norm (the forward's float32 division, so the same bits
 * as y), and gx [R, C, S] (may alias gy) is the bits qg_norm_backward_f32 gives with that y. */
int qg_norm_forward_rows_f32(const float *E, int64_t N, const int64_t *rows, int64_t R, int64_t C,
                             int64_t S, float *y, float *norm, const qg_ctx *ctx);
int qg_norm_backward_rows_f32(const float *gy, const float *E, int64_t N, const int64_t *rows,
                              const float *norm, int64_t R, int64_t C, int64_t S, float *gx,
                              const qg_ctx *ctx);

/* ---- pair maxima forward ---- */

/* All pairs: P [nP, C, S], G [nG, C, S] -> mp, mg [nP, nG, S]; ap, ag [nP, nG, S] or both NULL.
 * Ties: the first (lowest) index, as torch.max. */
int qg_match_maxima_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                        int64_t C, int64_t S, float *mp, float *mg,
                        uint16_t *ap, uint16_t *ag, const qg_ctx *ctx);

/* Restricted: X [B, C, S] probes, E [N, C, S] gallery table, cand [B, K] int64 rows of E.
 * Pair (b, j) is X[b] vs E[cand[b, j]]. Outputs [B, K, S]; ap, ag may be NULL.
 * QG_ERANGE if a candidate is outside [0, N). */
int qg_match_maxima_restricted_f32(const float *X, int64_t B, const float *E, int64_t N,
                                   const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                   float *mp, float *mg, uint16_t *ap, uint16_t *ag,
                                   const qg_ctx *ctx);

/* Fused eval scores: out[p, g] = sum_s w[s]*mp[p,g,s] + sum_r w[S+r]*mg[p,g,r] + bias.
 * w: [2S]. out: [nP, nG]. The maxima are bit-identical to qg_match_maxima_f32's; the weighted sum
 * is taken in double in index order (s, then r), plus bias, rounded once. Memory O(nP*nG + tiles). */
int qg_match_scores_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                        int64_t C, int64_t S, const float *w, float bias,
                        float *out, const qg_ctx *ctx);

/* ---- pair maxima backward (through the recorded argmax; deterministic, no atomics) ---- */

/* All pairs: gmp, gmg [nP, nG, S] upstream gradients; ap, ag from the forward.
 * gP [nP, C, S] and gG [nG, C, S] are overwritten (not accumulated).
 *   gP[p, c, s] = sum_g gmp[p,g,s] G[g, c, ap[p,g,s]] + sum_{r: ag[p,g,r] = s} gmg[p,g,r] G[g, c, r]
 *   gG[g, c, r] = sum_p sum_{s: ap[p,g,s] = r} gmp[p,g,s] P[p, c, s] + gmg[p,g,r] P[p, c, ag[p,g,r]]
 * gP sums over g in order, gG over p in order (double accumulators). */
int qg_match_backward_f32(const float *P, int64_t nP, const float *G, int64_t nG,
                          int64_t C, int64_t S, const float *gmp, const float *gmg,
                          const uint16_t *ap, const uint16_t *ag,
                          float *gP, float *gG, const qg_ctx *ctx);

/* Restricted: as the restricted forward. gX [B, C, S] and gE [N, C, S] are overwritten
 * (rows of E that are no candidate get 0). Contributions to one row are summed in
 * (b, j) order whatever the thread count. Either output may be NULL (that side is skipped, so a
 * caller can free E before allocating gE: E is read only for gX and may be NULL without it);
 * both NULL is QG_EINVAL. */
int qg_match_backward_restricted_f32(const float *X, int64_t B, const float *E, int64_t N,
                                     const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                     const float *gmp, const float *gmg,
                                     const uint16_t *ap, const uint16_t *ag,
                                     float *gX, float *gE, const qg_ctx *ctx);

/* The class side of the restricted backward on raw table rows, fused with their normalisation
 * backward: the class rows were normalised from E [NE, C, S] rows `rows` [R] (qg_norm_forward_rows_f32,
 * norms `norm` [R, S]) and cand [B, K] indexes those R rows. gE [R, C, S] gets the gradient w.r.t. the
 * raw rows: the bits of qg_match_backward_restricted_f32's gE (with gX NULL) followed by
 * qg_norm_backward_rows_f32, without a pass over the [R, C, S] gradient in memory in between. */
int qg_match_backward_restricted_rows_f32(const float *X, int64_t B, const float *E, int64_t NE,
                                          const int64_t *rows, const float *norm, int64_t R,
                                          const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                          const float *gmp, const float *gmg,
                                          const uint16_t *ap, const uint16_t *ag,
                                          float *gE, const qg_ctx *ctx);

/* ---- scalar reference versions (fallback and test oracle): same contracts ---- */
int qg_norm_forward_ref_f32(const float *x, int64_t M, int64_t C, int64_t S,
                            float *y, float *norm, const qg_ctx *ctx);
int qg_norm_backward_ref_f32(const float *gy, const float *y, const float *norm,
                             int64_t M, int64_t C, int64_t S, float *gx, const qg_ctx *ctx);
int qg_match_maxima_restricted_ref_f32(const float *X, int64_t B, const float *E, int64_t N,
                                       const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                       float *mp, float *mg, uint16_t *ap, uint16_t *ag,
                                       const qg_ctx *ctx);
int qg_match_backward_restricted_ref_f32(const float *X, int64_t B, const float *E, int64_t N,
                                         const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                         const float *gmp, const float *gmg,
                                         const uint16_t *ap, const uint16_t *ag,
                                         float *gX, float *gE, const qg_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif
