/*
 * _native.c - the one binding file between Python/NumPy and the C kernels in csrc/.
 *
 * Each binding: parse arguments, coerce arrays (PyArray_FROM_OTF with NPY_ARRAY_IN_ARRAY),
 * re-check shapes cheaply (Python validated already), allocate outputs, release the GIL,
 * call the kernel, re-acquire the GIL, map the status to an exception. One `fail:` exit per
 * function releases everything. New arrays are returned with Py_BuildValue("N", ...).
 * Long kernels poll for signals (Ctrl-C) every ~50 ms from the calling thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL qg_ARRAY_API
#include <numpy/arrayobject.h>

#include <stdlib.h>
#include <time.h>

#include "qg_common.h"
#include "qg_cpu.h"
#include "qg_head.h"
#include "qg_loss.h"
#include "qg_match.h"
#include "qg_neighbors.h"

/* ------------------------------------------------------------------ common helpers */

/* Highest ISA level kernels may use: the CPU's best, lowered by QG_ISA=portable|avx2|avx512 at
 * import or by the private set_isa() (tests run every path). Read and written with the GIL held. */
static int qg_isa_level = QG_ISA_PORTABLE;

typedef struct qg_call {
    PyThreadState *ts;
    double last_poll;
    qg_ctx ctx;
} qg_call;

static inline double qg_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Poll callback: runs on the calling thread with the GIL released; briefly re-takes the GIL
 * to let Python run pending signal handlers (SIGINT -> KeyboardInterrupt). */
static inline int qg_poll_signals(void *arg)
{
    qg_call *call = (qg_call *)arg;
    double now = qg_now();
    if (now - call->last_poll < 0.05) return 0;
    call->last_poll = now;
    PyEval_RestoreThread(call->ts);
    int r = PyErr_CheckSignals();
    call->ts = PyEval_SaveThread();
    return r != 0;
}

/* Release the GIL and prepare the kernel context. Pair every call with qg_call_end. */
static inline void qg_call_begin(qg_call *call, int n_threads)
{
    call->last_poll = qg_now();
    call->ctx.n_threads = n_threads > 0 ? n_threads : 1;
    call->ctx.isa = qg_isa_level;
    call->ctx.poll = qg_poll_signals;
    call->ctx.poll_arg = call;
    call->ts = PyEval_SaveThread();
}

static inline void qg_call_end(qg_call *call) { PyEval_RestoreThread(call->ts); }

/* Map a kernel status to a Python exception (GIL held). Returns -1 if an error is set. */
static inline int qg_check_status(int status, const char *func)
{
    switch (status) {
    case QG_OK:
        return 0;
    case QG_ENOMEM:
        PyErr_Format(PyExc_MemoryError, "%s: could not allocate scratch memory", func);
        return -1;
    case QG_EINTR:
        if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
        return -1;
    case QG_ERANGE:
        PyErr_Format(PyExc_ValueError, "%s: an index (label or candidate) is out of range", func);
        return -1;
    case QG_ENONFINITE:
        PyErr_Format(PyExc_ValueError, "%s: input contains NaN or Inf", func);
        return -1;
    case QG_EOVERFLOW:
        PyErr_Format(PyExc_ValueError, "%s: array size overflows 64-bit indexing", func);
        return -1;
    case QG_EINVAL:
        PyErr_Format(PyExc_ValueError, "%s: invalid argument (sizes or parameters)", func);
        return -1;
    default:
        PyErr_Format(PyExc_RuntimeError, "%s: kernel failed with status %d (%s)", func, status,
                     qg_status_str(status));
        return -1;
    }
}

/* Coerce to a C-contiguous aligned array of `typenum` with `ndim` dims (ndim < 0: any). */
static inline PyArrayObject *qg_array(PyObject *obj, int typenum, int ndim, const char *name)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, typenum, NPY_ARRAY_IN_ARRAY);
    if (a == NULL) return NULL;
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-d array, got %d-d", name, ndim,
                     PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* New uninitialised C-contiguous array. */
static inline PyArrayObject *qg_empty(int ndim, const npy_intp *dims, int typenum)
{
    return (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)dims, typenum, 0);
}

static inline PyArrayObject *qg_zeros(int ndim, const npy_intp *dims, int typenum)
{
    return (PyArrayObject *)PyArray_ZEROS(ndim, (npy_intp *)dims, typenum, 0);
}

static inline int qg_check_threads(int n_threads)
{
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads: expected an integer >= 1, got %d", n_threads);
        return -1;
    }
    return 0;
}

#define QG_F32(a) ((float *)PyArray_DATA(a))
#define QG_I64(a) ((int64_t *)PyArray_DATA(a))
#define QG_U16(a) ((uint16_t *)PyArray_DATA(a))
#define QG_DIM(a, i) ((int64_t)PyArray_DIM((a), (i)))

/* ------------------------------------------------------------------ kernel families */
/* Each family section defines static binding functions and a QG_<FAMILY>_METHODS list. */
/* ================================================================== neighbors (csrc/qg_neighbors*) */
/* Bindings for csrc/qg_neighbors.*. */

typedef int (*qg_neighbors_fn)(const float *, int64_t, int64_t, int64_t, int64_t *, float *, const qg_ctx *);

/* neighbors_topk(E [N, D] float32, k, n_threads, want_sim) -> idx [N, k] int64, or (idx, sim). */
static PyObject *qg_neighbors_common(PyObject *args, PyObject *kwds, qg_neighbors_fn fn, const char *func)
{
    static char *kwlist[] = {"E", "k", "n_threads", "want_sim", NULL};
    PyObject *e_obj = NULL;
    long long k = 0;
    int n_threads = 1, want_sim = 0;
    PyArrayObject *E = NULL, *idx = NULL, *sim = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OLip", kwlist, &e_obj, &k, &n_threads, &want_sim))
        return NULL;
    if (qg_check_threads(n_threads) < 0) goto fail;
    E = qg_array(e_obj, NPY_FLOAT32, 2, "E");
    if (E == NULL) goto fail;
    int64_t N = QG_DIM(E, 0), D = QG_DIM(E, 1);
    if (N < 2) {
        PyErr_Format(PyExc_ValueError, "E: need at least 2 classes (rows), got %lld", (long long)N);
        goto fail;
    }
    if (D < 1) {
        PyErr_Format(PyExc_ValueError, "E: expected a non-empty embedding dimension, got %lld", (long long)D);
        goto fail;
    }
    if (k < 1 || k > N - 1) {
        PyErr_Format(PyExc_ValueError, "k: expected an integer in [1, %lld], got %lld", (long long)(N - 1), k);
        goto fail;
    }
    npy_intp dims[2] = {(npy_intp)N, (npy_intp)k};
    idx = qg_empty(2, dims, NPY_INT64);
    if (idx == NULL) goto fail;
    if (want_sim) {
        sim = qg_empty(2, dims, NPY_FLOAT32);
        if (sim == NULL) goto fail;
    }
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = fn(QG_F32(E), N, D, (int64_t)k, QG_I64(idx), sim ? QG_F32(sim) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, func) < 0) goto fail;
    Py_DECREF(E);
    if (want_sim) return Py_BuildValue("NN", idx, sim);
    return Py_BuildValue("N", idx);
fail:
    Py_XDECREF(E);
    Py_XDECREF(idx);
    Py_XDECREF(sim);
    return NULL;
}

static PyObject *qg_py_neighbors_topk(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    return qg_neighbors_common(args, kwds, qg_neighbors_topk_f32, "class_neighbors");
}

static PyObject *qg_py_neighbors_topk_ref(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    return qg_neighbors_common(args, kwds, qg_neighbors_topk_ref_f32, "class_neighbors (reference)");
}

typedef int (*qg_neighbors_cross_fn)(const float *, int64_t, int64_t, const float *, int64_t, int64_t, int64_t,
                                     int64_t, int64_t *, float *, int64_t, int64_t *, float *, const qg_ctx *);

/* neighbors_cross_topk(A [na, D], B [nb, D] float32, a_start, b_start, k, n_threads, want_sim)
 * -> (idx_a [na, min(k, nb)], idx_b [nb, min(k, na)]) int64 global ids, or
 * (idx_a, sim_a, idx_b, sim_b). Rows of A have ids a_start.., rows of B b_start.. (disjoint). */
static PyObject *qg_neighbors_cross_common(PyObject *args, PyObject *kwds, qg_neighbors_cross_fn fn,
                                           const char *func)
{
    static char *kwlist[] = {"A", "B", "a_start", "b_start", "k", "n_threads", "want_sim", NULL};
    PyObject *a_obj = NULL, *b_obj = NULL;
    long long a_start = 0, b_start = 0, k = 0;
    int n_threads = 1, want_sim = 0;
    PyArrayObject *A = NULL, *B = NULL, *idx_a = NULL, *sim_a = NULL, *idx_b = NULL, *sim_b = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOLLLip", kwlist, &a_obj, &b_obj, &a_start, &b_start, &k,
                                     &n_threads, &want_sim))
        return NULL;
    if (qg_check_threads(n_threads) < 0) goto fail;
    A = qg_array(a_obj, NPY_FLOAT32, 2, "A");
    if (A == NULL) goto fail;
    B = qg_array(b_obj, NPY_FLOAT32, 2, "B");
    if (B == NULL) goto fail;
    int64_t na = QG_DIM(A, 0), nb = QG_DIM(B, 0), D = QG_DIM(A, 1);
    if (na < 1 || nb < 1) {
        PyErr_Format(PyExc_ValueError, "A, B: expected at least 1 row each, got %lld and %lld", (long long)na,
                     (long long)nb);
        goto fail;
    }
    if (D < 1 || QG_DIM(B, 1) != D) {
        PyErr_Format(PyExc_ValueError, "B: expected shape [%lld, %lld] (the row size of A, >= 1), got [%lld, %lld]",
                     (long long)nb, (long long)D, (long long)nb, (long long)QG_DIM(B, 1));
        goto fail;
    }
    if (k < 1) {
        PyErr_Format(PyExc_ValueError, "k: expected an integer >= 1, got %lld", k);
        goto fail;
    }
    if (a_start < 0 || b_start < 0 || a_start > INT64_MAX - 1 - na || b_start > INT64_MAX - 1 - nb ||
        (a_start < b_start + nb && b_start < a_start + na)) {
        PyErr_Format(PyExc_ValueError,
                     "a_start, b_start: expected disjoint non-negative id ranges, got a_start %lld (%lld rows) "
                     "and b_start %lld (%lld rows)",
                     a_start, (long long)na, b_start, (long long)nb);
        goto fail;
    }
    const int64_t ka = k < nb ? k : nb, kb = k < na ? k : na;
    npy_intp dims_a[2] = {(npy_intp)na, (npy_intp)ka}, dims_b[2] = {(npy_intp)nb, (npy_intp)kb};
    idx_a = qg_empty(2, dims_a, NPY_INT64);
    if (idx_a == NULL) goto fail;
    idx_b = qg_empty(2, dims_b, NPY_INT64);
    if (idx_b == NULL) goto fail;
    if (want_sim) {
        sim_a = qg_empty(2, dims_a, NPY_FLOAT32);
        if (sim_a == NULL) goto fail;
        sim_b = qg_empty(2, dims_b, NPY_FLOAT32);
        if (sim_b == NULL) goto fail;
    }
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = fn(QG_F32(A), na, (int64_t)a_start, QG_F32(B), nb, (int64_t)b_start, D, ka, QG_I64(idx_a),
                sim_a ? QG_F32(sim_a) : NULL, kb, QG_I64(idx_b), sim_b ? QG_F32(sim_b) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, func) < 0) goto fail;
    Py_DECREF(A);
    Py_DECREF(B);
    if (want_sim) return Py_BuildValue("NNNN", idx_a, sim_a, idx_b, sim_b);
    return Py_BuildValue("NN", idx_a, idx_b);
fail:
    Py_XDECREF(A);
    Py_XDECREF(B);
    Py_XDECREF(idx_a);
    Py_XDECREF(sim_a);
    Py_XDECREF(idx_b);
    Py_XDECREF(sim_b);
    return NULL;
}

static PyObject *qg_py_neighbors_cross_topk(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    return qg_neighbors_cross_common(args, kwds, qg_neighbors_cross_topk_f32, "cross_class_neighbors");
}

static PyObject *qg_py_neighbors_cross_topk_ref(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    return qg_neighbors_cross_common(args, kwds, qg_neighbors_cross_topk_ref_f32,
                                     "cross_class_neighbors (reference)");
}

/* neighbors_fma_probe(iters) -> flops done by the single-thread FMA peak probe at the current
 * ISA level (the caller times it; benchmarks only). Runs without the GIL. */
static PyObject *qg_py_neighbors_fma_probe(PyObject *self, PyObject *args)
{
    (void)self;
    long long iters = 0;
    if (!PyArg_ParseTuple(args, "L:neighbors_fma_probe", &iters)) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters: expected a non-negative integer, got %lld", iters);
        return NULL;
    }
    qg_call call;
    qg_call_begin(&call, 1);
    float sink = 0.0f;
    double flops = qg_neighbors_fma_probe((int64_t)iters, &call.ctx, &sink);
    qg_call_end(&call);
    return PyFloat_FromDouble(flops + 0.0 * (double)sink);
}

#define QG_NEIGHBORS_METHODS                                                                        \
    {"neighbors_topk", (PyCFunction)(void (*)(void))qg_py_neighbors_topk, METH_VARARGS | METH_KEYWORDS, \
     "neighbors_topk(E, k, n_threads, want_sim): blocked cosine kNN (private)."},                   \
    {"neighbors_topk_ref", (PyCFunction)(void (*)(void))qg_py_neighbors_topk_ref,                    \
     METH_VARARGS | METH_KEYWORDS, "neighbors_topk_ref(E, k, n_threads, want_sim): scalar reference (private)."}, \
    {"neighbors_cross_topk", (PyCFunction)(void (*)(void))qg_py_neighbors_cross_topk,                \
     METH_VARARGS | METH_KEYWORDS,                                                                   \
     "neighbors_cross_topk(A, B, a_start, b_start, k, n_threads, want_sim): cross-block cosine kNN (private)."}, \
    {"neighbors_cross_topk_ref", (PyCFunction)(void (*)(void))qg_py_neighbors_cross_topk_ref,        \
     METH_VARARGS | METH_KEYWORDS,                                                                   \
     "neighbors_cross_topk_ref(A, B, a_start, b_start, k, n_threads, want_sim): scalar reference (private)."}, \
    {"neighbors_fma_probe", qg_py_neighbors_fma_probe, METH_VARARGS,                                  \
     "neighbors_fma_probe(iters): flops of the FMA peak probe (private; benchmarks)."},

/* ================================================================== match (csrc/qg_match*) */
/* Bindings for csrc/qg_match.*.
 *
 * Maps arrive as 3-d [M, C, S] float32 (the Python wrappers reshape [M, C, H, W]); maxima and
 * argmax as 3-d [pairs_a, pairs_b, S]; candidates as [B, K] int64. Shapes are re-checked here.
 */

typedef int (*qg_norm_fwd_fn)(const float *, int64_t, int64_t, int64_t, float *, float *, const qg_ctx *);
typedef int (*qg_norm_bwd_fn)(const float *, const float *, const float *, int64_t, int64_t, int64_t,
                              float *, const qg_ctx *);
typedef int (*qg_maxr_fn)(const float *, int64_t, const float *, int64_t, const int64_t *, int64_t, int64_t,
                          int64_t, float *, float *, uint16_t *, uint16_t *, const qg_ctx *);
typedef int (*qg_bwdr_fn)(const float *, int64_t, const float *, int64_t, const int64_t *, int64_t, int64_t,
                          int64_t, const float *, const float *, const uint16_t *, const uint16_t *, float *,
                          float *, const qg_ctx *);

/* ValueError unless a has shape (d0, d1, d2); d < 0 means any. */
static int qg_match_shape3(PyArrayObject *a, const char *name, int64_t d0, int64_t d1, int64_t d2)
{
    const int64_t want[3] = {d0, d1, d2};
    for (int i = 0; i < 3; ++i) {
        if (want[i] >= 0 && QG_DIM(a, i) != want[i]) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld, %lld), got (%lld, %lld, %lld)", name,
                         (long long)d0, (long long)d1, (long long)d2, (long long)QG_DIM(a, 0),
                         (long long)QG_DIM(a, 1), (long long)QG_DIM(a, 2));
            return -1;
        }
    }
    return 0;
}

static int qg_match_check_S(PyArrayObject *a, const char *name)
{
    if (QG_DIM(a, 1) < 1 || QG_DIM(a, 2) < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected C >= 1 and S >= 1", name);
        return -1;
    }
    if (QG_DIM(a, 2) > QG_MAX_LOCATIONS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d locations (H*W) are supported, got %lld", name,
                     QG_MAX_LOCATIONS, (long long)QG_DIM(a, 2));
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ normalisation */

static PyObject *qg_norm_forward_impl(PyObject *args, qg_norm_fwd_fn fn, const char *fname)
{
    PyObject *xo;
    int n_threads = 1;
    PyArrayObject *x = NULL, *y = NULL, *nrm = NULL;
    if (!PyArg_ParseTuple(args, "Oi", &xo, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    x = qg_array(xo, NPY_FLOAT32, 3, "x");
    if (!x) goto fail;
    if (QG_DIM(x, 1) < 1 || QG_DIM(x, 2) < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected C >= 1 and S >= 1");
        goto fail;
    }
    npy_intp dn[2] = {PyArray_DIM(x, 0), PyArray_DIM(x, 2)};
    y = qg_empty(3, PyArray_DIMS(x), NPY_FLOAT32);
    nrm = qg_empty(2, dn, NPY_FLOAT32);
    if (!y || !nrm) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = fn(QG_F32(x), QG_DIM(x, 0), QG_DIM(x, 1), QG_DIM(x, 2), QG_F32(y), QG_F32(nrm), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, fname) < 0) goto fail;
    Py_DECREF(x);
    return Py_BuildValue("NN", y, nrm);
fail:
    Py_XDECREF(x);
    Py_XDECREF(y);
    Py_XDECREF(nrm);
    return NULL;
}

static PyObject *qg_py_norm_forward(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_norm_forward_impl(args, qg_norm_forward_f32, "normalize");
}

static PyObject *qg_py_norm_forward_ref(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_norm_forward_impl(args, qg_norm_forward_ref_f32, "normalize (ref)");
}

static PyObject *qg_norm_backward_impl(PyObject *args, qg_norm_bwd_fn fn, const char *fname)
{
    PyObject *gyo, *yo, *no;
    int n_threads = 1;
    PyArrayObject *gy = NULL, *y = NULL, *nrm = NULL, *gx = NULL;
    if (!PyArg_ParseTuple(args, "OOOi", &gyo, &yo, &no, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    gy = qg_array(gyo, NPY_FLOAT32, 3, "grad_y");
    if (!gy) goto fail;
    y = qg_array(yo, NPY_FLOAT32, 3, "y");
    if (!y) goto fail;
    nrm = qg_array(no, NPY_FLOAT32, 2, "norms");
    if (!nrm) goto fail;
    if (QG_DIM(gy, 1) < 1 || QG_DIM(gy, 2) < 1) {
        PyErr_SetString(PyExc_ValueError, "grad_y: expected C >= 1 and S >= 1");
        goto fail;
    }
    if (qg_match_shape3(y, "y", QG_DIM(gy, 0), QG_DIM(gy, 1), QG_DIM(gy, 2)) < 0) goto fail;
    if (QG_DIM(nrm, 0) != QG_DIM(gy, 0) || QG_DIM(nrm, 1) != QG_DIM(gy, 2)) {
        PyErr_Format(PyExc_ValueError, "norms: expected shape (%lld, %lld), got (%lld, %lld)",
                     (long long)QG_DIM(gy, 0), (long long)QG_DIM(gy, 2), (long long)QG_DIM(nrm, 0),
                     (long long)QG_DIM(nrm, 1));
        goto fail;
    }
    gx = qg_empty(3, PyArray_DIMS(gy), NPY_FLOAT32);
    if (!gx) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = fn(QG_F32(gy), QG_F32(y), QG_F32(nrm), QG_DIM(gy, 0), QG_DIM(gy, 1), QG_DIM(gy, 2), QG_F32(gx),
                &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, fname) < 0) goto fail;
    Py_DECREF(gy);
    Py_DECREF(y);
    Py_DECREF(nrm);
    return Py_BuildValue("N", gx);
fail:
    Py_XDECREF(gy);
    Py_XDECREF(y);
    Py_XDECREF(nrm);
    Py_XDECREF(gx);
    return NULL;
}

static PyObject *qg_py_norm_backward(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_norm_backward_impl(args, qg_norm_backward_f32, "normalize_backward");
}

static PyObject *qg_py_norm_backward_ref(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_norm_backward_impl(args, qg_norm_backward_ref_f32, "normalize_backward (ref)");
}

/* table [N, C, S] and rows [R] in [0, N): shared argument checks of the two *_rows bindings. */
static int qg_norm_rows_args(PyObject *eo, PyObject *ro, PyArrayObject **E, PyArrayObject **rows)
{
    *E = qg_array(eo, NPY_FLOAT32, 3, "table");
    if (!*E) return -1;
    *rows = qg_array(ro, NPY_INT64, 1, "rows");
    if (!*rows) return -1;
    if (QG_DIM(*E, 1) < 1 || QG_DIM(*E, 2) < 1) {
        PyErr_SetString(PyExc_ValueError, "table: expected C >= 1 and S >= 1");
        return -1;
    }
    return 0;
}

static PyObject *qg_py_norm_forward_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *eo, *ro;
    int n_threads = 1;
    PyArrayObject *E = NULL, *rows = NULL, *y = NULL, *nrm = NULL;
    if (!PyArg_ParseTuple(args, "OOi", &eo, &ro, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (qg_norm_rows_args(eo, ro, &E, &rows) < 0) goto fail;
    npy_intp dy[3] = {PyArray_DIM(rows, 0), PyArray_DIM(E, 1), PyArray_DIM(E, 2)};
    npy_intp dn[2] = {PyArray_DIM(rows, 0), PyArray_DIM(E, 2)};
    y = qg_empty(3, dy, NPY_FLOAT32);
    nrm = qg_empty(2, dn, NPY_FLOAT32);
    if (!y || !nrm) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = qg_norm_forward_rows_f32(QG_F32(E), QG_DIM(E, 0), QG_I64(rows), QG_DIM(rows, 0), QG_DIM(E, 1),
                                      QG_DIM(E, 2), QG_F32(y), QG_F32(nrm), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, "normalize (rows)") < 0) goto fail;
    Py_DECREF(E);
    Py_DECREF(rows);
    return Py_BuildValue("NN", y, nrm);
fail:
    Py_XDECREF(E);
    Py_XDECREF(rows);
    Py_XDECREF(y);
    Py_XDECREF(nrm);
    return NULL;
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

/* norm_backward_rows(grad_y, table, rows, norms, n_threads) -> grad_y, overwritten with grad_x: grad_y
 * must be a writable, aligned, C-contiguous native float32 [R, C, S] ndarray (the caller's own). */
static PyObject *qg_py_norm_backward_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *go, *eo, *ro, *no;
    int n_threads = 1;
    PyArrayObject *E = NULL, *rows = NULL, *nrm = NULL;
    if (!PyArg_ParseTuple(args, "OOOOi", &go, &eo, &ro, &no, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (qg_check_out3(go, "grad_y: expected a writable C-contiguous native float32 ndarray [R, C, S] (updated in "
                          "place)") < 0)
        return NULL;
    PyArrayObject *gy = (PyArrayObject *)go;
    if (qg_norm_rows_args(eo, ro, &E, &rows) < 0) goto fail;
    nrm = qg_array(no, NPY_FLOAT32, 2, "norms");
    if (!nrm) goto fail;
    if (qg_match_shape3(gy, "grad_y", QG_DIM(rows, 0), QG_DIM(E, 1), QG_DIM(E, 2)) < 0) goto fail;
    if (QG_DIM(nrm, 0) != QG_DIM(rows, 0) || QG_DIM(nrm, 1) != QG_DIM(E, 2)) {
        PyErr_Format(PyExc_ValueError, "norms: expected shape (%lld, %lld), got (%lld, %lld)",
                     (long long)QG_DIM(rows, 0), (long long)QG_DIM(E, 2), (long long)QG_DIM(nrm, 0),
                     (long long)QG_DIM(nrm, 1));
        goto fail;
    }
    if (qg_overlaps(E, gy)) {
        PyErr_SetString(PyExc_ValueError, "grad_y: must not share memory with the table");
        goto fail;
    }
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = qg_norm_backward_rows_f32(QG_F32(gy), QG_F32(E), QG_DIM(E, 0), QG_I64(rows), QG_F32(nrm),
                                       QG_DIM(rows, 0), QG_DIM(E, 1), QG_DIM(E, 2), QG_F32(gy), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, "normalize_backward (rows)") < 0) goto fail;
    Py_DECREF(E);
    Py_DECREF(rows);
    Py_DECREF(nrm);
    Py_INCREF(go);
    return go;
fail:
    Py_XDECREF(E);
    Py_XDECREF(rows);
    Py_XDECREF(nrm);
    return NULL;
}

/* ------------------------------------------------------------------ forward */

/* Allocate the forward outputs [n0, n1, S] (argmax only if want). */
static int qg_match_alloc_fwd(int64_t n0, int64_t n1, int64_t S, int want, PyArrayObject **mp,
                              PyArrayObject **mg, PyArrayObject **ap, PyArrayObject **ag)
{
    npy_intp d[3] = {(npy_intp)n0, (npy_intp)n1, (npy_intp)S};
    *mp = qg_empty(3, d, NPY_FLOAT32);
    *mg = qg_empty(3, d, NPY_FLOAT32);
    if (!*mp || !*mg) return -1;
    if (want) {
        *ap = qg_empty(3, d, NPY_UINT16);
        *ag = qg_empty(3, d, NPY_UINT16);
        if (!*ap || !*ag) return -1;
    }
    return 0;
}

static PyObject *qg_match_build_fwd(int want, PyArrayObject *mp, PyArrayObject *mg, PyArrayObject *ap,
                                    PyArrayObject *ag)
{
    if (want) return Py_BuildValue("NNNN", mp, mg, ap, ag);
    return Py_BuildValue("NN", mp, mg);
}

static PyObject *qg_py_match_maxima(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *po, *go;
    int want = 0, n_threads = 1;
    PyArrayObject *P = NULL, *G = NULL, *mp = NULL, *mg = NULL, *ap = NULL, *ag = NULL;
    if (!PyArg_ParseTuple(args, "OOpi", &po, &go, &want, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    P = qg_array(po, NPY_FLOAT32, 3, "probe");
    if (!P) goto fail;
    G = qg_array(go, NPY_FLOAT32, 3, "gallery");
    if (!G) goto fail;
    if (qg_match_check_S(P, "probe") < 0) goto fail;
    if (qg_match_shape3(G, "gallery", -1, QG_DIM(P, 1), QG_DIM(P, 2)) < 0) goto fail;
    const int64_t C = QG_DIM(P, 1), S = QG_DIM(P, 2);
    if (qg_match_alloc_fwd(QG_DIM(P, 0), QG_DIM(G, 0), S, want, &mp, &mg, &ap, &ag) < 0) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = qg_match_maxima_f32(QG_F32(P), QG_DIM(P, 0), QG_F32(G), QG_DIM(G, 0), C, S, QG_F32(mp),
                                 QG_F32(mg), want ? QG_U16(ap) : NULL, want ? QG_U16(ag) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, "pair_maxima") < 0) goto fail;
    Py_DECREF(P);
    Py_DECREF(G);
    return qg_match_build_fwd(want, mp, mg, ap, ag);
fail:
    Py_XDECREF(P);
    Py_XDECREF(G);
    Py_XDECREF(mp);
    Py_XDECREF(mg);
    Py_XDECREF(ap);
    Py_XDECREF(ag);
    return NULL;
}

static PyObject *qg_match_maxima_restricted_impl(PyObject *args, qg_maxr_fn fn, const char *fname)
{
    PyObject *xo, *eo, *co;
    int want = 0, n_threads = 1;
    PyArrayObject *X = NULL, *E = NULL, *cand = NULL, *mp = NULL, *mg = NULL, *ap = NULL, *ag = NULL;
    if (!PyArg_ParseTuple(args, "OOOpi", &xo, &eo, &co, &want, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    X = qg_array(xo, NPY_FLOAT32, 3, "features");
    if (!X) goto fail;
    E = qg_array(eo, NPY_FLOAT32, 3, "embeds");
    if (!E) goto fail;
    cand = qg_array(co, NPY_INT64, 2, "candidates");
    if (!cand) goto fail;
    if (qg_match_check_S(X, "features") < 0) goto fail;
    if (qg_match_shape3(E, "embeds", -1, QG_DIM(X, 1), QG_DIM(X, 2)) < 0) goto fail;
    if (QG_DIM(cand, 0) != QG_DIM(X, 0)) {
        PyErr_Format(PyExc_ValueError, "candidates: expected %lld rows (one per feature map), got %lld",
                     (long long)QG_DIM(X, 0), (long long)QG_DIM(cand, 0));
        goto fail;
    }
    const int64_t B = QG_DIM(X, 0), K = QG_DIM(cand, 1), C = QG_DIM(X, 1), S = QG_DIM(X, 2);
    if (qg_match_alloc_fwd(B, K, S, want, &mp, &mg, &ap, &ag) < 0) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = fn(QG_F32(X), B, QG_F32(E), QG_DIM(E, 0), QG_I64(cand), K, C, S, QG_F32(mp), QG_F32(mg),
                want ? QG_U16(ap) : NULL, want ? QG_U16(ag) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, fname) < 0) goto fail;
    Py_DECREF(X);
    Py_DECREF(E);
    Py_DECREF(cand);
    return qg_match_build_fwd(want, mp, mg, ap, ag);
fail:
    Py_XDECREF(X);
    Py_XDECREF(E);
    Py_XDECREF(cand);
    Py_XDECREF(mp);
    Py_XDECREF(mg);
    Py_XDECREF(ap);
    Py_XDECREF(ag);
    return NULL;
}

static PyObject *qg_py_match_maxima_restricted(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_match_maxima_restricted_impl(args, qg_match_maxima_restricted_f32, "pair_maxima_restricted");
}

static PyObject *qg_py_match_maxima_restricted_ref(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_match_maxima_restricted_impl(args, qg_match_maxima_restricted_ref_f32,
                                           "pair_maxima_restricted (ref)");
}

static PyObject *qg_py_match_scores(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *po, *go, *wo;
    double bias = 0.0;
    int n_threads = 1;
    PyArrayObject *P = NULL, *G = NULL, *w = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "OOOdi", &po, &go, &wo, &bias, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    P = qg_array(po, NPY_FLOAT32, 3, "probe");
    if (!P) goto fail;
    G = qg_array(go, NPY_FLOAT32, 3, "gallery");
    if (!G) goto fail;
    w = qg_array(wo, NPY_FLOAT32, 1, "weight");
    if (!w) goto fail;
    if (qg_match_check_S(P, "probe") < 0) goto fail;
    if (qg_match_shape3(G, "gallery", -1, QG_DIM(P, 1), QG_DIM(P, 2)) < 0) goto fail;
    const int64_t C = QG_DIM(P, 1), S = QG_DIM(P, 2);
    if (QG_DIM(w, 0) != 2 * S) {
        PyErr_Format(PyExc_ValueError, "weight: expected length 2*S = %lld, got %lld", (long long)(2 * S),
                     (long long)QG_DIM(w, 0));
        goto fail;
    }
    npy_intp d[2] = {PyArray_DIM(P, 0), PyArray_DIM(G, 0)};
    out = qg_empty(2, d, NPY_FLOAT32);
    if (!out) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = qg_match_scores_f32(QG_F32(P), QG_DIM(P, 0), QG_F32(G), QG_DIM(G, 0), C, S, QG_F32(w),
                                 (float)bias, QG_F32(out), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, "match_scores") < 0) goto fail;
    Py_DECREF(P);
    Py_DECREF(G);
    Py_DECREF(w);
    return Py_BuildValue("N", out);
fail:
    Py_XDECREF(P);
    Py_XDECREF(G);
    Py_XDECREF(w);
    Py_XDECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------ backward */

/* Coerce and check the four [n0, n1, S] gradient / argmax arrays. */
static int qg_match_bwd_arrays(PyObject *gmpo, PyObject *gmgo, PyObject *apo, PyObject *ago, int64_t n0,
                               int64_t n1, int64_t S, PyArrayObject **gmp, PyArrayObject **gmg,
                               PyArrayObject **ap, PyArrayObject **ag)
{
    *gmp = qg_array(gmpo, NPY_FLOAT32, 3, "grad_mp");
    if (!*gmp || qg_match_shape3(*gmp, "grad_mp", n0, n1, S) < 0) return -1;
    *gmg = qg_array(gmgo, NPY_FLOAT32, 3, "grad_mg");
    if (!*gmg || qg_match_shape3(*gmg, "grad_mg", n0, n1, S) < 0) return -1;
    *ap = qg_array(apo, NPY_UINT16, 3, "argmax_p");
    if (!*ap || qg_match_shape3(*ap, "argmax_p", n0, n1, S) < 0) return -1;
    *ag = qg_array(ago, NPY_UINT16, 3, "argmax_g");
    if (!*ag || qg_match_shape3(*ag, "argmax_g", n0, n1, S) < 0) return -1;
    return 0;
}

static PyObject *qg_py_match_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *po, *go, *gmpo, *gmgo, *apo, *ago;
    int n_threads = 1;
    PyArrayObject *P = NULL, *G = NULL, *gmp = NULL, *gmg = NULL, *ap = NULL, *ag = NULL;
    PyArrayObject *gP = NULL, *gG = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOi", &po, &go, &gmpo, &gmgo, &apo, &ago, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    P = qg_array(po, NPY_FLOAT32, 3, "probe");
    if (!P) goto fail;
    G = qg_array(go, NPY_FLOAT32, 3, "gallery");
    if (!G) goto fail;
    if (qg_match_check_S(P, "probe") < 0) goto fail;
    if (qg_match_shape3(G, "gallery", -1, QG_DIM(P, 1), QG_DIM(P, 2)) < 0) goto fail;
    const int64_t C = QG_DIM(P, 1), S = QG_DIM(P, 2);
    if (qg_match_bwd_arrays(gmpo, gmgo, apo, ago, QG_DIM(P, 0), QG_DIM(G, 0), S, &gmp, &gmg, &ap, &ag) < 0)
        goto fail;
    gP = qg_empty(3, PyArray_DIMS(P), NPY_FLOAT32);
    gG = qg_empty(3, PyArray_DIMS(G), NPY_FLOAT32);
    if (!gP || !gG) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = qg_match_backward_f32(QG_F32(P), QG_DIM(P, 0), QG_F32(G), QG_DIM(G, 0), C, S, QG_F32(gmp),
                                   QG_F32(gmg), QG_U16(ap), QG_U16(ag), QG_F32(gP), QG_F32(gG), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, "pair_maxima_backward") < 0) goto fail;
    Py_DECREF(P);
    Py_DECREF(G);
    Py_DECREF(gmp);
    Py_DECREF(gmg);
    Py_DECREF(ap);
    Py_DECREF(ag);
    return Py_BuildValue("NN", gP, gG);
fail:
    Py_XDECREF(P);
    Py_XDECREF(G);
    Py_XDECREF(gmp);
    Py_XDECREF(gmg);
    Py_XDECREF(ap);
    Py_XDECREF(ag);
    Py_XDECREF(gP);
    Py_XDECREF(gG);
    return NULL;
}

/* which: 3 = (gX, gE); 1 = (gX, None); 2 = (None, gE), where the second argument is then the number of
 * rows N of the table instead of the table (the gE side never reads it). */
static PyObject *qg_match_backward_restricted_impl(PyObject *args, qg_bwdr_fn fn, const char *fname, int which)
{
    PyObject *xo, *eo, *co, *gmpo, *gmgo, *apo, *ago;
    int n_threads = 1;
    PyArrayObject *X = NULL, *E = NULL, *cand = NULL, *gmp = NULL, *gmg = NULL, *ap = NULL, *ag = NULL;
    PyArrayObject *gX = NULL, *gE = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOi", &xo, &eo, &co, &gmpo, &gmgo, &apo, &ago, &n_threads)) return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    X = qg_array(xo, NPY_FLOAT32, 3, "features");
    if (!X) goto fail;
    if (qg_match_check_S(X, "features") < 0) goto fail;
    int64_t N;
    if (which == 2) {
        N = (int64_t)PyLong_AsLongLong(eo);
        if (N == -1 && PyErr_Occurred()) goto fail;
        if (N < 0) {
            PyErr_Format(PyExc_ValueError, "n_rows: expected >= 0, got %lld", (long long)N);
            goto fail;
        }
    } else {
        E = qg_array(eo, NPY_FLOAT32, 3, "embeds");
        if (!E) goto fail;
        if (qg_match_shape3(E, "embeds", -1, QG_DIM(X, 1), QG_DIM(X, 2)) < 0) goto fail;
        N = QG_DIM(E, 0);
    }
    cand = qg_array(co, NPY_INT64, 2, "candidates");
    if (!cand) goto fail;
    if (QG_DIM(cand, 0) != QG_DIM(X, 0)) {
        PyErr_Format(PyExc_ValueError, "candidates: expected %lld rows (one per feature map), got %lld",
                     (long long)QG_DIM(X, 0), (long long)QG_DIM(cand, 0));
        goto fail;
    }
    const int64_t B = QG_DIM(X, 0), K = QG_DIM(cand, 1), C = QG_DIM(X, 1), S = QG_DIM(X, 2);
    if (qg_match_bwd_arrays(gmpo, gmgo, apo, ago, B, K, S, &gmp, &gmg, &ap, &ag) < 0) goto fail;
    if (which & 1) {
        gX = qg_empty(3, PyArray_DIMS(X), NPY_FLOAT32);
        if (!gX) goto fail;
    }
    if (which & 2) {
        npy_intp de[3] = {(npy_intp)N, (npy_intp)C, (npy_intp)S};
        gE = qg_empty(3, de, NPY_FLOAT32);
        if (!gE) goto fail;
    }
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = fn(QG_F32(X), B, E ? QG_F32(E) : NULL, N, QG_I64(cand), K, C, S, QG_F32(gmp), QG_F32(gmg),
                QG_U16(ap), QG_U16(ag), gX ? QG_F32(gX) : NULL, gE ? QG_F32(gE) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, fname) < 0) goto fail;
    Py_DECREF(X);
    Py_XDECREF(E);
    Py_DECREF(cand);
    Py_DECREF(gmp);
    Py_DECREF(gmg);
    Py_DECREF(ap);
    Py_DECREF(ag);
    if (!gX) return Py_BuildValue("ON", Py_None, gE);
    if (!gE) return Py_BuildValue("NO", gX, Py_None);
    return Py_BuildValue("NN", gX, gE);
fail:
    Py_XDECREF(X);
    Py_XDECREF(E);
    Py_XDECREF(cand);
    Py_XDECREF(gmp);
    Py_XDECREF(gmg);
    Py_XDECREF(ap);
    Py_XDECREF(ag);
    Py_XDECREF(gX);
    Py_XDECREF(gE);
    return NULL;
}

static PyObject *qg_py_match_backward_restricted(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_match_backward_restricted_impl(args, qg_match_backward_restricted_f32,
                                             "pair_maxima_restricted_backward", 3);
}

static PyObject *qg_py_match_backward_restricted_features(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_match_backward_restricted_impl(args, qg_match_backward_restricted_f32,
                                             "pair_maxima_restricted_backward", 1);
}

static PyObject *qg_py_match_backward_restricted_embeds(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_match_backward_restricted_impl(args, qg_match_backward_restricted_f32,
                                             "pair_maxima_restricted_backward", 2);
}

/* match_backward_restricted_rows(X, table, rows, norms, cand, gmp, gmg, ap, ag, n_threads[, out])
 * -> gE [R, C, S]: the class side of the restricted backward fused with the class rows' normalisation
 * backward. out: a caller's [R, C, S] float32 array to write gE into (returned; it must not share memory
 * with any input; after an error its contents are unspecified), so a step can reuse the buffer of its
 * normalised rows instead of faulting in a fresh one. */
static PyObject *qg_py_match_backward_restricted_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *eo, *ro, *no, *co, *gmpo, *gmgo, *apo, *ago, *outo = Py_None;
    int n_threads = 1;
    PyArrayObject *X = NULL, *E = NULL, *rows = NULL, *nrm = NULL, *cand = NULL, *gmp = NULL, *gmg = NULL,
                  *ap = NULL, *ag = NULL, *gE = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOi|O", &xo, &eo, &ro, &no, &co, &gmpo, &gmgo, &apo, &ago, &n_threads,
                          &outo))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    X = qg_array(xo, NPY_FLOAT32, 3, "features");
    if (!X) goto fail;
    if (qg_match_check_S(X, "features") < 0) goto fail;
    if (qg_norm_rows_args(eo, ro, &E, &rows) < 0) goto fail;
    if (qg_match_shape3(E, "table", -1, QG_DIM(X, 1), QG_DIM(X, 2)) < 0) goto fail;
    nrm = qg_array(no, NPY_FLOAT32, 2, "norms");
    if (!nrm) goto fail;
    if (QG_DIM(nrm, 0) != QG_DIM(rows, 0) || QG_DIM(nrm, 1) != QG_DIM(X, 2)) {
        PyErr_Format(PyExc_ValueError, "norms: expected shape (%lld, %lld), got (%lld, %lld)",
                     (long long)QG_DIM(rows, 0), (long long)QG_DIM(X, 2), (long long)QG_DIM(nrm, 0),
                     (long long)QG_DIM(nrm, 1));
        goto fail;
    }
    cand = qg_array(co, NPY_INT64, 2, "candidates");
    if (!cand) goto fail;
    if (QG_DIM(cand, 0) != QG_DIM(X, 0)) {
        PyErr_Format(PyExc_ValueError, "candidates: expected %lld rows (one per feature map), got %lld",
                     (long long)QG_DIM(X, 0), (long long)QG_DIM(cand, 0));
        goto fail;
    }
    const int64_t B = QG_DIM(X, 0), K = QG_DIM(cand, 1), C = QG_DIM(X, 1), S = QG_DIM(X, 2), R = QG_DIM(rows, 0);
    if (qg_match_bwd_arrays(gmpo, gmgo, apo, ago, B, K, S, &gmp, &gmg, &ap, &ag) < 0) goto fail;
    if (outo != Py_None) {
        if (qg_check_out3(outo, "out: expected None or a writable C-contiguous native float32 ndarray [R, C, S]") < 0)
            goto fail;
        gE = (PyArrayObject *)outo;
        Py_INCREF(outo);
        if (qg_match_shape3(gE, "out", R, C, S) < 0) goto fail;
        PyArrayObject *const ins[] = {X, E, rows, nrm, cand, gmp, gmg, ap, ag};
        for (size_t i = 0; i < sizeof(ins) / sizeof(ins[0]); ++i)
            if (qg_overlaps(gE, ins[i])) {
                PyErr_SetString(PyExc_ValueError, "out: must not share memory with any input");
                goto fail;
            }
    } else {
        npy_intp de[3] = {(npy_intp)R, (npy_intp)C, (npy_intp)S};
        gE = qg_empty(3, de, NPY_FLOAT32);
        if (!gE) goto fail;
    }
    qg_call call;
    qg_call_begin(&call, n_threads);
    int st = qg_match_backward_restricted_rows_f32(QG_F32(X), B, QG_F32(E), QG_DIM(E, 0), QG_I64(rows), QG_F32(nrm),
                                                   R, QG_I64(cand), K, C, S, QG_F32(gmp), QG_F32(gmg), QG_U16(ap),
                                                   QG_U16(ag), QG_F32(gE), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(st, "pair_maxima_restricted_backward (rows)") < 0) goto fail;
    Py_DECREF(X);
    Py_DECREF(E);
    Py_DECREF(rows);
    Py_DECREF(nrm);
    Py_DECREF(cand);
    Py_DECREF(gmp);
    Py_DECREF(gmg);
    Py_DECREF(ap);
    Py_DECREF(ag);
    return Py_BuildValue("N", gE);
fail:
    Py_XDECREF(X);
    Py_XDECREF(E);
    Py_XDECREF(rows);
    Py_XDECREF(nrm);
    Py_XDECREF(cand);
    Py_XDECREF(gmp);
    Py_XDECREF(gmg);
    Py_XDECREF(ap);
    Py_XDECREF(ag);
    Py_XDECREF(gE);
    return NULL;
}

static PyObject *qg_py_match_backward_restricted_ref(PyObject *self, PyObject *args)
{
    (void)self;
    return qg_match_backward_restricted_impl(args, qg_match_backward_restricted_ref_f32,
                                             "pair_maxima_restricted_backward (ref)", 3);
}

#define QG_MATCH_METHODS                                                                                   \
    {"norm_forward", qg_py_norm_forward, METH_VARARGS, "norm_forward(x[M,C,S], n_threads) -> (y, norms)"},  \
    {"norm_forward_ref", qg_py_norm_forward_ref, METH_VARARGS, "scalar reference of norm_forward"},         \
    {"norm_backward", qg_py_norm_backward, METH_VARARGS,                                                    \
     "norm_backward(grad_y, y, norms, n_threads) -> grad_x"},                                              \
    {"norm_backward_ref", qg_py_norm_backward_ref, METH_VARARGS, "scalar reference of norm_backward"},      \
    {"match_maxima", qg_py_match_maxima, METH_VARARGS,                                                      \
     "match_maxima(P[nP,C,S], G[nG,C,S], want_argmax, n_threads) -> (mp, mg[, ap, ag])"},                  \
    {"match_maxima_restricted", qg_py_match_maxima_restricted, METH_VARARGS,                                \
     "match_maxima_restricted(X, E, cand[B,K], want_argmax, n_threads) -> (mp, mg[, ap, ag])"},            \
    {"match_maxima_restricted_ref", qg_py_match_maxima_restricted_ref, METH_VARARGS,                        \
     "scalar reference of match_maxima_restricted"},                                                        \
    {"match_scores", qg_py_match_scores, METH_VARARGS,                                                      \
     "match_scores(P, G, w[2S], bias, n_threads) -> [nP, nG]"},                                             \
    {"match_backward", qg_py_match_backward, METH_VARARGS,                                                  \
     "match_backward(P, G, gmp, gmg, ap, ag, n_threads) -> (gP, gG)"},                                      \
    {"match_backward_restricted", qg_py_match_backward_restricted, METH_VARARGS,                            \
     "match_backward_restricted(X, E, cand, gmp, gmg, ap, ag, n_threads) -> (gX, gE)"},                    \
    {"match_backward_restricted_features", qg_py_match_backward_restricted_features, METH_VARARGS,          \
     "match_backward_restricted_features(X, E, cand, gmp, gmg, ap, ag, n_threads) -> (gX, None)"},        \
    {"match_backward_restricted_embeds", qg_py_match_backward_restricted_embeds, METH_VARARGS,              \
     "match_backward_restricted_embeds(X, n_rows, cand, gmp, gmg, ap, ag, n_threads) -> (None, gE)"},     \
    {"match_backward_restricted_rows", qg_py_match_backward_restricted_rows, METH_VARARGS,                  \
     "match_backward_restricted_rows(X, table, rows, norms, cand, gmp, gmg, ap, ag, n_threads[, out]) -> gE"},   \
    {"match_backward_restricted_ref", qg_py_match_backward_restricted_ref, METH_VARARGS,                    \
     "scalar reference of match_backward_restricted"},                                                      \
    {"norm_forward_rows", qg_py_norm_forward_rows, METH_VARARGS,                                            \
     "norm_forward_rows(table[N,C,S], rows[R], n_threads) -> (y[R,C,S], norms[R,S])"},                     \
    {"norm_backward_rows", qg_py_norm_backward_rows, METH_VARARGS,                                          \
     "norm_backward_rows(grad_y[R,C,S], table, rows, norms, n_threads) -> grad_y (overwritten)"},

/* ================================================================== head (csrc/qg_head*) */
/* Bindings for csrc/qg_head.*.
 *
 * Private functions (called from qaconv_gs.head only; `_ref` = scalar reference kernels):
 *   head_forward_train(mp [M,S], mg [M,S], fc_weight [2S]|[S], params, n_threads)
 *       -> (z [M], out [M], (mean1, var1, mean2, var2))
 *   head_forward_eval(mp, mg, fc_weight, params, n_threads) -> out [M]
 *   head_backward(mp, mg, fc_weight, params, stats, gout [M], n_threads)
 *       -> (gmp [M,S], gmg [M,S], gfc_weight, (g_bn_weight, g_bn_bias, g_fc_bias, g_lbn_weight, g_lbn_bias))
 * params = (shared, eps, bn_w, bn_b, bn_rm, bn_rv, fc_b, lbn_w, lbn_b, lbn_rm, lbn_rv).
 */

typedef int (*qg_head_train_fn)(const float *, const float *, int64_t, int64_t, const qg_head_params *, float *,
                                float *, qg_head_stats *, const qg_ctx *);
typedef int (*qg_head_eval_fn)(const float *, const float *, int64_t, int64_t, const qg_head_params *, float *,
                               const qg_ctx *);
typedef int (*qg_head_bwd_fn)(const float *, const float *, int64_t, int64_t, const qg_head_params *,
                              const qg_head_stats *, const float *, const float *, float *, float *,
                              qg_head_grads *, const qg_ctx *);

/* Parse the shared arguments; on success the three arrays are new references (caller releases). */
static int qg_head_args(PyObject *omp, PyObject *omg, PyObject *ofw, PyObject *params, PyArrayObject **mp,
                        PyArrayObject **mg, PyArrayObject **fw, qg_head_params *p, int64_t *M, int64_t *S)
{
    *mp = *mg = *fw = NULL;
    memset(p, 0, sizeof(*p));
    if (!PyTuple_Check(params)) {
        PyErr_SetString(PyExc_TypeError, "params: expected a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(params, "iffffffffff;params: expected 11 numbers", &p->shared, &p->eps, &p->bn_weight,
                          &p->bn_bias, &p->bn_running_mean, &p->bn_running_var, &p->fc_bias, &p->lbn_weight,
                          &p->lbn_bias, &p->lbn_running_mean, &p->lbn_running_var))
        return -1;
    if (p->shared != 0 && p->shared != 1) {
        PyErr_Format(PyExc_ValueError, "params: shared must be 0 or 1, got %d", p->shared);
        return -1;
    }
    if (!(*mp = qg_array(omp, NPY_FLOAT32, 2, "mp"))) goto fail;
    if (!(*mg = qg_array(omg, NPY_FLOAT32, 2, "mg"))) goto fail;
    if (!(*fw = qg_array(ofw, NPY_FLOAT32, 1, "fc_weight"))) goto fail;
    *M = QG_DIM(*mp, 0);
    *S = QG_DIM(*mp, 1);
    if (QG_DIM(*mg, 0) != *M || QG_DIM(*mg, 1) != *S) {
        PyErr_Format(PyExc_ValueError, "mg: expected shape (%lld, %lld) like mp, got (%lld, %lld)", (long long)*M,
                     (long long)*S, (long long)QG_DIM(*mg, 0), (long long)QG_DIM(*mg, 1));
        goto fail;
    }
    if (*M < 1 || *S < 1) {
        PyErr_Format(PyExc_ValueError, "mp: expected a non-empty (M, S) array, got (%lld, %lld)", (long long)*M,
                     (long long)*S);
        goto fail;
    }
    int64_t nw = p->shared ? *S : 2 * *S;
    if (QG_DIM(*fw, 0) != nw) {
        PyErr_Format(PyExc_ValueError, "fc_weight: expected %lld values, got %lld", (long long)nw,
                     (long long)QG_DIM(*fw, 0));
        goto fail;
    }
    p->fc_weight = QG_F32(*fw);
    return 0;
fail:
    Py_XDECREF(*mp);
    Py_XDECREF(*mg);
    Py_XDECREF(*fw);
    *mp = *mg = *fw = NULL;
    return -1;
}

static PyObject *qg_head_train_impl(PyObject *args, PyObject *kw, qg_head_train_fn fn, const char *name)
{
    static char *kwlist[] = {"mp", "mg", "fc_weight", "params", "n_threads", NULL};
    PyObject *omp, *omg, *ofw, *params;
    int n_threads = 1;
    PyArrayObject *mp = NULL, *mg = NULL, *fw = NULL, *z = NULL, *out = NULL;
    qg_head_params p;
    qg_head_stats st = {0, 0, 0, 0};
    int64_t M, S;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|i", kwlist, &omp, &omg, &ofw, &params, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (qg_head_args(omp, omg, ofw, params, &mp, &mg, &fw, &p, &M, &S) < 0) return NULL;
    if (M < 2) {
        PyErr_Format(PyExc_ValueError, "mp: expected more than 1 pair when training, got M=%lld", (long long)M);
        goto fail;
    }
    npy_intp dims[1] = {(npy_intp)M};
    if (!(z = qg_empty(1, dims, NPY_FLOAT32)) || !(out = qg_empty(1, dims, NPY_FLOAT32))) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(mp), QG_F32(mg), M, S, &p, QG_F32(z), QG_F32(out), &st, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(mp);
    Py_DECREF(mg);
    Py_DECREF(fw);
    return Py_BuildValue("NN(dddd)", z, out, st.mean1, st.var1, st.mean2, st.var2);
fail:
    Py_XDECREF(mp);
    Py_XDECREF(mg);
    Py_XDECREF(fw);
    Py_XDECREF(z);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *qg_head_eval_impl(PyObject *args, PyObject *kw, qg_head_eval_fn fn, const char *name)
{
    static char *kwlist[] = {"mp", "mg", "fc_weight", "params", "n_threads", NULL};
    PyObject *omp, *omg, *ofw, *params;
    int n_threads = 1;
    PyArrayObject *mp = NULL, *mg = NULL, *fw = NULL, *out = NULL;
    qg_head_params p;
    int64_t M, S;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|i", kwlist, &omp, &omg, &ofw, &params, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (qg_head_args(omp, omg, ofw, params, &mp, &mg, &fw, &p, &M, &S) < 0) return NULL;
    npy_intp dims[1] = {(npy_intp)M};
    if (!(out = qg_empty(1, dims, NPY_FLOAT32))) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(mp), QG_F32(mg), M, S, &p, QG_F32(out), &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(mp);
    Py_DECREF(mg);
    Py_DECREF(fw);
    return Py_BuildValue("N", out);
fail:
    Py_XDECREF(mp);
    Py_XDECREF(mg);
    Py_XDECREF(fw);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *qg_head_bwd_impl(PyObject *args, PyObject *kw, qg_head_bwd_fn fn, const char *name)
{
    static char *kwlist[] = {"mp", "mg", "fc_weight", "params", "stats", "gout", "n_threads", NULL};
    PyObject *omp, *omg, *ofw, *params, *ogo;
    int n_threads = 1;
    PyArrayObject *mp = NULL, *mg = NULL, *fw = NULL, *go = NULL, *gmp = NULL, *gmg = NULL, *gfw = NULL;
    qg_head_params p;
    qg_head_stats st;
    int64_t M, S;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO(dddd)O|i", kwlist, &omp, &omg, &ofw, &params, &st.mean1,
                                     &st.var1, &st.mean2, &st.var2, &ogo, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (qg_head_args(omp, omg, ofw, params, &mp, &mg, &fw, &p, &M, &S) < 0) return NULL;
    if (!(go = qg_array(ogo, NPY_FLOAT32, 1, "gout"))) goto fail;
    if (QG_DIM(go, 0) != M) {
        PyErr_Format(PyExc_ValueError, "gout: expected %lld values, got %lld", (long long)M,
                     (long long)QG_DIM(go, 0));
        goto fail;
    }
    if (M < 2) {
        PyErr_Format(PyExc_ValueError, "mp: expected more than 1 pair when training, got M=%lld", (long long)M);
        goto fail;
    }
    npy_intp d2[2] = {(npy_intp)M, (npy_intp)S}, d1[1] = {(npy_intp)QG_DIM(fw, 0)};
    if (!(gmp = qg_empty(2, d2, NPY_FLOAT32)) || !(gmg = qg_empty(2, d2, NPY_FLOAT32)) ||
        !(gfw = qg_empty(1, d1, NPY_FLOAT32)))
        goto fail;
    qg_head_grads g = {0, 0, 0, 0, 0, QG_F32(gfw)};
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(mp), QG_F32(mg), M, S, &p, &st, NULL, QG_F32(go), QG_F32(gmp), QG_F32(gmg), &g,
                &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(mp);
    Py_DECREF(mg);
    Py_DECREF(fw);
    Py_DECREF(go);
    return Py_BuildValue("NNN(ddddd)", gmp, gmg, gfw, g.bn_weight, g.bn_bias, g.fc_bias, g.lbn_weight,
                         g.lbn_bias);
fail:
    Py_XDECREF(mp);
    Py_XDECREF(mg);
    Py_XDECREF(fw);
    Py_XDECREF(go);
    Py_XDECREF(gmp);
    Py_XDECREF(gmg);
    Py_XDECREF(gfw);
    return NULL;
}

static PyObject *qg_py_head_forward_train(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return qg_head_train_impl(args, kw, qg_head_forward_train_f32, "head_forward_train");
}
static PyObject *qg_py_head_forward_train_ref(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return qg_head_train_impl(args, kw, qg_head_forward_train_ref_f32, "head_forward_train_ref");
}
static PyObject *qg_py_head_forward_eval(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return qg_head_eval_impl(args, kw, qg_head_forward_eval_f32, "head_forward_eval");
}
static PyObject *qg_py_head_forward_eval_ref(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return qg_head_eval_impl(args, kw, qg_head_forward_eval_ref_f32, "head_forward_eval_ref");
}
static PyObject *qg_py_head_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return qg_head_bwd_impl(args, kw, qg_head_backward_f32, "head_backward");
}
static PyObject *qg_py_head_backward_ref(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return qg_head_bwd_impl(args, kw, qg_head_backward_ref_f32, "head_backward_ref");
}

#define QG_HEAD_METHODS                                                                                        \
    {"head_forward_train", (PyCFunction)(void (*)(void))qg_py_head_forward_train, METH_VARARGS | METH_KEYWORDS, \
     "Head training forward (private)."},                                                                      \
    {"head_forward_train_ref", (PyCFunction)(void (*)(void))qg_py_head_forward_train_ref,                      \
     METH_VARARGS | METH_KEYWORDS, "Head training forward, scalar reference (private)."},                      \
    {"head_forward_eval", (PyCFunction)(void (*)(void))qg_py_head_forward_eval, METH_VARARGS | METH_KEYWORDS,   \
     "Head eval forward (private)."},                                                                          \
    {"head_forward_eval_ref", (PyCFunction)(void (*)(void))qg_py_head_forward_eval_ref,                        \
     METH_VARARGS | METH_KEYWORDS, "Head eval forward, scalar reference (private)."},                          \
    {"head_backward", (PyCFunction)(void (*)(void))qg_py_head_backward, METH_VARARGS | METH_KEYWORDS,           \
     "Head backward (private)."},                                                                              \
    {"head_backward_ref", (PyCFunction)(void (*)(void))qg_py_head_backward_ref, METH_VARARGS | METH_KEYWORDS,   \
     "Head backward, scalar reference (private)."},

/* ================================================================== loss (csrc/qg_loss*) */
/* Bindings for csrc/qg_loss.*.
 *
 * Private functions (called from qaconv_gs.losses only; `_ref` = scalar reference kernels):
 *   loss_class(scores [B,K], margin, triplet_weight, want_grad, n_threads)
 *       -> (loss, loss_cls, loss_triplet, acc_cls, acc_triplet, grad [B,K] or None)
 *   loss_batch_triplet(scores [B,B], labels [B], margin, want_grad, n_threads) -> (loss, acc, n_valid, grad|None)
 *   loss_pairwise_bce(scores [P,G], labels [P], gallery_labels [G], want_grad, n_threads) -> (loss, acc, grad|None)
 *   loss_focal(scores [B,N], targets [B], gamma, want_grad, n_threads) -> (loss, acc, grad|None)
 */

typedef int (*qg_loss_class_fn)(const float *, int64_t, int64_t, float, float, qg_class_loss_out *, float *,
                                const qg_ctx *);
typedef int (*qg_loss_triplet_fn)(const float *, const int64_t *, int64_t, float, double *, double *, int64_t *,
                                  float *, const qg_ctx *);
typedef int (*qg_loss_bce_fn)(const float *, int64_t, int64_t, const int64_t *, const int64_t *, double *,
                              double *, float *, const qg_ctx *);
typedef int (*qg_loss_focal_fn)(const float *, int64_t, int64_t, const int64_t *, float, double *, double *,
                                float *, const qg_ctx *);

/* Optional gradient array shaped like `s` (None when not wanted). */
static int qg_loss_grad_alloc(PyArrayObject *s, int want, PyArrayObject **g)
{
    *g = NULL;
    if (!want) return 0;
    npy_intp dims[2] = {PyArray_DIM(s, 0), PyArray_DIM(s, 1)};
    *g = qg_empty(2, dims, NPY_FLOAT32);
    return *g ? 0 : -1;
}

static PyObject *qg_loss_grad_obj(PyArrayObject *g)
{
    if (g) return (PyObject *)g;
    Py_RETURN_NONE;
}

static int qg_loss_nonempty(PyArrayObject *s, const char *name)
{
    if (QG_DIM(s, 0) < 1 || QG_DIM(s, 1) < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a non-empty 2-d array, got (%lld, %lld)", name,
                     (long long)QG_DIM(s, 0), (long long)QG_DIM(s, 1));
        return -1;
    }
    return 0;
}

static int qg_loss_len(PyArrayObject *a, int64_t n, const char *name)
{
    if (QG_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected length %lld, got %lld", name, (long long)n,
                     (long long)QG_DIM(a, 0));
        return -1;
    }
    return 0;
}

static PyObject *qg_loss_class_impl(PyObject *args, PyObject *kw, qg_loss_class_fn fn, const char *name)
{
    static char *kwlist[] = {"scores", "margin", "triplet_weight", "want_grad", "n_threads", NULL};
    PyObject *os;
    float margin = 1.0f, tw = 0.5f;
    int want = 1, n_threads = 1;
    PyArrayObject *s = NULL, *g = NULL;
    qg_class_loss_out o = {0, 0, 0, 0, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|ffpi", kwlist, &os, &margin, &tw, &want, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (!(s = qg_array(os, NPY_FLOAT32, 2, "scores"))) return NULL;
    if (qg_loss_nonempty(s, "scores") < 0) goto fail;
    if (QG_DIM(s, 1) < 2) {
        PyErr_Format(PyExc_ValueError, "scores: expected K >= 2 columns, got %lld", (long long)QG_DIM(s, 1));
        goto fail;
    }
    if (qg_loss_grad_alloc(s, want, &g) < 0) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(s), QG_DIM(s, 0), QG_DIM(s, 1), margin, tw, &o, g ? QG_F32(g) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(s);
    return Py_BuildValue("dddddN", o.loss, o.loss_cls, o.loss_triplet, o.acc_cls, o.acc_triplet,
                         qg_loss_grad_obj(g));
fail:
    Py_XDECREF(s);
    Py_XDECREF(g);
    return NULL;
}

static PyObject *qg_loss_triplet_impl(PyObject *args, PyObject *kw, qg_loss_triplet_fn fn, const char *name)
{
    static char *kwlist[] = {"scores", "labels", "margin", "want_grad", "n_threads", NULL};
    PyObject *os, *ol;
    float margin = 16.0f;
    int want = 1, n_threads = 1;
    PyArrayObject *s = NULL, *l = NULL, *g = NULL;
    double loss = 0.0, acc = 0.0;
    int64_t nv = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|fpi", kwlist, &os, &ol, &margin, &want, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (!(s = qg_array(os, NPY_FLOAT32, 2, "scores"))) return NULL;
    if (!(l = qg_array(ol, NPY_INT64, 1, "labels"))) goto fail;
    if (qg_loss_nonempty(s, "scores") < 0) goto fail;
    if (QG_DIM(s, 0) != QG_DIM(s, 1)) {
        PyErr_Format(PyExc_ValueError, "scores: expected a square (B, B) array, got (%lld, %lld)",
                     (long long)QG_DIM(s, 0), (long long)QG_DIM(s, 1));
        goto fail;
    }
    if (qg_loss_len(l, QG_DIM(s, 0), "labels") < 0) goto fail;
    if (qg_loss_grad_alloc(s, want, &g) < 0) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(s), QG_I64(l), QG_DIM(s, 0), margin, &loss, &acc, &nv, g ? QG_F32(g) : NULL, &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(s);
    Py_DECREF(l);
    return Py_BuildValue("ddLN", loss, acc, (long long)nv, qg_loss_grad_obj(g));
fail:
    Py_XDECREF(s);
    Py_XDECREF(l);
    Py_XDECREF(g);
    return NULL;
}

static PyObject *qg_loss_bce_impl(PyObject *args, PyObject *kw, qg_loss_bce_fn fn, const char *name)
{
    static char *kwlist[] = {"scores", "labels", "gallery_labels", "want_grad", "n_threads", NULL};
    PyObject *os, *olp, *olg;
    int want = 1, n_threads = 1;
    PyArrayObject *s = NULL, *lp = NULL, *lg = NULL, *g = NULL;
    double loss = 0.0, acc = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pi", kwlist, &os, &olp, &olg, &want, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (!(s = qg_array(os, NPY_FLOAT32, 2, "scores"))) return NULL;
    if (!(lp = qg_array(olp, NPY_INT64, 1, "labels"))) goto fail;
    if (!(lg = qg_array(olg, NPY_INT64, 1, "gallery_labels"))) goto fail;
    if (qg_loss_nonempty(s, "scores") < 0) goto fail;
    if (qg_loss_len(lp, QG_DIM(s, 0), "labels") < 0 || qg_loss_len(lg, QG_DIM(s, 1), "gallery_labels") < 0)
        goto fail;
    if (qg_loss_grad_alloc(s, want, &g) < 0) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(s), QG_DIM(s, 0), QG_DIM(s, 1), QG_I64(lp), QG_I64(lg), &loss, &acc, g ? QG_F32(g) : NULL,
                &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(s);
    Py_DECREF(lp);
    Py_DECREF(lg);
    return Py_BuildValue("ddN", loss, acc, qg_loss_grad_obj(g));
fail:
    Py_XDECREF(s);
    Py_XDECREF(lp);
    Py_XDECREF(lg);
    Py_XDECREF(g);
    return NULL;
}

static PyObject *qg_loss_focal_impl(PyObject *args, PyObject *kw, qg_loss_focal_fn fn, const char *name)
{
    static char *kwlist[] = {"scores", "targets", "gamma", "want_grad", "n_threads", NULL};
    PyObject *os, *ot;
    float gamma = 2.0f;
    int want = 1, n_threads = 1;
    PyArrayObject *s = NULL, *t = NULL, *g = NULL;
    double loss = 0.0, acc = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|fpi", kwlist, &os, &ot, &gamma, &want, &n_threads))
        return NULL;
    if (qg_check_threads(n_threads) < 0) return NULL;
    if (!(s = qg_array(os, NPY_FLOAT32, 2, "scores"))) return NULL;
    if (!(t = qg_array(ot, NPY_INT64, 1, "targets"))) goto fail;
    if (qg_loss_nonempty(s, "scores") < 0 || qg_loss_len(t, QG_DIM(s, 0), "targets") < 0) goto fail;
    if (qg_loss_grad_alloc(s, want, &g) < 0) goto fail;
    qg_call call;
    qg_call_begin(&call, n_threads);
    int rc = fn(QG_F32(s), QG_DIM(s, 0), QG_DIM(s, 1), QG_I64(t), gamma, &loss, &acc, g ? QG_F32(g) : NULL,
                &call.ctx);
    qg_call_end(&call);
    if (qg_check_status(rc, name) < 0) goto fail;
    Py_DECREF(s);
    Py_DECREF(t);
    return Py_BuildValue("ddN", loss, acc, qg_loss_grad_obj(g));
fail:
    Py_XDECREF(s);
    Py_XDECREF(t);
    Py_XDECREF(g);
    return NULL;
}

#define QG_LOSS_WRAP(pyname, impl, fn)                                             \
    static PyObject *qg_py_##pyname(PyObject *self, PyObject *args, PyObject *kw) \
    {                                                                              \
        (void)self;                                                                \
        return impl(args, kw, fn, #pyname);                                        \
    }
QG_LOSS_WRAP(loss_class, qg_loss_class_impl, qg_loss_class_f32)
QG_LOSS_WRAP(loss_class_ref, qg_loss_class_impl, qg_loss_class_ref_f32)
QG_LOSS_WRAP(loss_batch_triplet, qg_loss_triplet_impl, qg_loss_batch_triplet_f32)
QG_LOSS_WRAP(loss_batch_triplet_ref, qg_loss_triplet_impl, qg_loss_batch_triplet_ref_f32)
QG_LOSS_WRAP(loss_pairwise_bce, qg_loss_bce_impl, qg_loss_pairwise_bce_f32)
QG_LOSS_WRAP(loss_pairwise_bce_ref, qg_loss_bce_impl, qg_loss_pairwise_bce_ref_f32)
QG_LOSS_WRAP(loss_focal, qg_loss_focal_impl, qg_loss_focal_f32)
QG_LOSS_WRAP(loss_focal_ref, qg_loss_focal_impl, qg_loss_focal_ref_f32)
#undef QG_LOSS_WRAP

#define QG_LOSS_ENTRY(pyname, doc) \
    {#pyname, (PyCFunction)(void (*)(void))qg_py_##pyname, METH_VARARGS | METH_KEYWORDS, doc},
#define QG_LOSS_METHODS                                                                  \
    QG_LOSS_ENTRY(loss_class, "Restricted class loss (private).")                       \
    QG_LOSS_ENTRY(loss_class_ref, "Restricted class loss, scalar reference (private).") \
    QG_LOSS_ENTRY(loss_batch_triplet, "Batch-hard triplet (private).")                  \
    QG_LOSS_ENTRY(loss_batch_triplet_ref, "Batch-hard triplet, reference (private).")   \
    QG_LOSS_ENTRY(loss_pairwise_bce, "Pairwise BCE (private).")                         \
    QG_LOSS_ENTRY(loss_pairwise_bce_ref, "Pairwise BCE, reference (private).")          \
    QG_LOSS_ENTRY(loss_focal, "Focal class-memory BCE (private).")                      \
    QG_LOSS_ENTRY(loss_focal_ref, "Focal class-memory BCE, reference (private).")


/* ------------------------------------------------------------------ module */

static PyObject *qg_py_openmp_enabled(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(qg_openmp_enabled());
}

static PyObject *qg_py_default_threads(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(qg_default_threads());
}

static PyObject *qg_py_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(qg_isa_name(qg_isa_level));
}

static PyObject *qg_py_best_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(qg_isa_name(qg_cpu_best_isa()));
}

/* Set the ISA level (a name no higher than the CPU supports); returns the previous name. */
static PyObject *qg_py_set_isa(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    int isa = qg_isa_parse(name);
    if (isa < 0) {
        PyErr_Format(PyExc_ValueError, "isa: expected 'portable', 'avx2' or 'avx512', got '%s'", name);
        return NULL;
    }
    if (isa > qg_cpu_best_isa()) {
        PyErr_Format(PyExc_ValueError, "isa: '%s' is not supported by this CPU (best: '%s')", name,
                     qg_isa_name(qg_cpu_best_isa()));
        return NULL;
    }
    const char *previous = qg_isa_name(qg_isa_level);
    qg_isa_level = isa;
    return PyUnicode_FromString(previous);
}

static PyMethodDef qg_methods[] = {
    {"isa", qg_py_isa, METH_NOARGS, "The SIMD level kernels use now."},
    {"best_isa", qg_py_best_isa, METH_NOARGS, "The best SIMD level this CPU supports."},
    {"set_isa", qg_py_set_isa, METH_VARARGS, "Set the SIMD level (private; for tests and benchmarks)."},
    {"openmp_enabled", qg_py_openmp_enabled, METH_NOARGS, "True if built with OpenMP."},
    {"default_threads", qg_py_default_threads, METH_NOARGS,
     "OpenMP's default thread count (omp_get_max_threads)."},
    QG_NEIGHBORS_METHODS
    QG_MATCH_METHODS
    QG_HEAD_METHODS
    QG_LOSS_METHODS
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef qg_module = {
    PyModuleDef_HEAD_INIT, "_native", "qaconv-gs C kernels (internal; use qaconv_gs).", -1,
    qg_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    import_array();
    qg_isa_level = qg_cpu_best_isa();
    const char *forced = getenv("QG_ISA");
    if (forced != NULL && forced[0] != '\0') {
        int isa = qg_isa_parse(forced);
        if (isa < 0) {
            PyErr_Format(PyExc_ImportError,
                         "QG_ISA=%s: expected portable, avx2 or avx512 (or unset for the best)", forced);
            return NULL;
        }
        if (isa < qg_isa_level) qg_isa_level = isa; /* only ever lowers the level */
    }
    return PyModule_Create(&qg_module);
}
