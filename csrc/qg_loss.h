/*
 * qg_loss.h - fused losses: one pass gives the value, the accuracies and dLoss/dscores.
 * Scores are float32 row-major; values accumulate in double; log-sum-exp keeps huge scores finite.
 * Ties: argmax / argmin take the first (lowest) index; at a hinge kink the gradient is 0.
 * grad may be NULL (value only). Bit-identical for any thread count.
 *
 * Layout: s and grad are C-contiguous float32 [rows, cols]; grad must not alias s; labels int64.
 * Threading: rows in blocks of ~QG_CHUNK values, one thread per row; per-row double results are
 * summed serially in row order. Precision: double inside, grad rounded to float32 once.
 * Errors: QG_EINVAL (sizes, K < 2, non-finite margin/weight, gamma < 0), QG_ENONFINITE (NaN/Inf
 * in s), QG_ERANGE (focal targets outside [0, N)), QG_EOVERFLOW, QG_ENOMEM, QG_EINTR.
 */
#ifndef QG_LOSS_H
#define QG_LOSS_H
#include "qg_common.h"
#ifdef __cplusplus
extern "C" {
#endif

typedef struct qg_class_loss_out {
    double loss, loss_cls, loss_triplet, acc_cls, acc_triplet;
} qg_class_loss_out;

/* Restricted class loss over s [B, K], target in column 0, K >= 2.
 *   loss_cls     = mean_b [logsumexp(s[b, :]) - s[b, 0]]
 *   loss_triplet = mean_b max(0, margin - s[b, 0] + max_{j>0} s[b, j])
 *   loss         = loss_cls + triplet_weight * loss_triplet
 *   acc_cls      = mean_b [first argmax_j s[b, j] == 0];  acc_triplet = mean_b [s[b,0] > max_{j>0} s[b,j]]
 * grad: [B, K] dloss/ds: (softmax - onehot0) / B, plus triplet_weight / B at (b, 0) (-) and at the
 * first hardest negative (+) for rows with margin - pos + neg > 0 strictly (0 at the kink). */
int qg_loss_class_f32(const float *s, int64_t B, int64_t K, float margin, float triplet_weight,
                      qg_class_loss_out *o, float *grad, const qg_ctx *ctx);

/* In-batch batch-hard triplet over square s [B, B] with labels [B]:
 *   pos_b = min_{j != b, l_j == l_b} s[b, j], neg_b = max_{l_j != l_b} s[b, j]
 *   loss = mean over valid rows (having both) of max(0, margin - pos_b + neg_b); 0 if none valid
 *   acc  = mean over valid rows of [pos_b > neg_b]; n_valid = number of valid rows.
 * Ties: first index for the min positive and the max negative. grad: -1/n_valid at (b, argmin pos),
 * +1/n_valid at (b, argmax neg) for valid rows with a strictly positive hinge, else 0.
 * Labels are compared for equality only (any int64 values). */
int qg_loss_batch_triplet_f32(const float *s, const int64_t *labels, int64_t B, float margin,
                              double *loss, double *acc, int64_t *n_valid, float *grad,
                              const qg_ctx *ctx);

/* Pairwise BCE-with-logits (QAConv 2.0 PairwiseMatchingLoss) over s [P, G] with target
 * t[p, g] = (lp[p] == lg[g]):  loss = mean_p sum_g bce(s[p, g], t[p, g]);
 * acc = mean_p [min over positives > max over negatives] (rows lacking either count as 0).
 * bce(x, t) = max(x, 0) - x t + log1p(exp(-|x|)); grad = (sigmoid(s) - t) / P. */
int qg_loss_pairwise_bce_f32(const float *s, int64_t P, int64_t G, const int64_t *lp,
                             const int64_t *lg, double *loss, double *acc, float *grad,
                             const qg_ctx *ctx);

/* Focal class-memory BCE (QAConv 1.x ClassMemoryLoss) over s [B, N], targets [B] in [0, N):
 *   p = sigmoid(s), t = onehot; loss = mean_b sum_j bce(s, t) * (t ? 1-p : p)^gamma
 *   (the focal weight is differentiated too, as in the original); acc = mean [argmax == target]. */
int qg_loss_focal_f32(const float *s, int64_t B, int64_t N, const int64_t *targets, float gamma,
                      double *loss, double *acc, float *grad, const qg_ctx *ctx);

/* Scalar references (single thread, plain loops, double accumulation): same contracts. */
int qg_loss_class_ref_f32(const float *s, int64_t B, int64_t K, float margin, float triplet_weight,
                          qg_class_loss_out *o, float *grad, const qg_ctx *ctx);
int qg_loss_batch_triplet_ref_f32(const float *s, const int64_t *labels, int64_t B, float margin,
                                  double *loss, double *acc, int64_t *n_valid, float *grad,
                                  const qg_ctx *ctx);
int qg_loss_pairwise_bce_ref_f32(const float *s, int64_t P, int64_t G, const int64_t *lp,
                                 const int64_t *lg, double *loss, double *acc, float *grad,
                                 const qg_ctx *ctx);
int qg_loss_focal_ref_f32(const float *s, int64_t B, int64_t N, const int64_t *targets, float gamma,
                          double *loss, double *acc, float *grad, const qg_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif
