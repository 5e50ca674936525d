"""qaconv_gs.optim.SGD on its own: dense updates against torch.optim.SGD, lazy rows against dense rows,
state_dict round trips; and lr_schedule's home."""

from __future__ import annotations

import numpy as np
import pytest
import qaconv_gs
from qaconv_gs.optim import SGD, lr_schedule

N, ROW = 9, (2, 2, 3)


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "class_embed": rng.standard_normal((N,) + ROW).astype(np.float32),
        "fc.weight": rng.standard_normal((1, 8)).astype(np.float32),
        "bn.bias": rng.standard_normal(1).astype(np.float32),
    }


def make_steps(T: int, seed: int = 1) -> list[tuple[float, dict, np.ndarray, np.ndarray]]:
    """T steps of (lr, dense grads, row ids, row grads); some rows idle for several steps, lr in runs."""
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(T):
        lr = 0.05 * (0.5 if t >= 5 else 1.0) * (0.2 if t >= 9 else 1.0)
        grads = {
            "fc.weight": rng.standard_normal((1, 8)).astype(np.float32),
            "bn.bias": rng.standard_normal(1).astype(np.float32),
        }
        ids = np.unique(rng.integers(0, N - 2, size=3)).astype(np.int64)  # the last 2 rows never get one
        rows = rng.standard_normal((ids.size,) + ROW).astype(np.float32)
        steps.append((lr, grads, ids, rows))
    return steps


def torch_run(params, steps, momentum, nesterov, wd):
    torch = pytest.importorskip("torch")
    tp = {k: torch.tensor(v.copy()) for k, v in params.items()}
    opt = torch.optim.SGD(list(tp.values()), lr=1.0, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for lr, grads, ids, rows in steps:
        for g in opt.param_groups:
            g["lr"] = lr
        for k, v in tp.items():
            if k == "class_embed":
                dense = np.zeros(v.shape, np.float32)
                dense[ids] = rows
                v.grad = torch.tensor(dense)
            else:
                v.grad = torch.tensor(grads[k])
        opt.step()
    return {k: v.numpy() for k, v in tp.items()}


def run(params, steps, lazy, **hyper):
    opt = SGD(params, lazy=lazy, **hyper)
    for lr, grads, ids, rows in steps:
        opt.step(grads, lr, (ids, rows))
    return opt


@pytest.mark.parametrize(
    "momentum,nesterov,wd", [(0.9, True, 5e-4), (0.9, False, 1e-2), (0.0, False, 1e-2), (0.5, True, 0.0)]
)
def test_dense_matches_torch_sgd(momentum, nesterov, wd):
    steps = make_steps(12)
    ref = torch_run(make_params(), steps, momentum, nesterov, wd)
    params = make_params()
    opt = run(params, steps, lazy=False, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    assert opt.steps == 12
    np.testing.assert_array_equal(opt.row_step, 12)
    for k in params:  # torch fuses multiply-adds: last-bit differences
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 5e-4), (0.9, False, 1e-2), (0.0, False, 1e-2)])
def test_lazy_rows_catch_up_to_dense(momentum, nesterov, wd):
    steps = make_steps(12)
    dense, lazy = make_params(), make_params()
    od = run(dense, steps, lazy=False, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    ol = run(lazy, steps, lazy=True, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for k in ("fc.weight", "bn.bias"):  # dense parameters: the same arithmetic
        np.testing.assert_array_equal(lazy[k], dense[k])
    assert ol.row_step.min() < 12  # some rows were left behind ...
    if wd:
        assert not np.allclose(lazy["class_embed"][-2:], dense["class_embed"][-2:])
    ol.flush()  # ... and are caught up in closed form
    np.testing.assert_array_equal(ol.row_step, 12)
    np.testing.assert_allclose(lazy["class_embed"], dense["class_embed"], rtol=1e-5, atol=1e-6)
    if momentum:
        np.testing.assert_allclose(ol.buffers["class_embed"], od.buffers["class_embed"], rtol=1e-4, atol=1e-6)
    ref = torch_run(make_params(), steps, momentum, nesterov, wd)
    np.testing.assert_allclose(lazy["class_embed"], ref["class_embed"], rtol=1e-5, atol=1e-6)


def test_idle_rows_follow_the_dense_recursion():
    params = make_params()
    before = params["class_embed"].copy()
    lr, m, wd = 0.05, 0.9, 0.01
    opt = SGD(params, momentum=m, nesterov=True, weight_decay=wd)
    g = np.ones((1,) + ROW, np.float32)
    for _ in range(5):
        opt.step({}, lr, (np.array([0]), g))
    np.testing.assert_array_equal(params["class_embed"][1:], before[1:])  # untouched storage
    np.testing.assert_array_equal(opt.row_step, [5] + [0] * (N - 1))
    opt.catch_up(np.array([3, 4]))
    np.testing.assert_array_equal(opt.row_step[[3, 4]], 5)
    p, b = before[3:5].astype(np.float64), np.zeros_like(before[3:5], dtype=np.float64)
    for _ in range(5):
        d = wd * p
        b = m * b + d
        p = p - lr * (d + m * b)
    np.testing.assert_allclose(params["class_embed"][3:5], p, rtol=1e-6)


def test_state_dict_round_trip_is_exact():
    steps = make_steps(12)
    a = make_params()
    oa = SGD(a, lazy=True)
    for lr, grads, ids, rows in steps[:6]:
        oa.step(grads, lr, (ids, rows))
    state = oa.state_dict()
    assert set(state) == {"replicated", "rows"}
    assert set(state["rows"]) == {"row_step", "buffer"} and state["rows"]["row_step"].shape == (N,)
    assert set(state["replicated"]["buffers"]) == {"fc.weight", "bn.bias"}
    b = {k: v.copy() for k, v in a.items()}
    ob = SGD(lambda: b, lazy=True)  # a callable: read again at every call
    ob.load_state_dict(state)
    for lr, grads, ids, rows in steps[6:]:
        oa.step(grads, lr, (ids, rows))
        ob.step(grads, lr, (ids, rows))
    oa.flush()
    ob.flush()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_load_state_dict_checks_before_changing():
    params = make_params()
    opt = SGD(params)
    opt.step({"bn.bias": np.ones(1, np.float32)}, 0.1)
    good = opt.state_dict()
    bad = {
        "replicated": dict(good["replicated"], buffers={"bn.bias": np.zeros(3, np.float32)}),
        "rows": good["rows"],
    }
    with pytest.raises(ValueError, match="momentum buffer 'bn.bias'"):
        opt.load_state_dict(bad)
    bad = {"replicated": good["replicated"], "rows": {"row_step": np.zeros(N + 1, np.int64)}}
    with pytest.raises(ValueError, match="row counters"):
        opt.load_state_dict(bad)
    assert opt.steps == 1 and set(opt.buffers) == {"bn.bias"}


def test_hyperparameters_are_checked():
    with pytest.raises(ValueError, match="momentum"):
        SGD(make_params(), momentum=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(make_params(), momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay"):
        SGD(make_params(), weight_decay=-1.0)
    assert "SGD(" in repr(SGD(make_params()))


def test_exports():
    assert qaconv_gs.optim.SGD is SGD
    from qaconv_gs.trainer import lr_schedule as from_trainer

    assert from_trainer is lr_schedule
    assert lr_schedule("step:2:0.5")(3) == 0.5
