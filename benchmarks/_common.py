"""Shared helpers for the benchmark scripts: thread pinning, timing, the machine's FMA peak, output.

Timing: one warm-up call, then the median of `repeat` calls (wall clock, time.perf_counter), with the
process CPU time of each call recorded too. On a busy machine the wall clock of a multi-threaded call is
inflated by other processes; CPU time is not (it is an optimistic bound: flops / CPU-seconds / threads).

Threads: every method of a comparison gets the same thread count. The reliable way to set the thread
count of NumPy's BLAS and of OpenMP runtimes is the environment before they load, so scripts run each
thread count in a fresh subprocess with `thread_env(n)` (see `run_in_subprocess`).

Peak: `fma_peak_gflops(threads)` runs qaconv_gs's probe of 12 independent FMA chains in the vector
width of the SIMD path in use, so the peak line in plots is measured on this machine (and path) rather
than taken from a datasheet.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
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


ROOT = Path(__file__).resolve().parents[1]


def worker_pythonpath(env: dict | None = None) -> str:
    """PYTHONPATH for a worker subprocess: the folder of the qaconv_gs package this process imports (an
    in-place build under python/, or an installed copy), then the repository root (for `benchmarks`),
    then the caller's PYTHONPATH. Putting the source folder python/ first regardless would hide an
    installed package behind a source tree that has no compiled extension (a `pip install .` checkout)."""
    env = os.environ if env is None else env
    spec = importlib.util.find_spec("qaconv_gs")
    if spec is None or not spec.origin:
        raise ImportError("qaconv_gs is not importable: install it (pip install .) or build it in place")
    pkg_parent = str(Path(spec.origin).resolve().parents[1])
    return os.pathsep.join(p for p in (pkg_parent, str(ROOT), env.get("PYTHONPATH")) if p)


def run_in_subprocess(module: str, args: list[str], threads: int) -> dict:
    """Run `python -m module args...` with thread_env(threads); it must print one JSON object as its
    last stdout line, which is returned."""
    env = thread_env(threads)
    env["PYTHONPATH"] = worker_pythonpath(env)
    r = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, check=False, cwd=ROOT
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


def fma_peak_gflops(threads: int = 1, seconds: float = 0.3, repeat: int = 5) -> dict:
    """Measured FMA peak of the SIMD path in use (qaconv_gs's probe: 12 independent FMA chains in the
    vector width of that path, 512-bit on AVX-512, 256-bit on AVX2): {"gflops": total over `threads`,
    "per_core": ..., "cpu_gflops": by CPU time}. Each of `threads` Python threads runs the probe (it
    releases the GIL); the best of `repeat` runs is kept (peak = least disturbed run)."""
    from qaconv_gs import _native

    iters = 1 << 20
    t0 = time.perf_counter()
    _native.neighbors_fma_probe(iters)
    dt = max(time.perf_counter() - t0, 1e-6)
    iters = max(1 << 16, int(iters * seconds / dt))
    best_wall, best_cpu, flops = float("inf"), float("inf"), 0.0
    for _ in range(repeat):
        barrier = threading.Barrier(threads + 1)
        done: list[float] = []

        def work(barrier: threading.Barrier = barrier, done: list = done) -> None:
            barrier.wait()
            done.append(_native.neighbors_fma_probe(iters))

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
        flops = float(sum(done))
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
