"""Tests of location normalisation and the fused pair maxima (forward, backward, eval scores)."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st
from isa_levels import ISAS, at_isa
from qaconv_gs import _native
from qaconv_gs import matching as m

RTOL = 1e-4
# Z is a float32 sum of C products of unit-norm entries: its absolute error is a few ulps of 1.
ATOL = 1e-5


def maps(rng, n, C, H, W, normalize=True):
    x = rng.standard_normal((n, C, H, W)).astype(np.float32)
    if normalize:
        x, _ = m.normalize(x)
    return x


def flat3(x):
    return np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)


def check_argmax(idx, ref_idx, ref_max, Z, axis, tol=1e-5):
    """idx must equal the first argmax except where the float64 values are within tol (near ties, where
    float32 rounding may pick another index); there the chosen value must still be a maximum."""
    idx = np.asarray(idx, np.int64)
    diff = idx != ref_idx
    if not diff.any():
        return
    chosen = np.take_along_axis(Z, np.expand_dims(idx, axis), axis=axis).squeeze(axis)
    assert np.all(chosen[diff] >= ref_max[diff] - tol), "argmax differs from the reference beyond a near tie"
    assert diff.mean() < 0.01


def check_forward(out, refs, with_argmax=True):
    mp, mg = out[0], out[1]
    rmp, rmg, rap, rag, Z = refs
    np.testing.assert_allclose(mp, rmp, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(mg, rmg, rtol=RTOL, atol=ATOL)
    if with_argmax:
        assert out[2].dtype == np.uint16 and out[3].dtype == np.uint16
        check_argmax(out[2], rap, rmp, Z, 3)
        check_argmax(out[3], rag, rmg, Z, 2)


SHAPES = [  # (P, G, C, H, W)
    (2, 3, 8, 1, 1),  # S = 1
    (3, 2, 1, 7, 7),  # C = 1
    (4, 5, 16, 7, 7),  # S = 49 (partial tiles both ways)
    (2, 3, 32, 24, 8),  # S = 192
    (1, 97, 4, 3, 5),  # 97 pairs, S = 15
    (2, 2, 5, 6, 16),  # S = 96: exact multiple of both tile sizes
]


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("shape", [(3, 16, 7, 7), (1, 1, 1, 1), (2, 5, 24, 8), (97, 3, 1, 2)])
def test_normalize_matches_reference(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 3
    y, n = m.normalize(x)
    ry, rn = oracle.normalize(x)
    assert y.dtype == np.float32 and y.shape == shape and n.shape == (shape[0], shape[2] * shape[3])
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(n, rn, rtol=1e-6)
    cy, cn = _native.norm_forward_ref(flat3(x), 1)
    np.testing.assert_array_equal(y, cy.reshape(shape))
    np.testing.assert_array_equal(n, cn)


def test_normalize_backward_at_the_clamp_boundary():
    """A location whose norm is exactly float32(1e-12) is not clamped (norm >= eps, as torch's clamp_min
    gradient): its gradient keeps the projection -y <y, gy>, on every path and in the reference."""
    x = np.zeros((1, 4, 2, 2), np.float32)
    x[0, 0, 1, 1] = np.float32(1e-12)  # its square is exact in double: norm == eps
    gy = np.ones_like(x)
    for level in ISAS:
        with at_isa(level):
            y, n = m.normalize(x)
            assert n[0, 3] == np.float32(1e-12)
            gx = m.normalize_backward(gy, y, n)
            # y = (1, 0, 0, 0) there: gx = (gy - y <y, gy>) / norm = (0, 1e12, 1e12, 1e12)
            assert gx[0, 0, 1, 1] == 0.0, level
            np.testing.assert_allclose(gx[0, 1:, 1, 1], 1e12, rtol=1e-6)
            ref_gx = _native.norm_backward_ref(flat3(gy), flat3(y), n, 1).reshape(x.shape)
            np.testing.assert_array_equal(gx, ref_gx)


def test_normalize_zero_and_tiny_locations(rng):
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    x[0, :, 1, 1] = 0.0
    x[1, :, 0, 2] = 1e-30  # norm below eps: clamped
    y, n = m.normalize(x)
    assert n[0, 4] == 0.0 and np.all(y[0, :, 1, 1] == 0.0)
    np.testing.assert_allclose(y[1, :, 0, 2], 1e-30 / 1e-12, rtol=1e-5)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gx = m.normalize_backward(gy, y, n)
    np.testing.assert_allclose(gx[0, :, 1, 1], gy[0, :, 1, 1] / 1e-12, rtol=1e-6)
    np.testing.assert_allclose(gx[1, :, 0, 2], gy[1, :, 0, 2] / 1e-12, rtol=1e-6)
    np.testing.assert_allclose(
        gx, oracle.normalize_backward(gy, y, n), rtol=1e-5, atol=1e-6 * np.abs(gx).max()
    )


@pytest.mark.parametrize("shape", [(3, 16, 7, 7), (1, 1, 1, 1), (2, 300, 2, 3)])
def test_normalize_backward_matches_reference(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    y, n = m.normalize(x)
    gy = rng.standard_normal(shape).astype(np.float32)
    gx = m.normalize_backward(gy, y, n)
    np.testing.assert_allclose(gx, oracle.normalize_backward(gy, y, n), rtol=RTOL, atol=1e-6)
    cgx = _native.norm_backward_ref(flat3(gy), flat3(y), n, 1)
    np.testing.assert_allclose(gx, cgx.reshape(shape), rtol=1e-6, atol=1e-7)


def test_normalize_vs_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((3, 12, 4, 5)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = F.normalize(xt, dim=1, eps=1e-12)
    yt.backward(torch.tensor(gy, dtype=torch.float64))
    y, n = m.normalize(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-7)
    gx = m.normalize_backward(gy, y, n)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=RTOL, atol=1e-5)


# ---------------------------------------------------------------- normalisation of table rows


@pytest.mark.parametrize("shape", [(7, 16, 7, 7), (1, 1, 1, 1), (30, 5, 24, 8), (97, 3, 1, 2)])
@pytest.mark.parametrize("nt", [1, 2, 3])
def test_normalize_rows_same_bits_as_gathered(rng, shape, nt):
    """norm_forward_rows / norm_backward_rows read rows of the table in place (repeats and any
    order allowed) and give exactly the bits of the gathered-copy kernels."""
    E = flat3(rng.standard_normal(shape).astype(np.float32) * 3)
    E[0, :, 0] = 0.0  # zero location
    E[-1, :, -1] = 1e-30  # clamped location
    before = E.copy()
    rows = rng.integers(0, E.shape[0], size=2 * E.shape[0] + 1).astype(np.int64)
    rows[:2] = [E.shape[0] - 1, 0]
    y, n = _native.norm_forward_rows(E, rows, nt)
    gy_, gn = _native.norm_forward(np.ascontiguousarray(E[rows]), nt)
    np.testing.assert_array_equal(y, gy_)
    np.testing.assert_array_equal(n, gn)
    g = rng.standard_normal(y.shape).astype(np.float32)
    want = _native.norm_backward(g, gy_, gn, nt)
    got = g.copy()
    out = _native.norm_backward_rows(got, E, rows, n, nt)
    assert out is got  # in place
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(E, before)
    # and against the float64 oracle
    np.testing.assert_allclose(
        want.reshape(-1),
        oracle.normalize_backward(g, gy_, gn).reshape(-1),
        rtol=1e-5,
        atol=1e-6 * np.abs(want).max(),
    )


@pytest.mark.parametrize(
    "shape", [(3, 5, 7, 7), (2, 3, 1, 1), (2, 7, 1, 3), (2, 4, 19, 1), (2, 3, 300, 2), (1, 2, 1, 97)]
)
def test_normalize_same_bits_on_every_path(rng, isa, shape):
    """Every ISA path gives the scalar reference's bits (forward and backward, table rows too):
    location counts around the 4- and 16-wide vector blocks and the 256-location work items."""
    x = flat3(rng.standard_normal(shape).astype(np.float32) * 2)
    x[0, :, 0] = 0.0
    x[-1, :, -1] = 3e-30
    if x.shape[2] > 2:  # finite values whose norm overflows float32: y from the double norm, not 0
        x[0, :, 1] = 3e38
    y, n = _native.norm_forward(x, 2)
    ry, rn = _native.norm_forward_ref(x, 1)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(n, rn)
    if x.shape[2] > 2:
        assert np.isinf(n[0, 1])
        np.testing.assert_allclose(y[0, :, 1], 1.0 / np.sqrt(x.shape[1]), rtol=1e-6)
    g = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(_native.norm_backward(g, y, n, 2), _native.norm_backward_ref(g, ry, rn, 1))
    rows = np.arange(x.shape[0], dtype=np.int64)[::-1].copy()
    yr, nr = _native.norm_forward_rows(x, rows, 2)
    np.testing.assert_array_equal(yr, ry[rows])
    gr = g[rows].copy()
    np.testing.assert_array_equal(
        _native.norm_backward_rows(gr, x, rows, nr, 2),
        _native.norm_backward_ref(g[rows], ry[rows], rn[rows], 1),
    )


def test_normalize_rows_empty_and_errors(rng):
    E = rng.standard_normal((5, 4, 3)).astype(np.float32)
    y, n = _native.norm_forward_rows(E, np.empty(0, np.int64), 1)
    assert y.shape == (0, 4, 3) and n.shape == (0, 3)
    for bad in ([5], [-1]):
        with pytest.raises(ValueError, match="out of range|range"):
            _native.norm_forward_rows(E, np.array(bad, np.int64), 1)
    rows = np.array([1, 3], np.int64)
    y, n = _native.norm_forward_rows(E, rows, 1)
    g = rng.standard_normal(y.shape).astype(np.float32)
    with pytest.raises(ValueError, match="range"):
        _native.norm_backward_rows(g.copy(), E, np.array([1, 5], np.int64), n, 1)
    for bad in (g.astype(np.float64), g[:, :, ::-1], g.tolist(), g.astype(">f4")):
        with pytest.raises(TypeError, match="in place"):
            _native.norm_backward_rows(bad, E, rows, n, 1)
    ro = g.copy()
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="in place"):
        _native.norm_backward_rows(ro, E, rows, n, 1)
    with pytest.raises(ValueError, match="grad_y"):
        _native.norm_backward_rows(g[:1].copy(), E, rows, n, 1)
    with pytest.raises(ValueError, match="norms"):
        _native.norm_backward_rows(g.copy(), E, rows, n[:, :2], 1)
    with pytest.raises(ValueError, match="share memory"):
        _native.norm_backward_rows(E, E, np.arange(5, dtype=np.int64), np.ones((5, 3), np.float32), 1)
    before = E.copy()
    with pytest.raises(ValueError, match="share memory"):  # a partial overlap, not just the same pointer
        _native.norm_backward_rows(E[3:], E, rows, n, 1)
    np.testing.assert_array_equal(E, before)


def test_restricted_backward_one_side_same_bits(rng, isa):
    """The feature-side and class-side halves of the restricted backward (used by the training step so
    that it never holds the normalised class rows and their gradient at once) equal the joint call."""
    B, N, C, H, W = 5, 9, 16, 7, 7
    x, e = flat3(maps(rng, B, C, H, W)), flat3(maps(rng, N, C, H, W))
    cand = rng.integers(0, N, size=(B, 4)).astype(np.int64)
    mp, mg, ap, ag = _native.match_maxima_restricted(x, e, cand, True, 2)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    gx, ge = _native.match_backward_restricted(x, e, cand, gmp, gmg, ap, ag, 2)
    fx, none = _native.match_backward_restricted_features(x, e, cand, gmp, gmg, ap, ag, 2)
    none2, fe = _native.match_backward_restricted_embeds(x, N, cand, gmp, gmg, ap, ag, 2)
    assert none is None and none2 is None
    np.testing.assert_array_equal(fx, gx)
    np.testing.assert_array_equal(fe, ge)
    with pytest.raises(ValueError, match="n_rows"):
        _native.match_backward_restricted_embeds(x, -1, cand, gmp, gmg, ap, ag, 1)
    with pytest.raises(ValueError, match="range|candidate"):
        _native.match_backward_restricted_embeds(x, 2, cand, gmp, gmg, ap, ag, 1)


@pytest.mark.parametrize("shape", [(9, 16, 7, 7), (5, 8, 24, 8), (4, 3, 1, 300), (3, 2, 1, 1)])
@pytest.mark.parametrize("nt", [1, 3])
def test_restricted_backward_rows_fused_same_bits(rng, isa, shape, nt):
    """The class side fused with the class rows' normalisation backward (one pass while each row is in
    cache) gives the bits of the two separate calls; rows no pair uses get zeros."""
    B, C, H, W = shape
    S = H * W
    N = 13
    table = flat3(rng.standard_normal((N, C, H, W)).astype(np.float32))
    table[4, :, 0] = 0.0  # a zero location
    rows = np.array([11, 4, 0, 7, 2, 9], np.int64)  # class row r of the step is table row rows[r]
    En, norms = _native.norm_forward_rows(table, rows, nt)
    x, _ = _native.norm_forward(flat3(rng.standard_normal((B, C, H, W)).astype(np.float32)), nt)
    cand = rng.integers(0, rows.size - 1, size=(B, 4)).astype(np.int64)  # class row 5 is never used
    cand[: B // 2] = cand[0]  # a run of probes sharing a list
    mp, mg, ap, ag = _native.match_maxima_restricted(x, En, cand, True, nt)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    _, ge = _native.match_backward_restricted_embeds(x, rows.size, cand, gmp, gmg, ap, ag, nt)
    want = _native.norm_backward_rows(ge, table, rows, norms, nt)
    got = _native.match_backward_restricted_rows(x, table, rows, norms, cand, gmp, gmg, ap, ag, nt)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (rows.size, C, S) and not got[5].any()
    with pytest.raises(ValueError, match="range"):
        _native.match_backward_restricted_rows(x, table, rows + 3, norms, cand, gmp, gmg, ap, ag, 1)
    with pytest.raises(ValueError, match="range|candidate"):
        _native.match_backward_restricted_rows(x, table, rows[:2], norms[:2], cand, gmp, gmg, ap, ag, 1)
    with pytest.raises(ValueError, match="norms"):
        _native.match_backward_restricted_rows(x, table, rows, norms[:-1], cand, gmp, gmg, ap, ag, 1)


def test_restricted_backward_rows_out(rng, isa):
    """out= receives the class-row gradient in place (the step reuses its normalised rows' buffer): the
    same bits as a fresh array, the very object returned; a wrong out is refused before anything is
    written, and an out sharing memory with an input is refused (the kernel reads the inputs while
    writing)."""
    N, C, S, B = 9, 8, 12, 5
    table = rng.standard_normal((N, C, S)).astype(np.float32)
    rows = np.array([7, 1, 4, 2], np.int64)
    En, norms = _native.norm_forward_rows(table, rows, 1)
    x, _ = _native.norm_forward(rng.standard_normal((B, C, S)).astype(np.float32), 1)
    cand = rng.integers(0, rows.size, size=(B, 3)).astype(np.int64)
    mp, mg, ap, ag = _native.match_maxima_restricted(x, En, cand, True, 1)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    args = (x, table, rows, norms, cand, gmp, gmg, ap, ag, 2)
    want = _native.match_backward_restricted_rows(*args)
    buf = np.full((rows.size, C, S), np.nan, np.float32)
    got = _native.match_backward_restricted_rows(*args, buf)
    assert got is buf
    np.testing.assert_array_equal(got, want)
    assert _native.match_backward_restricted_rows(*args, None).shape == want.shape
    saved = table.copy()
    for bad, exc, msg in (
        (np.zeros((rows.size, C, S)), TypeError, "out"),
        (np.zeros((rows.size, C, 2 * S), np.float32)[:, :, ::2], TypeError, "out"),
        (np.zeros((rows.size, C, S), ">f4"), TypeError, "out"),
        (np.zeros((rows.size + 1, C, S), np.float32), ValueError, "out"),
        ([[[0.0]]], TypeError, "out"),
        (table[2 : 2 + rows.size], ValueError, "share memory"),
    ):
        with pytest.raises(exc, match=msg):
            _native.match_backward_restricted_rows(*args, bad)
    np.testing.assert_array_equal(table, saved)
    ro = np.zeros((rows.size, C, S), np.float32)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="out"):
        _native.match_backward_restricted_rows(*args, ro)
    assert not ro.any()


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("shape", SHAPES)
def test_pair_maxima_matches_reference(rng, isa, shape):
    P, G, C, H, W = shape
    p, g = maps(rng, P, C, H, W), maps(rng, G, C, H, W)
    refs = oracle.pair_maxima(p, g)
    out = m.pair_maxima(p, g, return_argmax=True)
    assert out[0].shape == (P, G, H * W) and out[0].dtype == np.float32
    check_forward(out, refs)
    mp, mg = m.pair_maxima(p, g)
    np.testing.assert_array_equal(mp, out[0])
    np.testing.assert_array_equal(mg, out[1])


def test_pair_maxima_unnormalised_inputs(rng, isa):
    p = rng.standard_normal((2, 9, 5, 5)).astype(np.float32) * 4
    g = rng.standard_normal((3, 9, 5, 5)).astype(np.float32) * 0.1
    out = m.pair_maxima(p, g, return_argmax=True)
    rmp, rmg, rap, rag, Z = oracle.pair_maxima(p, g)
    np.testing.assert_allclose(out[0], rmp, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(out[1], rmg, rtol=RTOL, atol=1e-5)
    check_argmax(out[2], rap, rmp, Z, 3, tol=1e-4)
    check_argmax(out[3], rag, rmg, Z, 2, tol=1e-4)


@pytest.mark.parametrize("shape", [(3, 4, 16, 7, 7), (5, 2, 8, 24, 8), (2, 1, 3, 1, 1)])
def test_restricted_matches_references(rng, isa, shape):
    B, N, C, H, W = shape
    x, e = maps(rng, B, C, H, W), maps(rng, N, C, H, W)
    K = 3
    cand = rng.integers(0, N, size=(B, K))
    cand[0, :] = 0  # the same class several times in a row
    out = m.pair_maxima_restricted(x, e, cand, return_argmax=True)
    check_forward(out, oracle.pair_maxima_restricted(x, e, cand))
    cref = _native.match_maxima_restricted_ref(flat3(x), flat3(e), cand, True, 1)
    np.testing.assert_allclose(out[0], cref[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], cref[1], rtol=1e-6, atol=1e-6)
    # all-pairs and restricted agree bit for bit on the same pairs
    full = m.pair_maxima(x, e, return_argmax=True)
    rows = np.arange(B)[:, None]
    for a, b in zip(out, full):
        np.testing.assert_array_equal(a, b[rows, cand])


@pytest.mark.parametrize("shape", [(16, 7, 7), (8, 24, 8), (5, 3, 5), (4, 1, 1)])
def test_restricted_runs_of_shared_candidates(rng, isa, shape):
    """Consecutive probes with the same candidate list (a graph-sampled batch) are computed together
    in one row block; results are the same bits as the all-pairs kernel on those pairs, and as the
    same probes computed one by one (interleaved so that no two neighbours share a list)."""
    C, H, W = shape
    runs = [4, 1, 7, 2, 3, 4, 13, 1]
    B, N, K = sum(runs), 23, 6
    x, e = maps(rng, B, C, H, W), maps(rng, N, C, H, W)
    lists = [rng.choice(N, K, replace=False) for _ in runs]
    lists[3] = lists[2].copy()  # two runs with the same list back to back: one longer run
    cand = np.concatenate([np.tile(lst, (r, 1)) for lst, r in zip(lists, runs)]).astype(np.int64)
    for want in (True, False):
        out = m.pair_maxima_restricted(x, e, cand, return_argmax=want)
        full = m.pair_maxima(x, e, return_argmax=want)
        rows = np.arange(B)[:, None]
        for a, b in zip(out, full):
            np.testing.assert_array_equal(a, b[rows, cand])
        perm = np.argsort(np.arange(B) % 2, kind="stable")  # even probes first, then odd ones
        alone = m.pair_maxima_restricted(x[perm], e, cand[perm], return_argmax=want)
        inv = np.argsort(perm)
        for a, b in zip(out, alone):
            np.testing.assert_array_equal(a, b[inv])
    check_forward(
        m.pair_maxima_restricted(x, e, cand, return_argmax=True), oracle.pair_maxima_restricted(x, e, cand)
    )

    # backward: runs share the transposed candidate maps; same bits as probe by probe, and as the
    # portable engine
    mp, mg, ap, ag = m.pair_maxima_restricted(x, e, cand, return_argmax=True)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    gx, ge = m.pair_maxima_restricted_backward(gmp, gmg, ap, ag, x, e, cand)
    px, pe = m.pair_maxima_restricted_backward(
        gmp[perm], gmg[perm], ap[perm], ag[perm], x[perm], e, cand[perm]
    )
    np.testing.assert_array_equal(gx, px[inv])
    previous = _native.set_isa("portable")
    try:
        qx, qe = m.pair_maxima_restricted_backward(gmp, gmg, ap, ag, x, e, cand)
    finally:
        _native.set_isa(previous)
    np.testing.assert_array_equal(gx, qx)
    np.testing.assert_array_equal(ge, qe)
    rgx, rge = oracle.pair_maxima_restricted_backward(gmp, gmg, ap, ag, x, e, cand)
    np.testing.assert_allclose(gx, rgx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ge, rge, rtol=1e-5, atol=1e-6)


def test_c_reference_kernel_matches_numpy(rng):
    x, e = maps(rng, 3, 10, 5, 7), maps(rng, 4, 10, 5, 7)
    cand = np.array([[0, 3], [3, 3], [1, 2]])
    out = _native.match_maxima_restricted_ref(flat3(x), flat3(e), cand, True, 1)
    check_forward(out, oracle.pair_maxima_restricted(x, e, cand))


def test_ties_take_first_index_across_tiles(rng, isa):
    C, H, W = 8, 5, 8  # S = 40: several probe panels (6) and gallery panels (8 or 16)
    S = H * W
    p = maps(rng, 1, C, H, W).reshape(1, C, S).copy()
    g = maps(rng, 1, C, H, W).reshape(1, C, S).copy()
    # duplicate gallery locations 5 and 37; probe location 11 equals them -> the max of row 11 is a tie
    g[0, :, 37] = g[0, :, 5]
    p[0, :, 11] = g[0, :, 5]
    # duplicate probe locations 2 and 33; gallery location 20 equals them -> the max of column 20 is a tie
    p[0, :, 33] = p[0, :, 2]
    g[0, :, 20] = p[0, :, 2]
    mp, mg, ap, ag = m.pair_maxima(p.reshape(1, C, H, W), g.reshape(1, C, H, W), return_argmax=True)
    Z = p[0].T.astype(np.float64) @ g[0].astype(np.float64)
    assert Z[11].argmax() in (5, 37) and ap[0, 0, 11] == 5
    assert Z[:, 20].argmax() in (2, 33) and ag[0, 0, 20] == 2
    # constant maps: every entry ties, argmax is 0 everywhere
    const = np.ones((2, 3, 4, 5), np.float32)
    _, _, ap, ag = m.pair_maxima(const, const, return_argmax=True)
    assert not ap.any() and not ag.any()
    _, _, ap, ag = m.pair_maxima_restricted(const, const, [[1, 0], [0, 0]], return_argmax=True)
    assert not ap.any() and not ag.any()
    _, _, ap, ag = _native.match_maxima_restricted_ref(
        flat3(const), flat3(const), np.array([[1, 0]] * 2), True, 1
    )
    assert not ap.any() and not ag.any()


def test_match_scores_equals_weighted_maxima(rng, isa):
    p, g = maps(rng, 5, 16, 7, 7), maps(rng, 97, 16, 7, 7)
    S = 49
    w = rng.standard_normal(2 * S).astype(np.float32)
    out = m.match_scores(p, g, w, 0.25)
    assert out.shape == (5, 97) and out.dtype == np.float32
    mp, mg = m.pair_maxima(p, g)
    exact = mp.astype(np.float64) @ w[:S].astype(np.float64) + mg.astype(np.float64) @ w[S:].astype(
        np.float64
    )
    np.testing.assert_allclose(out, exact + 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, oracle.match_scores(p, g, w, 0.25), rtol=RTOL, atol=1e-4)


def test_match_scores_single_location(rng, isa):
    p, g = maps(rng, 3, 4, 1, 1), maps(rng, 2, 4, 1, 1)
    out = m.match_scores(p, g, np.array([1.0, 2.0]), np.float32(-1.0))
    z = np.einsum("pc,gc->pg", p[:, :, 0, 0].astype(np.float64), g[:, :, 0, 0].astype(np.float64))
    np.testing.assert_allclose(out, 3 * z - 1, rtol=1e-6, atol=1e-6)


# Shapes that exercise the block layout of the SIMD engine: several row blocks (probes concatenated
# along locations) and column blocks (sized to the L2 budget), partial last blocks, S not a multiple
# of the 6 x 16 tile (faces: S = 49), S < 16 (scalar epilogue), S = 1, and large C.
BLOCK_SHAPES = [  # (P, G, C, H, W)
    (13, 23, 300, 7, 7),
    (8, 20, 2000, 3, 3),
    (5, 7, 40, 4, 4),
    (6, 9, 33, 17, 1),
    (4, 5, 64, 6, 8),
    (3, 4, 50, 5, 10),
    (20, 3, 7, 2, 3),
    (30, 31, 5, 1, 1),
]


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
def test_block_layouts_match_reference(rng, isa, shape):
    P, G, C, H, W = shape
    S = H * W
    p, g = maps(rng, P, C, H, W), maps(rng, G, C, H, W)
    out = m.pair_maxima(p, g, return_argmax=True, n_threads=2)
    check_forward(out, oracle.pair_maxima(p, g))
    vals = m.pair_maxima(p, g, n_threads=2)
    np.testing.assert_array_equal(vals[0], out[0])
    np.testing.assert_array_equal(vals[1], out[1])
    # restricted pairs (repeats, several column blocks) are the same bits as the all-pairs ones
    cand = rng.integers(0, G, size=(P, 2 * G + 1))
    rout = m.pair_maxima_restricted(p, g, cand, return_argmax=True, n_threads=2)
    rows = np.arange(P)[:, None]
    for a, b in zip(rout, out):
        np.testing.assert_array_equal(a, b[rows, cand])
    # fused scores: the weighted maxima of the same pairs
    w = rng.standard_normal(2 * S).astype(np.float32)
    sc = m.match_scores(p, g, w, -0.5, n_threads=2)
    exact = out[0].astype(np.float64) @ w[:S].astype(np.float64)
    exact += out[1].astype(np.float64) @ w[S:].astype(np.float64)
    np.testing.assert_allclose(sc, exact - 0.5, rtol=1e-6, atol=1e-6)


def _second_gap(Z, axis):
    """Distance between the largest and second-largest value along axis (float64)."""
    part = -np.partition(-Z, 1, axis=axis)
    return np.take(part, 0, axis=axis) - np.take(part, 1, axis=axis)


@pytest.mark.skipif(len(ISAS) < 2, reason="only the portable path runs on this CPU")
def test_isa_paths_agree(rng):
    """The FMA paths round once per channel, the portable path twice: values agree to rtol 1e-5 and the
    argmax wherever the float64 maximum is not a near tie."""
    p, g = maps(rng, 7, 96, 7, 7), maps(rng, 9, 96, 7, 7)
    *_, Z = oracle.pair_maxima(p, g)
    clear_p, clear_g = _second_gap(Z, 3) > 1e-5, _second_gap(Z, 2) > 1e-5
    outs = {}
    for level in ISAS:
        with at_isa(level):
            outs[level] = m.pair_maxima(p, g, return_argmax=True)
    base = outs["portable"]
    for level in ISAS[1:]:
        o = outs[level]
        np.testing.assert_allclose(o[0], base[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o[1], base[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(o[2][clear_p], base[2][clear_p])
        np.testing.assert_array_equal(o[3][clear_g], base[3][clear_g])


@pytest.mark.skipif("avx512" not in ISAS, reason="this CPU has no AVX-512: only one FMA engine runs")
@pytest.mark.parametrize(
    "shape",
    [
        (7, 9, 96, 7, 7),
        (5, 6, 32, 24, 8),
        (3, 4, 24, 3, 5),
        (13, 5, 8, 1, 1),
        (2, 97, 5, 4, 4),
        (3, 2, 1, 17, 2),
    ],
)
def test_fma_engines_same_bits(rng, shape):
    """The AVX2 (6 x 16 tile) and AVX-512 (12 x 16 tile) engines compute every Z element as the same
    float32 FMA chain and pick maxima in the same order: all outputs are the same bits (all pairs,
    restricted with runs of shared lists, fused scores; 1 and 3 threads; rows not a multiple of 6 or 12,
    S below and above the 16-lane tile)."""
    P, G, C, H, W = shape
    p, g = maps(rng, P, C, H, W), maps(rng, G, C, H, W)
    u = rng.standard_normal((P, C, H, W)).astype(np.float32) * 3  # not normalised: wider value range
    cand = rng.integers(0, G, size=(P, min(G, 4)))
    cand[: P // 2] = cand[0]  # a run of probes sharing one list
    w = rng.standard_normal(2 * H * W).astype(np.float32)
    outs = {}
    for level in ("avx2", "avx512"):
        with at_isa(level):
            outs[level] = [
                *m.pair_maxima(p, g, return_argmax=True, n_threads=1),
                *m.pair_maxima(p, g, return_argmax=True, n_threads=3),
                *m.pair_maxima(u, g, return_argmax=True),
                *m.pair_maxima(p, g),
                *m.pair_maxima_restricted(p, g, cand, return_argmax=True, n_threads=3),
                *m.pair_maxima_restricted(u, g, cand),
                m.match_scores(p, g, w, 0.5),
            ]
    for a, b in zip(outs["avx2"], outs["avx512"]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("shape", SHAPES)
def test_pair_maxima_backward_matches_reference(rng, isa, shape):
    P, G, C, H, W = shape
    p, g = maps(rng, P, C, H, W), maps(rng, G, C, H, W)
    mp, mg, ap, ag = m.pair_maxima(p, g, return_argmax=True)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    gp, gg = m.pair_maxima_backward(gmp, gmg, ap, ag, p, g)
    rgp, rgg = oracle.pair_maxima_backward(gmp, gmg, ap, ag, p, g)
    assert gp.shape == p.shape and gg.shape == g.shape
    np.testing.assert_allclose(gp, rgp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gg, rgg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7, 45, 7, 7), (3, 40, 130, 4, 6), (9, 2, 8, 1, 3)])
def test_backward_same_bits_on_every_path(rng, shape):
    """The backward sums the same double terms in the same order on every SIMD path (given the same
    argmax): bit-identical, for all pairs and restricted pairs (several pair chunks, C % 8 != 0)."""
    P, G, C, H, W = shape
    S = H * W
    p, g = maps(rng, P, C, H, W), maps(rng, G, C, H, W)
    ap = rng.integers(0, S, size=(P, G, S)).astype(np.uint16)
    ag = rng.integers(0, S, size=(P, G, S)).astype(np.uint16)
    gmp = rng.standard_normal((P, G, S)).astype(np.float32)
    gmg = rng.standard_normal((P, G, S)).astype(np.float32)
    cand = rng.integers(0, G, size=(P, 11))
    rap = rng.integers(0, S, size=(P, 11, S)).astype(np.uint16)
    rag = rng.integers(0, S, size=(P, 11, S)).astype(np.uint16)
    rgmp = rng.standard_normal((P, 11, S)).astype(np.float32)
    rgmg = rng.standard_normal((P, 11, S)).astype(np.float32)
    outs = []
    for level in ISAS:
        with at_isa(level):
            for nt in (1, 2):
                a = m.pair_maxima_backward(gmp, gmg, ap, ag, p, g, n_threads=nt)
                b = m.pair_maxima_restricted_backward(rgmp, rgmg, rap, rag, p, g, cand, n_threads=nt)
                outs.append((*a, *b))
    rgp, rgg = oracle.pair_maxima_backward(gmp, gmg, ap, ag, p, g)
    np.testing.assert_allclose(outs[0][0], rgp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[0][1], rgg, rtol=1e-5, atol=1e-6)
    for other in outs[1:]:
        for u, v in zip(outs[0], other):
            np.testing.assert_array_equal(u, v)


def _ordered_backward(P, G, gmp, gmg, ap, ag):
    """The documented summation order of the backward, with float64 accumulators: gP over galleries in
    order, gG over probes in order; within a pair the probe-direction terms (in s order), then the
    gallery-direction terms (in r order)."""
    nP, C, S = P.shape
    gP, gG = np.zeros(P.shape), np.zeros(G.shape)
    for p in range(nP):
        for g in range(G.shape[0]):
            for s in range(S):
                gP[p][:, s] += float(gmp[p, g, s]) * G[g][:, ap[p, g, s]].astype(np.float64)
            for r in range(S):
                gP[p][:, ag[p, g, r]] += float(gmg[p, g, r]) * G[g][:, r].astype(np.float64)
    for g in range(G.shape[0]):
        for p in range(nP):
            for s in range(S):
                gG[g][:, ap[p, g, s]] += float(gmp[p, g, s]) * P[p][:, s].astype(np.float64)
            for r in range(S):
                gG[g][:, r] += float(gmg[p, g, r]) * P[p][:, ag[p, g, r]].astype(np.float64)
    return gP.astype(np.float32), gG.astype(np.float32)


def test_backward_summation_order_is_the_documented_one():
    """Terms that cancel (2^60 - 2^60 + 1 is 1 in that order and 0 in most others): every path and
    thread count sums each output element's terms in the documented order, on both sides, for all
    pairs and restricted pairs (random gradients almost never expose a reordering)."""
    big = 2.0**60
    P = np.ones((1, 3, 1, 2), np.float32)
    G = np.ones((2, 3, 1, 2), np.float32)
    ap = np.zeros((1, 2, 2), np.uint16)
    ag = np.zeros((1, 2, 2), np.uint16)
    gmp = np.array([[[big, 0.0], [-big, big]]], np.float32)
    gmg = np.array([[[0.0, 0.0], [1.0, 0.0]]], np.float32)
    wp, wg = _ordered_backward(P.reshape(1, 3, 2), G.reshape(2, 3, 2), gmp, gmg, ap, ag)
    assert wp[0, 0, 0] == 1.0 and wg[1, 0, 0] == 1.0  # the cancellation the test relies on
    cand = np.array([[0, 1]], np.int64)
    for level in ISAS:
        with at_isa(level):
            for nt in (1, 2):
                gp, gg = m.pair_maxima_backward(gmp, gmg, ap, ag, P, G, n_threads=nt)
                rp, rg = m.pair_maxima_restricted_backward(gmp, gmg, ap, ag, P, G, cand, n_threads=nt)
                for got, want in ((gp, wp), (gg, wg), (rp, wp), (rg, wg)):
                    np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{level} nt={nt}")


@pytest.mark.parametrize("C, H, W", [(100, 24, 8), (300, 7, 7)])
def test_restricted_backward_large_maps_same_bits(rng, C, H, W):
    """Re-ID- and faces-sized maps (C not a multiple of 8, so the AVX2 path pads its transposed copies):
    every output element gets its terms in the portable order, so all paths and thread counts give the
    portable bits, for a run of probes sharing a candidate list (shared transposes) and for single probes."""
    from isa_levels import ISAS

    B, N, K = 7, 9, 5
    S = H * W
    x, _ = _native.norm_forward(rng.standard_normal((B, C, S)).astype(np.float32), 1)
    e, _ = _native.norm_forward(rng.standard_normal((N, C, S)).astype(np.float32), 1)
    cand = np.stack([rng.permutation(N)[:K] for _ in range(B)]).astype(np.int64)
    cand[1:5] = cand[1]  # a run of four probes with one list
    mp, mg, ap, ag = _native.match_maxima_restricted(x, e, cand, True, 1)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    previous = _native.set_isa("portable")
    try:
        want = _native.match_backward_restricted(x, e, cand, gmp, gmg, ap, ag, 1)
        for level in ISAS:
            _native.set_isa(level)
            for nt in (1, 3):
                got = _native.match_backward_restricted(x, e, cand, gmp, gmg, ap, ag, nt)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
    finally:
        _native.set_isa(previous)
    rgx, rge = _native.match_backward_restricted_ref(x, e, cand, gmp, gmg, ap, ag, 1)
    np.testing.assert_allclose(want[0], rgx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(want[1], rge, rtol=1e-6, atol=1e-7)


def test_restricted_backward_repeated_candidates(rng, isa):
    B, N, C, H, W = 4, 6, 8, 5, 3
    x, e = maps(rng, B, C, H, W), maps(rng, N, C, H, W)
    # class 2 several times in a row and across rows; classes 4, 5 never (their gradient is 0)
    cand = np.array([[2, 2, 2], [0, 2, 1], [2, 3, 0], [1, 1, 2]])
    mp, mg, ap, ag = m.pair_maxima_restricted(x, e, cand, return_argmax=True)
    gmp = rng.standard_normal(mp.shape).astype(np.float32)
    gmg = rng.standard_normal(mg.shape).astype(np.float32)
    gx, ge = m.pair_maxima_restricted_backward(gmp, gmg, ap, ag, x, e, cand)
    rgx, rge = oracle.pair_maxima_restricted_backward(gmp, gmg, ap, ag, x, e, cand)
    np.testing.assert_allclose(gx, rgx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ge, rge, rtol=1e-5, atol=1e-6)
    assert not ge[4:].any()
    cgx, cge = _native.match_backward_restricted_ref(flat3(x), flat3(e), cand, gmp, gmg, ap, ag, 1)
    np.testing.assert_allclose(gx, cgx.reshape(gx.shape), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ge, cge.reshape(ge.shape), rtol=1e-6, atol=1e-7)
    # the same as the all-pairs backward with the gradients of the non-candidate pairs set to 0,
    # when every (b, class) occurs at most once; with repeats the restricted sum is the sum over repeats
    full_gmp = np.zeros((B, N, H * W), np.float32)
    full_gmg = np.zeros((B, N, H * W), np.float32)
    for b in range(B):
        for j in range(3):
            full_gmp[b, cand[b, j]] += gmp[b, j]
            full_gmg[b, cand[b, j]] += gmg[b, j]
    _, _, fap, fag = m.pair_maxima(x, e, return_argmax=True)
    fgx, fge = m.pair_maxima_backward(full_gmp, full_gmg, fap, fag, x, e)
    np.testing.assert_allclose(gx, fgx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ge, fge, rtol=1e-5, atol=1e-6)


def test_backward_vs_torch_autograd(rng, isa):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B, N, K, C, H, W = 3, 5, 3, 12, 6, 4
    S = H * W
    X = rng.standard_normal((B, C, H, W)).astype(np.float32)
    E = rng.standard_normal((N, C, H, W)).astype(np.float32)
    cand = np.array([[1, 0, 4], [2, 2, 1], [0, 1, 3]])
    gmp = rng.standard_normal((B, K, S)).astype(np.float32)
    gmg = rng.standard_normal((B, K, S)).astype(np.float32)
    # torch oracle (float64): normalise, correlate, max both ways, weighted sum
    xt = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    et = torch.tensor(E, dtype=torch.float64, requires_grad=True)
    xn = F.normalize(xt.flatten(2), dim=1)
    en = F.normalize(et.flatten(2), dim=1)
    Z = torch.einsum("bcs,bkcr->bksr", xn, en[torch.tensor(cand)])
    loss = (Z.max(3).values * torch.tensor(gmp, dtype=torch.float64)).sum()
    loss = loss + (Z.max(2).values * torch.tensor(gmg, dtype=torch.float64)).sum()
    loss.backward()
    # our chain
    xn_, xnorm = m.normalize(X)
    en_, enorm = m.normalize(E)
    mp, mg, ap, ag = m.pair_maxima_restricted(xn_, en_, cand, return_argmax=True)
    np.testing.assert_allclose(mp, Z.max(3).values.detach().numpy(), rtol=RTOL, atol=ATOL)
    assert np.array_equal(ap, Z.max(3).indices.numpy()) and np.array_equal(ag, Z.max(2).indices.numpy())
    gxn, gen = m.pair_maxima_restricted_backward(gmp, gmg, ap, ag, xn_, en_, cand)
    gx = m.normalize_backward(gxn, xn_, xnorm)
    ge = m.normalize_backward(gen, en_, enorm)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(ge, et.grad.numpy(), rtol=RTOL, atol=1e-5)

    # all pairs: einsum('pcs,gcr->pgsr')
    pt = torch.tensor(xn_, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor(en_, dtype=torch.float64, requires_grad=True)
    Z = torch.einsum("pcs,gcr->pgsr", pt.flatten(2), gt.flatten(2))
    fmp = rng.standard_normal((B, N, S)).astype(np.float32)
    fmg = rng.standard_normal((B, N, S)).astype(np.float32)
    loss = (Z.max(3).values * torch.tensor(fmp, dtype=torch.float64)).sum()
    loss = loss + (Z.max(2).values * torch.tensor(fmg, dtype=torch.float64)).sum()
    loss.backward()
    mp, mg, ap, ag = m.pair_maxima(xn_, en_, return_argmax=True)
    assert np.array_equal(ap, Z.max(3).indices.numpy()) and np.array_equal(ag, Z.max(2).indices.numpy())
    gp, gg = m.pair_maxima_backward(fmp, fmg, ap, ag, xn_, en_)
    np.testing.assert_allclose(gp, pt.grad.numpy(), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(gg, gt.grad.numpy(), rtol=RTOL, atol=1e-5)


def test_finite_differences_composed(rng):
    """d/d(features, embeds) of sum(wp*mp + wg*mg) after normalisation, vs central differences of the
    float64 reference, at coordinates whose perturbation does not switch any argmax."""
    B, N, C, H, W = 2, 3, 5, 3, 4
    X = rng.standard_normal((B, C, H, W))
    E = rng.standard_normal((N, C, H, W))
    cand = np.array([[0, 2, 2], [1, 0, 2]])
    S = H * W
    wp = rng.standard_normal((B, 3, S))
    wg = rng.standard_normal((B, 3, S))
    xn, xnorm = m.normalize(X)
    en, enorm = m.normalize(E)
    _, _, ap, ag = m.pair_maxima_restricted(xn, en, cand, return_argmax=True)
    gxn, gen = m.pair_maxima_restricted_backward(wp, wg, ap, ag, xn, en, cand)
    gx = m.normalize_backward(gxn, xn, xnorm)
    ge = m.normalize_backward(gen, en, enorm)

    def argmaxes(Xv, Ev):
        _, _, a, b, _ = oracle.pair_maxima_restricted(oracle.normalize(Xv)[0], oracle.normalize(Ev)[0], cand)
        return a, b

    a0 = argmaxes(X, E)
    h = 1e-6
    checked = 0
    for which, arr, grad in (("X", X, gx), ("E", E, ge)):
        for flat_i in rng.choice(arr.size, size=12, replace=False):
            idx = np.unravel_index(flat_i, arr.shape)
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = (plus, E) if which == "X" else (X, plus)
            args_m = (minus, E) if which == "X" else (X, minus)
            if any(not np.array_equal(u, v) for u, v in zip(argmaxes(*args_p), a0)):
                continue
            if any(not np.array_equal(u, v) for u, v in zip(argmaxes(*args_m), a0)):
                continue
            fd = (
                oracle.composed_restricted(*args_p, cand, wp, wg)
                - oracle.composed_restricted(*args_m, cand, wp, wg)
            ) / (2 * h)
            np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-4)
            checked += 1
    assert checked >= 16


# ---------------------------------------------------------------- determinism


def test_threads_bit_identical(rng, isa):
    p, g = maps(rng, 7, 24, 24, 8), maps(rng, 9, 24, 24, 8)
    cand = rng.integers(0, 9, size=(7, 4))
    cand[:, 1] = 3
    w = rng.standard_normal(2 * 192).astype(np.float32)
    gmp = rng.standard_normal((7, 9, 192)).astype(np.float32)
    gmg = rng.standard_normal((7, 9, 192)).astype(np.float32)
    rg = rng.standard_normal((7, 4, 192)).astype(np.float32)
    x = rng.standard_normal(p.shape).astype(np.float32)
    results = []
    for nt in (1, 2, 3):
        y, n = m.normalize(x, n_threads=nt)
        out = m.pair_maxima(p, g, return_argmax=True, n_threads=nt)
        grads = m.pair_maxima_backward(gmp, gmg, out[2], out[3], p, g, n_threads=nt)
        rout = m.pair_maxima_restricted(p, g, cand, return_argmax=True, n_threads=nt)
        rgrads = m.pair_maxima_restricted_backward(rg, -rg, rout[2], rout[3], p, g, cand, n_threads=nt)
        sc = m.match_scores(p, g, w, 0.5, n_threads=nt)
        gx = m.normalize_backward(p, y, n, n_threads=nt)
        results.append((y, n, *out, *grads, *rout, *rgrads, sc, gx))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_threads_bit_identical_faces_layout(rng, isa):
    """S = 49 (maps concatenated across tiles), enough work for several threads."""
    p, g = maps(rng, 14, 64, 7, 7), maps(rng, 19, 64, 7, 7)
    cand = rng.integers(0, 19, size=(14, 6))
    w = rng.standard_normal(98).astype(np.float32)
    results = []
    for nt in (1, 2, 3):
        out = m.pair_maxima(p, g, return_argmax=True, n_threads=nt)
        vals = m.pair_maxima(p, g, n_threads=nt)
        rout = m.pair_maxima_restricted(p, g, cand, return_argmax=True, n_threads=nt)
        sc = m.match_scores(p, g, w, 0.25, n_threads=nt)
        results.append((*out, *vals, *rout, sc))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_default_threads_and_many_pairs(rng):
    p, g = maps(rng, 13, 8, 4, 4), maps(rng, 31, 8, 4, 4)
    a = m.pair_maxima(p, g, return_argmax=True)
    b = m.pair_maxima(p, g, return_argmax=True, n_threads=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- input zoo


def test_input_zoo_accepted_and_not_modified(rng):
    base_p = maps(rng, 3, 6, 4, 5)
    base_g = maps(rng, 4, 6, 4, 5)
    want = m.pair_maxima(base_p, base_g, return_argmax=True)
    p64 = base_p.astype(np.float64)
    big = base_g.astype(">f4")
    noncontig = np.asfortranarray(base_g)
    strided = np.repeat(base_p, 2, axis=0)[::2]
    ro = base_g.copy()
    ro.flags.writeable = False
    for pp, gg in ((p64, base_g), (base_p, big), (base_p, noncontig), (strided, ro)):
        before = (pp.copy(), gg.copy())
        got = m.pair_maxima(pp, gg, return_argmax=True)
        for u, v in zip(got, want):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(pp, before[0])
        np.testing.assert_array_equal(gg, before[1])
    # restricted: list candidates, int32, big-endian argmax
    cand = np.array([[0, 3], [2, 2], [1, 0]], dtype=np.int32)
    r = m.pair_maxima_restricted(p64, big, cand.tolist(), return_argmax=True)
    gx, ge = m.pair_maxima_restricted_backward(
        r[0].astype(np.float64), r[1][:, ::-1].copy()[:, ::-1], r[2].astype(">u2"), r[3], p64, big, cand
    )
    gx2, ge2 = m.pair_maxima_restricted_backward(r[0], r[1], r[2], r[3], base_p, base_g, cand)
    np.testing.assert_array_equal(gx, gx2)
    np.testing.assert_array_equal(ge, ge2)


def test_torch_tensors_accepted(rng):
    torch = pytest.importorskip("torch")
    p, g = maps(rng, 2, 4, 3, 3), maps(rng, 3, 4, 3, 3)
    a = m.pair_maxima(torch.from_numpy(p), torch.from_numpy(g).double())
    b = m.pair_maxima(p, g)
    np.testing.assert_array_equal(a[0], b[0])
    y, _ = m.normalize(torch.from_numpy(p))
    np.testing.assert_array_equal(y, m.normalize(p)[0])
    s = m.match_scores(torch.from_numpy(p), g, torch.ones(18), torch.tensor(0.5))
    np.testing.assert_array_equal(s, m.match_scores(p, g, np.ones(18), 0.5))


# ---------------------------------------------------------------- errors


def test_errors_forward(rng):
    p, g = maps(rng, 2, 4, 3, 3), maps(rng, 3, 4, 3, 3)
    with pytest.raises(ValueError, match="probe"):
        m.pair_maxima(p[0], g)
    with pytest.raises(ValueError, match="gallery"):
        m.pair_maxima(p, g[:, :2])
    with pytest.raises(ValueError, match="gallery"):
        m.pair_maxima(p, g.reshape(3, 4, 1, 9))
    with pytest.raises(ValueError, match="probe"):
        m.pair_maxima(p[:0], g)
    bad = p.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="probe"):
        m.pair_maxima(bad, g)
    with pytest.raises(ValueError, match="gallery"):
        m.pair_maxima(p, np.full_like(g, np.inf))
    with pytest.raises(TypeError, match="probe"):
        m.pair_maxima(p.astype(bool), g)
    with pytest.raises(TypeError, match="gallery"):
        m.pair_maxima(p, "abc")
    with pytest.raises(ValueError, match="n_threads"):
        m.pair_maxima(p, g, n_threads=0)
    with pytest.raises(TypeError, match="n_threads"):
        m.pair_maxima(p, g, n_threads=1.5)
    with pytest.raises(ValueError, match="H\\*W"):
        m.pair_maxima(np.ones((1, 1, 256, 257), np.float32), np.ones((1, 1, 256, 257), np.float32))
    with pytest.raises(ValueError, match="x"):
        m.normalize(np.ones((2, 3)))
    with pytest.raises(ValueError, match="n_threads"):
        m.normalize(p, n_threads=-1)


def test_errors_restricted(rng):
    x, e = maps(rng, 2, 4, 3, 3), maps(rng, 3, 4, 3, 3)
    with pytest.raises(ValueError, match="candidates"):
        m.pair_maxima_restricted(x, e, [[0, 3], [1, 1]])
    with pytest.raises(ValueError, match="candidates"):
        m.pair_maxima_restricted(x, e, [[0, -1], [1, 1]])
    with pytest.raises(ValueError, match="candidates"):
        m.pair_maxima_restricted(x, e, [0, 1])
    with pytest.raises(ValueError, match="candidates"):
        m.pair_maxima_restricted(x, e, [[0, 1]])
    with pytest.raises(ValueError, match="candidates"):
        m.pair_maxima_restricted(x, e, np.zeros((2, 0), np.int64))
    with pytest.raises(TypeError, match="candidates"):
        m.pair_maxima_restricted(x, e, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="embeds"):
        m.pair_maxima_restricted(x, e[:, :3], [[0], [1]])
    with pytest.raises(ValueError, match="features"):
        m.pair_maxima_restricted(x[0], e, [[0], [1]])
    # the C kernel re-checks candidates itself
    with pytest.raises(ValueError, match="out of range"):
        _native.match_maxima_restricted(flat3(x), flat3(e), np.array([[0], [7]]), False, 1)
    with pytest.raises(ValueError, match="out of range"):
        _native.match_maxima_restricted_ref(flat3(x), flat3(e), np.array([[0], [-1]]), False, 1)
    with pytest.raises(ValueError, match="candidates"):
        _native.match_maxima_restricted(flat3(x), flat3(e), np.array([[0]]), False, 1)


def test_errors_backward(rng):
    p, g = maps(rng, 2, 4, 3, 3), maps(rng, 3, 4, 3, 3)
    mp, mg, ap, ag = m.pair_maxima(p, g, return_argmax=True)
    with pytest.raises(TypeError, match="argmax_p"):
        m.pair_maxima_backward(mp, mg, ap.astype(np.int64), ag, p, g)
    with pytest.raises(ValueError, match="argmax_g"):
        m.pair_maxima_backward(mp, mg, ap, ag[:, :2], p, g)
    too_big = ag.copy()
    too_big[0, 0, 0] = 9
    with pytest.raises(ValueError, match="argmax_g"):
        m.pair_maxima_backward(mp, mg, ap, too_big, p, g)
    with pytest.raises(ValueError, match="grad_mp"):
        m.pair_maxima_backward(mp[:1], mg, ap, ag, p, g)
    with pytest.raises(ValueError, match="grad_mg"):
        m.pair_maxima_backward(mp, np.full_like(mg, np.nan), ap, ag, p, g)
    with pytest.raises(ValueError, match="gallery"):
        m.pair_maxima_backward(mp, mg, ap, ag, p, g[..., :2])
    with pytest.raises(ValueError, match="grad_mp"):
        m.pair_maxima_backward(mp, mg, ap, ag, p, g[:2])
    # the C kernel re-checks argmax ranges itself
    with pytest.raises(ValueError, match="out of range"):
        _native.match_backward(flat3(p), flat3(g), mp, mg, ap, too_big, 1)
    cand = np.array([[0, 2], [1, 1]])
    r = m.pair_maxima_restricted(p, g, cand, return_argmax=True)
    with pytest.raises(ValueError, match="candidates"):
        m.pair_maxima_restricted_backward(r[0], r[1], r[2], r[3], p, g, [[0, 3], [1, 1]])
    with pytest.raises(ValueError, match="grad_mp"):
        m.pair_maxima_restricted_backward(mp, r[1], r[2], r[3], p, g, cand)
    with pytest.raises(ValueError, match="out of range"):
        _native.match_backward_restricted(flat3(p), flat3(g), np.array([[0, 5], [1, 1]]), *r, 1)
    y, n = m.normalize(p)
    with pytest.raises(ValueError, match="norms"):
        m.normalize_backward(y, y, n[:, :3])
    with pytest.raises(ValueError, match="norms"):
        m.normalize_backward(y, y, -n)
    with pytest.raises(ValueError, match="grad_y"):
        m.normalize_backward(y[:1], y, n)
    with pytest.raises(ValueError, match="y"):
        m.normalize_backward(y, y[..., :2], n)


def test_errors_scores(rng):
    p, g = maps(rng, 2, 4, 3, 3), maps(rng, 3, 4, 3, 3)
    with pytest.raises(ValueError, match="weight"):
        m.match_scores(p, g, np.ones(17), 0.0)
    with pytest.raises(ValueError, match="weight"):
        m.match_scores(p, g, np.ones((2, 9)), 0.0)
    with pytest.raises(ValueError, match="weight"):
        m.match_scores(p, g, np.full(18, np.nan), 0.0)
    with pytest.raises(ValueError, match="bias"):
        m.match_scores(p, g, np.ones(18), float("nan"))
    with pytest.raises(TypeError, match="bias"):
        m.match_scores(p, g, np.ones(18), "1")
    with pytest.raises(TypeError, match="bias"):
        m.match_scores(p, g, np.ones(18), np.ones(3))
    with pytest.raises(ValueError, match="gallery"):
        m.match_scores(p, g[:, :, :2], np.ones(18), 0.0)


# ---------------------------------------------------------------- properties


@given(
    P=st.integers(1, 4),
    G=st.integers(1, 4),
    C=st.integers(1, 20),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    nt=st.integers(1, 3),
)
def test_property_pair_maxima(P, G, C, H, W, seed, nt):
    rng = np.random.default_rng(seed)
    p, g = maps(rng, P, C, H, W), maps(rng, G, C, H, W)
    refs = oracle.pair_maxima(p, g)
    for level in ISAS:
        with at_isa(level):
            out = m.pair_maxima(p, g, return_argmax=True, n_threads=nt)
            check_forward(out, refs)
    gmp = rng.standard_normal(out[0].shape).astype(np.float32)
    gmg = rng.standard_normal(out[0].shape).astype(np.float32)
    gp, gg = m.pair_maxima_backward(gmp, gmg, out[2], out[3], p, g, n_threads=nt)
    rgp, rgg = oracle.pair_maxima_backward(gmp, gmg, out[2], out[3], p, g)
    np.testing.assert_allclose(gp, rgp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gg, rgg, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- interrupts


@pytest.mark.parametrize("kind", ["maxima", "scores", "restricted"])
def test_ctrl_c_interrupts_kernel(rng, kind):
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    p = maps(rng, 96, 128, 24, 8)
    w = np.ones(2 * 192, np.float32)

    def run(n):
        q = p[:n]
        if kind == "maxima":
            return m.pair_maxima(q, p, return_argmax=True, n_threads=1)
        if kind == "scores":
            return m.match_scores(q, p, w, 0.0, n_threads=2)
        return m.pair_maxima_restricted(q, p, np.tile(np.arange(96), (n, 1)), n_threads=2)

    t0 = time.perf_counter()
    run(8)
    estimate = (time.perf_counter() - t0) * 12  # the full 96 probes
    delay = 0.05
    timer = threading.Timer(delay, lambda: signal.raise_signal(signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run(96)
    elapsed = time.perf_counter() - t0
    timer.join()
    # without polling the kernel would run to the end and the interrupt would only come after it; the
    # signal itself comes `delay` in (on a fast machine a sizeable part of the whole run)
    assert elapsed < delay + 0.3 * estimate, (elapsed, estimate)
    run(2)  # still usable afterwards
