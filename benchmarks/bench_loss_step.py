"""The loss step alone: ``QAConvGSLoss`` forward + backward on one batch, restricted (k nearest) against full
scoring (k = N-1), at the shapes of ``benchmarks/bench_learning.py`` (N classes, B = 64, maps [64, 4, 4]).

bench_learning.py times the same call inside training, where the CNN and other jobs on the machine share
the cores; this script times only the loss step, with nothing else running in the process, so its ratios
are the cleaner measure of what restricted scoring saves. Per configuration: every class row imprinted
once (explicitly, so no step imprints), the neighbour table built, then --warmup untimed and --steps timed
steps on random maps with labels drawn as the training batches are (64 random glyphs for the default
configuration, 32 random classes x 2 for the batch-triplet recipe, with and without k_batch=32, plain or
weighted).
Reported: the median and the 10 %-90 % range of the per-step times.

    python benchmarks/bench_loss_step.py                      # N = 2000, k = 8 32 64 128 N-1, 2 threads
    python benchmarks/bench_loss_step.py --classes 500 --ks 32,N-1

Writes bench_out/bench_loss_step.json (--out, or QG_BENCH_OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import OUT_DIR, machine_info, thread_env, worker_pythonpath  # noqa: E402
from benchmarks.bench_learning import FEAT_C, FEAT_HW, RECIPE, WEIGHTED  # noqa: E402

BATCH = 64
# name -> (QAConvGSLoss arguments, the configuration whose k = N-1 row is its full-scoring twin); k_batch
# extras are capped at 0 under full scoring, so that configuration skips k = N-1 and uses the recipe's
CONFIGS = {
    "defaults": ({}, "defaults"),
    "batch-triplet recipe": (RECIPE, "batch-triplet recipe"),
    "recipe, k_batch=32": ({**RECIPE, "k_batch": 32}, "batch-triplet recipe"),
    "recipe, k_batch=32 weighted": (WEIGHTED, "batch-triplet recipe"),
}


def time_config(torch, N: int, k: int, extra: dict, args) -> dict:
    from qaconv_gs.torch import QAConvGSLoss

    crit = QAConvGSLoss(N, FEAT_C, FEAT_HW, FEAT_HW, k_nearest=k, seed=args.seed, **extra)
    rng = np.random.default_rng(args.seed)
    # every row imprinted once, explicitly: the timed steps then never imprint (as after the first epochs)
    for a in range(0, N, 256):
        ids = np.arange(a, min(N, a + 256))
        crit._core.imprint(rng.standard_normal((ids.size, FEAT_C, FEAT_HW, FEAT_HW)).astype(np.float32), ids)
    crit.on_epoch_start()
    pk = extra.get("triplet") == "batch"

    def labels() -> np.ndarray:
        if pk:
            return np.repeat(rng.choice(N, BATCH // 2, replace=N < BATCH // 2), 2)
        return rng.integers(0, N, BATCH)  # a shuffled loader's batch: classes may repeat

    x = torch.from_numpy(rng.standard_normal((BATCH, FEAT_C, FEAT_HW, FEAT_HW)).astype(np.float32))
    times = []
    for i in range(args.warmup + args.steps):
        y = torch.from_numpy(labels())
        feats = x.clone().requires_grad_()
        t0 = time.perf_counter()
        crit(feats, y).backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1e3 * np.asarray(times)
    return {
        "k": k,
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--ks", default="8,32,64,128,N-1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT_DIR), help="output directory (bench_out or QG_BENCH_OUT)")
    args = p.parse_args(argv)
    # OpenMP reads its thread count once, at load: pin it by restarting with the environment
    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        env = thread_env(args.threads)
        env["PYTHONPATH"] = worker_pythonpath(env)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    import torch

    torch.set_num_threads(args.threads)
    N = args.classes
    ks = sorted({N - 1 if k.strip() == "N-1" else min(int(k), N - 1) for k in args.ks.split(",")})
    rows = []
    for name, (extra, _) in CONFIGS.items():
        for k in ks:
            if "k_batch" in extra and k == N - 1:
                continue  # no extras under full scoring: the twin's row is this row
            r = time_config(torch, N, k, extra, args)
            r["config"] = name
            rows.append(r)
            print(f"  {name}, k = {k}: {r['median_ms']:.2f} ms", flush=True)
    info = machine_info()
    print()
    print(
        f"loss step (QAConvGSLoss forward + backward), N = {N}, B = {BATCH}, maps [{FEAT_C}, {FEAT_HW}, "
        f"{FEAT_HW}], {args.threads} threads, {info['cpu']}, {info['date']}, load {info['load_average']}"
    )
    print()
    print("| configuration | k | median ms (p10-p90) | less time than k = N-1 |")
    print("|---|---:|---:|---:|")
    for r in rows:
        twin = CONFIGS[r["config"]][1]
        full = next(f for f in rows if f["config"] == twin and f["k"] == N - 1)
        k = "N-1" if r["k"] == N - 1 else str(r["k"])
        print(
            f"| {r['config']} | {k} | {r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) "
            f"| {full['median_ms'] / r['median_ms']:.1f}x |"
        )
    payload = {"machine": info, "classes": N, "threads": args.threads, "rows": rows}
    out = Path(args.out) / "bench_loss_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
