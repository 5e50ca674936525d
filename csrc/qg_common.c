#include "qg_common.h"

#include <stdlib.h>
#include <string.h>

const char *qg_status_str(int status)
{
    switch (status) {
    case QG_OK: return "ok";
    case QG_ENOMEM: return "out of memory";
    case QG_EINVAL: return "invalid argument";
    case QG_EINTR: return "interrupted";
    case QG_ERANGE: return "index out of range";
    case QG_ENONFINITE: return "non-finite value";
    case QG_EOVERFLOW: return "size overflow";
    default: return "unknown status";
    }
}

int qg_openmp_enabled(void) { return QG_HAVE_OPENMP; }

int qg_default_threads(void) { return qg_max_threads(); }

void *qg_malloc(int64_t nbytes)
{
    if (nbytes <= 0 || (uint64_t)nbytes > (uint64_t)SIZE_MAX - 64) return NULL;
    size_t n = ((size_t)nbytes + 63u) & ~(size_t)63u;
    return aligned_alloc(64, n);
}

void *qg_calloc(int64_t nbytes)
{
    void *p = qg_malloc(nbytes);
    if (p) memset(p, 0, (size_t)nbytes);
    return p;
}

void qg_free(void *p) { free(p); }
