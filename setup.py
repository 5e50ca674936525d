"""Build script for the qaconv_gs C extension.

OpenMP is required: the build compiles, links and runs a probe program and stops with an
actionable message if that fails. Set QG_OPENMP=0 to build a single-threaded extension instead.
Sources named *_avx2.c / *_avx512.c get their ISA flags per file; everything else is portable.
"""

import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
USE_OPENMP = os.environ.get("QG_OPENMP", "1") != "0"
BASE_FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-fno-strict-aliasing"]
if os.environ.get("QG_WERROR") == "1":
    BASE_FLAGS.append("-Werror")
if os.environ.get("QG_SANITIZE"):
    BASE_FLAGS += ["-fsanitize=" + os.environ["QG_SANITIZE"], "-fno-omit-frame-pointer", "-O1", "-g"]
# Per-file ISA flags, x86-64 only (elsewhere those files compile to nothing and the portable
# kernels run). The runtime dispatch in csrc/qg_cpu.c decides which compiled variant is used.
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = (
    {
        "_avx2.c": ["-mavx2", "-mfma", "-mf16c"],
        "_avx512.c": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    }
    if IS_X86_64
    else {}
)
OPENMP_HELP = """
qaconv-gs needs a C compiler with OpenMP support, and none was found:
  the probe `{cmd}` failed with:
{err}
Fixes:
  - Debian/Ubuntu: apt-get install gcc libgomp1   (gcc ships OpenMP; clang needs libomp-dev)
  - macOS: brew install libomp, then CC=clang CFLAGS="-Xpreprocessor -fopenmp"
  - or build single-threaded on purpose: QG_OPENMP=0 pip install .
"""

PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d\n", n);
    return n >= 1 ? 0 : 1;
}
"""


def _cc():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def check_openmp():
    tmp = tempfile.mkdtemp(prefix="qg_omp_probe_")
    try:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(PROBE)
        cmd = _cc() + ["-fopenmp", src, "-o", exe]
        for step in (cmd, [exe]):
            r = subprocess.run(step, capture_output=True, text=True)
            if r.returncode != 0:
                err = "    " + (r.stderr or r.stdout or "exit %d" % r.returncode).strip().replace("\n", "\n    ")
                sys.exit(OPENMP_HELP.format(cmd=" ".join(step), err=err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        if USE_OPENMP:
            check_openmp()
        compiler = self.compiler
        original = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs)
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    extra += flags
            return original(obj, src, ext, cc_args, extra, pp_opts)

        compiler._compile = _compile
        super().build_extensions()


omp = ["-fopenmp"] if USE_OPENMP else []
sanitize_link = ["-fsanitize=" + os.environ["QG_SANITIZE"]] if os.environ.get("QG_SANITIZE") else []
# The bindings (python/qaconv_gs/_native.c, the module, and one _native_<family>.c per kernel family) and the
# kernels (csrc/).
sources = sorted(glob.glob("python/qaconv_gs/_native*.c")) + sorted(glob.glob("csrc/*.c"))
depends = sorted(glob.glob("python/qaconv_gs/_native*.h")) + sorted(glob.glob("csrc/*.h"))

ext = Extension(
    "qaconv_gs._native",
    sources=sources,
    depends=depends,
    include_dirs=[numpy.get_include(), "csrc", "python/qaconv_gs"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
    extra_compile_args=BASE_FLAGS + omp,
    extra_link_args=omp + sanitize_link,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
