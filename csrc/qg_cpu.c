#include "qg_cpu.h"

#include <string.h>

int qg_cpu_best_isa(void)
{
#if QG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return QG_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return QG_ISA_AVX2;
#endif
    return QG_ISA_PORTABLE;
}

const char *qg_isa_name(int isa)
{
    switch (isa) {
    case QG_ISA_PORTABLE: return "portable";
    case QG_ISA_AVX2: return "avx2";
    case QG_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

int qg_isa_parse(const char *name)
{
    if (name == NULL) return -1;
    for (int isa = QG_ISA_PORTABLE; isa <= QG_ISA_AVX512; ++isa)
        if (strcmp(name, qg_isa_name(isa)) == 0) return isa;
    return -1;
}
