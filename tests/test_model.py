"""QAConvGS: one training step vs a float64 NumPy reference and PyTorch autograd, neighbours, evaluation,
state_dict, validation, determinism."""

from __future__ import annotations

import copy
import threading

import numpy as np
import oracle
import pytest
import qaconv_gs.model as model_mod
import qaconv_gs.neighbors as neighbors_mod
from hypothesis import given
from hypothesis import strategies as st
from oracle import HEAD_PARAM_KEYS
from qaconv_gs.model import IncompatibleKeys, QAConvGS, StepResult

N, C, H, W, K_NN = 12, 8, 4, 3, 4
S = H * W
CONFIGS = [(fc, tr) for fc in ("separate", "shared") for tr in ("class", "batch")]


def make_model(fc="separate", triplet="class", seed=0, **kw) -> QAConvGS:
    """A model whose head is not at its initial values (so every term of the maths is exercised); rows from
    the seed system's random start (init="random": the references score the rows as they are)."""
    kw.setdefault("k_nearest", K_NN)
    kw.setdefault("init", "random")
    m = QAConvGS(kw.pop("num_classes", N), C, H, W, fc=fc, triplet=triplet, seed=seed, **kw)
    rng = np.random.default_rng(seed + 100)
    sd = m.state_dict()
    sd["bn.weight"][:] = 1.3
    sd["bn.bias"][:] = 0.2
    sd["bn.running_mean"][:] = 0.3
    sd["bn.running_var"][:] = 0.05
    sd["fc.weight"] *= rng.uniform(0.5, 1.5, sd["fc.weight"].shape).astype(np.float32)
    sd["logit_bn.weight"][:] = 0.8
    sd["logit_bn.bias"][:] = -0.1
    sd["logit_bn.running_mean"][:] = -0.2
    sd["logit_bn.running_var"][:] = 2.0
    m.load_state_dict(sd)
    return m


def batch(seed=1, B=6, labels=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((B, C, H, W)).astype(np.float32)
    if labels is None:
        labels = np.repeat(rng.choice(N, size=(B + 1) // 2, replace=False), 2)[:B]
    return X, np.asarray(labels, dtype=np.int64)


def assert_close(actual, ref, rtol=1e-4, atol_frac=1e-5, err_msg=""):
    """rtol 1e-4 elementwise; atol = 1e-5 * max|ref| because float32 sums of mixed-sign terms lose
    absolute (not relative) precision on entries that nearly cancel."""
    ref = np.asarray(ref, dtype=np.float64)
    atol = atol_frac * max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), ref, rtol=rtol, atol=atol, err_msg=err_msg
    )


def head_before(m: QAConvGS) -> dict:
    return {k: v for k, v in m.state_dict().items() if k != "class_embed"}


# ----------------------------------------------------------------------------- construction


def test_init_follows_the_seed_system():
    m = QAConvGS(200, 16, 4, 3, k_nearest=8, seed=7, init="random")
    E = m.class_embed
    assert E.dtype == np.float32 and E.shape == (200, 16, 4, 3) and E.flags.c_contiguous
    assert abs(float(E.std()) - 1 / 4) < 0.01 and abs(float(E.mean())) < 0.01
    sd = m.state_dict()
    np.testing.assert_array_equal(sd["fc.weight"], np.full((1, 24), 1 / 12, np.float32))
    assert abs(float(sd["fc.bias"][0])) <= 1 / np.sqrt(24)
    assert sd["bn.weight"][0] == 1 and sd["bn.bias"][0] == 0 and sd["bn.running_var"][0] == 1
    m2 = QAConvGS(200, 16, 4, 3, k_nearest=8, seed=7, init="random")
    for k, v in m2.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    assert not np.array_equal(QAConvGS(200, 16, 4, 3, k_nearest=8, seed=8, init="random").class_embed, E)
    shared = QAConvGS(200, 16, 4, 3, k_nearest=8, fc="shared", seed=7, init="random").state_dict()
    assert shared["fc.weight"].shape == (1, 12) and abs(float(shared["fc.bias"][0])) <= 1 / np.sqrt(12)


def _class_means(X, y, ids):
    """float64 reference of imprinting: per class, the mean over its samples of x / ||x|| per location."""
    x = np.asarray(X, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return {int(c): x[np.asarray(y) == c].mean(axis=0) for c in ids}


def test_default_init_imprints_the_step_classes():
    m = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=0)
    assert m.init == "imprint" and m.config["init"] == "imprint" and m.config["imprint_samples"] == 64
    assert m.class_embed.shape == (N, C, H, W) and not m.class_embed.any()  # every row unset
    np.testing.assert_array_equal(m.unset_classes(), np.arange(N))
    # the same random draws as init="random": the head starts the same
    rand = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=0, init="random")
    for k, v in rand.head_state.items():
        np.testing.assert_array_equal(np.asarray(m.head_state[k]), np.asarray(v), err_msg=k)

    X, y = batch(seed=1, B=6)  # 3 classes, 2 samples each
    classes = np.unique(y)
    r = m.forward_backward(X, y)  # no learning rate: the only change to class_embed is the imprint
    want = _class_means(X, y, classes)
    for c in range(N):
        if c in want:
            np.testing.assert_allclose(m.class_embed[c], want[c], rtol=1e-5, err_msg=f"class {c}")
        else:
            assert not m.class_embed[c].any(), f"class {c} is not in the batch: stays unset"
    np.testing.assert_array_equal(m.unset_classes(), np.setdiff1d(np.arange(N), classes))
    # unset rows among the candidates (the table was built after the imprint) get no gradient
    unset_cands = np.setdiff1d(r.grad_embed_ids, classes)
    assert unset_cands.size and np.isin(unset_cands, r.candidates).all()
    rows = dict(zip(r.grad_embed_ids.tolist(), r.grad_embed_rows))
    for c in unset_cands.tolist():
        assert not rows[c].any(), f"unset candidate row {c} got a gradient"
    assert np.isin(classes, r.grad_embed_ids).all() and all(rows[c].any() for c in classes.tolist())
    assert np.isfinite(r.grad_features).all() and np.isfinite(r.loss)

    # a second step on the same classes goes on averaging (fewer than imprint_samples samples so far)
    X2, _ = batch(seed=2, B=6)
    m.forward_backward(X2, y)
    want = _class_means(np.concatenate([X, X2]), np.concatenate([y, y]), classes)
    for c in classes.tolist():
        np.testing.assert_allclose(m.class_embed[c], want[c], rtol=1e-5, err_msg=f"class {c}")
    np.testing.assert_array_equal(m._imprinted[classes], [4] * classes.size)

    # imprint() sets the class means of its call, replacing the running means, and marks them imprinted
    X3, _ = batch(seed=3, B=8)
    y3 = np.array([classes[0], 9, 9, classes[0], 9, 11, classes[0], 11])
    ids = m.imprint(X3, y3)
    np.testing.assert_array_equal(ids, np.unique(y3))
    want = _class_means(X3, y3, ids)
    for c in ids.tolist():
        np.testing.assert_allclose(m.class_embed[c], want[c], rtol=1e-5, err_msg=f"class {c}")
    assert (m._imprinted[ids] >= m.imprint_samples).all() and m.neighbors_stale
    before = m.class_embed.copy()
    m.forward_backward(X2, np.repeat(ids, 2)[:6])  # fully imprinted rows: the step leaves them alone
    np.testing.assert_array_equal(m.class_embed, before)


def test_imprint_counts_round_trip_through_save_and_load(tmp_path):
    m = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=0)
    X, y = batch(seed=1, B=6)
    m.forward_backward(X, y)
    m.imprint(*batch(seed=4, B=2, labels=[10, 10]))
    counts = m._imprinted.copy()
    assert sorted(set(counts.tolist())) == [0, 2, m.imprint_samples]  # unset, running, fully imprinted
    m.save(tmp_path / "m.npz")
    m2, extra = QAConvGS.load(tmp_path / "m.npz", return_extra=True)
    assert extra == {} and m2.config == m.config
    np.testing.assert_array_equal(m2._imprinted, counts)
    m3 = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=5)
    assert m3.load_checkpoint(tmp_path / "m.npz") == {}
    np.testing.assert_array_equal(m3._imprinted, counts)
    # the running means go on the same way as in the saved model
    X2, _ = batch(seed=2, B=6)
    for model in (m, m2, m3):
        model.forward_backward(X2, y)
    np.testing.assert_array_equal(m2.class_embed, m.class_embed)
    np.testing.assert_array_equal(m3.class_embed, m.class_embed)
    np.testing.assert_array_equal(m2._imprinted, m._imprinted)


def test_load_state_dict_marks_loaded_rows_imprinted():
    trained = make_model(seed=3).state_dict()  # a random-start table: every row non-zero
    trained["class_embed"][[2, 7]] = 0.0  # two rows still unset
    m = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=0)
    m.load_state_dict(trained)
    np.testing.assert_array_equal(m.unset_classes(), [2, 7])
    want = np.full(N, m.imprint_samples)
    want[[2, 7]] = 0
    np.testing.assert_array_equal(m._imprinted, want)
    # a step on loaded classes does not imprint them again: class_embed is unchanged (no learning rate)
    X, y = batch(seed=1, labels=[0, 0, 5, 5, 9, 9])
    m.forward_backward(X, y)
    np.testing.assert_array_equal(m.class_embed, trained["class_embed"])
    # ... while an unset row is imprinted by its first step
    X, y = batch(seed=2, B=4, labels=[7, 7, 5, 5])
    m.forward_backward(X, y)
    np.testing.assert_allclose(m.class_embed[7], _class_means(X, y, [7])[7], rtol=1e-5)
    others = np.arange(N) != 7
    np.testing.assert_array_equal(m.class_embed[others], trained["class_embed"][others])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_classes=1), ValueError, "num_classes"),
        (dict(num_classes=2.5), TypeError, "num_classes"),
        (dict(k_nearest=0), ValueError, "k_nearest"),
        (dict(k_nearest=N), ValueError, "k_nearest"),
        (dict(k_nearest=True), TypeError, "k_nearest"),
        (dict(channels=0), ValueError, "channels"),
        (dict(height=-1), ValueError, "height"),
        (dict(height=300, width=300), ValueError, "height \\* width"),
        (dict(fc="both"), ValueError, "fc"),
        (dict(fc=1), TypeError, "fc"),
        (dict(triplet="hard"), ValueError, "triplet"),
        (dict(triplet_weight=-0.1), ValueError, "triplet_weight"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(n_threads=0), ValueError, "n_threads"),
        (dict(n_threads="2"), TypeError, "n_threads"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    args = dict(num_classes=N, channels=C, height=H, width=W, k_nearest=K_NN)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        QAConvGS(**args)


def test_full_scoring_k_equals_n_minus_1():
    m = make_model(k_nearest=N - 1)
    X, y = batch()
    r = m.forward_backward(X, y)
    assert r.scores.shape == (6, N)
    for b in range(6):
        assert sorted(r.candidates[b]) == list(range(N)) and r.candidates[b, 0] == y[b]


def test_repr_and_config():
    m = make_model()
    text = repr(m)
    for part in ("QAConvGS(num_classes=12", "k_nearest=4", "fc='separate'", "training mode", "stale"):
        assert part in text
    m2 = QAConvGS.from_config(m.config)
    assert m2.config == m.config
    with pytest.raises(ValueError, match="unknown"):
        QAConvGS.from_config(dict(m.config, bogus=1))
    r = m.forward_backward(*batch())
    assert "loss=" in repr(r) and "embed_rows=" in repr(r) and "fresh" in repr(m)
    assert m.eval() is m and not m.training and "eval mode" in repr(m)
    assert m.train() is m and m.training


# ----------------------------------------------------------------------------- the training step


@pytest.mark.parametrize("fc, triplet", CONFIGS)
def test_forward_backward_matches_float64_reference(fc, triplet):
    m = make_model(fc, triplet)
    X, y = batch()
    head0 = head_before(m)
    E0 = m.class_embed.copy()
    params0 = {k: v.copy() for k, v in m.parameters().items()}
    r = m.forward_backward(X, y)
    ref = oracle.forward_backward(X, y, E0, head0, m.class_neighbors, fc, triplet, m.triplet_weight, m.margin)

    assert isinstance(r, StepResult)
    for key in ("loss", "loss_cls", "loss_triplet"):
        assert getattr(r, key) == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert r.acc_cls == ref["acc_cls"] and r.acc_triplet == ref["acc_triplet"]
    assert r.loss == pytest.approx(r.loss_cls + m.triplet_weight * r.loss_triplet, rel=1e-6)
    np.testing.assert_array_equal(r.candidates, ref["candidates"])
    assert r.candidates.dtype == np.int64 and r.scores.dtype == np.float32
    assert_close(r.scores, ref["scores"])
    assert r.grad_features.shape == X.shape and r.grad_features.dtype == np.float32
    assert_close(r.grad_features, ref["grad_features"], err_msg="grad_features")
    np.testing.assert_array_equal(r.grad_embed_ids, np.unique(ref["candidates"]))
    assert r.embed_rows is r.grad_embed_ids
    assert r.grad_embed_rows.shape == (len(r.grad_embed_ids), C, H, W)
    assert_close(r.dense_grad_embed(N), ref["grad_embed"], err_msg="grad_embed")
    assert set(r.grad_head) == set(HEAD_PARAM_KEYS)
    for k in HEAD_PARAM_KEYS:
        assert r.grad_head[k].shape == params0[k].shape and r.grad_head[k].dtype == np.float32
        # bias gradients are exactly 0 in exact arithmetic; 1e-6 absolute covers float32 round-off
        np.testing.assert_allclose(r.grad_head[k], ref["grad_head"][k], rtol=1e-4, atol=1e-6, err_msg=k)
    for k in ("bn.bias", "fc.bias", "logit_bn.bias"):
        assert abs(float(r.grad_head[k][0])) < 1e-6
    # parameters untouched, running statistics updated (once per head call)
    for k, v in m.parameters().items():
        np.testing.assert_array_equal(v, params0[k], err_msg=k)
    sd = m.state_dict()
    for k, v in ref["running"].items():
        np.testing.assert_allclose(sd[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    calls = 2 if triplet == "batch" else 1
    assert int(sd["bn.num_batches_tracked"]) == calls and int(sd["logit_bn.num_batches_tracked"]) == calls


@pytest.mark.parametrize("fc, triplet", CONFIGS)
def test_forward_backward_matches_torch_autograd(fc, triplet):
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import torch_step  # the PyTorch twin of the benchmarks

    m = make_model(fc, triplet, seed=3)
    X, y = batch(seed=4, B=8)
    head0 = head_before(m)
    E0 = m.class_embed.copy()
    r = m.forward_backward(X, y)
    t = torch_step(
        torch, X, y, E0, head0, m.class_neighbors, fc=fc, triplet=triplet,
        triplet_weight=m.triplet_weight, margin=m.margin, dtype=torch.float64, embed_grad="dense",
    )  # fmt: skip
    assert r.loss == pytest.approx(t["loss"], rel=1e-4)
    assert_close(r.scores, t["scores"])
    assert_close(r.grad_features, t["grad_features"])
    dense = np.zeros_like(E0, dtype=np.float64)
    dense[t["grad_embed_ids"]] = t["grad_embed_rows"]  # the dense leaf's gradient, candidate rows
    assert_close(r.dense_grad_embed(N), dense)
    for k in HEAD_PARAM_KEYS:
        np.testing.assert_allclose(r.grad_head[k], t["grad_head"][k], rtol=1e-4, atol=1e-6, err_msg=k)
    sd = m.state_dict()
    for k, v in t["running"].items():
        np.testing.assert_allclose(sd[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def _ref_loss(X, y, E, head, nbr, fc, triplet):
    return oracle.forward_backward(X, y, E, head, nbr, fc, triplet)


@pytest.mark.parametrize("fc, triplet", [("separate", "class"), ("shared", "batch")])
def test_reference_gradients_match_finite_differences(fc, triplet):
    """Central differences of the float64 reference loss along random directions, away from argmax
    switches (checked: the max/runner-up gap is far larger than the perturbation) and hinge kinks."""
    m = make_model(fc, triplet, seed=5)
    X, y = batch(seed=6)
    X = X.astype(np.float64)
    E = m.class_embed.astype(np.float64)
    head = head_before(m)
    nbr = m.class_neighbors
    base = _ref_loss(X, y, E, head, nbr, fc, triplet)
    assert base["argmax_gap"] > 1e-5
    assert np.abs(base["hinges"]).min() > 1e-4
    rng = np.random.default_rng(0)
    h = 1e-7
    for _ in range(3):
        dX = rng.standard_normal(X.shape)
        lp = _ref_loss(X + h * dX, y, E, head, nbr, fc, triplet)["loss"]
        lm = _ref_loss(X - h * dX, y, E, head, nbr, fc, triplet)["loss"]
        fd = (lp - lm) / (2 * h)
        assert fd == pytest.approx(float((base["grad_features"] * dX).sum()), rel=1e-5, abs=1e-8)
        dE = rng.standard_normal(E.shape)
        lp = _ref_loss(X, y, E + h * dE, head, nbr, fc, triplet)["loss"]
        lm = _ref_loss(X, y, E - h * dE, head, nbr, fc, triplet)["loss"]
        fd = (lp - lm) / (2 * h)
        assert fd == pytest.approx(float((base["grad_embed"] * dE).sum()), rel=1e-5, abs=1e-8)
    for k in ("bn.weight", "fc.weight", "logit_bn.weight"):
        d = rng.standard_normal(np.shape(head[k]))
        hp = dict(head, **{k: head[k] + h * d})
        hm = dict(head, **{k: head[k] - h * d})
        fd = (
            _ref_loss(X, y, E, hp, nbr, fc, triplet)["loss"]
            - _ref_loss(X, y, E, hm, nbr, fc, triplet)["loss"]
        )
        assert fd / (2 * h) == pytest.approx(float((base["grad_head"][k] * d).sum()), rel=1e-5, abs=1e-8), k


def test_model_loss_moves_as_its_gradient_predicts():
    """First-order check on the float32 model itself: a small step along -grad lowers the loss by ~|g|^2."""
    m = make_model(seed=9).eval()  # eval: running statistics untouched between the calls
    X, y = batch(seed=10)
    r = m.forward_backward(X, y)
    g = r.grad_features.astype(np.float64)
    t = 1e-2 / np.sqrt((g * g).sum())
    r2 = m.forward_backward(X - t * g, y)
    predicted = t * float((g * g).sum())
    assert r.loss - r2.loss == pytest.approx(predicted, rel=0.05)


def test_eval_mode_freezes_running_stats_but_not_the_maths():
    m = make_model()
    X, y = batch()
    before = m.state_dict()
    m.eval()
    r_eval = m.forward_backward(X, y)
    s_eval, _ = m.scores(X, y)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    m.train()
    r_train = m.forward_backward(X, y)
    assert r_eval.loss == r_train.loss
    np.testing.assert_array_equal(r_eval.grad_features, r_train.grad_features)
    np.testing.assert_array_equal(s_eval, r_train.scores)
    assert int(m.state_dict()["bn.num_batches_tracked"]) == 1


@pytest.mark.parametrize("triplet", ["class", "batch"])
def test_batch_of_one(triplet):
    m = make_model(triplet=triplet)
    X, y = batch(B=1, labels=[5])
    head0 = head_before(m)
    E0 = m.class_embed.copy()
    r = m.forward_backward(X, y)
    ref = oracle.forward_backward(X, y, E0, head0, m.class_neighbors, "separate", triplet)
    assert r.loss == pytest.approx(ref["loss"], rel=1e-4)
    assert_close(r.grad_features, ref["grad_features"])
    if triplet == "batch":
        assert r.loss_triplet == 0.0 and r.acc_triplet == 0.0


def test_batch_of_97_odd_sizes():
    m = QAConvGS(31, 3, 1, 5, k_nearest=6, seed=2, init="random")
    rng = np.random.default_rng(3)
    X = rng.standard_normal((97, 3, 1, 5))
    y = rng.integers(0, 31, 97)
    head0 = head_before(m)
    E0 = m.class_embed.copy()
    r = m.forward_backward(X, y)
    ref = oracle.forward_backward(X, y, E0, head0, m.class_neighbors)
    assert r.loss == pytest.approx(ref["loss"], rel=1e-4)
    assert_close(r.grad_features, ref["grad_features"])
    assert_close(r.dense_grad_embed(31), ref["grad_embed"])


@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 9),
    fc=st.sampled_from(["separate", "shared"]),
    triplet=st.sampled_from(["class", "batch"]),
    k=st.integers(1, 5),
)
def test_property_forward_backward_vs_reference(seed, B, fc, triplet, k):
    m = QAConvGS(7, 5, 2, 3, k_nearest=k, fc=fc, triplet=triplet, seed=seed % 1000, init="random")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((B, 5, 2, 3)).astype(np.float32)
    y = rng.integers(0, 7, B)
    head0 = head_before(m)
    E0 = m.class_embed.copy()
    r = m.forward_backward(X, y)
    ref = oracle.forward_backward(X, y, E0, head0, m.class_neighbors, fc, triplet)
    if ref["argmax_gap"] < 1e-4:
        return  # a near-tie: float32 and float64 may pick different maxima, both correct
    assert r.loss == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5)
    assert_close(r.scores, ref["scores"], atol_frac=1e-4)
    assert_close(r.grad_features, ref["grad_features"], rtol=1e-3, atol_frac=1e-4)


# ----------------------------------------------------------------------------- inputs


def test_input_zoo_gives_identical_results_and_inputs_are_untouched():
    m = make_model()
    X, y = batch()
    r0 = copy.deepcopy(m).forward_backward(X, y)
    X64 = X.astype(np.float64)
    big = X.astype(">f4")
    wide = np.zeros((6, C, H, 2 * W), np.float32)
    wide[..., ::2] = X
    ro = X.copy()
    ro.setflags(write=False)
    for variant, lab in (
        (X64, y),
        (big, y.astype(">i8")),
        (wide[..., ::2], list(y)),
        (ro, y.astype(np.int32)),
    ):
        keep = np.array(variant, copy=True)
        r = copy.deepcopy(m).forward_backward(variant, lab)
        np.testing.assert_array_equal(np.asarray(variant), keep)
        assert r.loss == r0.loss
        np.testing.assert_array_equal(r.grad_features, r0.grad_features)
        np.testing.assert_array_equal(r.grad_embed_rows, r0.grad_embed_rows)


def test_torch_tensor_inputs():
    torch = pytest.importorskip("torch")
    m = make_model()
    X, y = batch()
    r0 = copy.deepcopy(m).forward_backward(X, y)
    r = m.forward_backward(torch.from_numpy(X), torch.from_numpy(y))
    assert r.loss == r0.loss


@pytest.mark.parametrize(
    "features, labels, exc, match",
    [
        (np.zeros((6, C, H)), None, ValueError, "features"),
        (np.zeros((6, C + 1, H, W)), None, ValueError, "features"),
        (np.zeros((6, C, H, W + 1)), None, ValueError, "features"),
        (np.zeros((0, C, H, W)), np.zeros(0, np.int64), ValueError, "features"),
        (np.array([["a"]]), None, TypeError, "features"),
        ("nan", None, ValueError, "features"),
        ("inf", None, ValueError, "features"),
        (None, np.arange(5), ValueError, "labels"),
        (None, np.array([0, 1, 2, 3, 4, N]), ValueError, "labels"),
        (None, np.array([0, 1, 2, 3, 4, -1]), ValueError, "labels"),
        (None, np.zeros((6, 1), np.int64), ValueError, "labels"),
        (None, np.full(6, 0.5), TypeError, "labels"),
        (None, np.ones(6, bool), TypeError, "labels"),
    ],
)
def test_forward_backward_validation(features, labels, exc, match):
    m = make_model()
    X, y = batch()
    if isinstance(features, str):
        X = X.copy()
        X[2, 1, 0, 0] = np.nan if features == "nan" else np.inf
        features = X
    before = m.state_dict()
    for fn in (m.forward_backward, m.scores):
        with pytest.raises(exc, match=match):
            fn(X if features is None else features, y if labels is None else labels)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_threads_bit_identical():
    for triplet in ("class", "batch"):
        out = []
        for nt in (1, 2):
            m = make_model(triplet=triplet, n_threads=nt)
            X, y = batch(B=10, seed=11)
            r = m.forward_backward(X, y)
            P = np.random.default_rng(1).standard_normal((5, C, H, W))
            out.append((r, m.match(P, X), m.identify(P, top=3), m.match_pairs(P, X[:5]), m.state_dict()))
        (a, ma, ia, pa, sa), (b, mb, ib, pb, sb) = out
        assert a.loss == b.loss and a.acc_cls == b.acc_cls and a.loss_triplet == b.loss_triplet
        for f in ("scores", "candidates", "grad_features", "grad_embed_ids", "grad_embed_rows"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        for k in a.grad_head:
            np.testing.assert_array_equal(a.grad_head[k], b.grad_head[k], err_msg=k)
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(ia[0], ib[0])
        np.testing.assert_array_equal(ia[1], ib[1])
        np.testing.assert_array_equal(pa, pb)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_concurrent_calls_from_threads():
    m = make_model()
    P = np.random.default_rng(2).standard_normal((7, C, H, W))
    expected = m.match(P, P)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(m.match(P, P))
                m.forward_backward(*batch())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 15 and all(r.shape == expected.shape and np.isfinite(r).all() for r in results)
    assert int(m.state_dict()["bn.num_batches_tracked"]) == 15


# ----------------------------------------------------------------------------- neighbours


def test_neighbors_lazy_stale_and_refresh(monkeypatch):
    calls = []
    real = neighbors_mod.class_neighbors

    def spy(E, k, *args, **kw):
        calls.append(np.array(E, copy=True))
        return real(E, k, *args, **kw)

    monkeypatch.setattr(neighbors_mod, "class_neighbors", spy)
    m = make_model()
    X, y = batch()
    assert calls == [] and m.neighbors_stale and m.neighbor_refreshes == 0
    m.forward_backward(X, y)
    assert len(calls) == 1 and m.neighbor_refreshes == 1 and np.isnan(m.neighbor_change)
    table1 = m.class_neighbors.copy()
    m.forward_backward(X, y)
    m.scores(X, y)
    assert len(calls) == 1  # fixed within an epoch
    # the embeddings move (an optimiser writes in place): nothing recomputed until the next epoch
    m.parameters()["class_embed"][:] = m.class_embed[::-1].copy()
    m.forward_backward(X, y)
    assert len(calls) == 1
    np.testing.assert_array_equal(m.class_neighbors, table1)
    m.on_epoch_start()
    assert m.neighbors_stale and len(calls) == 1
    r = m.forward_backward(X, y)
    assert len(calls) == 2 and m.neighbor_refreshes == 2
    np.testing.assert_array_equal(calls[1], m.class_embed)  # computed from the current embeddings
    # rows reversed: class i now has the old neighbours of N-1-i, mapped through the reversal
    np.testing.assert_array_equal(m.class_neighbors, (N - 1 - table1)[::-1])
    assert 0.0 < m.neighbor_change <= 1.0
    np.testing.assert_array_equal(r.candidates[:, 1:], m.class_neighbors[y])
    m.refresh_neighbors()
    assert len(calls) == 3 and m.neighbor_change == 0.0
    with pytest.raises(ValueError):
        m.class_neighbors[0, 0] = 1  # read-only


def test_neighbor_table_is_cosine_knn():
    m = QAConvGS(20, 4, 2, 2, k_nearest=5, seed=4, init="random")
    E = m.class_embed.reshape(20, -1).astype(np.float64)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    sim = E @ E.T
    np.fill_diagonal(sim, -np.inf)
    expected = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(m.class_neighbors, expected)
    assert m.class_neighbors.dtype == np.int64


def test_neighbor_change_fraction():
    old = np.array([[1, 2], [0, 2], [0, 1]])
    assert model_mod._neighbor_change(old, old[:, ::-1]) == 0.0  # order inside a row ignored
    assert model_mod._neighbor_change(old, np.array([[1, 2], [2, 0], [1, 2]])) == pytest.approx(1 / 6)
    assert np.isnan(model_mod._neighbor_change(None, old))


# ----------------------------------------------------------------------------- scores and evaluation


def test_scores_and_dense_scores():
    m = make_model()
    X, y = batch()
    r = copy.deepcopy(m).forward_backward(X, y)
    s, cand = m.scores(X, y)
    np.testing.assert_array_equal(s, r.scores)
    np.testing.assert_array_equal(cand, r.candidates)
    np.testing.assert_array_equal(cand, oracle.candidates(y, m.class_neighbors))
    d = m.dense_scores(X, y)
    assert d.shape == (6, N) and d.dtype == np.float32
    mask = np.zeros((6, N), bool)
    np.put_along_axis(mask, cand, True, axis=1)
    assert np.isneginf(d[~mask]).all()
    np.testing.assert_array_equal(np.take_along_axis(d, cand, axis=1), s)
    d0 = m.dense_scores(X, y, fill=0.0)
    assert (d0[~mask] == 0).all()
    np.testing.assert_array_equal(np.take_along_axis(d0, cand, axis=1), s)
    with pytest.raises(TypeError, match="fill"):
        m.dense_scores(X, y, fill="x")


def test_match_against_reference_and_match_pairs():
    m = make_model(fc="shared")
    rng = np.random.default_rng(8)
    P = rng.standard_normal((5, C, H, W)).astype(np.float32)
    G = rng.standard_normal((7, C, H, W)).astype(np.float32)
    Sc = m.match(P, G)
    assert Sc.shape == (5, 7) and Sc.dtype == np.float32
    assert_close(Sc, oracle.match(P, G, head_before(m), "shared"))
    pairs = m.match_pairs(P, G[:5])
    assert pairs.shape == (5,) and pairs.dtype == np.float32
    np.testing.assert_allclose(pairs, np.diag(Sc[:, :5]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="b"):
        m.match_pairs(P, G)
    with pytest.raises(ValueError, match="gallery"):
        m.match(P, G[:, :2])
    with pytest.raises(ValueError, match="probe"):
        m.match(P[0], G)


def test_match_pairs_blocks(monkeypatch):
    m = make_model()
    rng = np.random.default_rng(8)
    A = rng.standard_normal((11, C, H, W))
    Bm = rng.standard_normal((11, C, H, W))
    full = m.match_pairs(A, Bm)
    monkeypatch.setattr(model_mod, "_PAIRS_BLOCK", 4)
    np.testing.assert_array_equal(m.match_pairs(A, Bm), full)


@pytest.mark.parametrize("block", [1024, 5, 3])
def test_identify_matches_match_against_class_embeddings(monkeypatch, block):
    monkeypatch.setattr(model_mod, "_IDENTIFY_BLOCK", block)
    m = make_model()
    m.forward_backward(*batch())  # non-trivial running statistics
    X = np.random.default_rng(3).standard_normal((9, C, H, W)).astype(np.float32)
    X[0] = m.class_embed[4] * 3.0  # a sample that is a class embedding scores that class highest
    full = m.match(X, m.class_embed)
    ids, sc = m.identify(X, top=5)
    assert ids.shape == (9, 5) and ids.dtype == np.int64 and sc.dtype == np.float32
    np.testing.assert_array_equal(ids[:, 0], full.argmax(axis=1))
    assert ids[0, 0] == 4
    order = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(sc, np.take_along_axis(full, order, axis=1), rtol=1e-6, atol=1e-6)
    assert (np.diff(sc, axis=1) <= 0).all()
    ids_all, _ = m.identify(X, top=N)
    assert all(sorted(row) == list(range(N)) for row in ids_all)
    with pytest.raises(ValueError, match="top"):
        m.identify(X, top=N + 1)
    with pytest.raises(ValueError, match="top"):
        m.identify(X, top=0)


def test_identify_ties_go_to_lower_class_id(monkeypatch):
    monkeypatch.setattr(model_mod, "_IDENTIFY_BLOCK", 2)
    m = make_model()
    E = m.parameters()["class_embed"]
    E[7] = E[2]
    E[9] = E[2]
    ids, sc = m.identify(E[2:3], top=3)
    np.testing.assert_array_equal(ids[0], [2, 7, 9])
    assert sc[0, 0] == sc[0, 1] == sc[0, 2]


# ----------------------------------------------------------------------------- state dict


def test_state_dict_layout_and_copy_semantics():
    m = make_model()
    sd = m.state_dict()
    assert list(sd) == list(model_mod._STATE_KEYS)
    assert sd["class_embed"].shape == (N, C, H, W)
    assert sd["fc.weight"].shape == (1, 2 * S)
    for pre in ("bn", "logit_bn"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert sd[f"{pre}.{name}"].shape == (1,) and sd[f"{pre}.{name}"].dtype == np.float32
        t = sd[f"{pre}.num_batches_tracked"]
        assert t.shape == () and t.dtype == np.int64
    sd["class_embed"][:] = 0  # a copy: the model is unaffected
    assert np.abs(m.class_embed).sum() > 0
    params = m.parameters()
    assert list(params) == ["class_embed", *HEAD_PARAM_KEYS]
    assert params["class_embed"] is m.class_embed
    params["fc.weight"][0, 0] = 42.0  # live arrays
    assert m.state_dict()["fc.weight"][0, 0] == 42.0


def test_state_dict_round_trip_numpy_and_torch():
    m = make_model()
    m.forward_backward(*batch())
    sd = m.state_dict()
    fresh = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=99)
    live = fresh.parameters()
    assert fresh.load_state_dict(sd) == IncompatibleKeys([], [])
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
        assert v.dtype == sd[k].dtype
    for k, v in fresh.parameters().items():
        assert v is live[k]  # loaded in place
    X, y = batch(seed=12)
    np.testing.assert_array_equal(fresh.match(X, X), m.match(X, X))
    torch = pytest.importorskip("torch")
    tsd = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    fresh2 = QAConvGS(N, C, H, W, k_nearest=K_NN, seed=98)
    fresh2.load_state_dict(tsd)
    for k, v in fresh2.state_dict().items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    # float64 values and a (1,)-shaped counter are accepted too
    fresh2.load_state_dict(
        {k: (v.astype(np.float64) if v.dtype == np.float32 else v.reshape(1)) for k, v in sd.items()}
    )
    np.testing.assert_array_equal(fresh2.state_dict()["fc.weight"], sd["fc.weight"])


def _bad_state(kind, sd):
    sd = dict(sd)
    if kind == "missing":
        del sd["logit_bn.running_var"]
    elif kind == "unexpected":
        sd["head.extra"] = np.zeros(1, np.float32)
    elif kind == "shape_last":
        sd["logit_bn.num_batches_tracked"] = np.zeros(3, np.int64)
    elif kind == "fc_shape":
        sd["fc.weight"] = np.zeros((1, S), np.float32)
    elif kind == "nan":
        sd["logit_bn.bias"] = np.array([np.nan], np.float32)
    elif kind == "neg_var":
        sd["logit_bn.running_var"] = np.array([-1.0], np.float32)
    elif kind == "bad_dtype":
        sd["class_embed"] = np.zeros((N, C, H, W), bool)
    elif kind == "float_counter":
        sd["bn.num_batches_tracked"] = np.array(1.5)
    elif kind == "not_mapping":
        return [1, 2]
    return sd


@pytest.mark.parametrize(
    "kind, exc, match",
    [
        ("missing", ValueError, "missing"),
        ("unexpected", ValueError, "unexpected"),
        ("shape_last", ValueError, "num_batches_tracked"),
        ("fc_shape", ValueError, "fc="),
        ("nan", ValueError, "logit_bn.bias"),
        ("neg_var", ValueError, "running_var"),
        ("bad_dtype", TypeError, "class_embed"),
        ("float_counter", TypeError, "num_batches_tracked"),
        ("not_mapping", TypeError, "state_dict"),
    ],
)
def test_load_state_dict_errors_leave_model_unchanged(kind, exc, match):
    src = make_model(seed=1)
    src.forward_backward(*batch())
    m = make_model(seed=2)
    m.class_neighbors  # noqa: B018 - fresh table, must stay fresh after a failed load
    before = m.state_dict()
    with pytest.raises(exc, match=match):
        m.load_state_dict(_bad_state(kind, src.state_dict()))
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert not m.neighbors_stale


def test_load_state_dict_non_strict_and_neighbors_follow():
    m = make_model()
    m.class_neighbors  # noqa: B018
    sd = make_model(seed=5).state_dict()
    res = m.load_state_dict({"class_embed": sd["class_embed"], "other": np.zeros(1)}, strict=False)
    assert res.unexpected_keys == ["other"] and "fc.weight" in res.missing_keys
    np.testing.assert_array_equal(m.class_embed, sd["class_embed"])
    assert m.neighbors_stale  # new embeddings -> neighbours recomputed on the next step


def test_deepcopy_and_pickle():
    import pickle

    m = make_model()
    m.forward_backward(*batch())
    for m2 in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        X, y = batch(seed=3)
        assert m2.forward_backward(X, y).loss == copy.deepcopy(m).forward_backward(X, y).loss


# ----------------------------------------------------------------------------- gaps found by mutation testing


def test_batch_triplet_with_two_samples_matches_reference():
    """B = 2 with triplet="batch": the in-batch head call still runs (its training-mode BN statistics
    update, twice per step), although no row has both a positive and a negative (the term is 0)."""
    X = np.random.default_rng(7).standard_normal((2, C, H, W)).astype(np.float32)
    for y in (np.array([3, 3]), np.array([3, 5])):
        m = make_model("separate", "batch")
        head0, E0 = head_before(m), m.class_embed.copy()
        r = m.forward_backward(X, y)
        ref = oracle.forward_backward(
            X, y, E0, head0, m.class_neighbors, "separate", "batch", m.triplet_weight, m.margin
        )
        assert r.loss_triplet == pytest.approx(ref["loss_triplet"], rel=1e-4, abs=1e-6)
        assert r.acc_triplet == ref["acc_triplet"]
        assert r.loss == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
        sd = m.state_dict()
        for k, v in ref["running"].items():
            np.testing.assert_allclose(sd[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
        assert int(sd["bn.num_batches_tracked"]) == 2 and int(sd["logit_bn.num_batches_tracked"]) == 2


def test_state_dict_keys_in_pytorch_module_order():
    """class_embed, then bn.*, fc.*, logit_bn.* in the order a torch module with those submodules lists."""
    torch = pytest.importorskip("torch")
    tm = torch.nn.Module()
    tm.bn, tm.fc, tm.logit_bn = torch.nn.BatchNorm1d(1), torch.nn.Linear(2 * S, 1), torch.nn.BatchNorm1d(1)
    assert list(make_model().state_dict()) == ["class_embed", *tm.state_dict()]


def test_saved_neighbor_table_out_of_range_is_not_adopted(tmp_path):
    """A checkpoint whose neighbour table names a class >= num_classes: the table is recomputed rather
    than used (it would fail the first step)."""
    from qaconv_gs.checkpoint import save_checkpoint

    m = make_model()
    bad = np.array(m.class_neighbors, copy=True)
    bad[0, 0] = N
    save_checkpoint(tmp_path / "m.npz", m.config, m.state_dict(), extra={model_mod._NBR_EXTRA_KEY: bad})
    m2 = QAConvGS.load(tmp_path / "m.npz")
    nbr = m2.class_neighbors
    assert int(nbr.max()) < N
    np.testing.assert_array_equal(nbr, m.class_neighbors)
