/*
 * qg_loss.c - fused losses (value, accuracies, dLoss/dscores in one pass), OpenMP over rows.
 *
 * Each row's contributions are computed in double by the thread that owns the row and stored in
 * per-row scratch; the row values are then summed serially in row order, so the results are
 * bit-identical for any thread count. Gradients are per row (each element written by one thread).
 */
#include "qg_loss.h"

#include <math.h>
#include <string.h>

/* Rows per parallel block: about QG_CHUNK score values, at least one row. */
static int64_t loss_rows_per_block(int64_t ncols)
{
    int64_t r = QG_CHUNK / (ncols > 0 ? ncols : 1);
    return r < 1 ? 1 : r;
}

static inline double sigmoid_d(double x)
{
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

/* log(1 + exp(x)), finite for any finite x */
static inline double softplus_d(double x) { return (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x))); }

/* 0 if every value of the row is finite (x * 0 is NaN for NaN and +-Inf) */
static inline int row_nonfinite(const float *r, int64_t n)
{
    float acc = 0.0f;
    QG_OMP(simd reduction(+ : acc))
    for (int64_t j = 0; j < n; ++j) acc += r[j] * 0.0f;
    return acc != 0.0f || acc != acc;
}

/* ---------------------------------------------------------------- class loss */

int qg_loss_class_f32(const float *s, int64_t B, int64_t K, float margin, float triplet_weight,
                      qg_class_loss_out *o, float *grad, const qg_ctx *ctx)
{
    if (!s || !o || B < 1 || K < 2 || !isfinite(margin) || !isfinite(triplet_weight)) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(B, K, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    double *row = (double *)qg_malloc(4 * B * (int64_t)sizeof(double));
    if (!row) return QG_ENOMEM;
    double *rcls = row, *rtri = row + B, *racc = row + 2 * B, *ratr = row + 3 * B;

    const int64_t rpb = loss_rows_per_block(K), nblk = (B + rpb - 1) / rpb;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    const double invB = 1.0 / (double)B, tw = (double)triplet_weight, mg = (double)margin;
    int stop = 0, bad = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t b0 = blk * rpb, b1 = b0 + rpb < B ? b0 + rpb : B;
        for (int64_t b = b0; b < b1; ++b) {
            const float *r = s + b * K;
            if (row_nonfinite(r, K)) {
                bad = 1;
                continue;
            }
            /* hardest negative: first max over j >= 1 */
            int64_t jn = 1;
            float neg = r[1];
            for (int64_t j = 2; j < K; ++j)
                if (r[j] > neg) {
                    neg = r[j];
                    jn = j;
                }
            const double pos = (double)r[0];
            const double mx = pos >= (double)neg ? pos : (double)neg;
            double se = 0.0;
            for (int64_t j = 0; j < K; ++j) se += exp((double)r[j] - mx);
            rcls[b] = mx + log(se) - pos;
            const double h = mg - pos + (double)neg;
            rtri[b] = h > 0.0 ? h : 0.0;
            racc[b] = pos >= (double)neg ? 1.0 : 0.0; /* first argmax is 0, ties with column 0 count */
            ratr[b] = pos > (double)neg ? 1.0 : 0.0;
            if (grad) {
                float *g = grad + b * K;
                const double c = invB / se;
                for (int64_t j = 0; j < K; ++j) g[j] = (float)(c * exp((double)r[j] - mx));
                double g0 = c * exp(pos - mx) - invB;
                if (h > 0.0) { /* zero gradient at the kink h == 0 */
                    g0 -= tw * invB;
                    g[jn] = (float)(c * exp((double)neg - mx) + tw * invB);
                }
                g[0] = (float)g0;
            }
        }
        qg_poll_block(ctx, &stop);
    }
    if (stop || bad) {
        qg_free(row);
        return stop ? QG_EINTR : QG_ENONFINITE;
    }
    double lc = 0.0, lt = 0.0, ac = 0.0, at = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        lc += rcls[b];
        lt += rtri[b];
        ac += racc[b];
        at += ratr[b];
    }
    qg_free(row);
    o->loss_cls = lc * invB;
    o->loss_triplet = lt * invB;
    o->loss = o->loss_cls + tw * o->loss_triplet;
    o->acc_cls = ac * invB;
    o->acc_triplet = at * invB;
    return QG_OK;
}

/* ---------------------------------------------------------------- batch-hard triplet */

int qg_loss_batch_triplet_f32(const float *s, const int64_t *labels, int64_t B, float margin, double *loss,
                              double *acc, int64_t *n_valid, float *grad, const qg_ctx *ctx)
{
    if (!s || !labels || !loss || B < 1 || !isfinite(margin)) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(B, B, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    /* per row: h (NaN when the row is invalid), jp, jn */
    double *rh = (double *)qg_malloc(B * (int64_t)sizeof(double));
    int64_t *rj = (int64_t *)qg_malloc(2 * B * (int64_t)sizeof(int64_t));
    if (!rh || !rj) {
        qg_free(rh);
        qg_free(rj);
        return QG_ENOMEM;
    }
    const int64_t rpb = loss_rows_per_block(B), nblk = (B + rpb - 1) / rpb;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    int stop = 0, bad = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t b0 = blk * rpb, b1 = b0 + rpb < B ? b0 + rpb : B;
        for (int64_t b = b0; b < b1; ++b) {
            const float *r = s + b * B;
            bad |= row_nonfinite(r, B);
            const int64_t l = labels[b];
            int64_t jp = -1, jn = -1;
            float pos = 0.0f, neg = 0.0f;
            for (int64_t j = 0; j < B; ++j) {
                if (labels[j] == l) {
                    if (j != b && (jp < 0 || r[j] < pos)) {
                        pos = r[j];
                        jp = j;
                    }
                } else if (jn < 0 || r[j] > neg) {
                    neg = r[j];
                    jn = j;
                }
            }
            rj[2 * b] = jp;
            rj[2 * b + 1] = jn;
            rh[b] = (jp >= 0 && jn >= 0) ? (double)margin - (double)pos + (double)neg : 0.0;
        }
        qg_poll_block(ctx, &stop);
    }
    if (stop || bad) {
        qg_free(rh);
        qg_free(rj);
        return stop ? QG_EINTR : QG_ENONFINITE;
    }
    int64_t nv = 0;
    double lsum = 0.0, asum = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        if (rj[2 * b] < 0 || rj[2 * b + 1] < 0) continue;
        ++nv;
        lsum += rh[b] > 0.0 ? rh[b] : 0.0;
        /* pos > neg  <=>  h < margin, evaluated on the float scores directly */
        asum += s[b * B + rj[2 * b]] > s[b * B + rj[2 * b + 1]] ? 1.0 : 0.0;
    }
    const double inv = nv > 0 ? 1.0 / (double)nv : 0.0;
    *loss = lsum * inv;
    if (acc) *acc = asum * inv;
    if (n_valid) *n_valid = nv;
    if (grad) {
        const float gv = (float)inv;
        QG_OMP(parallel for schedule(static) num_threads(nt))
        for (int64_t b = 0; b < B; ++b) {
            float *g = grad + b * B;
            memset(g, 0, (size_t)B * sizeof(float));
            if (rj[2 * b] >= 0 && rj[2 * b + 1] >= 0 && rh[b] > 0.0) {
                g[rj[2 * b]] = -gv;
                g[rj[2 * b + 1]] = gv;
            }
        }
    }
    qg_free(rh);
    qg_free(rj);
    return QG_OK;
}

/* Shared epilogue of the per-row losses: `row` holds n per-row losses then n per-row accuracies.
 * Sums them in row order (so any thread count gives the same bits), scales, frees `row`. */
static int finish_rows(double *row, int64_t n, double scale, int stop, int bad, double *loss, double *acc)
{
    if (stop || bad) {
        qg_free(row);
        return stop ? QG_EINTR : QG_ENONFINITE;
    }
    double ls = 0.0, as = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        ls += row[i];
        as += row[n + i];
    }
    qg_free(row);
    *loss = ls * scale;
    if (acc) *acc = as * scale;
    return QG_OK;
}

/* ---------------------------------------------------------------- pairwise BCE */

int qg_loss_pairwise_bce_f32(const float *s, int64_t P, int64_t G, const int64_t *lp, const int64_t *lg,
                             double *loss, double *acc, float *grad, const qg_ctx *ctx)
{
    if (!s || !lp || !lg || !loss || P < 1 || G < 1) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(P, G, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    double *row = (double *)qg_malloc(2 * P * (int64_t)sizeof(double));
    if (!row) return QG_ENOMEM;
    double *rl = row, *ra = row + P;
    const int64_t rpb = loss_rows_per_block(G), nblk = (P + rpb - 1) / rpb;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    const double invP = 1.0 / (double)P;
    int stop = 0, bad = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t p0 = blk * rpb, p1 = p0 + rpb < P ? p0 + rpb : P;
        for (int64_t p = p0; p < p1; ++p) {
            const float *r = s + p * G;
            bad |= row_nonfinite(r, G);
            const int64_t l = lp[p];
            double sum = 0.0;
            int havep = 0, haven = 0;
            float minp = 0.0f, maxn = 0.0f;
            for (int64_t g = 0; g < G; ++g) {
                const double x = (double)r[g];
                if (lg[g] == l) {
                    sum += softplus_d(-x);
                    if (!havep || r[g] < minp) minp = r[g];
                    havep = 1;
                } else {
                    sum += softplus_d(x);
                    if (!haven || r[g] > maxn) maxn = r[g];
                    haven = 1;
                }
            }
            rl[p] = sum;
            ra[p] = (havep && haven && minp > maxn) ? 1.0 : 0.0;
            if (grad) {
                float *gr = grad + p * G;
                for (int64_t g = 0; g < G; ++g)
                    gr[g] = (float)((sigmoid_d((double)r[g]) - (lg[g] == l ? 1.0 : 0.0)) * invP);
            }
        }
        qg_poll_block(ctx, &stop);
    }
    return finish_rows(row, P, invP, stop, bad, loss, acc);
}

/* ---------------------------------------------------------------- focal class memory */

/* Focal BCE term and its derivative for one score x with target t and exponent gamma.
 * q = t ? 1 - p : p, w = q^gamma; d(w * bce)/dx = (p - t) w + sgn * gamma * bce * q^gamma * (1 - q),
 * sgn = +1 (t = 0) or -1 (t = 1): no q^(gamma - 1), so gamma < 1 stays finite at q = 0. */
static inline double focal_term(double x, int t, double gamma, double *dx)
{
    const double p = sigmoid_d(x), pm = sigmoid_d(-x);
    const double q = t ? pm : p, q1 = t ? p : pm;
    const double l = t ? softplus_d(-x) : softplus_d(x);
    const double w = pow(q, gamma);
    if (dx) *dx = (t ? p - 1.0 : p) * w + (t ? -1.0 : 1.0) * gamma * l * w * q1;
    return l * w;
}

int qg_loss_focal_f32(const float *s, int64_t B, int64_t N, const int64_t *targets, float gamma, double *loss,
                      double *acc, float *grad, const qg_ctx *ctx)
{
    if (!s || !targets || !loss || B < 1 || N < 1 || !(gamma >= 0.0f) || !isfinite(gamma)) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(B, N, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    for (int64_t b = 0; b < B; ++b)
        if (targets[b] < 0 || targets[b] >= N) return QG_ERANGE;
    double *row = (double *)qg_malloc(2 * B * (int64_t)sizeof(double));
    if (!row) return QG_ENOMEM;
    double *rl = row, *ra = row + B;
    const int64_t rpb = loss_rows_per_block(N), nblk = (B + rpb - 1) / rpb;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    const double invB = 1.0 / (double)B, gm = (double)gamma;
    int stop = 0, bad = 0;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t b0 = blk * rpb, b1 = b0 + rpb < B ? b0 + rpb : B;
        for (int64_t b = b0; b < b1; ++b) {
            const float *r = s + b * N;
            bad |= row_nonfinite(r, N);
            const int64_t tg = targets[b];
            double sum = 0.0;
            int64_t am = 0;
            for (int64_t j = 0; j < N; ++j) {
                double d;
                sum += focal_term((double)r[j], j == tg, gm, grad ? &d : NULL);
                if (grad) grad[b * N + j] = (float)(d * invB);
                if (r[j] > r[am]) am = j;
            }
            rl[b] = sum;
            ra[b] = am == tg ? 1.0 : 0.0;
        }
        qg_poll_block(ctx, &stop);
    }
    return finish_rows(row, B, invB, stop, bad, loss, acc);
}
