"""The `qaconv-gs bench` command (smoke tests, no timing assertions) and the PyTorch reference step of
benchmarks/torch_reference.py against QAConvGS.forward_backward."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import numpy as np
import pytest
import qaconv_gs as qg
from qaconv_gs import cli

from benchmarks import bench_train  # conftest.py puts the repository root on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close(actual, ref, rtol=1e-4, atol_frac=1e-5, name=""):
    """rtol 1e-4 elementwise, with an absolute floor of 1e-5 * max|ref| for entries that cancel to ~0
    (float32 kernels against a float64 reference)."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    assert a.shape == r.shape, (name, a.shape, r.shape)
    atol = atol_frac * max(float(np.abs(r).max()) if r.size else 0.0, 1e-30)
    np.testing.assert_allclose(a, r, rtol=rtol, atol=atol, err_msg=name)


def _model_and_batch(fc, triplet, seed=0, N=30, C=16, H=4, W=3, k=5, B=12):
    # init="random": the torch reference scores the rows as they are (an imprinting step rewrites them)
    m = qg.QAConvGS(N, C, H, W, k_nearest=k, fc=fc, triplet=triplet, seed=seed, init="random")
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((B, C, H, W)).astype(np.float32)
    y = rng.integers(0, N, B)
    y[:4] = y[0]  # same-label pairs for the batch triplet
    return m, X, y


@pytest.mark.parametrize("fc", ["separate", "shared"])
@pytest.mark.parametrize("triplet", ["class", "batch"])
def test_torch_reference_equals_forward_backward(fc, triplet):
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import torch_step

    m, X, y = _model_and_batch(fc, triplet)
    head0 = copy.deepcopy(m.head_state)
    E0 = m.class_embed.copy()
    r = m.forward_backward(X, y)
    t = torch_step(
        torch, X, y, E0, head0, m.class_neighbors, fc=fc, triplet=triplet,
        triplet_weight=m.triplet_weight, margin=m.margin, dtype=torch.float64,
    )  # fmt: skip
    for key in ("loss", "loss_cls", "loss_triplet"):
        assert_close(getattr(r, key), t[key], name=key)
    assert r.acc_cls == t["acc_cls"] and r.acc_triplet == t["acc_triplet"]
    np.testing.assert_array_equal(r.candidates, t["candidates"])
    np.testing.assert_array_equal(r.grad_embed_ids, t["grad_embed_ids"])
    assert_close(r.scores, t["scores"], name="scores")
    assert_close(r.grad_features, t["grad_features"], name="grad_features")
    assert_close(r.grad_embed_rows, t["grad_embed_rows"], name="grad_embed_rows")
    assert set(r.grad_head) == set(t["grad_head"])
    for key, g in t["grad_head"].items():
        # head gradients are tiny sums of cancelling terms: absolute floor relative to the fc gradient
        scale = max(np.abs(t["grad_head"]["fc.weight"]).max(), np.abs(g).max())
        np.testing.assert_allclose(r.grad_head[key], g, rtol=1e-4, atol=1e-5 * scale, err_msg=key)
    for key, v in t["running"].items():  # the model updated its running statistics the same way
        assert_close(m.head_state[key], v, name=key)
    assert np.array_equal(m.class_embed, E0)  # the step never changes parameters


def test_torch_reference_dense_leaf_and_float32():
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import torch_step

    m, X, y = _model_and_batch("separate", "class", seed=3)
    head0 = copy.deepcopy(m.head_state)
    kw = dict(fc="separate", triplet="class", dtype=torch.float64)
    rows = torch_step(torch, X, y, m.class_embed, head0, m.class_neighbors, **kw)
    dense = torch_step(torch, X, y, m.class_embed, head0, m.class_neighbors, embed_grad="dense", **kw)
    np.testing.assert_allclose(dense["grad_embed_rows"], rows["grad_embed_rows"], rtol=1e-12, atol=1e-15)
    f32 = torch_step(torch, X, y, m.class_embed, head0, m.class_neighbors, fc="separate")
    assert f32["grad_features"].dtype == np.float32
    assert_close(f32["loss"], rows["loss"], rtol=1e-5, name="float32 loss")
    with pytest.raises(ValueError, match="embed_grad"):
        torch_step(torch, X, y, m.class_embed, head0, m.class_neighbors, embed_grad="sparse")


def test_graph_batch_is_a_centre_and_its_neighbours():
    nbr = np.array([[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 0, 1]], dtype=np.int64)
    y = bench_train.graph_batch(nbr, 8, np.random.default_rng(0))
    assert y.shape == (8,) and y.dtype == np.int64
    centre = y[0]
    np.testing.assert_array_equal(np.unique(y[::4]), np.sort(np.array([centre, nbr[centre, 0]])))
    assert np.all(np.bincount(y) % 4 == 0)


def test_model_step_laps_cover_the_pieces():
    m, X, y = _model_and_batch("separate", "class")
    laps: list = []
    ref = qg.QAConvGS(**m.config).forward_backward(X, y)
    out = m._forward_backward(*m._batch(X, y), laps=laps)
    names = [n for n, _ in laps]
    assert names[0] == "start" and names[-1] == "result"
    for piece in ("normalize", "maxima forward", "head forward", "loss", "maxima backward"):
        assert piece in names
    stamps = [s for _, s in laps]
    assert stamps == sorted(stamps)
    np.testing.assert_array_equal(out.grad_embed_rows, ref.grad_embed_rows)  # laps change nothing


def test_bench_train_quick_via_cli(tmp_path, capfd):
    pytest.importorskip("torch")
    out = tmp_path / "bo"
    rc = cli.main(
        ["bench", "--quick", "--threads", "1", "--out", str(out), "train", "--"]
        + ["--shapes", "reid-quick", "--repeat", "1", "--no-tiny"]
    )
    text = capfd.readouterr().out  # the script runs in a subprocess: capture at the file descriptors
    assert rc == 0, text
    assert "== train" in text and "speedup" in text and "breakdown of our step" in text
    res = json.loads((out / "bench_train.json").read_text())
    (row,) = res["rows"]
    assert row["name"] == "reid-quick" and row["threads"] == 1
    ours, torch_side = row["ours"], row["torch"]
    assert "error" not in ours and "error" not in torch_side, row
    assert ours["time_s"] > 0 and torch_side["time_s"] > 0
    assert ours["unique_rows"] >= 1 and set(ours["breakdown_s"]) >= {"maxima forward", "maxima backward"}
    # same maths on both sides (float32 both: near-tie argmax flips aside, the loss agrees)
    assert torch_side["check"]["loss"] < 1e-4 and torch_side["check"]["same_rows"]
    pytest.importorskip("matplotlib")
    assert (out / "bench_train.png").stat().st_size > 0


def test_bench_builtin_when_no_benchmarks_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: None)
    rc = cli.main(["bench", "--quick", "--threads", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "built-in" in text and "training step" in text
    res = json.loads((tmp_path / "bench_builtin.json").read_text())
    whats = [r["what"] for r in res["rows"]]
    assert len(whats) == 3 and all(r["seconds"] > 0 and r["threads"] == 1 for r in res["rows"])


def test_bench_finds_the_checkout_and_rejects_unknown_names(capsys):
    assert cli._benchmarks_dir() == os.path.join(ROOT, "benchmarks")
    rc = cli.main(["bench", "no_such_benchmark"])
    assert rc == 1
    assert "no_such_benchmark" in capsys.readouterr().err


def test_tiny_steps_run_on_one_thread_and_big_ones_keep_theirs():
    from qaconv_gs import model as model_mod

    tiny = qg.QAConvGS(30, 8, 4, 2, k_nearest=3, seed=0, n_threads=2)
    assert tiny._step_threads(8) == 1  # 2*8*4*8*64 flops: a fork/join costs more than the work
    big = qg.QAConvGS(30, 128, 24, 8, k_nearest=15, seed=0, n_threads=2)
    assert big._step_threads(64) == 2
    assert qg.QAConvGS(30, 128, 24, 8, k_nearest=15, seed=0, n_threads=1)._step_threads(64) == 1
    assert model_mod._SMALL_STEP_FLOPS > 0


@pytest.mark.parametrize("triplet", ["class", "batch"])
def test_step_bit_identical_for_1_and_2_threads_with_threading_forced(monkeypatch, triplet):
    """The small-step guard would run this step on one thread whatever n_threads; switch it off so
    that the composition (the features' chunked in-place normalize backward included) runs on 2 threads."""
    from qaconv_gs import model as model_mod

    monkeypatch.setattr(model_mod, "_SMALL_STEP_FLOPS", 0.0)
    monkeypatch.setattr(model_mod, "_BACKWARD_CHUNK_BYTES", 1024)  # several chunks even here
    outs = []
    for nt in (1, 2):
        m, X, y = _model_and_batch("separate", triplet, N=40, k=9, B=16)
        m.n_threads = nt
        assert m._step_threads(16) == nt
        outs.append(m.forward_backward(X, y))
    a, b = outs
    assert a.loss == b.loss and a.acc_cls == b.acc_cls and a.loss_triplet == b.loss_triplet
    for f in ("scores", "grad_features", "grad_embed_ids", "grad_embed_rows"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    for k in a.grad_head:
        np.testing.assert_array_equal(a.grad_head[k], b.grad_head[k], err_msg=k)
    assert a.grad_features.shape[0] > 8  # more feature rows than one chunk: the chunked path ran
    monkeypatch.setattr(model_mod, "_BACKWARD_CHUNK_BYTES", 1 << 30)  # one call, no chunks
    m, X, y = _model_and_batch("separate", triplet, N=40, k=9, B=16)
    whole = m.forward_backward(X, y)
    np.testing.assert_array_equal(whole.grad_embed_rows, a.grad_embed_rows)
    np.testing.assert_array_equal(whole.grad_features, a.grad_features)


def test_bench_loss_step_via_cli(tmp_path, capfd):
    pytest.importorskip("torch")
    out = tmp_path / "bo"
    rc = cli.main(
        ["bench", "--threads", "1", "--out", str(out), "loss_step", "--"]
        + ["--classes", "40", "--ks", "8,N-1", "--steps", "2", "--warmup", "1"]
    )
    text = capfd.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "bench_loss_step.json").read_text())
    assert res["classes"] == 40 and res["threads"] == 1
    got = {(r["config"], r["k"]) for r in res["rows"]}
    want = {(c, k) for c in ("defaults", "batch-triplet recipe") for k in (8, 39)}
    assert got == want | {("recipe, k_batch=32", 8), ("recipe, k_batch=32 weighted", 8)}
    assert all(r["median_ms"] > 0 for r in res["rows"])
    assert "| defaults | N-1 |" in text


def test_bench_learning_variants_parse_and_build():
    torch = pytest.importorskip("torch")
    from benchmarks import bench_learning as bl

    kw = bl.parse_variant("k=N-1,batch=4,wx=1,nb=aligned,triplet=batch,sampler=pk,tw=1,margin=16,fc=shared")
    m = bl.method_from_variant(torch, 50, kw, 0)
    core = m.crit._core
    assert (core.k_nearest, core.fc, core.triplet, core.neighbors_by) == (49, "shared", "batch", "aligned")
    assert m.sampler == "pk" and m.name.startswith("qaconv-gs k=N-1")
    m = bl.method_from_variant(torch, 50, bl.parse_variant("k=8,batch=4,wx=1,triplet=batch"), 0)
    assert (core := m.crit._core).batch_per_sample == 4 and core.weighted_extras
    with pytest.raises(SystemExit, match="unknown keys \\['kk'\\]"):
        bl.parse_variant("kk=8")
    m = bl.method_from_variant(
        torch, 50, bl.parse_variant("k=8,batch=4,wx=1,triplet=batch,sampler=graph,group=4"), 0
    )
    assert (m.sampler, m.group) == ("graph", 4) and "group=4" in m.name


def test_bench_learning_children_get_every_option_but_the_seeds():
    from benchmarks import bench_learning as bl

    argv = [
        "--quick",
        "--seeds",
        "1,2",
        "--variants",
        "k=8;k=N-1",
        "--jobs=2",
        "--threads",
        "1",
        "--seed",
        "3",
    ]
    assert bl.child_argv(argv) == ["--quick", "--variants", "k=8;k=N-1", "--threads", "1"]
    assert bl.child_argv(["--seeds=4,5", "--random-init", "--lr", "0.1"]) == ["--random-init", "--lr", "0.1"]
    with pytest.raises(SystemExit):  # abbreviations would slip past child_argv
        bl.main(["--see", "1,2", "--merge", "x.json"])


def test_diagnose_learning_analyse_runs_on_a_saved_model(tmp_path, capsys):
    from benchmarks import diagnose_learning

    rng = np.random.default_rng(0)
    N, C, H = 12, 8, 2
    m = qg.QAConvGS(N, C, H, H, k_nearest=3, fc="shared", seed=0, init="random")
    m.eval()
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        m.save(d / "model.qgs")
        maps = {k: rng.standard_normal((n, C, H, H)).astype(np.float32) for k, n in
                (("probe", 24), ("gallery", 12), ("train", 48))}  # fmt: skip
        np.savez(d / "maps.npz", **maps, y_probe=np.arange(24) % N, y_train=np.arange(48) % N)
    assert (
        diagnose_learning.main(["analyse", str(tmp_path / "a"), str(tmp_path / "b"), "--threads", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "rows blended toward the training class means: 0: " in out
    assert "negative softmax mass" in out and "with the fc of" in out


def _learning_run(path, seed, rows, **extra):
    run = {"machine": {"date": "d", "cpu": "c"}, "classes": 10, "epochs": 1, "lr": 0.05,
           "probe_fonts": ["P"], **extra, "rows": rows}  # fmt: skip
    if seed is not None:
        run["seed"] = seed
    path.write_text(json.dumps(run))
    return str(path)


def _learning_row(method, ident, retr, k=None, config=None):
    row = {"method": method, "identification": ident, "retrieval": retr, "loss_step_ms": 1.0, "epoch_s": 1.0}
    if k is not None:
        row.update(k=k, k_mined=0, default_config=False, config=config)
    return row


def test_bench_learning_merge_summarises_seeds(tmp_path, capsys, monkeypatch):
    from benchmarks import _common
    from benchmarks import bench_learning as bl

    monkeypatch.setattr(_common, "OUT_DIR", tmp_path / "out")
    monkeypatch.setattr(bl, "OUT_DIR", tmp_path / "out")
    cfg = "batch, pk"

    def seed_rows(seed, restricted, full, q21):
        return [
            _learning_row("qaconv-gs k=3+3 batch (batch, pk)", *restricted, k=3, config=cfg + ", 3 batch"),
            _learning_row("qaconv-gs k=N-1 (batch, pk)", *full, k=9, config=cfg),
            _learning_row("qaconv2.1", None, q21),
            _learning_row("cosface s=16 m=0.1", 0.5, 0.45),
        ]

    paths = [
        _learning_run(tmp_path / "a.json", 0, seed_rows(0, (0.6, 0.5), (0.8, 0.5), 0.4)),
        _learning_run(tmp_path / "b.json", 1, seed_rows(1, (0.8, 0.5), (0.8, 0.4), 0.6)),
        # seed 1 also has full scoring with another recipe: better identification, worse retrieval
        _learning_run(
            tmp_path / "c.json", 1, [_learning_row("qaconv-gs k=N-1 (other)", 1.0, 0.2, k=9, config="other")]
        ),
    ]
    assert bl.main(["--merge", *paths]) == 0
    out = capsys.readouterr().out
    # per seed ratios to the full twin, their mean and how many seeds pass 0.99x
    assert "seed 0 0.750x / 1.000x, seed 1 1.000x / 1.250x; mean 0.875x / 1.125x" in out
    # mean 0.875 / 1.125, sd 0.177 / 0.177 over 2 seeds: t(1) = 12.706, half-width 12.706 * 0.125 = 1.588
    assert "95 % t-interval of the mean [-0.713, 2.463] / [-0.463, 2.713]; 1 / 2 of 2 seeds >= 0.99x" in out
    # against the best full run of each seed, per measure: seed 1's identification is against the other
    # recipe's 1.0, its retrieval against the twin's 0.4
    assert "- qaconv-gs k=3+3 batch (batch, pk): seed 0 0.750x / 1.000x, seed 1 0.800x / 1.250x; mean" in out
    # the best baseline of each seed: qaconv2.1 on seed 1 (0.6), cosface on seed 0 (0.45)
    # margins +0.05 and -0.10: sd 0.106, half-width 12.706 * 0.075 = 0.953
    want = "above the best baseline on 1 of 2 seeds, mean margin -0.025 (95 % t-interval [-0.978, +0.928]): "
    assert want + "seed 0 +0.050 (cosface" in out
    assert "| qaconv2.1 | - / 0.400 | - / 0.600 | - / 0.500 (2) |" in out
    saved = json.loads((tmp_path / "out" / "bench_learning.json").read_text())
    assert sorted(saved["rows_by_seed"]) == ["0", "1"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "out" / "bench_learning_seeds.png").stat().st_size > 0


def test_bench_learning_t_interval():
    from benchmarks import bench_learning as bl

    # mean 2, sd 1, n 4: 2 +- 3.182 * 1 / 2
    lo, hi = bl.t_interval(np.array([1.0, 2.0, 2.0, 3.0]) * 1.0)
    sd = np.std([1.0, 2.0, 2.0, 3.0], ddof=1)
    assert (lo, hi) == pytest.approx((2 - 3.182 * sd / 2, 2 + 3.182 * sd / 2))
    lo, hi = bl.t_interval(np.arange(40.0))  # past the table: the normal quantile
    assert hi - 19.5 == pytest.approx(1.960 * np.std(np.arange(40.0), ddof=1) / np.sqrt(40))


def test_bench_learning_merge_refuses_unseeded_and_repeated_runs(tmp_path):
    from benchmarks import bench_learning as bl

    row = _learning_row("softmax", 0.5, 0.5)
    a = _learning_run(tmp_path / "a.json", None, [row])
    with pytest.raises(SystemExit, match="record no seed"):
        bl.main(["--merge", a])
    b = _learning_run(tmp_path / "b.json", 0, [row])
    c = _learning_run(tmp_path / "c.json", 0, [row])
    with pytest.raises(SystemExit, match="seed 0 has these methods more than once: \\['softmax'\\]"):
        bl.main(["--merge", b, c])
    d = _learning_run(tmp_path / "d.json", 1, [row], epochs=2)
    with pytest.raises(SystemExit, match="differ in classes / epochs"):
        bl.main(["--merge", b, d])
