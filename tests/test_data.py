"""Synthetic data set: shapes, determinism, shared structure between classes, the per-class split."""

from __future__ import annotations

import numpy as np
import pytest
from qaconv_gs.data import make_synthetic, split_per_class


def _unit(x):
    v = x.reshape(len(x), -1).astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_shapes_and_determinism():
    x, y = make_synthetic(7, 5, channels=8, height=6, width=3, seed=2)
    assert x.shape == (35, 8, 6, 3) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.dtype == np.int64 and np.array_equal(y, np.repeat(np.arange(7), 5))
    x2, y2 = make_synthetic(7, 5, channels=8, height=6, width=3, seed=2)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = make_synthetic(7, 5, channels=8, height=6, width=3, seed=3)
    assert not np.allclose(x, x3)
    assert np.isfinite(x).all()
    x1, y1 = make_synthetic(1, 1, channels=1, height=1, width=1)
    assert x1.shape == (1, 1, 1, 1) and y1.tolist() == [0]


def test_classes_share_structure():
    # noise-free templates: every class has a clearly similar class (its family), unlike a random pair
    t, _ = make_synthetic(60, 1, noise=0.0, occlusion=0.0, max_shift=0, seed=0)
    sim = _unit(t) @ _unit(t).T
    np.fill_diagonal(sim, np.nan)
    nearest = np.nanmax(sim, axis=1)
    assert nearest.mean() > 0.35 and np.nanmean(sim) < 0.15
    # a family of one (family_size=1) has no such neighbours
    t1, _ = make_synthetic(60, 1, noise=0.0, occlusion=0.0, max_shift=0, family_size=1, seed=0)
    s1 = _unit(t1) @ _unit(t1).T
    np.fill_diagonal(s1, np.nan)
    assert np.nanmax(s1, axis=1).mean() < nearest.mean() - 0.15


def test_samples_identifiable_but_not_trivially():
    # nearest class mean on held-out samples: far above chance (1/50) but not solved
    x, y = make_synthetic(50, 10, seed=1)
    xtr, ytr, xte, yte = split_per_class(x, y, held_out=2, seed=0)
    means = np.stack([xtr[ytr == c].mean(0) for c in range(50)])
    acc = np.mean((_unit(xte) @ _unit(means).T).argmax(1) == yte)
    assert 0.2 < acc < 0.9


def test_noise_shift_occlusion_do_something():
    base = make_synthetic(5, 4, noise=0.0, occlusion=0.0, max_shift=0, seed=4)[0]
    assert np.array_equal(base[0], base[1])  # no augmentation: identical samples of a class
    for kw in ({"noise": 0.3}, {"occlusion": 1.0}, {"max_shift": 2}):
        x = make_synthetic(5, 4, **{"noise": 0.0, "occlusion": 0.0, "max_shift": 0, **kw}, seed=4)[0]
        assert not all(np.array_equal(x[4 * c], x[4 * c + i]) for c in range(5) for i in range(1, 4)), kw


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"samples_per_class": 0}, ValueError, "samples_per_class"),
        ({"channels": 2.5}, TypeError, "channels"),
        ({"noise": -1.0}, ValueError, "noise"),
        ({"mutation": 1.5}, ValueError, "mutation"),
        ({"occlusion": float("nan")}, ValueError, "occlusion"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_make_synthetic_errors(kwargs, exc, match):
    args = {"num_classes": 3, "samples_per_class": 2, **kwargs}
    with pytest.raises(exc, match=match):
        make_synthetic(**args)


def test_split_per_class():
    x, y = make_synthetic(6, 5, channels=4, height=2, width=2, seed=0)
    xtr, ytr, xte, yte = split_per_class(x, y, held_out=2, seed=1)
    assert len(xtr) == 18 and len(xte) == 12
    assert np.array_equal(np.bincount(yte), [2] * 6) and np.array_equal(np.bincount(ytr), [3] * 6)
    # disjoint and complete: every original row lands in exactly one part
    rows = {r.tobytes() for r in x}
    assert {r.tobytes() for r in xtr} | {r.tobytes() for r in xte} == rows
    assert not {r.tobytes() for r in xtr} & {r.tobytes() for r in xte}
    a = split_per_class(x, y, held_out=2, seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, (xtr, ytr, xte, yte)))
    _, _, _, yf = split_per_class(x, y, held_out=0.4, seed=0)
    assert np.array_equal(np.bincount(yf), [2] * 6)
    # inputs are not modified; float64 and non-contiguous accepted
    x64 = np.asfortranarray(x.astype(np.float64))
    copy = x64.copy()
    split_per_class(x64, y, held_out=1)
    assert np.array_equal(x64, copy)
    with pytest.raises(ValueError, match="held_out"):
        split_per_class(x, y, held_out=5)
    with pytest.raises(ValueError, match="held_out"):
        split_per_class(x, y, held_out=1.5)
    with pytest.raises(ValueError, match="held_out"):
        split_per_class(x, y, held_out=0)
    with pytest.raises(ValueError, match="labels"):
        split_per_class(x, y[:-1])
