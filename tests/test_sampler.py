"""GraphSampler: batch structure, coverage, cyclic per-class pointers, seeding, neighbour sources, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from qaconv_gs.sampler import GraphSampler


def knn_table(n_cls, k, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.delete(np.arange(n_cls), i))[:k] for i in range(n_cls)])


def labels_with_counts(counts, seed=0):
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y)


def batch_classes(batch, labels, num_instances):
    cls = labels[batch].reshape(-1, num_instances)
    assert (cls == cls[:, :1]).all(), "each class block must hold num_instances samples of one class"
    return [int(c) for c in cls[:, 0]]


@pytest.mark.parametrize("num_instances,batch_size", [(2, 16), (4, 16), (3, 20), (1, 5)])
def test_structure_centre_plus_neighbours(num_instances, batch_size):
    n_cls = 30
    counts = np.random.default_rng(1).integers(1, 9, size=n_cls)
    y = labels_with_counts(counts)
    table = knn_table(n_cls, 12)
    s = GraphSampler(y, batch_size=batch_size, num_instances=num_instances, neighbors=table, seed=0)
    P = batch_size // num_instances
    batches = list(s)
    assert len(batches) == len(s) == n_cls
    centres = []
    use = Counter()
    for b in batches:
        assert b.dtype == np.int64 and b.shape == (P * num_instances,)
        cls = batch_classes(b, y, num_instances)
        assert len(set(cls)) == P  # distinct classes
        centres.append(cls[0])
        assert cls[1:] == [int(c) for c in table[cls[0]][: P - 1]]  # nearest classes, in order
        use.update(b.tolist())
    assert sorted(centres) == list(range(n_cls))  # every class a centre exactly once
    assert centres != sorted(centres)  # whole batches shuffled
    # cyclic pointer over a shuffled per-class list: within a class, sample use differs by at most 1
    for c in range(n_cls):
        idx = np.flatnonzero(y == c)
        n_use = np.array([use[i] for i in idx])
        assert n_use.max() - n_use.min() <= 1, c


def test_skips_duplicates_self_and_empty_classes_and_fills():
    # classes 0..5 have samples, 6 and 7 none; row 0 lists itself, a duplicate and empty classes
    y = labels_with_counts([3, 3, 3, 3, 3, 3, 0, 0])
    table = np.array(
        [
            [0, 2, 2, 6, 7, 1],
            [2, 3, 4, 5, 0, 6],
            [1, 0, 3, 4, 5, 7],
            [7, 6, 0, 1, 2, 4],
            [5, 0, 1, 2, 3, 6],
            [4, 3, 2, 1, 0, 6],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 2, 3, 4, 5],
        ]
    )
    s = GraphSampler(y, batch_size=8, num_instances=2, neighbors=table, seed=3)
    assert len(s) == 6
    for b in s:
        cls = batch_classes(b, y, 2)
        if cls[0] == 0:
            assert cls[:3] == [0, 2, 1]  # self, the duplicate and the empty classes skipped
        if cls[0] == 3:
            assert cls == [3, 0, 1, 2]
        assert not {6, 7} & set(cls)
    # a short table row is topped up with random other classes, so batches keep their size
    short = GraphSampler(y, batch_size=8, num_instances=2, neighbors=table[:, :1], seed=0)
    for b in short:
        cls = batch_classes(b, y, 2)
        assert len(cls) == 4 and len(set(cls)) == 4 and not {6, 7} & set(cls)


def test_no_table_and_few_classes():
    y = labels_with_counts([2] * 10)
    s = GraphSampler(y, batch_size=8, num_instances=2, seed=0)
    centres = []
    for b in s:
        cls = batch_classes(b, y, 2)
        assert len(set(cls)) == 4
        centres.append(cls[0])
    assert sorted(centres) == list(range(10))
    tiny = GraphSampler(labels_with_counts([1, 1, 1]), batch_size=16, num_instances=2, seed=0)
    for b in tiny:
        assert sorted(set(batch_classes(b, tiny.labels, 2))) == [0, 1, 2]  # all classes, repeated samples


def test_seeding_and_epochs():
    y = labels_with_counts([4] * 20)
    table = knn_table(20, 6)
    a = GraphSampler(y, 8, 2, neighbors=table, seed=5)
    b = GraphSampler(y, 8, 2, neighbors=table, seed=5)
    e0a, e0b = list(a), list(b)
    assert all(np.array_equal(u, v) for u, v in zip(e0a, e0b))
    e1a = list(a)  # iterating again advances the epoch
    assert a.epoch == 2 and not all(np.array_equal(u, v) for u, v in zip(e0a, e1a))
    a.set_epoch(1)
    assert all(np.array_equal(u, v) for u, v in zip(e1a, list(a)))
    a.set_epoch(0)
    assert all(np.array_equal(u, v) for u, v in zip(e0a, list(a)))
    c = GraphSampler(y, 8, 2, neighbors=table, seed=6)
    assert not all(np.array_equal(u, v) for u, v in zip(e0a, list(c)))
    assert GraphSampler(y, 8, 2).seed != GraphSampler(y, 8, 2).seed  # None draws a seed
    assert "GraphSampler(" in repr(a) and "table" in repr(a)


def test_callable_neighbors_follow_the_table():
    y = labels_with_counts([2] * 12)
    tables = [knn_table(12, 5, seed=0), knn_table(12, 5, seed=1)]
    calls = []

    def current():
        calls.append(1)
        return tables[(len(calls) - 1) % 2]

    s = GraphSampler(y, 6, 2, neighbors=current, seed=0)
    for epoch in range(2):
        for b in s:
            cls = batch_classes(b, y, 2)
            assert cls[1:] == [int(c) for c in tables[epoch][cls[0]][:2]]
    assert len(calls) == 2  # once per epoch
    assert "callable" in repr(s)


def test_input_zoo_and_errors():
    y = labels_with_counts([3] * 6)
    s = GraphSampler(y.astype(np.float64), 4, 2, neighbors=knn_table(6, 3).astype(np.int32), seed=0)
    assert len(list(s)) == 6
    with pytest.raises(ValueError, match="labels"):
        GraphSampler(np.array([0, -1, 2]), 4, 2)
    with pytest.raises(ValueError, match="labels"):
        GraphSampler(np.array([], dtype=np.int64), 4, 2)
    with pytest.raises(TypeError, match="labels"):
        GraphSampler(np.array([0.5, 1.0]), 4, 2)
    with pytest.raises(ValueError, match="batch_size"):
        GraphSampler(y, 1, 2)
    with pytest.raises(ValueError, match="num_instances"):
        GraphSampler(y, 4, 0)
    with pytest.raises(TypeError, match="batch_size"):
        GraphSampler(y, 4.5, 2)
    with pytest.raises(ValueError, match="neighbors"):
        GraphSampler(y, 4, 2, neighbors=knn_table(5, 3))  # fewer rows than classes
    with pytest.raises(ValueError, match="neighbors"):
        GraphSampler(y, 4, 2, neighbors=np.full((6, 2), 9))
    with pytest.raises(ValueError, match="neighbors"):
        GraphSampler(y, 4, 2, neighbors=np.zeros(6, np.int64))
    with pytest.raises(TypeError, match="neighbors"):
        GraphSampler(y, 4, 2, neighbors=np.zeros((6, 2)))
    bad = GraphSampler(y, 4, 2, neighbors=lambda: np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="neighbors"):
        list(bad)
    with pytest.raises(ValueError, match="seed"):
        GraphSampler(y, 4, 2, seed=-1)


def test_huge_class_ids_cost_no_dense_tables():
    # the per-class lookups are sized by the classes present: ids up to 2^62 need no max-id-sized
    # allocation (under memory overcommit such an allocation got the process killed, not a MemoryError)
    s = GraphSampler(np.array([0, 10**12, 0, 2**62, 10**12]), batch_size=4, num_instances=2, seed=3)
    assert s.classes.tolist() == [0, 10**12, 2**62] and len(s) == 3
    batches = list(s)
    assert len(batches) == 3 and all(b.size == 4 for b in batches)
    with pytest.raises(ValueError, match="neighbors: expected at least"):
        GraphSampler(np.array([0, 10**12]), 4, 2, neighbors=np.zeros((4, 2), np.int64))


def test_groups_of_centres_and_their_nearest():
    y = labels_with_counts([3] * 8 + [0] + [3] * 3)  # class 8 has no samples
    table = np.array([[1, 2, 3], [0, 2, 3], [8, 0, 3], [2, 1, 0], [5, 6, 7], [4, 6, 7], [7, 5, 4], [6, 5, 4],
                      [0, 1, 2], [10, 11, 0], [9, 11, 0], [10, 9, 0]])  # fmt: skip
    s = GraphSampler(y, batch_size=16, num_instances=2, neighbors=table, seed=0, group_size=3)
    rng = np.random.default_rng(0)
    # groups of 3, 3 and the remaining 2 of P = 8: a centre, then its nearest not yet in the batch (class
    # 8, without samples, is skipped); a centre already in the batch still leads its group, and what a
    # group cannot fill (0's row has only 1 new class) passes to the next group
    assert s.batch_classes([2, 0, 4], table, rng) == [2, 0, 3, 1, 4, 5, 6, 7]
    assert s.batch_classes([1, 0, 9], table, rng)[:7] == [1, 0, 2, 3, 9, 10, 11]  # + 1 random filler
    got = s.batch_classes([1, 0, 9], table, np.random.default_rng(0))
    assert len(got) == len(set(got)) == 8 and 8 not in got
    # an epoch: 11 classes with samples, 3 centres per batch -> 4 batches; every class leads a group once
    assert len(s) == 4
    led = Counter()
    for b in s:
        cls = batch_classes(b, y, 2)
        assert len(cls) == len(set(cls)) == 8 and 8 not in cls
        led.update(cls)
    assert set(led) == set(range(12)) - {8}
    # group_size=1: batches of P random centres, each class exactly once per epoch (the last batch is
    # topped up with random others)
    one = GraphSampler(y, 8, 2, neighbors=table, seed=1, group_size=1)
    seen = [c for b in one for c in batch_classes(b, y, 2)]
    assert len(one) == 3 and set(seen[:8]).isdisjoint(seen[8:8]) and sorted(set(seen)) == sorted(led)
    assert sorted(seen[:8]) == sorted(set(seen[:8]))
    assert "group_size=1" in repr(one) and "group_size" not in repr(GraphSampler(y, 8, 2, seed=0))
    with pytest.raises(ValueError, match="group_size"):
        GraphSampler(y, 8, 2, group_size=0)


def test_default_group_is_the_whole_batch():
    # group_size=P is the QAConv-GS sampler bit for bit (the default)
    y = labels_with_counts([3] * 20)
    table = knn_table(20, 6)
    a = list(GraphSampler(y, 8, 2, neighbors=table, seed=2))
    b = list(GraphSampler(y, 8, 2, neighbors=table, seed=2, group_size=4))
    assert len(a) == len(b) == 20 and all(np.array_equal(u, v) for u, v in zip(a, b))
