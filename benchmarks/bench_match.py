"""Pair maxima forward (eval, no argmax): qaconv_gs vs PyTorch einsum + max, same thread count.

Useful FLOPs per pair: 2*C*S*S (the correlation); the max-poolings are not counted.
PyTorch materialises the [P, G, S, S] correlation; qaconv_gs keeps only a register tile of it.

    PYTHONPATH=python python benchmarks/bench_match.py [--threads N] [--repeat R]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qaconv_gs import _native
from qaconv_gs import matching as m

SHAPES = [  # name, C, H, W, P (= G)
    ("re-ID", 128, 24, 8, 64),
    ("face", 512, 7, 7, 128),
]


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (page faults, thread pool start)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(_native.default_threads()))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = ap.parse_args()
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch not installed: PyTorch baseline skipped")
    nt = args.threads
    print(f"threads = {nt}")
    print(f"{'shape':<8} {'C':>4} {'HxW':>6} {'pairs':>10} {'impl':<22} {'seconds':>9} {'GF/s':>8}")
    rng = np.random.default_rng(0)
    for name, C, H, W, n in SHAPES:
        x = rng.standard_normal((2 * n, C, H, W)).astype(np.float32)
        x, _ = m.normalize(x, n_threads=nt)
        bench_shape(torch, nt, args.repeat, name, x[:n], x[n:])


def bench_shape(torch, nt: int, repeat: int, name: str, probe: np.ndarray, gallery: np.ndarray) -> None:
    n, C, H, W = probe.shape
    S = H * W
    flops = 2.0 * C * S * S * n * n

    def row(impl: str, sec: float) -> None:
        shape = f"{H}x{W}"
        pairs = f"{n}x{n}"
        print(f"{name:<8} {C:>4} {shape:>6} {pairs:>10} {impl:<22} {sec:>9.4f} {flops / sec / 1e9:>8.1f}")

    row("qaconv_gs pair_maxima", best_time(lambda: m.pair_maxima(probe, gallery, n_threads=nt), repeat))
    w = np.full(2 * S, 1.0 / S, np.float32)
    row(
        "qaconv_gs match_scores",
        best_time(lambda: m.match_scores(probe, gallery, w, 0.0, n_threads=nt), repeat),
    )
    if torch is None:
        return
    torch.set_num_threads(nt)
    tp = torch.from_numpy(np.ascontiguousarray(probe.reshape(n, C, S)))
    tg = torch.from_numpy(np.ascontiguousarray(gallery.reshape(n, C, S)))

    def torch_maxima():
        with torch.no_grad():
            z = torch.einsum("pcs,gcr->pgsr", tp, tg)
            return z.max(dim=3).values, z.max(dim=2).values

    row("torch einsum+max", best_time(torch_maxima, repeat))
    # same results up to the float32 rounding of the correlation
    mp, mg = m.pair_maxima(probe, gallery, n_threads=nt)
    tmp, tmg = torch_maxima()
    err = max(np.abs(mp - tmp.numpy()).max(), np.abs(mg - tmg.numpy()).max())
    print(f"{'':<8} max |ours - torch| = {err:.2e}")


if __name__ == "__main__":
    main()
