/*
 * qg_common.h - shared definitions for the qaconv-gs C kernels.
 *
 * The C library in csrc/ knows nothing of Python. Every exported kernel:
 *   - takes raw pointers, sizes as int64_t, and a `const qg_ctx *` (threads, interrupt poll);
 *   - returns a qg_status; it never aborts, prints, or allocates inside a parallel region;
 *   - gives bit-identical results for any thread count: reductions use fixed-size chunks
 *     (QG_CHUNK) whose partial sums are combined in chunk order, never in thread order;
 *   - uses signed 64-bit loop indices.
 */
#ifndef QG_COMMON_H
#define QG_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qg_status {
    QG_OK = 0,
    QG_ENOMEM = 1,      /* scratch allocation failed -> MemoryError */
    QG_EINVAL = 2,      /* bad size / argument detected in C -> ValueError */
    QG_EINTR = 3,       /* the poll callback asked to stop -> the pending exception (KeyboardInterrupt) */
    QG_ERANGE = 4,      /* an index (label, candidate) outside its range -> ValueError */
    QG_ENONFINITE = 5,  /* NaN or Inf where finite values are required -> ValueError */
    QG_EOVERFLOW = 6    /* a size whose byte count overflows int64 / size_t -> ValueError */
} qg_status;

/* Human-readable name of a status (static string). */
const char *qg_status_str(int status);

/*
 * Execution context, passed (const) to every kernel.
 *   n_threads: >= 1, resolved by the caller (Python resolves None to OpenMP's default).
 *   isa:       highest qg_isa level (qg_cpu.h) the kernel may use; the caller never sets it above
 *              qg_cpu_best_isa(). 0 = portable C.
 *   poll:      may be NULL. Called only from the calling thread (OpenMP thread 0 of the
 *              kernel's parallel region) between blocks; nonzero means "stop now".
 *              Kernels then finish their current block and return QG_EINTR.
 */
typedef struct qg_ctx {
    int n_threads;
    int isa;
    int (*poll)(void *arg);
    void *poll_arg;
} qg_ctx;

/* Fixed reduction chunk (elements): partial sums per chunk, chunks combined in order. */
#define QG_CHUNK 4096

/* Largest S for which uint16 argmax indices are valid. */
#define QG_MAX_LOCATIONS 65535

/* ---- OpenMP shim: the only place that includes omp.h ---- */
#define QG_STR_(x) #x
#define QG_STR(x) QG_STR_(x)
#ifdef _OPENMP
#include <omp.h>
#define QG_OMP(args) _Pragma(QG_STR(omp args))
static inline int qg_thread_num(void) { return omp_get_thread_num(); }
static inline int qg_max_threads(void) { return omp_get_max_threads(); }
#define QG_HAVE_OPENMP 1
#else
#define QG_OMP(args)
static inline int qg_thread_num(void) { return 0; }
static inline int qg_max_threads(void) { return 1; }
#define QG_HAVE_OPENMP 0
#endif

/* 1 if compiled with OpenMP. */
int qg_openmp_enabled(void);
/* OpenMP's default thread count (omp_get_max_threads), 1 without OpenMP. */
int qg_default_threads(void);

/* Threads to use for `work` independent items (never more threads than items, at least 1). */
static inline int qg_threads_for(const qg_ctx *ctx, int64_t work)
{
    int nt = (ctx && ctx->n_threads > 0) ? ctx->n_threads : 1;
    if (work < nt) nt = work > 0 ? (int)work : 1;
    return nt;
}

/*
 * Interrupt polling inside a parallel loop. Usage:
 *     int stop = 0;
 *     QG_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
 *     for (int64_t blk = 0; blk < nblk; ++blk) {
 *         if (qg_stop_requested(&stop)) continue;
 *         ... one block of work ...
 *         qg_poll_block(ctx, &stop);
 *     }
 *     if (stop) { free scratch; return QG_EINTR; }
 */
static inline int qg_stop_requested(int *stop)
{
    int s;
    QG_OMP(atomic read)
    s = *stop;
    return s;
}

static inline void qg_poll_block(const qg_ctx *ctx, int *stop)
{
    if (ctx && ctx->poll && qg_thread_num() == 0 && ctx->poll(ctx->poll_arg)) {
        QG_OMP(atomic write)
        *stop = 1;
    }
}

/* Serial-code poll (outside parallel regions): nonzero means stop. */
static inline int qg_poll(const qg_ctx *ctx)
{
    return (ctx && ctx->poll) ? ctx->poll(ctx->poll_arg) : 0;
}

/* Checked size arithmetic: returns 0 and sets *out on success, nonzero on overflow. */
static inline int qg_mul_overflow(int64_t a, int64_t b, int64_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

/* 64-byte aligned allocation (NULL on failure or zero/negative size); free with qg_free. */
void *qg_malloc(int64_t nbytes);
void *qg_calloc(int64_t nbytes);
void qg_free(void *p);

#ifdef __cplusplus
}
#endif
#endif /* QG_COMMON_H */
