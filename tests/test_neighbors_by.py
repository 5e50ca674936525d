"""neighbors_by="aligned": the model's neighbour table from the location-normalised rows (float64 oracle,
ties tolerated as the neighbour tests do), validation, save / load, the sharded refusal and the adapter."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import qaconv_gs as qg
from qaconv_gs.distributed.model import ShardedQAConvGS
from qaconv_gs.model import QAConvGS

C, H, W = 4, 2, 3


def _model(by, N=40, k=5, seed=0):
    m = QAConvGS(N, C, H, W, k_nearest=k, seed=seed, init="random", neighbors_by=by)
    rng = np.random.default_rng(seed)
    # rows whose location norms differ a lot, so the two metrics disagree
    m.class_embed[...] = rng.standard_normal(m.class_embed.shape) * rng.uniform(0.1, 10, size=(N, 1, H, W))
    return m


def _oracle_table(rows, k):
    return oracle.class_neighbors(rows.reshape(rows.shape[0], -1), k)


@pytest.mark.parametrize("by", ["cosine", "aligned"])
def test_table_is_class_neighbors_of_the_chosen_rows(by):
    m = _model(by)
    table = m.refresh_neighbors()
    E = m.class_embed.astype(np.float64).reshape(40, C, H * W)
    rows = oracle.normalize(E)[0] if by == "aligned" else E
    want_idx, want_sim = _oracle_table(rows, 5)
    # same sets up to ties: every chosen neighbour's similarity equals the oracle's at that rank
    flat = rows.reshape(40, -1)
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    got_sim = np.einsum("nd,nkd->nk", flat, flat[table])
    np.testing.assert_allclose(got_sim, want_sim, rtol=1e-5, atol=1e-6)


def test_the_two_metrics_differ_and_default_is_cosine():
    assert QAConvGS(6, C, H, W, k_nearest=2).config["neighbors_by"] == "cosine"
    a, b = _model("cosine").refresh_neighbors(), _model("aligned").refresh_neighbors()
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, qg.class_neighbors(_model("cosine").class_embed, 5))


def test_neighbors_by_validation_and_plumbing(tmp_path):
    with pytest.raises(ValueError, match=r"^neighbors_by: expected one of \('cosine', 'aligned'\), got 'x'$"):
        QAConvGS(6, C, H, W, k_nearest=2, neighbors_by="x")
    with pytest.raises(TypeError, match="^neighbors_by: "):
        QAConvGS(6, C, H, W, k_nearest=2, neighbors_by=1)
    m = _model("aligned")
    m.save(tmp_path / "m.npz")
    back = QAConvGS.load(tmp_path / "m.npz")
    assert back.config["neighbors_by"] == "aligned"
    np.testing.assert_array_equal(back.refresh_neighbors(), m.refresh_neighbors())
    dims = dict(num_classes=6, channels=2, height=1, width=2, k_nearest=2, seed=3)
    assert ShardedQAConvGS(**dims, neighbors_by="aligned").config["neighbors_by"] == "aligned"
    s = ShardedQAConvGS.from_model(m)
    np.testing.assert_array_equal(s.refresh_neighbors(), m.refresh_neighbors())


def test_torch_adapter_passes_neighbors_by():
    pytest.importorskip("torch")
    from qaconv_gs.torch import QAConvGSLoss

    crit = QAConvGSLoss(20, C, H, W, k_nearest=2, seed=0, neighbors_by="aligned")
    assert crit.config["neighbors_by"] == "aligned"
