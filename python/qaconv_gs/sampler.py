"""GraphSampler: QAConv-GS batches made of centre classes and their nearest classes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Union

import numpy as np

from ._validate import _to_array, as_labels, check_int, shape_str

NeighborSource = Union[None, np.ndarray, Callable[[], object]]


class GraphSampler:
    """Graph sampling for QAConv-GS: every batch is a centre class plus its nearest classes, or with
    ``group_size`` several such groups.

    One epoch (one pass of ``iter(sampler)``):

    1. every class that has samples is a centre exactly once, in a shuffled order;
    2. a batch holds ``P = batch_size // num_instances`` classes, made of ``ceil(P / group_size)`` groups
       (one group, the whole batch, by default), each led by the next centre of that order. The group of a
       centre ``c`` is ``c`` first, then ``neighbors[c, 0], neighbors[c, 1], ...`` in order, skipping classes
       already in the batch and classes without samples, until the batch holds ``group_size`` classes per
       group so far (the last group of a batch takes what is left of ``P``). If the table rows run out
       first, or the centres at the end of the epoch, the batch is filled with random other classes (so
       batches keep their size); with ``neighbors=None`` every batch is its centres plus random classes (a
       plain P x K sampler);
    3. each class contributes ``num_instances`` samples, read through a per-class cyclic pointer over a list
       of its sample indices shuffled at the start of the epoch (a class with fewer samples repeats them);
    4. the whole batches are shuffled (batch order only; each batch stays contiguous).

    Randomness comes from ``numpy.random.default_rng([seed, epoch])``, so an epoch's batches depend only on
    ``seed``, the epoch number and the neighbour table: ``set_epoch(e)`` (called by ``Trainer.fit``) makes
    resumed training reproduce an uninterrupted run. Without ``set_epoch`` every ``iter()`` advances the
    epoch by one.

    Args:
        labels: [n] integer class ids (>= 0) of the data set the indices refer to.
        batch_size: samples per batch, a multiple of ``num_instances`` is expected (the remainder is dropped).
        num_instances: samples per class in a batch (K of P x K), >= 1.
        neighbors: None, an [N, k] integer table (row ``c`` = classes nearest to class ``c``, nearest first,
            N > max label), or a zero-argument callable returning such a table. A callable is called once at
            the start of every epoch, so ``neighbors=lambda: model.class_neighbors`` makes the graph follow
            the model's current class embeddings epoch by epoch.
        seed: int seed; None draws one from the OS entropy pool at construction.
        group_size: classes per group, 1 <= group_size; None (default) = ``P``, QAConv-GS's batch of one
            centre and its ``P - 1`` nearest classes. A small group (e.g. 2: each centre with its nearest
            class) puts a hard negative class in the batch for every sample while the groups themselves are
            random, so the batch stays a near-uniform sample of the classes (what the weighted in-batch
            extras of ``QAConvGS(k_batch=..., weighted_extras=True)`` assume) and an epoch is
            ``P / group_size`` times shorter.

    Iterating yields int64 index arrays of length ``P * num_instances`` (fewer only when the data set has
    fewer than ``P`` classes). ``len(sampler)`` is the number of batches per epoch (= number of classes with
    samples, divided by the groups per batch and rounded up).
    """

    def __init__(
        self,
        labels: object,
        batch_size: int = 64,
        num_instances: int = 2,
        neighbors: NeighborSource = None,
        seed: int | None = None,
        group_size: int | None = None,
    ) -> None:
        self.labels = as_labels(labels, "labels")
        if self.labels.size == 0:
            raise ValueError("labels: expected a non-empty array, got shape (0,)")
        if int(self.labels.min()) < 0:
            raise ValueError(f"labels: values must be >= 0, got {int(self.labels.min())}")
        self.batch_size = check_int(batch_size, "batch_size", lo=1)
        self.num_instances = check_int(num_instances, "num_instances", lo=1)
        if self.batch_size < self.num_instances:
            raise ValueError(
                f"batch_size: expected >= num_instances = {self.num_instances}, got {self.batch_size}"
            )
        self.classes_per_batch = self.batch_size // self.num_instances
        P = self.classes_per_batch
        self.group_size = P if group_size is None else min(check_int(group_size, "group_size", lo=1), P)
        #: the batch size each group fills up to: g, 2g, ..., then P (the last group takes the rest)
        self._group_stops = [*range(self.group_size, P, self.group_size), P]
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = check_int(seed, "seed", lo=0)
        if neighbors is not None and not callable(neighbors):
            neighbors = self._check_table(neighbors)
        self.neighbors = neighbors
        self.epoch = 0

        self.num_classes = int(self.labels.max()) + 1
        # Per-class lookups are sized by the classes that occur, never by the largest id: a stray huge
        # id costs nothing here (dense id-indexed tables would ask the OS for max id + 1 entries, which
        # under memory overcommit gets the process killed instead of raising MemoryError).
        order = np.argsort(self.labels, kind="stable")
        present, first = np.unique(self.labels[order], return_index=True)
        bounds = np.append(first, self.labels.size)
        #: class id -> its sample indices (ascending), for classes with samples
        self.class_indices: dict[int, np.ndarray] = {
            int(c): order[bounds[i] : bounds[i + 1]] for i, c in enumerate(present)
        }
        self.classes = present.astype(np.int64)

    def _check_table(self, table: object) -> np.ndarray:
        a = _to_array(table, "neighbors")
        if a.dtype.kind not in "iu":
            raise TypeError(f"neighbors: expected an integer array, got dtype {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"neighbors: expected a 2-d [N, k] array, got shape {shape_str(a.shape)}")
        a = np.ascontiguousarray(a, dtype=np.int64)
        n_labels = int(self.labels.max()) + 1
        if a.shape[0] < n_labels:
            raise ValueError(
                f"neighbors: expected at least {n_labels} rows (max label + 1), "
                f"got shape {shape_str(a.shape)}"
            )
        if a.size and (a.min() < 0 or a.max() >= a.shape[0]):
            bad = int(a.min()) if a.min() < 0 else int(a.max())
            raise ValueError(f"neighbors: values must be in [0, {a.shape[0]}), got {bad}")
        return a

    def current_neighbors(self) -> np.ndarray | None:
        """The neighbour table this epoch uses (calls the callable, validates)."""
        if self.neighbors is None:
            return None
        if callable(self.neighbors):
            return self._check_table(self.neighbors())
        return self.neighbors

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce the batches of epoch ``epoch`` (0-based)."""
        self.epoch = check_int(epoch, "epoch", lo=0)

    def __len__(self) -> int:
        return -(-int(self.classes.size) // len(self._group_stops))

    def batch_classes(self, centres, table: np.ndarray | None, rng: np.random.Generator) -> list[int]:
        """Classes of the batch led by ``centres`` (one class id or a sequence, at most one per group): each
        centre, then its neighbours in order, group by group; random classes fill what is left."""
        want = min(self.classes_per_batch, int(self.classes.size))
        members: list[int] = []
        seen: set[int] = set()
        # group i fills the batch up to its stop, so a group that found fewer new classes (its centre already
        # taken, a short row) leaves its share to the next group, not to random fillers
        for centre, stop in zip(np.atleast_1d(centres), self._group_stops):
            centre, stop = int(centre), min(stop, want)
            if centre not in seen:
                members.append(centre)
                seen.add(centre)
            if table is None or centre >= table.shape[0]:
                continue
            for c in table[centre]:
                if len(members) >= stop:
                    break
                c = int(c)
                if c in seen or c not in self.class_indices:
                    continue
                members.append(c)
                seen.add(c)
        if len(members) < want:
            rest = self.classes[~np.isin(self.classes, members)]
            extra = rng.choice(rest, size=want - len(members), replace=False)
            members.extend(int(c) for c in extra)
        return members

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        table = self.current_neighbors()
        pools = {c: rng.permutation(idx) for c, idx in self.class_indices.items()}
        pointers = dict.fromkeys(pools, 0)
        batches = []
        centres, per = rng.permutation(self.classes), len(self._group_stops)
        for i in range(0, centres.size, per):
            parts = []
            for c in self.batch_classes(centres[i : i + per], table, rng):
                pool, p = pools[c], pointers[c]
                take = (p + np.arange(self.num_instances)) % pool.size
                parts.append(pool[take])
                pointers[c] = (p + self.num_instances) % pool.size
            batches.append(np.concatenate(parts))
        for i in rng.permutation(len(batches)):
            yield batches[i]

    def __repr__(self) -> str:
        source = "callable" if callable(self.neighbors) else "none" if self.neighbors is None else "table"
        return (
            f"GraphSampler(samples={self.labels.size}, classes={self.classes.size}, "
            f"batch_size={self.batch_size}, "
            f"num_instances={self.num_instances}, neighbors={source}, seed={self.seed}"
            + (f", group_size={self.group_size})" if self.group_size < self.classes_per_batch else ")")
        )


__all__ = ["GraphSampler"]
