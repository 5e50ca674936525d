"""qaconv_gs.torch: the autograd adapter (gradients equal the reference, a backbone trains through it)
and the Lightning-style NeighborRefresh callback."""

from __future__ import annotations

import sys
import types

import numpy as np
import oracle
import pytest
import qaconv_gs.torch as qgt
from oracle import HEAD_PARAM_KEYS
from qaconv_gs.model import QAConvGS

try:
    import torch
except ImportError:  # the first test still runs: the adapter must fail clearly without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def test_import_without_torch_is_fine_and_use_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    monkeypatch.setattr(qgt, "_cache", {})
    assert qgt.NeighborRefresh(target=None) is not None  # needs no torch
    with pytest.raises(ImportError, match="needs PyTorch"):
        qgt.QAConvGSLoss  # noqa: B018
    with pytest.raises(ImportError, match="needs PyTorch"):
        from qaconv_gs.torch import QAConvGSLoss  # noqa: F401
    with pytest.raises(AttributeError):
        qgt.nothing_here  # noqa: B018


N, C, H, W = 9, 6, 3, 4


def model(fc="separate", triplet="class", seed=0) -> QAConvGS:
    # init="random": the references score the rows as they are (an imprinting step would rewrite them)
    m = QAConvGS(N, C, H, W, k_nearest=3, fc=fc, triplet=triplet, seed=seed, init="random")
    sd = m.state_dict()
    sd["bn.weight"][:] = 1.2
    sd["logit_bn.bias"][:] = 0.3
    sd["fc.weight"] *= np.linspace(0.5, 1.5, sd["fc.weight"].size, dtype=np.float32)
    m.load_state_dict(sd)
    return m


def data(seed=1, B=6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, C, H, W)).astype(np.float32), np.array([0, 0, 4, 4, 7, 7][:B])


@needs_torch
@pytest.mark.parametrize("fc, triplet", [("separate", "class"), ("shared", "batch")])
def test_gradients_equal_model_and_reference(fc, triplet):
    m = model(fc, triplet)
    crit = qgt.QAConvGSLoss.from_model(m)
    assert crit.state_dict().keys() == m.state_dict().keys()
    X, y = data()
    head0 = {k: v for k, v in m.state_dict().items() if k != "class_embed"}
    E0 = m.class_embed.copy()
    feats = torch.tensor(X, requires_grad=True)
    loss = crit(feats, torch.from_numpy(y))
    assert loss.shape == () and loss.dtype == torch.float32
    (2.5 * loss).backward()
    r = m.forward_backward(X, y)  # the NumPy model on the same state: same kernels, same numbers
    assert loss.item() == np.float32(r.loss)
    assert crit.last_result.acc_cls == r.acc_cls
    np.testing.assert_array_equal(feats.grad.numpy(), np.float32(2.5) * r.grad_features)
    dense = np.zeros((N, C, H, W), np.float32)
    dense[r.grad_embed_ids] = np.float32(2.5) * r.grad_embed_rows
    np.testing.assert_array_equal(crit.class_embed.grad.numpy(), dense)
    mods = {"bn": crit.bn, "fc": crit.fc, "logit_bn": crit.logit_bn}
    for k in HEAD_PARAM_KEYS:
        pre, name = k.split(".")
        g = getattr(mods[pre], name).grad.numpy()
        np.testing.assert_allclose(g, 2.5 * r.grad_head[k], rtol=1e-6, atol=1e-12, err_msg=k)
    # and against the float64 reference
    ref = oracle.forward_backward(X, y, E0, head0, crit.class_neighbors, fc, triplet)
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-4)
    g_ref = 2.5 * ref["grad_features"]
    np.testing.assert_allclose(feats.grad.numpy(), g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
    e_ref = 2.5 * ref["grad_embed"]
    np.testing.assert_allclose(
        crit.class_embed.grad.numpy(), e_ref, rtol=1e-4, atol=1e-5 * np.abs(e_ref).max()
    )
    # running statistics live in the module's buffers
    sd = crit.state_dict()
    for k, v in ref["running"].items():
        np.testing.assert_allclose(sd[k].numpy(), v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert int(sd["bn.num_batches_tracked"]) == (2 if triplet == "batch" else 1)


@needs_torch
def test_constructor_matches_numpy_model_and_round_trips():
    crit = qgt.QAConvGSLoss(N, C, H, W, k_nearest=3, seed=4)
    m = QAConvGS(N, C, H, W, k_nearest=3, seed=4)
    for k, v in crit.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), m.state_dict()[k], err_msg=k)
    names = dict(crit.named_parameters())
    assert set(names) == {"class_embed", *HEAD_PARAM_KEYS}
    assert all(isinstance(p, torch.nn.Parameter) for p in names.values())
    assert {n for n, _ in crit.named_buffers()} == {
        f"{p}.{b}" for p in ("bn", "logit_bn") for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    m2 = crit.to_model()
    assert m2.config == crit.config
    X, y = data()
    np.testing.assert_array_equal(m2.match(X, X), crit.match(X, X).numpy())
    assert "k_nearest=3" in repr(crit)
    with pytest.raises(ValueError, match="k_nearest"):
        qgt.QAConvGSLoss(N, C, H, W, k_nearest=N)
    with pytest.raises(TypeError, match="model"):
        qgt.QAConvGSLoss.from_model("nope")


@needs_torch
def test_loading_a_state_dict_into_a_plain_torch_qaconv_head():
    """The keys and shapes are PyTorch's: a vanilla torch module with the same layout loads them."""
    m = model()
    plain = torch.nn.Module()
    plain.class_embed = torch.nn.Parameter(torch.zeros(N, C, H, W))
    plain.bn = torch.nn.BatchNorm1d(1)
    plain.fc = torch.nn.Linear(2 * H * W, 1)
    plain.logit_bn = torch.nn.BatchNorm1d(1)
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()}, strict=True)
    m2 = QAConvGS(N, C, H, W, k_nearest=3, seed=11)
    m2.load_state_dict(plain.state_dict())
    for k, v in m2.state_dict().items():
        np.testing.assert_array_equal(v, m.state_dict()[k])


@needs_torch
def test_eval_mode_keeps_running_stats_and_no_grad_works():
    crit = qgt.QAConvGSLoss.from_model(model())
    X, y = data()
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    crit.eval()
    with torch.no_grad():
        loss_eval = crit(torch.from_numpy(X), y)
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k
    crit.train()
    loss_train = crit(torch.from_numpy(X), y)
    assert loss_eval.item() == loss_train.item()
    assert int(crit.bn.num_batches_tracked) == 1


@needs_torch
def test_retained_graph_backward_twice_and_pickling():
    """backward(retain_graph=True) then backward again adds the same gradient; a second backward
    through a freed graph is torch's own RuntimeError; the module pickles (torch.save of the whole
    module) and the copy computes the same loss."""
    import pickle

    crit = qgt.QAConvGSLoss.from_model(model())
    X, y = data()
    x = torch.from_numpy(X).requires_grad_(True)
    loss = crit(x, y)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once)
    loss = crit(x, y)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    copy = pickle.loads(pickle.dumps(crit))
    assert type(copy) is qgt.QAConvGSLoss
    for k, v in crit.state_dict().items():
        assert torch.equal(copy.state_dict()[k], v), k
    crit.eval(), copy.eval()
    assert copy(torch.from_numpy(X), y).item() == crit(torch.from_numpy(X), y).item()


@needs_torch
def test_float64_features_and_dtype_errors():
    crit = qgt.QAConvGSLoss.from_model(model())
    X, y = data()
    f64 = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    loss = crit(f64, torch.from_numpy(y))
    assert loss.dtype == torch.float64
    loss.backward()
    assert f64.grad.dtype == torch.float64
    with pytest.raises(TypeError, match="features"):
        crit(X, y)
    with pytest.raises(TypeError, match="features"):
        crit(torch.zeros(6, C, H, W, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="labels"):
        crit(torch.from_numpy(X), torch.tensor([0, 1, 2, 3, 4, N]))
    with pytest.raises(ValueError, match="features"):
        crit(torch.zeros(6, C + 1, H, W), y)
    crit.double()
    with pytest.raises(TypeError, match="float32 CPU"):
        crit(torch.from_numpy(X), y)


@needs_torch
def test_neighbors_follow_optimizer_updates_and_epochs():
    crit = qgt.QAConvGSLoss.from_model(model())
    X, y = data()
    opt = torch.optim.SGD(crit.parameters(), lr=10.0)  # big steps: the embeddings change a lot
    crit(torch.from_numpy(X), y).backward()
    assert crit.neighbor_refreshes == 1
    table = crit.class_neighbors.copy()
    opt.step()
    crit(torch.from_numpy(X), y)
    assert crit.neighbor_refreshes == 1  # fixed within the epoch
    cb = qgt.NeighborRefresh()
    pl_module = torch.nn.Module()
    pl_module.criterion = crit
    cb.on_train_epoch_start(None, pl_module)
    assert cb.calls == 1 and crit.neighbor_refreshes == 1
    crit(torch.from_numpy(X), y)
    assert crit.neighbor_refreshes == 2  # recomputed from the updated class_embed
    expected = QAConvGS.from_config(crit.config)
    expected.load_state_dict(crit.state_dict())
    np.testing.assert_array_equal(crit.class_neighbors, expected.class_neighbors)
    assert crit.neighbor_change >= 0.0 and table.shape == crit.class_neighbors.shape
    # load_state_dict marks the table stale
    crit.load_state_dict(crit.state_dict())
    crit(torch.from_numpy(X), y)
    assert crit.neighbor_refreshes == 3


@needs_torch
def test_neighbor_refresh_targets_and_lightning_subclass(monkeypatch):
    m = model()
    m.class_neighbors  # noqa: B018
    holder = types.SimpleNamespace(qaconv=m)  # a plain object holding a NumPy model
    cb = qgt.NeighborRefresh()
    cb.on_train_epoch_start(None, holder)
    assert m.neighbors_stale
    m.class_neighbors  # noqa: B018
    qgt.NeighborRefresh(target=m).on_train_epoch_start(object(), object())
    assert m.neighbors_stale
    with pytest.raises(RuntimeError, match="NeighborRefresh"):
        qgt.NeighborRefresh().on_train_epoch_start(None, torch.nn.Linear(2, 2))
    # with Lightning imported, instances are real Callback subclasses
    fake_pl = types.ModuleType("lightning.pytorch")

    class Callback:
        def on_train_epoch_end(self, trainer, pl_module):
            return "base hook"

    fake_pl.Callback = Callback
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake_pl)
    cb2 = qgt.NeighborRefresh(target=m)
    assert isinstance(cb2, Callback) and isinstance(cb2, qgt.NeighborRefresh)
    assert cb2.on_train_epoch_end(None, None) == "base hook"
    m.class_neighbors  # noqa: B018
    cb2.on_train_epoch_start(None, None)
    assert m.neighbors_stale and cb2.calls == 1
    assert type(qgt.NeighborRefresh()) is type(cb2)
    assert "NeighborRefresh" in repr(cb2)


@needs_torch
def test_tiny_backbone_trains_end_to_end():
    """Two conv layers -> QAConvGSLoss, torch.optim.SGD on CPU: the loss goes down."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_cls, per = 6, 4
    protos = rng.standard_normal((n_cls, 1, 6, 4)).astype(np.float32)
    labels = np.repeat(np.arange(n_cls), per)
    images = protos[labels] + 0.3 * rng.standard_normal((n_cls * per, 1, 6, 4)).astype(np.float32)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)
    )
    crit = qgt.QAConvGSLoss(n_cls, 8, 6, 4, k_nearest=3, seed=0)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(crit.parameters()), lr=0.05, momentum=0.9)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    losses = []
    for step in range(12):
        if step % 4 == 0:
            crit.on_epoch_start()
        opt.zero_grad()
        loss = crit(backbone(x), y)
        loss.backward()
        assert all(p.grad is not None for p in backbone.parameters())
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    assert crit.last_result.acc_cls >= 0.5


@needs_torch
def test_construction_leaves_torch_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    qgt.QAConvGSLoss(N, C, H, W, k_nearest=3, seed=1)
    assert torch.equal(torch.rand(3), expected)


@needs_torch
def test_checkpoint_from_torch_state(tmp_path):
    from qaconv_gs.checkpoint import save_checkpoint

    crit = qgt.QAConvGSLoss.from_model(model())
    X, y = data()
    crit(torch.from_numpy(X), y)
    p = tmp_path / "c.npz"
    save_checkpoint(p, crit.config, crit.state_dict())  # torch tensors are accepted as they are
    m = QAConvGS.load(p)
    for k, v in crit.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k], v.numpy(), err_msg=k)
