"""The four data shapes ``Trainer.fit`` accepts, each turned into ``epoch -> (batches, length or None)``:
an iterable of ``(features, labels)`` batches that can be iterated again, a callable ``epoch -> iterable``,
``(features, labels, sampler)`` with a sampler of index arrays, and ``(features, labels, batch_size)``
(shuffled, seeded by ``(seed, epoch)``); ``unpack`` splits one batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ._validate import as_float32, as_labels, check_int


def epoch_batches(
    data: Any, epochs: int, seed: Callable[[], int]
) -> Callable[[int], tuple[Iterable, int | None]]:
    """Normalise ``data`` into ``epoch -> (iterable of (features, labels), length or None)``; ``seed()``: the
    trainer's seed, read at every epoch."""
    if isinstance(data, tuple) and len(data) == 3 and not looks_like_batch(data[2]):
        features = as_float32(data[0], "features", 4)
        labels = as_labels(data[1], "labels", n=features.shape[0])
        sampler = data[2]
        if isinstance(sampler, (int, np.integer)) and not isinstance(sampler, bool):
            batch_size = check_int(sampler, "batch_size", lo=1)
            n = features.shape[0]

            def shuffled(epoch: int) -> tuple[Iterable, int]:
                order = np.random.default_rng([seed(), epoch]).permutation(n)
                chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
                return ((features[c], labels[c]) for c in chunks), len(chunks)

            return shuffled
        if not hasattr(sampler, "__iter__"):
            raise TypeError(
                "data: expected (features, labels, sampler) with a sampler yielding index arrays "
                f"(e.g. GraphSampler) or an int batch size, got {type(sampler).__name__}"
            )

        def sampled(epoch: int) -> tuple[Iterable, int | None]:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            size = len(sampler) if hasattr(sampler, "__len__") else None
            return ((features[idx], labels[idx]) for idx in (np.asarray(i) for i in sampler)), size

        return sampled
    if callable(data):

        def called(epoch: int) -> tuple[Iterable, int | None]:
            batches = data(epoch)
            return batches, (len(batches) if hasattr(batches, "__len__") else None)

        return called
    if not hasattr(data, "__iter__"):
        raise TypeError(
            "data: expected an iterable of (features, labels) batches, a callable epoch -> iterable, or "
            f"(features, labels, sampler), got {type(data).__name__}"
        )
    if iter(data) is data and epochs > 1:
        raise TypeError(
            "data: a one-shot iterator (e.g. a generator) cannot be re-iterated for several epochs; pass "
            "a list, a callable epoch -> iterable, or (features, labels, sampler)"
        )
    return lambda epoch: (data, len(data) if hasattr(data, "__len__") else None)


def looks_like_batch(x: object) -> bool:
    """True for a (features, labels) pair or an array (so a 3-tuple of batches is not a sampler tuple)."""
    return isinstance(x, (tuple, list, np.ndarray)) or (hasattr(x, "shape") and hasattr(x, "dtype"))


def unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        return batch["features"], batch["labels"]
    try:
        features, labels = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"data: each batch must be a (features, labels) pair, got {type(batch).__name__}"
        ) from None
    return features, labels
