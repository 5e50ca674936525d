"""``qaconv-gs evaluate``: re-ID CMC / mAP (Market-1501, CUHK03) or face verification metrics.

Inputs are probe and gallery feature maps scored with a checkpoint's QAConv head (exhaustively with
``qaconv_gs.match``, or through ``two_stage_search``), or a saved score matrix. Every problem with the
input is reported before any scoring, as ``qaconv-gs evaluate: error: --OPTION: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from .cli import _load_npy, _positive, _seed, _threads

__all__ = ["add_evaluate_parser"]

PROTOCOLS = ("market", "cuhk03", "verification")
FARS = (1e-3, 1e-2, 1e-1)
_BLOCK_PAIRS = 1 << 20  # pairs scored per call when --block is not given (memory: the [P, G] scores anyway)
_PROGRESS_PAIRS = 1 << 18  # a progress bar from this many pairs on (stderr a terminal, no --quiet)

EPILOG = """\
examples:
  # Market-1501: feature maps of query and test images, names in list files
  qaconv-gs evaluate --probe query.npy --gallery test.npy --checkpoint run.npz \\
      --probe-list query.txt --gallery-list test.txt --rerank --json market.json --plot-dir plots
  # a saved score matrix with .npy ids and cameras
  qaconv-gs evaluate --scores scores.npy --probe-ids qid.npy --gallery-ids gid.npy \\
      --probe-cams qcam.npy --gallery-cams gcam.npy
  # face verification: pair scores and same/different labels
  qaconv-gs evaluate --protocol verification --scores pair_scores.npy --labels same.npy
"""


def _ranks(value: str) -> list[int]:
    try:
        ranks = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        ranks = []
    if not ranks or ranks[0] < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1 (e.g. 1,5,10), got {value!r}"
        )
    return ranks


def _unit(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return x


def add_evaluate_parser(sub: Any) -> None:
    """Register the ``evaluate`` subcommand on the subparsers object of the qaconv-gs parser."""
    ev = sub.add_parser(
        "evaluate",
        help="CMC / mAP (Market-1501, CUHK03) or verification metrics of QAConv scores",
        description=(
            "Score probe vs gallery feature maps with a checkpoint's QAConv head (or read a saved score\n"
            "matrix) and report CMC rank-k and mAP under the Market-1501 / MSMT17 rules or CUHK03's\n"
            "single-gallery-shot protocol, optionally after k-reciprocal re-ranking; or, with --protocol\n"
            "verification, 10-fold accuracy, TAR@FAR, EER and AUC of pair scores. Bad input: exit status 2."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inp = ev.add_argument_group("inputs: feature maps and a checkpoint, or saved scores")
    inp.add_argument("--probe", metavar="NPY", help="probe feature maps [P, C, H, W]")
    inp.add_argument("--gallery", metavar="NPY", help="gallery feature maps [G, C, H, W]")
    inp.add_argument(
        "--checkpoint",
        metavar="NPZ",
        help="model or trainer checkpoint whose QAConv head scores the maps (required with maps)",
    )
    inp.add_argument(
        "--scores",
        metavar="NPY",
        help="saved [P, G] scores instead of maps (verification: [N] pair scores); higher = more similar",
    )
    inp.add_argument(
        "--distances", action="store_true", help="--scores (and the two below) hold distances: lower = closer"
    )
    inp.add_argument("--probe-probe-scores", metavar="NPY", help="[P, P] scores, for --rerank with --scores")
    inp.add_argument(
        "--gallery-gallery-scores", metavar="NPY", help="[G, G] scores, for --rerank with --scores"
    )
    lab = ev.add_argument_group("identities and cameras (re-ID), labels (verification)")
    lab.add_argument("--probe-ids", metavar="NPY", help="[P] integer ids of the probes")
    lab.add_argument("--gallery-ids", metavar="NPY", help="[G] integer ids; -1 = junk (ignored)")
    lab.add_argument("--probe-cams", metavar="NPY", help="[P] camera ids (optional, with --gallery-cams)")
    lab.add_argument("--gallery-cams", metavar="NPY", help="[G] camera ids (optional, with --probe-cams)")
    lab.add_argument(
        "--probe-list",
        metavar="TXT",
        help="probe image names, one per line, Market-1501 style (0002_c1s1_000451_03.jpg: id 2, camera 1; "
        "paths allowed): ids and cameras instead of --probe-ids / --probe-cams",
    )
    lab.add_argument("--gallery-list", metavar="TXT", help="gallery image names, as --probe-list")
    lab.add_argument("--labels", metavar="NPY", help="verification: [N] same (1) / different (0) per pair")
    lab.add_argument(
        "--pairs",
        metavar="NPY",
        help="verification with maps: [N, 2] rows (probe row, gallery row) of each pair "
        "(default: probe row i with gallery row i)",
    )
    pro = ev.add_argument_group("protocol")
    pro.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="market",
        help="market (default): Market-1501 / MSMT17 rules (junk -1 and same-id same-camera items "
        "ignored); cuhk03: single-gallery-shot CMC over --repeat random draws; verification: pair scores",
    )
    pro.add_argument(
        "--repeat", metavar="N", type=_positive, default=10, help="cuhk03: random draws (default 10)"
    )
    pro.add_argument(
        "--seed", metavar="N", type=_seed, default=0, help="cuhk03: seed of the draws (default 0)"
    )
    pro.add_argument(
        "--folds", metavar="K", type=_positive, default=10, help="verification: folds (default 10)"
    )
    opt = ev.add_argument_group("scoring and output")
    opt.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking before the metrics")
    opt.add_argument("--k1", metavar="N", type=_positive, default=20, help="re-ranking k1 (default 20)")
    opt.add_argument("--k2", metavar="N", type=_positive, default=6, help="re-ranking k2 (default 6)")
    opt.add_argument(
        "--lambda",
        dest="lambda_value",
        metavar="X",
        type=_unit,
        default=0.3,
        help="re-ranking lambda (default 0.3)",
    )
    opt.add_argument(
        "--two-stage",
        metavar="R",
        type=_positive,
        help="score only each probe's R best gallery maps by pooled descriptors (two_stage_search); "
        "the metrics are then over these shortlists",
    )
    opt.add_argument(
        "--ranks",
        metavar="LIST",
        type=_ranks,
        default=[1, 5, 10, 20],
        help="CMC ranks shown (default 1,5,10,20)",
    )
    opt.add_argument("--plot-dir", metavar="DIR", help="write cmc.png (or roc.png) here (needs matplotlib)")
    opt.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    opt.add_argument(
        "--threads", metavar="T", type=_threads, default=None, help="threads (default: OpenMP's default)"
    )
    opt.add_argument(
        "--block",
        metavar="N",
        type=_positive,
        default=None,
        help="probes (verification: pairs) scored per call (default: about 1M pairs per call)",
    )
    opt.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate``; bad input is reported on stderr with exit status 2."""
    try:
        return _evaluate(args)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"qaconv-gs evaluate: error: {exc}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------- checking input


def _check_options(args: argparse.Namespace) -> None:
    """Combinations of options, checked before any file is read."""
    maps = args.probe is not None or args.gallery is not None
    verif = args.protocol == "verification"
    if maps and args.scores is not None:
        raise ValueError("--scores: give either --scores or --probe/--gallery feature maps, not both")
    if not maps and args.scores is None:
        raise ValueError("--probe/--gallery or --scores: no input given (feature maps or a score matrix)")
    if maps:
        if args.probe is None or args.gallery is None:
            have, need = ("--probe", "--gallery") if args.gallery is None else ("--gallery", "--probe")
            raise ValueError(f"{need}: required with {have} (feature maps of both sides)")
        if args.checkpoint is None:
            raise ValueError(
                "--checkpoint: required with --probe/--gallery feature maps (the QAConv head that scores "
                "them: a file written by QAConvGS.save or Trainer.save_checkpoint)"
            )
    else:
        for opt in ("checkpoint", "two_stage", "pairs"):
            if getattr(args, opt) is not None:
                raise ValueError(
                    f"--{opt.replace('_', '-')}: only with --probe/--gallery maps, not with --scores"
                )
    if args.distances and args.scores is None:
        raise ValueError("--distances: only with --scores (the maps are scored as similarities)")
    side_scores = [
        o for o in ("probe_probe_scores", "gallery_gallery_scores") if getattr(args, o) is not None
    ]
    if side_scores and not (args.rerank and args.scores is not None):
        raise ValueError(f"--{side_scores[0].replace('_', '-')}: only with --rerank and --scores")
    if args.rerank and args.scores is not None and len(side_scores) < 2:
        raise ValueError(
            "--rerank: with --scores, re-ranking also needs the probe-probe and gallery-gallery matrices: "
            "give --probe-probe-scores [P, P] and --gallery-gallery-scores [G, G] (with maps they are "
            "computed)"
        )
    if verif:
        unused = ["probe_ids", "gallery_ids", "probe_cams", "gallery_cams", "probe_list", "gallery_list"]
        unused += ["two_stage"]
        for opt in unused:
            if getattr(args, opt) is not None:
                raise ValueError(f"--{opt.replace('_', '-')}: not used with --protocol verification")
        if args.rerank:
            raise ValueError("--rerank: not used with --protocol verification")
        if args.labels is None:
            raise ValueError("--labels: required with --protocol verification ([N] same/different per pair)")
    else:
        for opt in ("labels", "pairs"):
            if getattr(args, opt) is not None:
                raise ValueError(f"--{opt}: only with --protocol verification")
    if args.two_stage is not None:
        if args.protocol != "market":
            raise ValueError(f"--two-stage: only with --protocol market, got --protocol {args.protocol}")
        if args.rerank:
            raise ValueError("--two-stage: not with --rerank (re-ranking needs every probe-gallery score)")
    if args.plot_dir is not None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
        except ImportError:
            raise ValueError(
                "--plot-dir: the plots need matplotlib, which is not installed "
                "(pip install 'qaconv-gs[plot]')"
            ) from None
        if os.path.exists(args.plot_dir) and not os.path.isdir(args.plot_dir):
            raise ValueError(f"--plot-dir: {args.plot_dir!r} exists and is not a directory")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise ValueError(f"--json: the directory {folder!r} of {args.json!r} does not exist")


def _exists(path: str, opt: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{opt}: no such file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{opt}: {path!r} is a directory, expected a file")


def _load(path: str, opt: str) -> np.ndarray:
    _exists(path, opt)
    return _load_npy(path, opt)


def _maps(path: str, opt: str) -> np.ndarray:
    from ._validate import as_float32

    a = _load(path, opt)
    if a.ndim != 4:
        raise ValueError(f"{opt}: expected a 4-d [n, C, H, W] array of feature maps, got shape {a.shape}")
    return as_float32(a, opt, 4)


def _int_vector(a: np.ndarray, opt: str, n: int, what: str) -> np.ndarray:
    """a as int64 ids: 1-d, integer values (integral floats accepted), length n."""
    if a.ndim != 1:
        raise ValueError(f"{opt}: expected a 1-d array of integer ids, got shape {a.shape}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{opt}: expected integer ids, got dtype {a.dtype}")
    if a.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{opt}: expected integer ids, got {bad.size} non-integer value(s) "
                f"(e.g. {a[i].item()!r} at index {i})"
            )
        if a.size and float(np.abs(a).max()) >= 2**63:
            raise ValueError(f"{opt}: ids must fit in int64")
    if a.dtype.kind == "u" and a.size and int(a.max()) >= 2**63:
        raise ValueError(f"{opt}: ids must fit in int64")
    if a.shape[0] != n:
        raise ValueError(f"{opt}: expected {n} ids ({what}), got {a.shape[0]}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _side(
    args: argparse.Namespace, side: str, n: int, what: str
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(ids, cams or None, the option that gave the ids) of the probe or gallery side."""
    from .metrics import read_market_list

    lst, ids_path, cams_path = (getattr(args, f"{side}_{k}") for k in ("list", "ids", "cams"))
    if lst is not None:
        if ids_path is not None or cams_path is not None:
            given = f"--{side}-ids" if ids_path is not None else f"--{side}-cams"
            raise ValueError(f"--{side}-list: give either --{side}-list or {given}, not both")
        opt = f"--{side}-list"
        _exists(lst, opt)
        try:
            ids, cams = read_market_list(lst)
        except ValueError as exc:  # UnicodeDecodeError included
            raise ValueError(f"{opt}: {exc}") from None
        if ids.shape[0] != n:
            raise ValueError(f"{opt}: expected {n} image names ({what}), got {ids.shape[0]} in {lst!r}")
        return ids, cams, opt
    if ids_path is None:
        raise ValueError(
            f"--{side}-ids or --{side}-list: required with --protocol {args.protocol} (the identity of "
            f"each {side} row)"
        )
    ids = _int_vector(_load(ids_path, f"--{side}-ids"), f"--{side}-ids", n, what)
    cams = None
    if cams_path is not None:
        cams = _int_vector(_load(cams_path, f"--{side}-cams"), f"--{side}-cams", n, what)
    return ids, cams, f"--{side}-ids"


def _load_head(path: str, maps_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The QAConv head (bn.*, fc.*, logit_bn.*) of a model or trainer checkpoint built for these maps."""
    from .checkpoint import load_head_for_maps

    _exists(path, "--checkpoint")
    return load_head_for_maps(path, maps_shape, checkpoint_name="--checkpoint", maps_name="--probe")


def _input_maps(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    probe = _maps(args.probe, "--probe")
    gallery = _maps(args.gallery, "--gallery")
    if probe.shape[1:] != gallery.shape[1:]:
        raise ValueError(
            f"--gallery: expected maps of shape (C, H, W) = {probe.shape[1:]} like --probe, "
            f"got {gallery.shape[1:]}"
        )
    return probe, gallery, _load_head(args.checkpoint, probe.shape[1:])


def _score_matrix(path: str, opt: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    s = _load(path, opt)
    if s.dtype.kind not in "iuf":
        raise ValueError(f"{opt}: expected real scores, got dtype {s.dtype}")
    if shape is not None and s.shape != shape:
        raise ValueError(f"{opt}: expected shape {shape} ({what}), got {s.shape}")
    if s.size == 0:
        raise ValueError(f"{opt}: expected a non-empty array, got shape {s.shape}")
    nan = int(np.count_nonzero(np.isnan(s))) if s.dtype.kind == "f" else 0
    if nan:
        raise ValueError(f"{opt}: contains {nan} NaN value(s)")
    return s


# ------------------------------------------------------------------------------------------ scoring


def _progress(total: int, pairs: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    show = not quiet and pairs >= _PROGRESS_PAIRS and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="probe", file=sys.stderr, dynamic_ncols=True, disable=not show)


def _match_blocked(
    a: np.ndarray, b: np.ndarray, head: dict, args: argparse.Namespace, desc: str
) -> np.ndarray:
    """[len(a), len(b)] eval-mode QAConv scores, rows of a in blocks; each entry has the bits of
    ``qaconv_gs.match(a, b, head)`` (the same kernels on the same normalised maps, one pair at a time)."""
    from .evaluate import head_fc_kind
    from .head import head_eval_affine
    from .matching import match_scores, normalize

    S = a.shape[2] * a.shape[3]
    w, bias = head_eval_affine(head, S, head_fc_kind(head, S))
    bn, _ = normalize(b, n_threads=args.threads)
    n, m = a.shape[0], b.shape[0]
    block = args.block or max(1, _BLOCK_PAIRS // m)
    out = np.empty((n, m), dtype=np.float32)
    with _progress(n, n * m, desc, args.quiet) as bar:
        for r0 in range(0, n, block):
            an, _ = normalize(a[r0 : r0 + block], n_threads=args.threads)
            out[r0 : r0 + an.shape[0]] = match_scores(an, bn, w, bias, n_threads=args.threads)
            bar.update(an.shape[0])
    return out


def _pair_scores(
    a: np.ndarray, b: np.ndarray, pairs: np.ndarray, head: dict, args: argparse.Namespace
) -> np.ndarray:
    """[N] eval-mode scores of the pairs (a[pairs[n, 0]], b[pairs[n, 1]]), each with the bits that
    ``qaconv_gs.match`` gives the pair."""
    from .matching import normalize, pair_maxima_restricted
    from .search import _head_affine
    from .search import _pair_scores as affine_scores

    S = a.shape[2] * a.shape[3]
    w, bias = _head_affine(head, S)
    w64, bias32 = w.astype(np.float64), float(np.float32(bias))
    N = pairs.shape[0]
    out = np.empty(N, dtype=np.float32)
    block = args.block or 4096
    with _progress(N, N, "pairs", args.quiet) as bar:
        for r0 in range(0, N, block):
            p = pairs[r0 : r0 + block]
            an, _ = normalize(a[p[:, 0]], n_threads=args.threads)
            bn, _ = normalize(b[p[:, 1]], n_threads=args.threads)
            diag = np.arange(p.shape[0], dtype=np.int64)[:, None]
            mp, mg = pair_maxima_restricted(an, bn, diag, n_threads=args.threads)
            out[r0 : r0 + p.shape[0]] = affine_scores(mp, mg, w64, bias32)[:, 0]
            bar.update(p.shape[0])
    return out


# ------------------------------------------------------------------------------------------ protocols


def _evaluate(args: argparse.Namespace) -> int:
    _check_options(args)
    if args.protocol == "verification":
        report = _verification(args)
    else:
        report = _ranking(args)
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _ranking(args: argparse.Namespace) -> dict[str, Any]:
    from . import metrics

    t0 = time.perf_counter()
    if args.scores is None:
        probe, gallery, head = _input_maps(args)
        P, G = probe.shape[0], gallery.shape[0]
        what = (
            f"one per row of --probe, shape {probe.shape}",
            f"one per row of --gallery, shape {gallery.shape}",
        )
    else:
        scores = _score_matrix(args.scores, "--scores", None, "")
        if scores.ndim != 2:
            raise ValueError(
                f"--scores: expected a 2-d [P, G] score matrix with --protocol {args.protocol}, "
                f"got shape {scores.shape}"
            )
        P, G = scores.shape
        what = (
            f"one per row of --scores, shape {scores.shape}",
            f"one per column of --scores, shape {scores.shape}",
        )
    qid, qcam, q_opt = _side(args, "probe", P, what[0])
    gid, gcam, g_opt = _side(args, "gallery", G, what[1])
    if (qcam is None) != (gcam is None):
        has = "probe" if qcam is not None else "gallery"
        raise ValueError(
            f"--probe-cams/--gallery-cams: cameras are known for the {has} side only (a --{has}-list gives "
            "cameras); give them for both sides or neither"
        )
    if not (metrics._valid_match_counts(qid, gid, qcam, gcam) > 0).any():
        rule = "same id, not junk -1" + (", another camera" if qcam is not None else "")
        raise ValueError(
            f"{q_opt}/{g_opt}: no valid query: none of the {P} probes has a match in the gallery ({rule}); "
            "nothing to evaluate"
        )
    if args.scores is not None and args.rerank:
        qq = _score_matrix(args.probe_probe_scores, "--probe-probe-scores", (P, P), "probe x probe")
        gg = _score_matrix(
            args.gallery_gallery_scores, "--gallery-gallery-scores", (G, G), "gallery x gallery"
        )

    max_rank = max(50, args.ranks[-1])
    cams = (qcam, gcam)
    notes = []
    if args.scores is None and args.two_stage is not None:
        from .search import two_stage_search

        R = min(args.two_stage, G)
        found = two_stage_search(
            probe, gallery, head, top=R, candidates=R, block=args.block, n_threads=args.threads,
            progress=not args.quiet and P * R >= _PROGRESS_PAIRS and sys.stderr.isatty(),
        )  # fmt: skip
        source = f"two-stage search of {args.probe} vs {args.gallery} with the head of {args.checkpoint}"
        result = metrics.cmc_map_ranked(found.ids, qid, gid, *cams, max_rank=max_rank)
        notes.append(
            f"metrics over the two-stage shortlist: each probe's R = {R} of {G} gallery maps (pooled-"
            "descriptor cosine) scored exactly; a match outside the shortlist counts as not found"
            + (" (R >= G: exhaustive)" if R == G else "")
        )
    else:
        if args.scores is None:
            qg = _match_blocked(probe, gallery, head, args, "probe x gallery")
            source = f"QAConv scores of {args.probe} vs {args.gallery} with the head of {args.checkpoint}"
            if args.rerank:
                qq = _match_blocked(probe, probe, head, args, "probe x probe")
                gg = _match_blocked(gallery, gallery, head, args, "gallery x gallery")
        else:
            qg = scores
            source = f"{'distances' if args.distances else 'scores'} from {args.scores}"
        higher = not args.distances
        if args.rerank:
            if args.distances:
                d = (qg, qq, gg)
                how = "of the given distances"
            else:
                d = (
                    metrics.scores_to_distances(qg),
                    metrics.scores_to_distances(qq, zero_diagonal=True),
                    metrics.scores_to_distances(gg, zero_diagonal=True),
                )
                how = "of the distances log(1 + exp(-score))"
            try:
                qg = metrics.rerank(*d, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)
            except ValueError as exc:
                raise ValueError(f"--rerank: {exc}") from None
            higher = False
            notes.append(
                f"k-reciprocal re-ranking (k1={args.k1}, k2={args.k2}, lambda={args.lambda_value}) {how}"
            )
        result = metrics.cmc_map(
            qg, qid, gid, *cams, higher_is_better=higher, max_rank=max_rank,
            single_gallery_shot=args.protocol == "cuhk03", repeat=args.repeat, seed=args.seed,
        )  # fmt: skip
    dt = time.perf_counter() - t0

    if args.protocol == "cuhk03":
        rule = (
            f"cuhk03: single-gallery-shot CMC averaged over {args.repeat} random draws (seed {args.seed}), "
            "mAP over the whole gallery"
        )
    else:
        rule = "market: junk (id -1)" + (" and same-id same-camera" if qcam is not None else "")
        rule += " gallery items ignored"
    print(f"qaconv-gs evaluate: {P} probes x {G} gallery, {source} ({dt:.2f} s)")
    print(f"protocol {rule}")
    for note in notes:
        print(note)
    rows = [(f"rank-{r}", f"{100 * result.cmc[r - 1]:.2f}%") for r in args.ranks]
    rows += [
        ("mAP", f"{100 * result.mAP:.2f}%"),
        ("valid queries", str(result.num_valid_queries)),
        ("skipped queries", str(result.num_skipped_queries)),
    ]
    _table(rows)
    report = {
        "protocol": args.protocol,
        "input": "scores" if args.scores is not None else "maps",
        "num_probe": P,
        "num_gallery": G,
        "cameras": qcam is not None,
        "rerank": {"k1": args.k1, "k2": args.k2, "lambda": args.lambda_value} if args.rerank else None,
        "two_stage": {"candidates": min(args.two_stage, G), "over_shortlist": True}
        if args.two_stage
        else None,
        "cmc": {str(r): float(result.cmc[r - 1]) for r in args.ranks},
        "mAP": float(result.mAP),
        "num_valid_queries": result.num_valid_queries,
        "num_skipped_queries": result.num_skipped_queries,
        "cmc_curve": [float(v) for v in result.cmc],
        "seconds": dt,
    }
    if args.protocol == "cuhk03":
        report.update(repeat=args.repeat, seed=args.seed)
    if args.plot_dir is not None:
        os.makedirs(args.plot_dir, exist_ok=True)
        path = metrics.plot_cmc(
            result, os.path.join(args.plot_dir, "cmc.png"), max_rank=max(20, args.ranks[-1]),
            title=f"qaconv-gs evaluate ({args.protocol})",
        )  # fmt: skip
        print(f"wrote {path}")
    return report


def _verification(args: argparse.Namespace) -> dict[str, Any]:
    from . import metrics

    t0 = time.perf_counter()
    raw = _load(args.labels, "--labels")
    if raw.ndim != 1 or raw.dtype.kind not in "biuf":
        raise ValueError(
            f"--labels: expected a 1-d array of 0/1 (or bool) same/different labels, got shape {raw.shape}, "
            f"dtype {raw.dtype}"
        )
    if not np.isin(raw, (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(raw, (0, 1)))[0])
        raise ValueError(
            f"--labels: expected only 0/1 (or True/False), got {raw[bad].item()!r} at index {bad}"
        )
    same = raw.astype(bool)
    N = same.shape[0]
    if args.scores is not None:
        scores = _score_matrix(args.scores, "--scores", None, "")
        if scores.ndim != 1:
            raise ValueError(
                f"--scores: expected a 1-d [N] array of pair scores with --protocol verification, "
                f"got shape {scores.shape}"
            )
        if scores.shape[0] != N:
            raise ValueError(
                f"--labels: expected {scores.shape[0]} labels (one per pair of --scores), got {N}"
            )
        s = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(s).all():
            raise ValueError("--scores: pair scores must be finite")
        source = f"{'distances' if args.distances else 'scores'} from {args.scores}"
    else:
        a, b, head = _input_maps(args)
        if args.pairs is not None:
            pairs = _load(args.pairs, "--pairs")
            if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
                raise ValueError(
                    f"--pairs: expected an [N, 2] integer array (probe row, gallery row), got shape "
                    f"{pairs.shape}, dtype {pairs.dtype}"
                )
            pairs = pairs.astype(np.int64)
            for col, (opt, n) in enumerate((("--probe", a.shape[0]), ("--gallery", b.shape[0]))):
                bad = np.flatnonzero((pairs[:, col] < 0) | (pairs[:, col] >= n))
                if bad.size:
                    raise ValueError(
                        f"--pairs: row {int(bad[0])} names {opt} row {int(pairs[bad[0], col])}, "
                        f"outside [0, {n})"
                    )
            what = "one per row of --pairs"
        else:
            if a.shape[0] != b.shape[0]:
                raise ValueError(
                    f"--gallery: expected {a.shape[0]} maps, one paired with each --probe map (or give "
                    f"--pairs), got {b.shape[0]}"
                )
            pairs = np.repeat(np.arange(a.shape[0], dtype=np.int64)[:, None], 2, axis=1)
            what = "one per --probe / --gallery pair"
        if pairs.shape[0] != N:
            raise ValueError(f"--labels: expected {pairs.shape[0]} labels ({what}), got {N}")
        s = _pair_scores(a, b, pairs, head, args)
        source = f"QAConv scores of {args.probe} vs {args.gallery} pairs with the head of {args.checkpoint}"
    if args.distances:
        s = -np.asarray(s, dtype=np.float64)
    n_same = int(np.count_nonzero(same))
    if n_same == 0 or n_same == N:
        raise ValueError(
            f"--labels: both same (1) and different (0) pairs are needed, got {n_same} of {N} same"
        )
    if args.folds < 2 or args.folds > N:
        raise ValueError(f"--folds: expected 2 <= folds <= the number of pairs ({N}), got {args.folds}")
    result = metrics.verification(s, same, folds=args.folds, far_targets=FARS)
    dt = time.perf_counter() - t0

    print(f"qaconv-gs evaluate: {N} pairs ({n_same} same, {N - n_same} different), {source} ({dt:.2f} s)")
    print(
        f"protocol verification: {args.folds}-fold accuracy (LFW rule: threshold chosen on the other folds)"
    )
    rows = [
        (f"accuracy ({args.folds}-fold)", f"{100 * result.accuracy:.2f}% ± {100 * result.accuracy_std:.2f}%")
    ]
    rows += [(f"TAR @ FAR={far:g}", f"{100 * result.tar_at_far[far]:.2f}%") for far in FARS]
    rows += [("EER", f"{100 * result.eer:.2f}%"), ("AUC", f"{result.auc:.4f}")]
    _table(rows)
    report = {
        "protocol": "verification",
        "input": "scores" if args.scores is not None else "maps",
        "num_pairs": N,
        "num_same": n_same,
        "folds": args.folds,
        "accuracy": result.accuracy,
        "accuracy_std": result.accuracy_std,
        "fold_accuracies": [float(v) for v in result.fold_accuracies],
        "tar_at_far": {f"{far:g}": float(result.tar_at_far[far]) for far in FARS},
        "eer": result.eer,
        "auc": result.auc,
        "seconds": dt,
    }
    if args.plot_dir is not None:
        os.makedirs(args.plot_dir, exist_ok=True)
        path = metrics.plot_roc(result, os.path.join(args.plot_dir, "roc.png"), title="qaconv-gs evaluate")
        print(f"wrote {path}")
    return report


def _table(rows: list[tuple[str, str]]) -> None:
    left = max(len("metric"), *(len(k) for k, _ in rows))
    right = max(len("value"), *(len(v) for _, v in rows))
    print(f"{'metric':<{left}}  {'value':>{right}}")
    for k, v in rows:
        print(f"{k:<{left}}  {v:>{right}}")
