"""Class-neighbour kNN: qaconv_gs.class_neighbors vs faiss IndexFlatIP vs NumPy blocked matmul.

    PYTHONPATH=python python -m benchmarks.bench_neighbors            # N=10572, D=25088 (512x7x7), k=32
    PYTHONPATH=python python -m benchmarks.bench_neighbors --quick    # N=4000, D=4096: for iteration
    PYTHONPATH=python python -m benchmarks.bench_neighbors --n 2000 --d 8192 --threads 1 2 --repeats 5

Every method gets the same inputs and thread count: each thread count runs in a fresh subprocess
with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS set before NumPy, faiss or
qaconv_gs load (plus faiss.omp_set_num_threads and n_threads for ours). Methods:
  ours   qaconv_gs.class_neighbors(E, k) at the best SIMD level (blocked, symmetric: each pair once)
  faiss  IndexFlatIP on an L2-normalised copy, search(k+1), self dropped by index
  numpy  normalised copy, 1024-row blocks of X @ X.T (OpenBLAS sgemm), argpartition + sort
Times are medians over --repeats runs (wall clock; the CPU time of the process is recorded too,
and the speed-up by CPU time, the fairer number at 1 thread on a machine shared with other
jobs; at 2 threads it compares work, not speed) and include each method's own
preprocessing (faiss and NumPy normalise a copy of E; ours does not need one).
GF/s counts N*N*D useful flops for every method: computing each pair's dot product once (N^2/2
pairs x D multiply-adds x 2 flops). faiss and NumPy compute the full Gram matrix (twice the
arithmetic), ours the upper triangle of block pairs -- the same useful result, so the columns
compare, and ours is directly comparable with the measured FMA peak (2 flops per FMA lane).
FMA peak: a 12-chain FMA loop of the SIMD path in use (benchmarks._common.fma_peak_gflops, best of 5
runs), flops per CPU-second of one core, times the thread count.
Peak extra memory: VmHWM growth of the worker process during the method's first run (the
high-water mark is reset through /proc/self/clear_refs first), beyond the input E.
Before timing counts, the neighbour lists are cross-checked against ours (mean set overlap and
the largest difference of the k-th similarity). Output: a table on stdout, and
bench_out/bench_neighbors.json + bench_out/bench_neighbors.png (GF/s bars, peak lines).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from . import _common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FULL = {"n": 10_572, "d": 25_088, "k": 32}
QUICK = {"n": 4_000, "d": 4_096, "k": 32}


def make_data(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered float32 embeddings (realistic: classes have close neighbours)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 20), d), dtype=np.float32)
    E = centres[rng.integers(0, len(centres), n)]
    E += rng.standard_normal((n, d), dtype=np.float32)
    return E


def ours(E: np.ndarray, k: int, threads: int):
    import qaconv_gs as qg

    return qg.class_neighbors(E, k, return_similarity=True, n_threads=threads)


def _normalised(E: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("nd,nd->n", E, E, dtype=np.float64))
    return (E / np.maximum(norms, 1e-12)[:, None].astype(np.float32)).astype(np.float32, copy=False)


def _drop_self(idx: np.ndarray, sim: np.ndarray, k: int):
    """Remove each row's own index (by index) from k+1 results; keep the first k others."""
    n = idx.shape[0]
    keep = idx != np.arange(n)[:, None]
    # rows where self was not returned (ties with duplicates) keep their first k entries
    extra = keep.sum(axis=1) > k
    keep[extra, -1] = False
    return idx[keep].reshape(n, k), sim[keep].reshape(n, k)


def faiss_flat(E: np.ndarray, k: int, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    X = _normalised(E)
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    sim, idx = index.search(X, k + 1)
    return _drop_self(idx.astype(np.int64), sim, k)


def numpy_blocked(E: np.ndarray, k: int, threads: int, block: int = 1024):
    del threads  # BLAS threads are fixed by the environment of this subprocess
    X = _normalised(E)
    n = X.shape[0]
    idx = np.empty((n, k), np.int64)
    sim = np.empty((n, k), np.float32)
    for r0 in range(0, n, block):
        S = X[r0 : r0 + block] @ X.T
        rows = np.arange(S.shape[0])
        S[rows, r0 + rows] = -np.inf
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(S, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)  # similarity desc, then index asc
        idx[r0 : r0 + block] = np.take_along_axis(part, order, axis=1)
        sim[r0 : r0 + block] = np.take_along_axis(ps, order, axis=1)
    return idx, sim


METHODS = {"ours": ours, "faiss": faiss_flat, "numpy": numpy_blocked}


# ---------------------------------------------------------------- worker (one thread count)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def fma_peak() -> dict:
    """Measured single-thread FMA throughput of the SIMD path in use (flops / s, wall and CPU)."""
    pk = _common.fma_peak_gflops(1)
    return {"gflops_wall": pk["gflops"], "gflops_cpu": pk["cpu_gflops"]}


def worker(args) -> None:
    import qaconv_gs as qg
    from qaconv_gs import _native

    E = make_data(args.n, args.d, args.seed)
    out = {"threads": args.threads, "isa": _native.isa(), "methods": {}, "check": {}}
    out["peak_per_core"] = fma_peak()
    results = {}
    small = E[: min(len(E), 512)]
    for name in args.methods:
        fn = METHODS[name]
        if name == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                out["methods"][name] = None
                continue
        fn(small, min(args.k, len(small) - 1), args.threads)  # warm-up: thread pools, lazy imports
        walls, cpus, extra = [], [], None
        for rep in range(args.repeats):
            measured = rep == 0 and _reset_hwm()
            rss0 = _status_kb("VmRSS") if measured else None
            t0, c0 = time.perf_counter(), time.process_time()
            res = fn(E, args.k, args.threads)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            if measured and rss0 is not None:
                extra = (_status_kb("VmHWM") - rss0) * 1024
            if rep == 0:
                results[name] = res
            del res
        out["methods"][name] = {"wall": walls, "cpu": cpus, "extra_bytes": extra}
    if "ours" in results:
        i0, s0 = results["ours"]
        out["ours_digest"] = hashlib.sha256(i0.tobytes() + s0.tobytes()).hexdigest()[:16]
        for name, (i1, s1) in results.items():
            if name == "ours":
                continue
            same = (i0[:, :, None] == i1[:, None, :]).any(axis=2).mean()
            kth = float(np.max(np.abs(s0[:, -1].astype(np.float64) - s1[:, -1])))
            out["check"][name] = {"set_overlap": float(same), "max_kth_sim_diff": kth}
    out["qaconv_gs"] = qg.__name__
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver


def _plot(path: str, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    methods = report["config"]["methods"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(methods)
    colors = {"ours": "#1f77b4", "faiss": "#ff7f0e", "numpy": "#2ca02c"}
    for m_i, name in enumerate(methods):
        xs, ys = [], []
        for r_i, run in enumerate(runs):
            row = run["rows"].get(name)
            if row:
                xs.append(r_i + (m_i - (len(methods) - 1) / 2) * width)
                ys.append(row["gflops"])
        bars = ax.bar(xs, ys, width, label=name, color=colors.get(name))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    for r_i, run in enumerate(runs):
        peak = run["peak_gflops"]
        ax.hlines(peak, r_i - 0.45, r_i + 0.45, colors="k", linestyles="--", linewidth=1)
        ax.text(r_i + 0.45, peak, f" FMA peak\n {peak:.0f}", va="center", fontsize=7)
    ax.set_xticks(range(len(runs)), [f"{run['threads']} thread(s)" for run in runs])
    cfg = report["config"]
    ax.set_ylabel("useful GF/s  (N*N*D / wall time)")
    load = report["loadavg_start"][0]
    title = f"class_neighbors N={cfg['n']} D={cfg['d']} k={cfg['k']}  ({report['cpu']}, load avg {load:.1f})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, max(run["peak_gflops"] for run in runs) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"N={QUICK['n']}, D={QUICK['d']} (default: full)")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, help="timed runs per method (default 3 quick, 1 full)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out"), help="directory for JSON and PNG")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key in ("n", "d", "k"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    if args.repeats is None:
        args.repeats = 3 if args.quick or args.n * args.n * args.d < 1e12 else 1
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return 0

    flops = float(args.n) * args.n * args.d
    load0 = os.getloadavg()
    print(f"class_neighbors benchmark: N={args.n} D={args.d} k={args.k}, median of {args.repeats}")
    cpu = _common.cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} logical CPUs; load average {load0[0]:.2f} {load0[1]:.2f}")
    print(f"useful flops per run: N*N*D = {flops:.3e}")
    head = f"{'thr':>3} {'method':>6} {'wall s':>8} {'cpu s':>8} {'GF/s':>7} {'%peak':>6} {'vs faiss':>8}"
    print(head + f" {'(cpu)':>7} {'extra MB':>9}  check vs ours", flush=True)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _common.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "loadavg_start": load0,
        "config": {k: getattr(args, k) for k in ("n", "d", "k", "repeats", "seed", "methods", "threads")},
        "gflops_definition": "N*N*D / median wall seconds (each pair once, 2 flops per multiply-add)",
        "runs": [],
    }
    ok = True
    digests = set()
    for t in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        env["PYTHONPATH"] = _common.worker_pythonpath(env)
        cmd = [sys.executable, "-m", "benchmarks.bench_neighbors", "--worker", "--threads", str(t)]
        cmd += ["--n", str(args.n), "--d", str(args.d), "--k", str(args.k), "--repeats", str(args.repeats)]
        cmd += ["--seed", str(args.seed), "--methods", *args.methods]
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        line = [s for s in r.stdout.splitlines() if s.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            sys.exit(f"worker failed (threads={t}):\n{r.stdout}\n{r.stderr}")
        res = json.loads(line[0][len("RESULT ") :])
        # per-core FMA throughput while the probe runs (CPU time: robust to other jobs) x threads
        peak = res["peak_per_core"]["gflops_cpu"] * t
        run = {"threads": t, "isa": res["isa"], "peak_gflops": peak, "peak_per_core": res["peak_per_core"]}
        run["rows"] = {}
        if "ours_digest" in res:
            digests.add(res["ours_digest"])
        faiss_med = faiss_cpu = None
        if res["methods"].get("faiss"):
            faiss_med = statistics.median(res["methods"]["faiss"]["wall"])
            faiss_cpu = statistics.median(res["methods"]["faiss"]["cpu"])
        for name in args.methods:
            m = res["methods"].get(name)
            if m is None:
                print(f"{t:>3} {name:>6} {'n/a':>8}  (not installed)")
                continue
            med = statistics.median(m["wall"])
            cpu = statistics.median(m["cpu"])
            gfs = flops / med / 1e9
            ratio = faiss_med / med if faiss_med else float("nan")
            ratio_cpu = faiss_cpu / cpu if faiss_cpu else float("nan")
            extra = m["extra_bytes"]
            chk = res["check"].get(name)
            note = ""
            if chk:
                agree = chk["set_overlap"] >= 0.99 and chk["max_kth_sim_diff"] <= 1e-4
                ok &= agree
                note = f"{'ok' if agree else 'MISMATCH'}: overlap {chk['set_overlap']:.4f}, "
                note += f"k-th sim diff {chk['max_kth_sim_diff']:.1e}"
            extra_s = f"{extra / 2**20:9.1f}" if extra is not None else f"{'n/a':>9}"
            vs = f"{ratio:7.2f}x {ratio_cpu:6.2f}x" if faiss_med else f"{'-':>8} {'-':>7}"  # faiss missing
            pct = 100 * gfs / peak
            print(
                f"{t:>3} {name:>6} {med:8.3f} {cpu:8.3f} {gfs:7.1f} {pct:5.0f}% {vs} {extra_s}  {note}",
                flush=True,
            )
            run["rows"][name] = {
                "wall_median": med,
                "cpu_median": cpu,
                "wall": m["wall"],
                "cpu": m["cpu"],
                "gflops": gfs,
                "speedup_vs_faiss": ratio if faiss_med else None,
                "speedup_vs_faiss_cpu_time": ratio_cpu if faiss_cpu else None,
                "extra_bytes": extra,
                "check": chk,
            }
        report["runs"].append(run)
        print(f"    FMA peak ({res['isa']}, measured): {peak / t:.1f} GF/s per core x {t}", flush=True)
    if len(report["runs"]) > 1:
        base_row = report["runs"][0]["rows"].get("ours")
        for run in report["runs"][1:]:
            row = run["rows"].get("ours")
            if base_row and row:
                sc = base_row["wall_median"] / row["wall_median"]
                print(f"ours thread scaling {report['runs'][0]['threads']} -> {run['threads']}: {sc:.2f}x")
                run["ours_scaling"] = sc
    if "ours" in args.methods:
        same = len(digests) == 1
        report["ours_identical_across_threads"] = same
        print(f"ours bit-identical across thread counts: {'yes' if same else 'NO'}")
        ok &= same
    report["loadavg_end"] = os.getloadavg()
    print(f"load average at the end: {report['loadavg_end'][0]:.2f}")
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bench_neighbors.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1)
    try:
        ppath = os.path.join(args.out, "bench_neighbors.png")
        _plot(ppath, report)
        print(f"wrote {jpath} and {ppath}")
    except ImportError:
        print(f"wrote {jpath} (matplotlib not installed: no plot)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
