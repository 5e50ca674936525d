/*
 * qg_neighbors_ref.c - scalar reference for qg_neighbors_topk_f32 (contract in qg_neighbors.h).
 *
 * Single thread, plain loops: for every row i, the dot product with every other row in double
 * (products of two floats are exact in double), similarity (float)(dot * (r_i * r_j)) with
 * r = 1 / max(||x||, 1e-12), and the same total order (similarity desc, index asc) as the fast
 * kernel. O(N^2 D) time, O(N) scratch. Kept as the portable fallback and a test oracle.
 */
#include "qg_neighbors.h"

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
    for (int64_t i = 0; i < N; ++i) {
        double ss = 0.0;
        for (int64_t d = 0; d < D; ++d) ss += (double)E[i * D + d] * (double)E[i * D + d];
        if (!isfinite(ss)) {
            status = QG_ENONFINITE;
            goto done;
        }
        double nrm = sqrt(ss);
        r[i] = 1.0 / (nrm > 1e-12 ? nrm : 1e-12);
    }
    for (int64_t i = 0; i < N; ++i) {
        if (qg_poll(ctx)) {
            status = QG_EINTR;
            goto done;
        }
        float *s = tops + i * k;
        int64_t *ix = idx + i * k;
        for (int64_t t = 0; t < k; ++t) {
            s[t] = -INFINITY;
            ix[t] = INT64_MAX;
        }
        for (int64_t j = 0; j < N; ++j) {
            if (j == i) continue;
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += (double)E[i * D + d] * (double)E[j * D + d];
            qg_ref_push(s, ix, k, (float)(dot * (r[i] * r[j])), j);
        }
    }

done:
    if (tops && tops != sim) qg_free(tops);
    qg_free(r);
    return status;
}
