"""Sharded qaconv-gs on 1..R processes of one machine (torch.distributed gloo over loopback).

For every world size R it launches R copies of this script (--worker) and reports, per rank:
memory (embedding rows, momentum buffer, neighbour rows, estimated step scratch, peak RSS), the time of
one neighbour refresh and of a training step (forward_backward + the SGD update), and the bytes each rank
sent / received per step and per refresh (logical payload counted by the communicator).

    python benchmarks/bench_distributed.py            # full sizes
    python benchmarks/bench_distributed.py --quick    # small sizes, a few seconds
    python benchmarks/bench_distributed.py --ranks 1,2,4 --threads 1 --json out.json
    python benchmarks/bench_distributed.py --table 4000x4096 --ranks 2   # the neighbour table alone
    python benchmarks/bench_distributed.py --backend mpi ...             # mpirun + mpi4py instead of gloo

With --table NxD only the neighbour table is measured: a random [N, D] table split evenly, the sharded
table (sharded_class_neighbors over the ring) timed on every rank, checked bit for bit against the
one-process class_neighbors, which rank 0 also times with the same threads (the baseline).

Every rank uses --threads OpenMP threads (default 1), so R ranks use R cores: on a machine with fewer cores
than ranks the step times measure oversubscription, not scaling (the report prints the core count and
the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the benchmarks package lives in the repository root
    sys.path.insert(0, str(ROOT))
from benchmarks._common import worker_pythonpath  # noqa: E402


def _sizes(quick: bool) -> dict:
    if quick:
        return {"N": 1000, "C": 32, "H": 4, "W": 4, "k": 8, "batch": 32, "steps": 2}
    return {"N": 8000, "C": 64, "H": 8, "W": 4, "k": 32, "batch": 128, "steps": 5}


def worker(args: argparse.Namespace) -> None:
    from qaconv_gs import Trainer  # the launcher's qaconv_gs: it set PYTHONPATH (worker_pythonpath)
    from qaconv_gs.distributed import ShardedQAConvGS, init_communicator

    cfg = json.loads(args.config)
    if args.backend == "mpi":
        comm = init_communicator("mpi")
    else:
        comm = init_communicator(
            "torch",
            init_method=os.environ["QG_INIT"],
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    if "table_N" in cfg:
        table_worker(args, comm)
        return
    R, r = comm.size, comm.rank
    model_kw = {
        "num_classes": cfg["N"],
        "channels": cfg["C"],
        "height": cfg["H"],
        "width": cfg["W"],
        "k_nearest": cfg["k"],
        "seed": 0,
        "n_threads": args.threads,
        "init": "random",  # every timed step does the same work (no imprinting); the comparison uses it too
    }
    model = ShardedQAConvGS(**model_kw, comm=comm)
    comm.barrier()
    comm.reset_counters()
    t0 = time.perf_counter()
    model.refresh_neighbors()
    t_nbr = time.perf_counter() - t0
    comm.barrier()
    t_nbr_all = time.perf_counter() - t0
    nbr_bytes = (comm.bytes_sent, comm.bytes_received)

    B = cfg["batch"]
    per = [B // R + (1 if q < B % R else 0) for q in range(R)]
    off = sum(per[:r])
    rng = np.random.default_rng(1)
    trainer = Trainer(model, lr=0.01, momentum=0.9, sparse_embed=True)
    times, sent, recv = [], [], []
    for step in range(cfg["steps"] + 1):
        X = rng.standard_normal((B, cfg["C"], cfg["H"], cfg["W"]), dtype=np.float32)
        y = rng.integers(0, cfg["N"], size=B)
        comm.barrier()
        comm.reset_counters()
        t0 = time.perf_counter()
        trainer.step(X[off : off + per[r]], y[off : off + per[r]])
        dt = time.perf_counter() - t0
        if step:  # the first step warms up (allocations, the first messages)
            times.append(dt)
            sent.append(comm.bytes_sent)
            recv.append(comm.bytes_received)
    D = cfg["C"] * cfg["H"] * cfg["W"]
    S = cfg["H"] * cfg["W"]
    n_r = model.hi - model.lo
    M_r = B * (cfg["k"] + 1) / R  # expected pairs owned by a rank (uniform labels)
    scratch = (
        B * D * 4  # gathered normalised batch
        + M_r * S * (4 + 4 + 2 + 2) * 2  # maxima, argmax, their gradients
        + M_r * 2 * S * 8 * 2  # head inputs and input gradients, float64
        + min(M_r * D * 4, 1 << 26) * 2  # duplicated feature maps of a chunk and their gradients
        + B * D * 8  # per-sample partial feature gradients (float64 accumulator)
    )
    plain = float("nan")
    if R == 1:  # the one-process model on the same batches, for the sharding overhead
        from qaconv_gs import QAConvGS

        m1 = QAConvGS(**model_kw)
        m1.refresh_neighbors()
        t1 = Trainer(m1, lr=0.01, momentum=0.9, sparse_embed=True)
        rng = np.random.default_rng(1)
        ptimes = []
        for step in range(cfg["steps"] + 1):
            X = rng.standard_normal((B, cfg["C"], cfg["H"], cfg["W"]), dtype=np.float32)
            y = rng.integers(0, cfg["N"], size=B)
            t0 = time.perf_counter()
            t1.step(X, y)
            if step:
                ptimes.append(time.perf_counter() - t0)
        plain = float(np.median(ptimes))
    buf = trainer._buffers.get("class_embed")
    out = {
        "rank": r,
        "world_size": R,
        "rows": n_r,
        "embed_bytes": int(model.class_embed.nbytes),
        "momentum_bytes": int(0 if buf is None else buf.nbytes),
        "neighbor_bytes": int(model.local_neighbors.nbytes),
        "scratch_bytes_est": int(scratch),
        "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "neighbors_s": t_nbr,
        "neighbors_all_s": t_nbr_all,
        "neighbors_sent": nbr_bytes[0],
        "neighbors_received": nbr_bytes[1],
        "step_s": float(np.median(times)),
        "plain_step_s": plain,
        "step_sent": int(np.median(sent)),
        "step_received": int(np.median(recv)),
    }
    with open(os.path.join(args.outdir, f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    comm.barrier()


def table_worker(args: argparse.Namespace, comm) -> None:
    """--table mode: time the sharded neighbour table against the one-process class_neighbors."""
    from qaconv_gs import class_neighbors
    from qaconv_gs.distributed import ShardLayout, sharded_class_neighbors
    from qaconv_gs.distributed.neighbors import ring_pairs_per_rank

    cfg = json.loads(args.config)
    N, D, k, reps = cfg["table_N"], cfg["table_D"], cfg["k"], cfg["repeats"]
    R, r = comm.size, comm.rank
    lay = ShardLayout.even(N, R)
    E = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
    mine = np.ascontiguousarray(E[slice(*lay.range(r))])
    times, times_all = [], []
    for _ in range(reps + 1):  # the first run warms up (OpenMP pool, first messages)
        comm.barrier()
        comm.reset_counters()
        t0 = time.perf_counter()
        idx, sim = sharded_class_neighbors(mine, k, comm, return_similarity=True, n_threads=args.threads)
        times.append(time.perf_counter() - t0)
        comm.barrier()
        times_all.append(time.perf_counter() - t0)
    sent, received = comm.bytes_sent, comm.bytes_received
    all_i, all_s = comm.allgather_concat(idx), comm.allgather_concat(sim)
    one, identical = float("nan"), None
    if r == 0:  # the baseline, while the other ranks wait in the barrier below
        ones = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            ref_i, ref_s = class_neighbors(E, k, return_similarity=True, n_threads=args.threads)
            ones.append(time.perf_counter() - t0)
        one = float(np.median(ones[1:]))
        identical = bool(
            np.array_equal(all_i, ref_i) and np.array_equal(all_s.view(np.uint32), ref_s.view(np.uint32))
        )
    out = {
        "rank": r,
        "world_size": R,
        "rows": lay.size_of(r),
        "pairs": ring_pairs_per_rank(lay)[r],
        "neighbors_s": float(np.median(times[1:])),
        "neighbors_all_s": float(np.median(times_all[1:])),
        "neighbors_sent": sent,
        "neighbors_received": received,
        "one_process_s": one,
        "bit_identical": identical,
    }
    with open(os.path.join(args.outdir, f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    comm.barrier()


def launch(R: int, cfg: dict, threads: int, backend: str = "torch") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "mpi":  # one mpirun for all ranks (mpi4py with an MPI library: README "MPI")
            launcher = shutil.which("mpirun") or shutil.which("mpiexec")
            if launcher is None:
                raise SystemExit("--backend mpi: mpirun / mpiexec not found")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            env["PYTHONPATH"] = worker_pythonpath(env)
            cmd = [launcher, "-n", str(R), sys.executable, __file__, "--worker", "--backend", "mpi"]
            cmd += ["--outdir", tmp, "--config", json.dumps(cfg), "--threads", str(threads)]
            if subprocess.run(cmd, env=env).returncode != 0:
                raise SystemExit(f"the R={R} mpirun failed")
            return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(R)]
        procs = []
        for r in range(R):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(R), QG_INIT=f"file://{tmp}/store")
            env["OMP_NUM_THREADS"] = str(threads)
            env["PYTHONPATH"] = worker_pythonpath(env)
            cmd = [sys.executable, __file__, "--worker", "--outdir", tmp, "--config", json.dumps(cfg)]
            cmd += ["--threads", str(threads)]
            procs.append(subprocess.Popen(cmd, env=env))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a rank of the R={R} run failed")
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(R)]


def _mb(b: float) -> str:
    return f"{b / 2**20:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    ap.add_argument("--backend", choices=["torch", "mpi"], default="torch", help="gloo processes or mpirun")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument(
        "--table", default=None, help="NxD: measure only the neighbour table of a random [N, D] table"
    )
    ap.add_argument("--repeats", type=int, default=3, help="--table: timed runs (median) after a warm-up")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cfg = _sizes(args.quick)
    if args.table:
        table_main(args, cfg)
        return
    load = os.getloadavg()[0]
    print(f"sizes {cfg}, {args.threads} thread(s) per rank, {os.cpu_count()} cores, load {load:.2f}")
    results = {}
    head = "R rank  rows  embed_MB  momentum_MB  nbr_MB  scratch_MB  peakRSS_MB  nbr_s  step_s"
    head += "  step_sent_MB  step_recv_MB"
    print(head)
    for R in [int(x) for x in args.ranks.split(",")]:
        res = launch(R, cfg, args.threads, args.backend)
        results[R] = res
        for d in res:
            print(
                f"{R} {d['rank']:4d} {d['rows']:5d} {_mb(d['embed_bytes'])} {_mb(d['momentum_bytes'])}    "
                f"{_mb(d['neighbor_bytes'])} {_mb(d['scratch_bytes_est'])}   {_mb(d['peak_rss_bytes'])} "
                f"{d['neighbors_all_s']:6.2f} {d['step_s']:7.3f}   {_mb(d['step_sent'])}      "
                f"{_mb(d['step_received'])}"
            )
        sys.stdout.flush()
    if 1 in results:
        print(f"one-process QAConvGS + Trainer step (same batches): {results[1][0]['plain_step_s']:.3f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "threads": args.threads, "results": results}, f, indent=1)


def table_main(args: argparse.Namespace, cfg: dict) -> None:
    N, D = (int(v) for v in args.table.lower().split("x"))
    cfg = {"table_N": N, "table_D": D, "k": cfg["k"], "repeats": args.repeats}
    print(
        f"neighbour table N={N} D={D} k={cfg['k']}, {args.threads} thread(s) per rank, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    print(
        "R rank  rows      pairs  nbr_s (rank)  nbr_s (all)  sent_MB  recv_MB  one-process_s  bit-identical"
    )
    results = {}
    for R in [int(x) for x in args.ranks.split(",")]:
        res = launch(R, cfg, args.threads, args.backend)
        results[R] = res
        for d in res:
            print(
                f"{R} {d['rank']:4d} {d['rows']:5d} {d['pairs']:10d} {d['neighbors_s']:13.3f} "
                f"{d['neighbors_all_s']:12.3f} {_mb(d['neighbors_sent'])} {_mb(d['neighbors_received'])} "
                f"{d['one_process_s']:14.3f}  {d['bit_identical']}"
            )
        sys.stdout.flush()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
