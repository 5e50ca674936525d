"""Why a restricted qaconv-gs model identifies worse than its full-scoring twin: train one
``bench_learning.py`` variant exactly as the benchmark does and keep the model and the maps, then compare
trained models.

``train`` runs ``bench_learning.run_method`` (same data, CNN, SGD, batches; with one thread the row it prints
equals the benchmark's row digit for digit) and writes DIR/model.qgs (the trained QAConvGS), DIR/maps.npz
(probe, gallery and training maps with labels) and DIR/row.json. ``--patch`` changes the training in ways
the package has no option for, to test a hypothesis (not features):

* ``fc-nonneg``: the head's fc weights clamped to >= 0 after every optimiser step;
* ``row-lr=X``: the class embeddings train at X times the learning rate;
* ``mine-per-class``: k_mined classes mined once per class of the batch (its glyphs' summed normalised maps)
  and shared by its glyphs, instead of once per glyph.

``analyse DIR...`` prints per model: identification (top-1, top-5) on the probes and on 4,000 training
glyphs; where the errors' winning classes lie (among the true class's 32 / 128 cosine neighbours); how
concentrated the winners are (hub classes); identification with every class row replaced by the class mean of
the training glyphs' location-normalised maps (rows blended 0 .. 1 toward it), which separates what the
features know from what the learned rows add; the share of the negative softmax mass (eval-mode logits, held-
out probes) among the true class's nearest 32 / 33-128 / 129-512 classes and beyond; the head's fc weights;
the per-location norms of the rows. With two models (restricted, full): retrieval with the fc swapped.

    PK=triplet=batch,sampler=pk,tw=1,margin=16,fc=shared      # the P x K recipe, as in bench_learning.py
    python benchmarks/diagnose_learning.py train "k=32,batch=32,wx=1,nb=aligned,$PK" out/al
    python benchmarks/diagnose_learning.py train "k=N-1,$PK" out/full
    python benchmarks/diagnose_learning.py analyse out/al out/full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _patch(torch, method, patch: str) -> None:
    core = method.crit._core
    if patch == "fc-nonneg":
        step = torch.optim.SGD.step

        def clamped(self, *a, **k):
            out = step(self, *a, **k)
            with torch.no_grad():
                method.crit.fc.weight.clamp_(min=0)
            return out

        torch.optim.SGD.step = clamped
    elif patch.startswith("row-lr="):
        mult = float(patch.split("=", 1)[1])
        init = torch.optim.SGD.__init__

        def grouped(self, params, lr, **k):
            rows = method.crit.class_embed
            rest = [p for p in params if p is not rows]
            init(self, [{"params": rest}, {"params": [rows], "lr": lr * mult}], lr=lr, **k)

        torch.optim.SGD.__init__ = grouped
    elif patch == "mine-per-class":
        mine = core._mine

        def per_class(Xn, exclude, m, nt):
            _, first, inv = np.unique(exclude[:, 0], return_index=True, return_inverse=True)
            Q = np.zeros((first.size,) + Xn.shape[1:], np.float32)
            np.add.at(Q, inv, Xn)
            return np.ascontiguousarray(mine(Q, np.ascontiguousarray(exclude[first]), m, nt)[inv])

        core._mine = per_class
    elif patch:
        raise SystemExit(f"--patch: unknown {patch!r}")


def train(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    import benchmarks.bench_learning as bl

    torch.set_num_threads(args.threads)
    g, _, data = bl.load_data(args.classes, args.seed)
    method = bl.method_from_variant(torch, g.num_classes, bl.parse_variant(args.variant), args.seed)
    _patch(torch, method, args.patch)
    kept = {}
    build = bl.build_cnn

    def keep_backbone(*a, **k):
        kept["backbone"] = build(*a, **k)
        return kept["backbone"]

    bl.build_cnn = keep_backbone
    retrieve = method.retrieve

    def keep_maps(probe, gallery):
        kept["probe"], kept["gallery"] = probe, gallery
        return retrieve(probe, gallery)

    method.retrieve = keep_maps
    row = bl.run_method(torch, method, data, argparse.Namespace(epochs=args.epochs, lr=args.lr), args.seed)
    row["patch"] = args.patch
    print(row, flush=True)
    x_tr, y_tr, _, y_probe, _ = data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    method.crit._core.save(out / "model.qgs")
    train_maps = bl.maps_of(torch, kept["backbone"], x_tr)
    np.savez(out / "maps.npz", probe=kept["probe"], gallery=kept["gallery"], y_probe=y_probe,
             train=train_maps, y_train=y_tr)  # fmt: skip
    (out / "row.json").write_text(json.dumps(row, indent=1))
    return 0


def _top1(model, maps, labels) -> float:
    ids, _ = model.identify(maps, top=1)
    return float((ids[:, 0] == labels).mean())


def analyse_one(qg, path: Path, threads: int) -> None:
    from qaconv_gs.matching import normalize

    m = qg.QAConvGS.load(path / "model.qgs", n_threads=threads)
    m.eval()
    z = np.load(path / "maps.npz")
    P, yp, T, yt = z["probe"], z["y_probe"], z["train"], z["y_train"]
    N = m.num_classes
    ids, _ = m.identify(P, top=min(50, N))
    hit = ids[:, 0] == yp
    sub = np.random.default_rng(0).choice(len(yt), min(4000, len(yt)), replace=False)
    print(f"{path}: N = {N}")
    top5 = (ids[:, :5] == yp[:, None]).any(1).mean()
    print(
        f"  identification: probes top-1 {hit.mean():.4f}, top-5 {top5:.4f};"
        f" training glyphs top-1 {_top1(m, T[sub], yt[sub]):.4f}"
    )
    wrong, truth = ids[~hit, 0], yp[~hit]
    nbr = qg.class_neighbors(m.class_embed, k=min(512, N - 1))  # nearest first: a prefix is a smaller k
    for k in sorted({min(32, N - 1), min(128, N - 1)}):
        inside = (nbr[truth, :k] == wrong[:, None]).any(1).mean()
        print(f"  errors ({wrong.size}) won by one of the true class's {k} cosine neighbours: {inside:.3f}")
    counts = np.sort(np.bincount(wrong, minlength=N))[::-1]
    share = counts[:20].sum() / wrong.size
    print(
        f"  winners: {np.count_nonzero(counts)} distinct classes, the 20 commonest win {share:.3f} of the"
        f" errors, the commonest {counts[:3].tolist()} times"
    )
    learned = m.class_embed.copy()
    m.imprint(T, yt)  # every row := its class's mean location-normalised training map
    means = normalize(m.class_embed, n_threads=threads)[0]
    rows = normalize(learned, n_threads=threads)[0]
    blend = []
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        m.class_embed[...] = (1 - a) * rows + a * means
        blend.append(f"{a:g}: {_top1(m, P, yp):.4f}")
    m.class_embed[...] = learned
    print("  identification with rows blended toward the training class means:", ", ".join(blend))
    ps = np.random.default_rng(1).choice(len(yp), min(600, len(yp)), replace=False)
    top, sc = m.identify(P[ps], top=N)
    logits = np.full((ps.size, N), -np.inf)
    np.put_along_axis(logits, top, sc.astype(np.float64), 1)
    logits[np.arange(ps.size), yp[ps]] = -np.inf
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    near = np.take_along_axis(p, nbr[yp[ps]], 1)
    bands = [near[:, a:b].sum(1).mean() for a, b in ((0, 32), (32, 128), (128, 512))]
    print(
        "  negative softmax mass (eval logits) in the true class's nearest 1-32 / 33-128 / 129-512 / beyond: "
        + " / ".join(f"{v:.3f}" for v in bands + [1 - sum(bands)])
    )
    fc = np.asarray(m.head_state["fc.weight"]).ravel()
    norms = normalize(learned, n_threads=threads)[1]
    p10, p50, p90 = np.percentile(norms, [10, 50, 90])
    print(
        f"  fc weights: min {fc.min():.3f} max {fc.max():.3f}, {np.mean(fc < 0):.2f} negative; row location"
        f" norms: median {p50:.3f}, p10 {p10:.3f}, p90 {p90:.3f}"
    )


def swap_fc(qg, a: Path, b: Path, threads: int) -> None:
    heads = [qg.QAConvGS.load(p / "model.qgs", n_threads=threads).head_state for p in (a, b)]
    maps = [np.load(p / "maps.npz") for p in (a, b)]

    def retrieval(head, z):
        s = np.asarray(qg.match(z["probe"], z["gallery"], head, n_threads=threads))
        return float((s.argmax(1) == z["y_probe"]).mean())

    for i, j in ((0, 1), (1, 0)):
        mixed = dict(heads[i])
        mixed.update({k: v for k, v in heads[j].items() if k.startswith("fc.")})
        print(
            f"retrieval of {(a, b)[i]}: own head {retrieval(heads[i], maps[i]):.4f}, with the fc of "
            f"{(a, b)[j]} {retrieval(mixed, maps[i]):.4f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("variant", help='a bench_learning --variants entry, e.g. "k=N-1,triplet=batch,..."')
    t.add_argument("out")
    t.add_argument("--classes", type=int, default=2000)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--patch", default="", help="fc-nonneg, row-lr=X or mine-per-class")
    a = sub.add_parser("analyse")
    a.add_argument("dirs", nargs="+")
    a.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        return train(args)
    import qaconv_gs as qg

    dirs = [Path(d) for d in args.dirs]
    for d in dirs:
        analyse_one(qg, d, args.threads)
    if len(dirs) == 2:
        swap_fc(qg, *dirs, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
