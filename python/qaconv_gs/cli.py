"""The ``qaconv-gs`` command line (also ``python -m qaconv_gs``): demo, neighbors, match, evaluate, bench,
info."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["main"]


def _threads(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return n


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return n


def _seed(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qaconv-gs",
        description="QAConv matching with class embeddings and neighbour-restricted scoring, on the CPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train on a built-in synthetic data set; compare restricted (k) and full (k = N-1) scoring",
        description=(
            "Generate a synthetic re-ID feature-map data set whose identities share structure, train a "
            "QAConvGS model with graph-sampled batches and neighbour-restricted scoring, report per-epoch "
            "loss, accuracy and held-out rank-1 identification, then train the same model with full scoring "
            "(k = N-1) and compare accuracy and time. Writes the training curves as PNG."
        ),
    )
    demo.add_argument(
        "--data",
        choices=("synthetic", "fonts"),
        default="synthetic",
        help="'synthetic' (default): generated feature maps; 'fonts': real images, Hangul syllables drawn "
        "from Debian's Korean typefaces (classes = syllables, samples = fonts), feature maps from a fixed "
        "random CNN, tested on held-out font families (needs Pillow and the fonts; --samples / --held-out "
        "do not apply)",
    )
    demo.add_argument("--epochs", type=_positive, default=4, help="training epochs (default 4)")
    demo.add_argument("--classes", type=_positive, default=100, help="identities N (default 100)")
    demo.add_argument("--samples", type=_positive, default=20, help="samples per identity (default 20)")
    demo.add_argument(
        "--held-out", type=_positive, default=2, help="held-out samples per identity (default 2)"
    )
    demo.add_argument("--k", type=_positive, default=16, help="neighbours scored per sample (default 16)")
    demo.add_argument("--batch-size", type=_positive, default=32, help="batch size (default 32)")
    demo.add_argument(
        "--num-instances", type=_positive, default=4, help="samples per class in a batch (default 4)"
    )
    demo.add_argument(
        "--lr", type=float, default=0.05, help="base learning rate (default 0.05, cosine schedule)"
    )
    demo.add_argument("--threads", type=_threads, default=None, help="threads (default: OpenMP's default)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed for data, model and batches (default 0)")
    demo.add_argument("--out", default=".", help="directory for the curve PNGs (default: current directory)")
    demo.add_argument("--no-full", action="store_true", help="skip the full-scoring comparison run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--distributed",
        choices=("auto", "off", "torch", "mpi"),
        default="auto",
        help="shard the class table over the ranks of a launcher: 'torch' under torchrun (gloo), 'mpi' "
        "under mpirun (mpi4py); 'auto' (default) picks torch when WORLD_SIZE > 1, mpi when "
        "OMPI_COMM_WORLD_SIZE / PMI_SIZE / PMIX_SIZE > 1, else one process ('off'). Rank 0 prints",
    )
    demo.add_argument(
        "--compare-one-process",
        action="store_true",
        help="distributed only: rank 0 then trains the restricted run again in one process and prints the "
        "largest difference of the per-step losses and parameters",
    )
    demo.set_defaults(func=_cmd_demo)

    nb = sub.add_parser(
        "neighbors",
        help="k nearest classes of N class vectors (.npy in, .npy out)",
        description="Read an [N, D] (or [N, C, H, W]) .npy array, write the [N, k] int64 k-NN table "
        "(cosine, self excluded, ties to the lower index).",
    )
    nb.add_argument("input", help="input .npy, shape [N, D] or [N, C, H, W]")
    nb.add_argument("output", help="output .npy for the [N, k] int64 neighbour ids")
    nb.add_argument("-k", "--k", type=_positive, default=32, help="neighbours per row (default 32)")
    nb.add_argument("--similarity", metavar="PATH", help="also write the [N, k] float32 similarities here")
    nb.add_argument("--threads", type=_threads, default=None)
    nb.set_defaults(func=_cmd_neighbors)

    mt = sub.add_parser(
        "match",
        help="QAConv scores of probe vs gallery feature maps (.npy in, .npy out)",
        description="Read probe [P, C, H, W] and gallery [G, C, H, W] .npy arrays and write the [P, G] "
        "float32 eval-mode QAConv scores, with the head of a checkpoint (a QAConvGS or trainer checkpoint) "
        "or a freshly initialised head.",
    )
    mt.add_argument("probe", help="probe .npy [P, C, H, W]")
    mt.add_argument("gallery", help="gallery .npy [G, C, H, W]")
    mt.add_argument("output", help="output .npy for the [P, G] scores")
    mt.add_argument("--checkpoint", help="model or trainer checkpoint (.npz) whose head to use")
    mt.add_argument("--fc", choices=("separate", "shared"), default="separate", help="fresh head's fc kind")
    mt.add_argument("--seed", type=_seed, default=0, help="seed of the fresh head's fc.bias (default 0)")
    mt.add_argument("--threads", type=_threads, default=None)
    mt.set_defaults(func=_cmd_match)

    from ._cli_evaluate import add_evaluate_parser  # here: that module imports helpers from this one

    add_evaluate_parser(sub)

    bench = sub.add_parser(
        "bench",
        usage="qaconv-gs bench [-h] [--quick] [--threads T] [--out DIR] [--builtin] [NAME ...] [-- ARGS]",
        help="run the benchmarks (benchmarks/ scripts of a source checkout, or a built-in quick check)",
        description=(
            "Run the benchmark scripts benchmarks/bench_<name>.py of the source checkout (each in its own "
            "process; they compare against PyTorch / faiss and write JSON + PNG into --out). Where the "
            "benchmarks/ folder is not present (an installed package), or with --builtin, run a built-in "
            "quick benchmark of the training step, match and class_neighbors instead. Arguments after -- go "
            "to every script."
        ),
    )
    bench.add_argument(
        "names", nargs="*", help="benchmarks to run, e.g. train match neighbors (default: all)"
    )
    bench.add_argument(
        "--quick", action="store_true", help="small shapes (seconds); scripts without it are skipped"
    )
    bench.add_argument(
        "--threads", default=None, help="passed on to the scripts (bench_train takes e.g. 1,2)"
    )
    bench.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    bench.add_argument("--builtin", action="store_true", help="run the built-in quick benchmark")
    bench.set_defaults(func=_cmd_bench)

    info = sub.add_parser("info", help="version, OpenMP, default threads, SIMD path")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qaconv-gs`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:  # bench NAME... -- SCRIPT_ARGS
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.extra = extra
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, MemoryError, ImportError) as exc:
        print(f"qaconv-gs {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qaconv-gs {args.command}: interrupted", file=sys.stderr)
        return 130


def _load_npy(path: str, what: str) -> np.ndarray:
    """One array from a .npy file; any unreadable file becomes an error naming the argument and the file."""
    try:
        a = np.load(path, allow_pickle=False)
    except OSError:
        raise  # FileNotFoundError and friends already name the file
    except Exception as exc:  # EOFError (empty file), ValueError (pickled / corrupt header), ...
        why = f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{what}: {path!r} is not a readable .npy array ({why})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise ValueError(f"{what}: {path!r} is an .npz archive, expected a single .npy array")
    return a


# ------------------------------------------------------------------------------------------------ info


def _cmd_info(args: argparse.Namespace) -> int:
    import qaconv_gs

    facts: dict[str, Any] = dict(qaconv_gs.info())
    facts["python"] = platform.python_version()
    facts["numpy"] = np.__version__
    try:  # the installed version, without paying for a torch import
        from importlib.metadata import PackageNotFoundError, version

        facts["torch"] = version("torch")
    except PackageNotFoundError:
        facts["torch"] = None
    facts["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(len(k) for k in facts)
        for k, v in facts.items():
            print(f"{k:<{width}}  {v}")
    return 0


# ----------------------------------------------------------------------------------------------- bench


def _benchmarks_dir() -> str | None:
    """benchmarks/ of the source checkout this package runs from (or of the current directory)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.dirname(os.path.dirname(pkg)), os.getcwd()):
        d = os.path.join(root, "benchmarks")
        if os.path.isfile(os.path.join(d, "__init__.py")) and glob.glob(os.path.join(d, "bench_*.py")):
            return d
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    out = os.path.abspath(args.out)
    bdir = None if args.builtin else _benchmarks_dir()
    if bdir is None:
        return _builtin_bench(args, out)
    available = sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(bdir, "bench_*.py")))
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"names: unknown benchmark(s) {unknown}; available: {available}")
    root = os.path.dirname(bdir)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)  # run the scripts against this very qaconv_gs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, pkg_parent, env.get("PYTHONPATH", "")) if p)
    failed = []
    for name in names:
        with open(os.path.join(bdir, f"bench_{name}.py"), encoding="utf-8") as f:
            src = f.read()
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"]
        if args.quick:
            if "--quick" not in src:
                print(f"== {name}: skipped (no --quick mode)", flush=True)
                continue
            cmd.append("--quick")
        if "--out" in src:
            cmd += ["--out", out]
        if args.threads is not None and "--threads" in src:
            cmd += ["--threads", args.threads]
        cmd += extra
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, cwd=root, env=env)
        if rc != 0:
            failed.append(name)
            print(f"== {name}: failed with exit status {rc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _median_time(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _builtin_bench(args: argparse.Namespace, out: str) -> int:
    """Timings of our own kernels on small shapes (no PyTorch / faiss comparison: those live in
    benchmarks/ of the source checkout)."""
    import qaconv_gs as qg

    from ._validate import resolve_threads

    threads = (
        [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, resolve_threads(None)})
    )
    N, C, H, W, B, k = (100, 32, 8, 4, 16, 7) if args.quick else (1000, 128, 24, 8, 64, 31)
    S = H * W
    repeat = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    X = rng.standard_normal((B, C, H, W), dtype=np.float32)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"qaconv-gs bench (built-in{', quick' if args.quick else ''}): N={N}, C={C}, {H}x{W}, B={B}, k={k}; "
        f"SIMD {qg.info()['simd']}; load average {load[0]:.2f}; median of {repeat}"
    )
    print(f"{'what':<34} {'threads':>7} {'seconds':>9} {'GF/s':>8}")
    rows = []
    for nt in threads:
        # init="random": timed steps all do the same work, and the batch is drawn from a real neighbour table
        model = qg.QAConvGS(N, C, H, W, k_nearest=k, seed=0, n_threads=nt, init="random")
        t0 = time.perf_counter()
        nbr = model.class_neighbors
        t_nbr = time.perf_counter() - t0
        y = np.repeat(np.concatenate([[0], nbr[0, : B // 4 - 1]]), 4)[:B]
        t_step = _median_time(lambda m=model, y=y: m.forward_backward(X, y), repeat)
        t_match = _median_time(lambda m=model: m.match(X, X), repeat)
        pair_flops = 2.0 * C * S * S
        for what, sec, flops in (
            (f"class_neighbors (N={N}, k={k})", t_nbr, float(N) * N * C * S),
            (f"training step (B={B}, K={k + 1})", t_step, pair_flops * B * (k + 1)),
            (f"match ({B} x {B})", t_match, pair_flops * B * B),
        ):
            rows.append({"what": what, "threads": nt, "seconds": sec, "gflops": flops / sec / 1e9})
            print(f"{what:<34} {nt:>7} {sec:>9.4f} {flops / sec / 1e9:>8.1f}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench_builtin.json")
    with open(path, "w") as f:
        json.dump({"info": qg.info(), "load_average": load, "rows": rows}, f, indent=2)
    print(f"wrote {path} (GF/s counts the correlation's 2*C*S*S per pair; full comparisons: benchmarks/)")
    return 0


# ------------------------------------------------------------------------------------------- neighbors


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from .neighbors import class_neighbors

    E = _load_npy(args.input, "input")
    t0 = time.perf_counter()
    if args.similarity:
        idx, sim = class_neighbors(E, args.k, return_similarity=True, n_threads=args.threads)
        np.save(args.similarity, sim)
    else:
        idx = class_neighbors(E, args.k, n_threads=args.threads)
    dt = time.perf_counter() - t0
    np.save(args.output, idx)
    print(f"{args.input}: {E.shape[0]} rows -> {args.output}: {idx.shape} int64 neighbours in {dt:.3f} s")
    return 0


# ----------------------------------------------------------------------------------------------- match


def _cmd_match(args: argparse.Namespace) -> int:
    from .evaluate import match
    from .head import init_head

    probe = _load_npy(args.probe, "probe")
    gallery = _load_npy(args.gallery, "gallery")
    if probe.ndim != 4:
        raise ValueError(f"probe: expected a 4-d [P, C, H, W] array, got shape {probe.shape}")
    if args.checkpoint:
        from .checkpoint import load_head_for_maps

        head = load_head_for_maps(
            args.checkpoint, probe.shape[1:], checkpoint_name="checkpoint", maps_name="probe"
        )
        source = args.checkpoint
    else:
        S = int(probe.shape[2] * probe.shape[3])
        head = init_head(S, fc=args.fc, rng=np.random.default_rng(args.seed))
        source = f"fresh head (fc={args.fc}, seed={args.seed})"
    t0 = time.perf_counter()
    scores = match(probe, gallery, head, n_threads=args.threads)
    dt = time.perf_counter() - t0
    np.save(args.output, scores)
    print(f"{probe.shape[0]} x {gallery.shape[0]} scores with {source} -> {args.output} in {dt:.3f} s")
    return 0


# ------------------------------------------------------------------------------------------------ demo


def _rank1(model: Any, features: np.ndarray, labels: np.ndarray) -> float:
    """Held-out rank-1 of `model` (the same value on every rank of a sharded model)."""
    comm = getattr(model, "comm", None)
    if comm is None:
        ids, _ = model.identify(features, top=1)
        return float(np.mean(np.asarray(ids)[:, 0] == labels))
    # sharded identify is collective and answers each rank's own probes: every rank scores a slice
    # against its classes, and the hit counts are summed (integers: the one-process value exactly)
    part = np.array_split(np.arange(labels.shape[0]), comm.size)[comm.rank]
    ids, _ = model.identify(features[part], top=1)
    hits = comm.allreduce_sum(np.array([np.count_nonzero(np.asarray(ids)[:, 0] == labels[part])], np.int64))
    return float(int(hits[0]) / labels.shape[0])


def _retrieval(model: Any, probe: np.ndarray, probe_ids: np.ndarray, gallery: np.ndarray) -> float:
    """Top-1 of each probe among the gallery maps (gallery row c is class c) by QAConv match."""
    return float(np.mean(model.match(probe, gallery).argmax(axis=1) == probe_ids))


def _say(comm: Any, *args: Any, **kwargs: Any) -> None:
    """print on rank 0 only (every rank runs the same program)."""
    if comm is None or comm.rank == 0:
        print(*args, **kwargs, flush=True)


class _DemoReport:
    """Prints one line per epoch (rank 0) and records the held-out rank-1 into the epoch stats."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, epochs: int, tag: str, comm: Any) -> None:
        self.features, self.labels, self.epochs, self.tag, self.comm = features, labels, epochs, tag, comm

    def on_epoch_end(self, trainer: Any, epoch: int, stats: dict) -> None:
        stats["rank1"] = _rank1(trainer.model, self.features, self.labels)
        change = stats["neighbor_change"]
        change_s = "   -  " if change != change else f"{change:6.3f}"
        _say(
            self.comm,
            f"  [{self.tag}] epoch {epoch + 1:>2}/{self.epochs}  loss {stats['loss']:.4f}  "
            f"acc_cls {stats['acc_cls']:.3f}  acc_triplet {stats['acc_triplet']:.3f}  "
            f"held-out rank-1 {stats['rank1']:.3f}  nbr change {change_s}  {stats['time']:.1f} s",
        )


class _RankBatches:
    """This rank's part of every graph-sampled global batch: the batch split into R near-equal slices
    in rank order, so the global batch, and hence every step, is the one-process demo's."""

    def __init__(self, sampler: Any, features: np.ndarray, labels: np.ndarray, comm: Any) -> None:
        self.sampler, self.features, self.labels, self.comm = sampler, features, labels, comm

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx in self.sampler:
            part = np.array_split(np.asarray(idx), self.comm.size)[self.comm.rank]
            yield self.features[part], self.labels[part]


def _demo_run(
    args: argparse.Namespace, data: tuple, k: int, tag: str, comm: Any = None, quiet: bool = False
) -> dict[str, Any]:
    from .model import QAConvGS
    from .sampler import GraphSampler
    from .trainer import Trainer

    xtr, ytr, xte, yte = data[:4]
    gallery = data[4] if len(data) > 4 else None  # fonts: one held-out font's glyph per class, in class order
    n_cls, C, H, W = args.classes, xtr.shape[1], xtr.shape[2], xtr.shape[3]
    # fonts: the defaults, as a user would start; synthetic: the seed system's random start (its maps are
    # easy to match, and its printed curves are kept comparable across versions). One process and R ranks
    # train alike either way.
    init = "imprint" if args.data == "fonts" else "random"
    if comm is None:
        model = QAConvGS(n_cls, C, H, W, k_nearest=k, seed=args.seed, n_threads=args.threads, init=init)
        neighbors = lambda: model.class_neighbors  # noqa: E731
    else:
        from .distributed import ShardedQAConvGS

        model = ShardedQAConvGS(
            n_cls, C, H, W, k_nearest=k, seed=args.seed, n_threads=args.threads, comm=comm, init=init
        )
        neighbors = model.gather_neighbors  # every rank samples the same batches from the whole table
    trainer = Trainer(model, lr=args.lr, schedule=f"cosine:{args.epochs}:0.05", seed=args.seed)
    sampler = GraphSampler(
        ytr, batch_size=args.batch_size, num_instances=args.num_instances, neighbors=neighbors, seed=args.seed
    )
    say = comm if not quiet else _Mute()
    before = _rank1(model, xte, yte)
    retrieval = {}
    if gallery is not None:
        retrieval["before"] = _retrieval(model, xte, yte, gallery)
        _say(say, f"  [{tag}] before training: held-out retrieval top-1 {retrieval['before']:.3f}")
    else:
        _say(say, f"  [{tag}] before training: held-out rank-1 {before:.3f}")
    report = _DemoReport(xte, yte, args.epochs, tag, say)
    if comm is None:
        source: Any = (xtr, ytr, sampler)
    else:
        batches = _RankBatches(sampler, xtr, ytr, comm)
        source = lambda epoch: (sampler.set_epoch(epoch), batches)[1]  # noqa: E731 - as fit does for a sampler
    progress = not (args.no_progress or quiet)
    trainer.fit(source, epochs=args.epochs, callbacks=[report], progress=progress)
    h = trainer.history
    if gallery is not None:
        retrieval["after"] = _retrieval(model, xte, yte, gallery)
    return {
        "k": k,
        "retrieval": retrieval,
        "before": before,
        "rank1": float(h.epochs[-1]["rank1"]),
        "loss": float(h.epochs[-1]["loss"]),
        "time": float(np.sum(h.epoch_values("time"))),
        "history": h,
        "model": model,
    }


class _Mute:
    """A stand-in communicator for _say that silences every rank."""

    rank = 1


def _demo_comm(mode: str) -> Any:
    """The communicator of --distributed MODE (None: one process)."""
    if mode == "auto":
        mode = "off"
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            mode = "torch"
        elif any(
            int(os.environ.get(v, "1") or 1) > 1 for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
        ):
            mode = "mpi"
    if mode == "off":
        return None
    from .distributed import init_communicator

    if mode == "torch":
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(
                    f"--distributed torch: environment variable {var} is not set; launch with "
                    "torchrun --nproc_per_node R -m qaconv_gs demo ..."
                )
    return init_communicator(mode)


def _demo_finish(comm: Any) -> None:
    if comm is None:
        return
    comm.barrier()
    if type(comm).__name__ == "TorchCommunicator":  # a gloo group left to interpreter exit can abort
        import torch.distributed as dist

        dist.destroy_process_group()


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._validate import resolve_threads
    from .data import make_synthetic, split_per_class

    if args.classes < 3:
        raise ValueError(f"--classes: expected >= 3, got {args.classes}")
    if args.k >= args.classes:
        raise ValueError(f"--k: expected < --classes ({args.classes}), got {args.k}")
    if args.samples <= args.held_out:
        raise ValueError(f"--samples: expected > --held-out ({args.held_out}), got {args.samples}")
    if args.batch_size < args.num_instances:
        raise ValueError(
            f"--batch-size: expected >= --num-instances ({args.num_instances}), got {args.batch_size}"
        )
    comm = _demo_comm(args.distributed)
    if args.compare_one_process and comm is None:
        raise ValueError("--compare-one-process: needs a distributed run (--distributed torch or mpi)")
    if comm is None or comm.rank == 0:
        os.makedirs(args.out, exist_ok=True)
    threads = resolve_threads(args.threads)
    batches = (
        f"{args.epochs} epochs, graph-sampled batches of {args.batch_size} ({args.num_instances} per class), "
        f"{threads} thread(s). Chance rank-1 = {1.0 / args.classes:.3f}"
    )
    if args.data == "fonts":
        data, what = _font_data(args)
        _say(comm, f"qaconv-gs demo: {args.classes} Hangul syllables {what}; {batches}")
    else:
        x, y = make_synthetic(args.classes, args.samples, seed=args.seed)  # the same data on every rank
        data = split_per_class(x, y, held_out=args.held_out, seed=args.seed)
        _say(
            comm,
            f"qaconv-gs demo: {args.classes} synthetic identities (families share parts), feature maps "
            f"{tuple(x.shape[1:])}, {len(data[1])} training / {len(data[3])} held-out samples; {batches}",
        )
    if comm is not None:
        from .distributed import ShardLayout

        sizes = [ShardLayout.even(args.classes, comm.size).size_of(r) for r in range(comm.size)]
        _say(
            comm,
            f"distributed: {comm.size} ranks ({type(comm).__name__}), classes per rank {sizes}, each "
            "global batch split over the ranks: the same steps as one process",
        )
    runs = []
    _say(comm, f"restricted scoring: each sample vs its class and the k = {args.k} nearest classes")
    runs.append(("restricted", _demo_run(args, data, args.k, f"k={args.k}", comm)))
    if not args.no_full:
        full_k = args.classes - 1
        _say(comm, f"full scoring: each sample vs all classes (k = N-1 = {full_k})")
        runs.append(("full", _demo_run(args, data, full_k, f"k={full_k}", comm)))
    if args.compare_one_process:
        dist_model = runs[0][1]["model"].gather_model()  # collective: before rank 0 goes on alone
        if comm.rank == 0:
            _compare_one_process(args, data, runs[0][1], dist_model)
    if comm is None or comm.rank == 0:
        _demo_summary(args, runs)
    _demo_finish(comm)
    return 0


def _font_data(args: argparse.Namespace) -> tuple[tuple, str]:
    """((train maps, train ids, probe maps, probe ids, gallery maps), a description of them) for
    --data fonts, with a clear error where Pillow or the fonts are missing."""
    from . import glyphs

    try:
        g = glyphs.font_glyphs(args.classes, seed=args.seed)
        split = glyphs.glyph_split(g)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise ValueError(
            f"--data fonts: {exc}. It needs Pillow (pip install 'qaconv-gs[fonts]') and Debian's Korean "
            f"fonts (apt-get install {' '.join(glyphs.DEBIAN_PACKAGES)})"
        ) from exc

    def maps(fonts: list) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = g.samples(fonts)
        return glyphs.random_conv_features(x, seed=args.seed), y

    xtr, ytr = maps(split.train)
    xte, yte = maps(split.probes)
    xg, yg = maps([split.gallery])
    assert np.array_equal(yg, np.arange(g.num_classes))  # one gallery glyph per class, in class order
    what = (
        f"drawn from {len(split.train)} training fonts; feature maps {tuple(xtr.shape[1:])} from a fixed "
        f"random CNN; tested on {len(split.probes)} held-out fonts ({len(yte)} glyphs): identification "
        f"among the classes and retrieval in the held-out font {g.fonts[split.gallery]}"
    )
    return (xtr, ytr, xte, yte, xg), what


def _compare_one_process(args: argparse.Namespace, data: tuple, run: dict, dist_model: Any) -> None:
    """Train the restricted run again in this process and print how far the distributed run is from it."""
    print(f"one-process check: training k={args.k} again in one process ...", flush=True)
    one = _demo_run(args, data, args.k, f"k={args.k}", None, quiet=True)
    a = np.asarray(run["history"].steps["loss"], np.float64)
    b = np.asarray(one["history"].steps["loss"], np.float64)
    if a.shape != b.shape:
        raise ValueError(f"one-process check: {a.size} distributed steps vs {b.size} one-process steps")
    E1, E2 = one["model"].class_embed, dist_model.class_embed
    rel = float(np.abs(E1 - E2).max() / max(float(np.abs(E1).max()), 1e-30))
    print(
        f"one-process check: {a.size} steps, max |loss difference| {np.abs(a - b).max():.2e} "
        f"(largest loss {np.abs(b).max():.3g}); class table max relative difference {rel:.2e}; "
        f"held-out rank-1 {run['rank1']:.3f} distributed vs {one['rank1']:.3f} one process",
        flush=True,
    )


def _demo_summary(args: argparse.Namespace, runs: list) -> None:
    print()
    print(f"{'run':<12} {'k':>5} {'train time':>11} {'loss':>8} {'rank-1 before':>14} {'rank-1 after':>13}")
    for name, r in runs:
        print(
            f"{name:<12} {r['k']:>5} {r['time']:>9.1f} s {r['loss']:>8.4f} "
            f"{r['before']:>14.3f} {r['rank1']:>13.3f}"
        )
    if runs and runs[0][1]["retrieval"]:
        print("held-out retrieval top-1 (QAConv match against one held-out font's glyph of every class):")
        for name, r in runs:
            ret = r["retrieval"]
            print(f"  {name:<12} before training {ret['before']:.3f}, after {ret['after']:.3f}")
    if len(runs) == 2:
        (_, a), (_, b) = runs
        print(
            f"restricted scoring trained {b['time'] / max(a['time'], 1e-9):.1f}x faster than full scoring "
            f"(scores {args.k + 1} instead of {args.classes} classes per sample); held-out rank-1 "
            f"{a['rank1']:.3f} vs {b['rank1']:.3f} (chance {1.0 / args.classes:.3f})"
        )
    if importlib.util.find_spec("matplotlib") is None:  # a plain `pip install .`: the numbers are the result
        print("curves not drawn: matplotlib is not installed (pip install 'qaconv-gs[plot]')")
        return
    for name, r in runs:
        path = os.path.join(args.out, f"demo_curves_{name}.png")
        r["history"].plot(path, title=f"qaconv-gs demo, {name} scoring (k={r['k']})")
        print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
