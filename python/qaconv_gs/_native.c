/*
 * _native.c - the module qaconv_gs._native: the steps every binding shares (the frame of owned arrays, the
 * kernel call without the GIL, the one map from kernel status to Python exception), the ISA controls, and
 * the module, whose functions are the method tables of the family files:
 *   _native_neighbors.c  csrc/qg_neighbors*   class kNN (one table, two disjoint blocks)
 *   _native_match.c      csrc/qg_match*       normalisation, pair maxima, fused scores, backward
 *   _native_head.c       csrc/qg_head*        the similarity head (BN + FC + BN)
 *   _native_loss.c       csrc/qg_loss*        class / triplet / BCE / focal losses
 * Each binding is one row of its family's list (_native.h says how). The bindings are private: the Python
 * wrappers validate first; the bindings re-check shapes cheaply so that a direct caller gets an error, not
 * a crash. Long kernels poll for signals (Ctrl-C) every ~50 ms from the calling thread.
 */
#define QG_NATIVE_MODULE
#include "_native.h"

#include <stdlib.h>
#include <time.h>

#include "qg_cpu.h"

/* Highest ISA level kernels may use: the CPU's best, lowered by QG_ISA=portable|avx2|avx512 at
 * import or by the private set_isa() (tests run every path). Read and written with the GIL held. */
static int qg_isa_level = QG_ISA_PORTABLE;

/* ------------------------------------------------------------------ the frame */

static PyArrayObject *qg_keep(qg_frame *f, PyArrayObject *a)
{
    if (a == NULL) return NULL;
    if (f->n == QG_FRAME_MAX) {
        Py_DECREF(a);
        PyErr_SetString(PyExc_SystemError, "qaconv_gs._native: a binding owns too many arrays");
        return NULL;
    }
    f->own[f->n++] = (PyObject *)a;
    return a;
}

PyArrayObject *qg_in(qg_frame *f, PyObject *obj, int typenum, int ndim, const char *name)
{
    PyArrayObject *a = qg_keep(f, (PyArrayObject *)PyArray_FROM_OTF(obj, typenum, NPY_ARRAY_IN_ARRAY));
    if (a != NULL && ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-d array, got %d-d", name, ndim, PyArray_NDIM(a));
        return NULL;
    }
    return a;
}

PyArrayObject *qg_out(qg_frame *f, int ndim, const npy_intp *dims, int typenum)
{
    return qg_keep(f, (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)dims, typenum, 0));
}

PyObject *qg_done(qg_frame *f, PyObject *res)
{
    while (f->n > 0) Py_DECREF(f->own[--f->n]);
    return res;
}

/* ------------------------------------------------------------------ a kernel call */

static double qg_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Poll callback: runs on the calling thread with the GIL released; briefly re-takes the GIL
 * to let Python run pending signal handlers (SIGINT -> KeyboardInterrupt). */
static int qg_poll_signals(void *arg)
{
    qg_frame *call = (qg_frame *)arg;
    double now = qg_now();
    if (now - call->last_poll < 0.05) return 0;
    call->last_poll = now;
    PyEval_RestoreThread(call->ts);
    int r = PyErr_CheckSignals();
    call->ts = PyEval_SaveThread();
    return r != 0;
}

const qg_ctx *qg_begin(qg_frame *call, int n_threads)
{
    call->last_poll = qg_now();
    call->ctx.n_threads = n_threads > 0 ? n_threads : 1;
    call->ctx.isa = qg_isa_level;
    call->ctx.poll = qg_poll_signals;
    call->ctx.poll_arg = call;
    call->ts = PyEval_SaveThread();
    return &call->ctx;
}

/* Kernel status -> Python exception (QG_OK and QG_EINTR are handled in qg_end; any other status is a
 * RuntimeError naming it). */
static const struct {
    int status;
    PyObject **type;
    const char *format; /* %s: the call's label */
} qg_status_errors[] = {
    {QG_ENOMEM, &PyExc_MemoryError, "%s: could not allocate scratch memory"},
    {QG_ERANGE, &PyExc_ValueError, "%s: an index (label or candidate) is out of range"},
    {QG_ENONFINITE, &PyExc_ValueError, "%s: input contains NaN or Inf"},
    {QG_EOVERFLOW, &PyExc_ValueError, "%s: array size overflows 64-bit indexing"},
    {QG_EINVAL, &PyExc_ValueError, "%s: invalid argument (sizes or parameters)"},
};

int qg_end(qg_frame *call, int status, const char *label)
{
    PyEval_RestoreThread(call->ts);
    if (status == QG_OK) return 0;
    if (status == QG_EINTR) { /* the poll's signal handler has usually set the exception already */
        if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
        return -1;
    }
    for (size_t i = 0; i < sizeof(qg_status_errors) / sizeof(qg_status_errors[0]); ++i)
        if (qg_status_errors[i].status == status) {
            PyErr_Format(*qg_status_errors[i].type, qg_status_errors[i].format, label);
            return -1;
        }
    PyErr_Format(PyExc_RuntimeError, "%s: kernel failed with status %d (%s)", label, status, qg_status_str(status));
    return -1;
}

/* ------------------------------------------------------------------ argument checks */

int qg_check_threads(int n_threads)
{
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads: expected an integer >= 1, got %d", n_threads);
        return -1;
    }
    return 0;
}

int qg_check_shape2(PyArrayObject *a, const char *name, int64_t d0, int64_t d1)
{
    if (QG_DIM(a, 0) != d0 || QG_DIM(a, 1) != d1) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld), got (%lld, %lld)", name, (long long)d0,
                     (long long)d1, (long long)QG_DIM(a, 0), (long long)QG_DIM(a, 1));
        return -1;
    }
    return 0;
}

int qg_check_shape3(PyArrayObject *a, const char *name, int64_t d0, int64_t d1, int64_t d2)
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

/* ------------------------------------------------------------------ build and ISA controls */

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

/* ------------------------------------------------------------------ module */

static PyMethodDef qg_methods[] = {
    {"isa", qg_py_isa, METH_NOARGS, "The SIMD level kernels use now."},
    {"best_isa", qg_py_best_isa, METH_NOARGS, "The best SIMD level this CPU supports."},
    {"set_isa", qg_py_set_isa, METH_VARARGS, "Set the SIMD level (private; for tests and benchmarks)."},
    {"openmp_enabled", qg_py_openmp_enabled, METH_NOARGS, "True if built with OpenMP."},
    {"default_threads", qg_py_default_threads, METH_NOARGS,
     "OpenMP's default thread count (omp_get_max_threads)."},
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
    PyObject *m = PyModule_Create(&qg_module);
    PyMethodDef *const families[] = {qg_neighbors_methods, qg_match_methods, qg_head_methods, qg_loss_methods};
    for (size_t i = 0; m != NULL && i < sizeof(families) / sizeof(families[0]); ++i)
        if (PyModule_AddFunctions(m, families[i]) < 0) Py_CLEAR(m);
    return m;
}
