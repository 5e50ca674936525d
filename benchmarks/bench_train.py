"""Restricted training step (forward + backward, whole head and loss): qaconv_gs vs PyTorch autograd.

    PYTHONPATH=python python -m benchmarks.bench_train                # full shapes, 1 and 2 threads
    PYTHONPATH=python python -m benchmarks.bench_train --quick        # small shapes, seconds
    PYTHONPATH=python python -m benchmarks.bench_train --shapes reid --threads 2 --repeat 5

What is timed: `QAConvGS.forward_backward(features, labels)` (validation, candidate lookup, normalisation,
pair maxima with argmax, BN/fc/BN head, fused loss, and every backward) against
benchmarks/torch_reference.torch_step (the same maths in PyTorch with autograd; only the candidate rows
of the class table are leaves, the favourable case for PyTorch). class_neighbors is excluded from the
step (the table is computed once beforehand, as within an epoch) and timed separately.

Fairness: each (implementation, shape, thread count) runs in its own subprocess with OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set before any import, plus torch.set_num_threads / our
n_threads. Times are medians over --repeat steps after one warm-up step. Peak memory is VmHWM (peak
resident set) minus VmRSS after imports and input creation: the high-water mark is reset through
/proc/self/clear_refs just before the steps, so it covers the steps only. Batches are graph-sampled
(a centre class plus its nearest classes, 4 samples each), class embeddings are the model's seeded
random init. Before timing, the PyTorch worker runs our step once on the same inputs and reports the
largest relative differences (loss, gradients).

Also measured: the breakdown of our step (lap marks inside QAConvGS._forward_backward), and a tiny
step at 1 vs 2 threads (the OpenMP start-up cost that dominates small calls).
Writes bench_out/bench_train.json and bench_out/bench_train.png.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from . import _common

# name: (N, C, H, W, B, k)
SHAPES = {
    "reid": (1000, 128, 24, 8, 64, 31),
    "faces": (10000, 512, 7, 7, 256, 256),
}
EXTRA_SHAPES = {  # not run by default: faces with a quarter of the batch (PyTorch needs ~4 GB, not ~16)
    "faces-b64": (10000, 512, 7, 7, 64, 256),
}
QUICK_SHAPES = {
    "reid-quick": (100, 32, 8, 4, 16, 7),
    "faces-quick": (200, 64, 4, 4, 32, 15),
}
TINY = (20, 8, 4, 2, 8, 3)
NUM_INSTANCES = 4
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ process memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------ inputs


def make_inputs(shape: tuple, seed: int = 0, n_threads: int | None = None):
    """(model, features, labels): a seeded model and one graph-sampled batch (neighbours computed)."""
    import qaconv_gs as qg

    N, C, H, W, B, k = shape
    # init="random": every timed step does the same work (an imprinting model would rewrite rows in its
    # first steps), and the neighbour table the batches are sampled from is not that of an all-zero table
    model = qg.QAConvGS(N, C, H, W, k_nearest=k, seed=seed, n_threads=n_threads, init="random")
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((B, C, H, W), dtype=np.float32)
    return model, X, rng


def graph_batch(nbr: np.ndarray, B: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of one graph-sampled batch: a centre class and its nearest classes, NUM_INSTANCES each."""
    P = max(1, B // NUM_INSTANCES)
    centre = int(rng.integers(nbr.shape[0]))
    classes = [centre] + [int(c) for c in nbr[centre] if c != centre][: P - 1]
    while len(classes) < P:  # k < P - 1: fill with other classes
        c = int(rng.integers(nbr.shape[0]))
        if c not in classes:
            classes.append(c)
    y = np.repeat(np.asarray(classes, dtype=np.int64), NUM_INSTANCES)
    return np.resize(y, B)


def _nbr_cache(out: str, name: str, shape: tuple) -> str:
    return os.path.join(out, f".nbr_{name}_{'x'.join(map(str, shape))}.npy")


# ------------------------------------------------------------------------------ workers


def _median_times(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def worker_ours(name: str, shape: tuple, nt: int, repeat: int, out: str) -> dict:
    model, X, rng = make_inputs(shape, n_threads=nt)
    t0 = time.perf_counter()
    nbr = model.class_neighbors
    t_nbr = time.perf_counter() - t0
    np.save(_nbr_cache(out, name, shape), nbr)
    y = graph_batch(nbr, shape[4], rng)
    res = model.forward_backward(X, y)  # warm-up (its result is not kept alive during the timed steps)
    unique_rows, loss = int(res.grad_embed_ids.shape[0]), float(res.loss)
    del res
    gc.collect()
    base = _status_kb("VmRSS")
    reset = _reset_peak()
    times = _median_times(lambda: model.forward_backward(X, y), repeat)
    peak = _status_kb("VmHWM")
    # breakdown: lap marks inside the step (validation timed around the private call)
    laps_all: dict[str, list[float]] = {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        Xv, yv = model._batch(X, y)
        laps: list = []
        model._forward_backward(Xv, yv, laps=laps)
        prev = t0
        for n, stamp in [("validate", laps[0][1])] + laps[1:]:  # laps[0] marks the start of the step
            laps_all.setdefault(n, []).append(stamp - prev)
            prev = stamp
    breakdown = {k: statistics.median(v) for k, v in laps_all.items()}
    return {
        "impl": "qaconv_gs",
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_mb": (peak - base) / 1024.0 if peak and base else None,
        "peak_reset": reset,
        "neighbors_s": t_nbr,
        "unique_rows": unique_rows,
        "loss": loss,
        "breakdown_s": breakdown,
    }


def _frac_differ(a, b, rtol: float = 1e-3) -> float:
    """Fraction of elements differing by more than rtol * max|b| (argmax flips at float32 near-ties)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.mean(np.abs(a - b) > rtol * max(np.abs(b).max(), 1e-30)))


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def worker_torch(name: str, shape: tuple, nt: int, repeat: int, out: str) -> dict:
    import copy

    import torch

    from benchmarks.torch_reference import torch_step

    torch.set_num_threads(nt)
    model, X, rng = make_inputs(shape, n_threads=nt)
    cache = _nbr_cache(out, name, shape)
    nbr = np.load(cache) if os.path.exists(cache) else model.class_neighbors
    model._nbr, model._nbr_stale = nbr, False  # same table as the qaconv_gs worker, not recomputed
    y = graph_batch(nbr, shape[4], rng)
    head = copy.deepcopy(model.head_state)
    E = model.class_embed

    def step():
        return torch_step(torch, X, y, E, head, nbr, fc=model.fc, triplet=model.triplet)

    # agreement check before timing (float32 on both sides)
    ref = model.forward_backward(X, y)
    t = step()
    check = {
        "loss": abs(ref.loss - t["loss"]) / max(abs(t["loss"]), 1e-30),
        "grad_features": _rel(ref.grad_features, t["grad_features"]),
        "grad_embed_rows": _rel(ref.grad_embed_rows, t["grad_embed_rows"]),
        "grad_fc_weight": _rel(ref.grad_head["fc.weight"], t["grad_head"]["fc.weight"]),
        "frac_grad_features_differ": _frac_differ(ref.grad_features, t["grad_features"]),
        "frac_grad_embed_differ": _frac_differ(ref.grad_embed_rows, t["grad_embed_rows"]),
        "same_rows": bool(np.array_equal(ref.grad_embed_ids, t["grad_embed_ids"])),
    }
    del ref, t
    gc.collect()
    step()  # warm-up
    gc.collect()
    base = _status_kb("VmRSS")
    reset = _reset_peak()
    times = _median_times(step, repeat)
    peak = _status_kb("VmHWM")
    return {
        "impl": "torch",
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_mb": (peak - base) / 1024.0 if peak and base else None,
        "peak_reset": reset,
        "check": check,
        "torch": torch.__version__,
    }


def worker_tiny(nt: int, repeat: int, forced: bool) -> dict:
    """A tiny step, `repeat` calls. forced=True switches off the model's small-step guard (which runs
    steps this small on one thread), to show what a 2-thread OpenMP call costs here."""
    from qaconv_gs import model as model_mod

    if forced:
        model_mod._SMALL_STEP_FLOPS = 0.0
    model, X, rng = make_inputs(TINY, n_threads=nt)
    y = graph_batch(model.class_neighbors, TINY[4], rng)
    for _ in range(5):
        model.forward_backward(X, y)
    times = _median_times(lambda: model.forward_backward(X, y), repeat)
    return {
        "impl": "qaconv_gs",
        "forced_threads": forced,
        "step_threads": model._step_threads(TINY[4]),
        "time_s": statistics.median(times),
        "min_s": min(times),
        "p90_s": float(np.percentile(times, 90)),
        "max_s": max(times),
    }


def _torch_estimate_mb(shape: tuple, rows: int | None = None) -> float:
    """Rough PyTorch peak: the gathered [B, K, C, S] rows and their gradient, the [B, K, S, S]
    correlation and its gradient, and a few [R, C, S] row tensors (R unique rows, <= min(N, B*K))."""
    N, C, H, W, B, k = shape
    S, K = H * W, k + 1
    R = rows or min(N, B * K)
    return 4.0 * (2 * B * K * C * S + 2 * B * K * S * S + 4 * R * C * S) / 2**20


def run_worker(kind: str, name: str, shape: tuple, nt: int, repeat: int, out: str) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(nt)
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = _common.worker_pythonpath(env)
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--worker", kind, "--shape-spec"]
    cmd += [name, ",".join(map(str, shape)), "--threads", str(nt), "--repeat", str(repeat), "--out", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if r.returncode != 0:
        return {"impl": kind, "error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'shape':<12} {'N':>6} {'B':>4} {'K':>4} {'R':>5} {'thr':>3} {'ours s':>8} {'torch s':>8} "
        f"{'speedup':>8} {'ours MB':>8} {'torch MB':>9} {'mem x':>7} {'nbr s':>7}"
    )
    for r in rows:
        o, t = r["ours"], r.get("torch") or {}
        sp = t["time_s"] / o["time_s"] if t.get("time_s") and o.get("time_s") else None
        # below ~1 MB the high-water marks are page-level noise (even negative): no ratio
        mx = t["peak_mb"] / o["peak_mb"] if min(t.get("peak_mb") or 0, o.get("peak_mb") or 0) >= 1.0 else None
        N, C, H, W, B, k = r["shape"]
        R = _fmt(o.get("unique_rows"), "d")
        print(
            f"{r['name']:<12} {N:>6} {B:>4} {k + 1:>4} {R:>5} {r['threads']:>3} "
            f"{_fmt(o.get('time_s'), '.4f'):>8} {_fmt(t.get('time_s'), '.4f'):>8} {_fmt(sp, '.1f'):>7}x "
            f"{_fmt(o.get('peak_mb'), '.1f'):>8} {_fmt(t.get('peak_mb'), '.1f'):>9} {_fmt(mx, '.1f'):>6}x "
            f"{_fmt(o.get('neighbors_s'), '.2f'):>7}"
        )
        for side in (o, t):
            if side.get("error") or side.get("skipped"):
                print(f"    {side.get('impl')}: {side.get('error') or side.get('skipped')}")
        if t.get("check"):
            c = t["check"]
            print(
                f"    agreement (max rel. diff, float32 both): loss {c['loss']:.1e}, grad_features "
                f"{c['grad_features']:.1e}, grad_embed_rows {c['grad_embed_rows']:.1e}, fc.weight "
                f"{c['grad_fc_weight']:.1e}, same rows {c['same_rows']}; elements off by > 1e-3 of the max "
                f"(argmax flips at near-ties): {100 * c['frac_grad_features_differ']:.3f}% / "
                f"{100 * c['frac_grad_embed_differ']:.3f}%"
            )


def print_breakdown(rows: list[dict]) -> None:
    print("\nbreakdown of our step (median seconds per piece; 'other' = total - sum of pieces):")
    for r in rows:
        o = r["ours"]
        if "breakdown_s" not in o:
            continue
        parts = dict(o["breakdown_s"])
        parts["other"] = max(0.0, o["time_s"] - sum(parts.values()))
        cells = "  ".join(f"{k} {v * 1e3:.1f}ms ({100 * v / o['time_s']:.0f}%)" for k, v in parts.items())
        print(f"  {r['name']} {r['threads']}t: {cells}")


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    labels = [f"{r['name']}\n{r['threads']}t" for r in rows]
    xs = np.arange(len(rows))
    for ax, key, title in (
        (axes[0], "time_s", "step time (s, log)"),
        (axes[1], "peak_mb", "peak memory (MB, log)"),
    ):
        ours = [r["ours"].get(key) or np.nan for r in rows]
        torch_ = [(r.get("torch") or {}).get(key) or np.nan for r in rows]
        ax.bar(xs - 0.2, ours, 0.4, label="qaconv_gs")
        ax.bar(xs + 0.2, torch_, 0.4, label="PyTorch autograd")
        for x, a, b in zip(xs, ours, torch_):
            if np.isfinite(a) and np.isfinite(b):
                ax.text(x, max(a, b), f"{b / a:.1f}x", ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        lo = np.nanmin(ours + torch_) if np.isfinite(ours + torch_).any() else 1.0
        ax.set_ylim(bottom=lo / 3)
        ax.set_xticks(xs, labels)
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    bottom = np.zeros(len(rows))
    names: list[str] = []
    for r in rows:
        for k in r["ours"].get("breakdown_s", {}):
            if k not in names:
                names.append(k)
    for k in names:
        vals = np.array(
            [100 * r["ours"].get("breakdown_s", {}).get(k, 0.0) / r["ours"]["time_s"] for r in rows]
        )
        ax.bar(xs, vals, 0.6, bottom=bottom, label=k)
        bottom += vals
    ax.set_xticks(xs, labels)
    ax.set_ylabel("% of our step")
    ax.set_title("our step, breakdown")
    ax.legend(fontsize=7)
    fig.suptitle("restricted training step, forward + backward (qaconv_gs vs PyTorch CPU autograd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _machine() -> dict:
    import qaconv_gs as qg

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "qaconv_gs": qg.info(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all of the mode)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per run (default 5, quick 3)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny-step thread check")
    ap.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    ap.add_argument("--worker", choices=("ours", "torch", "tiny", "tiny-forced"), help=argparse.SUPPRESS)
    ap.add_argument("--shape-spec", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    if args.worker:
        nt = int(args.threads)
        if args.worker.startswith("tiny"):
            res = worker_tiny(nt, args.repeat, args.worker == "tiny-forced")
        else:
            name, spec = args.shape_spec
            shape = tuple(int(v) for v in spec.split(","))
            fn = worker_ours if args.worker == "ours" else worker_torch
            res = fn(name, shape, nt, args.repeat, args.out)
        print(json.dumps(res))
        return 0

    table = QUICK_SHAPES if args.quick else SHAPES
    names = args.shapes.split(",") if args.shapes else list(table)
    every = {**SHAPES, **EXTRA_SHAPES, **QUICK_SHAPES}
    unknown = [n for n in names if n not in every]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; expected names from {sorted(every)}")
    threads = [int(t) for t in args.threads.split(",")]
    repeat = args.repeat or (3 if args.quick else 5)
    load0 = os.getloadavg()
    info = _machine()
    print(
        f"restricted training step, {info['cpu']}, {info['cores']} cores, SIMD {info['qaconv_gs']['simd']}, "
        f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; median of {repeat} steps"
    )
    rows = []
    for name in names:
        shape = every[name]
        for nt in threads:
            row = {"name": name, "shape": list(shape), "threads": nt}
            row["ours"] = run_worker("ours", name, shape, nt, repeat, args.out)
            if not args.no_torch:
                need = _torch_estimate_mb(shape, row["ours"].get("unique_rows"))
                avail = _mem_available_mb()
                if avail is not None and need > 0.8 * avail:
                    row["torch"] = {
                        "impl": "torch",
                        "skipped": f"needs ~{need:.0f} MB, {avail:.0f} MB available",
                    }
                else:
                    row["torch"] = run_worker("torch", name, shape, nt, repeat, args.out)
            rows.append(row)
            print_table([row])
    print("\nsummary:")
    print_table(rows)
    print_breakdown(rows)
    tiny = {}
    if not args.no_tiny:
        N, C, H, W, B, k = TINY
        print(
            f"\ntiny step (N={N}, C={C}, {H}x{W}, B={B}, k={k}), 200 calls; 'forced' switches off the "
            "model's one-thread guard for tiny steps:"
        )
        for kind in ("tiny", "tiny-forced"):
            for nt in (1, 2):
                r = run_worker(kind, "tiny", TINY, nt, 200, args.out)
                tiny[f"{kind}/{nt}"] = r
                print(
                    f"  {kind:<12} n_threads={nt} (runs {r.get('step_threads', '?')}): median "
                    f"{_fmt(r.get('time_s'), '.6f')} s  min {_fmt(r.get('min_s'), '.6f')}  "
                    f"p90 {_fmt(r.get('p90_s'), '.6f')}  max {_fmt(r.get('max_s'), '.6f')}"
                )
    load1 = os.getloadavg()
    print(f"load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    result = {
        "benchmark": "train_step",
        "machine": info,
        "load_average_start": load0,
        "load_average_end": load1,
        "repeat": repeat,
        "rows": rows,
        "tiny": tiny,
    }
    path = os.path.join(args.out, "bench_train.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    png = os.path.join(args.out, "bench_train.png")
    if plot(rows, png):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
