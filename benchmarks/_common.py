"""Shared helpers for the benchmark scripts: thread pinning, timing, the machine's FMA peak, output.

Timing: one warm-up call, then the median of `repeat` calls (wall clock, time.perf_counter), with the
process CPU time of each call recorded too. On a busy machine the wall clock of a multi-threaded call is
inflated by other processes; CPU time is not (it is an optimistic bound: flops / CPU-seconds / threads).

Threads: every method of a comparison gets the same thread count. The reliable way to set the thread
count of NumPy's BLAS and of OpenMP runtimes is the environment before they load, so scripts run each
thread count in a fresh subprocess with `thread_env(n)` (see `run_in_subprocess`).

Peak: `fma_peak_gflops(threads)` compiles (once, cached under bench_out/) and runs a small C kernel of
12 independent 8-wide FMA chains (AVX2 + FMA, `cc -O2 -mavx2 -mfma`), so the peak line in plots is
measured on this machine rather than taken from a datasheet. Returns None when no C compiler or no
AVX2/FMA is available.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

OUT_DIR = Path(os.environ.get("QG_BENCH_OUT", "bench_out"))

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def thread_env(n: int, base: dict | None = None) -> dict:
    """A copy of the environment with every known thread-count variable set to n."""
    env = dict(os.environ if base is None else base)
    for var in THREAD_VARS:
        env[var] = str(n)
    return env


def run_in_subprocess(module: str, args: list[str], threads: int) -> dict:
    """Run `python -m module args...` with thread_env(threads); it must print one JSON object as its
    last stdout line, which is returned."""
    env = thread_env(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path("python").resolve()), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_fn(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> dict:
    """Median / min wall seconds and median CPU seconds of fn() over `repeat` calls after warm-up."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "cpu_median_s": statistics.median(cpu),
        "repeat": repeat,
    }


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        from qaconv_gs import _native

        info["qaconv_gs_isa"] = _native.isa()
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------- FMA peak

_FMA_SRC = r"""
#include <immintrin.h>
#include <stdint.h>
/* 12 independent chains (latency 4 x 2 pipes needs >= 8); returns a value so nothing is dropped. */
float qg_fma_chains(int64_t iters)
{
    __m256 a0 = _mm256_set1_ps(1.0f), a1 = _mm256_set1_ps(1.1f), a2 = _mm256_set1_ps(1.2f);
    __m256 a3 = _mm256_set1_ps(1.3f), a4 = _mm256_set1_ps(1.4f), a5 = _mm256_set1_ps(1.5f);
    __m256 a6 = _mm256_set1_ps(1.6f), a7 = _mm256_set1_ps(1.7f), a8 = _mm256_set1_ps(1.8f);
    __m256 a9 = _mm256_set1_ps(1.9f), a10 = _mm256_set1_ps(2.0f), a11 = _mm256_set1_ps(2.1f);
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i) {
        a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c);
        a2 = _mm256_fmadd_ps(a2, m, c); a3 = _mm256_fmadd_ps(a3, m, c);
        a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c);
        a8 = _mm256_fmadd_ps(a8, m, c); a9 = _mm256_fmadd_ps(a9, m, c);
        a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
        /* opaque to the optimiser: all 12 chains stay distinct and are all executed */
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
        __asm__ volatile("" : "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}
"""
FLOPS_PER_ITER = 12 * 8 * 2


def _fma_lib() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    tag = hashlib.sha1(_FMA_SRC.encode()).hexdigest()[:10]
    lib = OUT_DIR / f".fma_peak_{tag}.so"
    if not lib.exists():
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "fma.c"
            src.write_text(_FMA_SRC)
            tmp_lib = Path(tmp) / "fma.so"
            r = subprocess.run(
                [cc, "-O2", "-mavx2", "-mfma", "-shared", "-fPIC", str(src), "-o", str(tmp_lib)],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                return None
            shutil.move(str(tmp_lib), lib)
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError:
        return None
    dll.qg_fma_chains.argtypes = [ctypes.c_int64]
    dll.qg_fma_chains.restype = ctypes.c_float
    return dll


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
        return " avx2" in flags and " fma" in flags
    except OSError:
        return False


def fma_peak_gflops(threads: int = 1, seconds: float = 0.3, repeat: int = 5) -> dict | None:
    """Measured AVX2 FMA peak: {"gflops": total over `threads`, "per_core": ..., "cpu_gflops": by CPU
    time}. Each of `threads` Python threads runs the chain kernel (ctypes releases the GIL); the best of
    `repeat` runs is kept (peak = least disturbed run)."""
    if not _cpu_has_avx2_fma():
        return None
    dll = _fma_lib()
    if dll is None:
        return None
    iters = 1 << 20
    t0 = time.perf_counter()
    dll.qg_fma_chains(iters)
    dt = max(time.perf_counter() - t0, 1e-6)
    iters = max(1 << 16, int(iters * seconds / dt))
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        barrier = threading.Barrier(threads + 1)

        def work(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            dll.qg_fma_chains(iters)

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        c0 = time.process_time()
        barrier.wait()
        w0 = time.perf_counter()
        for t in pool:
            t.join()
        w1, c1 = time.perf_counter(), time.process_time()
        best_wall = min(best_wall, w1 - w0)
        best_cpu = min(best_cpu, max(c1 - c0, 1e-9))
    flops = float(FLOPS_PER_ITER) * iters * threads
    return {
        "threads": threads,
        "gflops": flops / best_wall / 1e9,
        "per_core": flops / best_wall / 1e9 / threads,
        "cpu_gflops": flops / best_cpu / 1e9,
    }


# ---------------------------------------------------------------- output


def write_json(name: str, payload: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return path


def bar_plot(
    name: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    title: str,
    ylabel: str = "GF/s",
    hlines: dict[str, float] | None = None,
) -> Path | None:
    """Grouped bars (one group per entry of `groups`, one bar per series) with optional horizontal
    reference lines (e.g. the measured peak); PNG under OUT_DIR. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(n, 1) * 0.6 + 2), 4.5))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width, label=label)
        for b, v in zip(bars, values):
            if v is not None:
                x = b.get_x() + b.get_width() / 2
                ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=7)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="k")
        ax.annotate(label, (len(groups) - 0.5, y), ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = OUT_DIR / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
