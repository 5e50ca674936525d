"""Class-neighbour kNN: qaconv_gs.class_neighbors vs faiss IndexFlatIP vs NumPy blocked matmul.

    PYTHONPATH=python python benchmarks/bench_neighbors.py                 # N=10572, D=25088, k=32
    PYTHONPATH=python python benchmarks/bench_neighbors.py --n 4000 --d 2048 --repeats 5

Every method gets the same thread count (each count runs in a fresh subprocess with
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS set before NumPy, faiss or qaconv_gs
load, plus faiss.omp_set_num_threads). Times are wall-clock medians over --repeats runs and
include each method's own preprocessing (faiss and NumPy normalise a copy of E; ours does not).
GF/s counts N*N*D useful flops for every method, so the columns compare: faiss and NumPy do
N*N*D multiply-adds (the full Gram matrix), ours does N*N*D/2 (each pair once) -- the same useful
result. The neighbour lists of the three methods are cross-checked (similarity of the k-th
neighbour within 1e-5, and set overlap reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


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


def worker(args) -> None:
    E = make_data(args.n, args.d, args.seed)
    out = {"threads": args.threads, "times": {}, "check": {}}
    results = {}
    for name in args.methods:
        fn = METHODS[name]
        if name == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                out["times"][name] = None
                continue
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = fn(E, args.k, args.threads)
            ts.append(time.perf_counter() - t0)
        results[name] = res
        out["times"][name] = ts
    if "ours" in results:
        i0, s0 = results["ours"]
        for name, (i1, s1) in results.items():
            if name == "ours":
                continue
            overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(i0.tolist(), i1.tolist())])
            kth = float(np.max(np.abs(s0[:, -1].astype(np.float64) - s1[:, -1])))
            out["check"][name] = {"set_overlap": float(overlap), "max_kth_sim_diff": kth}
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_572)
    p.add_argument("--d", type=int, default=25_088)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return

    flops = float(args.n) * args.n * args.d
    print(f"class_neighbors benchmark: N={args.n} D={args.d} k={args.k}, median of {args.repeats}")
    print(f"useful flops per run: N*N*D = {flops:.3e}")
    print(f"{'threads':>7} {'method':>8} {'seconds':>10} {'GF/s':>8}  check vs ours", flush=True)
    for t in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(t)]
        cmd += ["--n", str(args.n), "--d", str(args.d), "--k", str(args.k), "--repeats", str(args.repeats)]
        cmd += ["--seed", str(args.seed), "--methods", *args.methods]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [s for s in r.stdout.splitlines() if s.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            sys.exit(f"worker failed (threads={t}):\n{r.stdout}\n{r.stderr}")
        res = json.loads(line[0][len("RESULT ") :])
        for name in args.methods:
            ts = res["times"].get(name)
            if ts is None:
                print(f"{t:>7} {name:>8} {'n/a':>10} {'n/a':>8}  (not installed)")
                continue
            med = statistics.median(ts)
            chk = res["check"].get(name)
            note = f"overlap {chk['set_overlap']:.4f}, kth diff {chk['max_kth_sim_diff']:.1e}" if chk else ""
            runs = ", ".join(f"{x:.2f}" for x in ts)
            gfs = flops / med / 1e9
            print(f"{t:>7} {name:>8} {med:>10.3f} {gfs:>8.2f}  {note} [runs: {runs}]", flush=True)


if __name__ == "__main__":
    main()
