"""Concurrency: kernels called from 8 Python threads at once give the serial results bit for bit, and the
GIL is released inside kernels (another Python thread makes progress while a long kernel runs)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import qaconv_gs as qg
from qaconv_gs import _native
from qaconv_gs import functional as F

THREADS = 8
ROUNDS = 6
SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "")  # kernels ~10x slower: smaller long calls


def _same(a, b):
    if isinstance(a, tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    elif hasattr(a, "grad_features"):  # StepResult
        for name in ("loss", "scores", "grad_features", "grad_embed_ids", "grad_embed_rows"):
            _same(getattr(a, name), getattr(b, name))
        for k in a.grad_head:
            _same(a.grad_head[k], b.grad_head[k])
    else:
        assert a == b


def _workloads(seed: int):
    """Independent calls touching every kernel family, each with its own inputs (and model)."""
    rng = np.random.default_rng(seed)
    N, C, H, W, B = 40, 16, 6, 4, 8
    X = rng.standard_normal((B, C, H, W)).astype(np.float32)
    G = rng.standard_normal((7, C, H, W)).astype(np.float32)
    E = rng.standard_normal((N, C, H, W)).astype(np.float32)
    y = rng.integers(0, N, B)
    cand = rng.integers(0, N, (B, 5))
    sc = rng.standard_normal((B, 6)).astype(np.float32)
    sq = rng.standard_normal((B, B)).astype(np.float32)
    head = F.init_head(H * W, rng=np.random.default_rng(seed))
    mp, mg, ap, ag = F.pair_maxima(X, G, return_argmax=True, n_threads=1)
    model_seed = seed  # each workload builds its model fresh, so repeated runs start from the same state

    def step():
        m = qg.QAConvGS(N, C, H, W, k_nearest=4, seed=model_seed, n_threads=2, triplet="batch")
        return m.forward_backward(X, y)

    def head_train():
        h = {k: v.copy() for k, v in head.items()}
        logits, cache = F.head_forward(mp, mg, h, n_threads=2)
        return (logits, *F.head_backward(np.ones_like(logits), cache)[:2], h["bn.running_var"])

    return [
        lambda: F.normalize(X, n_threads=2),
        lambda: F.pair_maxima(X, G, return_argmax=True, n_threads=2),
        lambda: F.pair_maxima_restricted(X, E, cand, return_argmax=True, n_threads=1),
        lambda: F.pair_maxima_backward(mp, mg, ap, ag, X, G, n_threads=2),
        lambda: F.match_scores(X, G, np.ones(2 * H * W, np.float32), 0.25, n_threads=2),
        lambda: qg.class_neighbors(E, 5, return_similarity=True, n_threads=2),
        lambda: F.class_loss(sc, n_threads=2),
        lambda: F.batch_triplet(sq, y % 3, n_threads=2),
        lambda: F.pairwise_bce(sq, y % 3, n_threads=1),
        lambda: F.focal_class_memory(sc, y % 6, n_threads=2),
        lambda: qg.match(X, G, head, n_threads=2),
        head_train,
        step,
    ]


def test_eight_threads_give_the_serial_results():
    per_thread = [_workloads(seed) for seed in range(THREADS)]
    expected = [[fn() for fn in work] for work in per_thread]  # serial, one call at a time
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    mismatches: list[str] = []

    def run(t: int) -> None:
        try:
            barrier.wait()
            for r in range(ROUNDS):
                work = per_thread[t]
                order = range(len(work)) if (t + r) % 2 == 0 else reversed(range(len(work)))
                for i in order:  # mixed orders: different kernels overlap in time
                    try:
                        _same(work[i](), expected[t][i])
                    except AssertionError:
                        mismatches.append(f"thread {t} round {r} call {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    assert not mismatches, mismatches


def test_one_model_shared_by_threads_serialises_steps():
    """QAConvGS holds a lock: concurrent forward_backward / identify / save on one model stay consistent."""
    rng = np.random.default_rng(3)
    model = qg.QAConvGS(30, 8, 4, 2, k_nearest=3, seed=1, n_threads=2)
    X = rng.standard_normal((6, 8, 4, 2)).astype(np.float32)
    y = np.arange(6)
    model.eval()  # running statistics frozen: every step gives the same result
    want_step = model.forward_backward(X, y)
    want_ids = model.identify(X, top=3)
    errors = []

    def run():
        try:
            for _ in range(10):
                _same(model.forward_backward(X, y), want_step)
                _same(model.identify(X, top=3), want_ids)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors


@pytest.mark.parametrize("kernel", ["class_neighbors", "pair_maxima"])
def test_gil_is_released_while_a_kernel_runs(kernel):
    """A Python thread counts loop iterations while another thread is inside one long kernel call. If the
    binding held the GIL, the counter could advance only at the kernel's 50 ms signal polls (a handful of
    steps); with the GIL released it runs freely. We assert on progress events inside the call's window."""
    rng = np.random.default_rng(0)
    if kernel == "class_neighbors":
        E = rng.standard_normal((400 if SANITIZED else 1500, 1024)).astype(np.float32)

        def call():
            return _native.neighbors_topk(E, 8, 1, False)

    else:
        P = rng.standard_normal((8 if SANITIZED else 32, 64, 192)).astype(np.float32)

        def call():
            return _native.match_maxima(P, P, False, 1)

    t0 = time.perf_counter()
    call()
    single = time.perf_counter() - t0
    if single < 0.05:
        pytest.skip(f"kernel too fast on this machine ({single:.3f} s) to observe")

    window = {}
    started = threading.Event()

    def worker():
        started.set()
        window["t0"] = time.perf_counter()
        call()
        window["t1"] = time.perf_counter()

    stamps = []
    th = threading.Thread(target=worker)
    th.start()
    started.wait()
    while th.is_alive():
        stamps.append(time.perf_counter())
        for _ in range(200):  # a little pure-Python work per step
            pass
    th.join()
    t0, t1 = window["t0"], window["t1"]
    inside = [s for s in stamps if t0 < s < t1]
    polls = (t1 - t0) / 0.05 + 2  # what the signal polls alone could let through
    assert len(inside) > 20 * polls, (len(inside), t1 - t0)
    # and the progress is spread over the call, not bunched at its ends
    mid = [s for s in inside if t0 + 0.25 * (t1 - t0) < s < t0 + 0.75 * (t1 - t0)]
    assert len(mid) > 5 * polls, (len(mid), t1 - t0)
