"""A built-in synthetic re-identification data set whose identities share structure.

Real re-ID identities are not independent random points: people share clothing colours, bags, poses. The
generator mimics that at the level of a backbone's feature maps ([C, H, W], one C-vector per location):

* a bank of ``num_parts`` random unit "part" vectors (local appearance prototypes: a red jacket, a bag...);
* identities come in *families* of about ``family_size``: a family has a layout (which part sits at each
  of the H*W locations); a member class re-draws a fraction ``mutation`` of the locations and adds its own
  small per-location detail vectors. Classes of one family are each other's nearest classes, so
  neighbour-restricted training has real hard negatives to learn from;
* every sample is its class template with a random spatial shift of up to ``max_shift`` locations (rolled),
  with probability ``occlusion`` a horizontal band replaced by random parts (an occluder), plus Gaussian noise
  of per-location norm about ``noise``.

Real images that install offline (Hangul glyphs of Debian's Korean typefaces) are in ``qaconv_gs.glyphs``;
``font_glyphs`` and ``glyph_split`` are re-exported here.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float32, as_labels, check_int, check_real
from .glyphs import font_glyphs, glyph_split

__all__ = ["font_glyphs", "glyph_split", "make_synthetic", "split_per_class"]


def make_synthetic(
    num_classes: int,
    samples_per_class: int,
    channels: int = 32,
    height: int = 8,
    width: int = 4,
    seed: int = 0,
    noise: float = 0.6,
    num_parts: int = 24,
    family_size: int = 4,
    mutation: float = 0.3,
    detail: float = 0.5,
    max_shift: int = 1,
    occlusion: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate a synthetic feature-map data set (deterministic for a given seed).

    Args:
        num_classes: N identities, >= 1.
        samples_per_class: samples per identity, >= 1.
        channels, height, width: feature-map shape C, H, W.
        seed: the generator seed; the same arguments give bit-identical arrays.
        noise: per-location Gaussian noise norm (the templates have per-location norm about 1).
        num_parts: size of the shared part bank.
        family_size: identities per family (classes of a family share most of their layout).
        mutation: fraction of locations a class re-draws from its family layout, in [0, 1].
        detail: norm of each class's own per-location detail vector.
        max_shift: largest random spatial shift (in locations, along H and W).
        occlusion: probability that a sample has a horizontal band occluded, in [0, 1].

    Returns:
        features [N * samples_per_class, C, H, W] float32 and labels [N * samples_per_class] int64, grouped
        by class (class 0's samples first).
    """
    n_cls = check_int(num_classes, "num_classes", lo=1)
    per = check_int(samples_per_class, "samples_per_class", lo=1)
    C = check_int(channels, "channels", lo=1)
    H = check_int(height, "height", lo=1)
    W = check_int(width, "width", lo=1)
    seed = check_int(seed, "seed", lo=0)
    noise = check_real(noise, "noise", lo=0.0)
    n_parts = check_int(num_parts, "num_parts", lo=1)
    fam = check_int(family_size, "family_size", lo=1)
    mutation = check_real(mutation, "mutation", lo=0.0, hi=1.0)
    detail = check_real(detail, "detail", lo=0.0)
    max_shift = check_int(max_shift, "max_shift", lo=0)
    occlusion = check_real(occlusion, "occlusion", lo=0.0, hi=1.0)

    rng = np.random.default_rng(seed)
    S = H * W
    parts = rng.standard_normal((n_parts, C))
    parts /= np.linalg.norm(parts, axis=1, keepdims=True)

    n_fam = -(-n_cls // fam)
    family_layout = rng.integers(0, n_parts, size=(n_fam, S))
    family_of = rng.permutation(n_cls) % n_fam  # families are not contiguous id ranges
    layout = family_layout[family_of].copy()
    redraw = rng.random((n_cls, S)) < mutation
    layout[redraw] = rng.integers(0, n_parts, size=int(redraw.sum()))
    own = rng.standard_normal((n_cls, S, C)) * (detail / np.sqrt(C))
    templates = parts[layout] + own  # [N, S, C]
    templates = templates.reshape(n_cls, H, W, C).transpose(0, 3, 1, 2)  # [N, C, H, W]

    n = n_cls * per
    labels = np.repeat(np.arange(n_cls, dtype=np.int64), per)
    x = templates[labels].copy()
    if max_shift > 0:
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        for i in range(n):
            dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
            if dy or dx:
                x[i] = np.roll(x[i], (dy, dx), axis=(1, 2))
    if occlusion > 0:
        occluded = np.flatnonzero(rng.random(n) < occlusion)
        band = max(1, H // 4)
        for i in occluded:
            top = int(rng.integers(0, H - band + 1))
            occ = parts[rng.integers(0, n_parts, size=band * W)]  # [band*W, C]
            x[i, :, top : top + band, :] = occ.reshape(band, W, C).transpose(2, 0, 1)
    x += rng.standard_normal(x.shape) * (noise / np.sqrt(C))
    return np.ascontiguousarray(x, dtype=np.float32), labels


def split_per_class(
    features: object,
    labels: object,
    held_out: int | float = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split a labelled set into a training part and a held-out part with every class in both.

    Args:
        features: [n, ...] array (any real dtype; returned as float32).
        labels: [n] integer class ids.
        held_out: samples per class to hold out (int >= 1), or a fraction in (0, 1) of each class's samples
            (rounded, at least 1). Every class keeps at least one training sample.
        seed: shuffling seed (which samples are held out).

    Returns:
        (train_features, train_labels, test_features, test_labels); within each part the samples keep their
        original relative order.
    """
    y = as_labels(labels, "labels")
    x = as_float32(features, "features", allow_empty=False)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"labels: expected length {x.shape[0]} (features.shape[0]), got {y.shape[0]}")
    if isinstance(held_out, (float, np.floating)) and not float(held_out).is_integer():
        frac = check_real(held_out, "held_out", lo=0.0, hi=1.0)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"held_out: expected a fraction in (0, 1) or an integer >= 1, got {held_out}")
        count = None
    else:
        count = check_int(int(held_out) if isinstance(held_out, float) else held_out, "held_out", lo=1)
        frac = None
    rng = np.random.default_rng(check_int(seed, "seed", lo=0))
    test = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        want = count if count is not None else max(1, int(round(frac * idx.size)))
        if want >= idx.size:
            raise ValueError(
                f"held_out: class {int(c)} has {idx.size} sample(s); "
                f"holding out {want} leaves none for training"
            )
        test[rng.choice(idx, size=want, replace=False)] = True
    return x[~test], y[~test], x[test], y[test]
