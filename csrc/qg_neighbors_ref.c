/*
 * qg_neighbors_ref.c - scalar reference for qg_neighbors_topk_f32 (contract in qg_neighbors.h).
 *
 * Single thread, plain loops: for every row i, the dot product with every other row in double
 * (products of two floats are exact in double), similarity (float)(dot * (r_i * r_j)) with
 * r = 1 / max(||x||, 1e-12), and the same total order (similarity desc, index asc) as the fast
 * kernel. O(N^2 D) time, O(N) scratch. Kept as the portable fallback and a test oracle.
 * qg_neighbors_cross_topk_ref_f32 computes each pair with the same weights and dot product, so
 * its similarities are the symmetric reference's bits.
 */
#include "qg_neighbors_impl.h"

#include <math.h>

static void qg_ref_push(float *s, int64_t *ix, int64_t k, float v, int64_t j)
{
    if (!(v > s[k - 1] || (v == s[k - 1] && j < ix[k - 1]))) return;
    int64_t p = k - 1;
    while (p > 0 && (s[p - 1] < v || (s[p - 1] == v && ix[p - 1] > j))) {
        s[p] = s[p - 1];
        ix[p] = ix[p - 1];
        --p;
    }
    s[p] = v;
    ix[p] = j;
}

/* r[i] = 1 / max(||x_i||, 1e-12) from a double sum in d order; QG_ENONFINITE on NaN/Inf. */
static int qg_ref_weights(const float *E, int64_t n, int64_t D, double *r)
{
    for (int64_t i = 0; i < n; ++i) {
        double ss = 0.0;
        for (int64_t d = 0; d < D; ++d) ss += (double)E[i * D + d] * (double)E[i * D + d];
        if (!isfinite(ss)) return QG_ENONFINITE;
        double nrm = sqrt(ss);
        r[i] = 1.0 / (nrm > 1e-12 ? nrm : 1e-12);
    }
    return QG_OK;
}

/* Dot product of two rows in double, d ascending (products of floats are exact in double, so
 * the value does not depend on the order of the two rows). */
static double qg_ref_dot(const float *x, const float *y, int64_t D)
{
    double dot = 0.0;
    for (int64_t d = 0; d < D; ++d) dot += (double)x[d] * (double)y[d];
    return dot;
}

static void qg_ref_clear(float *s, int64_t *ix, int64_t n)
{
    for (int64_t t = 0; t < n; ++t) {
        s[t] = -INFINITY;
        ix[t] = INT64_MAX;
    }
}

int qg_neighbors_topk_ref_f32(const float *E, int64_t N, int64_t D, int64_t k, int64_t *idx, float *sim,
                              const qg_ctx *ctx)
{
    if (!E || !idx || N < 2 || D < 1 || k < 1 || k > N - 1) return QG_EINVAL;
    int64_t nd, nk;
    if (qg_mul_overflow(N, D, &nd) || qg_mul_overflow(N, k, &nk)) return QG_EOVERFLOW;
    if (nk > INT64_MAX / 8 || N > INT64_MAX / 16) return QG_EOVERFLOW;
    (void)nd;

    double *r = (double *)qg_malloc(N * (int64_t)sizeof(double));
    float *tops = sim ? sim : (float *)qg_malloc(nk * (int64_t)sizeof(float));
    int status = QG_OK;
    if (!r || !tops) {
        status = QG_ENOMEM;
        goto done;
    }
    status = qg_ref_weights(E, N, D, r);
    if (status != QG_OK) goto done;
    for (int64_t i = 0; i < N; ++i) {
        if (qg_poll(ctx)) {
            status = QG_EINTR;
            goto done;
        }
        float *s = tops + i * k;
        int64_t *ix = idx + i * k;
        qg_ref_clear(s, ix, k);
        for (int64_t j = 0; j < N; ++j) {
            if (j == i) continue;
            qg_ref_push(s, ix, k, (float)(qg_ref_dot(E + i * D, E + j * D, D) * (r[i] * r[j])), j);
        }
    }

done:
    if (tops && tops != sim) qg_free(tops);
    qg_free(r);
    return status;
}

int qg_neighbors_cross_topk_ref_f32(const float *A, int64_t na, int64_t a_id0, const float *B, int64_t nb,
                                    int64_t b_id0, int64_t D, int64_t ka, int64_t *idx_a, float *sim_a,
                                    int64_t kb, int64_t *idx_b, float *sim_b, const qg_ctx *ctx)
{
    int64_t nka, nkb;
    const int chk = qg_nb_cross_check(A, na, a_id0, B, nb, b_id0, D, ka, idx_a, kb, idx_b, &nka, &nkb);
    if (chk != QG_OK) return chk;

    double *r = (double *)qg_malloc((na + nb) * (int64_t)sizeof(double));
    float *tops_a = sim_a ? sim_a : (float *)qg_malloc(nka * (int64_t)sizeof(float));
    float *tops_b = sim_b ? sim_b : (float *)qg_malloc(nkb * (int64_t)sizeof(float));
    int status = QG_OK;
    if (!r || !tops_a || !tops_b) {
        status = QG_ENOMEM;
        goto done;
    }
    status = qg_ref_weights(A, na, D, r);
    if (status == QG_OK) status = qg_ref_weights(B, nb, D, r + na);
    if (status != QG_OK) goto done;
    qg_ref_clear(tops_a, idx_a, nka);
    qg_ref_clear(tops_b, idx_b, nkb);
    for (int64_t i = 0; i < na; ++i) {
        if (qg_poll(ctx)) {
            status = QG_EINTR;
            goto done;
        }
        for (int64_t j = 0; j < nb; ++j) {
            const float v = (float)(qg_ref_dot(A + i * D, B + j * D, D) * (r[i] * r[na + j]));
            qg_ref_push(tops_a + i * ka, idx_a + i * ka, ka, v, b_id0 + j);
            qg_ref_push(tops_b + j * kb, idx_b + j * kb, kb, v, a_id0 + i);
        }
    }

done:
    if (tops_b && tops_b != sim_b) qg_free(tops_b);
    if (tops_a && tops_a != sim_a) qg_free(tops_a);
    qg_free(r);
    return status;
}
