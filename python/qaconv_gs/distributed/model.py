"""ShardedQAConvGS: QAConvGS with the class table split over ranks (Partial-FC style).

Rank r owns the class rows layout.range(r) (embedding rows, their optimiser state, their neighbour rows);
the head (a few scalars and the fc weight) is replicated and kept identical. One training step:

0. with init="imprint", while some class of the global batch is still being imprinted (one small
   all-reduce says so), the raw maps are all-gathered instead of the normalised ones and each rank imprints
   the classes it owns (the arithmetic of QAConvGS.imprint on the same samples: the same rows); the
   all-reduced counts decide, as one process does, whether the neighbour table is rebuilt first;
1. every rank normalises its local batch and all-gathers the normalised maps and labels (rank order);
2. the candidate rows [y_b, nbr[y_b]] come from the rank owning y_b (all-gathered, B_total x K ids);
3. each rank scores the candidate pairs whose class it owns (the same C kernels as one process);
4. the head runs over the pairs of all ranks with batch statistics all-reduced (distributed._head);
5. the [B_total, K] score matrix is all-gathered and every rank evaluates the fused loss on it;
6. backward: head (all-reduced sums), maxima, then the owned rows' gradient stays local and the
   per-pair feature gradients are sent back to the rank that owns each sample (an all-to-all).

Equality with `QAConvGS.forward_backward` on the concatenated batch: the maxima and scores are computed
by the same kernels on the same bits; the head statistics are float64 sums in another order, so a score
may differ in its last float32 bit, and gradients summed over ranks are added in another order (within
1e-6 relative in practice; tests use 1e-5).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from .. import _native
from .. import evaluate as _evaluate
from .. import head as _head
from .. import matching as _matching
from .._contract import (
    ARCH_KEYS,
    IMPRINT_AT_EXTRA_KEY,
    IMPRINT_EXTRA_KEY,
    NBR_EXTRA_KEY,
    ModelBase,
    ModelConfig,
    check_config,
    check_options,
    kept_entries,
)
from .._validate import as_labels, check_int, resolve_threads, shape_str
from ..model import (
    QAConvGS,
    StepResult,
    _batch_extras,
    _identify_rows,
    _top_per_row,
    imprint_rebuilds,
    imprint_rows,
    mine_classes,
)
from ._head import sharded_head_backward, sharded_head_forward
from .comm import Communicator, SingleProcessCommunicator
from .layout import ShardLayout
from .neighbors import _fold, sharded_class_neighbors

__all__ = ["ShardedQAConvGS", "ShardedStepResult"]

_INIT_CHUNK_VALUES = 1 << 22  # normal draws per chunk when initialising a shard


@dataclass(repr=False)
class ShardedStepResult(StepResult):
    """StepResult of one rank. loss / accuracies / grad_head are global (identical on every rank);
    scores, candidates, grad_features are this rank's samples (rows sample_range of the global batch);
    grad_embed_ids are LOCAL row indices into this rank's class_embed (so an optimiser that indexes
    model.parameters()["class_embed"] with them works unchanged); grad_embed_class_ids are the global ids;
    grad_embed_sqnorm is the global squared norm of the embedding gradient (for gradient clipping).
    all_scores / all_candidates: the [B_total, K] matrices every rank assembled."""

    grad_embed_class_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    grad_embed_sqnorm: float = 0.0  # sum of squares of the embedding-row gradients of ALL ranks
    sample_range: tuple[int, int] = (0, 0)
    all_scores: np.ndarray | None = None
    all_candidates: np.ndarray | None = None

    @property
    def global_batch_size(self) -> int:
        """B_total, the samples of all ranks in this step (the batch the loss and accuracies average over)."""
        return 0 if self.all_candidates is None else int(self.all_candidates.shape[0])


def _draw_shard(rng: np.random.Generator, N: int, row: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of rng.standard_normal((N,) + row, float32), drawn in chunks (same stream and same
    generator state afterwards as the one big draw; memory O(chunk + shard))."""
    D = int(np.prod(row, dtype=np.int64))
    out = np.empty((hi - lo,) + row, dtype=np.float32)
    per = max(1, _INIT_CHUNK_VALUES // max(D, 1))
    for s in range(0, N, per):
        e = min(N, s + per)
        blk = rng.standard_normal((e - s,) + row, dtype=np.float32)
        a, b = max(s, lo), min(e, hi)
        if a < b:
            out[a - lo : b - lo] = blk[a - s : b - s]
    return out


class ShardedQAConvGS(ModelBase):
    """One rank's part of a QAConvGS whose class table is split over `comm`'s ranks.

    Same constructor arguments and defaults as QAConvGS (init="imprint": rows start unset and each step
    imprints the rows of its classes that have averaged fewer than imprint_samples samples, on the rank
    owning them, exactly as one process would on the whole batch), plus comm (default: single process) and
    layout (default: ShardLayout.even). Every option does what it does in QAConvGS: in-batch extras
    (k_batch, weighted_extras), aligned neighbours, and mining (k_mined: each rank mines its own rows for
    the whole global batch and the ranks' lists are merged).
    With the same seed, the union of the shards equals QAConvGS(seed=seed, init=init)'s table and the head
    is identical; a one-process model shards with its rows and imprint counts as they are (from_model,
    load, Trainer.load_checkpoint) and training goes on as it would have in one process. With seed=None
    rank 0 draws a seed and broadcasts it (stored in .seed).
    Collective methods (every rank must call them in the same order): the constructor, forward_backward,
    rows_for_step, identify, refresh_neighbors / local_neighbors when stale, gather_neighbors, gather_model,
    save and load_checkpoint (sharded checkpoints). qaconv_gs.Trainer trains it (one Trainer per rank) and
    qaconv_gs.torch.QAConvGSLoss wraps it (comm=...).
    """

    _EMPTY_BATCH_OK = True  # a rank may have no sample in a step; the global batch must not be empty
    _TABLE_STATE = ModelBase._TABLE_STATE + ("_nbr_version",)

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
        comm: Communicator | None = None,
        layout: ShardLayout | None = None,
        _init: bool = True,
    ) -> None:
        self.comm = SingleProcessCommunicator() if comm is None else comm
        if not isinstance(self.comm, Communicator):
            raise TypeError(f"comm: expected a qaconv_gs.distributed.Communicator, got {type(comm).__name__}")
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
        N = cfg["num_classes"]
        self._cfg = ModelConfig(**cfg, **opts)
        if seed is None:
            entropy = np.random.SeedSequence().entropy if self.comm.rank == 0 else 0
            seed = int(self.comm.broadcast(np.array(entropy % (1 << 63), dtype=np.int64), 0))
        self.seed = check_int(seed, "seed", lo=0)
        self.layout = ShardLayout.even(N, self.comm.size) if layout is None else layout
        if self.layout.num_classes != N or self.layout.world_size != self.comm.size:
            raise ValueError(
                f"layout: expected {N} classes over {self.comm.size} ranks, got {self.layout.num_classes} "
                f"over {self.layout.world_size}"
            )
        self.lo, self.hi = self.layout.range(self.comm.rank)
        self.training = True
        self._nbr: np.ndarray | None = None
        self._nbr_stale = True
        self._nbr_version = 0  # bumped whenever the neighbour rows change (invalidates _prepared)
        self._prepared: tuple | None = None  # (nbr version, local labels, counts, labels, candidates)
        self.neighbor_refreshes = 0
        self.neighbor_change = float("nan")  # as QAConvGS.neighbor_change, over the whole table
        # samples averaged into each OWN row so far (init="imprint"); saved in checkpoints with the rows
        self._imprinted = np.zeros(self.hi - self.lo, dtype=np.int64)
        # imprinted classes of ALL ranks when the neighbour table was built (the same on every rank)
        self._imprinted_at_refresh = 0
        if _init:
            rng = np.random.default_rng(self.seed)
            C, H, W = self.channels, self.height, self.width
            self._embed = _draw_shard(rng, N, (C, H, W), self.lo, self.hi)
            self._embed *= np.float32(1.0 / math.sqrt(C))  # as QAConvGS: float32 in-place scaling
            if self.init == "imprint":
                self._embed[...] = 0.0  # drawn first all the same, so that the head's draws match QAConvGS
            self._head = _head.init_head(H * W, self.fc, rng)

    # ------------------------------------------------------------------ construction from / to one process

    @classmethod
    def from_model(
        cls, model: QAConvGS, comm: Communicator | None = None, layout: ShardLayout | None = None
    ) -> ShardedQAConvGS:
        """This rank's shard of a one-process model (every rank passes an equal model). Collective only
        through the seed broadcast when model.seed is None."""
        cfg = model.config
        seed = cfg.pop("seed")
        out = cls(**cfg, seed=0 if seed is None else seed, comm=comm, layout=layout, _init=False)
        out.seed = seed
        out._embed = np.array(model.class_embed[out.lo : out.hi], dtype=np.float32, copy=True)
        out._head = {k: np.array(v, copy=True) for k, v in model.head_state.items()}
        out._imprinted = np.array(model._imprinted[out.lo : out.hi], dtype=np.int64, copy=True)
        out.training = model.training
        if not model.neighbors_stale:
            out._set_neighbors(model.class_neighbors[out.lo : out.hi])
            out._imprinted_at_refresh = model._imprinted_at_refresh
        return out

    def gather_model(self) -> QAConvGS:
        """A one-process QAConvGS with the whole table, assembled on every rank. Collective; memory O(N*D)."""
        full = self.comm.allgather_concat(self._embed)
        counts = self.comm.allgather_concat(self._imprinted)
        table = None if self.neighbors_stale else self.comm.allgather_concat(self._nbr)
        out = QAConvGS(**self.config)
        state = {k: np.array(v, copy=True) for k, v in self._head.items()}
        state["class_embed"] = full
        out.load_state_dict(state)
        out.training = self.training
        saved = {IMPRINT_EXTRA_KEY: counts}
        if table is not None:
            saved.update({NBR_EXTRA_KEY: table, IMPRINT_AT_EXTRA_KEY: np.int64(self._imprinted_at_refresh)})
        out._adopt_saved_neighbors(saved)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of this rank's state: class_embed (its rows [hi - lo, C, H, W]) and the head's entries
        (QAConvGS.state_dict key names)."""
        out = {"class_embed": self._embed.copy()}
        out.update({k: np.array(v, copy=True) for k, v in self._head.items()})
        return out

    def copy(self) -> ShardedQAConvGS:
        """An independent copy of this rank's model (rows, head, neighbour rows), on the same communicator
        and layout. Not collective."""
        out = type(self)(**{**self.config, "seed": 0}, comm=self.comm, layout=self.layout, _init=False)
        out.seed = self.seed
        out._embed = self._embed.copy()
        out._head = {k: np.array(v, copy=True) for k, v in self._head.items()}
        out._imprinted = self._imprinted.copy()
        out._imprinted_at_refresh = self._imprinted_at_refresh
        out.training = self.training
        out.neighbor_change, out.neighbor_refreshes = self.neighbor_change, self.neighbor_refreshes
        if not self.neighbors_stale:
            out._set_neighbors(self._nbr)
        return out

    def match(self, probe: object, gallery: object) -> np.ndarray:
        """Eval-mode QAConv scores [P, G] of probe [P, C, H, W] vs gallery [G, C, H, W], as QAConvGS.match
        (only the replicated head is used: not collective)."""
        P = self._features(probe, "probe")
        G = self._features(gallery, "gallery")
        if not P.shape[0] or not G.shape[0]:
            raise ValueError(
                f"probe, gallery: expected non-empty arrays, got {P.shape[0]} and {G.shape[0]} maps"
            )
        return _evaluate.match(P, G, self._head, n_threads=self.n_threads)

    def identify(self, features: object, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Identification against all N classes, eval mode, without assembling the class table. Collective.

        Every rank passes its own probes, features [B_r, C, H, W] (B_r = 0 is allowed; the global batch
        of B = sum B_r probes must not be empty) and the same `top` (1 <= top <= num_classes), and gets
        back the results of ITS OWN probes: (ids [B_r, top] int64 global class ids, scores [B_r, top]
        float32), best first, ties to the lower class id. They are bit for bit QAConvGS.identify of the
        one-process model on the probes of all ranks concatenated in rank order (rows sample_range).

        How: the normalised probes are all-gathered (B * C*H*W floats); each rank scores all B probes
        against its own rows in blocks with the arithmetic of QAConvGS.identify and keeps its top
        min(top, rows); then, in R - 1 paired exchanges, each rank sends every other rank the lists of
        that rank's probes and folds the lists of its own probes that arrive (score desc, id asc, as one
        process). Memory per rank: the gathered probes plus O(B * (top + block)) scores and ids; no rank
        holds another rank's rows. Bad input on any rank (shape, dtype, non-finite values, top) or non-finite
        class rows raise on every rank: ValueError / TypeError on the failing rank, RuntimeError naming it
        on the others; ranks that disagree on `top` or on the model's shape all raise ValueError.
        """
        comm = self.comm
        err: BaseException | None = None
        X = np.empty((0, self.channels, self.height, self.width), np.float32)
        t = 0
        try:
            X = self._features(features, "features")
            t = check_int(top, "top", lo=1, hi=self.num_classes)
        except (TypeError, ValueError) as exc:
            err = exc
        comm.agree(err)  # every rank raises together instead of waiting for the failed one
        me = np.array([X.shape[0], t, self.num_classes, self.channels, self.height, self.width], np.int64)
        hdr = np.stack(comm.allgather(me))
        counts = [int(c) for c in hdr[:, 0]]
        if (hdr[:, 1] != t).any():  # every rank sees the same header: every rank raises
            raise ValueError(f"top: every rank must pass the same top; ranks passed {hdr[:, 1].tolist()}")
        if (hdr[:, 2:] != me[2:]).any():
            raise ValueError(
                "identify: the ranks' models disagree on (num_classes, channels, height, width): "
                f"{[tuple(int(v) for v in row) for row in hdr[:, 2:]]}"
            )
        if sum(counts) == 0:
            raise ValueError("features: the global batch is empty (every rank passed 0 probe maps)")
        nt = self.n_threads
        resolve_threads(nt)
        R, r = comm.size, comm.rank
        offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Normalisation is per map, so normalising here and gathering gives the one-process bits.
        Xn_r = _matching.normalize(X, n_threads=nt)[0] if X.shape[0] else X
        Xn = comm.allgather_concat(Xn_r)
        w, b = self._eval_affine()
        err = None
        try:  # e.g. NaN rows (a diverged shard) or no memory: the others must not wait in the exchange
            ids, sc = _identify_rows(Xn, self._embed, self.lo, w, b, t, nt)  # [B, min(t, hi - lo)]
        except (ValueError, MemoryError) as exc:
            err = exc
        comm.agree(err)
        best_i, best_s = ids[offs[r] : offs[r + 1]], sc[offs[r] : offs[r + 1]]
        for step in range(1, R):
            dest, source = (r + step) % R, (r - step) % R
            got_i = comm.sendrecv(ids[offs[dest] : offs[dest + 1]], dest=dest, source=source)
            got_s = comm.sendrecv(sc[offs[dest] : offs[dest + 1]], dest=dest, source=source)
            if got_i.shape != got_s.shape or got_i.shape[0] != counts[r]:
                raise RuntimeError(
                    f"identify: rank {source} sent lists of shape {shape_str(got_i.shape)} / "
                    f"{shape_str(got_s.shape)}, expected ({counts[r]}, k)"
                )
            # class ids are disjoint between ranks: the fold only orders (score desc, id asc) and cuts
            best_i, best_s = _fold(best_i, best_s, got_i, got_s, t)
        if counts[r] == 0:
            return np.empty((0, t), np.int64), np.empty((0, t), np.float32)
        if best_i.shape[1] != t:  # pragma: no cover - the ranks' rows together are all N >= top classes
            raise RuntimeError(f"identify: rank {r} collected {best_i.shape[1]} of {t} classes")
        return np.ascontiguousarray(best_i, np.int64), np.ascontiguousarray(best_s, np.float32)

    # ------------------------------------------------------------------ neighbours

    def on_epoch_start(self) -> None:
        """Mark the neighbour rows stale (call on every rank; the next step recomputes them collectively)."""
        self._nbr_stale = True
        self._prepared = None

    @property
    def neighbors_stale(self) -> bool:
        return self._nbr is None or self._nbr_stale

    def refresh_neighbors(self) -> np.ndarray:
        """Recompute this rank's neighbour rows [hi - lo, k] (global ids). Collective."""
        if self.init == "imprint":
            mine = np.array([np.count_nonzero(self._imprinted)], np.int64)
            self._imprinted_at_refresh = int(self.comm.allreduce_sum(mine)[0])
        rows = self._embed
        if self.neighbors_by == "aligned":  # as QAConvGS: cosine of the location-normalised rows
            C, S = self.channels, self.S
            rows = rows.reshape(self.hi - self.lo, C, S)
            if rows.shape[0]:  # (the kernel refuses an empty block: a rank may own no class)
                rows = _native.norm_forward(rows, resolve_threads(self.n_threads))[0]
            rows = rows.reshape(self.hi - self.lo, C * S)
        table = sharded_class_neighbors(
            rows, self.k_nearest, self.comm, layout=self.layout, n_threads=self.n_threads
        )
        table = np.ascontiguousarray(table, dtype=np.int64)
        self.neighbor_change = self._global_change(self._nbr, table)
        table.setflags(write=False)
        self._nbr, self._nbr_stale = table, False
        self._nbr_version += 1
        self.neighbor_refreshes += 1
        return table

    def _global_change(self, old: np.ndarray | None, new: np.ndarray) -> float:
        """QAConvGS.neighbor_change over the whole table: the fraction of entries (all ranks) that were
        not neighbours of the same class before; NaN at the first refresh. Collective."""
        have = old is not None and old.shape == new.shape
        changed = 0
        if have and new.size:
            changed = new.size - kept_entries(old, new, self.num_classes)
        tot = self.comm.allreduce_sum(np.array([changed, new.size, int(have)], np.int64))
        if int(tot[2]) != self.comm.size or int(tot[1]) == 0:
            return float("nan")
        return float(tot[0]) / float(tot[1])

    def gather_neighbors(self) -> np.ndarray:
        """The whole [N, k] neighbour table (global ids), assembled on every rank (recomputed first when
        stale). Collective; O(N * k) memory, e.g. for a GraphSampler that every rank runs identically."""
        return self.comm.allgather_concat(self.local_neighbors)

    def _set_neighbors(self, rows: np.ndarray) -> None:
        table = np.array(rows, dtype=np.int64, copy=True)
        if table.shape != (self.hi - self.lo, self.k_nearest):
            raise ValueError(
                f"neighbors: expected shape {(self.hi - self.lo, self.k_nearest)}, got {table.shape}"
            )
        table.setflags(write=False)
        self._nbr, self._nbr_stale = table, False
        self._nbr_version += 1

    # ------------------------------------------------------------------ checkpoints

    def save(self, path, *, row_extra=None, extra=None) -> None:
        """Sharded checkpoint directory (distributed.checkpoint.save_sharded); collective."""
        from .checkpoint import save_sharded

        save_sharded(self, path, row_extra=row_extra, extra=extra)

    def load_checkpoint(self, path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Load a checkpoint (sharded directory of any world size, or a one-process .npz) into this model
        in place -> (row_extra re-sharded to this rank's rows, extra). Collective: if any rank fails to read
        its part or the architecture differs, every rank raises and no rank's model changes."""
        err: BaseException | None = None
        loaded = rx = ex = None
        try:
            loaded, rx, ex = self._read_checkpoint(path)
        except (OSError, TypeError, ValueError) as exc:
            err = exc
        self.comm.agree(err)
        self._assign(loaded)
        return rx, ex

    def _read_checkpoint(self, path) -> tuple[ShardedQAConvGS, dict, dict]:
        """(a model holding this rank's rows of `path`, row_extra, extra); self unchanged, no collective."""
        from .checkpoint import load_sharded

        loaded, rx, ex = load_sharded(path, self.comm, self.layout, return_extra=True)
        for key in ARCH_KEYS:
            if getattr(loaded, key) != getattr(self, key):
                raise ValueError(
                    f"{os.fspath(path)}: checkpoint {key}={getattr(loaded, key)!r} does not match this "
                    f"model's {key}={getattr(self, key)!r}"
                )
        return loaded, rx, ex

    def _assign(self, other: ShardedQAConvGS) -> None:
        """Take other's rows, imprint counts, head and neighbour rows (same architecture and layout);
        hyperparameters stay."""
        self._embed, self._head = other._embed, other._head
        self._imprinted = other._imprinted
        self._prepared = None
        if other.neighbors_stale or other.k_nearest != self.k_nearest:
            self._nbr, self._nbr_stale = None, True
        else:
            self._set_neighbors(other._nbr)
            self._imprinted_at_refresh = other._imprinted_at_refresh

    def save_training_checkpoint(self, path, extra: dict[str, np.ndarray]) -> None:
        """A sharded trainer checkpoint (distributed.checkpoint.save_trainer_sharded); collective."""
        from .checkpoint import save_trainer_sharded

        save_trainer_sharded(self, path, extra)

    def load_training_checkpoint(self, path, parse):
        """Read a trainer checkpoint (sharded directory of any world size, or a one-process file) into
        this model; collective (distributed.checkpoint.load_trainer_sharded). Returns parse's value."""
        from .checkpoint import load_trainer_sharded

        return load_trainer_sharded(self, path, parse)

    def embed_grad_sqnorm(self, result: ShardedStepResult) -> float:
        """The step's global squared norm of the embedding gradient (summed over ranks by the step)."""
        return float(result.grad_embed_sqnorm)

    @classmethod
    def load(cls, path, comm: Communicator | None = None, layout: ShardLayout | None = None, **kwargs):
        """This rank's model from a sharded checkpoint (any saved world size) or a one-process .npz
        (distributed.checkpoint.load_sharded; return_extra=True also returns the extra arrays)."""
        from .checkpoint import load_sharded

        return load_sharded(path, comm, layout, **kwargs)

    @property
    def local_neighbors(self) -> np.ndarray:
        """This rank's neighbour rows (recomputed collectively when stale)."""
        if self.neighbors_stale:
            self.refresh_neighbors()
        assert self._nbr is not None
        return self._nbr

    # ------------------------------------------------------------------ training step

    def forward_backward(self, features: object, labels: object) -> ShardedStepResult:
        """One step over the batch made of every rank's (features, labels), concatenated in rank order.

        Collective. features [B_r, C, H, W], labels [B_r] global class ids. A rank may pass an empty
        batch (B_r = 0: it still scores the pairs of its classes and updates its rows); every rank raises
        ValueError when the global batch is empty.
        Equals QAConvGS.forward_backward on the concatenated batch (see the module docstring)."""
        err: BaseException | None = None
        try:
            X = self._features(features, "features")
            y = as_labels(labels, "labels", n=X.shape[0], num_classes=self.num_classes)
        except (TypeError, ValueError) as exc:
            err = exc
        self.comm.agree(err)  # every rank raises together instead of waiting for the failed one
        return self._forward_backward(X, y)

    @staticmethod
    def _buckets(owned: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Group the samples by how many candidate pairs this rank owns: [(samples [n_b], pair ids [n_b, c])].

        Pair ids index the (b, j)-ordered list np.nonzero(owned). Scoring a bucket is one restricted call
        with c candidates per sample: no feature map is duplicated and nothing is padded. With one rank
        there is one bucket (c = K), so the calls are exactly those of QAConvGS."""
        per = owned.sum(axis=1)
        pid = np.full(owned.shape, -1, np.int64)
        pid[owned] = np.arange(int(owned.sum()), dtype=np.int64)
        out = []
        for c in np.unique(per[per > 0]):
            bs = np.nonzero(per == c)[0]
            out.append((bs, pid[bs][owned[bs]].reshape(bs.size, int(c))))
        return out

    def _pairs_maxima(self, Xn, En, loc, buckets, P, nt):
        """Maxima of the owned pairs (list order) -> mp, mg [P, S] float32, ap, ag [P, S] uint16.

        Xn [B, C, S] and En [R, C, S] are the step's own validated float32 arrays: the kernels are called
        directly (no per-bucket re-validation of the whole class-row block)."""
        S = self.S
        mp = np.empty((P, S), np.float32)
        mg = np.empty((P, S), np.float32)
        ap = np.empty((P, S), np.uint16)
        ag = np.empty((P, S), np.uint16)
        for bs, pid in buckets:
            a, b, c, d = _native.match_maxima_restricted(Xn[bs], En, loc[pid], True, nt)
            flat = pid.reshape(-1)
            mp[flat], mg[flat], ap[flat], ag[flat] = (v.reshape(-1, S) for v in (a, b, c, d))
        return mp, mg, ap, ag

    def _pairs_backward(self, gmp, gmg, ap, ag, Xn, En, loc, buckets, nt):
        """-> (samples [U] having an owned pair, their feature gradients [U, C, S], class-row gradients
        [len(En), C, S]).

        Each bucket's class-row gradient covers only the rows its pairs use (the kernel's class side
        needs the row count, not the rows), so the cost is O(pairs), not O(buckets x rows)."""
        S = self.S
        ub = np.sort(np.concatenate([bs for bs, _ in buckets]))
        gx = np.empty((ub.size,) + Xn.shape[1:], np.float32)
        ge = None
        ge64 = None
        for bs, pid in buckets:
            shp = pid.shape + (S,)
            args = (gmp[pid].reshape(shp), gmg[pid].reshape(shp), ap[pid].reshape(shp), ag[pid].reshape(shp))
            Xb = Xn[bs]
            a, _ = _native.match_backward_restricted_features(Xb, En, loc[pid], *args, nt)
            gx[np.searchsorted(ub, bs)] = a
            rows, inv = np.unique(loc[pid], return_inverse=True)
            _, b = _native.match_backward_restricted_embeds(Xb, rows.size, inv.reshape(pid.shape), *args, nt)
            if len(buckets) == 1:  # always with one rank: the kernel's own rounding, as QAConvGS
                ge = np.zeros(En.shape, np.float32)
                ge[rows] = b
            else:  # several: float64 sum over the buckets (rows a bucket does not use add exact zeros)
                if ge64 is None:
                    ge64 = np.zeros(En.shape, np.float64)
                ge64[rows] += b
        if ge64 is not None:
            ge = ge64.astype(np.float32)
        elif ge is None:
            ge = np.zeros_like(En)
        return ub, gx, ge

    def _to_owners(self, rows: np.ndarray, ids: np.ndarray, counts: list[int]) -> np.ndarray:
        """Sum per-sample partial gradients (rows for global sample ids) on the rank owning each sample.
        -> [B_r, ...] float32 for this rank's samples, partials added in rank order in float64."""
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        owner = np.searchsorted(bounds, ids, side="right") - 1
        R = self.comm.size
        send_i = [ids[owner == q] - bounds[q] for q in range(R)]
        send_r = [rows[owner == q] for q in range(R)]
        got_i = self.comm.alltoallv(send_i)
        got_r = self.comm.alltoallv(send_r)
        me = self.comm.rank
        acc = np.zeros((counts[me],) + rows.shape[1:], np.float64)
        for q in range(R):
            if got_i[q].size:  # a sender lists each sample once: plain fancy-index addition is exact
                acc[got_i[q]] += got_r[q]
        return acc.astype(np.float32)

    def _gather_candidates(self, y_r: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(per-rank batch sizes, global labels [B], candidates [B, K]). Collective."""
        counts, y = self._gather_labels(y_r)
        return counts, y, self._candidates_of(y)

    def _gather_labels(self, y_r: np.ndarray) -> tuple[list[int], np.ndarray]:
        """(per-rank batch sizes, global labels [B] in rank order). Collective."""
        counts = [int(c[0]) for c in self.comm.allgather(np.array([y_r.size], np.int64))]
        return counts, self.comm.allgather_concat(y_r)

    def _candidates_of(self, y: np.ndarray) -> np.ndarray:
        """Candidates [B, K] of the global labels: the rank owning y_b supplies [y_b, nbr[y_b]] (the
        neighbour rows are rebuilt first when stale); every rank then appends the same batch_per_sample
        in-batch / random extras (drawn from the global labels, as QAConvGS does). Collective."""
        comm, K = self.comm, 1 + self.k_nearest
        nbr = self.local_neighbors
        mine = np.nonzero((y >= self.lo) & (y < self.hi))[0]
        rows = np.concatenate([y[mine, None], nbr[y[mine] - self.lo]], axis=1)
        pos_all = comm.allgather_concat(mine.astype(np.int64))
        rows_all = comm.allgather_concat(rows.astype(np.int64).reshape(-1, K))
        cand = np.empty((y.size, K), np.int64)
        cand[pos_all] = rows_all
        r = self.batch_per_sample
        if r:
            cand = np.concatenate([cand, _batch_extras(y, cand, r, self.num_classes, self.seed)], axis=1)
        return cand

    def rows_for_step(self, labels: object) -> np.ndarray:
        """Local row indices (into class_embed) that the next forward_backward with these labels reads
        and updates: this rank's classes among the candidates of the global batch (besides mined classes,
        and the new neighbours when that step's imprinting rebuilds the table: the row hook reports every
        row the step reads). Collective.

        For an optimiser with lazily applied updates (Trainer(sparse_embed=True) catches rows up before
        the forward): the gathered labels and candidates are kept and reused by that forward_backward."""
        err: BaseException | None = None
        try:
            y_r = as_labels(labels, "labels", num_classes=self.num_classes)
        except (TypeError, ValueError) as exc:
            err = exc
        self.comm.agree(err)
        counts, y, cand = self._gather_candidates(y_r)
        self._prepared = (self._nbr_version, y_r.copy(), counts, y, cand)
        owned = cand[(cand >= self.lo) & (cand < self.hi)]
        return np.unique(owned) - self.lo

    # ------------------------------------------------------------------ imprinting

    def _imprint_in_step(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, tuple] | None:
        """Imprint the open classes of the global batch (labels y [B]) that this rank owns, from the
        all-gathered maps; decide with the all-reduced counts, as QAConvGS._imprint_in_step does, whether the
        neighbour table is rebuilt. Collective. -> (the gathered maps [B, C, H, W], what to restore if
        the step fails), or None when no class of the batch is open on any rank (nothing is gathered)."""
        lo = self.lo
        own = (y >= lo) & (y < self.hi)
        ids = np.unique(y[own]) - lo
        todo = ids[self._imprinted[ids] < self.imprint_samples]
        # classes imprinted once this step is done: the ones so far plus the open ones seen for the first time
        n_after = np.count_nonzero(self._imprinted) + np.count_nonzero(self._imprinted[todo] == 0)
        opened, n_after = (int(v) for v in self.comm.allreduce_sum(np.array([todo.size, n_after], np.int64)))
        if opened == 0:
            return None
        X_all = self.comm.allgather_concat(X)
        undo = self._snapshot_rows(todo)
        if todo.size:
            imprint_rows(self._embed, self._imprinted, X_all[own], y[own], self.imprint_samples,
                         only_unset=True, lo=lo)  # fmt: skip
        if not self.neighbors_stale and imprint_rebuilds(self._imprinted_at_refresh, n_after):
            self._nbr_stale = True
        return X_all, undo

    # ------------------------------------------------------------------ the step

    def _forward_backward(self, X: np.ndarray, y_r: np.ndarray) -> ShardedStepResult:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and np.array_equal(prepared[1], y_r):
            _, _, counts, y, _ = prepared  # rows_for_step(labels) gathered them already
        else:
            counts, y = self._gather_labels(y_r)
            prepared = None
        if sum(counts) == 0:  # counts are the same on every rank: every rank raises
            raise ValueError("features: the global batch is empty (every rank passed B_r = 0 samples)")
        imprinted = None
        if self.init == "imprint" and self.training:
            imprinted = self._imprint_in_step(X, y)
        try:
            maps = self._normalized(X, counts, None if imprinted is None else imprinted[0])
            if prepared is not None and prepared[0] == self._nbr_version and not self.neighbors_stale:
                cand = prepared[4]  # (imprinting above may have marked the table for a rebuild)
            else:
                cand = self._candidates_of(y)
            m = self.mined_per_sample
            if m:
                C, S = self.channels, self.S
                cand = np.concatenate([cand, self._mine(maps[0].reshape(-1, C, S), cand, m)], axis=1)
            return self._step(X, counts, y, cand, maps)
        except BaseException:
            if imprinted is not None:
                self._restore_imprint(imprinted[1])
            raise

    def _normalized(
        self, X: np.ndarray, counts: list[int], X_all: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the normalised maps of the global batch [B, C, H, W], this rank's [B_r, ...], their location
        norms [B_r, S]). Collective (one all-gather) unless imprinting gathered the raw maps, X_all, already:
        normalisation is per map, so normalising them here gives the same bits."""
        nt = resolve_threads(self.n_threads)
        Br = X.shape[0]
        if X_all is not None:
            off = int(sum(counts[: self.comm.rank]))
            Xn, norms = _matching.normalize(X_all, n_threads=nt)
            return Xn, Xn[off : off + Br].copy(), norms[off : off + Br].copy()
        if Br:
            Xn_r, norms_r = _matching.normalize(X, n_threads=nt)
        else:  # the kernels refuse empty arrays; nothing to normalise here
            Xn_r, norms_r = X.copy(), np.empty((0, self.S), np.float32)
        return self.comm.allgather_concat(Xn_r), Xn_r, norms_r

    def _mine(self, Xn: np.ndarray, exclude: np.ndarray, m: int) -> np.ndarray:
        """[B, m] int64: QAConvGS._mine over the whole table: each rank mines its own rows for every sample
        of the global batch (Xn [B, C, S]), the ranks' lists are all-gathered and merged (score desc, id
        asc). Collective; memory O(B * (m + block)) per rank, never another rank's rows."""
        rows = self._embed.reshape(self.hi - self.lo, self.channels, self.S)  # a rank may own none: [B, 0]
        ids, sc = mine_classes(Xn, rows, self.lo, exclude, m, resolve_threads(self.n_threads))
        all_ids = np.concatenate(self.comm.allgather(ids), axis=1)
        all_sc = np.concatenate(self.comm.allgather(sc), axis=1)
        return np.ascontiguousarray(_top_per_row(all_sc, all_ids, m)[0])

    def _step(
        self, X: np.ndarray, counts: list[int], y: np.ndarray, cand: np.ndarray, maps: tuple
    ) -> ShardedStepResult:
        """The step on validated inputs: this rank's maps X [B_r, ...], the per-rank batch sizes, the global
        labels [B], candidates [B, K] and normalised maps (_normalized)."""
        comm = self.comm
        nt = resolve_threads(self.n_threads)
        me = comm.rank
        K = self.num_candidates
        Br = X.shape[0]
        off = int(sum(counts[:me]))
        Xn, Xn_r, norms_r = maps
        B = y.size

        # the pairs this rank owns, in (b, j) order
        owned = (cand >= self.lo) & (cand < self.hi)
        pb, pj = np.nonzero(owned)
        ids = np.unique(cand[owned])
        loc = np.searchsorted(ids, cand[pb, pj]).astype(np.int64)
        S = self.S
        if ids.size:
            C = self.channels
            if self._row_hook is not None:  # e.g. a lazy optimiser brings the rows read below up to date
                self._row_hook(ids - self.lo)
            table = self._embed.reshape(-1, C, S)
            En, En_norms = _native.norm_forward_rows(table, ids - self.lo, nt)
            buckets = self._buckets(owned)
            mp, mg, ap, ag = self._pairs_maxima(Xn.reshape(B, C, S), En, loc, buckets, pb.size, nt)
        else:
            En = np.empty((0,) + X.shape[1:], np.float32)
            mp = mg = np.empty((0, S), np.float32)
        head = self._head if self.training else {k: np.array(v, copy=True) for k, v in self._head.items()}
        weights = self._pair_weights(B)
        if weights is not None:
            weights = weights[pb, pj]
        out_r, hcache = sharded_head_forward(mp, mg, head, self.fc, comm, weights=weights)

        flat_all = comm.allgather_concat((pb * K + pj).astype(np.int64))
        out_all = comm.allgather_concat(out_r)
        scores = np.empty(B * K, np.float32)
        scores[flat_all] = out_all
        scores = scores.reshape(B, K)

        extra_head = None
        extra_own = None  # [B_r] feature-grad contribution computed here for own samples
        extra_part = None  # (sample ids, rows) partials for any sample
        cl, loss_t, acc_t = self._class_loss(self._corrected_logits(scores), nt)
        if self.triplet == "batch" and B >= 2:
            if Br:
                bmp, bmg, bap, bag = _matching.pair_maxima(Xn_r, Xn, return_argmax=True, n_threads=nt)
            else:  # no probe here, but the head statistics and gathers below are collective
                bmp = bmg = np.empty((0, B, S), np.float32)
                bap = bag = np.empty((0, B, S), np.uint16)
            b_r, bcache = sharded_head_forward(bmp.reshape(-1, S), bmg.reshape(-1, S), head, self.fc, comm)
            bscores = comm.allgather_concat(b_r.reshape(X.shape[0], B))
            loss_t, acc_t, tgrad = self._batch_triplet(bscores, y, nt)
            gbmp, gbmg, extra_head = sharded_head_backward(
                tgrad[off : off + X.shape[0]].reshape(-1), bcache, comm
            )
            if Br:
                gp, gg = _matching.pair_maxima_backward(
                    gbmp.reshape(bmp.shape), gbmg.reshape(bmg.shape), bap, bag, Xn_r, Xn, n_threads=nt
                )
            else:
                gp, gg = np.empty_like(Xn_r), np.zeros_like(Xn)
            extra_own = gp
            extra_part = (np.arange(B, dtype=np.int64), gg)

        gmp, gmg, grad_head = sharded_head_backward(cl.grad[pb, pj], hcache, comm)
        if extra_head is not None:
            grad_head = {k: grad_head[k] + extra_head[k] for k in grad_head}
        if ids.size:
            ub, gx_part, gEn = self._pairs_backward(
                gmp, gmg, ap, ag, Xn.reshape(B, C, S), En, loc, buckets, nt
            )
            del En
            # in place over gEn; the class rows are re-read from the table (the same bits as En)
            grad_rows = _native.norm_backward_rows(gEn, table, ids - self.lo, En_norms, nt)
            if self.init == "imprint":
                # unset rows score as empty maps and stay unset (as in QAConvGS._step)
                unset = ~(En_norms > 0).any(axis=1)
                if unset.any():
                    grad_rows[unset] = 0.0
            grad_rows = grad_rows.reshape((ids.size,) + X.shape[1:])
            gx_part = gx_part.reshape((ub.size,) + X.shape[1:])
        else:
            ub = np.empty(0, np.int64)
            gx_part = np.empty((0,) + X.shape[1:], np.float32)
            grad_rows = np.empty((0,) + X.shape[1:], np.float32)
        if extra_part is not None:
            # combine per sample before the exchange: one message per rank pair
            allx = np.zeros((B,) + X.shape[1:], np.float64)
            allx[ub] += gx_part
            allx += extra_part[1]
            gXn_r = self._to_owners(allx.astype(np.float32), np.arange(B, dtype=np.int64), counts)
            gXn_r = (gXn_r.astype(np.float64) + extra_own).astype(np.float32)
        else:
            gXn_r = self._to_owners(gx_part, ub.astype(np.int64), counts)
        grad_x = _matching.normalize_backward(gXn_r, Xn_r, norms_r, n_threads=nt) if Br else gXn_r
        sl = slice(off, off + X.shape[0])
        sq = float(comm.allreduce_sum(np.array([np.square(grad_rows, dtype=np.float64).sum()]))[0])
        return ShardedStepResult(
            **self._loss_fields(cl, loss_t, acc_t),
            scores=scores[sl].copy(),
            candidates=cand[sl].copy(),
            grad_features=grad_x,
            grad_embed_ids=(ids - self.lo).astype(np.int64),
            grad_embed_rows=grad_rows,
            grad_head=grad_head,
            grad_embed_class_ids=ids.astype(np.int64),
            grad_embed_sqnorm=sq,
            sample_range=(off, off + X.shape[0]),
            all_scores=scores,
            all_candidates=cand,
        )

    def __repr__(self) -> str:
        return (
            f"ShardedQAConvGS(rank {self.comm.rank}/{self.comm.size}, classes [{self.lo}, {self.hi}) of "
            f"{self.num_classes}, C={self.channels}, H={self.height}, W={self.width}, k={self.k_nearest}, "
            f"fc={self.fc!r}, triplet={self.triplet!r})"
        )
