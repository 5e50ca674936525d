/*
 * qg_cpu.h - instruction-set levels and the runtime choice between kernel variants.
 *
 * Layering (ggml / BLIS style): op (qg_<family>_<action>_f32) -> kernel table -> ISA file.
 * ISA-specific code lives in files named *_avx2.c / *_avx512.c, compiled with their own flags
 * (setup.py adds them per file on x86-64 only); everything else is portable C11. A kernel picks
 * its variant from ctx->isa, which the caller sets to at most qg_cpu_best_isa(). The portable
 * variant always exists and is the fallback.
 */
#ifndef QG_CPU_H
#define QG_CPU_H
#ifdef __cplusplus
extern "C" {
#endif

typedef enum qg_isa {
    QG_ISA_PORTABLE = 0, /* plain C11 (whatever the compiler vectorises for the baseline target) */
    QG_ISA_AVX2 = 1,     /* AVX2 + FMA (x86-64-v3) */
    QG_ISA_AVX512 = 2    /* AVX-512 F/BW/DQ/VL (x86-64-v4) */
} qg_isa;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QG_X86 1 /* the *_avx2.c / *_avx512.c files are compiled with their ISA flags */
#else
#define QG_X86 0
#endif

/* Best level this CPU (and OS, for AVX-512 state) supports; QG_ISA_PORTABLE off x86-64. */
int qg_cpu_best_isa(void);
/* "portable", "avx2", "avx512"; "unknown" otherwise. */
const char *qg_isa_name(int isa);
/* Parse a name (as above); -1 if unknown. */
int qg_isa_parse(const char *name);

#ifdef __cplusplus
}
#endif
#endif
