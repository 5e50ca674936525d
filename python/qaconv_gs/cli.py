"""The ``qaconv-gs`` command line (also ``python -m qaconv_gs``): demo, neighbors, match, info."""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    demo.add_argument("--seed", type=int, default=0, help="seed for data, model and batches (default 0)")
    demo.add_argument("--out", default=".", help="directory for the curve PNGs (default: current directory)")
    demo.add_argument("--no-full", action="store_true", help="skip the full-scoring comparison run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    mt.add_argument("--seed", type=int, default=0, help="seed of the fresh head's fc.bias (default 0)")
    mt.add_argument("--threads", type=_threads, default=None)
    mt.set_defaults(func=_cmd_match)

    info = sub.add_parser("info", help="version, OpenMP, default threads, SIMD path")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qaconv-gs`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, MemoryError) as exc:
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


def _head_from_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The head parameters and running statistics of a model or trainer checkpoint."""
    from .checkpoint import load_checkpoint

    _, state, _ = load_checkpoint(path)
    head = {k: np.asarray(v) for k, v in state.items() if k.split(".")[0] in ("bn", "fc", "logit_bn")}
    if "fc.weight" not in head:
        raise ValueError(f"checkpoint: {path!r} holds no QAConv head (no 'fc.weight')")
    return head


def _cmd_match(args: argparse.Namespace) -> int:
    from .evaluate import match
    from .head import init_head

    probe = _load_npy(args.probe, "probe")
    gallery = _load_npy(args.gallery, "gallery")
    if probe.ndim != 4:
        raise ValueError(f"probe: expected a 4-d [P, C, H, W] array, got shape {probe.shape}")
    if args.checkpoint:
        head = _head_from_checkpoint(args.checkpoint)
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
    ids, _ = model.identify(features, top=1)
    return float(np.mean(np.asarray(ids)[:, 0] == labels))


class _DemoReport:
    """Prints one line per epoch and records the held-out rank-1 into the epoch stats."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, epochs: int, tag: str) -> None:
        self.features, self.labels, self.epochs, self.tag = features, labels, epochs, tag

    def on_epoch_end(self, trainer: Any, epoch: int, stats: dict) -> None:
        stats["rank1"] = _rank1(trainer.model, self.features, self.labels)
        change = stats["neighbor_change"]
        change_s = "   -  " if change != change else f"{change:6.3f}"
        print(
            f"  [{self.tag}] epoch {epoch + 1:>2}/{self.epochs}  loss {stats['loss']:.4f}  "
            f"acc_cls {stats['acc_cls']:.3f}  acc_triplet {stats['acc_triplet']:.3f}  "
            f"held-out rank-1 {stats['rank1']:.3f}  nbr change {change_s}  {stats['time']:.1f} s",
            flush=True,
        )


def _demo_run(args: argparse.Namespace, data: tuple, k: int, tag: str) -> dict[str, Any]:
    from .model import QAConvGS
    from .sampler import GraphSampler
    from .trainer import Trainer

    xtr, ytr, xte, yte = data
    n_cls, C, H, W = args.classes, xtr.shape[1], xtr.shape[2], xtr.shape[3]
    model = QAConvGS(n_cls, C, H, W, k_nearest=k, seed=args.seed, n_threads=args.threads)
    trainer = Trainer(model, lr=args.lr, schedule=f"cosine:{args.epochs}:0.05", seed=args.seed)
    sampler = GraphSampler(
        ytr,
        batch_size=args.batch_size,
        num_instances=args.num_instances,
        neighbors=lambda: model.class_neighbors,
        seed=args.seed,
    )
    before = _rank1(model, xte, yte)
    print(f"  [{tag}] before training: held-out rank-1 {before:.3f}", flush=True)
    report = _DemoReport(xte, yte, args.epochs, tag)
    trainer.fit((xtr, ytr, sampler), epochs=args.epochs, callbacks=[report], progress=not args.no_progress)
    h = trainer.history
    return {
        "k": k,
        "before": before,
        "rank1": float(h.epochs[-1]["rank1"]),
        "loss": float(h.epochs[-1]["loss"]),
        "time": float(np.sum(h.epoch_values("time"))),
        "history": h,
    }


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
    os.makedirs(args.out, exist_ok=True)
    x, y = make_synthetic(args.classes, args.samples, seed=args.seed)
    data = split_per_class(x, y, held_out=args.held_out, seed=args.seed)
    threads = resolve_threads(args.threads)
    print(
        f"qaconv-gs demo: {args.classes} synthetic identities (families share parts), feature maps "
        f"{tuple(x.shape[1:])}, {len(data[1])} training / {len(data[3])} held-out samples; "
        f"{args.epochs} epochs, graph-sampled batches of {args.batch_size} ({args.num_instances} per class), "
        f"{threads} thread(s). Chance rank-1 = {1.0 / args.classes:.3f}",
        flush=True,
    )
    runs = []
    print(f"restricted scoring: each sample vs its class and the k = {args.k} nearest classes", flush=True)
    runs.append(("restricted", _demo_run(args, data, args.k, f"k={args.k}")))
    if not args.no_full:
        full_k = args.classes - 1
        print(f"full scoring: each sample vs all classes (k = N-1 = {full_k})", flush=True)
        runs.append(("full", _demo_run(args, data, full_k, f"k={full_k}")))

    print()
    print(f"{'run':<12} {'k':>5} {'train time':>11} {'loss':>8} {'rank-1 before':>14} {'rank-1 after':>13}")
    for name, r in runs:
        print(
            f"{name:<12} {r['k']:>5} {r['time']:>9.1f} s {r['loss']:>8.4f} "
            f"{r['before']:>14.3f} {r['rank1']:>13.3f}"
        )
    if len(runs) == 2:
        (_, a), (_, b) = runs
        print(
            f"restricted scoring trained {b['time'] / max(a['time'], 1e-9):.1f}x faster than full scoring "
            f"(scores {args.k + 1} instead of {args.classes} classes per sample); held-out rank-1 "
            f"{a['rank1']:.3f} vs {b['rank1']:.3f} (chance {1.0 / args.classes:.3f})"
        )
    for name, r in runs:
        path = os.path.join(args.out, f"demo_curves_{name}.png")
        r["history"].plot(path, title=f"qaconv-gs demo, {name} scoring (k={r['k']})")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
