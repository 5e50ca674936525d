"""Bad-input zoo: every public function and the CLI against wrong types, shapes, values and layouts.

Each case either raises ValueError / TypeError / MemoryError whose message names the argument, or returns
a correct result (checked against the plain float32 call or a float64 reference). Every case also checks
that no input array was modified. Cases run in-process (a crash would take pytest down with it, which CI
reports as a failure); the C overflow guards, which must never touch memory, run in a subprocess.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import oracle
import pytest
import qaconv_gs as qg
from qaconv_gs import _native
from qaconv_gs import functional as F
from qaconv_gs.cli import main as cli_main

RNG = np.random.default_rng(2024)
N, C, H, W = 6, 4, 3, 2
S = H * W
X4 = RNG.standard_normal((5, C, H, W)).astype(np.float32)  # feature maps
G4 = RNG.standard_normal((3, C, H, W)).astype(np.float32)
E2 = RNG.standard_normal((N, 8)).astype(np.float32)  # class vectors
Y = np.array([0, 1, 2, 3, 0])
SC = RNG.standard_normal((5, 4)).astype(np.float32)  # restricted scores
SQ = RNG.standard_normal((5, 5)).astype(np.float32)  # square scores
HEAD = F.init_head(S, rng=np.random.default_rng(0))
F32_MAX = float(np.finfo(np.float32).max)


def model(**kw):
    args = dict(num_classes=N, channels=C, height=H, width=W, k_nearest=2, seed=0)
    args.update(kw)
    return qg.QAConvGS(**args)


def misaligned(a: np.ndarray, offset: int) -> np.ndarray:
    """A read-only view of a's values whose data pointer is `offset` bytes past an aligned address."""
    raw = b"\0" * offset + np.ascontiguousarray(a).tobytes()
    out = np.frombuffer(raw, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
    assert out.ctypes.data % a.dtype.itemsize != 0 or a.dtype.itemsize == 1
    return out


def big_endian(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder(">"))


def same(a, b):
    """Recursive exact equality of results (arrays, tuples, NamedTuples, floats)."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.asarray(b).dtype
    else:
        assert a == b or (a != a and b != b)


def finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a, dtype=np.float64)))


# ------------------------------------------------------------------------------------ the case table
#
# A case is (id, call, expect): call() -> (function, args, kwargs) builds fresh inputs; expect is either
# (ExceptionType, regex naming the argument) or a function check(result, args, kwargs) for accepted input.

CASES = []


def case(id_, expect):
    def deco(build):
        CASES.append(pytest.param(build, expect, id=id_))
        return build

    return deco


def err(exc, match):
    return (exc, match)


# -- wrong types -------------------------------------------------------------------------------------


@case("normalize-list-of-strings", err(TypeError, "^x: .*dtype <U"))
def _():
    return F.normalize, ([[["a", "b"]]],), {}


@case("normalize-None", err(TypeError, "^x: expected an array, got None"))
def _():
    return F.normalize, (None,), {}


@case("normalize-object-array", err(TypeError, "^x: .*dtype object"))
def _():
    return F.normalize, (X4.astype(object),), {}


@case("pair_maxima-complex", err(TypeError, "^probe: .*complex"))
def _():
    return F.pair_maxima, (X4.astype(np.complex64), G4), {}


@case("class_loss-bool", err(TypeError, "^scores: .*bool"))
def _():
    return F.class_loss, (SC > 0,), {}


@case("class_neighbors-string", err(TypeError, "^E: "))
def _():
    return qg.class_neighbors, ("abc", 1), {}


@case("class_neighbors-ragged-list", err(TypeError, "^E: could not be converted"))
def _():
    return qg.class_neighbors, ([[1.0, 2.0], [3.0]], 1), {}


@case("head_forward-None", err(TypeError, "^mp: expected an array, got None"))
def _():
    return F.head_forward, (None, SC, F.init_head(4)), {}


@case("match-head_state-None", err(TypeError, "^head_state: expected a mapping"))
def _():
    return qg.match, (X4, G4, None), {}


@case("batch_triplet-string-labels", err(TypeError, "^labels: expected an integer array"))
def _():
    return F.batch_triplet, (SQ, list("abcab")), {}


@case("restricted-float-candidates", err(TypeError, "^candidates: expected an integer array"))
def _():
    return F.pair_maxima_restricted, (X4, G4, np.zeros((5, 2))), {}


@case("backward-int64-argmax", err(TypeError, "^argmax_p: expected a uint16 array"))
def _():
    mp, mg, ap, ag = F.pair_maxima(X4, G4, return_argmax=True)
    return F.pair_maxima_backward, (mp, mg, ap.astype(np.int64), ag, X4, G4), {}


@case("pair_maxima-return_argmax-str", err(TypeError, "^return_argmax: expected a bool"))
def _():
    return F.pair_maxima, (X4, G4), {"return_argmax": "no"}


@case("class_neighbors-return_similarity-int", err(TypeError, "^return_similarity: expected a bool"))
def _():
    return qg.class_neighbors, (E2, 1), {"return_similarity": 1}


@case("QAConvGS-num_classes-str", err(TypeError, "^num_classes: expected an integer, got str"))
def _():
    return qg.QAConvGS, ("6", C, H, W), {}


@case("forward_backward-labels-None", err(TypeError, "^labels: expected an array, got None"))
def _():
    return model().forward_backward, (X4, None), {}


@case("head_backward-foreign-cache", err(TypeError, "^cache: expected the cache returned by head_forward"))
def _():
    return F.head_backward, (np.ones(3), object()), {}


def _accepted_as_float32(fn_name):
    """check(): the result equals the same call on the float32 C-contiguous copies of every array."""

    def check(result, args, kwargs):
        canon = [np.ascontiguousarray(a, dtype=np.float32) if isinstance(a, np.ndarray) else a for a in args]
        if fn_name == "class_neighbors":
            canon[0] = np.ascontiguousarray(np.asarray(args[0], dtype=np.float32))
        same(result, FUNCS[fn_name](*canon, **kwargs))

    return check


FUNCS = {"normalize": F.normalize, "class_neighbors": qg.class_neighbors, "pair_maxima": F.pair_maxima}


@case("normalize-int32-accepted", _accepted_as_float32("normalize"))
def _():
    return F.normalize, ((X4 * 10).astype(np.int32),), {}


@case("class_neighbors-nested-list-accepted", _accepted_as_float32("class_neighbors"))
def _():
    return qg.class_neighbors, (E2.tolist(), 2), {}


@case("pair_maxima-float16-accepted", _accepted_as_float32("pair_maxima"))
def _():
    return F.pair_maxima, (X4.astype(np.float16), G4.astype(np.float16)), {}


# -- wrong ndim ----------------------------------------------------------------------------------------


@case("normalize-3d", err(ValueError, r"^x: expected a 4-d array, got shape \(5, 4, 3\)"))
def _():
    return F.normalize, (X4[:, :, :, 0],), {}


@case("class_neighbors-3d", err(ValueError, "^E: expected a 2-d or 4-d array"))
def _():
    return qg.class_neighbors, (E2[:, :, None], 1), {}


@case("class_loss-1d", err(ValueError, "^scores: expected a 2-d array"))
def _():
    return F.class_loss, (SC[0],), {}


@case("match-probe-3d", err(ValueError, "^probe: expected a 4-d array"))
def _():
    return qg.match, (X4[0], G4, HEAD), {}


@case("forward_backward-5d", err(ValueError, "^features: expected a 4-d array"))
def _():
    return model().forward_backward, (X4[None], Y), {}


@case("head_forward-scalar", err(ValueError, r"^mp: expected an array of shape \(..., S\), got a scalar"))
def _():
    return F.head_forward, (1.0, 1.0, F.init_head(1)), {}


# -- mismatched C / H / W ------------------------------------------------------------------------------


@case(
    "pair_maxima-C-mismatch", err(ValueError, r"^gallery: expected maps of shape \(C, H, W\) = \(4, 3, 2\)")
)
def _():
    return F.pair_maxima, (X4, G4[:, :3]), {}


@case("restricted-H-W-swapped", err(ValueError, r"^embeds: .*\(4, 3, 2\) like features, got \(4, 2, 3\)"))
def _():
    return F.pair_maxima_restricted, (X4, G4.reshape(3, C, W, H), np.zeros((5, 1), np.int64)), {}


@case("match-gallery-C-mismatch", err(ValueError, "^gallery: expected maps of shape"))
def _():
    return qg.match, (X4, G4[:, :2], HEAD), {}


@case("model.match-gallery-wrong-HW", err(ValueError, r"^gallery: expected shape \(B, 4, 3, 2\)"))
def _():
    return model().match, (X4, G4.reshape(3, C, 1, 6)), {}


@case("forward_backward-C-mismatch", err(ValueError, r"^features: expected shape \(B, 4, 3, 2\)"))
def _():
    return model().forward_backward, (X4[:, :3], Y), {}


@case("head_forward-mg-shape", err(ValueError, "^mg: expected shape"))
def _():
    return F.head_forward, (SC, SC[:2], F.init_head(4)), {}


@case("match_scores-weight-length", err(ValueError, "^weight: expected a 1-d array of length 2[*]S = 12"))
def _():
    return F.match_scores, (X4, G4, np.ones(S), 0.0), {}


@case("backward-grad-shape", err(ValueError, r"^grad_mp: expected shape \(5, 3, 6\)"))
def _():
    mp, mg, ap, ag = F.pair_maxima(X4, G4, return_argmax=True)
    return F.pair_maxima_backward, (mp[:, :2], mg, ap, ag, X4, G4), {}


@case("S-over-65535", err(ValueError, "^probe: at most 65535 locations"))
def _():
    z = np.ones((1, 1, 256, 257), np.float32)
    return F.pair_maxima, (z, z), {}


# -- empty batch, B = 1 ----------------------------------------------------------------------------------


@case("normalize-empty", err(ValueError, r"^x: expected a non-empty array, got shape \(0, 4, 3, 2\)"))
def _():
    return F.normalize, (X4[:0],), {}


@case("pair_maxima-empty-gallery", err(ValueError, "^gallery: expected a non-empty array"))
def _():
    return F.pair_maxima, (X4, G4[:0]), {}


@case("forward_backward-empty", err(ValueError, "^features: expected a non-empty array"))
def _():
    return model().forward_backward, (X4[:0], Y[:0]), {}


@case("class_loss-empty", err(ValueError, "^scores: expected a non-empty array"))
def _():
    return F.class_loss, (SC[:0],), {}


@case("identify-empty", err(ValueError, "^features: expected a non-empty array"))
def _():
    return model().identify, (X4[:0],), {}


@case("class_neighbors-zero-dim", err(ValueError, "^E: expected a non-empty array"))
def _():
    return qg.class_neighbors, (E2[:, :0], 1), {}


def _check_step_finite(result, args, kwargs):
    finite(result.loss, result.grad_features, result.grad_embed_rows, *result.grad_head.values())
    assert result.scores.shape == (np.asarray(args[0]).shape[0], 3)


@case("forward_backward-B1-class-triplet", _check_step_finite)
def _():
    return model().forward_backward, (X4[:1], Y[:1]), {}


@case("forward_backward-B1-batch-triplet", _check_step_finite)
def _():
    return model(triplet="batch").forward_backward, (X4[:1], Y[:1]), {}


@case("batch_triplet-B1", lambda r, a, k: (same(r[0], 0.0), same(r[1], np.zeros((1, 1), np.float32))))
def _():
    return F.batch_triplet, (SQ[:1, :1], [7]), {}


def _check_class_loss_ref(result, args, kwargs):
    want = oracle.class_loss(args[0], **kwargs)
    np.testing.assert_allclose(result.loss, want[0], rtol=1e-6)
    np.testing.assert_allclose(result.grad, want[5], rtol=1e-5, atol=1e-7)


@case("class_loss-B1", _check_class_loss_ref)
def _():
    return F.class_loss, (SC[:1],), {}


def _check_single_location(result, args, kwargs):
    want = np.sum(args[0].astype(np.float64) * args[1], axis=1).reshape(
        1, 1, 1
    )  # S = 1: Z is the dot product
    for r in result:
        np.testing.assert_allclose(r, want, rtol=1e-5)


@case("pair_maxima-P1-G1-S1", _check_single_location)
def _():
    return F.pair_maxima, (X4[:1, :, :1, :1], G4[:1, :, :1, :1]), {}


# -- labels ------------------------------------------------------------------------------------------------


@case("labels-out-of-range", err(ValueError, r"^labels: values must be in \[0, 6\), got 6"))
def _():
    return model().forward_backward, (X4, [0, 1, 2, 3, 6]), {}


@case("labels-negative", err(ValueError, r"^labels: values must be in \[0, 6\), got -1"))
def _():
    return model().forward_backward, (X4, [0, 1, 2, 3, -1]), {}


@case("labels-non-integral-float", err(TypeError, "^labels: expected integer values"))
def _():
    return model().forward_backward, (X4, Y + 0.5), {}


@case(
    "labels-integral-float-accepted",
    lambda r, a, k: same(r.grad_features, model().forward_backward(X4, Y).grad_features),
)
def _():
    return model().forward_backward, (X4, Y.astype(np.float64)), {}


@case("labels-wrong-length", err(ValueError, "^labels: expected length 5, got 4"))
def _():
    return model().forward_backward, (X4, Y[:4]), {}


@case("labels-2d", err(ValueError, "^labels: expected a 1-d array"))
def _():
    return F.pairwise_bce, (SQ, Y[None]), {}


@case("labels-bool", err(TypeError, "^labels: expected an integer array, got dtype bool"))
def _():
    return F.batch_triplet, (SQ, Y > 0), {}


@case("labels-float-beyond-int64", err(ValueError, r"^labels: values must fit in int64"))
def _():
    return F.batch_triplet, (SQ, np.array([1e30, 2e30, 0, 1, 2])), {}


@case("labels-uint64-beyond-int64", err(ValueError, r"^labels: values must fit in int64"))
def _():
    return F.pairwise_bce, (SQ, np.array([2**64 - 1, 0, 1, 2, 3], np.uint64)), {}


@case("focal-targets-out-of-range", err(ValueError, r"^targets: values must be in \[0, 4\), got 4"))
def _():
    return F.focal_class_memory, (SC, [0, 1, 2, 3, 4]), {}


@case("pairwise_bce-gallery_labels-length", err(ValueError, "^gallery_labels: expected length 4, got 5"))
def _():
    return F.pairwise_bce, (SC, Y, Y), {}


@case("candidates-out-of-range", err(ValueError, r"^candidates: values must be in \[0, 3\), got 3"))
def _():
    return F.pair_maxima_restricted, (X4, G4, np.full((5, 2), 3)), {}


@case("argmax-out-of-range", err(ValueError, r"^argmax_g: values must be in \[0, 6\)"))
def _():
    mp, mg, ap, ag = F.pair_maxima(X4, G4, return_argmax=True)
    return F.pair_maxima_backward, (mp, mg, ap, ag + np.uint16(6), X4, G4), {}


# -- k and N -----------------------------------------------------------------------------------------------


@case("k-zero", err(ValueError, r"^k: expected an integer in \[1, 5\]"))
def _():
    return qg.class_neighbors, (E2, 0), {}


@case("k-negative", err(ValueError, r"^k: expected an integer in \[1, 5\]"))
def _():
    return qg.class_neighbors, (E2, -3), {}


@case("k-equals-N", err(ValueError, r"^k: expected an integer in \[1, 5\].*got 6"))
def _():
    return qg.class_neighbors, (E2, N), {}


@case("k-float", err(TypeError, "^k: expected an integer, got float"))
def _():
    return qg.class_neighbors, (E2, 2.0), {}


@case(
    "k-N-minus-1-full",
    lambda r, a, k: same(np.sort(r, axis=1), np.array([[j for j in range(N) if j != i] for i in range(N)])),
)
def _():
    return qg.class_neighbors, (E2, N - 1), {}


@case("N-1-class", err(ValueError, "^E: class_neighbors needs at least 2 classes"))
def _():
    return qg.class_neighbors, (E2[:1], 1), {}


@case("QAConvGS-k_nearest-0", err(ValueError, "^k_nearest: expected 1 <= k_nearest"))
def _():
    return qg.QAConvGS, (N, C, H, W), {"k_nearest": 0}


@case("QAConvGS-k_nearest-N", err(ValueError, "^k_nearest: expected 1 <= k_nearest <= num_classes - 1 = 5"))
def _():
    return qg.QAConvGS, (N, C, H, W), {"k_nearest": N}


@case("QAConvGS-num_classes-1", err(ValueError, "^num_classes: expected >= 2"))
def _():
    return qg.QAConvGS, (1, C, H, W), {"k_nearest": 1}


@case("identify-top-0", err(ValueError, "^top: expected an integer >= 1"))
def _():
    return model().identify, (X4,), {"top": 0}


@case("identify-top-N-plus-1", err(ValueError, "^top: expected an integer <= 6"))
def _():
    return model().identify, (X4,), {"top": N + 1}


# -- NaN / Inf ------------------------------------------------------------------------------------------


def _with(a, idx, v):
    a = a.copy()
    a[idx] = v
    return a


@case("normalize-NaN", err(ValueError, "^x: contains 1 NaN or Inf"))
def _():
    return F.normalize, (_with(X4, (1, 2, 0, 1), np.nan),), {}


@case("class_neighbors-Inf", err(ValueError, "^E: contains 1 NaN or Inf"))
def _():
    return qg.class_neighbors, (_with(E2, (3, 3), np.inf), 2), {}


@case("forward_backward-NaN-features", err(ValueError, "^features: contains 1 NaN or Inf"))
def _():
    return model().forward_backward, (_with(X4, (0, 0, 0, 0), np.nan), Y), {}


@case("forward_backward-NaN-class-embedding", err(ValueError, "NaN or Inf"))
def _():
    m = model()
    m.class_embed[2, 1, 1, 1] = np.nan
    return m.forward_backward, (X4, Y), {}


@case("class_loss-Inf", err(ValueError, "^scores: contains 1 NaN or Inf"))
def _():
    return F.class_loss, (_with(SC, (0, 1), -np.inf),), {}


@case("head_backward-NaN", err(ValueError, "^grad_logits: contains"))
def _():
    _, cache = F.head_forward(SC, SC, F.init_head(4))
    return F.head_backward, (_with(np.ones(5, np.float32), 2, np.nan), cache), {}


@case("backward-Inf-grad", err(ValueError, "^grad_mg: contains"))
def _():
    mp, mg, ap, ag = F.pair_maxima(X4, G4, return_argmax=True)
    return F.pair_maxima_backward, (mp, _with(mg, (0, 0, 0), np.inf), ap, ag, X4, G4), {}


@case("float64-beyond-float32", err(ValueError, "^features: values exceed the float32 range"))
def _():
    return model().forward_backward, (_with(X4.astype(np.float64), (0, 0, 0, 0), 1e300), Y), {}


@case("head-state-NaN", err(ValueError, r"^head\['logit_bn.running_var'\]: contains"))
def _():
    h = F.init_head(4)
    h["logit_bn.running_var"][0] = np.nan
    return F.head_forward, (SC, SC, h), {"training": False}


# -- huge values (log-sum-exp, float32 range) ------------------------------------------------------------

HUGE = np.array([[3e38, -3e38, 1.0], [-3e38, 3e38, 2e38], [1e38, 1e38, -1e38]], np.float32)


@case("class_loss-huge-finite", _check_class_loss_ref)
def _():
    return F.class_loss, (HUGE,), {}


@case("batch_triplet-huge-finite", lambda r, a, k: finite(r[0], r[1]))
def _():
    return F.batch_triplet, (HUGE, [0, 0, 1]), {"margin": 3e38}


@case(
    "pairwise_bce-huge-finite",
    lambda r, a, k: (
        finite(r[0], r[1]),
        np.testing.assert_allclose(r[0], oracle.pairwise_bce(a[0], a[1])[0], rtol=1e-6),
    ),
)
def _():
    return F.pairwise_bce, (HUGE, [0, 1, 0]), {}


@case(
    "focal-huge-finite",
    lambda r, a, k: (
        finite(r[0], r[1]),
        np.testing.assert_allclose(r[0], oracle.focal_class_memory(a[0], a[1])[0], rtol=1e-6),
    ),
)
def _():
    return F.focal_class_memory, (HUGE, [0, 1, 2]), {}


@case("head_forward-huge-running-stats", err(ValueError, "^mp, mg: values too large"))
def _():
    return F.head_forward, (SC * np.float32(1e30), SC, F.init_head(4)), {}


@case("forward_backward-huge-features-finite", _check_step_finite)
def _():
    return model().forward_backward, (np.full_like(X4, 3e38), Y), {}


@case("margin-beyond-float32", err(ValueError, "^margin: expected a number <= 3.40"))
def _():
    return F.class_loss, (SC,), {"margin": 1e300}


@case("QAConvGS-triplet_weight-beyond-float32", err(ValueError, "^triplet_weight: expected a number <= 3.40"))
def _():
    return qg.QAConvGS, (N, C, H, W), {"k_nearest": 2, "triplet_weight": 1e39}


@case("head-eps-underflows-float32", err(ValueError, "^eps: expected a number > 0"))
def _():
    return F.head_forward, (SC, SC, F.init_head(4)), {"eps": 1e-50}


@case("match_scores-bias-beyond-float32", err(ValueError, "^bias: expected a number <= 3.40"))
def _():
    return F.match_scores, (X4, G4, np.ones(2 * S), 1e300), {}


# -- zero vectors (normalisation eps) -------------------------------------------------------------------


@case(
    "normalize-zeros",
    lambda r, a, k: (same(r[0], np.zeros_like(X4)), same(r[1], np.zeros((5, S), np.float32))),
)
def _():
    return F.normalize, (np.zeros_like(X4),), {}


@case(
    "normalize_backward-zero-norms-clamped",
    lambda r, a, k: np.testing.assert_allclose(r, a[0] / 1e-12, rtol=1e-6),
)
def _():  # a zero location was divided by eps = 1e-12: its gradient is grad_y / 1e-12, finite
    return F.normalize_backward, (X4, np.zeros_like(X4), np.zeros((5, S), np.float32)), {}


@case("class_neighbors-zero-row-similarity-0", lambda r, a, k: same(r[1][0], np.zeros(2, np.float32)))
def _():
    return qg.class_neighbors, (_with(E2, 0, 0.0), 2), {"return_similarity": True}


@case("forward_backward-zero-features-and-embeddings", _check_step_finite)
def _():
    m = model()
    m.class_embed[...] = 0
    return m.forward_backward, (np.zeros_like(X4), Y), {}


# -- layouts: non-contiguous, transposed, big-endian, read-only, misaligned --------------------------


def _layout_case(fn, transform, *args, **kwargs):
    """The call on transformed inputs must give exactly the result of the call on the originals."""
    want = fn(*args, **kwargs)

    def check(result, a, k):
        same(result, want)

    return check, (fn, tuple(transform(x) if isinstance(x, np.ndarray) else x for x in args), kwargs)


def _noncontig(a):
    big = np.zeros(a.shape + (2,), a.dtype)
    big[..., 1] = a
    return big[..., 1]


def _fortran(a):
    return np.asfortranarray(a)


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


LAYOUTS = {
    "non-contiguous": _noncontig,
    "transposed": _fortran,
    "big-endian": big_endian,
    "read-only": _readonly,
    "misaligned-offset-1": lambda a: misaligned(a, 1),
    "misaligned-offset-2": lambda a: misaligned(a, 2),
}
LAYOUT_CALLS = {
    "normalize": (F.normalize, X4),
    "class_neighbors": (qg.class_neighbors, E2, 3),
    "pair_maxima": (F.pair_maxima, X4, G4),
    "class_loss": (F.class_loss, SC),
    "batch_triplet": (F.batch_triplet, SQ, Y),
}

for _lname, _t in LAYOUTS.items():
    for _fname, (_fn, *_args) in LAYOUT_CALLS.items():
        if _lname.startswith("misaligned") and _fname not in (
            "normalize",
            "class_neighbors",
            "batch_triplet",
        ):
            continue

        def _build(_fn=_fn, _t=_t, _args=_args):
            check, call = _layout_case(_fn, _t, *_args)
            return (*call, check)

        CASES.append(pytest.param(_build, "layout", id=f"{_fname}-{_lname}"))


@case(
    "forward_backward-all-layouts-at-once",
    lambda r, a, k: same(r.grad_features, model().forward_backward(X4, Y).grad_features),
)
def _():
    return model().forward_backward, (misaligned(big_endian(X4), 1), _readonly(Y[::-1][::-1].copy())), {}


# -- n_threads --------------------------------------------------------------------------------------------


@case("n_threads-zero", err(ValueError, "^n_threads: expected an integer >= 1, got 0"))
def _():
    return F.normalize, (X4,), {"n_threads": 0}


@case("n_threads-negative", err(ValueError, "^n_threads: expected an integer >= 1, got -2"))
def _():
    return qg.class_neighbors, (E2, 1), {"n_threads": -2}


@case("n_threads-float", err(TypeError, "^n_threads: expected an integer, got float"))
def _():
    return F.class_loss, (SC,), {"n_threads": 2.0}


@case("n_threads-str", err(TypeError, "^n_threads: expected an integer, got str"))
def _():
    return F.pair_maxima, (X4, G4), {"n_threads": "2"}


@case("n_threads-bool", err(TypeError, "^n_threads: expected an integer, got bool"))
def _():
    return qg.match, (X4, G4, HEAD), {"n_threads": True}


@case("n_threads-absurd", err(ValueError, "^n_threads: expected an integer <= 4096"))
def _():
    return F.head_forward, (SC, SC, F.init_head(4)), {"n_threads": 10**12}


@case("QAConvGS-n_threads-zero", err(ValueError, "^n_threads: expected an integer >= 1"))
def _():
    return qg.QAConvGS, (N, C, H, W), {"k_nearest": 2, "n_threads": 0}


@case("n_threads-numpy-int-accepted", lambda r, a, k: same(r, F.normalize(X4, n_threads=1)))
def _():
    return F.normalize, (X4,), {"n_threads": np.int8(2)}


# ------------------------------------------------------------------------------------------- the test


def _snapshot(obj):
    if isinstance(obj, (np.ndarray, list, tuple, dict)):
        return copy.deepcopy(obj)
    return obj


def _assert_unchanged(now, before):
    if isinstance(now, np.ndarray):
        np.testing.assert_array_equal(now, before)
        assert now.dtype == before.dtype
    elif isinstance(now, dict):
        assert list(now) == list(before)
        for k in now:
            _assert_unchanged(now[k], before[k])
    elif isinstance(now, (list, tuple)):
        assert len(now) == len(before)
        for x, y in zip(now, before):
            _assert_unchanged(x, y)


@pytest.mark.parametrize("build, expect", CASES)
def test_zoo(build, expect):
    fn, args, kwargs, *layout_check = build()
    before = [_snapshot(a) for a in args]
    before_kw = {k: _snapshot(v) for k, v in kwargs.items()}
    if isinstance(expect, tuple):
        exc, match = expect
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs)
    else:
        result = fn(*args, **kwargs)
        check = layout_check[0] if expect == "layout" else expect
        check(result, args, kwargs)
    for a, b in zip(args, before):  # inputs are never modified, even on error paths
        _assert_unchanged(a, b)
    for k, v in kwargs.items():
        _assert_unchanged(v, before_kw[k])


def test_zoo_has_enough_cases():
    assert len(CASES) >= 40


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def npy(tmp_path):
    def write(name, arr=None, raw=None):
        p = tmp_path / name
        if raw is not None:
            p.write_bytes(raw)
        elif arr.dtype == object:
            np.save(p, arr, allow_pickle=True)
        else:
            np.save(p, arr)
        return str(p)

    return write


CLI_CASES = [
    # (id, argv builder, exit code, stderr regex)
    (
        "neighbors-k-too-big",
        lambda w: ["neighbors", w("e.npy", E2), "o.npy", "-k", "6"],
        1,
        r"error: k: .*\[1, 5\]",
    ),
    (
        "neighbors-k-zero",
        lambda w: ["neighbors", w("e.npy", E2), "o.npy", "-k", "0"],
        2,
        "-k/--k: expected an integer >= 1",
    ),
    (
        "neighbors-threads-word",
        lambda w: ["neighbors", w("e.npy", E2), "o.npy", "--threads", "many"],
        2,
        "--threads",
    ),
    (
        "neighbors-empty-file",
        lambda w: ["neighbors", w("e.npy", raw=b""), "o.npy"],
        1,
        "input: .* is not a readable .npy",
    ),
    (
        "neighbors-object-array",
        lambda w: ["neighbors", w("e.npy", np.array([1, "a"], dtype=object)), "o.npy"],
        1,
        "input: .*Object arrays",
    ),
    (
        "neighbors-complex",
        lambda w: ["neighbors", w("e.npy", E2.astype(complex)), "o.npy", "-k", "2"],
        1,
        "E: expected a real",
    ),
    (
        "neighbors-nan",
        lambda w: ["neighbors", w("e.npy", _with(E2, (0, 0), np.nan)), "o.npy", "-k", "2"],
        1,
        "E: contains 1 NaN",
    ),
    ("neighbors-missing-file", lambda w: ["neighbors", "/nonexistent/e.npy", "o.npy"], 1, "No such file"),
    (
        "match-npz-given",
        lambda w: ["match", w("p.npy", X4), w("g.npz", raw=_npz_bytes()), "o.npy"],
        1,
        "gallery: .*npz archive",
    ),
    (
        "match-probe-3d",
        lambda w: ["match", w("p.npy", X4[0]), w("g.npy", G4), "o.npy"],
        1,
        "probe: expected a 4-d",
    ),
    (
        "match-C-mismatch",
        lambda w: ["match", w("p.npy", X4), w("g.npy", G4[:, :2]), "o.npy"],
        1,
        "gallery: expected maps of shape",
    ),
    (
        "match-corrupt-checkpoint",
        lambda w: [
            "match",
            w("p.npy", X4),
            w("g.npy", G4),
            "o.npy",
            "--checkpoint",
            w("c.npz", raw=b"PK\x03\x04xx"),
        ],
        1,
        "not a valid qaconv-gs checkpoint",
    ),
    (
        "match-bad-fc",
        lambda w: ["match", w("p.npy", X4), w("g.npy", G4), "o.npy", "--fc", "both"],
        2,
        "--fc: invalid choice",
    ),
    ("demo-epochs-zero", lambda w: ["demo", "--epochs", "0"], 2, "--epochs: expected an integer >= 1"),
    ("unknown-command", lambda w: ["frobnicate"], 2, "invalid choice"),
]


def _npz_bytes():
    import io

    buf = io.BytesIO()
    np.savez(buf, a=np.ones(3))
    return buf.getvalue()


@pytest.mark.parametrize("build, code, pattern", [pytest.param(b, c, p, id=i) for i, b, c, p in CLI_CASES])
def test_cli_zoo(build, code, pattern, npy, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = build(npy)
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    err_text = capsys.readouterr().err
    assert rc == code, err_text
    assert __import__("re").search(pattern, err_text), err_text
    assert "Traceback" not in err_text
    assert not os.path.exists(tmp_path / "o.npy")  # nothing written on error


# ------------------------------------------------------------------------ C overflow guards (subprocess)

_ABI_SCRIPT = textwrap.dedent(
    r"""
    import ctypes as ct, sys
    import numpy as np
    from qaconv_gs import _native
    lib = ct.CDLL(_native.__file__)
    class Ctx(ct.Structure):
        _fields_ = [("n_threads", ct.c_int), ("isa", ct.c_int), ("poll", ct.c_void_p),
                    ("poll_arg", ct.c_void_p)]
    class HeadParams(ct.Structure):
        _fields_ = [("shared", ct.c_int)] + [(n, ct.c_float) for n in ("eps", "w1", "b1", "rm1", "rv1")] + [
            ("fc_weight", ct.c_void_p)] + [(n, ct.c_float) for n in ("fcb", "w2", "b2", "rm2", "rv2")]
    buf = np.zeros(1 << 18, np.float64)  # 2 MB of zeros behind every pointer
    P = ct.c_void_p(buf.ctypes.data)
    ctx = Ctx(2, 0, None, None)
    hp = HeadParams(0, 1e-5, 1, 0, 0, 1, P, 0, 1, 0, 0, 1)
    stats = (ct.c_double * 8)()
    BIG = 1 << 40  # BIG * BIG overflows int64
    I, f = ct.c_int64, ct.c_float
    calls = {
        "norm_forward": (P, I(BIG), I(BIG), I(4), P, P),
        "norm_backward": (P, P, P, I(BIG), I(BIG), I(4), P),
        "norm_forward_rows": (P, I(4), P, I(BIG), I(BIG), I(4), P, P),
        "norm_backward_rows": (P, P, I(4), P, P, I(BIG), I(BIG), I(4), P),
        "match_backward_restricted_rows": (
            P, I(4), P, I(4), P, P, I(4), P, I(4), I(BIG), I(BIG), P, P, P, P, P
        ),
        "match_maxima": (P, I(BIG), P, I(BIG), I(8), I(16), P, P, P, P),
        "match_maxima_restricted": (P, I(BIG), P, I(4), P, I(BIG), I(8), I(16), P, P, P, P),
        "match_scores": (P, I(BIG), P, I(BIG), I(8), I(16), P, f(0), P),
        "match_backward": (P, I(BIG), P, I(BIG), I(8), I(16), P, P, P, P, P, P),
        "match_backward_restricted": (P, I(BIG), P, I(4), P, I(BIG), I(8), I(16), P, P, P, P, P, P),
        "neighbors_topk": (P, I(BIG), I(BIG), I(1), P, P),
        "neighbors_cross_topk": (P, I(BIG), I(0), P, I(BIG), I(0), I(BIG), I(1), P, P, I(1), P, P),
        "loss_class": (P, I(BIG), I(BIG), f(1), f(0.5), P, P),
        "loss_batch_triplet": (P, P, I(3 << 31), f(1), P, P, P, P),
        "loss_pairwise_bce": (P, I(BIG), I(BIG), P, P, P, P, P),
        "loss_focal": (P, I(BIG), I(BIG), P, f(2), P, P, P),
        "head_forward_train": (P, P, I(BIG), I(BIG), ct.byref(hp), P, P, stats),
        "head_forward_eval": (P, P, I(BIG), I(BIG), ct.byref(hp), P),
    }
    refs = {"match_maxima_restricted", "match_backward_restricted", "norm_forward", "norm_backward",
            "neighbors_topk", "neighbors_cross_topk", "loss_class", "loss_batch_triplet", "loss_pairwise_bce",
            "loss_focal", "head_forward_train", "head_forward_eval"}
    for name, args in calls.items():
        for suffix in ("_f32", "_ref_f32") if name in refs else ("_f32",):
            fn = getattr(lib, "qg_" + name + suffix)
            fn.restype = ct.c_int
            print(name + suffix, fn(*args, ct.byref(ctx)), flush=True)
    """
)


def test_c_kernels_refuse_sizes_that_overflow_int64():
    """Called directly (ctypes) with sizes whose element counts overflow int64 and a 2 MB buffer behind every
    pointer, each kernel must return QG_EOVERFLOW (6) before touching memory -- not crash, not run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", _ABI_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    results = dict(line.split() for line in out.stdout.splitlines())
    assert len(results) == 30, results
    assert set(results.values()) == {"6"}, results


def test_bindings_refuse_wrong_dtype_and_ndim_directly():
    """The private bindings re-check what Python validated (a caller bypassing the wrappers gets errors)."""
    x = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="x: expected a 3-d array"):
        _native.norm_forward(x[0], 1)
    with pytest.raises(ValueError, match="n_threads"):
        _native.norm_forward(x, 0)
    with pytest.raises(ValueError, match="gallery: expected shape"):
        _native.match_maxima(x, x[:, :2], False, 1)
    with pytest.raises(ValueError, match="candidates: expected 2 rows"):
        _native.match_maxima_restricted(x, x, np.zeros((3, 1), np.int64), False, 1)
    with pytest.raises(ValueError, match="out of range"):
        _native.match_maxima_restricted(x, x, np.full((2, 1), 5, np.int64), False, 1)
    with pytest.raises(TypeError):
        _native.norm_forward(x, "1")


# ------------------------------------------------------------------ sizes needing > 2^31 elements (slow)


@pytest.mark.slow
def test_restricted_maxima_index_beyond_2_31():
    """embeds holds 2^31 + 2^17 float32 values (8.6 GB); the candidate row at the end sits past element 2^31,
    so 32-bit index arithmetic would read the wrong row (or crash). The pair must equal the same pair
    computed on that row alone."""
    Cb, Sb = 64, 1024  # C*S = 2^16 per map
    n = (1 << 15) + 2  # rows; n * C * S = 2^31 + 2^17
    try:
        E = np.zeros((n, Cb, Sb), np.float32)
    except MemoryError:
        pytest.skip("needs ~9 GB of memory")
    rng = np.random.default_rng(5)
    last = rng.standard_normal((Cb, Sb)).astype(np.float32)
    E[n - 1] = last
    E[n - 1 - (1 << 15)] = -last  # the row a 32-bit wrap of the index would land near
    X = rng.standard_normal((1, Cb, 32, 32)).astype(np.float32)
    mp, mg = F.pair_maxima_restricted(X, E.reshape(n, Cb, 32, 32), np.array([[n - 1, 0]]), n_threads=2)
    rmp, rmg = F.pair_maxima(X, last.reshape(1, Cb, 32, 32), n_threads=2)
    np.testing.assert_array_equal(mp[:, :1], rmp)
    np.testing.assert_array_equal(mg[:, :1], rmg)
    assert np.all(mp[:, 1] == 0)


@pytest.mark.slow
def test_class_neighbors_rows_beyond_2_31():
    """E of 3 rows x (2^31 / 3 + 64) columns: the third row starts past element 2^31 (8.6 GB)."""
    D = (1 << 31) // 3 + 64
    try:
        E = np.empty((3, D), np.float32)
    except MemoryError:
        pytest.skip("needs ~9 GB of memory")
    E[0] = 1.0
    E[1] = -1.0
    E[2, : D // 2] = 1.0  # cos(row 2, row 0) ~ 0.707, cos(row 2, row 1) ~ -0.707
    E[2, D // 2 :] = 0.0
    idx, sim = qg.class_neighbors(E, 1, return_similarity=True, n_threads=2)
    assert idx[:, 0].tolist() == [2, 2, 0]
    np.testing.assert_allclose(sim[:, 0], [np.sqrt(0.5), -np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-5)
