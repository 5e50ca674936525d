"""Trainer: optimizer exactness vs torch.optim.SGD, lazy sparse rows, schedules, clipping, the epoch loop,
history and plot, checkpoints and exact resume. Uses a small fake model with QAConvGS's interface."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fake_model import FakeModel
from qaconv_gs.sampler import GraphSampler
from qaconv_gs.trainer import History, Trainer, lr_schedule

N, C, H, W, K = 12, 3, 2, 2, 3


def make_batches(n_batches=6, B=5, seed=1, n_cls=N):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        y = rng.integers(0, n_cls, size=B)
        f = rng.standard_normal((B, C, H, W)).astype(np.float32) * 2.0
        out.append((f, y))
    return out


def fixed_table(n_cls=N, k=K, seed=3):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.delete(np.arange(n_cls), i))[:k] for i in range(n_cls)])


def params_copy(model):
    return {k: v.copy() for k, v in model.parameters().items()}


# ------------------------------------------------------------------------------------------------------------
# optimizer maths
# ------------------------------------------------------------------------------------------------------------


def torch_run(model_init, batches, lr, momentum, nesterov, wd, clip=None, lr_per_step=None):
    """The same training through torch.optim.SGD: grads from a twin fake model at torch's current params."""
    torch = pytest.importorskip("torch")
    twin = model_init()
    tparams = {k: torch.tensor(v.copy()) for k, v in twin.parameters().items()}
    opt = torch.optim.SGD(
        list(tparams.values()), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd
    )
    trace = []
    for i, (f, y) in enumerate(batches):
        for k, v in tparams.items():
            twin.parameters()[k][...] = v.numpy()
        res = twin.forward_backward(f, y)
        for k, v in tparams.items():
            if k == "class_embed":
                g = np.zeros_like(twin.parameters()[k])
                g[res.grad_embed_ids] = res.grad_embed_rows
            else:
                g = res.grad_head[k]
            v.grad = torch.tensor(g)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
        if lr_per_step is not None:
            for group in opt.param_groups:
                group["lr"] = lr_per_step[i]
        opt.step()
        trace.append({k: v.detach().numpy().copy() for k, v in tparams.items()})
    return trace


@pytest.mark.parametrize("nesterov,momentum,wd", [(True, 0.9, 5e-4), (False, 0.9, 1e-2), (False, 0.0, 1e-2)])
def test_dense_matches_torch_sgd(nesterov, momentum, wd):
    table = fixed_table()
    init = lambda: FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)  # noqa: E731
    batches = make_batches(8)
    ref = torch_run(init, batches, 0.05, momentum, nesterov, wd)
    model = init()
    tr = Trainer(model, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd, sparse_embed=False)
    for i, (f, y) in enumerate(batches):
        tr.step(f, y)
        for k, v in model.parameters().items():
            np.testing.assert_allclose(v, ref[i][k], rtol=1e-6, atol=1e-7, err_msg=f"{k} step {i + 1}")
    # the trajectory really moved (the test would notice a no-op optimizer)
    assert not np.allclose(ref[-1]["class_embed"], init().parameters()["class_embed"], atol=1e-3)


def test_clipping_matches_torch():
    table = fixed_table()
    init = lambda: FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)  # noqa: E731
    batches = make_batches(6)
    ref = torch_run(init, batches, 0.05, 0.9, True, 5e-4, clip=0.05)
    model = init()
    tr = Trainer(model, lr=0.05, sparse_embed=False, clip_grad_norm=0.05)
    for i, (f, y) in enumerate(batches):
        tr.step(f, y)
        assert tr.last_grad_norm > 0.05  # clipping was active on this data
        for k, v in model.parameters().items():
            np.testing.assert_allclose(v, ref[i][k], rtol=1e-6, atol=1e-7, err_msg=f"{k} step {i + 1}")


def test_sparse_equals_dense_after_flush_with_lr_changes():
    table = fixed_table()
    batches = make_batches(10, B=3)
    dense = FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)
    sparse = FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)
    td = Trainer(dense, lr=0.05, weight_decay=1e-2, sparse_embed=False)
    ts = Trainer(sparse, lr=0.05, weight_decay=1e-2, sparse_embed=True)
    for i, (f, y) in enumerate(batches):
        td.lr = ts.lr = 0.05 * (0.5 if i >= 4 else 1.0) * (0.2 if i >= 7 else 1.0)
        td.step(f, y)
        ts.step(f, y)
        # the rows the step read/updated are exactly up to date; head parameters identical
        for k in dense.parameters():
            if k != "class_embed":
                np.testing.assert_allclose(
                    sparse.parameters()[k], dense.parameters()[k], rtol=1e-5, atol=1e-7
                )
    ts.flush()
    np.testing.assert_allclose(
        sparse.parameters()["class_embed"], dense.parameters()["class_embed"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(ts._buffers["class_embed"], td._buffers["class_embed"], rtol=1e-4, atol=1e-6)


def test_sparse_equals_dense_with_manual_epochs():
    """A hand-written loop that calls on_epoch_start() between steps, without flush(): the neighbour
    table is rebuilt from up-to-date rows, so the sparse trainer picks the dense one's candidates."""
    QAConvGS = pytest.importorskip("qaconv_gs.model").QAConvGS
    rng = np.random.default_rng(0)
    batches = [
        (rng.standard_normal((8, 4, 2, 2)).astype(np.float32), rng.integers(0, 12, 8)) for _ in range(30)
    ]
    runs = []
    for sparse in (True, False):
        # init="random": the sparse step reads class_neighbors before the forward; with init="imprint" the
        # table would then predate the step's imprint while the dense run builds it after (other candidates)
        model = QAConvGS(
            num_classes=12, channels=4, height=2, width=2, k_nearest=2, seed=0, n_threads=1, init="random"
        )
        tr = Trainer(model, lr=0.5, momentum=0.9, nesterov=False, weight_decay=5e-4, sparse_embed=sparse)
        cands = []
        for i, (f, y) in enumerate(batches):
            if i % 5 == 0:
                model.on_epoch_start()
            cands.append(tr.step(f, y).candidates)
        tr.flush()
        runs.append((model, cands))
    (ms, cs), (md, cd) = runs
    for i, (a, b) in enumerate(zip(cs, cd)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {i}")
    np.testing.assert_allclose(
        ms.parameters()["class_embed"], md.parameters()["class_embed"], rtol=1e-5, atol=1e-6
    )


def test_sparse_touches_only_candidate_rows_then_catches_up():
    # class 0..3 form a closed neighbourhood; rows 4.. are never candidates
    table = np.array([[(i + j) % 4 for j in range(1, 4)] if i < 4 else [0, 1, 2] for i in range(N)])
    model = FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)
    before = params_copy(model)["class_embed"]
    lr, wd, m = 0.05, 0.01, 0.9
    tr = Trainer(model, lr=lr, momentum=m, nesterov=True, weight_decay=wd)
    rng = np.random.default_rng(0)
    for _ in range(5):
        tr.step(rng.standard_normal((4, C, H, W)).astype(np.float32), rng.integers(0, 4, size=4))
    E = model.parameters()["class_embed"]
    np.testing.assert_array_equal(E[4:], before[4:])  # untouched: stale storage, O(rows) work per step
    assert not np.allclose(E[:4], before[:4])
    np.testing.assert_array_equal(tr._row_step[:4], 5)
    np.testing.assert_array_equal(tr._row_step[4:], 0)
    tr.flush()
    # rows with zero loss gradient for 5 steps: the dense recursion (p, buf) under weight decay only
    p, b = before[4:].astype(np.float64), np.zeros_like(before[4:], dtype=np.float64)
    for _ in range(5):
        d = wd * p
        b = m * b + d
        p = p - lr * (d + m * b)
    np.testing.assert_allclose(E[4:], p, rtol=1e-6)
    np.testing.assert_array_equal(tr._row_step, 5)


def test_sparse_idle_rows_keep_momentum():
    # a row gets a gradient once, then idles: dense SGD keeps moving it with its momentum
    table = np.array([[1, 2, 3]] + [[0, 2, 3]] * (N - 1))
    model = FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)
    ref = FakeModel(N, C, H, W, K, seed=0, fixed_neighbors=table)
    ts = Trainer(model, lr=0.1, weight_decay=0.0)
    td = Trainer(ref, lr=0.1, weight_decay=0.0, sparse_embed=False)
    f = np.ones((2, C, H, W), np.float32)
    for tr in (ts, td):
        tr.step(f, [5, 6])
        for _ in range(4):
            tr.step(f, [0, 1])
    row5_stale = model.parameters()["class_embed"][5].copy()
    ts.flush()
    assert not np.allclose(model.parameters()["class_embed"][5], row5_stale)  # momentum kept pushing
    np.testing.assert_allclose(model.parameters()["class_embed"], ref.parameters()["class_embed"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------------------


def _torch_lrs(make_sched, epochs, lr=1.0):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    S = torch.optim.lr_scheduler
    cases = [
        ("step:3:0.5", lambda o: S.StepLR(o, 3, 0.5)),
        ({"name": "step", "step_size": 2}, lambda o: S.StepLR(o, 2, 0.1)),
        ("multistep:2,5:0.3", lambda o: S.MultiStepLR(o, [2, 5], 0.3)),
        ({"name": "multistep", "milestones": [4, 1]}, lambda o: S.MultiStepLR(o, [1, 4], 0.1)),
        ("cosine:8", lambda o: S.CosineAnnealingLR(o, 8)),
        ("cosine:8:0.1", lambda o: S.CosineAnnealingLR(o, 8, eta_min=0.1)),
    ]
    for spec, make in cases:
        ours = np.array([lr_schedule(spec)(e) for e in range(8)])
        np.testing.assert_allclose(ours, _torch_lrs(make, 8), rtol=1e-6, atol=1e-9, err_msg=str(spec))
    assert lr_schedule("cosine:4")(10) == 0.0
    assert lr_schedule(None)(7) == 1.0
    assert lr_schedule(lambda e: 0.5**e)(3) == 0.125


@pytest.mark.parametrize(
    "spec,exc,match",
    [
        ("linear:3", ValueError, "schedule"),
        ("step", ValueError, "schedule"),
        ("step:0", ValueError, "step_size"),
        ({"name": "cosine"}, TypeError, "epochs"),
        ({"name": "step", "step_size": 2, "bogus": 1}, ValueError, "bogus"),
        (3, TypeError, "schedule"),
    ],
)
def test_schedule_errors(spec, exc, match):
    with pytest.raises(exc, match=match):
        lr_schedule(spec)


def test_fit_applies_schedule_per_epoch():
    model = FakeModel(fixed_neighbors=fixed_table())
    tr = Trainer(model, lr=0.1, schedule="step:1:0.5")
    tr.fit(make_batches(2), epochs=3, progress=False)
    np.testing.assert_allclose(tr.history.epoch_values("lr"), [0.1, 0.05, 0.025])
    np.testing.assert_allclose(tr.history.steps["lr"], [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    with pytest.raises(ValueError, match="schedule"):
        Trainer(model, schedule=lambda e: float("nan"))


def test_constructor_validation():
    model = FakeModel()
    for kwargs, exc, match in [
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": "x"}, TypeError, "lr"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": 0.0, "nesterov": True}, ValueError, "nesterov"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"clip_grad_norm": 0.0}, ValueError, "clip_grad_norm"),
        ({"sparse_embed": 1}, TypeError, "sparse_embed"),
    ]:
        with pytest.raises(exc, match=match):
            Trainer(model, **kwargs)
    with pytest.raises(TypeError, match="model"):
        Trainer(object())


# ------------------------------------------------------------------------------------------------------------
# fit: epoch hooks, callbacks, data forms, history
# ------------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, log):
        self.log = log

    def on_epoch_start(self, trainer, epoch):
        self.log.append(("on_epoch_start", epoch))

    def on_step_end(self, trainer, step, result):
        self.log.append(("on_step_end", step))

    def on_epoch_end(self, trainer, epoch, stats):
        self.log.append(("on_epoch_end", epoch, stats["steps"]))
        stats["custom"] = 0.25 * (epoch + 1)


class OnlySteps:
    def __init__(self):
        self.n = 0

    def on_step_end(self, trainer, step, result):
        self.n += 1


def test_fit_calls_on_epoch_start_every_epoch_and_callbacks_in_order():
    model = FakeModel()
    model.log = log = []
    only = OnlySteps()
    tr = Trainer(model, lr=0.05)
    hist = tr.fit(make_batches(3), epochs=3, callbacks=[Recorder(log), only], progress=False)
    assert model.epoch_starts == 3
    expected = []
    step = 0
    for e in range(3):
        expected += [("model.on_epoch_start",), ("on_epoch_start", e)]
        for _ in range(3):
            step += 1
            expected.append(("on_step_end", step))
        expected.append(("on_epoch_end", e, 3))
    assert log == expected
    assert only.n == 9
    assert tr.epoch == 3 and tr.global_step == 9
    assert hist is tr.history
    np.testing.assert_allclose(hist.epoch_values("custom"), [0.25, 0.5, 0.75])  # callback extras recorded
    # a second fit continues the epoch count and calls the hook again
    tr.fit(make_batches(3), epochs=1, progress=False)
    assert model.epoch_starts == 4 and tr.epoch == 4 and [e["epoch"] for e in hist.epochs] == [0, 1, 2, 3]


def test_neighbor_table_follows_embeddings_between_epochs():
    model = FakeModel(num_classes=12, k_nearest=3, seed=5)
    tr = Trainer(model, lr=2.0, momentum=0.0, nesterov=False)
    tr.fit(make_batches(4, B=8, seed=2), epochs=3, progress=False)
    change = tr.history.epoch_values("neighbor_change")
    assert math.isnan(change[0])  # first table: nothing to compare with
    assert np.nanmax(change) > 0  # the big learning rate moved embeddings and thus neighbours


def test_history_contents_and_plot(tmp_path):
    model = FakeModel()
    tr = Trainer(model, lr=0.05)
    tr.fit(make_batches(4), epochs=2, callbacks=[Recorder([])], progress=False)
    h = tr.history
    assert len(h) == 2
    for k, v in h.steps.items():
        assert len(v) == 8, k
    assert h.steps["step"] == list(range(1, 9))
    assert h.steps["epoch"] == [0] * 4 + [1] * 4
    e0 = h.epochs[0]
    for k in ("loss", "loss_cls", "loss_triplet", "acc_cls", "acc_triplet", "lr", "neighbor_change", "time"):
        assert k in e0
    assert e0["steps"] == 4 and e0["samples"] == 20
    np.testing.assert_allclose(e0["loss"], np.mean(h.steps["loss"][:4]))  # equal batch sizes
    assert all(t >= 0 for t in h.steps["time"]) and e0["time"] >= sum(h.steps["time"][:4])
    assert all(g > 0 for g in h.steps["grad_norm"])
    path = h.plot(tmp_path / "curves.png", title="fake")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "epochs=2" in repr(h)
    assert History().plot(tmp_path / "empty.png")  # an empty history still draws


def test_progress_bar_goes_to_stderr(capsys):
    model = FakeModel()
    Trainer(model).fit(make_batches(3), epochs=1, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "epoch 1" in err and "loss=" in err and "3/3" in err


def test_data_forms():
    table = fixed_table()
    batches = make_batches(3)
    X = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])

    def run(data, epochs=2):
        model = FakeModel(fixed_neighbors=table)
        tr = Trainer(model, seed=7)
        tr.fit(data, epochs=epochs, progress=False)
        return tr, model

    tr_list, m_list = run(batches)
    tr_call, m_call = run(lambda epoch: batches)
    np.testing.assert_array_equal(m_list.parameters()["class_embed"], m_call.parameters()["class_embed"])
    tr_tuple, _ = run(tuple(batches))  # a tuple of 3 batches is batches, not (features, labels, sampler)
    assert tr_tuple.global_step == 6
    tr_int, _ = run((X, y, 4))
    assert tr_int.global_step == 8 and tr_int.history.steps["batch_size"][:4] == [4, 4, 4, 3]
    tr_int2, _ = run((X, y, 4))
    assert tr_int.history.steps["loss"] == tr_int2.history.steps["loss"]  # seeded shuffles
    sampler = GraphSampler(y, batch_size=4, num_instances=2, neighbors=table, seed=0)
    tr_s, _ = run((X, y, sampler))
    assert tr_s.global_step == 2 * len(sampler)
    tr_gen, _ = run((b for b in batches), epochs=1)
    assert tr_gen.global_step == 3
    with pytest.raises(TypeError, match="one-shot"):
        run((b for b in batches), epochs=2)
    with pytest.raises(TypeError, match="data"):
        run(42)
    with pytest.raises(TypeError, match="sampler"):
        run((X, y, object()))
    with pytest.raises(TypeError, match="batch"):
        run([np.zeros(3)], epochs=1)


def test_stop_training_from_callback():
    class Stop:
        def on_step_end(self, trainer, step, result):
            if step == 2:
                trainer.stop_training = True

    tr = Trainer(FakeModel())
    tr.fit(make_batches(5), epochs=3, callbacks=[Stop()], progress=False)
    assert tr.global_step == 2 and tr.epoch == 1 and tr.history.epochs[0]["steps"] == 2


# ------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ------------------------------------------------------------------------------------------------------------


def _graph_data(seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(N), 3)
    X = rng.standard_normal((y.size, C, H, W)).astype(np.float32) * 2.0
    return X, y


def _resumable(sparse):
    model = FakeModel(seed=1)
    tr = Trainer(model, lr=0.05, weight_decay=1e-2, schedule="cosine:4", seed=3, sparse_embed=sparse)
    X, y = _graph_data()
    sampler = GraphSampler(y, batch_size=8, num_instances=2, neighbors=lambda: model.class_neighbors, seed=11)
    return model, tr, (X, y, sampler)


@pytest.mark.parametrize("sparse", [True, False])
def test_resume_equals_uninterrupted(tmp_path, sparse):
    model_a, tr_a, data_a = _resumable(sparse)
    tr_a.fit(data_a, epochs=4, progress=False)

    model_b, tr_b, data_b = _resumable(sparse)
    tr_b.fit(data_b, epochs=2, progress=False)
    path = tr_b.save_checkpoint(tmp_path / "ckpt.npz")

    model_c, tr_c, data_c = _resumable(sparse)
    tr_c.load_checkpoint(path)
    assert tr_c.epoch == 2 and tr_c.global_step == tr_b.global_step
    tr_c.fit(data_c, epochs=2, progress=False)

    for k, v in model_a.parameters().items():
        np.testing.assert_array_equal(model_c.parameters()[k], v, err_msg=k)
    np.testing.assert_array_equal(model_c.running, model_a.running)
    for k in ("step", "epoch", "loss", "acc_cls", "lr", "grad_norm"):
        assert tr_c.history.steps[k] == tr_a.history.steps[k], k
    for ea, ec in zip(tr_a.history.epochs, tr_c.history.epochs):
        assert {k: ea[k] for k in ("epoch", "loss", "lr", "steps")} == {
            k: ec[k] for k in ("epoch", "loss", "lr", "steps")
        }


def test_checkpoint_mid_epoch_from_callback_resumes_exactly(tmp_path):
    class SaveAt:
        def on_step_end(self, trainer, step, result):
            if step == 5:
                trainer.save_checkpoint(tmp_path / "mid.npz")
                trainer.stop_training = True

    model_b, tr_b, data_b = _resumable(True)
    tr_b.fit(data_b, epochs=1, callbacks=[SaveAt()], progress=False)  # stops after step 5, then flushes
    model_c, tr_c, _ = _resumable(True)
    tr_c.load_checkpoint(tmp_path / "mid.npz")
    assert tr_c.global_step == 5 and tr_c._row_step.min() < 5  # saved unflushed: some rows were idle
    tr_c.flush()
    for k, v in model_b.parameters().items():
        np.testing.assert_array_equal(model_c.parameters()[k], v, err_msg=k)


def test_checkpoint_errors_leave_trainer_unchanged(tmp_path):
    model, tr, data = _resumable(True)
    tr.fit(data, epochs=1, progress=False)
    path = tr.save_checkpoint(tmp_path / "ok.npz")
    raw = open(path, "rb").read()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))

    fresh_model, fresh, _ = _resumable(True)
    before = params_copy(fresh_model)
    for name in ("trunc.npz", "junk.npz", "other.npz"):
        with pytest.raises(ValueError, match="checkpoint"):
            fresh.load_checkpoint(tmp_path / name)
        assert fresh.epoch == 0 and fresh.global_step == 0
        for k, v in fresh_model.parameters().items():
            np.testing.assert_array_equal(v, before[k])
    with pytest.raises(FileNotFoundError):
        fresh.load_checkpoint(tmp_path / "missing.npz")
    other = Trainer(FakeModel(num_classes=N + 1, seed=1))
    with pytest.raises(ValueError, match="checkpoint: (momentum buffer|row counters)"):
        other.load_checkpoint(path)
    from qaconv_gs.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "model_only.npz", model.config, model.state_dict())
    with pytest.raises(ValueError, match="no trainer state"):
        fresh.load_checkpoint(tmp_path / "model_only.npz")
    dense = Trainer(FakeModel(seed=1), sparse_embed=False)
    with pytest.raises(ValueError, match="sparse_embed"):
        dense.load_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ok.npz", "trunc.npz", "junk.npz", "other.npz", "model_only.npz"]
    )  # the atomic writer left no temporary file


def test_from_checkpoint_rebuilds(tmp_path):
    model, tr, data = _resumable(True)
    tr.fit(data, epochs=1, progress=False)
    path = tr.save_checkpoint(tmp_path / "c.npz")
    tr2 = Trainer.from_checkpoint(path, model_cls=FakeModel)
    assert tr2.epoch == 1 and tr2.schedule_spec == "cosine:4" and tr2.weight_decay == 1e-2
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(tr2.model.parameters()[k], v)
    assert "Trainer(" in repr(tr2)


# ------------------------------------------------------------------------------------------------------------
# with the real QAConvGS model
# ------------------------------------------------------------------------------------------------------------


def _qaconv():
    return pytest.importorskip("qaconv_gs.model").QAConvGS


def _rank1(model, x, y):
    ids, _ = model.identify(x, top=1)
    return float(np.mean(ids[:, 0] == y))


def test_end_to_end_fit_raises_held_out_rank1():
    from qaconv_gs.data import make_synthetic, split_per_class

    QAConvGS = _qaconv()
    n_cls = 30
    x, y = make_synthetic(n_cls, 12, seed=0)
    xtr, ytr, xte, yte = split_per_class(x, y, held_out=2, seed=0)
    model = QAConvGS(n_cls, 32, 8, 4, k_nearest=8, seed=0, n_threads=1)
    sampler = GraphSampler(
        ytr, batch_size=32, num_instances=4, neighbors=lambda: model.class_neighbors, seed=0
    )
    before = _rank1(model, xte, yte)
    tr = Trainer(model, lr=0.05, schedule="cosine:4:0.05", seed=0)
    tr.fit((xtr, ytr, sampler), epochs=4, progress=False)
    after = _rank1(model, xte, yte)
    chance = 1.0 / n_cls
    assert before < 3 * chance  # a fresh model is at chance level
    assert after > 0.6  # 18x chance
    losses = tr.history.epoch_values("loss")
    assert losses[-1] < 0.5 * losses[0]
    assert model.neighbor_refreshes >= 4  # one refresh per epoch (on_epoch_start made it stale)
    assert np.nanmax(tr.history.epoch_values("neighbor_change")) > 0.05  # the graph followed the embeddings


def test_real_model_dense_matches_torch_sgd():
    # the same gradient sequence (the model's, at our parameters) through torch.optim.SGD and through ours
    torch = pytest.importorskip("torch")
    QAConvGS = _qaconv()
    from qaconv_gs.data import make_synthetic

    x, y = make_synthetic(10, 4, channels=8, height=4, width=2, seed=1)
    # init="random": an imprinting step writes rows outside the optimiser, which torch's SGD would not see
    model = QAConvGS(10, 8, 4, 2, k_nearest=3, seed=0, n_threads=1, init="random")
    tparams = {k: torch.tensor(v.copy()) for k, v in model.parameters().items()}
    opt = torch.optim.SGD(list(tparams.values()), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    tr = Trainer(model, lr=0.05, sparse_embed=False)
    rng = np.random.default_rng(0)
    start = model.parameters()["class_embed"].copy()
    for step in range(5):
        idx = rng.choice(len(y), size=12, replace=False)
        res = model.forward_backward(x[idx], y[idx])
        for k, v in tparams.items():
            v.grad = torch.tensor(res.dense_grad_embed(10) if k == "class_embed" else res.grad_head[k])
        opt.step()
        res2 = tr.step(x[idx], y[idx])
        np.testing.assert_array_equal(res2.grad_embed_rows, res.grad_embed_rows)  # deterministic model
        for k, v in model.parameters().items():
            np.testing.assert_allclose(v, tparams[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{k} {step}")
    assert np.abs(model.parameters()["class_embed"] - start).max() > 1e-3


def _real_resumable(tmp_path=None):
    QAConvGS = _qaconv()
    from qaconv_gs.data import make_synthetic

    x, y = make_synthetic(16, 6, channels=8, height=4, width=2, seed=2)
    model = QAConvGS(16, 8, 4, 2, k_nearest=4, seed=0, n_threads=1)
    sampler = GraphSampler(y, batch_size=12, num_instances=3, neighbors=lambda: model.class_neighbors, seed=1)
    return model, Trainer(model, lr=0.05, schedule="multistep:1,3:0.5", seed=0), (x, y, sampler)


def test_real_model_resume_is_bitwise_and_checkpoint_is_a_model_checkpoint(tmp_path):
    QAConvGS = _qaconv()
    model_a, tr_a, data_a = _real_resumable()
    tr_a.fit(data_a, epochs=4, progress=False)
    model_b, tr_b, data_b = _real_resumable()
    tr_b.fit(data_b, epochs=2, progress=False)
    path = tr_b.save_checkpoint(tmp_path / "run.npz")
    model_c, tr_c, data_c = _real_resumable()
    tr_c.load_checkpoint(path)
    tr_c.fit(data_c, epochs=2, progress=False)
    for k, v in model_a.state_dict().items():
        np.testing.assert_array_equal(model_c.state_dict()[k], v, err_msg=k)
    assert tr_c.history.steps["loss"] == tr_a.history.steps["loss"]
    # the saved neighbour table came back too, so even the neighbour-change record matches
    np.testing.assert_array_equal(
        tr_c.history.epoch_values("neighbor_change")[2:], tr_a.history.epoch_values("neighbor_change")[2:]
    )
    # the trainer checkpoint is a model checkpoint: QAConvGS.load gives identical scores
    plain = QAConvGS.load(path)
    x = data_b[0][:5]
    np.testing.assert_array_equal(plain.match(x, x), model_b.match(x, x))
    tr_d = Trainer.from_checkpoint(path)
    assert tr_d.epoch == 2 and tr_d.schedule_spec == "multistep:1,3:0.5"


def test_step_refuses_a_non_finite_update_and_keeps_parameters():
    """A diverged step (NaN gradient) raises and leaves every parameter as it was."""
    from qaconv_gs import QAConvGS

    rng = np.random.default_rng(0)
    # init="random": an imprinting forward writes the step's rows before the trainer sees the gradient
    model = QAConvGS(12, 4, 2, 2, k_nearest=3, seed=0, init="random")
    trainer = Trainer(model, lr=0.1)
    x = rng.standard_normal((6, 4, 2, 2)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    real = model.forward_backward

    def poisoned(features, labels):
        result = real(features, labels)
        result.grad_embed_rows[0, 0, 0, 0] = np.nan
        return result

    model.forward_backward = poisoned
    before = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(FloatingPointError, match="update was skipped"):
        trainer.step(x, y)
    for name, value in model.parameters().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------------------------------
# gaps found by mutation testing: each test below fails on a one-line mutant of trainer.py
# ------------------------------------------------------------------------------------------------------------


def test_state_dict_is_a_snapshot():
    """Later steps do not change an earlier state_dict(): row counters and momentum buffers are copies."""
    tr = Trainer(FakeModel(seed=1), lr=0.05, momentum=0.9, seed=3)
    batches = make_batches()
    for f, y in batches[:2]:
        tr.step(f, y)
    snap = tr.state_dict()
    before = {k: np.array(v, copy=True) for k, v in snap["arrays"].items()}
    assert "row_step" in before and any(k.startswith("buffer/") for k in before)
    for f, y in batches[2:]:
        tr.step(f, y)
    for k, v in before.items():
        np.testing.assert_array_equal(snap["arrays"][k], v, err_msg=k)


def test_resume_restores_the_current_lr():
    """A hand-written loop that calls step() after load_checkpoint trains at the saved lr, not base_lr."""
    tr = Trainer(FakeModel(seed=1), lr=0.05, schedule="step:1:0.5", seed=3)
    tr.fit(make_batches(), epochs=2, progress=False)
    assert tr.lr != tr.base_lr
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = tr.save_checkpoint(f"{d}/c.npz")
        tr2 = Trainer(FakeModel(seed=1), lr=0.05, schedule="step:1:0.5", seed=3)
        tr2.load_checkpoint(path)
    assert tr2.lr == tr.lr


def test_fit_puts_the_model_in_training_mode():
    model = FakeModel(seed=1)
    model.eval()
    Trainer(model, lr=0.05, seed=3).fit(make_batches(1), epochs=1, progress=False)
    assert model.training


def test_int_batch_size_reshuffles_every_epoch():
    """(features, labels, batch_size) data: a new permutation each epoch, drawn from (seed, epoch)."""
    seen = []

    class Recording(FakeModel):
        def forward_backward(self, features, labels):
            seen.append(np.asarray(labels).copy())
            return super().forward_backward(features, labels)

    X = np.random.default_rng(0).standard_normal((24, C, H, W)).astype(np.float32)
    y = np.arange(24) % N
    Trainer(Recording(seed=1), lr=0.05, seed=3).fit((X, y, 6), epochs=2, progress=False)
    e0, e1 = np.concatenate(seen[:4]), np.concatenate(seen[4:])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == sorted(y.tolist())
    assert not np.array_equal(e0, e1)


def test_non_finite_loss_with_finite_gradients_is_refused():
    class NanLoss(FakeModel):
        def forward_backward(self, features, labels):
            res = super().forward_backward(features, labels)
            res.loss = float("nan")
            return res

    model = NanLoss(seed=1)
    tr = Trainer(model, lr=0.05, seed=3)
    before = params_copy(model)
    f, y = make_batches(1)[0]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        tr.step(f, y)
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
