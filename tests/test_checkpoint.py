"""Checkpoints: round trips, atomic writes, and truncated / corrupt / mismatched files."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import qaconv_gs.checkpoint as ckpt
from qaconv_gs.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from qaconv_gs.model import QAConvGS

N, C, H, W = 10, 6, 3, 2


def trained_model(seed=0, **kw) -> QAConvGS:
    m = QAConvGS(N, C, H, W, k_nearest=3, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    m.forward_backward(rng.standard_normal((8, C, H, W)), rng.integers(0, N, 8))
    return m


def assert_same_state(a: QAConvGS, b: QAConvGS):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_low_level_round_trip(tmp_path):
    p = tmp_path / "x.npz"
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    extra = {"momentum/class_embed": np.ones((2, 2)), "epoch": 4, "name": np.array("sgd")}
    save_checkpoint(p, {"num_classes": 3, "fc": "shared", "seed": None}, state, extra=extra)
    assert p.exists() and not p.with_suffix(".npz.npz").exists()
    config, st, ex = load_checkpoint(str(p))
    assert config == {"num_classes": 3, "fc": "shared", "seed": None}
    assert list(st) == ["a", "n"] and list(ex) == ["momentum/class_embed", "epoch", "name"]
    np.testing.assert_array_equal(st["a"], state["a"])
    assert st["n"].dtype == np.int64 and st["n"].shape == ()
    assert int(ex["epoch"]) == 4 and str(ex["name"]) == "sgd"
    save_checkpoint(p, {}, {})  # overwrite; empty is valid
    assert load_checkpoint(p) == ({}, {}, {})


def test_save_validation(tmp_path):
    p = tmp_path / "x.npz"
    with pytest.raises(TypeError, match="model_config"):
        save_checkpoint(p, {"f": object()}, {})
    with pytest.raises(TypeError, match="model_config"):
        save_checkpoint(p, {"f": float("nan")}, {})
    with pytest.raises(TypeError, match="state"):
        save_checkpoint(p, {}, {"a": np.array([object()])})
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(p, {}, {}, extra=[1])
    with pytest.raises(TypeError, match="path"):
        save_checkpoint(3.5, {}, {})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp files left


def test_model_save_load_round_trip(tmp_path):
    m = trained_model(fc="shared", triplet="batch", triplet_weight=0.3, margin=0.7)
    p = tmp_path / "model.npz"
    m.save(p, extra={"epoch": np.array(3)})
    m2, extra = QAConvGS.load(p, return_extra=True)
    assert m2.config == m.config and int(extra["epoch"]) == 3 and set(extra) == {"epoch"}
    assert_same_state(m, m2)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((4, C, H, W))
    np.testing.assert_array_equal(m2.match(X, X), m.match(X, X))
    np.testing.assert_array_equal(m2.identify(X, 3)[0], m.identify(X, 3)[0])
    y = rng.integers(0, N, 4)
    a, b = m.forward_backward(X, y), m2.forward_backward(X, y)
    assert a.loss == b.loss
    np.testing.assert_array_equal(a.grad_features, b.grad_features)
    m3 = QAConvGS.load(str(p), n_threads=1)
    assert m3.n_threads == 1
    # a bad n_threads is the caller's argument, not a fault of the file
    with pytest.raises(ValueError, match=r"^n_threads: expected an integer >= 1, got 0"):
        QAConvGS.load(str(p), n_threads=0)


def test_saved_neighbor_table_survives_mid_epoch(tmp_path):
    """The table in use is saved, so a resumed run scores the same candidates even if the embeddings
    moved since the table was computed."""
    m = trained_model()
    table = m.class_neighbors.copy()
    m.parameters()["class_embed"][:] = m.class_embed[::-1].copy()  # embeddings moved mid-epoch
    p = tmp_path / "m.npz"
    m.save(p)
    m2 = QAConvGS.load(p)
    assert not m2.neighbors_stale
    np.testing.assert_array_equal(m2.class_neighbors, table)
    m2.on_epoch_start()
    assert not np.array_equal(m2.class_neighbors, table)
    # a stale table is not saved
    m2.on_epoch_start()
    m2.save(p)
    assert QAConvGS.load(p).neighbors_stale
    with pytest.raises(ValueError, match="reserved"):
        m.save(p, extra={"_qaconv_gs.x": 1})


def test_instance_load_checkpoint(tmp_path):
    src = trained_model(seed=1)
    p = tmp_path / "a.npz"
    src.save(p, extra={"step": 7})
    dst = QAConvGS(N, C, H, W, k_nearest=2, seed=9)
    live = dst.parameters()
    extra = dst.load_checkpoint(p)
    assert int(extra["step"]) == 7 and dst.k_nearest == 2  # hyperparameters stay the instance's
    assert_same_state(src, dst)
    assert dst.parameters()["class_embed"] is live["class_embed"]
    assert dst.neighbors_stale  # the saved table has k=3, not this model's k=2
    other = QAConvGS(N + 1, C, H, W, k_nearest=2, seed=9)
    before = other.state_dict()
    with pytest.raises(ValueError, match="num_classes"):
        other.load_checkpoint(p)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    shared = QAConvGS(N, C, H, W, k_nearest=2, fc="shared", seed=9)
    with pytest.raises(ValueError, match="fc"):
        shared.load_checkpoint(p)


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    m = trained_model()
    p = tmp_path / "m.npz"
    m.save(p)
    good = p.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        trained_model(seed=4).save(p)
    monkeypatch.undo()
    assert p.read_bytes() == good
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.npz"]  # temp file removed
    assert_same_state(QAConvGS.load(p), m)


def test_atomic_write_uses_replace_and_fsync(tmp_path, monkeypatch):
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(
        ckpt.os, "replace", lambda a, b: (calls.append(("replace", a, b)), real_replace(a, b))
    )
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (calls.append(("fsync", fd)), real_fsync(fd)))
    p = tmp_path / "m.npz"
    trained_model().save(p)
    kinds = [c[0] for c in calls]
    assert kinds.count("fsync") >= 2  # the file before the rename, the directory after it
    i = kinds.index("replace")
    assert "fsync" in kinds[:i] and "fsync" in kinds[i + 1 :]
    src, dst = calls[i][1], calls[i][2]
    assert os.path.dirname(src) == str(tmp_path) and dst == str(p)
    assert oct(p.stat().st_mode & 0o777) in (oct(0o644), oct(0o664), oct(0o666), oct(0o600))


@pytest.mark.parametrize("frac", [0.0, 0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_raises_and_leaves_model_unchanged(tmp_path, frac):
    src = trained_model(seed=2)
    p = tmp_path / "m.npz"
    src.save(p)
    data = p.read_bytes()
    cut = int(len(data) * frac)
    p.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="not a valid qaconv-gs checkpoint"):
        QAConvGS.load(p)
    dst = trained_model(seed=3)
    before = dst.state_dict()
    with pytest.raises(ValueError, match="not a valid qaconv-gs checkpoint"):
        dst.load_checkpoint(p)
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_flipped_bytes_are_detected_or_harmless(tmp_path):
    """Every flipped byte either raises ValueError or (zip metadata the reader ignores) loads the
    exact same content; a flip inside any array's data is always detected."""
    src = trained_model(seed=2)
    p = tmp_path / "m.npz"
    src.save(p)
    data = p.read_bytes()
    ref = load_checkpoint(p)
    positions = list(range(0, len(data), max(1, len(data) // 160))) + [len(data) - 1]
    detected = 0
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        p.write_bytes(bytes(bad))
        try:
            got = load_checkpoint(p)
        except ValueError:
            detected += 1
            continue
        assert got[0] == ref[0]
        for a, b in ((got[1], ref[1]), (got[2], ref[2])):
            assert list(a) == list(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert detected > len(positions) // 2
    # a flip in the middle of the class-embedding bytes
    emb = src.state_dict()["class_embed"].tobytes()
    at = data.find(emb)
    assert at > 0
    for off in (0, len(emb) // 2, len(emb) - 1):
        bad = bytearray(data)
        bad[at + off] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum|CRC|corrupt"):
            QAConvGS.load(p)


def _rewrite(path, mutate_meta=None, mutate_arrays=None):
    """Rewrite a checkpoint's members (keeping the stored checksum unless mutate_meta changes it)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    if mutate_meta:
        mutate_meta(meta)
    if mutate_arrays:
        mutate_arrays(arrays)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "meta_fn, arrays_fn, match",
    [
        (lambda m: m.update(version=FORMAT_VERSION + 1), None, "version"),
        (lambda m: m.update(format="something-else"), None, "format"),
        (lambda m: m["config"].update(num_classes=N + 1), None, "checksum"),
        (lambda m: m.update(sha256="0" * 64), None, "checksum"),
        (None, lambda a: a.update({"state/bonus": np.zeros(1)}), "unlisted"),
        (None, lambda a: a.pop("state/fc.bias"), "missing"),
        (None, lambda a: a.pop("__meta__") and None, None),
    ],
)
def test_wrong_version_format_and_tampering(tmp_path, meta_fn, arrays_fn, match):
    p = tmp_path / "m.npz"
    trained_model().save(p)
    if match is None:  # no metadata at all
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        with open(p, "wb") as f:
            np.savez(f, **arrays)
        match = "__meta__"
    else:
        _rewrite(p, meta_fn, arrays_fn)
    with pytest.raises(ValueError, match=match):
        QAConvGS.load(p)


def test_consistent_file_with_mismatched_shapes(tmp_path):
    """A valid checkpoint whose state does not fit its config (e.g. hand-assembled) is refused."""
    m = trained_model()
    sd = m.state_dict()
    sd["class_embed"] = sd["class_embed"][:-1]
    p = tmp_path / "m.npz"
    save_checkpoint(p, m.config, sd)
    with pytest.raises(ValueError, match="class_embed"):
        QAConvGS.load(p)
    save_checkpoint(p, dict(m.config, k_nearest=N), m.state_dict())
    with pytest.raises(ValueError, match="k_nearest"):
        QAConvGS.load(p)
    save_checkpoint(p, dict(m.config, colour="red"), m.state_dict())
    with pytest.raises(ValueError, match="colour"):
        QAConvGS.load(p)


def test_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(IsADirectoryError):
        load_checkpoint(tmp_path)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz"):
        load_checkpoint(npy)
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="not a valid"):
        load_checkpoint(txt)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a valid"):
        load_checkpoint(pickled)  # never unpickles
    z = tmp_path / "z.npz"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("__meta__.npy", b"not an npy")
    with pytest.raises(ValueError, match="not a valid"):
        load_checkpoint(z)


def test_checksum_covers_the_dtype(tmp_path):
    """An archive rewritten with the same bytes and shape under another dtype (class_embed viewed as int32)
    fails the checksum instead of loading garbage weights (integers would pass the float conversion)."""
    m = QAConvGS(6, 3, 2, 2, k_nearest=2, seed=0)
    m.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["state/class_embed"] = arrays["state/class_embed"].view(np.int32)
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ValueError, match="checksum|SHA"):
        load_checkpoint(tmp_path / "tampered.npz")


def test_load_head_for_maps_checks_shape_and_fc(tmp_path):
    """The head loader of `qaconv-gs match` / `evaluate`: the maps' shape, a head at all, and an fc.weight
    that fits both S and the saved fc mode, each refused naming the option."""
    from qaconv_gs.checkpoint import load_head_for_maps

    m = QAConvGS(5, 3, 2, 4, k_nearest=2, seed=0)
    m.save(tmp_path / "m.npz")
    kw = dict(checkpoint_name="--ck", maps_name="--maps")
    head = load_head_for_maps(tmp_path / "m.npz", (3, 2, 4), **kw)
    assert set(head) == {k for k in m.state_dict() if k.split(".")[0] in ("bn", "fc", "logit_bn")}
    np.testing.assert_array_equal(head["fc.weight"], m.state_dict()["fc.weight"])
    with pytest.raises(
        ValueError, match=r"^--maps: maps of shape \(C, H, W\) = \(3, 4, 2\), but the checkpoint"
    ):
        load_head_for_maps(tmp_path / "m.npz", (3, 4, 2), **kw)
    with pytest.raises(ValueError, match="^--ck: "):
        load_head_for_maps(tmp_path / "missing.npz", (3, 2, 4), **kw)
    config, state, _ = load_checkpoint(tmp_path / "m.npz")
    save_checkpoint(tmp_path / "nohead.npz", config, {"class_embed": state["class_embed"]})
    with pytest.raises(ValueError, match=r"^--ck: .* holds no QAConv head \(no 'fc.weight'\)$"):
        load_head_for_maps(tmp_path / "nohead.npz", (3, 2, 4), **kw)
    # a "shared"-sized fc.weight (S values) under a config that says "separate"
    bad = {**state, "fc.weight": state["fc.weight"][:, :8]}
    save_checkpoint(tmp_path / "mixed.npz", config, bad)
    with pytest.raises(
        ValueError, match=r"^--ck: .* fc.weight of 'shared' size, but its config says fc='separate'"
    ):
        load_head_for_maps(tmp_path / "mixed.npz", (3, 2, 4), **kw)
    bad = {**state, "fc.weight": state["fc.weight"][:, :5]}
    save_checkpoint(tmp_path / "odd.npz", config, bad)
    with pytest.raises(ValueError, match=r"^--ck: .*'fc.weight' has 5 values"):
        load_head_for_maps(tmp_path / "odd.npz", (3, 2, 4), **kw)
