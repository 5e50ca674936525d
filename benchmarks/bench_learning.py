"""Learning on real images: Hangul glyphs of held-out typefaces, qaconv-gs against what users train today.

Data: ``qaconv_gs.glyphs.font_glyphs`` (classes = syllables, samples = Debian's Korean typefaces) with the
protocol of ``glyph_split``: whole font families held out; the gallery is the held-out printed font
NanumMyeongjo, the probes are the other held-out fonts (printed UnDotum, handwriting / brush NanumPen,
NanumBrush, UnPilgi*).

Every method trains the same small CNN (same seed, same initial weights, same batches of 64 random
training glyphs, the same number of steps, SGD with momentum 0.9 / Nesterov / weight decay 5e-4 and a cosine
learning rate) and differs only in the loss on its feature maps [C, 4, 4]:

* ``qaconv-gs k=K``: ``qaconv_gs.torch.QAConvGSLoss`` with k_nearest = K (K = N-1 is full scoring),
  default init (imprinting), ``criterion.on_epoch_start()`` every epoch: the plain loop of the README;
* ``softmax``: Linear(C -> N) on global-average-pooled features, cross-entropy;
* ``cosface s=S m=M``: normalised pooled features and class weights, CosFace (Wang et al. 2018);
* ``qaconv2.1``: QAConv 2.1's recipe: in-batch QAConv scores (shared fc), batch-hard triplet loss with
  margin 16, batches from ``qaconv_gs.GraphSampler`` (a centre class and its nearest classes by the
  cosine of one sample's pooled feature per class, 2 instances each, rebuilt every epoch).

Reported on the held-out fonts:
* ``identification``: top-1 of a probe glyph among all N classes (qaconv-gs: ``identify`` against the class
  embeddings; softmax / cosface: the classifier's argmax; qaconv2.1 has no classifier);
* ``retrieval``: top-1 of a probe glyph among the N gallery glyphs (qaconv-gs / qaconv2.1: QAConv
  ``match`` with the trained head; softmax / cosface: cosine of pooled features, what their users do);
* the loss step's time (the loss's forward + backward, the CNN excluded) and the whole epoch's time.

    python benchmarks/bench_learning.py --quick                            # small, a couple of minutes
    # the README's run: three processes side by side (1 thread each), then one table from their JSON
    PK=triplet=batch,sampler=pk,tw=1,margin=16,fc=shared
    QG_BENCH_OUT=out/A python benchmarks/bench_learning.py --threads 1 --methods qaconv-gs --ks 8,N-1
    QG_BENCH_OUT=out/B python benchmarks/bench_learning.py --threads 1 --ks 32,128 \
        --methods qaconv-gs,softmax,cosface,qaconv2.1 --cosface 16:0.1,32:0.2,64:0.35
    QG_BENCH_OUT=out/C python benchmarks/bench_learning.py --threads 1 --methods none --variants \
        "k=32,batch=32,wx=1,$PK;k=32,batch=32,wx=1,mined=16,$PK;k=32,$PK;k=N-1,$PK"
    QG_BENCH_OUT=out/D python benchmarks/bench_learning.py --threads 1 --methods none --variants \
        "k=32,batch=32,wx=1,nb=aligned,$PK"
    python benchmarks/bench_learning.py --merge out/A/bench_learning.json out/B/... out/C/... out/D/...
    # the same configuration with the triplet weighted 0.5 (the default), on twelve seeds two at a time,
    # and its full-scoring twin (README "Triplet weight 0.5")
    PK05=triplet=batch,sampler=pk,margin=16,fc=shared
    python benchmarks/bench_learning.py --threads 1 --seeds 0,1,2,3,4,5,6,7,8,9,10,11 --jobs 2 \
        --methods none --variants "k=32,batch=32,wx=1,nb=aligned,$PK05"
    python benchmarks/bench_learning.py --threads 1 --seeds 0,1,2,3 --jobs 2 --methods none \
        --variants "k=N-1,$PK05"
    # more seeds (--seed S draws other syllables and another CNN start; --seeds 0,1,2 runs them one after
    # the other, --jobs 2 two at a time in their own processes, and ends with the summary below), then every
    # run together: each method per seed and its mean, restricted / full ratios (with a 95 % t-interval)
    # and margins over the baselines per seed
    python benchmarks/bench_learning.py --merge benchmarks/results/learning/*.json

benchmarks/results/learning/ keeps the JSON of the runs the README's learning tables come from.

--variants keys: k, init, mined (k_mined), batch (k_batch), wx=1 (weighted_extras), nb (neighbors_by:
cosine / aligned), triplet, sampler (random / pk / graph), tw (triplet_weight), margin, fc, refresh
(neighbour rebuilds per epoch), group (with sampler=graph: GraphSampler's group_size, classes per centre).

Writes bench_out/bench_learning.json and docs-ready PNGs (accuracy per method, accuracy and loss-step time
against k; with --merge of several seeds also each method per seed) under bench_out/ (QG_BENCH_OUT).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import OUT_DIR, machine_info, write_json  # noqa: E402

FEAT_C, FEAT_HW = 64, 4
# The P x K batch-triplet recipe (with --variants "...,triplet=batch,sampler=pk,tw=1,margin=16,fc=shared"),
# as QAConvGS / QAConvGSLoss arguments for the other benchmarks that train or time it
RECIPE = dict(triplet="batch", triplet_weight=1.0, margin=16.0, fc="shared")
# ... and the recipe with 32 weighted extras per sample (the in-batch / random classes standing for the
# classes a restricted step does not score), as bench_loss_step times it (neighbors_by changes no step)
WEIGHTED = {**RECIPE, "k_batch": 32, "weighted_extras": True}


def build_cnn(torch, seed: int, pooled_stages: int = 3):
    """32x32 glyph -> [64, 4, 4] maps: three conv-BN-ReLU-pool stages and a 1x1 neck with BN
    (pooled_stages=2: the third stage keeps its resolution, [64, 8, 8] maps)."""
    nn = torch.nn
    torch.manual_seed(seed)

    def stage(cin, cout, pool=True):
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ] + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(
        *stage(1, 32),
        *stage(32, 64),
        *stage(64, 128, pool=pooled_stages >= 3),
        nn.Conv2d(128, FEAT_C, 1, bias=False),
        nn.BatchNorm2d(FEAT_C),
    )


class Method:
    """A loss on the backbone's maps: `loss(maps, labels)`, optional `epoch_start(epoch, backbone)`,
    `identify(maps) -> top-1 ids or None` and `retrieve(probe_maps, gallery_maps) -> [P, G] scores`."""

    name = ""
    # "graph": batches from qaconv_gs.GraphSampler over the method's class_neighbors; "pk": random classes,
    # 2 instances each; "random": a random permutation of the training glyphs
    sampler = "random"
    sweep: dict = {}  # k-sweep fields copied into the row (qaconv-gs only)

    def parameters(self):
        return []

    def epoch_start(self, epoch, backbone):
        pass

    def before_step(self, step, steps):
        """Called before each of the epoch's `steps` training steps."""

    def identify(self, maps):
        return None


class QAConvGSMethod(Method):
    def __init__(
        self,
        torch,
        N,
        k,
        seed,
        init="imprint",
        k_mined=0,
        k_batch=0,
        triplet="class",
        sampler="random",
        tw=0.5,
        margin=1.0,
        fc="separate",
        refresh=1,
        weighted_extras=False,
        neighbors_by="cosine",
        group=None,
    ):
        from qaconv_gs.torch import QAConvGSLoss

        self.k, self.sampler, self.refresh, self.group = k, sampler, refresh, group
        self.crit = QAConvGSLoss(
            N,
            FEAT_C,
            FEAT_HW,
            FEAT_HW,
            k_nearest=k,
            seed=seed,
            init=init,
            k_mined=k_mined,
            k_batch=k_batch,
            weighted_extras=weighted_extras,
            neighbors_by=neighbors_by,
            triplet=triplet,
            triplet_weight=tw,
            margin=margin,
            fc=fc,
        )
        mined = self.crit._core.mined_per_sample
        extra = self.crit._core.batch_per_sample
        self.name = (
            f"qaconv-gs k={'N-1' if k == N - 1 else k}"
            + (f"+{extra} batch{' weighted' if weighted_extras else ''}" if extra else "")
            + (f"+{mined} mined" if mined else "")
        )
        extras = [
            x
            for x, default in (
                (init, "imprint"),
                (triplet, "class"),
                (sampler, "random"),
                (fc, "separate"),
                (neighbors_by, "cosine"),
            )
            if x != default
        ]
        extras += [
            f"{n}={v:g}"
            for n, v, d in (
                ("w", tw, 0.5),
                ("margin", margin, 1.0),
                ("refresh", refresh, 1),
                ("group", group, None),
            )
            if v != d
        ]
        if extras:
            self.name += f" ({', '.join(extras)})"
        # the k-sweep plot takes the rows of the default configuration only
        self.sweep = {
            "k": k,
            "k_mined": mined,
            "default_config": not extras and not mined and not extra,
            "config": ", ".join(extras)
            + (f", {mined} mined" if mined else "")
            + (f", {extra} batch" if extra else "")
            + (", weighted" if extra and weighted_extras else ""),
        }

    def parameters(self):
        return list(self.crit.parameters())

    def epoch_start(self, epoch, backbone):
        self.crit.on_epoch_start()

    def before_step(self, step, steps):
        # refresh=R: the neighbour table is also rebuilt R - 1 times inside the epoch
        if step and self.refresh > 1 and step % max(1, steps // self.refresh) == 0:
            self.crit.on_epoch_start()

    def loss(self, maps, labels):
        return self.crit(maps, labels)

    def identify(self, maps):
        ids, _ = self.crit.identify(maps, top=1)
        return np.asarray(ids)[:, 0]

    def retrieve(self, probe, gallery):
        return np.asarray(self.crit.match(probe, gallery))


class PooledMethod(Method):
    """softmax (s=None) or CosFace (s, m) on global-average-pooled maps."""

    def __init__(self, torch, N, seed, s=None, m=0.0):
        self.torch, self.s, self.m = torch, s, m
        self.name = "softmax" if s is None else f"cosface s={s:g} m={m:g}"
        torch.manual_seed(seed + 1)
        self.fc = torch.nn.Linear(FEAT_C, N, bias=s is None)

    def parameters(self):
        return list(self.fc.parameters())

    def _logits(self, maps):
        F = self.torch.nn.functional
        f = maps.mean(dim=(2, 3))
        if self.s is None:
            return self.fc(f)
        return F.linear(F.normalize(f), F.normalize(self.fc.weight))

    def loss(self, maps, labels):
        logits = self._logits(maps)
        if self.s is not None:
            onehot = self.torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
            logits = self.s * (logits - self.m * onehot)
        return self.torch.nn.functional.cross_entropy(logits, labels)

    def identify(self, maps):
        with self.torch.no_grad():
            return self._logits(self.torch.from_numpy(maps)).argmax(1).numpy()

    def retrieve(self, probe, gallery):
        p = probe.mean(axis=(2, 3))
        g = gallery.mean(axis=(2, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True) + 1e-12
        g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-12
        return p @ g.T


class QAConv21Method(Method):
    """QAConv 2.1: in-batch QAConv scores, shared fc head, batch-hard triplet (margin 16), graph sampling."""

    name = "qaconv2.1"

    def __init__(self, torch, N, seed, margin=16.0):
        nn = torch.nn
        self.torch, self.margin = torch, margin
        S = FEAT_HW * FEAT_HW
        torch.manual_seed(seed + 2)
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(S, 1)
        with torch.no_grad():
            self.fc.weight.fill_(1.0 / S)
        self.logit_bn = nn.BatchNorm1d(1)
        self.modules = [self.bn, self.fc, self.logit_bn]

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]

    def _scores(self, maps):
        torch = self.torch
        B, C = maps.shape[:2]
        x = torch.nn.functional.normalize(maps.reshape(B, C, -1), dim=1)
        z = torch.einsum("bcs,dcr->bdsr", x, x)
        mp, mg = z.max(dim=3)[0], z.max(dim=2)[0]  # [B, B, S] each
        S = mp.shape[-1]
        v = self.bn(torch.stack([mp, mg]).reshape(-1, 1)).reshape(2, B * B, S)
        logit = self.fc(v[0]) + self.fc(v[1])
        return self.logit_bn(logit).reshape(B, B)

    def loss(self, maps, labels):
        torch = self.torch
        s = self._scores(maps)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool)
        pos = s.masked_fill(~same | eye, float("inf")).min(1)[0]
        neg = s.masked_fill(same, float("-inf")).max(1)[0]
        ok = torch.isfinite(pos) & torch.isfinite(neg)
        return torch.relu(self.margin - pos[ok] + neg[ok]).mean()

    def retrieve(self, probe, gallery):
        import qaconv_gs as qg

        head = {
            "bn.weight": self.bn.weight,
            "bn.bias": self.bn.bias,
            "bn.running_mean": self.bn.running_mean,
            "bn.running_var": self.bn.running_var,
            "fc.weight": self.fc.weight,
            "fc.bias": self.fc.bias,
            "logit_bn.weight": self.logit_bn.weight,
            "logit_bn.bias": self.logit_bn.bias,
            "logit_bn.running_mean": self.logit_bn.running_mean,
            "logit_bn.running_var": self.logit_bn.running_var,
        }
        return qg.match(probe, gallery, head)

    def train(self, mode):
        for m in self.modules:
            m.train(mode)


def maps_of(torch, backbone, x, bs=2048):
    backbone.eval()
    with torch.no_grad():
        out = [backbone(torch.from_numpy(x[i : i + bs])).numpy() for i in range(0, len(x), bs)]
    backbone.train()
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def sgd_cosine(torch, params: list, lr: float, total_steps: int) -> tuple:
    """Every method's optimiser: SGD (momentum 0.9, Nesterov, weight decay 5e-4) and a cosine learning
    rate over `total_steps` steps (call the scheduler's step() after each optimiser step)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps)))
    return opt, sched


def run_method(torch, method, data, args, seed):
    """Train backbone + method for args.epochs; returns the metrics row."""
    import qaconv_gs as qg

    x_tr, y_tr, x_probe, y_probe, x_gal = data
    N = int(y_tr.max()) + 1
    backbone = build_cnn(torch, seed)
    bs = 64
    steps_per_epoch = len(y_tr) // bs
    opt, sched = sgd_cosine(torch, list(backbone.parameters()) + method.parameters(), args.lr,
                            steps_per_epoch * args.epochs)  # fmt: skip
    rng = np.random.default_rng(seed)
    loss_time = 0.0
    epoch_times, losses = [], []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        method.epoch_start(epoch, backbone)
        if isinstance(method, QAConv21Method):
            batches = graph_batches(torch, backbone, x_tr, y_tr, N, bs, steps_per_epoch, seed + epoch)
            method.train(True)
        elif method.sampler == "graph":
            # QAConv-GS's own graph sampling: a centre class and its nearest classes by the class embeddings;
            # with group=g, 32 / g centres per batch, each with its g - 1 nearest classes. Before the first
            # epoch no row is imprinted (the table is meaningless), so grouped batches start as P x K.
            nbr = method.crit.class_neighbors if epoch or method.group is None else None
            sampler = qg.GraphSampler(
                y_tr,
                batch_size=bs,
                num_instances=2,
                neighbors=nbr,
                seed=seed + epoch,
                group_size=method.group,
            )
            # a grouped epoch of the sampler is shorter than the benchmark's: its passes follow each other
            passes = itertools.chain.from_iterable(iter(sampler) for _ in itertools.count())
            batches = list(itertools.islice(passes, steps_per_epoch))
        elif method.sampler == "pk":
            # P random classes x 2 instances (batch-hard triplets need positives in the batch): the
            # package's sampler without a neighbour table
            sampler = qg.GraphSampler(y_tr, batch_size=bs, num_instances=2, neighbors=None, seed=seed + epoch)
            batches = [idx for _, idx in zip(range(steps_per_epoch), sampler)]
        else:
            order = rng.permutation(len(y_tr))
            batches = [order[i * bs : (i + 1) * bs] for i in range(steps_per_epoch)]
        run = 0.0
        for step, idx in enumerate(batches):
            method.before_step(step, len(batches))
            xb = torch.from_numpy(x_tr[idx])
            yb = torch.from_numpy(y_tr[idx])
            maps = backbone(xb)
            tl = time.perf_counter()
            feats = maps.detach().requires_grad_()
            loss = method.loss(feats, yb)
            loss.backward()
            loss_time += time.perf_counter() - tl
            maps.backward(feats.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            run += float(loss.detach())
        losses.append(run / len(batches))
        epoch_times.append(time.perf_counter() - t0)
        print(
            f"  {method.name}: epoch {epoch + 1} loss {losses[-1]:.4f} ({epoch_times[-1]:.0f} s)", flush=True
        )
    if isinstance(method, QAConv21Method):
        method.train(False)
    probe_maps = maps_of(torch, backbone, x_probe)
    gal_maps = maps_of(torch, backbone, x_gal)
    ids = method.identify(probe_maps)
    scores = np.asarray(method.retrieve(probe_maps, gal_maps))
    row = {
        "method": method.name,
        "identification": None if ids is None else float((ids == y_probe).mean()),
        "retrieval": float((scores.argmax(1) == y_probe).mean()),
        "loss_step_ms": 1e3 * loss_time / (steps_per_epoch * args.epochs),
        "epoch_s": float(np.mean(epoch_times)),
        "final_loss": losses[-1],
    }
    del qg
    return row


def graph_batches(torch, backbone, x_tr, y_tr, N, bs, steps, seed):
    """QAConv-GS graph sampling with the backbone's current features: one random sample per class, its
    pooled map, the cosine nearest classes; batches of a centre class and its neighbours, 2 instances each."""
    import qaconv_gs as qg

    rng = np.random.default_rng(seed)
    first = np.array([rng.choice(np.flatnonzero(y_tr == c)) for c in range(N)])
    pooled = maps_of(torch, backbone, x_tr[first]).mean(axis=(2, 3))
    nbr = qg.class_neighbors(pooled[:, :, None, None], k=min(N - 1, bs // 2))
    sampler = qg.GraphSampler(y_tr, batch_size=bs, num_instances=2, neighbors=nbr, seed=seed)
    out = []
    for idx in sampler:
        out.append(idx)
        if len(out) == steps:
            break
    return out


# --variants keys besides k -> (QAConvGSMethod argument, parser of the value); a key left out keeps the
# method's default
VARIANT_ARGS = {
    "init": ("init", str),
    "mined": ("k_mined", int),
    "batch": ("k_batch", int),
    "wx": ("weighted_extras", lambda v: v == "1"),
    "nb": ("neighbors_by", str),
    "triplet": ("triplet", str),
    "sampler": ("sampler", str),
    "tw": ("tw", float),
    "margin": ("margin", float),
    "fc": ("fc", str),
    "refresh": ("refresh", int),
    "group": ("group", int),
}


def parse_variant(spec: str) -> dict:
    """One --variants entry, "key=value,..." (keys in the module docstring), as a dict."""
    kw = dict(kv.split("=", 1) for kv in spec.split(","))
    unknown = set(kw) - set(VARIANT_ARGS) - {"k"}
    if unknown:
        raise SystemExit(f"--variants: unknown keys {sorted(unknown)} in {spec!r}")
    return kw


def method_from_variant(torch, N: int, kw: dict, seed: int) -> QAConvGSMethod:
    """The qaconv-gs method of one parsed --variants entry (k defaults to 32)."""
    k = N - 1 if kw.get("k", "32") == "N-1" else int(kw.get("k", "32"))
    args = {name: parse(kw[key]) for key, (name, parse) in VARIANT_ARGS.items() if key in kw}
    return QAConvGSMethod(torch, N, k, seed, **args)


def load_data(num_classes: int, seed: int):
    from qaconv_gs.glyphs import font_glyphs, glyph_split

    g = font_glyphs(num_classes, seed=seed)
    sp = glyph_split(g)
    x_tr, y_tr, _ = g.samples(sp.train)
    x_probe, y_probe, _ = g.samples(sp.probes)
    x_gal, _, _ = g.samples([sp.gallery])
    return g, sp, (x_tr, y_tr, x_probe, y_probe, x_gal)


def short_name(method: str) -> str:
    """A method's name for tick labels: the batch-triplet recipe's arguments spelt out are unreadable."""
    name = method.replace("batch, pk, shared, ", "P x K, ").replace("batch, graph, shared, ", "graph, ")
    # the recipe's margin is always 16; its triplet weight is 1 (w=1) or the default 0.5
    return name.replace(", w=1, margin=16", ", tw=1").replace(", margin=16", ", tw=0.5")


def plot(rows, N, path_prefix):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = [short_name(r["method"]) for r in rows]
    xs = np.arange(len(rows))
    ident = [r["identification"] or 0.0 for r in rows]
    retr = [r["retrieval"] for r in rows]
    ax.bar(xs - 0.2, ident, 0.4, label="identification (top-1 of N classes)")
    ax.bar(xs + 0.2, retr, 0.4, label="retrieval (top-1 of N gallery glyphs)")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out fonts, top-1")
    ax.set_title(f"Hangul glyphs, N = {N} classes, held-out font families", fontsize=10)
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    p = OUT_DIR / f"{path_prefix}.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    krows = [r for r in rows if r.get("default_config")]
    if len(krows) >= 2:
        kv = [r["k"] for r in krows]
        order = np.argsort(kv)
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        kk = [kv[i] for i in order]
        ax[0].plot(kk, [krows[i]["identification"] for i in order], "o-", label="identification")
        ax[0].plot(kk, [krows[i]["retrieval"] for i in order], "s-", label="retrieval")
        ax[0].set_xscale("log")
        ax[0].set_xlabel("k (candidate classes per sample - 1)")
        ax[0].set_ylabel("held-out top-1")
        ax[0].legend(fontsize=8)
        ax[1].plot(kk, [krows[i]["loss_step_ms"] for i in order], "o-", label="loss step")
        ax[1].plot(kk, [1e3 * krows[i]["epoch_s"] for i in order], "s-", label="whole epoch, CNN included")
        ax[1].set_xscale("log")
        ax[1].set_yscale("log")
        ax[1].set_xlabel("k")
        ax[1].set_ylabel("ms")
        ax[1].legend(fontsize=8)
        fig.suptitle(f"qaconv-gs: accuracy and time against k (N = {N})", fontsize=10)
        fig.tight_layout()
        p = OUT_DIR / f"{path_prefix}_k.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def twins(rows: list, N: int) -> list:
    """(restricted row, its full-scoring twin) pairs among `rows`: the full row of the same configuration;
    refresh rates, batch and mined extras, their weighting and the neighbour metric mean nothing to full
    scoring, so such rows pair with the full row without them."""
    fulls = {r["config"]: r for r in rows if r.get("k") == N - 1}
    pairs = []
    for r in rows:
        if "config" not in r or r["k"] >= N - 1:
            continue
        cfg = ", ".join(
            x
            for x in r["config"].split(", ")
            if x
            and not x.startswith("refresh=")
            and not x.endswith((" batch", " mined"))
            and x not in ("weighted", "aligned")
        )
        f = fulls.get(r["config"]) or fulls.get(cfg)
        if f is not None:
            pairs.append((r, f))
    return pairs


def report(rows: list, N: int) -> None:
    """The table of `rows` and each restricted row against its full-scoring twin."""
    print()
    print("| method | identification | retrieval | loss step (ms) | epoch (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ident = "-" if r["identification"] is None else f"{r['identification']:.3f}"
        print(
            f"| {r['method']} | {ident} | {r['retrieval']:.3f} | {r['loss_step_ms']:.1f} "
            f"| {r['epoch_s']:.0f} |"
        )
    lines = []
    for r, f in twins(rows, N):
        ident = r["identification"] / f["identification"]
        retr = r["retrieval"] / f["retrieval"]
        step = f["loss_step_ms"] / r["loss_step_ms"]
        epoch = f["epoch_s"] / r["epoch_s"]
        lines.append(
            f"{r['method']} vs {f['method']}: identification {ident:.3f}x, retrieval {retr:.3f}x, "
            f"loss step {step:.1f}x less time, epoch {epoch:.1f}x less time"
        )
    if lines:
        print()
        print("\n".join(lines))


def main(argv=None) -> int:
    # no abbreviations: --jobs children get this command line back without --seeds / --jobs / --seed
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--classes", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument(
        "--ks", default="8,32,128,512,N-1", help="comma-separated k values for qaconv-gs (N-1 = full)"
    )
    ap.add_argument("--cosface", default="16:0.1,32:0.2,64:0.35", help="s:m pairs, comma-separated")
    ap.add_argument("--methods", default="qaconv-gs,softmax,cosface,qaconv2.1")
    ap.add_argument(
        "--variants",
        default="",
        help="more qaconv-gs runs, ';'-separated, e.g. 'k=32,batch=32,wx=1,triplet=batch,sampler=pk' "
        "(keys: see the module docstring)",
    )
    ap.add_argument("--random-init", action="store_true", help="also run qaconv-gs k=32 with init='random'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, run one after the other (overrides --seed): one JSON per seed and the "
        "summary over seeds that --merge prints",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --seeds: run up to this many seeds at once, each in its own process with --threads "
        "threads (its log and JSON under QG_BENCH_OUT/seedS/); the results are those of one-by-one runs",
    )
    ap.add_argument("--quick", action="store_true", help="300 classes, 2 epochs")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: report and plot the rows of earlier runs' bench_learning.json files together "
        "(runs of the same classes and epochs, e.g. run side by side as separate processes); runs of several "
        "seeds also get each method per seed, its mean, and the ratios and margins per seed",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    if args.quick:
        args.classes, args.epochs = 300, 2
    import torch

    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    seeds = [args.seed] if args.seeds is None else [int(v) for v in args.seeds.split(",")]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: a seed is listed twice: {args.seeds}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs: expected >= 1, got {args.jobs}")
    if args.jobs > 1 and len(seeds) > 1:
        return run_seeds_in_processes(args, seeds, argv)
    payloads = []
    for seed in seeds:
        payloads.append(run_seed(torch, args, seed))
        # one file per seed as soon as it is done (--merge reads them back); bench_learning.json last
        name = "bench_learning" if len(seeds) == 1 else f"bench_learning_seed{seed}"
        print(f"wrote {write_json(name, payloads[-1])}")
    if len(seeds) > 1:
        return merge_runs(payloads, [f"seed {s}" for s in seeds])
    rows, N = payloads[0]["rows"], payloads[0]["classes"]
    for p in plot(rows, N, "bench_learning"):
        print(f"wrote {p}")
    return 0


def child_argv(argv: list) -> list:
    """The command line of a --jobs child: this run's options without --seeds / --jobs / --seed (the child
    gets its own --seed), so every option reaches the child as it was given."""
    out, drop = [], ("--seeds", "--jobs", "--seed")
    it = iter(argv)
    for a in it:
        if a in drop:
            next(it, None)  # its value
        elif not a.startswith(tuple(d + "=" for d in drop)):
            out.append(a)
    return out


def run_seeds_in_processes(args, seeds: list, argv=None) -> int:
    """--seeds with --jobs J > 1: each seed is a child run of this script (--seed S, the same options) in
    its own process, at most J at a time; then the summary over seeds, as one-by-one runs end. A seed's run
    depends only on its options and seed, so its numbers are those of a one-by-one run."""
    import json
    import os
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import qaconv_gs

    common = child_argv(sys.argv[1:] if argv is None else list(argv))
    pkg = str(Path(qaconv_gs.__file__).resolve().parents[1])  # the qaconv_gs this process imported

    def child(seed: int) -> tuple[int, Path]:
        out = OUT_DIR / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, QG_BENCH_OUT=str(out), OMP_NUM_THREADS=str(args.threads))
        env["PYTHONPATH"] = os.pathsep.join([pkg, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with open(out / "bench_learning.log", "w") as log:
            cmd = [sys.executable, str(Path(__file__).resolve()), *common, "--seed", str(seed)]
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        state = "done" if rc == 0 else f"FAILED (exit {rc})"
        print(f"seed {seed}: {state}, log {out / 'bench_learning.log'}", flush=True)
        return rc, out

    print(f"bench_learning: seeds {seeds}, {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(child, seeds))
    failed = [s for s, (rc, _) in zip(seeds, done) if rc != 0]
    if failed:
        raise SystemExit(f"--jobs: the runs of seeds {failed} failed (see their logs above)")
    payloads = []
    for seed, (_, out) in zip(seeds, done):
        payloads.append(json.loads((out / "bench_learning.json").read_text()))
        print(f"wrote {write_json(f'bench_learning_seed{seed}', payloads[-1])}")
    return merge_runs(payloads, [f"seed {s}" for s in seeds])


def run_seed(torch, args, seed: int) -> dict:
    """Every method of `args` on the data and CNN start of `seed`: prints its table, returns the payload
    (what bench_learning.json holds)."""
    g, sp, data = load_data(args.classes, seed)
    N = g.num_classes
    print(
        f"bench_learning: {N} classes, {len(sp.train)} training fonts, {len(sp.probes)} probe fonts, "
        f"gallery {g.fonts[sp.gallery]}; {args.epochs} epochs, lr {args.lr}, seed {seed}",
        flush=True,
    )
    methods = set(args.methods.split(","))
    todo = []
    if "qaconv-gs" in methods:
        # k values past N - 1 are full scoring: each k runs once (--quick's 300 classes clamp 512 to N-1)
        ks = {N - 1 if k.strip() == "N-1" else min(int(k), N - 1): None for k in args.ks.split(",")}
        for kk in ks:
            todo.append(lambda kk=kk: QAConvGSMethod(torch, N, kk, seed, "imprint"))
        if args.random_init:
            todo.append(lambda: QAConvGSMethod(torch, N, min(32, N - 1), seed, "random"))
    if "softmax" in methods:
        todo.append(lambda: PooledMethod(torch, N, seed))
    if "cosface" in methods:
        for sm in args.cosface.split(","):
            s, m = (float(v) for v in sm.split(":"))
            todo.append(lambda s=s, m=m: PooledMethod(torch, N, seed, s, m))
    if "qaconv2.1" in methods:
        todo.append(lambda: QAConv21Method(torch, N, seed))
    for spec in args.variants.split(";") if args.variants else []:
        kw = parse_variant(spec)
        todo.append(lambda kw=kw: method_from_variant(torch, N, kw, seed))
    rows = []
    for make in todo:
        method = make()
        print(f"- {method.name}", flush=True)
        rows.append(run_method(torch, method, data, args, seed))
        r = rows[-1]
        r.update(method.sweep)
        ident = "-" if r["identification"] is None else f"{r['identification']:.3f}"
        print(
            f"  -> identification {ident}, retrieval {r['retrieval']:.3f}, "
            f"loss step {r['loss_step_ms']:.1f} ms"
        )
    report(rows, N)
    return {
        "machine": machine_info(),
        "classes": N,
        "seed": seed,
        "train_fonts": [g.fonts[i] for i in sp.train],
        "probe_fonts": [g.fonts[i] for i in sp.probes],
        "gallery_font": g.fonts[sp.gallery],
        "epochs": args.epochs,
        "lr": args.lr,
        "rows": rows,
    }


BASELINES = ("softmax", "cosface", "qaconv2.1")


def is_baseline(method: str) -> bool:
    return method.split(" ")[0] in BASELINES


# two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); the normal's 1.960 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """95 % confidence interval of the mean of `values` (>= 2 of them; Student's t, independent seeds)."""
    n = len(values)
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.960) * np.std(values, ddof=1) / math.sqrt(n)
    return float(np.mean(values) - half), float(np.mean(values) + half)


def seed_cells(by_seed: dict) -> tuple:
    """(sorted seeds, methods in first-seen order, {(seed, method): row}, methods run on >= 2 seeds)."""
    seeds = sorted(by_seed)
    methods = list(dict.fromkeys(r["method"] for s in seeds for r in by_seed[s]))
    cell = {(s, r["method"]): r for s in seeds for r in by_seed[s]}
    several = [m for m in methods if sum((s, m) in cell for s in seeds) >= 2]
    return seeds, methods, cell, several


def seed_summary(by_seed: dict, N: int) -> None:
    """Rows of several seeds (seed -> rows): each method per seed and its mean, each restricted row's
    ratio to its full twin per seed, and qaconv-gs retrieval against the best baseline of the same seed
    (the best CosFace of each seed picked by its retrieval on the held-out fonts, which favours CosFace)."""
    seeds, methods, cell, several = seed_cells(by_seed)

    def fmt(r):
        ident = "-" if r["identification"] is None else f"{r['identification']:.3f}"
        return f"{ident} / {r['retrieval']:.3f}"

    print()
    print(f"identification / retrieval by seed ({len(seeds)} seeds, N = {N})")
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (seeds) |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for m in methods:
        got = [cell[s, m] for s in seeds if (s, m) in cell]
        ids = [r["identification"] for r in got if r["identification"] is not None]
        mean = (f"{np.mean(ids):.3f}" if ids else "-") + f" / {np.mean([r['retrieval'] for r in got]):.3f}"
        cells = [fmt(cell[s, m]) if (s, m) in cell else "" for s in seeds]
        print(f"| {m} | " + " | ".join(cells) + f" | {mean} ({len(got)}) |")
    # the ratio and margin lines are for methods run on two seeds or more (one seed's are in its table)
    ratios: dict = {}
    for s in seeds:
        for r, f in twins(by_seed[s], N):
            if r["method"] not in several or f["method"] not in several:
                continue
            ratios.setdefault((r["method"], f["method"]), []).append(
                (s, r["identification"] / f["identification"], r["retrieval"] / f["retrieval"])
            )
    if ratios:
        print()
        print(
            "restricted / full twin, same seed (methods run on two seeds or more): identification, retrieval"
        )
        for (m, fm), rs in ratios.items():
            print(f"- {m} vs {fm}: {ratio_summary(rs)}")
    best_full = best_full_ratios(by_seed, N, several)
    if best_full:
        print()
        print(
            "restricted / the best full-scoring run of the same seed, per measure (any recipe: the strictest "
            "reference the seed has): identification, retrieval"
        )
        for m, rs in best_full.items():
            print(f"- {m}: {ratio_summary(rs)}")
    lines = []
    for m in methods:
        if is_baseline(m) or m not in several:
            continue
        margins = []
        for s in seeds:
            base = [r for r in by_seed[s] if is_baseline(r["method"])]
            if (s, m) not in cell or not base:
                continue
            best = max(base, key=lambda r: r["retrieval"])
            margins.append((s, cell[s, m]["retrieval"] - best["retrieval"], best["method"]))
        if margins:
            wins = sum(d > 0 for _, d, _ in margins)
            per = ", ".join(f"seed {s} {d:+.3f} ({b})" for s, d, b in margins)
            d = np.array([d for _, d, _ in margins])
            spread = ""
            if d.size > 1:
                lo, hi = t_interval(d)
                spread = f" (95 % t-interval [{lo:+.3f}, {hi:+.3f}])"
            lines.append(
                f"- {m}: above the best baseline on {wins} of {len(margins)} seeds, mean margin "
                f"{d.mean():+.3f}{spread}: {per}"
            )
    if lines:
        print()
        print(
            "retrieval minus the best baseline's (softmax, CosFace, QAConv 2.1) of the same seed (methods "
            "run on two seeds or more)"
        )
        print("\n".join(lines))


def ratio_summary(rs: list) -> str:
    """Per-seed (seed, identification ratio, retrieval ratio) as one line: each seed, the mean, and over two
    seeds or more the 95 % t-interval of the mean and how many seeds reach 0.99x."""
    per = ", ".join(f"seed {s} {i:.3f}x / {t:.3f}x" for s, i, t in rs)
    ri, rt = np.array([i for _, i, _ in rs]), np.array([t for _, _, t in rs])
    spread = ""
    if len(rs) > 1:
        lo_i, hi_i = t_interval(ri)
        lo_t, hi_t = t_interval(rt)
        spread = (
            f" (95 % t-interval of the mean [{lo_i:.3f}, {hi_i:.3f}] / [{lo_t:.3f}, {hi_t:.3f}]; "
            f"{int((ri >= 0.99).sum())} / {int((rt >= 0.99).sum())} of {len(rs)} seeds >= 0.99x)"
        )
    return f"{per}; mean {ri.mean():.3f}x / {rt.mean():.3f}x{spread}"


def best_full_ratios(by_seed: dict, N: int, several: list) -> dict:
    """{restricted method: [(seed, identification ratio, retrieval ratio)]}: each restricted qaconv-gs row
    run on two seeds or more against the best full-scoring (k = N-1) row of its seed, identification and
    retrieval each against the best full row for that measure."""
    out: dict = {}
    for s in sorted(by_seed):
        fulls = [r for r in by_seed[s] if r.get("k") == N - 1]
        if not fulls:
            continue
        fi = max(r["identification"] for r in fulls)
        ft = max(r["retrieval"] for r in fulls)
        for r in by_seed[s]:
            if r.get("k") is None or r["k"] >= N - 1 or r["method"] not in several:
                continue
            out.setdefault(r["method"], []).append((s, r["identification"] / fi, r["retrieval"] / ft))
    return out


def plot_seeds(by_seed: dict, path_prefix: str) -> list:
    """One panel per measure: each method's value on each seed (dots) and its mean (bar); methods
    present on at least two seeds only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    seeds, _, cell, methods = seed_cells(by_seed)
    if not methods:
        return []
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # methods run on fewer seeds say so: their mean is over those seeds only
    names = [
        short_name(m).replace("qaconv-gs ", "") + f" ({sum((s, m) in cell for s in seeds)})" for m in methods
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key in zip(axes, ("identification", "retrieval")):
        for i, m in enumerate(methods):
            vals = [cell[s, m][key] for s in seeds if (s, m) in cell and cell[s, m][key] is not None]
            if not vals:
                continue
            ax.bar(i, np.mean(vals), 0.6, color="C7" if is_baseline(m) else "C0", alpha=0.5)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(np.arange(len(methods)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{key}: mean of seeds (bar), each seed (dot); (n) = seeds run", fontsize=9)
        ax.set_ylim(0.5, 0.75)
    axes[0].set_ylabel("held-out fonts, top-1")
    fig.suptitle(f"Hangul glyphs, seeds {', '.join(map(str, seeds))}", fontsize=10)
    fig.tight_layout()
    p = OUT_DIR / f"{path_prefix}_seeds.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p]


def merge(paths: list) -> int:
    """--merge: the runs of these bench_learning JSON files reported together (see merge_runs)."""
    import json

    return merge_runs([json.loads(Path(p).read_text()) for p in paths], [str(p) for p in paths])


def merge_runs(runs: list, names: list) -> int:
    """Report and plot the rows of several runs together (payloads of run_seed; `names` label them);
    runs of several seeds also get the per-seed summary (``seed_summary``)."""
    keys = {(r["classes"], r["epochs"], r["lr"], tuple(r["probe_fonts"])) for r in runs}
    if len(keys) != 1:
        raise SystemExit(f"--merge: the runs differ in classes / epochs / lr / fonts: {sorted(keys)}")
    unseeded = [p for r, p in zip(runs, names) if "seed" not in r]
    if unseeded:
        raise SystemExit(f"--merge: these runs record no seed (older than the seed field): {unseeded}")
    N = runs[0]["classes"]
    by_seed: dict = {}
    for r, p in zip(runs, names):
        m = r["machine"]
        print(
            f"{p}: seed {r['seed']}, {len(r['rows'])} rows, {m['date']}, {m['cpu']}, "
            f"load {m.get('load_average')}"
        )
        by_seed.setdefault(r["seed"], []).extend(r["rows"])
    for s in sorted(by_seed):
        seen = [row["method"] for row in by_seed[s]]
        dup = sorted({x for x in seen if seen.count(x) > 1})
        if dup:
            raise SystemExit(f"--merge: seed {s} has these methods more than once: {dup}")
    first = min(by_seed)
    if len(by_seed) > 1:
        print(f"\nseed {first}:")
    rows = by_seed[first]
    report(rows, N)
    if len(by_seed) > 1:
        seed_summary(by_seed, N)
    payload = {**runs[0], "seed": first, "rows": rows, "merged_from": [r["machine"] for r in runs]}
    if len(by_seed) > 1:
        payload["rows_by_seed"] = {str(s): by_seed[s] for s in sorted(by_seed)}
    out = write_json("bench_learning", payload)
    for p in plot(rows, N, "bench_learning") + plot_seeds(by_seed, "bench_learning"):
        print(f"wrote {p}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
