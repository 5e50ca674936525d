"""Pair maxima (QAConv correlation + two-way max): qaconv_gs vs PyTorch einsum + max vs NumPy/OpenBLAS
matmul per block + max, at each thread count, plus the training forward (argmax) + backward and the
P x G eval `match`.

    python -m benchmarks.bench_match [--quick] [--threads 1 2] [--repeat 5] [--match-n 2000]

Every thread count runs in a fresh subprocess whose environment sets OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS, MKL_NUM_THREADS (so NumPy's BLAS, PyTorch and qaconv_gs all get the same count;
ours and torch also get it explicitly). Inputs are L2-normalised maps; every method's maxima are
checked against ours (max abs difference <= 1e-5) before anything is timed. Times are the median of
--repeat calls after a warm-up. GF/s counts useful flops, 2*C*S^2 per pair (the max-poolings are free),
for every method. "GF/s/core (cpu)" divides by the process CPU time instead of the wall time: on a
busy machine it shows what the kernel does while it runs. The peak is measured by a 12-chain FMA
kernel in the vector width of the SIMD path in use (benchmarks/_common.py).

Methods (eval, no argmax):
  ours     qaconv_gs.matching.pair_maxima (fused: only a 6 x 16 register tile of Z exists)
  torch    torch.einsum('pcs,gcr->pgsr') then .max(3), .max(2), in blocks of probes (no_grad)
  numpy    per probe: Z = P[i]^T @ [G_0 | G_1 | ...] (one OpenBLAS sgemm, gallery concatenated once,
           outside the timing), then the two maxima with NumPy reductions
Training: pair_maxima_restricted(return_argmax=True) on B x (k+1) candidate pairs (distinct candidates
per sample, drawn from a compacted table of N classes as the model passes it), and
pair_maxima_restricted_backward; the backward is reported as % of that forward.
Match: qaconv_gs.QAConvGS.match (normalisation + fused scores) on P x G re-ID maps.
Writes bench_out/bench_match.json and bench_out/bench_match.png.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import _common

SHAPES = {  # name: C, H, W, P (= G)
    "re-ID": (128, 24, 8, 64),
    "faces": (512, 7, 7, 128),
}
QUICK_SHAPES = {
    "re-ID": (128, 24, 8, 24),
    "faces": (512, 7, 7, 40),
}
# Training: B samples, K = k + 1 candidate classes each. Like QAConvGS.forward_backward, the kernels get
# the table compacted to the step's distinct candidate classes (N here); with graph sampling the
# candidates of a batch overlap heavily, so N is a few times K, not the whole class count.
TRAIN = {  # name: C, H, W, B, K, N distinct candidate classes
    "re-ID": (128, 24, 8, 64, 32, 128),
    "faces": (512, 7, 7, 256, 257, 1024),
}
QUICK_TRAIN = {
    "re-ID": (128, 24, 8, 32, 32, 96),
    "faces": (512, 7, 7, 32, 65, 256),
}
TORCH_BLOCK = 16  # probes per einsum call (bounds torch's [p, G, S, S] intermediate)


def normalised(rng, n: int, C: int, H: int, W: int) -> np.ndarray:
    from qaconv_gs import matching as m

    x = rng.standard_normal((n, C, H, W), dtype=np.float32)
    return m.normalize(x, n_threads=1)[0]


def numpy_maxima(p: np.ndarray, gcat: np.ndarray, G: int, S: int):
    """Per probe one sgemm against the concatenated gallery, then both maxima."""
    P = p.shape[0]
    mp = np.empty((P, G, S), np.float32)
    mg = np.empty((P, G, S), np.float32)
    for i in range(P):
        z = (p[i].T @ gcat).reshape(S, G, S)  # [s, g, r]
        mp[i] = z.max(axis=2).T
        mg[i] = z.max(axis=0)
    return mp, mg


def torch_maxima(torch, tp, tg):
    P, G, S = tp.shape[0], tg.shape[0], tp.shape[2]
    mp = torch.empty((P, G, S))
    mg = torch.empty((P, G, S))
    with torch.no_grad():
        for i in range(0, P, TORCH_BLOCK):
            z = torch.einsum("pcs,gcr->pgsr", tp[i : i + TORCH_BLOCK], tg)
            mp[i : i + TORCH_BLOCK] = z.max(dim=3).values
            mg[i : i + TORCH_BLOCK] = z.max(dim=2).values
    return mp, mg


def gflops(flops: float, t: dict, threads: int) -> dict:
    return {
        "gflops": flops / t["median_s"] / 1e9,
        "gflops_per_core": flops / t["median_s"] / 1e9 / threads,
        # CPU time sums every thread: flops per CPU-second is already per core
        "gflops_per_core_cpu": flops / max(t["cpu_median_s"], 1e-12) / 1e9,
        **t,
    }


def worker(args) -> dict:
    """One thread count, in this (fresh) process."""
    from qaconv_gs import _native
    from qaconv_gs import matching as m

    nt = args.threads[0]
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(nt)
        except ImportError:
            torch = None
    rng = np.random.default_rng(0)
    out = {"threads": nt, "isa": _native.isa(), "peak": _common.fma_peak_gflops(nt), "eval": {}, "train": {}}
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for name, (C, H, W, n) in shapes.items():
        S = H * W
        x = normalised(rng, 2 * n, C, H, W)
        p, g = x[:n], x[n:]
        flops = 2.0 * C * S * S * n * n
        res = {"C": C, "H": H, "W": W, "P": n, "G": n, "flops": flops}
        mp, mg = m.pair_maxima(p, g, n_threads=nt)
        gcat = np.ascontiguousarray(g.reshape(n, C, S).transpose(1, 0, 2).reshape(C, n * S))
        p3 = np.ascontiguousarray(p.reshape(n, C, S))
        nmp, nmg = numpy_maxima(p3, gcat, n, S)
        res["check_numpy"] = float(max(np.abs(mp - nmp).max(), np.abs(mg - nmg).max()))
        assert res["check_numpy"] <= 1e-5, res
        res["ours"] = gflops(
            flops, _common.time_fn(lambda p=p, g=g: m.pair_maxima(p, g, n_threads=nt), args.repeat), nt
        )
        res["numpy"] = gflops(
            flops,
            _common.time_fn(lambda p3=p3, gcat=gcat, n=n, S=S: numpy_maxima(p3, gcat, n, S), args.repeat),
            nt,
        )
        if torch is not None:
            tp = torch.from_numpy(p3)
            tg = torch.from_numpy(np.ascontiguousarray(g.reshape(n, C, S)))
            tmp, tmg = torch_maxima(torch, tp, tg)
            res["check_torch"] = float(max(np.abs(mp - tmp.numpy()).max(), np.abs(mg - tmg.numpy()).max()))
            assert res["check_torch"] <= 1e-5, res
            res["torch"] = gflops(
                flops, _common.time_fn(lambda tp=tp, tg=tg: torch_maxima(torch, tp, tg), args.repeat), nt
            )
        out["eval"][name] = res

    train = QUICK_TRAIN if args.quick else TRAIN
    for name, (C, H, W, B, K, N) in train.items():
        S = H * W
        X = normalised(rng, B, C, H, W)
        E = normalised(rng, N, C, H, W)
        cand = np.stack([rng.choice(N, size=K, replace=False) for _ in range(B)])
        fwd = _common.time_fn(
            lambda X=X, E=E, cand=cand: m.pair_maxima_restricted(
                X, E, cand, return_argmax=True, n_threads=nt
            ),
            args.repeat,
        )
        mp, mg, ap, ag = m.pair_maxima_restricted(X, E, cand, return_argmax=True, n_threads=nt)
        # spot check against float64 for the first probes
        e3 = E.reshape(N, C, S).astype(np.float64)
        for b in range(min(2, B)):
            z = np.einsum("cs,kcr->ksr", X[b].reshape(C, S).astype(np.float64), e3[cand[b]])
            assert np.abs(z.max(axis=2) - mp[b]).max() <= 1e-5 and np.abs(z.max(axis=1) - mg[b]).max() <= 1e-5
        gmp = rng.standard_normal(mp.shape, dtype=np.float32)
        gmg = rng.standard_normal(mg.shape, dtype=np.float32)
        bwd = _common.time_fn(
            lambda a=(gmp, gmg, ap, ag, X, E, cand): m.pair_maxima_restricted_backward(*a, n_threads=nt),
            args.repeat,
        )
        flops = 2.0 * C * S * S * B * K
        out["train"][name] = {
            "C": C,
            "H": H,
            "W": W,
            "B": B,
            "K": K,
            "N": N,
            "forward": gflops(flops, fwd, nt),
            "backward": bwd,
            "backward_pct_of_forward": 100.0 * bwd["median_s"] / fwd["median_s"],
        }

    if nt == max(args.all_threads) and args.match_n > 0:
        import qaconv_gs as qg

        C, H, W, _ = SHAPES["re-ID"]
        n = args.match_n
        S = H * W
        model = qg.QAConvGS(num_classes=2, channels=C, height=H, width=W, k_nearest=1, seed=0, n_threads=nt)
        P = rng.standard_normal((n, C, H, W), dtype=np.float32)
        G = rng.standard_normal((n, C, H, W), dtype=np.float32)
        t = _common.time_fn(lambda: model.match(P, G), repeat=1 if n >= 1000 else args.repeat, warmup=0)
        flops = 2.0 * C * S * S * n * n
        res = gflops(flops, t, nt)
        res.update({"P": n, "G": n, "C": C, "H": H, "W": W, "flops": flops})
        out["match"] = res
    return out


def pct(x: float | None, peak: dict | None) -> str:
    if x is None or not peak:
        return "-"
    return f"{100 * x / peak['per_core']:.0f}%"


def report(results: list[dict], info: dict) -> None:
    print(f"# {info['date']}  {info['cpu']}  isa={results[0]['isa']}  load average {info['load_average']}")
    for r in results:
        pk = r["peak"]
        if pk:
            print(
                f"# {r['threads']} thread(s): measured FMA peak {pk['per_core']:.1f} GF/s/core wall, "
                f"{pk['cpu_gflops']:.1f} GF/s/core by CPU time"
            )
    hdr = (
        f"{'thr':>3} {'shape':<6} {'pairs':>9} {'method':<7} {'median s':>9} {'GF/s':>7} "
        f"{'GF/s/core':>9} {'(cpu)':>7} {'%peak':>6} {'ours/x':>7}"
    )
    print(hdr)
    for r in results:
        for name, e in r["eval"].items():
            for method in ("ours", "torch", "numpy"):
                if method not in e:
                    continue
                v = e[method]
                speedup = e["ours"]["gflops"] / v["gflops"] if method != "ours" else None
                cpu_peak = r["peak"]["cpu_gflops"] if r["peak"] else None
                cpu_pct = f"{100 * v['gflops_per_core_cpu'] / cpu_peak:.0f}%" if cpu_peak else "-"
                print(
                    f"{r['threads']:>3} {name:<6} {e['P']}x{e['G']:<5} {method:<7} {v['median_s']:>9.4f} "
                    f"{v['gflops']:>7.1f} {v['gflops_per_core']:>9.1f} {v['gflops_per_core_cpu']:>7.1f} "
                    f"{cpu_pct:>6} {'' if speedup is None else f'{speedup:.2f}x':>7}"
                )
    print("\ntraining (restricted pairs, argmax) forward and backward")
    for r in results:
        for name, t in r["train"].items():
            f = t["forward"]
            print(
                f"{r['threads']:>3} {name:<6} B={t['B']} K={t['K']}: forward {f['median_s']:.4f} s "
                f"({f['gflops']:.1f} GF/s, {f['gflops_per_core_cpu']:.1f} GF/s/core cpu), backward "
                f"{t['backward']['median_s']:.4f} s = {t['backward_pct_of_forward']:.1f}% of forward"
            )
    if len(results) >= 2:
        r1, r2 = results[0], results[-1]
        print(f"\nthread scaling {r1['threads']} -> {r2['threads']} (wall-clock speed-up of ours)")
        for name in r1["eval"]:
            s = r1["eval"][name]["ours"]["median_s"] / r2["eval"][name]["ours"]["median_s"]
            print(f"    eval {name}: {s:.2f}x")
        for name in r1["train"]:
            s = r1["train"][name]["forward"]["median_s"] / r2["train"][name]["forward"]["median_s"]
            print(f"    train forward {name}: {s:.2f}x")
    for r in results:
        if "match" in r:
            mt = r["match"]
            pk = r["peak"]
            frac = (
                f", {100 * mt['gflops'] / pk['gflops']:.0f}% of the measured {pk['gflops']:.0f} GF/s peak"
                if pk
                else ""
            )
            cpu_frac = (
                f" ({100 * mt['gflops_per_core_cpu'] / pk['cpu_gflops']:.0f}% by CPU time)" if pk else ""
            )
            print(
                f"\nmatch {mt['P']} x {mt['G']} re-ID, {r['threads']} threads: {mt['median_s']:.2f} s, "
                f"{mt['gflops']:.1f} GF/s{frac}{cpu_frac}"
            )


def plot(results: list[dict]) -> None:
    groups, series = [], {"ours": [], "torch einsum+max": [], "numpy sgemm+max": []}
    keys = {"ours": "ours", "torch einsum+max": "torch", "numpy sgemm+max": "numpy"}
    for r in results:
        for name, e in r["eval"].items():
            groups.append(f"{name}\n{r['threads']} thr")
            for label, k in keys.items():
                series[label].append(e[k]["gflops_per_core"] if k in e else None)
    peaks = {}
    for r in results:
        if r["peak"]:
            peaks[f"FMA peak ({r['threads']} thr) {r['peak']['per_core']:.0f}"] = r["peak"]["per_core"]
    _common.bar_plot(
        "bench_match",
        groups,
        series,
        "pair maxima, useful GF/s per core (wall clock)",
        ylabel="GF/s per core",
        hlines=peaks,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--match-n", type=int, default=None, help="P = G of the eval match (0: skip)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--all-threads", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.match_n is None:
        args.match_n = 128 if args.quick else 2000
    if args.worker:
        print(json.dumps(worker(args), default=float))
        return
    results = []
    for nt in args.threads:
        wargs = [
            "--worker",
            "--threads",
            str(nt),
            "--repeat",
            str(args.repeat),
            "--match-n",
            str(args.match_n),
        ]
        wargs += ["--all-threads", *map(str, args.threads)]
        if args.quick:
            wargs.append("--quick")
        if args.no_torch:
            wargs.append("--no-torch")
        print(f"running {nt} thread(s)...", file=sys.stderr, flush=True)
        results.append(_common.run_in_subprocess("benchmarks.bench_match", wargs, nt))
    info = _common.machine_info()
    report(results, info)
    path = _common.write_json("bench_match", {"machine": info, "args": vars(args), "results": results})
    plot(results)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
