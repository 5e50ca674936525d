/*
 * _native_match.c - bindings of csrc/qg_match.* (location normalisation, the fused correlation + two-way
 * max, fused scores, the backward through the argmax), private; `_ref` rows bind the scalar reference
 * kernels. Maps arrive as 3-d [M, C, S] float32 (the Python wrappers reshape [M, C, H, W]); maxima and
 * argmax as 3-d [pairs_a, pairs_b, S]; candidates as [B, K] int64. Shapes are re-checked here.
 */
#include "_native.h"

#include "qg_match.h"

typedef int (*qg_norm_fwd_fn)(const float *, int64_t, int64_t, int64_t, float *, float *, const qg_ctx *);
typedef int (*qg_norm_bwd_fn)(const float *, const float *, const float *, int64_t, int64_t, int64_t, float *,
                              const qg_ctx *);
typedef int (*qg_norm_fwd_rows_fn)(const float *, int64_t, const int64_t *, int64_t, int64_t, int64_t, float *,
                                   float *, const qg_ctx *);
typedef int (*qg_norm_bwd_rows_fn)(const float *, const float *, int64_t, const int64_t *, const float *, int64_t,
                                   int64_t, int64_t, float *, const qg_ctx *);
typedef int (*qg_max_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, float *, float *,
                         uint16_t *, uint16_t *, const qg_ctx *);
typedef int (*qg_maxr_fn)(const float *, int64_t, const float *, int64_t, const int64_t *, int64_t, int64_t,
                          int64_t, float *, float *, uint16_t *, uint16_t *, const qg_ctx *);
typedef int (*qg_scores_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, const float *, float,
                            float *, const qg_ctx *);
typedef int (*qg_bwd_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, const float *,
                         const float *, const uint16_t *, const uint16_t *, float *, float *, const qg_ctx *);
typedef int (*qg_bwdr_fn)(const float *, int64_t, const float *, int64_t, const int64_t *, int64_t, int64_t,
                          int64_t, const float *, const float *, const uint16_t *, const uint16_t *, float *,
                          float *, const qg_ctx *);
typedef int (*qg_bwd_rows_fn)(const float *, int64_t, const float *, int64_t, const int64_t *, const float *,
                              int64_t, const int64_t *, int64_t, int64_t, int64_t, const float *, const float *,
                              const uint16_t *, const uint16_t *, float *, const qg_ctx *);

/* The restricted backward and which gradients it returns: QG_GRAD_X = (gX, None), QG_GRAD_E = (None, gE),
 * where the second argument is then the number of rows N of the table instead of the table (the gE side
 * never reads it); both: (gX, gE). */
enum { QG_GRAD_X = 1, QG_GRAD_E = 2 };
typedef struct qg_bwdr_kernel {
    qg_bwdr_fn fn;
    int which;
} qg_bwdr_kernel;
#define QG_BWDR(fn_, which_) (&(const qg_bwdr_kernel){.fn = (fn_), .which = (which_)})

/* ------------------------------------------------------------------ checks */

/* ValueError unless a [M, C, S] has C >= 1 and S >= 1. */
static int qg_check_cs(PyArrayObject *a, const char *name)
{
    if (QG_DIM(a, 1) < 1 || QG_DIM(a, 2) < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected C >= 1 and S >= 1", name);
        return -1;
    }
    return 0;
}

/* qg_check_cs, and S within the argmax's uint16 range. */
static int qg_check_maps(PyArrayObject *a, const char *name)
{
    if (qg_check_cs(a, name) < 0) return -1;
    if (QG_DIM(a, 2) > QG_MAX_LOCATIONS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d locations (H*W) are supported, got %lld", name,
                     QG_MAX_LOCATIONS, (long long)QG_DIM(a, 2));
        return -1;
    }
    return 0;
}

/* ValueError unless the candidates have one row per feature map. */
static int qg_check_cand(PyArrayObject *cand, PyArrayObject *X)
{
    if (QG_DIM(cand, 0) != QG_DIM(X, 0)) {
        PyErr_Format(PyExc_ValueError, "candidates: expected %lld rows (one per feature map), got %lld",
                     (long long)QG_DIM(X, 0), (long long)QG_DIM(cand, 0));
        return -1;
    }
    return 0;
}

/* A caller's array written in place: a writable, aligned, C-contiguous native float32 ndarray with 3
 * dimensions, else TypeError(msg). Shapes are the caller's check. */
static int qg_check_out3(PyObject *o, const char *msg)
{
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != NPY_FLOAT32 ||
        !PyArray_ISCARRAY((PyArrayObject *)o) || !PyArray_ISNOTSWAPPED((PyArrayObject *)o) ||
        PyArray_NDIM((PyArrayObject *)o) != 3) {
        PyErr_SetString(PyExc_TypeError, msg);
        return -1;
    }
    return 0;
}

/* Nonzero when the byte ranges of two arrays intersect (exact for the contiguous arrays the bindings
 * work on; conservative for strided views). */
static int qg_overlaps(PyArrayObject *a, PyArrayObject *b)
{
    const char *pa = PyArray_BYTES(a), *pb = PyArray_BYTES(b);
    const npy_intp na = PyArray_NBYTES(a), nb = PyArray_NBYTES(b);
    if (na == 0 || nb == 0) return 0;
    return pa < pb + nb && pb < pa + na;
}

/* table [N, C, S] and rows [R]: the shared inputs of the *_rows bindings. */
static int qg_rows_args(qg_frame *f, PyObject *eo, PyObject *ro, PyArrayObject **E, PyArrayObject **rows)
{
    if (!(*E = qg_in(f, eo, NPY_FLOAT32, 3, "table")) || !(*rows = qg_in(f, ro, NPY_INT64, 1, "rows")))
        return -1;
    return qg_check_cs(*E, "table");
}

/* The four [n0, n1, S] gradient / argmax inputs of a backward. */
static int qg_bwd_inputs(qg_frame *f, PyObject *const o[4], int64_t n0, int64_t n1, int64_t S, PyArrayObject *a[4])
{
    static const char *const names[4] = {"grad_mp", "grad_mg", "argmax_p", "argmax_g"};
    for (int i = 0; i < 4; ++i)
        if (!(a[i] = qg_in(f, o[i], i < 2 ? NPY_FLOAT32 : NPY_UINT16, 3, names[i])) ||
            qg_check_shape3(a[i], names[i], n0, n1, S) < 0)
            return -1;
    return 0;
}

/* The forward outputs mp, mg [n0, n1, S] and, if want, ap, ag (else NULL). */
static int qg_fwd_outputs(qg_frame *f, int64_t n0, int64_t n1, int64_t S, int want, PyArrayObject *o[4])
{
    const npy_intp d[3] = {(npy_intp)n0, (npy_intp)n1, (npy_intp)S};
    o[2] = o[3] = NULL;
    if (!(o[0] = qg_out(f, 3, d, NPY_FLOAT32)) || !(o[1] = qg_out(f, 3, d, NPY_FLOAT32))) return -1;
    if (want && (!(o[2] = qg_out(f, 3, d, NPY_UINT16)) || !(o[3] = qg_out(f, 3, d, NPY_UINT16)))) return -1;
    return 0;
}

static PyObject *qg_fwd_result(int want, PyArrayObject *const o[4])
{
    if (want) return Py_BuildValue("OOOO", o[0], o[1], o[2], o[3]);
    return Py_BuildValue("OO", o[0], o[1]);
}

#define QG_FWD_PTRS(o, want) QG_F32(o[0]), QG_F32(o[1]), (want) ? QG_U16(o[2]) : NULL, (want) ? QG_U16(o[3]) : NULL
#define QG_BWD_PTRS(a) QG_F32(a[0]), QG_F32(a[1]), QG_U16(a[2]), QG_U16(a[3])

/* ------------------------------------------------------------------ normalisation */

static PyObject *qg_norm_fwd_body(qg_frame *f, PyObject *args, PyObject *kw, qg_norm_fwd_fn fn, const char *label)
{
    (void)kw;
    PyObject *xo;
    int n_threads = 1;
    PyArrayObject *x, *y, *nrm;
    if (!PyArg_ParseTuple(args, "Oi", &xo, &n_threads) || qg_check_threads(n_threads) < 0 ||
        !(x = qg_in(f, xo, NPY_FLOAT32, 3, "x")) || qg_check_cs(x, "x") < 0)
        return NULL;
    const npy_intp dn[2] = {PyArray_DIM(x, 0), PyArray_DIM(x, 2)};
    if (!(y = qg_out(f, 3, PyArray_DIMS(x), NPY_FLOAT32)) || !(nrm = qg_out(f, 2, dn, NPY_FLOAT32))) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(x), QG_DIM(x, 0), QG_DIM(x, 1), QG_DIM(x, 2), QG_F32(y), QG_F32(nrm), ctx),
               label) < 0)
        return NULL;
    return Py_BuildValue("OO", y, nrm);
}

static PyObject *qg_norm_bwd_body(qg_frame *f, PyObject *args, PyObject *kw, qg_norm_bwd_fn fn, const char *label)
{
    (void)kw;
    PyObject *gyo, *yo, *no;
    int n_threads = 1;
    PyArrayObject *gy, *y, *nrm, *gx;
    if (!PyArg_ParseTuple(args, "OOOi", &gyo, &yo, &no, &n_threads) || qg_check_threads(n_threads) < 0 ||
        !(gy = qg_in(f, gyo, NPY_FLOAT32, 3, "grad_y")) || !(y = qg_in(f, yo, NPY_FLOAT32, 3, "y")) ||
        !(nrm = qg_in(f, no, NPY_FLOAT32, 2, "norms")) || qg_check_cs(gy, "grad_y") < 0)
        return NULL;
    const int64_t M = QG_DIM(gy, 0), C = QG_DIM(gy, 1), S = QG_DIM(gy, 2);
    if (qg_check_shape3(y, "y", M, C, S) < 0 || qg_check_shape2(nrm, "norms", M, S) < 0 ||
        !(gx = qg_out(f, 3, PyArray_DIMS(gy), NPY_FLOAT32)))
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(gy), QG_F32(y), QG_F32(nrm), M, C, S, QG_F32(gx), ctx), label) < 0) return NULL;
    return Py_BuildValue("O", gx);
}

static PyObject *qg_norm_fwd_rows_body(qg_frame *f, PyObject *args, PyObject *kw, qg_norm_fwd_rows_fn fn,
                                       const char *label)
{
    (void)kw;
    PyObject *eo, *ro;
    int n_threads = 1;
    PyArrayObject *E, *rows, *y, *nrm;
    if (!PyArg_ParseTuple(args, "OOi", &eo, &ro, &n_threads) || qg_check_threads(n_threads) < 0 ||
        qg_rows_args(f, eo, ro, &E, &rows) < 0)
        return NULL;
    const int64_t R = QG_DIM(rows, 0), C = QG_DIM(E, 1), S = QG_DIM(E, 2);
    const npy_intp dy[3] = {(npy_intp)R, (npy_intp)C, (npy_intp)S}, dn[2] = {(npy_intp)R, (npy_intp)S};
    if (!(y = qg_out(f, 3, dy, NPY_FLOAT32)) || !(nrm = qg_out(f, 2, dn, NPY_FLOAT32))) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(E), QG_DIM(E, 0), QG_I64(rows), R, C, S, QG_F32(y), QG_F32(nrm), ctx), label) < 0)
        return NULL;
    return Py_BuildValue("OO", y, nrm);
}

/* norm_backward_rows(grad_y, table, rows, norms, n_threads) -> grad_y, overwritten with grad_x: grad_y
 * must be a writable, aligned, C-contiguous native float32 [R, C, S] ndarray (the caller's own). */
static PyObject *qg_norm_bwd_rows_body(qg_frame *f, PyObject *args, PyObject *kw, qg_norm_bwd_rows_fn fn,
                                       const char *label)
{
    (void)kw;
    PyObject *go, *eo, *ro, *no;
    int n_threads = 1;
    PyArrayObject *E, *rows, *nrm;
    if (!PyArg_ParseTuple(args, "OOOOi", &go, &eo, &ro, &no, &n_threads) || qg_check_threads(n_threads) < 0 ||
        qg_check_out3(go, "grad_y: expected a writable C-contiguous native float32 ndarray [R, C, S] (updated in "
                          "place)") < 0 ||
        qg_rows_args(f, eo, ro, &E, &rows) < 0 || !(nrm = qg_in(f, no, NPY_FLOAT32, 2, "norms")))
        return NULL;
    PyArrayObject *gy = (PyArrayObject *)go;
    const int64_t R = QG_DIM(rows, 0), C = QG_DIM(E, 1), S = QG_DIM(E, 2);
    if (qg_check_shape3(gy, "grad_y", R, C, S) < 0 || qg_check_shape2(nrm, "norms", R, S) < 0) return NULL;
    if (qg_overlaps(E, gy)) {
        PyErr_SetString(PyExc_ValueError, "grad_y: must not share memory with the table");
        return NULL;
    }
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(gy), QG_F32(E), QG_DIM(E, 0), QG_I64(rows), QG_F32(nrm), R, C, S, QG_F32(gy), ctx),
               label) < 0)
        return NULL;
    return Py_BuildValue("O", go);
}

/* ------------------------------------------------------------------ forward */

static PyObject *qg_max_body(qg_frame *f, PyObject *args, PyObject *kw, qg_max_fn fn, const char *label)
{
    (void)kw;
    PyObject *po, *go;
    int want = 0, n_threads = 1;
    PyArrayObject *P, *G, *o[4];
    if (!PyArg_ParseTuple(args, "OOpi", &po, &go, &want, &n_threads) || qg_check_threads(n_threads) < 0 ||
        !(P = qg_in(f, po, NPY_FLOAT32, 3, "probe")) || !(G = qg_in(f, go, NPY_FLOAT32, 3, "gallery")) ||
        qg_check_maps(P, "probe") < 0)
        return NULL;
    const int64_t nP = QG_DIM(P, 0), nG = QG_DIM(G, 0), C = QG_DIM(P, 1), S = QG_DIM(P, 2);
    if (qg_check_shape3(G, "gallery", -1, C, S) < 0 || qg_fwd_outputs(f, nP, nG, S, want, o) < 0) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(P), nP, QG_F32(G), nG, C, S, QG_FWD_PTRS(o, want), ctx), label) < 0) return NULL;
    return qg_fwd_result(want, o);
}

static PyObject *qg_maxr_body(qg_frame *f, PyObject *args, PyObject *kw, qg_maxr_fn fn, const char *label)
{
    (void)kw;
    PyObject *xo, *eo, *co;
    int want = 0, n_threads = 1;
    PyArrayObject *X, *E, *cand, *o[4];
    if (!PyArg_ParseTuple(args, "OOOpi", &xo, &eo, &co, &want, &n_threads) || qg_check_threads(n_threads) < 0 ||
        !(X = qg_in(f, xo, NPY_FLOAT32, 3, "features")) || !(E = qg_in(f, eo, NPY_FLOAT32, 3, "embeds")) ||
        !(cand = qg_in(f, co, NPY_INT64, 2, "candidates")) || qg_check_maps(X, "features") < 0)
        return NULL;
    const int64_t B = QG_DIM(X, 0), K = QG_DIM(cand, 1), C = QG_DIM(X, 1), S = QG_DIM(X, 2);
    if (qg_check_shape3(E, "embeds", -1, C, S) < 0 || qg_check_cand(cand, X) < 0 ||
        qg_fwd_outputs(f, B, K, S, want, o) < 0)
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int st = fn(QG_F32(X), B, QG_F32(E), QG_DIM(E, 0), QG_I64(cand), K, C, S, QG_FWD_PTRS(o, want), ctx);
    if (qg_end(f, st, label) < 0) return NULL;
    return qg_fwd_result(want, o);
}

static PyObject *qg_scores_body(qg_frame *f, PyObject *args, PyObject *kw, qg_scores_fn fn, const char *label)
{
    (void)kw;
    PyObject *po, *go, *wo;
    double bias = 0.0;
    int n_threads = 1;
    PyArrayObject *P, *G, *w, *out;
    if (!PyArg_ParseTuple(args, "OOOdi", &po, &go, &wo, &bias, &n_threads) || qg_check_threads(n_threads) < 0 ||
        !(P = qg_in(f, po, NPY_FLOAT32, 3, "probe")) || !(G = qg_in(f, go, NPY_FLOAT32, 3, "gallery")) ||
        !(w = qg_in(f, wo, NPY_FLOAT32, 1, "weight")) || qg_check_maps(P, "probe") < 0)
        return NULL;
    const int64_t nP = QG_DIM(P, 0), nG = QG_DIM(G, 0), C = QG_DIM(P, 1), S = QG_DIM(P, 2);
    if (qg_check_shape3(G, "gallery", -1, C, S) < 0) return NULL;
    if (QG_DIM(w, 0) != 2 * S) {
        PyErr_Format(PyExc_ValueError, "weight: expected length 2*S = %lld, got %lld", (long long)(2 * S),
                     (long long)QG_DIM(w, 0));
        return NULL;
    }
    const npy_intp d[2] = {(npy_intp)nP, (npy_intp)nG};
    if (!(out = qg_out(f, 2, d, NPY_FLOAT32))) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(P), nP, QG_F32(G), nG, C, S, QG_F32(w), (float)bias, QG_F32(out), ctx), label) < 0)
        return NULL;
    return Py_BuildValue("O", out);
}

/* ------------------------------------------------------------------ backward */

static PyObject *qg_bwd_body(qg_frame *f, PyObject *args, PyObject *kw, qg_bwd_fn fn, const char *label)
{
    (void)kw;
    PyObject *po, *go, *gao[4];
    int n_threads = 1;
    PyArrayObject *P, *G, *ga[4], *gP, *gG;
    if (!PyArg_ParseTuple(args, "OOOOOOi", &po, &go, &gao[0], &gao[1], &gao[2], &gao[3], &n_threads) ||
        qg_check_threads(n_threads) < 0 || !(P = qg_in(f, po, NPY_FLOAT32, 3, "probe")) ||
        !(G = qg_in(f, go, NPY_FLOAT32, 3, "gallery")) || qg_check_maps(P, "probe") < 0)
        return NULL;
    const int64_t nP = QG_DIM(P, 0), nG = QG_DIM(G, 0), C = QG_DIM(P, 1), S = QG_DIM(P, 2);
    if (qg_check_shape3(G, "gallery", -1, C, S) < 0 || qg_bwd_inputs(f, gao, nP, nG, S, ga) < 0 ||
        !(gP = qg_out(f, 3, PyArray_DIMS(P), NPY_FLOAT32)) || !(gG = qg_out(f, 3, PyArray_DIMS(G), NPY_FLOAT32)))
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(P), nP, QG_F32(G), nG, C, S, QG_BWD_PTRS(ga), QG_F32(gP), QG_F32(gG), ctx),
               label) < 0)
        return NULL;
    return Py_BuildValue("OO", gP, gG);
}

static PyObject *qg_bwdr_body(qg_frame *f, PyObject *args, PyObject *kw, const qg_bwdr_kernel *kernel,
                              const char *label)
{
    (void)kw;
    PyObject *xo, *eo, *co, *gao[4];
    int n_threads = 1;
    PyArrayObject *X, *E = NULL, *cand, *ga[4], *gX = NULL, *gE = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOi", &xo, &eo, &co, &gao[0], &gao[1], &gao[2], &gao[3], &n_threads) ||
        qg_check_threads(n_threads) < 0 || !(X = qg_in(f, xo, NPY_FLOAT32, 3, "features")) ||
        qg_check_maps(X, "features") < 0)
        return NULL;
    const int64_t B = QG_DIM(X, 0), C = QG_DIM(X, 1), S = QG_DIM(X, 2);
    int64_t N;
    if (kernel->which == QG_GRAD_E) {
        N = (int64_t)PyLong_AsLongLong(eo);
        if (N == -1 && PyErr_Occurred()) return NULL;
        if (N < 0) {
            PyErr_Format(PyExc_ValueError, "n_rows: expected >= 0, got %lld", (long long)N);
            return NULL;
        }
    } else {
        if (!(E = qg_in(f, eo, NPY_FLOAT32, 3, "embeds")) || qg_check_shape3(E, "embeds", -1, C, S) < 0) return NULL;
        N = QG_DIM(E, 0);
    }
    if (!(cand = qg_in(f, co, NPY_INT64, 2, "candidates")) || qg_check_cand(cand, X) < 0) return NULL;
    const int64_t K = QG_DIM(cand, 1);
    const npy_intp de[3] = {(npy_intp)N, (npy_intp)C, (npy_intp)S};
    if (qg_bwd_inputs(f, gao, B, K, S, ga) < 0 ||
        ((kernel->which & QG_GRAD_X) && !(gX = qg_out(f, 3, PyArray_DIMS(X), NPY_FLOAT32))) ||
        ((kernel->which & QG_GRAD_E) && !(gE = qg_out(f, 3, de, NPY_FLOAT32))))
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int st = kernel->fn(QG_F32(X), B, E ? QG_F32(E) : NULL, N, QG_I64(cand), K, C, S, QG_BWD_PTRS(ga),
                              gX ? QG_F32(gX) : NULL, gE ? QG_F32(gE) : NULL, ctx);
    if (qg_end(f, st, label) < 0) return NULL;
    return Py_BuildValue("OO", gX ? (PyObject *)gX : Py_None, gE ? (PyObject *)gE : Py_None);
}

/* match_backward_restricted_rows(X, table, rows, norms, cand, gmp, gmg, ap, ag, n_threads[, out])
 * -> gE [R, C, S]: the class side of the restricted backward fused with the class rows' normalisation
 * backward. out: a caller's [R, C, S] float32 array to write gE into (returned; it must not share memory
 * with any input; after an error its contents are unspecified), so a step can reuse the buffer of its
 * normalised rows instead of faulting in a fresh one. */
static PyObject *qg_bwd_rows_body(qg_frame *f, PyObject *args, PyObject *kw, qg_bwd_rows_fn fn, const char *label)
{
    (void)kw;
    PyObject *xo, *eo, *ro, *no, *co, *gao[4], *outo = Py_None;
    int n_threads = 1;
    PyArrayObject *X, *E, *rows, *nrm, *cand, *ga[4], *gE;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOi|O", &xo, &eo, &ro, &no, &co, &gao[0], &gao[1], &gao[2], &gao[3],
                          &n_threads, &outo) ||
        qg_check_threads(n_threads) < 0 || !(X = qg_in(f, xo, NPY_FLOAT32, 3, "features")) ||
        qg_check_maps(X, "features") < 0 || qg_rows_args(f, eo, ro, &E, &rows) < 0)
        return NULL;
    const int64_t B = QG_DIM(X, 0), C = QG_DIM(X, 1), S = QG_DIM(X, 2), R = QG_DIM(rows, 0);
    if (qg_check_shape3(E, "table", -1, C, S) < 0 || !(nrm = qg_in(f, no, NPY_FLOAT32, 2, "norms")) ||
        qg_check_shape2(nrm, "norms", R, S) < 0 || !(cand = qg_in(f, co, NPY_INT64, 2, "candidates")) ||
        qg_check_cand(cand, X) < 0)
        return NULL;
    const int64_t K = QG_DIM(cand, 1);
    if (qg_bwd_inputs(f, gao, B, K, S, ga) < 0) return NULL;
    if (outo != Py_None) {
        if (qg_check_out3(outo, "out: expected None or a writable C-contiguous native float32 ndarray [R, C, S]") < 0)
            return NULL;
        gE = (PyArrayObject *)outo;
        if (qg_check_shape3(gE, "out", R, C, S) < 0) return NULL;
        PyArrayObject *const ins[] = {X, E, rows, nrm, cand, ga[0], ga[1], ga[2], ga[3]};
        for (size_t i = 0; i < sizeof(ins) / sizeof(ins[0]); ++i)
            if (qg_overlaps(gE, ins[i])) {
                PyErr_SetString(PyExc_ValueError, "out: must not share memory with any input");
                return NULL;
            }
    } else {
        const npy_intp de[3] = {(npy_intp)R, (npy_intp)C, (npy_intp)S};
        if (!(gE = qg_out(f, 3, de, NPY_FLOAT32))) return NULL;
    }
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int st = fn(QG_F32(X), B, QG_F32(E), QG_DIM(E, 0), QG_I64(rows), QG_F32(nrm), R, QG_I64(cand), K, C, S,
                      QG_BWD_PTRS(ga), QG_F32(gE), ctx);
    if (qg_end(f, st, label) < 0) return NULL;
    return Py_BuildValue("O", gE);
}

/* ------------------------------------------------------------------ the bindings */

#define QG_MATCH_BINDINGS(X)                                                                                     \
    X(VA, norm_forward, qg_norm_fwd_body, qg_norm_forward_f32, "normalize",                                       \
      "norm_forward(x[M,C,S], n_threads) -> (y, norms)")                                                         \
    X(VA, norm_forward_ref, qg_norm_fwd_body, qg_norm_forward_ref_f32, "normalize (ref)",                         \
      "scalar reference of norm_forward")                                                                         \
    X(VA, norm_backward, qg_norm_bwd_body, qg_norm_backward_f32, "normalize_backward",                            \
      "norm_backward(grad_y, y, norms, n_threads) -> grad_x")                                                    \
    X(VA, norm_backward_ref, qg_norm_bwd_body, qg_norm_backward_ref_f32, "normalize_backward (ref)",              \
      "scalar reference of norm_backward")                                                                        \
    X(VA, match_maxima, qg_max_body, qg_match_maxima_f32, "pair_maxima",                                          \
      "match_maxima(P[nP,C,S], G[nG,C,S], want_argmax, n_threads) -> (mp, mg[, ap, ag])")                        \
    X(VA, match_maxima_restricted, qg_maxr_body, qg_match_maxima_restricted_f32, "pair_maxima_restricted",        \
      "match_maxima_restricted(X, E, cand[B,K], want_argmax, n_threads) -> (mp, mg[, ap, ag])")                  \
    X(VA, match_maxima_restricted_ref, qg_maxr_body, qg_match_maxima_restricted_ref_f32,                          \
      "pair_maxima_restricted (ref)", "scalar reference of match_maxima_restricted")                              \
    X(VA, match_scores, qg_scores_body, qg_match_scores_f32, "match_scores",                                      \
      "match_scores(P, G, w[2S], bias, n_threads) -> [nP, nG]")                                                   \
    X(VA, match_backward, qg_bwd_body, qg_match_backward_f32, "pair_maxima_backward",                             \
      "match_backward(P, G, gmp, gmg, ap, ag, n_threads) -> (gP, gG)")                                            \
    X(VA, match_backward_restricted, qg_bwdr_body,                                                                \
      QG_BWDR(qg_match_backward_restricted_f32, QG_GRAD_X | QG_GRAD_E), "pair_maxima_restricted_backward",        \
      "match_backward_restricted(X, E, cand, gmp, gmg, ap, ag, n_threads) -> (gX, gE)")                          \
    X(VA, match_backward_restricted_features, qg_bwdr_body, QG_BWDR(qg_match_backward_restricted_f32, QG_GRAD_X), \
      "pair_maxima_restricted_backward",                                                                          \
      "match_backward_restricted_features(X, E, cand, gmp, gmg, ap, ag, n_threads) -> (gX, None)")              \
    X(VA, match_backward_restricted_embeds, qg_bwdr_body, QG_BWDR(qg_match_backward_restricted_f32, QG_GRAD_E),   \
      "pair_maxima_restricted_backward",                                                                          \
      "match_backward_restricted_embeds(X, n_rows, cand, gmp, gmg, ap, ag, n_threads) -> (None, gE)")           \
    X(VA, match_backward_restricted_rows, qg_bwd_rows_body, qg_match_backward_restricted_rows_f32,                \
      "pair_maxima_restricted_backward (rows)",                                                                   \
      "match_backward_restricted_rows(X, table, rows, norms, cand, gmp, gmg, ap, ag, n_threads[, out]) -> gE")   \
    X(VA, match_backward_restricted_ref, qg_bwdr_body,                                                            \
      QG_BWDR(qg_match_backward_restricted_ref_f32, QG_GRAD_X | QG_GRAD_E), "pair_maxima_restricted_backward (ref)", \
      "scalar reference of match_backward_restricted")                                                            \
    X(VA, norm_forward_rows, qg_norm_fwd_rows_body, qg_norm_forward_rows_f32, "normalize (rows)",                 \
      "norm_forward_rows(table[N,C,S], rows[R], n_threads) -> (y[R,C,S], norms[R,S])")                           \
    X(VA, norm_backward_rows, qg_norm_bwd_rows_body, qg_norm_backward_rows_f32, "normalize_backward (rows)",      \
      "norm_backward_rows(grad_y[R,C,S], table, rows, norms, n_threads) -> grad_y (overwritten)")

QG_MATCH_BINDINGS(QG_TRAMPOLINE)

PyMethodDef qg_match_methods[] = {QG_MATCH_BINDINGS(QG_METHOD_ROW){NULL, NULL, 0, NULL}};
