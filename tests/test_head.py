"""QAConv head (scalar BN -> fc -> scalar BN): C kernels vs NumPy float64, C scalar reference and PyTorch."""

from __future__ import annotations

import copy
import math

import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st
from qaconv_gs import _native
from qaconv_gs.functional import head_backward, head_eval_affine, head_forward, init_head

FCS = ("separate", "shared")
PARAM_KEYS = ("bn.weight", "bn.bias", "fc.weight", "fc.bias", "logit_bn.weight", "logit_bn.bias")


def _close(a, b, rtol=1e-4, atol_rel=1e-5):
    """rtol plus an absolute floor relative to the largest reference value (float32 rounding of sums)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    atol = atol_rel * max(float(np.abs(b).max()), 1e-30)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _random_head(S, fc, rng, perturb=True):
    h = init_head(S, fc, rng=rng)
    if perturb:  # non-trivial parameters so every term of the maths matters
        h["bn.weight"][:] = rng.uniform(0.5, 1.5)
        h["bn.bias"][:] = rng.normal()
        h["fc.weight"][:] = rng.normal(size=h["fc.weight"].shape) / S
        h["logit_bn.weight"][:] = rng.uniform(0.5, 1.5)
        h["logit_bn.bias"][:] = rng.normal()
        h["bn.running_mean"][:] = rng.normal() * 0.1
        h["bn.running_var"][:] = rng.uniform(0.5, 2)
        h["logit_bn.running_mean"][:] = rng.normal()
        h["logit_bn.running_var"][:] = rng.uniform(0.5, 2)
    return h


def _maxima(rng, M, S, lead=None):
    shape = (M, S) if lead is None else (*lead, S)
    mp = rng.uniform(0.2, 1.0, size=shape).astype(np.float32)
    mg = rng.uniform(0.2, 1.0, size=shape).astype(np.float32)
    return mp, mg


def _params(h, S, fc, eps=1e-5):
    from qaconv_gs.head import _params as p

    return p(h, S, fc == "shared", eps)


# ------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("fc", FCS)
def test_init_head_layout(fc):
    S = 12
    h = init_head(S, fc, rng=np.random.default_rng(0))
    nw = 2 * S if fc == "separate" else S
    assert h["fc.weight"].shape == (1, nw) and h["fc.weight"].dtype == np.float32
    assert np.all(h["fc.weight"] == np.float32(1.0 / S))
    for n in ("bn", "logit_bn"):
        assert h[f"{n}.weight"].shape == (1,) and h[f"{n}.weight"][0] == 1
        assert h[f"{n}.bias"][0] == 0 and h[f"{n}.running_mean"][0] == 0 and h[f"{n}.running_var"][0] == 1
        assert h[f"{n}.num_batches_tracked"].shape == () and h[f"{n}.num_batches_tracked"].dtype == np.int64
    bound = 1 / math.sqrt(nw)
    assert abs(h["fc.bias"][0]) <= bound and h["fc.bias"].shape == (1,)
    h2 = init_head(S, fc, rng=np.random.default_rng(0))
    assert h2["fc.bias"][0] == h["fc.bias"][0]
    biases = [init_head(S, fc, rng=np.random.default_rng(i))["fc.bias"][0] for i in range(200)]
    assert max(biases) <= bound and min(biases) >= -bound and max(biases) > 0.8 * bound  # spans U(-b, b)


def test_init_head_errors():
    with pytest.raises(ValueError, match="S"):
        init_head(0)
    with pytest.raises(TypeError, match="S"):
        init_head(2.5)
    with pytest.raises(ValueError, match="fc"):
        init_head(4, "both")
    with pytest.raises(TypeError, match="rng"):
        init_head(4, rng=3)


# ------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("fc", FCS)
@pytest.mark.parametrize("M,S", [(2, 1), (3, 2), (97, 7), (5, 97), (300, 64)])
def test_forward_train_vs_numpy_and_c_ref(fc, M, S, rng):
    h = _random_head(S, fc, rng)
    h0 = copy.deepcopy(h)
    mp, mg = _maxima(rng, M, S)
    out, cache = head_forward(mp, mg, h, fc=fc)
    ref, c = oracle.head_forward(mp, mg, h0, fc=fc)
    assert out.dtype == np.float32 and out.shape == (M,)
    _close(out, ref)
    # running statistics, PyTorch rules
    upd = c["running"]
    for k, v in upd.items():
        _close(h[k], v, rtol=1e-5)
    assert h["bn.num_batches_tracked"] == 1 and h["logit_bn.num_batches_tracked"] == 1
    # the C scalar reference
    params, fcw = _params(h0, S, fc)
    z_r, out_r, st_r = _native.head_forward_train_ref(mp, mg, fcw, params, 1)
    np.testing.assert_allclose(out, out_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.stats, st_r, rtol=1e-9)
    np.testing.assert_allclose(cache.stats, [c["mean1"], c["var1"], c["mean2"], c["var2"]], rtol=1e-9)


@pytest.mark.parametrize("fc", FCS)
def test_forward_eval_vs_numpy_c_ref_and_affine(fc, rng):
    M, S = 41, 9
    h = _random_head(S, fc, rng)
    h0 = copy.deepcopy(h)
    mp, mg = _maxima(rng, M, S)
    out, cache = head_forward(mp, mg, h, fc=fc, training=False)
    assert cache is None
    for k in h:  # eval never touches the state
        np.testing.assert_array_equal(h[k], h0[k])
    ref, _ = oracle.head_forward(mp, mg, h0, fc=fc, training=False)
    _close(out, ref)
    params, fcw = _params(h0, S, fc)
    np.testing.assert_allclose(
        out, _native.head_forward_eval_ref(mp, mg, fcw, params, 1), rtol=1e-5, atol=1e-5
    )
    w, b = head_eval_affine(h0, S, fc)
    assert w.shape == (2 * S,) and w.dtype == np.float32 and isinstance(b, float)
    aff = mp.astype(np.float64) @ w[:S] + mg.astype(np.float64) @ w[S:] + b
    _close(aff, ref)
    # a single pair is fine in eval mode
    one, _ = head_forward(mp[0], mg[0], h, fc=fc, training=False)
    assert one.shape == () and np.isclose(one, out[0], rtol=1e-6, atol=1e-6)


def test_forward_leading_dims(rng):
    S = 6
    h = _random_head(S, "separate", rng)
    mp, mg = _maxima(rng, 0, S, lead=(4, 3))
    out, cache = head_forward(mp, mg, copy.deepcopy(h))
    flat, _ = head_forward(mp.reshape(12, S), mg.reshape(12, S), copy.deepcopy(h))
    assert out.shape == (4, 3)
    np.testing.assert_array_equal(out.reshape(-1), flat)
    gmp, gmg, _ = head_backward(np.ones((4, 3)), cache)
    assert gmp.shape == (4, 3, S) and gmg.shape == (4, 3, S)


def test_constant_input_is_finite(rng):
    S = 5
    h = _random_head(S, "separate", rng)
    mp = np.full((4, S), 0.5, np.float32)
    out, cache = head_forward(mp, mp, h)
    gmp, gmg, g = head_backward(rng.normal(size=4), cache)
    assert np.isfinite(out).all() and np.isfinite(gmp).all() and all(np.isfinite(v).all() for v in g.values())


# ------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("fc", FCS)
@pytest.mark.parametrize("M,S", [(2, 1), (3, 4), (97, 7), (300, 64)])
def test_backward_vs_numpy_and_c_ref(fc, M, S, rng):
    h = _random_head(S, fc, rng)
    h0 = copy.deepcopy(h)
    mp, mg = _maxima(rng, M, S)
    gout = rng.normal(size=M).astype(np.float32)
    _, cache = head_forward(mp, mg, h, fc=fc)
    gmp, gmg, grads = head_backward(gout, cache)
    _, c = oracle.head_forward(mp, mg, h0, fc=fc)
    rmp, rmg, rgrads = oracle.head_backward(gout, c)
    _close(gmp, rmp)
    _close(gmg, rmg)
    scale = np.abs(gout).sum()
    for k in PARAM_KEYS:
        assert grads[k].shape == np.shape(h0[k]) and grads[k].dtype == np.float32
        if k in ("bn.bias", "fc.bias"):  # mathematically 0 in training
            assert np.abs(grads[k]).max() <= 1e-5 * scale and np.abs(rgrads[k]).max() <= 1e-9 * scale
        else:
            _close(grads[k], rgrads[k])
    params, fcw = _params(h0, S, fc)
    bmp, bmg, bfw, bsc = _native.head_backward_ref(mp, mg, fcw, params, cache.stats, gout, 1)
    _close(gmp, bmp, rtol=1e-5)
    _close(gmg, bmg, rtol=1e-5)
    _close(grads["fc.weight"].reshape(-1), bfw, rtol=1e-5)
    _close(
        [grads["bn.weight"][0], grads["logit_bn.weight"][0], grads["logit_bn.bias"][0]],
        [bsc[0], bsc[3], bsc[4]],
        rtol=1e-5,
    )


@pytest.mark.parametrize("fc", FCS)
def test_reference_backward_finite_differences(fc, rng):
    """The float64 reference backward against central differences of the float64 reference forward."""
    M, S = 5, 3
    h = _random_head(S, fc, rng)
    mp, mg = _maxima(rng, M, S)
    mp, mg = mp.astype(np.float64), mg.astype(np.float64)
    gout = rng.normal(size=M)
    _, c = oracle.head_forward(mp, mg, h, fc=fc)
    gmp, gmg, grads = oracle.head_backward(gout, c)

    def loss_x(a, b):
        return float(oracle.head_forward(a, b, h, fc=fc)[0] @ gout)

    np.testing.assert_allclose(oracle.numerical_grad(lambda a: loss_x(a, mg), mp), gmp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(oracle.numerical_grad(lambda b: loss_x(mp, b), mg), gmg, rtol=1e-5, atol=1e-7)
    for k in PARAM_KEYS:
        base = {kk: np.asarray(v, np.float64) for kk, v in h.items()}

        def loss_p(v, k=k, base=base):
            hh = dict(base)
            hh[k] = v
            return float(oracle.head_forward(mp, mg, hh, fc=fc)[0] @ gout)

        num = oracle.numerical_grad(loss_p, base[k])
        np.testing.assert_allclose(num, grads[k], rtol=1e-5, atol=1e-7)


def test_bias_grads_vanish_for_shift_invariant_loss(rng):
    """With a row-wise softmax loss over the logits, every bias gradient is 0 (SPEC: correct, not a bug)."""
    from qaconv_gs.functional import class_loss

    B, K, S = 6, 4, 5
    h = _random_head(S, "separate", rng)
    mp, mg = _maxima(rng, 0, S, lead=(B, K))
    logits, cache = head_forward(mp, mg, h)
    cl = class_loss(logits)
    _, _, g = head_backward(cl.grad, cache)
    big = abs(float(g["logit_bn.weight"][0])) + np.abs(g["fc.weight"]).max()
    assert big > 1e-4
    for k in ("bn.bias", "fc.bias", "logit_bn.bias"):
        assert abs(float(g[k][0])) <= 1e-6, (k, g[k])


# ------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("fc", FCS)
def test_threads_bit_identical(fc, rng):
    M, S = 700, 48  # 700 * 96 values: many row blocks
    h = _random_head(S, fc, rng)
    mp, mg = _maxima(rng, M, S)
    gout = rng.normal(size=M).astype(np.float32)
    res = []
    for nt in (1, 2, 3):
        hh = copy.deepcopy(h)
        out, cache = head_forward(mp, mg, hh, fc=fc, n_threads=nt)
        gmp, gmg, g = head_backward(gout, cache, n_threads=nt)
        ev, _ = head_forward(mp, mg, hh, fc=fc, training=False, n_threads=nt)
        res.append((out, gmp, gmg, g, hh, ev))
    for r in res[1:]:
        for a, b in zip(res[0][:3], r[:3]):
            assert np.array_equal(a, b)
        for k in PARAM_KEYS:
            assert np.array_equal(res[0][3][k], r[3][k])
        for k in h:
            assert np.array_equal(res[0][4][k], r[4][k])
        assert np.array_equal(res[0][5], r[5])


# ------------------------------------------------------------------------------------------- torch


def _torch_head(S, shared):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TorchQAConvHead(nn.Module):
        """The public QAConv 2.1 head: bn on the maxima, fc, (shared: per-direction sum), logit_bn."""

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(1)
            self.fc = nn.Linear(S if shared else 2 * S, 1)
            self.logit_bn = nn.BatchNorm1d(1)

        def forward(self, mp, mg):
            score = torch.cat((mp, mg), dim=-1)  # [M, 2S]
            if shared:
                score = self.bn(score.view(-1, 1, S)).view(-1, S)
                score = self.fc(score)
                score = score.view(-1, 2).sum(dim=-1, keepdim=True)
            else:
                score = self.bn(score.view(-1, 1, 2 * S)).view(-1, 2 * S)
                score = self.fc(score)
            return self.logit_bn(score.view(-1, 1)).view(-1)

    return torch, TorchQAConvHead()


@pytest.mark.parametrize("fc", FCS)
def test_vs_torch_five_training_steps_then_eval(fc, rng):
    S = 10
    shared = fc == "shared"
    torch, tm = _torch_head(S, shared)
    h = _random_head(S, fc, rng, perturb=False)
    h["bn.weight"][:] = 1.3
    h["logit_bn.bias"][:] = 0.2
    h["fc.weight"][:] = rng.normal(size=h["fc.weight"].shape) / S
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in h.items()}, strict=True)
    tm = tm.double().train()
    for step in range(5):
        M = 6 + 3 * step
        mp, mg = _maxima(rng, M, S)
        mp = mp * (1 + step)  # different batch statistics every step
        gout = rng.normal(size=M)
        tmp = torch.tensor(mp, dtype=torch.float64, requires_grad=True)
        tmg = torch.tensor(mg, dtype=torch.float64, requires_grad=True)
        tm.zero_grad()
        tout = tm(tmp, tmg)
        (tout * torch.from_numpy(gout)).sum().backward()
        out, cache = head_forward(mp, mg, h, fc=fc)
        gmp, gmg, g = head_backward(gout, cache)
        _close(out, tout.detach().numpy())
        _close(gmp, tmp.grad.numpy())
        _close(gmg, tmg.grad.numpy())
        tparams = dict(tm.named_parameters())
        for k in PARAM_KEYS:
            tg = tparams[k].grad.numpy()
            if k in ("bn.bias", "fc.bias"):  # ~0 on both sides
                assert np.abs(g[k]).max() <= 1e-5 * np.abs(gout).sum() and np.abs(tg).max() <= 1e-9
            else:
                _close(g[k], tg)
        tstate = tm.state_dict()
        for n in ("bn", "logit_bn"):
            for s in ("running_mean", "running_var"):
                _close(h[f"{n}.{s}"], tstate[f"{n}.{s}"].numpy(), rtol=1e-5, atol_rel=1e-6)
            assert int(h[f"{n}.num_batches_tracked"]) == int(tstate[f"{n}.num_batches_tracked"]) == step + 1
    tm.eval()
    mp, mg = _maxima(rng, 13, S)
    with torch.no_grad():
        tev = tm(torch.tensor(mp, dtype=torch.float64), torch.tensor(mg, dtype=torch.float64)).numpy()
    ev, _ = head_forward(mp, mg, h, fc=fc, training=False)
    _close(ev, tev)
    w, b = head_eval_affine(h, S, fc)
    _close(mp.astype(np.float64) @ w[:S] + mg.astype(np.float64) @ w[S:] + b, tev)


def test_torch_tensor_state_updated_in_place(rng):
    torch = pytest.importorskip("torch")
    S = 4
    _, tm = _torch_head(S, False)
    state = dict(tm.state_dict())  # tensors shared with the module's buffers
    mp, mg = _maxima(rng, 5, S)
    out, _ = head_forward(torch.from_numpy(mp), torch.from_numpy(mg), state)
    assert tm.bn.num_batches_tracked.item() == 1 and tm.logit_bn.num_batches_tracked.item() == 1
    assert tm.bn.running_mean.item() != 0.0
    with torch.no_grad():
        tout = tm.train()(torch.from_numpy(mp), torch.from_numpy(mg)).numpy()
    _close(out, tout, rtol=1e-4, atol_rel=1e-4)  # torch float32 forward


# ------------------------------------------------------------------------------------------- zoo and errors


def test_input_zoo_not_modified(rng):
    M, S = 9, 5
    h = _random_head(S, "shared", rng)
    mp, mg = _maxima(rng, M, S)
    base, _ = head_forward(mp, mg, copy.deepcopy(h), fc="shared")
    big = np.zeros((M, 2 * S), np.float32)
    big[:, ::2] = mp
    variants = [
        (mp.astype(np.float64), mg.astype(np.float64)),
        (big[:, ::2], mg),  # non-contiguous
        (mp.astype(">f4"), mg.astype(">f8")),  # big-endian
        (mp.tolist(), mg),
    ]
    ro = mp.copy()
    ro.setflags(write=False)
    variants.append((ro, mg))
    for a, b in variants:
        keep = (np.array(a, copy=True), np.array(b, copy=True))
        out, cache = head_forward(a, b, copy.deepcopy(h), fc="shared")
        np.testing.assert_array_equal(out, base)
        head_backward(np.ones(M), cache)
        np.testing.assert_array_equal(np.asarray(a), keep[0])
        np.testing.assert_array_equal(np.asarray(b), keep[1])


def test_errors(rng):
    S = 4
    h = _random_head(S, "separate", rng)
    mp, mg = _maxima(rng, 3, S)
    with pytest.raises(ValueError, match="mg"):
        head_forward(mp, mg[:, :3], h)
    with pytest.raises(ValueError, match="mp"):
        head_forward(np.float32(1.0), np.float32(1.0), h)
    with pytest.raises(ValueError, match="more than 1 value"):
        head_forward(mp[:1], mg[:1], h)
    bad = mp.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="mp"):
        head_forward(bad, mg, h)
    with pytest.raises(ValueError, match="mg"):
        head_forward(mp, np.full_like(mg, np.inf), h)
    with pytest.raises(TypeError, match="mp"):
        head_forward(mp.astype(bool), mg, h)
    with pytest.raises(ValueError, match="fc"):
        head_forward(mp, mg, h, fc="tied")
    with pytest.raises(ValueError, match="fc.weight"):
        head_forward(mp, mg, h, fc="shared")  # separate-shaped weights
    with pytest.raises(ValueError, match="fc.weight"):
        head_forward(mp[:, :3], mg[:, :3], h)
    with pytest.raises(ValueError, match="eps"):
        head_forward(mp, mg, h, eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        head_forward(mp, mg, h, momentum=1.5)
    with pytest.raises(ValueError, match="n_threads"):
        head_forward(mp, mg, h, n_threads=0)
    with pytest.raises(TypeError, match="n_threads"):
        head_forward(mp, mg, h, n_threads=1.5)
    with pytest.raises(TypeError, match="head"):
        head_forward(mp, mg, [1, 2])
    h2 = copy.deepcopy(h)
    del h2["logit_bn.weight"]
    with pytest.raises(ValueError, match="logit_bn.weight"):
        head_forward(mp, mg, h2)
    h3 = copy.deepcopy(h)
    h3["bn.running_var"] = np.array([-1.0], np.float32)
    with pytest.raises(ValueError, match="running_var"):
        head_forward(mp, mg, h3, training=False)
    h4 = copy.deepcopy(h)
    h4["bn.weight"] = np.array([np.nan], np.float32)
    with pytest.raises(ValueError, match="bn.weight"):
        head_forward(mp, mg, h4)
    before = copy.deepcopy(h)
    with pytest.raises(ValueError):
        head_forward(mp[:1], mg[:1], h)
    for k in h:  # a failed call leaves the state unchanged
        np.testing.assert_array_equal(h[k], before[k])
    _, cache = head_forward(mp, mg, h)
    with pytest.raises(ValueError, match="grad_logits"):
        head_backward(np.ones(4), cache)
    with pytest.raises(ValueError, match="grad_logits"):
        head_backward(np.array([1.0, np.nan, 1.0]), cache)
    with pytest.raises(ValueError, match="cache"):
        head_backward(np.ones(3), None)
    with pytest.raises(TypeError, match="cache"):
        head_backward(np.ones(3), {"mp": mp})
    with pytest.raises(ValueError, match="S"):
        head_eval_affine(h, 0)
    # finite parameters whose eval-mode fold overflows float32 scores are refused, not turned into Inf
    huge = {k: np.array(v, copy=True) for k, v in h.items()}
    huge["bn.weight"][:] = 1e30
    huge["logit_bn.weight"][:] = 1e30
    huge["bn.running_var"][:] = 0.0
    huge["logit_bn.running_var"][:] = 0.0
    with pytest.raises(ValueError, match="head: .*float32"):
        head_eval_affine(huge, S)
    # the private bindings re-check shapes themselves
    params, fcw = _params(h, S, "separate")
    with pytest.raises(ValueError, match="mg"):
        _native.head_forward_train(mp, mg[:2], fcw, params, 1)
    with pytest.raises(ValueError, match="fc_weight"):
        _native.head_forward_train(mp, mg, fcw[:3], params, 1)
    with pytest.raises(ValueError, match="n_threads"):
        _native.head_forward_eval(mp, mg, fcw, params, 0)


# ------------------------------------------------------------------------------------------- property


@given(
    M=st.integers(2, 40),
    S=st.integers(1, 24),
    shared=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
)
def test_property_vs_reference(M, S, shared, seed, scale):
    rng = np.random.default_rng(seed)
    fc = "shared" if shared else "separate"
    h = _random_head(S, fc, rng)
    h0 = copy.deepcopy(h)
    mp = (rng.normal(size=(M, S)) * scale).astype(np.float32)
    mg = (rng.normal(size=(M, S)) * scale).astype(np.float32)
    gout = rng.normal(size=M)
    out, cache = head_forward(mp, mg, h, fc=fc)
    gmp, gmg, g = head_backward(gout, cache)
    ref, c = oracle.head_forward(mp, mg, h0, fc=fc)
    rmp, rmg, rg = oracle.head_backward(gout.astype(np.float32), c)
    _close(out, ref, atol_rel=1e-4)
    _close(gmp, rmp, atol_rel=1e-4)
    _close(gmg, rmg, atol_rel=1e-4)
    for k in ("fc.weight", "bn.weight", "logit_bn.weight", "logit_bn.bias"):
        _close(g[k], rg[k], atol_rel=1e-4)


# ------------------------------------------------------------------------------ weighted statistics


def _weights(rng, M, zeros=True):
    w = rng.uniform(0.1, 60.0, size=M).astype(np.float32)
    if zeros and M > 2:
        w[rng.choice(M, size=M // 3, replace=False)] = 0.0
        w[0] = max(w[0], 1.0)
    return w


@pytest.mark.parametrize("fc", FCS)
@pytest.mark.parametrize("M,S", [(2, 1), (3, 4), (97, 7), (300, 64)])
def test_weighted_forward_backward_vs_numpy_and_c_ref(fc, M, S, rng):
    h = _random_head(S, fc, rng)
    h0 = copy.deepcopy(h)
    mp, mg = _maxima(rng, M, S)
    w = _weights(rng, M)
    gout = rng.normal(size=M).astype(np.float32)
    out, cache = head_forward(mp, mg, h, fc=fc, weights=w)
    ref, c = oracle.head_forward(mp, mg, h0, fc=fc, weights=w)
    _close(out, ref)
    for k, v in c["running"].items():
        _close(h[k], v, rtol=1e-5)
    np.testing.assert_allclose(cache.stats, [c["mean1"], c["var1"], c["mean2"], c["var2"]], rtol=1e-9)
    gmp, gmg, grads = head_backward(gout, cache)
    rmp, rmg, rgrads = oracle.head_backward(gout, c)
    _close(gmp, rmp)
    _close(gmg, rmg)
    for k in ("bn.weight", "fc.weight", "logit_bn.weight", "logit_bn.bias"):
        _close(grads[k], rgrads[k])
    params, fcw = _params(h0, S, fc)
    _, out_r, st_r = _native.head_forward_train_ref(mp, mg, fcw, params, 1, w)
    np.testing.assert_allclose(out, out_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.stats, st_r, rtol=1e-9)
    bmp, bmg, bfw, _ = _native.head_backward_ref(mp, mg, fcw, params, cache.stats, gout, 1, w)
    _close(gmp, bmp, rtol=1e-5)
    _close(gmg, bmg, rtol=1e-5)
    _close(grads["fc.weight"].reshape(-1), bfw, rtol=1e-5)


@pytest.mark.parametrize("fc", FCS)
def test_weighted_reference_backward_finite_differences(fc, rng):
    M, S = 6, 3
    h = _random_head(S, fc, rng)
    mp, mg = (a.astype(np.float64) for a in _maxima(rng, M, S))
    w = np.array([1.0, 0.0, 3.5, 0.25, 2.0, 7.0])
    gout = rng.normal(size=M)
    _, c = oracle.head_forward(mp, mg, h, fc=fc, weights=w)
    gmp, gmg, _ = oracle.head_backward(gout, c)

    def loss_x(a, b):
        return float(oracle.head_forward(a, b, h, fc=fc, weights=w)[0] @ gout)

    np.testing.assert_allclose(oracle.numerical_grad(lambda a: loss_x(a, mg), mp), gmp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(oracle.numerical_grad(lambda b: loss_x(mp, b), mg), gmg, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fc", FCS)
def test_unit_weights_are_the_unweighted_head_bit_for_bit(fc, rng):
    M, S = 300, 16
    h = _random_head(S, fc, rng)
    mp, mg = _maxima(rng, M, S)
    gout = rng.normal(size=M).astype(np.float32)
    ha, hb = copy.deepcopy(h), copy.deepcopy(h)
    oa, ca = head_forward(mp, mg, ha, fc=fc)
    ob, cb = head_forward(mp, mg, hb, fc=fc, weights=np.ones(M, np.float32))
    assert np.array_equal(oa, ob) and ca.stats == cb.stats
    for x, y in zip(head_backward(gout, ca)[:2], head_backward(gout, cb)[:2]):
        assert np.array_equal(x, y)
    assert all(np.array_equal(ha[k], hb[k]) for k in h)


@pytest.mark.parametrize("fc", FCS)
def test_integer_weights_equal_repeated_pairs(fc, rng):
    """A pair of weight 3 moves the statistics as three copies of it would."""
    M, S = 40, 5
    h = _random_head(S, fc, rng)
    mp, mg = _maxima(rng, M, S)
    w = rng.integers(0, 4, size=M).astype(np.float32)
    w[0] = 1.0
    rep = np.repeat(np.arange(M), w.astype(int))
    out_w, cache_w = head_forward(mp, mg, copy.deepcopy(h), fc=fc, weights=w)
    out_r, cache_r = head_forward(mp[rep], mg[rep], copy.deepcopy(h), fc=fc)
    np.testing.assert_allclose(cache_w.stats, cache_r.stats, rtol=1e-9, atol=1e-12)
    first = np.searchsorted(rep, np.arange(M))
    keep = w > 0
    np.testing.assert_allclose(out_w[keep], out_r[first[keep]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fc", FCS)
def test_weighted_threads_bit_identical(fc, rng):
    M, S = 700, 48
    h = _random_head(S, fc, rng)
    mp, mg = _maxima(rng, M, S)
    w = _weights(rng, M)
    gout = rng.normal(size=M).astype(np.float32)
    res = []
    for nt in (1, 2, 3):
        out, cache = head_forward(mp, mg, copy.deepcopy(h), fc=fc, n_threads=nt, weights=w)
        res.append((out, *head_backward(gout, cache, n_threads=nt)))
    for r in res[1:]:
        for a, b in zip(res[0][:3], r[:3]):
            assert np.array_equal(a, b)
        for k in PARAM_KEYS:
            assert np.array_equal(res[0][3][k], r[3][k])


def test_weighted_errors(rng):
    M, S = 6, 3
    h = _random_head(S, "separate", rng)
    mp, mg = _maxima(rng, M, S)
    cases = [
        (np.ones(M - 1), "weights: expected shape (6,)"),
        (np.ones((M, 1)), "weights: expected shape (6,)"),
        (-np.ones(M), "weights: expected values >= 0"),
        (np.zeros(M), "at least one weight > 0"),
        (np.array([1, 1, 1, np.nan, 1, 1]), "weights"),
        (np.array(["a"] * M), "weights"),
    ]
    for w, msg in cases:
        before = copy.deepcopy(h)
        with pytest.raises((ValueError, TypeError), match=msg.replace("(", r"\(").replace(")", r"\)")):
            head_forward(mp, mg, h, weights=w)
        assert all(np.array_equal(before[k], h[k]) for k in h)  # nothing written
    with pytest.raises(ValueError, match="training mode only"):
        head_forward(mp, mg, h, training=False, weights=np.ones(M))
    # the kernels re-check what the Python layer validated
    params, fcw = _params(h, S, "separate")
    for fn in (_native.head_forward_train, _native.head_forward_train_ref):
        with pytest.raises(ValueError, match="weights|invalid argument"):
            fn(mp, mg, fcw, params, 1, -np.ones(M, np.float32))
        with pytest.raises(ValueError, match="weights: expected 6 values"):
            fn(mp, mg, fcw, params, 1, np.ones(4, np.float32))
    _, cache = head_forward(mp, mg, copy.deepcopy(h))
    for fn in (_native.head_backward, _native.head_backward_ref):
        with pytest.raises(ValueError, match="invalid argument"):
            fn(mp, mg, fcw, params, cache.stats, np.ones(M, np.float32), 1, np.zeros(M, np.float32))
