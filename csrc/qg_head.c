/*
 * qg_head.c - QAConv head (scalar BN -> fc -> scalar BN), forward and backward, OpenMP.
 *
 * Work is split into row blocks (a row = one pair's 2S values) whose size depends only on
 * (M, S), never on the thread count. Per-block partials (double) are combined in block order,
 * so every result is bit-identical for any number of threads.
 *
 * The fc output is computed from per-row dot products with the *raw* input,
 *     z[m] = a1 * (w . x[m] - mean1 * sum(w)) + bn_bias * sum(w) + fc_bias_total,   a1 = g1 / sqrt(var1 + eps),
 * which equals fc(bn(x)) exactly in real arithmetic and costs one read of the input.
 */
#include "qg_head.h"

#include <math.h>
#include <string.h>

/* Upper bound of row blocks (bounds the [nblk, 2S] double scratch of the backward). */
#define HEAD_MAX_BLOCKS 256
/* Scratch budget for the per-block column partials, in doubles (16 MiB). */
#define HEAD_COL_BUDGET (INT64_C(1) << 21)

static int64_t head_rows_per_block(int64_t M, int64_t S)
{
    int64_t width = 2 * S;
    int64_t rpb = QG_CHUNK / width;
    if (rpb < 1) rpb = 1;
    int64_t cap = HEAD_COL_BUDGET / width;
    if (cap < 1) cap = 1;
    if (cap > HEAD_MAX_BLOCKS) cap = HEAD_MAX_BLOCKS;
    int64_t min_rpb = (M + cap - 1) / cap;
    if (rpb < min_rpb) rpb = min_rpb;
    return rpb;
}

/* Common size / parameter checks. Returns QG_OK or an error status. */
static int head_check(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p)
{
    if (!mp || !mg || !p || !p->fc_weight) return QG_EINVAL;
    if (M < 1 || S < 1) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(M, 2 * S, &n) || qg_mul_overflow(n, (int64_t)sizeof(double), &n)) return QG_EOVERFLOW;
    if (p->shared != 0 && p->shared != 1) return QG_EINVAL;
    if (!(p->eps > 0.0f) || !isfinite(p->eps)) return QG_EINVAL;
    if (!isfinite(p->bn_weight) || !isfinite(p->bn_bias) || !isfinite(p->fc_bias) || !isfinite(p->lbn_weight) ||
        !isfinite(p->lbn_bias))
        return QG_EINVAL;
    return QG_OK;
}

/* sum of fc weights as seen by the 2S inputs, and the total bias added to z */
static void head_wsum(const qg_head_params *p, int64_t S, double *wsum, double *bias_total)
{
    double w = 0.0;
    int64_t nw = p->shared ? S : 2 * S;
    for (int64_t j = 0; j < nw; ++j) w += (double)p->fc_weight[j];
    *wsum = p->shared ? 2.0 * w : w;
    *bias_total = p->shared ? 2.0 * (double)p->fc_bias : (double)p->fc_bias;
}

/* The pair weights' total (M when there are none); QG_EINVAL for a weight < 0 or non-finite, or a zero
 * total. Serial and in order, so the total is the same for any thread count. */
static int head_weight_total(const float *w, int64_t M, double *total)
{
    if (!w) {
        *total = (double)M;
        return QG_OK;
    }
    double t = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        if (!(w[m] >= 0.0f) || !isfinite(w[m])) return QG_EINVAL;
        t += (double)w[m];
    }
    if (!(t > 0.0) || !isfinite(t)) return QG_EINVAL;
    *total = t;
    return QG_OK;
}

/* Per-row sum and fc dot product over the raw input (double accumulation). */
static inline void head_row_sum_dot(const float *xs, const float *xg, const float *w, int64_t S, int shared,
                                    double *sum_out, double *dot_out)
{
    double sum = 0.0, dot = 0.0;
    if (shared) {
        QG_OMP(simd reduction(+ : sum, dot))
        for (int64_t j = 0; j < S; ++j) {
            double a = (double)xs[j], b = (double)xg[j];
            sum += a + b;
            dot += (double)w[j] * (a + b);
        }
    } else {
        const float *w2 = w + S;
        QG_OMP(simd reduction(+ : sum, dot))
        for (int64_t j = 0; j < S; ++j) {
            double a = (double)xs[j], b = (double)xg[j];
            sum += a + b;
            dot += (double)w[j] * a + (double)w2[j] * b;
        }
    }
    *sum_out = sum;
    *dot_out = dot;
}

static inline double head_row_m2(const float *xs, const float *xg, int64_t S, double mu)
{
    double m2 = 0.0;
    QG_OMP(simd reduction(+ : m2))
    for (int64_t j = 0; j < S; ++j) {
        double a = (double)xs[j] - mu, b = (double)xg[j] - mu;
        m2 += a * a + b * b;
    }
    return m2;
}

int qg_head_forward_train_f32(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                              float *z, float *out, qg_head_stats *st, const qg_ctx *ctx)
{
    int rc = head_check(mp, mg, M, S, p);
    if (rc != QG_OK) return rc;
    if (M < 2 || !out || !st) return QG_EINVAL;
    const float *pw = p->pair_weight;
    double wtot;
    rc = head_weight_total(pw, M, &wtot);
    if (rc != QG_OK) return rc;

    const int64_t rpb = head_rows_per_block(M, S);
    const int64_t nblk = (M + rpb - 1) / rpb;
    double *dot = (double *)qg_malloc((M + 3 * nblk) * (int64_t)sizeof(double));
    if (!dot) return QG_ENOMEM;
    double *bcnt = dot + M, *bmean = bcnt + nblk, *bm2 = bmean + nblk;

    /* pass 1: per-row dot products; per-block (count, mean, M2), rows merged in order (Chan et al.) */
    int stop = 0;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    const double row_n = (double)(2 * S);
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t m0 = blk * rpb, m1 = m0 + rpb < M ? m0 + rpb : M;
        double n = 0.0, mean = 0.0, m2 = 0.0;
        for (int64_t m = m0; m < m1; ++m) {
            const float *xs = mp + m * S, *xg = mg + m * S;
            double sum;
            head_row_sum_dot(xs, xg, p->fc_weight, S, p->shared, &sum, &dot[m]);
            /* a weighted row counts w times its 2S values (w = 1: the same bits as unweighted) */
            const double wn = pw ? (double)pw[m] * row_n : row_n;
            if (!(wn > 0.0)) continue;
            double mu = sum / row_n;
            double rm2 = head_row_m2(xs, xg, S, mu);
            if (pw) rm2 *= (double)pw[m];
            double nn = n + wn, delta = mu - mean;
            mean += delta * (wn / nn);
            m2 += rm2 + delta * delta * (n * wn / nn);
            n = nn;
        }
        bcnt[blk] = n;
        bmean[blk] = mean;
        bm2[blk] = m2;
        qg_poll_block(ctx, &stop);
    }
    if (stop) {
        qg_free(dot);
        return QG_EINTR;
    }
    double n = 0.0, mean1 = 0.0, m2 = 0.0;
    for (int64_t blk = 0; blk < nblk; ++blk) {
        double nb = bcnt[blk], nn = n + nb, delta = bmean[blk] - mean1;
        if (!(nb > 0.0)) continue; /* a block of zero-weight rows */
        mean1 += delta * (nb / nn);
        m2 += bm2[blk] + delta * delta * (n * nb / nn);
        n = nn;
    }
    double var1 = m2 / n;
    if (!isfinite(mean1) || !isfinite(var1)) {
        qg_free(dot);
        return QG_ENONFINITE;
    }

    /* fc output and logit_bn statistics (O(M), serial, in order) */
    double wsum, cb;
    head_wsum(p, S, &wsum, &cb);
    const double a1 = (double)p->bn_weight / sqrt(var1 + (double)p->eps);
    const double zoff = (double)p->bn_bias * wsum + cb - a1 * mean1 * wsum;
    double zsum = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        dot[m] = a1 * dot[m] + zoff;
        zsum += pw ? (double)pw[m] * dot[m] : dot[m];
    }
    double mean2 = zsum / wtot, zm2 = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        double d = dot[m] - mean2;
        zm2 += pw ? (double)pw[m] * d * d : d * d;
    }
    double var2 = zm2 / wtot;
    if (!isfinite(mean2) || !isfinite(var2)) {
        qg_free(dot);
        return QG_ENONFINITE;
    }
    const double a2 = (double)p->lbn_weight / sqrt(var2 + (double)p->eps);
    for (int64_t m = 0; m < M; ++m) {
        if (z) z[m] = (float)dot[m];
        out[m] = (float)(a2 * (dot[m] - mean2) + (double)p->lbn_bias);
    }
    st->mean1 = mean1;
    st->var1 = var1;
    st->mean2 = mean2;
    st->var2 = var2;
    qg_free(dot);
    return QG_OK;
}

int qg_head_forward_eval_f32(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                             float *out, const qg_ctx *ctx)
{
    int rc = head_check(mp, mg, M, S, p);
    if (rc != QG_OK) return rc;
    if (!out) return QG_EINVAL;
    const double v1 = (double)p->bn_running_var + (double)p->eps, v2 = (double)p->lbn_running_var + (double)p->eps;
    if (!(v1 > 0.0) || !(v2 > 0.0) || !isfinite(v1) || !isfinite(v2) || !isfinite(p->bn_running_mean) ||
        !isfinite(p->lbn_running_mean))
        return QG_EINVAL;
    double wsum, cb;
    head_wsum(p, S, &wsum, &cb);
    const double a1 = (double)p->bn_weight / sqrt(v1);
    const double a2 = (double)p->lbn_weight / sqrt(v2);
    const double zoff = (double)p->bn_bias * wsum + cb - a1 * (double)p->bn_running_mean * wsum;

    const int64_t rpb = head_rows_per_block(M, S);
    const int64_t nblk = (M + rpb - 1) / rpb;
    int stop = 0, bad = 0;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t m0 = blk * rpb, m1 = m0 + rpb < M ? m0 + rpb : M;
        for (int64_t m = m0; m < m1; ++m) {
            double sum, dot;
            head_row_sum_dot(mp + m * S, mg + m * S, p->fc_weight, S, p->shared, &sum, &dot);
            double zz = a1 * dot + zoff;
            double o = a2 * (zz - (double)p->lbn_running_mean) + (double)p->lbn_bias;
            bad |= !isfinite(sum) || !isfinite(o);
            out[m] = (float)o;
        }
        qg_poll_block(ctx, &stop);
    }
    if (stop) return QG_EINTR;
    return bad ? QG_ENONFINITE : QG_OK;
}

int qg_head_backward_f32(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                         const qg_head_stats *st, const float *z, const float *gout, float *gmp, float *gmg,
                         qg_head_grads *g, const qg_ctx *ctx)
{
    (void)z; /* the fc output is recomputed in double from the inputs (bit-identical to the forward) */
    int rc = head_check(mp, mg, M, S, p);
    if (rc != QG_OK) return rc;
    if (M < 2 || !st || !gout || !gmp || !gmg || !g || !g->fc_weight) return QG_EINVAL;
    if (!(st->var1 >= 0.0) || !(st->var2 >= 0.0) || !isfinite(st->mean1) || !isfinite(st->mean2) ||
        !isfinite(st->var1) || !isfinite(st->var2))
        return QG_EINVAL;
    const float *pw = p->pair_weight;
    double wtot;
    rc = head_weight_total(pw, M, &wtot);
    if (rc != QG_OK) return rc;

    const int64_t width = 2 * S;
    const int64_t rpb = head_rows_per_block(M, S);
    const int64_t nblk = (M + rpb - 1) / rpb;
    int64_t ncol, nscratch;
    if (qg_mul_overflow(nblk, width, &ncol)) return QG_EOVERFLOW;
    nscratch = 2 * M + ncol;
    double *xw = (double *)qg_malloc(nscratch * (int64_t)sizeof(double));
    if (!xw) return QG_ENOMEM;
    double *dz = xw + M, *col = dz + M;

    double wsum, cb;
    head_wsum(p, S, &wsum, &cb);
    const double g1 = (double)p->bn_weight, b1 = (double)p->bn_bias, g2 = (double)p->lbn_weight;
    const double inv1 = 1.0 / sqrt(st->var1 + (double)p->eps), inv2 = 1.0 / sqrt(st->var2 + (double)p->eps);
    const double a1 = g1 * inv1, mean1 = st->mean1;
    const double zoff = b1 * wsum + cb - a1 * mean1 * wsum;
    const int nt = qg_threads_for(ctx, nblk);
    (void)nt; /* unused without OpenMP */
    int stop = 0, bad = 0;

    /* pass A: dot products (as in the forward) */
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t m0 = blk * rpb, m1 = m0 + rpb < M ? m0 + rpb : M;
        for (int64_t m = m0; m < m1; ++m) {
            double sum;
            head_row_sum_dot(mp + m * S, mg + m * S, p->fc_weight, S, p->shared, &sum, &xw[m]);
        }
        qg_poll_block(ctx, &stop);
    }
    if (stop) {
        qg_free(xw);
        return QG_EINTR;
    }

    /* logit_bn backward (serial, O(M)): xw[m] becomes sum_j w_j xhat[m, j] */
    double s_g = 0.0, s_gz = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        double zd = a1 * xw[m] + zoff;
        double zhat = (zd - st->mean2) * inv2;
        xw[m] = inv1 * (xw[m] - mean1 * wsum);
        dz[m] = zhat; /* temporarily */
        s_g += (double)gout[m];
        s_gz += (double)gout[m] * zhat;
    }
    /* weighted statistics: pair m's share of the mean / variance corrections is w[m] / total */
    const double mg_ = s_g / wtot, mgz = s_gz / wtot;
    double s_dz = 0.0, s_dzxw = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        const double wm = pw ? (double)pw[m] : 1.0;
        double d = g2 * inv2 * ((double)gout[m] - wm * mg_ - dz[m] * (wm * mgz));
        dz[m] = d;
        s_dz += d;
        s_dzxw += d * xw[m];
    }
    g->lbn_weight = s_gz;
    g->lbn_bias = s_g;
    g->fc_bias = p->shared ? 2.0 * s_dz : s_dz;
    g->bn_bias = s_dz * wsum;
    g->bn_weight = s_dzxw;
    const double n1 = wtot * (double)width;
    const double A = g1 * s_dz * wsum / n1, Bc = g1 * s_dzxw / n1;

    /* pass B: input gradients and per-block column partials sum_m dz[m] * x[m, j] */
    const float *w = p->fc_weight;
    const float *w2 = p->shared ? w : w + S;
    QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad))
    for (int64_t blk = 0; blk < nblk; ++blk) {
        if (qg_stop_requested(&stop)) continue;
        int64_t m0 = blk * rpb, m1 = m0 + rpb < M ? m0 + rpb : M;
        double *cs = col + blk * width, *cg = cs + S;
        memset(cs, 0, (size_t)width * sizeof(double));
        for (int64_t m = m0; m < m1; ++m) {
            const float *xs = mp + m * S, *xg = mg + m * S;
            float *gs = gmp + m * S, *gg = gmg + m * S;
            const double d = dz[m], dg1 = d * g1;
            const double wm = pw ? (double)pw[m] : 1.0, Am = wm * A, Bm = wm * Bc;
            for (int64_t j = 0; j < S; ++j) {
                double a = (double)xs[j], b = (double)xg[j];
                cs[j] += d * a;
                cg[j] += d * b;
                gs[j] = (float)(inv1 * (dg1 * (double)w[j] - Am - (a - mean1) * inv1 * Bm));
                gg[j] = (float)(inv1 * (dg1 * (double)w2[j] - Am - (b - mean1) * inv1 * Bm));
            }
        }
        bad |= !isfinite(cs[0]);
        qg_poll_block(ctx, &stop);
    }
    if (stop) {
        qg_free(xw);
        return QG_EINTR;
    }

    /* fc weight gradient: sum_m dz[m] * y[m, j] = a1 * (C[j] - mean1 * s_dz) + b1 * s_dz, blocks in order */
    const int64_t nw = p->shared ? S : width;
    const int ntc = qg_threads_for(ctx, nw / 256 + 1);
    (void)ntc; /* unused without OpenMP */
    QG_OMP(parallel for schedule(static) num_threads(ntc))
    for (int64_t j = 0; j < nw; ++j) {
        double c = 0.0;
        for (int64_t blk = 0; blk < nblk; ++blk) {
            const double *cb_ = col + blk * width;
            c += p->shared ? cb_[j] + cb_[S + j] : cb_[j];
        }
        double k = p->shared ? 2.0 : 1.0;
        g->fc_weight[j] = (float)(a1 * (c - k * mean1 * s_dz) + k * b1 * s_dz);
    }
    qg_free(xw);
    if (bad || !isfinite(s_dzxw) || !isfinite(s_gz)) return QG_ENONFINITE;
    return QG_OK;
}
