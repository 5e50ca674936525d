"""QAConvGS: class-embedding QAConv with neighbour-restricted scoring, as one NumPy-facing object.

The model owns the learnable state (class embeddings [N, C, H, W] and the BN -> fc -> BN head) and
composes the C kernels into one training step (`forward_backward`): it returns the loss, the
accuracies and every gradient, and never changes a parameter (an optimiser such as
`qaconv_gs.Trainer` or `torch.optim` does that). Evaluation (`match`, `match_pairs`, `identify`)
uses the head in eval mode (running statistics).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import _native
from . import evaluate as _evaluate
from . import head as _head
from . import matching as _matching
from . import neighbors as _neighbors
from ._contract import (
    ARCH_KEYS,
    CONFIG_KEYS,
    HEAD_PARAM_KEYS,
    IMPRINT_AT_EXTRA_KEY,
    IMPRINT_EXTRA_KEY,
    NBR_EXTRA_KEY,
    ModelBase,
    ModelConfig,
    check_config,
    check_options,
    kept_entries,
    saved_refresh_count,
)
from ._validate import as_float32, as_labels, check_int, resolve_threads, shape_str

__all__ = ["IncompatibleKeys", "QAConvGS", "StepResult"]

_HEAD_PARAM_KEYS = HEAD_PARAM_KEYS  # (torch.py's name)
_STATE_KEYS = (
    "class_embed",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
    "fc.weight",
    "fc.bias",
    "logit_bn.weight",
    "logit_bn.bias",
    "logit_bn.running_mean",
    "logit_bn.running_var",
    "logit_bn.num_batches_tracked",
)
_RUNNING_KEYS = tuple(k for k in _STATE_KEYS if "running" in k or "num_batches" in k)
_NBR_EXTRA_KEY = NBR_EXTRA_KEY  # save() stores the current neighbour table under this extra key
_IDENTIFY_BLOCK = 1024  # classes scored per block in identify(): memory O(B * (top + block))
_PAIRS_BLOCK = 4096  # aligned pairs per block in match_pairs()
# An imprinted location whose mean direction vanishes (e.g. a ReLU backbone that is zero there for every
# sample) would be a zero-norm location, whose normalisation gradient is 1/eps: it gets this small
# constant direction instead.
_IMPRINT_FLOOR = 1e-3
_IMPRINT_REFRESH_MIN = 64  # fewest imprinted classes that trigger a mid-epoch neighbour refresh
_IMPRINT_EXTRA_KEY = IMPRINT_EXTRA_KEY
_IMPRINT_AT_EXTRA_KEY = IMPRINT_AT_EXTRA_KEY
_MINE_BLOCK = 4096  # classes per block of the per-sample mining product


def imprint_rows(
    embed: np.ndarray,
    counts: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    imprint_samples: int,
    *,
    only_unset: bool,
    lo: int = 0,
) -> np.ndarray:
    """Weight imprinting in place: row y - lo of embed [n, C, H, W] (float32) moves to the mean over the
    samples of class y of their location-normalised maps X [B, C, H, W] (float64 arithmetic), blended as a
    running mean with the counts[n] samples it averaged before. only_unset: only rows with fewer than
    imprint_samples samples, as the training step does; else the rows are replaced and count as fully
    imprinted. Returns the sorted global ids written. The maths of QAConvGS.imprint, shared with the
    sharded model (which passes its own rows, counts and first class id `lo`): the same bits either way."""
    ids, inv = np.unique(y, return_inverse=True)
    loc = ids - lo
    if only_unset:
        unset = counts[loc] < imprint_samples
        if not unset.any():
            return ids[:0]
    else:
        unset = np.ones(ids.size, dtype=bool)
        counts[loc] = 0  # an explicit call replaces the rows
    C = embed.shape[1]
    S = int(np.prod(embed.shape[2:], dtype=np.int64))
    x = X.reshape(-1, C, S).astype(np.float64)
    x /= np.maximum(np.sqrt(np.einsum("bcs,bcs->bs", x, x)), 1e-12)[:, None, :]
    sums = np.zeros((ids.size, C, S), dtype=np.float64)
    np.add.at(sums, inv, x)
    mean = sums / np.bincount(inv, minlength=ids.size)[:, None, None]
    weak = np.sqrt(np.einsum("rcs,rcs->rs", mean, mean)) < _IMPRINT_FLOOR
    if weak.any():
        mean.transpose(0, 2, 1)[weak] = _IMPRINT_FLOOR / math.sqrt(C)
    write = loc[unset]
    cnt = np.bincount(inv, minlength=ids.size)[unset]
    old = counts[write].astype(np.float64)
    a = (cnt / (old + cnt))[:, None, None, None]
    new = mean[unset].reshape((write.size,) + embed.shape[1:])
    embed[write] = (embed[write] * (1 - a) + new * a).astype(np.float32)
    counts[write] += cnt
    if not only_unset:
        counts[write] = np.maximum(counts[write], imprint_samples)
    return ids[unset]


@dataclass(repr=False)
class StepResult:
    """Everything one training step produces (no parameter is changed by computing it).

    Attributes:
        loss, loss_cls, loss_triplet, acc_cls, acc_triplet: floats (loss = loss_cls + w * loss_triplet).
        scores: [B, K] float32 restricted training-mode scores, K = the model's num_candidates
            (k_nearest + 1, plus any k_batch / k_mined extras), target in column 0.
        candidates: [B, K] int64 class ids scored per sample (target first, then its neighbours, then
            the extras).
        grad_features: [B, C, H, W] float32 dloss/dfeatures.
        grad_embed_ids: [R] int64 sorted unique class ids that received a gradient (alias `embed_rows`).
        grad_embed_rows: [R, C, H, W] float32 dloss/dclass_embed[grad_embed_ids]; every other row is 0.
        grad_head: dict keyed like the state_dict (bn.weight, bn.bias, fc.weight, fc.bias,
            logit_bn.weight, logit_bn.bias), float32, same shapes as the parameters.
    """

    loss: float
    loss_cls: float
    loss_triplet: float
    acc_cls: float
    acc_triplet: float
    scores: np.ndarray
    candidates: np.ndarray
    grad_features: np.ndarray
    grad_embed_ids: np.ndarray
    grad_embed_rows: np.ndarray
    grad_head: dict = field(default_factory=dict)

    @property
    def embed_rows(self) -> np.ndarray:
        """Alias of `grad_embed_ids` (the class ids whose embedding rows have a gradient)."""
        return self.grad_embed_ids

    def dense_grad_embed(self, num_classes: int) -> np.ndarray:
        """The class-embedding gradient as a dense [num_classes, C, H, W] array (zeros off the candidates)."""
        out = np.zeros((int(num_classes),) + self.grad_embed_rows.shape[1:], dtype=np.float32)
        out[self.grad_embed_ids] = self.grad_embed_rows
        return out

    def __repr__(self) -> str:
        B, K = self.scores.shape
        return (
            f"StepResult(loss={self.loss:.6g}, loss_cls={self.loss_cls:.6g}, "
            f"loss_triplet={self.loss_triplet:.6g}, acc_cls={self.acc_cls:.4g}, "
            f"acc_triplet={self.acc_triplet:.4g}, batch={B}, candidates_per_sample={K}, "
            f"embed_rows={self.grad_embed_ids.shape[0]})"
        )


class IncompatibleKeys(NamedTuple):
    """What load_state_dict(strict=False) skipped, as in PyTorch."""

    missing_keys: list
    unexpected_keys: list


def _to_numpy(value: object) -> object:
    """Torch tensors (any device) -> NumPy without importing torch; anything else unchanged."""
    if not isinstance(value, np.ndarray) and hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    return value


def _neighbor_change(old: np.ndarray | None, new: np.ndarray) -> float:
    """Fraction of neighbour entries of `new` that were not neighbours of the same class in `old`
    (order inside a row ignored); NaN when there is no previous table of the same shape."""
    if old is None or old.shape != new.shape or new.size == 0:
        return float("nan")
    return float(1.0 - kept_entries(old, new, new.shape[0]) / new.size)


_Laps = list  # [(name, perf_counter())], see QAConvGS._forward_backward
# Below this many correlation flops per step (2*C*S*S per scored pair) the whole step runs on one
# thread: its kernels take microseconds, an OpenMP fork/join costs about as much, and on a loaded
# machine a descheduled worker thread stalls every parallel region of the step (measured: a tiny
# step at 2 threads ran up to 500x slower than at 1 under load). Results are identical either way.
_SMALL_STEP_FLOPS = 2e6
_BACKWARD_CHUNK_BYTES = 4 << 20  # smallest row chunk of the in-place normalize backward
_BACKWARD_CHUNKS = (
    8  # at most this many chunks: each is one OpenMP region (fork/join, and under load a stall)
)


def _lap(laps: _Laps | None, name: str) -> None:
    if laps is not None:
        laps.append((name, time.perf_counter()))


def _normalize_backward_inplace(g: np.ndarray, y: np.ndarray, norms: np.ndarray, nt: int) -> np.ndarray:
    """normalize_backward of g, y [M, C, S] written over g (which the caller owns), in row chunks.

    One call over all rows would hold grad_y, y and grad_x at once (3 x [M, C, S]); chunks of at most
    1/8 of the rows (but >= 4 MB) keep the peak at (2 + 1/8) x [M, C, S] with few parallel regions."""
    M = g.shape[0]
    row = max(1, g.shape[1] * g.shape[2] * 4)
    step = max(_BACKWARD_CHUNK_BYTES // row, -(-M // _BACKWARD_CHUNKS), 1)
    if step >= M:  # small: one call, no copy back
        return _native.norm_backward(g, y, norms, nt)
    for a in range(0, M, step):
        b = min(M, a + step)
        g[a:b] = _native.norm_backward(g[a:b], y[a:b], norms[a:b], nt)
    return g


def _identify_rows(
    Xn: np.ndarray, rows: np.ndarray, first_id: int, w: np.ndarray, b: float, top: int, nt: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top classes of normalised probes among the class rows `rows` (global ids first_id, first_id + 1, ...).

    Xn [B, C, H, W] normalised probes; rows [n, C, H, W] raw class embeddings (n >= 0), normalised here
    block by block; (w [2S], b) the head's eval affine. -> (ids [B, min(top, n)] int64, scores float32),
    best first, ties to the lower class id. The arithmetic of one score depends only on its probe and its
    class row (normalisation per row, `match_scores` per pair), not on the block or on which rows are
    scored together: QAConvGS.identify and the sharded identify (each rank its own rows, then a merge)
    call this and get the same bits. Memory O(B * (top + block))."""
    B, n = Xn.shape[0], rows.shape[0]
    best_ids = np.empty((B, 0), dtype=np.int64)
    best_sc = np.empty((B, 0), dtype=np.float32)
    block = max(_IDENTIFY_BLOCK, top)
    for s in range(0, n, block):
        e = min(n, s + block)
        En, _ = _matching.normalize(rows[s:e], n_threads=nt)
        sc = _matching.match_scores(Xn, En, w, b, n_threads=nt)
        # Earlier blocks hold lower ids, so a stable sort keeps ties on the lower id.
        ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(first_id + s, first_id + e, dtype=np.int64), (B, e - s))], 1
        )
        cat = np.concatenate([best_sc, sc], axis=1)
        order = np.argsort(-cat, axis=1, kind="stable")[:, :top]
        best_ids = np.take_along_axis(ids, order, axis=1)
        best_sc = np.take_along_axis(cat, order, axis=1)
    return best_ids, best_sc


def _batch_extras(y: np.ndarray, exclude: np.ndarray, r: int, N: int, seed: int | None) -> np.ndarray:
    """[B, r] int64: for each row of `exclude` [B, K0] (the sample's target and neighbours), the first r
    classes of one pool not in that row. The pool is the batch's classes in a random order, then random
    other classes, long enough (r + K0) that every row finds r. The generator is seeded by (seed, labels),
    so the same batch always gets the same extras and nothing needs checkpointing."""
    rng = np.random.default_rng([0 if seed is None else int(seed), *y.tolist()])
    present = np.unique(y)
    pool = rng.permutation(present)
    need = r + exclude.shape[1] - pool.size
    if need > 0:
        # Generator.choice without replacement is O(size) for size << N (no O(N) complement)
        draw = rng.choice(N, size=min(N, need + present.size), replace=False)
        pool = np.concatenate([pool, draw[~np.isin(draw, present)][:need]])
    hit = (pool[None, None, :] == exclude[:, :, None]).any(axis=1)  # [B, pool]
    first = np.argsort(hit, axis=1, kind="stable")[:, :r]  # the row's first r pool entries not excluded
    return np.ascontiguousarray(pool[first], dtype=np.int64)


def _top_per_row(sc: np.ndarray, ids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m best of each row of sc [B, n] (class ids [B, n], distinct within a row), best first, ties to
    the lower id: a partition finds each row's m-th best score, and only the entries at or above it are
    sorted."""
    B, n = sc.shape
    if n <= m:
        order = np.lexsort((ids, -sc), axis=1) if n else np.zeros((B, 0), dtype=np.int64)
        return np.take_along_axis(ids, order, 1), np.take_along_axis(sc, order, 1)
    thr = -np.partition(-sc, m - 1, axis=1)[:, m - 1 : m]
    r, c = np.nonzero(sc >= thr)  # row-major: ascending ids within a row
    order = np.lexsort((ids[r, c], -sc[r, c], r))
    r, c = r[order], c[order]
    starts = np.searchsorted(r, np.arange(B))
    pick = (starts[:, None] + np.arange(m)).ravel()  # every row has >= m entries at or above its m-th best
    return ids[r[pick], c[pick]].reshape(B, m), sc[r[pick], c[pick]].reshape(B, m)


def imprint_rebuilds(at: int, n: int) -> bool:
    """Whether a step's imprinting, after which n classes are imprinted, rebuilds a neighbour table that
    was built when `at` were: when it was built before any class was imprinted, or when the imprinted
    classes have at least doubled since (and reach _IMPRINT_REFRESH_MIN). The first epoch then gets hard
    neighbours after O(log N) rebuilds instead of a class_neighbors call per step."""
    return at == 0 or n >= max(2 * at, _IMPRINT_REFRESH_MIN)


def mine_classes(
    Xn: np.ndarray, rows: np.ndarray, lo: int, exclude: np.ndarray, m: int, nt: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample mining over the class rows [n, C, S] (classes lo .. lo + n - 1): for each normalised map
    of Xn [B, C, S], the m classes outside its row of `exclude` [B, K0] (global ids) whose
    location-normalised row has the highest aligned correlation with the map (sum over locations of the
    dot products at the same location: QAConv's score without the search over positions, a cheap proxy of
    its hardest classes). -> (ids [B, min(m, n)] int64, scores [B, min(m, n)] float32), best first, ties
    to the lower id (an excluded class scores -inf, last).

    Blocked over classes: memory O(B * (m + block)); cost one [B, C*S] x [C*S, n] product. A sharded
    model mines its own rows and merges the ranks' lists with _top_per_row: the lists of one process."""
    B = Xn.shape[0]
    n, C, S = rows.shape
    q = Xn.reshape(B, C * S)
    best_ids = np.empty((B, 0), dtype=np.int64)
    best_sc = np.empty((B, 0), dtype=np.float32)
    for s in range(0, n, _MINE_BLOCK):
        e = min(n, s + _MINE_BLOCK)
        En, _ = _native.norm_forward(rows[s:e], nt)
        sc = q @ En.reshape(e - s, C * S).T
        r, j = np.nonzero((exclude >= lo + s) & (exclude < lo + e))
        sc[r, exclude[r, j] - lo - s] = -np.inf
        ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(lo + s, lo + e, dtype=np.int64), (B, e - s))], axis=1
        )
        cat = np.concatenate([best_sc, sc], axis=1)
        best_ids, best_sc = _top_per_row(cat, ids, m)
    return best_ids, best_sc


class _Forward(NamedTuple):
    """The shared front half of QAConvGS.scores() and the training step (B samples, K candidates each,
    R distinct candidate classes)."""

    candidates: np.ndarray  # [B, K] int64 class ids, target first
    ids: np.ndarray  # [R] int64 sorted unique candidate classes
    local: np.ndarray  # [B, K] int64 index of each candidate into ids
    Xn: np.ndarray  # [B, C, S] float32 normalised features
    Xn_norms: np.ndarray  # [B, S] their location norms
    En: np.ndarray  # [R, C, S] float32 normalised candidate rows
    En_norms: np.ndarray  # [R, S] their location norms
    argmax: tuple  # (ap, ag) argmax locations of the maxima, for the backward
    scores: np.ndarray  # [B * K] float32 training-mode head scores
    cache: Any  # the head's backward cache


class QAConvGS(ModelBase):
    """QAConv with class embeddings and neighbour-restricted scoring (QAConv-GS, simulated graph sampling).

    Each training sample is scored against its own class and the `k_nearest` classes closest to it
    (K = k_nearest + 1 candidates, target first; k_batch and k_mined add more) instead of against all
    `num_classes` classes.

    Args:
        num_classes: N >= 2 identities, one learnable embedding map [C, H, W] each.
        channels, height, width: feature-map shape C, H, W (S = H * W <= 65535 locations).
        k_nearest: neighbours scored per class, 1 <= k_nearest <= N - 1 (N - 1 = full scoring).
        fc: "separate" (Linear(2S -> 1)) or "shared" (QAConv 2.1: Linear(S -> 1) on each half, summed).
        triplet: "class" (hardest restricted negative) or "batch" (in-batch batch-hard triplet, one extra
            B x B head call per step).
        triplet_weight: weight w >= 0 in loss = loss_cls + w * loss_triplet.
        margin: triplet margin >= 0.
        seed: seed of the initialisation (np.random.default_rng(seed)); None for fresh entropy.
        n_threads: threads for the kernels; None = OpenMP's default. Results are identical for any value.
        init: how class embeddings start (keyword-only).
            "imprint" (default): every row starts at zero ("unset"). Inside each training step, before
            scoring, the rows of the step's classes that have averaged fewer than `imprint_samples` samples
            are moved to the running mean of their location-normalised feature maps (weight imprinting,
            Qi et al. CVPR 2018; the step's gradient then refines the row). An unset row scores like an empty
            map and receives no gradient. While classes are first being imprinted, the neighbour table is
            also rebuilt whenever the number of imprinted classes has doubled since it was built. Measured
            on real glyph data (README, learning benchmark): from a random start the head switches its
            scores off (logit_bn.weight -> 0) and training stalls at chance; from imprinted rows the same
            loops learn. See imprint().
            "random": the seed system's start, randn / sqrt(C) per entry, no imprinting.
        imprint_samples: samples a row averages before it is left to the gradient alone (keyword-only,
            >= 1; 64 covers a typical class's first epoch).
        k_mined: extra candidates per sample (keyword-only, >= 0, default 0): the classes whose rows
            correlate best with the sample's own location-normalised map, mined over all N classes in every
            step (capped at N - 1 - k_nearest), scored after the target and its k_nearest neighbours.
            Off by default: on the learning benchmark (2,000 glyph classes) k_mined=16 changed held-out
            accuracy by < 0.02 and cost about 2x the loss step (24.8 against 12.8 ms at k_nearest=32).
        k_batch: extra candidates per sample from the step's other classes (keyword-only, >= 0, default 0;
            capped at N - 1 - k_nearest): the batch's classes that are not already the sample's target or
            neighbours, in a random order, topped up with random classes when the batch has too few, so
            every sample gets exactly k_batch more. The draws are a function of the seed and the batch's
            labels only (no state to checkpoint; the same batch gets the same candidates). With P x K
            batches of random classes these are random negatives next to the hard ones (Partial-FC's
            sampled classes next to the k nearest). Off by default: on the learning benchmark (2,000
            glyph classes, the batch-triplet recipe) k_nearest=32 with k_batch=32 gave 0.686 / 0.636 and
            0.664 / 0.622 identification / retrieval in two runs that differed only in the random extras,
            against 0.665 / 0.630 for k_nearest=64 at about the same cost: not a measurable gain yet.
        weighted_extras: let the k_batch extras stand for the classes the step does not score (keyword-only,
            default False; needs triplet="batch" or triplet_weight=0). Each extra stands for
            w = (N - 1 - k_nearest - mined) / k_batch classes (see extra_weight): log(w) is added to its
            logit in the class softmax (sampled softmax's log-count correction) and its pairs weigh w in
            the head's batch statistics (head_forward(weights=...)), so the restricted loss and the head's
            normalisation estimate those of full scoring: the target and its hard classes exactly, the
            rest through a uniform sample. The estimate assumes the extras are uniform over the rest (true
            for shuffled or P x K batches of random classes, not for neighbour-graph batches). acc_cls is
            then measured on the corrected logits. On the learning benchmark (README; 2,000 glyph classes,
            batch-triplet recipe, k_nearest=32, k_batch=32) restricted scoring went from 0.940x / 0.956x
            to 0.965x / 0.977x of full scoring's identification / retrieval on one seed, with no gain on a
            second: a principled estimate, not yet a measured win beyond run-to-run variation.
        neighbors_by: the metric of the neighbour table (keyword-only): "cosine" (default, SPEC's
            class_neighbors of the rows as they are) or "aligned" (class_neighbors of the location-normalised
            rows: their aligned correlation, QAConv's normalised-map metric without the search over
            positions; one normalisation of the table per rebuild). On the learning benchmark (README, the
            batch-triplet recipe with 32 weighted extras) "aligned" gave +0.007 / +0.009 identification
            and +0.009 / +0.012 retrieval on two seeds.

    Attributes:
        training: True after construction / train(); False after eval(). In eval mode the
            batch-statistics computations (forward_backward, scores) leave the running statistics alone.
        neighbor_refreshes: how many times the neighbour table has been computed.
        neighbor_change: fraction of neighbour entries that changed at the last refresh (NaN at the first).

    Example:
        >>> model = QAConvGS(num_classes=100, channels=64, height=8, width=4, k_nearest=16, seed=0)
        >>> out = model.forward_backward(features, labels)   # features [B, 64, 8, 4], labels [B]
        >>> out.loss, out.grad_features.shape, out.grad_embed_rows.shape
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        height: int,
        width: int,
        k_nearest: int = 32,
        fc: str = "separate",
        triplet: str = "class",
        triplet_weight: float = 0.5,
        margin: float = 1.0,
        seed: int | None = None,
        n_threads: int | None = None,
        *,
        init: str = "imprint",
        imprint_samples: int = 64,
        k_mined: int = 0,
        k_batch: int = 0,
        weighted_extras: bool = False,
        neighbors_by: str = "cosine",
    ) -> None:
        cfg = check_config(
            num_classes,
            channels,
            height,
            width,
            k_nearest,
            fc,
            triplet,
            triplet_weight,
            margin,
            seed,
            n_threads,
        )
        opts = check_options(cfg, init, imprint_samples, k_mined, k_batch, weighted_extras, neighbors_by)
        self._cfg = ModelConfig(**cfg, **opts)
        N, C, H, W = cfg["num_classes"], cfg["channels"], cfg["height"], cfg["width"]
        self.training = True
        self._comm = None  # the contract's communicator, made on first use (see comm)

        rng = np.random.default_rng(self.seed)
        # The random draw is made for both starts, so the head's fc.bias is the same for either.
        self._embed = rng.standard_normal((N, C, H, W), dtype=np.float32)
        self._embed *= np.float32(1.0 / math.sqrt(C))
        if self.init == "imprint":
            self._embed[...] = 0.0  # unset rows: imprinted from a class's first samples (see imprint())
        self._head = _head.init_head(H * W, self.fc, rng)
        # samples averaged into each row so far (imprint="imprint"); kept in save()'s extras
        self._imprinted = np.zeros(N, dtype=np.int64)
        self._imprinted_at_refresh = 0
        self._row_hook = None
        self._lock = threading.RLock()
        self._nbr: np.ndarray | None = None
        self._nbr_stale = True
        self.neighbor_refreshes = 0
        self.neighbor_change = float("nan")

    # ------------------------------------------------------------------ configuration and state

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QAConvGS:
        """Build a model from `config` (as returned by `model.config`); unknown keys raise ValueError."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a mapping, got {type(config).__name__}")
        known = set(CONFIG_KEYS)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(config))

    def named_parameters(self):
        """(name, live array) pairs, as parameters().items()."""
        return iter(self.parameters().items())

    def num_parameters(self) -> int:
        return int(sum(a.size for a in self.parameters().values()))

    def _expected_state(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """key -> (shape, is_counter)."""
        fan = 2 * self.S if self.fc == "separate" else self.S
        shapes: dict[str, tuple[tuple[int, ...], bool]] = {
            "class_embed": ((self.num_classes, self.channels, self.height, self.width), False)
        }
        for pre in ("bn", "logit_bn"):
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{pre}.{name}"] = ((1,), False)
            shapes[f"{pre}.num_batches_tracked"] = ((), True)
        shapes["fc.weight"] = ((1, fan), False)
        shapes["fc.bias"] = ((1,), False)
        return {k: shapes[k] for k in _STATE_KEYS}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, with PyTorch's key names, shapes and dtypes
        (float32; num_batches_tracked is a 0-d int64), in PyTorch's module order."""
        with self._lock:
            out = {"class_embed": self._embed.copy()}
            for k in _STATE_KEYS[1:]:
                v = np.asarray(self._head[k])
                out[k] = v.astype(np.int64).reshape(()) if k.endswith("num_batches_tracked") else v.copy()
            return out

    def _validate_state(self, state: Mapping[str, Any], strict: bool) -> tuple[dict, list, list]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict: expected a mapping of name -> array, got {type(state).__name__}")
        expected = self._expected_state()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict: key mismatch: missing {missing}, unexpected {unexpected} "
                f"(strict=True; pass strict=False to load a subset)"
            )
        new: dict[str, np.ndarray] = {}
        for k, (shape, counter) in expected.items():
            if k not in state:
                continue
            name = f"state_dict[{k!r}]"
            v = _to_numpy(state[k])
            if counter:
                a = np.asarray(v)
                if a.dtype.kind not in "iu":
                    raise TypeError(f"{name}: expected an integer counter, got dtype {a.dtype}")
                if a.shape not in ((), (1,)):
                    raise ValueError(f"{name}: expected shape (), got {shape_str(a.shape)}")
                if int(a.reshape(())) < 0:
                    raise ValueError(f"{name}: expected a count >= 0, got {int(a.reshape(()))}")
                new[k] = np.array(int(a.reshape(())), dtype=np.int64)
                continue
            a = as_float32(v, name)
            if a.shape != shape:
                hint = f" (fc={self.fc!r} expects {shape_str(shape)})" if k == "fc.weight" else ""
                raise ValueError(f"{name}: expected shape {shape_str(shape)}, got {shape_str(a.shape)}{hint}")
            if k.endswith("running_var") and (a < 0).any():
                raise ValueError(f"{name}: a variance must be >= 0, got {float(a.min())}")
            new[k] = a  # committed with np.copyto, so sharing memory with the input is harmless
        return new, missing, unexpected

    def _commit_state(self, new: Mapping[str, np.ndarray]) -> None:
        for k, v in new.items():
            if k == "class_embed":
                np.copyto(self._embed, v)
                self._nbr_stale = True
                self._counts_from_rows()
                continue
            cur = self._head.get(k)
            if (
                isinstance(cur, np.ndarray)
                and cur.shape == v.shape
                and cur.dtype == v.dtype
                and cur.flags.writeable
            ):
                np.copyto(cur, v)
            else:
                self._head[k] = v.astype(cur.dtype) if isinstance(cur, np.ndarray) else v

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load parameters and buffers (NumPy arrays or torch tensors) with PyTorch's key names.

        Every key, shape and value is validated before anything is written, so on any error the
        model is unchanged. Arrays are copied into the live parameters (references obtained from
        parameters() stay valid). Loading class_embed marks the neighbour table stale.
        Returns (missing_keys, unexpected_keys), both empty when strict.
        """
        with self._lock:
            new, missing, unexpected = self._validate_state(state_dict, bool(strict))
            self._commit_state(new)
        return IncompatibleKeys(missing, unexpected)

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Write config + state (+ the current neighbour table, + `extra` arrays) to one .npz, atomically."""
        from .checkpoint import save_checkpoint

        extra = dict(extra or {})
        if any(str(k).startswith("_qaconv_gs.") for k in extra):
            raise ValueError("extra: keys starting with '_qaconv_gs.' are reserved")
        with self._lock:
            if self._nbr is not None and not self._nbr_stale:
                extra[_NBR_EXTRA_KEY] = self._nbr
                if self.init == "imprint":
                    extra[_IMPRINT_AT_EXTRA_KEY] = np.array(self._imprinted_at_refresh, np.int64)
            if self.init == "imprint":
                extra[_IMPRINT_EXTRA_KEY] = self._imprinted
            state = self.state_dict()
            # load() refuses non-finite parameters, so writing them would replace a good checkpoint with
            # one that cannot be read back (e.g. after a diverged step): refuse and keep the old file.
            bad = [k for k, v in state.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
            if bad:
                raise ValueError(
                    f"model state: {bad} contain NaN or Inf (diverged training?); not writing "
                    f"{os.fspath(path)} (an existing file is left as it was)"
                )
            save_checkpoint(path, self.config, state, extra=extra)

    @classmethod
    def load(cls, path: str | os.PathLike, *, return_extra: bool = False, n_threads: object = "saved"):
        """Rebuild a model from a file written by save(); with return_extra also return its extra arrays.

        n_threads: "saved" (default) keeps the saved setting, otherwise None or an integer.
        Raises ValueError for a truncated, corrupt, wrong-version or inconsistent file.
        """
        from .checkpoint import load_checkpoint

        saved = isinstance(n_threads, str) and n_threads == "saved"
        if not saved:  # the caller's argument, checked before the file is blamed for anything
            resolve_threads(n_threads)
        config, state, extra = load_checkpoint(path)
        config = dict(config)
        if not saved:
            config["n_threads"] = n_threads
        try:
            model = cls.from_config(config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)}: checkpoint has an invalid model config ({exc})") from exc
        try:
            model.load_state_dict(state)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{os.fspath(path)}: checkpoint state does not match its config ({exc})"
            ) from exc
        extra = model._adopt_saved_neighbors(extra)
        return (model, extra) if return_extra else model

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, np.ndarray]:
        """Load a checkpoint written by save() into this model (in place) and return its extra arrays.

        The saved architecture (num_classes, channels, height, width, fc) must equal this model's;
        hyperparameters (k_nearest, triplet, weights, threads) stay this model's. On any error
        (unreadable file, mismatch) a ValueError is raised and the model is unchanged.
        """
        from .checkpoint import load_checkpoint

        config, state, extra = load_checkpoint(path)
        for key in ARCH_KEYS:
            if config.get(key) != getattr(self, key):
                raise ValueError(
                    f"{os.fspath(path)}: checkpoint {key}={config.get(key)!r} does not match this model's "
                    f"{key}={getattr(self, key)!r}"
                )
        with self._lock:
            try:
                new, _, _ = self._validate_state(state, True)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}: checkpoint state is invalid ({exc})") from exc
            self._commit_state(new)
            return self._adopt_saved_neighbors(extra)

    def _adopt_saved_neighbors(self, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Restore a saved neighbour table and imprint counts when they fit this model; return extra
        without them."""
        extra = dict(extra)
        counts = extra.pop(_IMPRINT_EXTRA_KEY, None)
        if counts is not None:
            self._counts_from_rows(counts)
        at = saved_refresh_count(extra.pop(_IMPRINT_AT_EXTRA_KEY, None), self.num_classes)
        nbr = extra.pop(_NBR_EXTRA_KEY, None)
        if nbr is not None:
            nbr = np.asarray(nbr)
            ok = (
                nbr.shape == (self.num_classes, self.k_nearest)
                and nbr.dtype.kind in "iu"
                and (nbr.size == 0 or (nbr.min() >= 0 and nbr.max() < self.num_classes))
            )
            if ok:
                table = np.ascontiguousarray(nbr, dtype=np.int64)
                table.setflags(write=False)
                self._nbr, self._nbr_stale = table, False
                # without the saved count (older files), take the table as built from the rows as they are
                self._imprinted_at_refresh = int(np.count_nonzero(self._imprinted)) if at is None else at
        return extra

    # ------------------------------------------------------------------ modes and neighbours

    @property
    def class_neighbors(self) -> np.ndarray:
        """[N, k_nearest] int64 (read-only) nearest other classes of each class, by cosine similarity of
        the class embeddings. Computed lazily: on first use after construction, on_epoch_start() or
        load_state_dict(); then kept fixed while the embeddings train (as the seed system does per epoch)."""
        with self._lock:
            if self._nbr is None or self._nbr_stale:
                self._refresh_locked()
            return self._nbr

    @property
    def neighbors_stale(self) -> bool:
        """True when the next access to class_neighbors will recompute the table."""
        return self._nbr is None or self._nbr_stale

    # ------------------------------------------------------------------ imprinting

    def unset_classes(self) -> np.ndarray:
        """int64 ids of the classes whose embedding row is still unset (all zero: never imprinted)."""
        with self._lock:
            flat = self._embed.reshape(self.num_classes, -1)
            return np.flatnonzero(~flat.any(axis=1)).astype(np.int64)

    def imprint(self, features: object, labels: object, *, only_unset: bool = False) -> np.ndarray:
        """Set class embeddings from features (weight imprinting): row c = the mean over the samples of
        class c of their location-normalised maps (each location's C-vector scaled to unit norm).

        Args:
            features: [B, C, H, W] feature maps; labels: [B] class ids.
            only_unset: write only rows that are still unset (all zero), as the training step does.

        Returns the int64 ids of the rows written (sorted). Marks the neighbour table stale when any row
        changed. With init="imprint" the training step calls this itself before scoring, so an ordinary
        loop needs no extra call. Called explicitly (any init), it overwrites the rows of `labels`' classes
        with their means over this call and counts them as fully imprinted; calling it once over the whole
        training set gives class-mean rows. only_unset=True instead updates, as the step does, only rows
        that have averaged fewer than `imprint_samples` samples, as a running mean.
        """
        with self._lock:
            X, y = self._batch(features, labels)
            return self._imprint(X, y, only_unset=bool(only_unset))

    def _imprint(self, X: np.ndarray, y: np.ndarray, only_unset: bool) -> np.ndarray:
        write = imprint_rows(self._embed, self._imprinted, X, y, self.imprint_samples, only_unset=only_unset)
        if write.size:
            self._nbr_stale = True
        return write

    def on_epoch_start(self) -> None:
        """Mark the neighbour table stale; the next training step recomputes it from the embeddings."""
        self._nbr_stale = True

    def refresh_neighbors(self) -> np.ndarray:
        """Recompute the neighbour table now and return it."""
        with self._lock:
            self._refresh_locked()
            return self._nbr

    def _refresh_locked(self) -> None:
        self._imprinted_at_refresh = int(np.count_nonzero(self._imprinted))
        rows = self._embed
        if self.neighbors_by == "aligned":
            # cosine of the location-normalised rows = their aligned correlation / S (every location of a
            # set row has norm 1): the metric of QAConv's normalised maps without the search over positions
            C, S = self.channels, self.S
            rows = _native.norm_forward(rows.reshape(-1, C, S), resolve_threads(self.n_threads))[0]
            rows = rows.reshape(self.num_classes, C * S)
        table = _neighbors.class_neighbors(rows, self.k_nearest, n_threads=self.n_threads)
        table = np.ascontiguousarray(table, dtype=np.int64)
        self.neighbor_change = _neighbor_change(self._nbr, table)
        table.setflags(write=False)
        self._nbr, self._nbr_stale = table, False
        self.neighbor_refreshes += 1

    # ------------------------------------------------------------------ validation helpers

    def _batch(self, features: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
        X = self._features(features, "features")
        y = as_labels(labels, "labels", n=X.shape[0], num_classes=self.num_classes)
        return X, y

    def _head_for_step(self) -> dict:
        """The live head in training mode; in eval mode a copy whose running statistics are discarded."""
        if self.training:
            return self._head
        h = dict(self._head)
        for k in _RUNNING_KEYS:
            h[k] = np.array(self._head[k], copy=True)
        return h

    def _candidates(self, y: np.ndarray, Xn: np.ndarray, nt: int | None) -> np.ndarray:
        """[B, K] int64: the target, its k_nearest neighbours, the batch_per_sample in-batch / random
        classes, then the classes mined for each sample (Xn [B, C, S]: the step's normalised features)."""
        nbr = self.class_neighbors
        base = np.concatenate([y[:, None], nbr[y]], axis=1)
        r = self.batch_per_sample
        if r:
            base = np.concatenate([base, _batch_extras(y, base, r, self.num_classes, self.seed)], axis=1)
        m = self.mined_per_sample
        if m == 0:
            return base
        return np.concatenate([base, self._mine(Xn, base, m, nt)], axis=1)

    def _mine(self, Xn: np.ndarray, exclude: np.ndarray, m: int, nt: int | None) -> np.ndarray:
        """[B, m] int64: for each sample, the m classes outside its row of `exclude` whose location-normalised
        embedding has the highest aligned correlation with the sample's normalised map (see mine_classes),
        best first, ties to the lower class id. Rows are read as they are (a lazily updated row may be a
        few steps stale here; the rows then scored are brought up to date)."""
        C, S = self.channels, self.S
        ids, _ = mine_classes(Xn, self._embed.reshape(self.num_classes, C, S), 0, exclude, m, nt)
        return np.ascontiguousarray(ids)

    # The step below calls the private bindings directly: the public matching wrappers re-validate
    # (finiteness scans, dtype/shape coercion) arrays this method has just produced, which cost up to
    # several full passes over the [R, C, S] candidate rows per step. Inputs are validated once at
    # the entry (_batch); the embedding rows are checked through their norms (NaN/Inf -> non-finite
    # norm), which costs 1/C of a scan.

    def _step_threads(self, B: int) -> int:
        """n_threads for a step over B samples: one thread for tiny steps (see _SMALL_STEP_FLOPS)."""
        nt = resolve_threads(self.n_threads)
        pairs = B * (self.num_candidates + (B if self.triplet == "batch" else 0))
        if nt > 1 and 2.0 * pairs * self.channels * self.S * self.S < _SMALL_STEP_FLOPS:
            return 1
        return nt

    def _restricted_forward(
        self, X: np.ndarray, y: np.ndarray, head: dict, laps: _Laps | None = None, nt: int | None = None
    ) -> _Forward:
        """Shared front half of scores() and forward_backward()."""
        nt = self._step_threads(X.shape[0]) if nt is None else nt
        C, S = self.channels, self.S
        Xn, Xn_norms = _native.norm_forward(X.reshape(-1, C, S), nt)
        cand = self._candidates(y, Xn, nt)
        ids = np.unique(cand)
        local = np.searchsorted(ids, cand)
        if self._row_hook is not None:
            self._row_hook(ids)  # e.g. a lazy optimiser brings exactly the rows read below up to date
        _lap(laps, "candidates")
        # Only the candidate rows are normalised (never the whole table), read in place: no gathered copy.
        En, En_norms = _native.norm_forward_rows(self._embed.reshape(-1, C, S), ids, nt)
        if not np.isfinite(En_norms).all():
            bad = ids[~np.isfinite(En_norms).all(axis=1)]
            raise ValueError(
                f"class_embed: rows {bad[:5].tolist()} contain NaN or Inf (or overflow float32 norms); "
                "the class embeddings must be finite"
            )
        _lap(laps, "normalize")
        mp, mg, ap, ag = _native.match_maxima_restricted(Xn, En, local, True, nt)
        _lap(laps, "maxima forward")
        scores, cache = _head.head_forward(
            mp, mg, head, fc=self.fc, training=True, n_threads=nt, weights=self._pair_weights(X.shape[0])
        )
        _lap(laps, "head forward")
        return _Forward(cand, ids, local, Xn, Xn_norms, En, En_norms, (ap, ag), scores, cache)

    # ------------------------------------------------------------------ training maths

    def forward_backward(self, features: object, labels: object) -> StepResult:
        """One training step's maths: loss, accuracies and all gradients; parameters are not changed by
        the gradients (an optimiser applies them). With init="imprint", in training mode, the rows of the
        step's classes that are still being imprinted are first moved to the running mean of their
        normalised features (see imprint()); in eval mode nothing is imprinted.

        Args:
            features: [B, C, H, W] feature maps (any real array-like; converted to float32 once).
            labels: [B] class ids in [0, num_classes).

        Returns:
            StepResult (see its docstring). In training mode the head's running statistics are updated
            (once per head call: twice per step with triplet="batch"), as any training-mode forward.
        """
        with self._lock:
            X, y = self._batch(features, labels)
            return self._forward_backward(X, y)

    def _forward_backward(self, X: np.ndarray, y: np.ndarray, laps: _Laps | None = None) -> StepResult:
        """The step on validated inputs. `laps` (a list) receives (name, perf_counter) marks after each
        piece, for benchmarks/bench_train.py's breakdown; None costs nothing. A step that raises (bad rows,
        Ctrl-C) leaves the rows, counts and neighbour table its imprinting changed as they were."""
        undo = self._imprint_snapshot(y) if self.init == "imprint" and self.training else None
        try:
            if undo is not None:
                self._imprint_in_step(X, y)
            return self._step(X, y, laps)
        except BaseException:
            if undo is not None:
                self._restore_imprint(undo)
            raise

    def _step(self, X: np.ndarray, y: np.ndarray, laps: _Laps | None) -> StepResult:
        _lap(laps, "start")
        B = X.shape[0]
        nt = self._step_threads(B)
        C = self.channels
        head = self._head_for_step()
        cand, ids, local, Xn, Xn_norms, En, En_norms, (ap, ag), scores, cache = self._restricted_forward(
            X, y, head, laps, nt
        )
        extra_grad_xn = None
        extra_grad_head = None
        cl, loss_t, acc_t = self._class_loss(self._corrected_logits(scores), nt)
        # one sample has no in-batch pair to rank (and BN needs >= 2 values)
        if self.triplet == "batch" and B >= 2:
            bmp, bmg, bap, bag = _native.match_maxima(Xn, Xn, True, nt)
            bscores, bcache = _head.head_forward(bmp, bmg, head, fc=self.fc, training=True, n_threads=nt)
            del bmp, bmg
            loss_t, acc_t, tgrad = self._batch_triplet(bscores, y, nt)
            gbmp, gbmg, extra_grad_head = _head.head_backward(tgrad, bcache, n_threads=nt)
            gp, gg = _native.match_backward(Xn, Xn, gbmp, gbmg, bap, bag, nt)
            gp += gg
            extra_grad_xn = gp
            del gbmp, gbmg, bap, bag, gg
        _lap(laps, "loss")
        gmp, gmg, grad_head = _head.head_backward(cl.grad, cache, n_threads=nt)
        del cache
        grad_head = {k: np.asarray(v, dtype=np.float32) for k, v in grad_head.items()}
        if extra_grad_head is not None:
            for k in grad_head:
                grad_head[k] = grad_head[k] + np.asarray(extra_grad_head[k], dtype=np.float32)
        _lap(laps, "head backward")
        # The feature side first; then the [R, C, S] class-row gradient is written over En's buffer (the
        # class side reads only Xn and the table): the step never holds both, and does not fault in a
        # fresh [R, C, S] array (for faces that is 100s of MB of page zeroing per step). Its kernel
        # applies the class rows' normalize backward to each finished row while it is in cache,
        # rebuilding En's rows from the table (the bits of the separate calls).
        gXn, _ = _native.match_backward_restricted_features(Xn, En, local, gmp, gmg, ap, ag, nt)
        table = self._embed.reshape(-1, C, self.S)
        grad_rows = _native.match_backward_restricted_rows(
            Xn, table, ids, En_norms, local, gmp, gmg, ap, ag, nt, En
        )
        del En
        del gmp, gmg, ap, ag
        if self.init == "imprint":
            # unset rows (all zero, not imprinted yet) score as empty maps and stay unset: a zero-norm
            # location's normalisation gradient is 1/eps, which would fling the row anywhere
            unset = ~(En_norms > 0).any(axis=1)
            if unset.any():
                grad_rows[unset] = 0.0
        if extra_grad_xn is not None:
            gXn += extra_grad_xn
            del extra_grad_xn
        _lap(laps, "maxima backward")
        grad_x = _normalize_backward_inplace(gXn, Xn, Xn_norms, nt)
        del Xn
        _lap(laps, "normalize backward")
        out = StepResult(
            **self._loss_fields(cl, loss_t, acc_t),
            scores=np.asarray(scores, dtype=np.float32).reshape(B, -1),
            candidates=cand,
            grad_features=grad_x.reshape(B, C, self.height, self.width),
            grad_embed_ids=ids,
            grad_embed_rows=grad_rows.reshape(ids.shape[0], C, self.height, self.width),
            grad_head=grad_head,
        )
        _lap(laps, "result")
        return out

    def _imprint_snapshot(self, y: np.ndarray) -> tuple | None:
        """What the step's imprinting may change (None when no row of the step's classes is open)."""
        ids = np.unique(y)
        todo = ids[self._imprinted[ids] < self.imprint_samples]
        return self._snapshot_rows(todo) if todo.size else None

    def _imprint_in_step(self, X: np.ndarray, y: np.ndarray) -> None:
        """Imprint the step's open classes. The neighbour table is kept (rebuilding it whenever a class
        first appears would cost a class_neighbors call per step in the first epoch) unless it was built
        before any class was imprinted, or the imprinted classes have at least doubled (and reach
        _IMPRINT_REFRESH_MIN) since it was built: the first epoch then gets hard neighbours after O(log N)
        rebuilds, and whether the table was read before the first step changes nothing."""
        stale = self._nbr_stale
        if self._imprint(X, y, only_unset=True).size and not stale:
            self._nbr_stale = False
            if imprint_rebuilds(self._imprinted_at_refresh, int(np.count_nonzero(self._imprinted))):
                self._nbr_stale = True

    def scores(self, features: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
        """Restricted training-mode scores (batch statistics over the B x K pairs of this call).

        Returns (scores [B, K] float32, candidates [B, K] int64), K = num_candidates, target first.
        In training mode this updates the running statistics, as a training-mode forward does.
        """
        with self._lock:
            X, y = self._batch(features, labels)
            out = self._restricted_forward(X, y, self._head_for_step())
            return np.asarray(out.scores, dtype=np.float32).reshape(X.shape[0], -1), out.candidates

    def dense_scores(self, features: object, labels: object, fill: float = -np.inf) -> np.ndarray:
        """scores() scattered into a dense [B, N] float32 matrix; non-candidate classes get `fill`
        (-inf: absent from a softmax; fill=0.0 gives the seed system's sparse-matrix layout)."""
        if isinstance(fill, (bool, np.bool_)) or not isinstance(fill, (int, float, np.integer, np.floating)):
            raise TypeError(f"fill: expected a real number, got {type(fill).__name__}")
        s, cand = self.scores(features, labels)
        out = np.full((s.shape[0], self.num_classes), np.float32(fill), dtype=np.float32)
        np.put_along_axis(out, cand, s, axis=1)
        return out

    # ------------------------------------------------------------------ evaluation (running statistics)

    def match(self, probe: object, gallery: object) -> np.ndarray:
        """Eval-mode QAConv scores of every probe against every gallery map.

        probe [P, C, H, W], gallery [G, C, H, W] -> [P, G] float32; memory O(P*G + tiles)."""
        P = self._features(probe, "probe")
        G = self._features(gallery, "gallery")
        return _evaluate.match(P, G, self._head, n_threads=self.n_threads)

    def match_pairs(self, a: object, b: object) -> np.ndarray:
        """Eval-mode scores of aligned pairs: a, b [n, C, H, W] -> [n] float32 (score of a[i] vs b[i])."""
        A = self._features(a, "a")
        Bm = self._features(b, "b")
        if A.shape[0] != Bm.shape[0]:
            raise ValueError(f"b: expected {A.shape[0]} maps to pair with a, got {Bm.shape[0]}")
        nt = self.n_threads
        w, bias = self._eval_affine()
        S = self.S
        w64 = w.astype(np.float64)
        out = np.empty(A.shape[0], dtype=np.float32)
        for s in range(0, A.shape[0], _PAIRS_BLOCK):
            e = min(A.shape[0], s + _PAIRS_BLOCK)
            An, _ = _matching.normalize(A[s:e], n_threads=nt)
            Bn, _ = _matching.normalize(Bm[s:e], n_threads=nt)
            diag = np.arange(e - s, dtype=np.int64)[:, None]
            mp, mg = _matching.pair_maxima_restricted(An, Bn, diag, n_threads=nt)
            out[s:e] = mp[:, 0] @ w64[:S] + mg[:, 0] @ w64[S:] + bias
        return out

    def identify(self, features: object, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Identification against all class embeddings, eval mode.

        features [B, C, H, W] -> (ids [B, top] int64, scores [B, top] float32), best first, ties to the
        lower class id. Classes are scored in blocks, so memory stays O(B * (top + block))."""
        X = self._features(features, "features")
        top = check_int(top, "top", lo=1, hi=self.num_classes)
        nt = self.n_threads
        w, b = self._eval_affine()
        Xn, _ = _matching.normalize(X, n_threads=nt)
        with self._lock:
            best_ids, best_sc = _identify_rows(Xn, self._embed, 0, w, b, top, nt)
        return np.ascontiguousarray(best_ids), np.ascontiguousarray(best_sc, dtype=np.float32)

    # ------------------------------------------------------------------ the model contract (Trainer)

    @property
    def comm(self) -> Any:
        """The model contract's communicator: a distributed.SingleProcessCommunicator (rank 0 of 1)."""
        if self._comm is None:
            from .distributed.comm import SingleProcessCommunicator

            self._comm = SingleProcessCommunicator()
        return self._comm

    def rows_for_step(self, labels: object) -> np.ndarray:
        """Class rows the next forward_backward with these labels reads (besides mined candidates, which
        the row hook reports): the labels and their neighbours, sorted unique int64. Builds the neighbour
        table when stale, as that step would."""
        nbrs = self.class_neighbors
        y = as_labels(labels, "labels", num_classes=self.num_classes)
        return np.unique(np.concatenate([y, nbrs[y].ravel().astype(np.int64)]))

    def save_training_checkpoint(self, path: str | os.PathLike, extra: dict[str, np.ndarray]) -> None:
        """save(path, extra=extra): a trainer checkpoint is a model checkpoint with the trainer's extras."""
        self.save(path, extra=extra)

    def load_training_checkpoint(self, path: str | os.PathLike, parse: Any) -> Any:
        """Read a trainer checkpoint (a file, or a sharded directory read whole): ``parse`` validates the
        trainer's part first, then the model is loaded (unchanged on any error). Returns parse's value."""
        from .checkpoint import load_trainer_checkpoint

        def adopt(table: np.ndarray) -> None:
            self._adopt_saved_neighbors({_NBR_EXTRA_KEY: table})

        load_file = lambda p, state: self.load_checkpoint(p)  # noqa: E731
        return load_trainer_checkpoint(self, path, parse, load_file, adopt)

    # ------------------------------------------------------------------ Python protocol

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_row_hook"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if "_cfg" not in state:  # pickled before the config was held in one ModelConfig
            state["_cfg"] = ModelConfig(**{k: state.pop(k) for k in CONFIG_KEYS if k in state})
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self.__dict__.setdefault("_row_hook", None)
        self.__dict__.setdefault("_comm", None)

    def __repr__(self) -> str:
        nbr = "stale" if self.neighbors_stale else f"fresh, {self.neighbor_refreshes} refresh(es)"
        return (
            f"QAConvGS(num_classes={self.num_classes}, channels={self.channels}, height={self.height}, "
            f"width={self.width}, k_nearest={self.k_nearest}, fc={self.fc!r}, triplet={self.triplet!r}, "
            f"triplet_weight={self.triplet_weight:g}, margin={self.margin:g}, seed={self.seed}, "
            f"n_threads={self.n_threads}; {'training' if self.training else 'eval'} mode, "
            f"{self.num_parameters():,} parameters, neighbours {nbr})"
        )
