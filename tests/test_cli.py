"""The qaconv-gs command line: info, neighbors, match, demo (tiny settings), errors; python -m qaconv_gs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import qaconv_gs
from qaconv_gs.cli import main

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(qaconv_gs.__file__)))
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "qaconv_gs", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert qaconv_gs.__version__ in out and "openmp" in out and "default_threads" in out
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["version"] == qaconv_gs.__version__
    assert isinstance(facts["openmp"], bool) and facts["default_threads"] >= 1


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_neighbors(tmp_path, capsys):
    rng = np.random.default_rng(0)
    E = rng.standard_normal((25, 16)).astype(np.float32)
    np.save(tmp_path / "E.npy", E)
    argv = ["neighbors", str(tmp_path / "E.npy"), str(tmp_path / "nn.npy"), "-k", "4"]
    assert main(argv + ["--similarity", str(tmp_path / "sim.npy"), "--threads", "1"]) == 0
    assert "(25, 4)" in capsys.readouterr().out
    idx = np.load(tmp_path / "nn.npy")
    sim = np.load(tmp_path / "sim.npy")
    assert idx.shape == (25, 4) and idx.dtype == np.int64 and sim.shape == (25, 4)
    # brute-force cosine kNN in float64 (random data: no near-ties)
    u = E.astype(np.float64) / np.linalg.norm(E, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-s, axis=1)[:, :4])
    np.testing.assert_allclose(sim, np.take_along_axis(s, idx, 1), rtol=1e-5)
    # bad k: a clear error, exit status 1
    assert main(["neighbors", str(tmp_path / "E.npy"), str(tmp_path / "x.npy"), "-k", "25"]) == 1
    assert "error" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()


def test_match_fresh_head_and_checkpoint(tmp_path, capsys):
    from qaconv_gs.head import init_head

    rng = np.random.default_rng(1)
    probe = rng.standard_normal((3, 8, 4, 2)).astype(np.float32)
    gallery = rng.standard_normal((5, 8, 4, 2)).astype(np.float32)
    np.save(tmp_path / "p.npy", probe)
    np.save(tmp_path / "g.npy", gallery)
    assert main(["match", str(tmp_path / "p.npy"), str(tmp_path / "g.npy"), str(tmp_path / "s.npy")]) == 0
    scores = np.load(tmp_path / "s.npy")
    want = qaconv_gs.match(probe, gallery, init_head(8, fc="separate", rng=np.random.default_rng(0)))
    np.testing.assert_array_equal(scores, want)
    assert scores.shape == (3, 5)

    # with the head of a trained model's checkpoint (a trainer checkpoint is a model checkpoint)
    QAConvGS = pytest.importorskip("qaconv_gs.model").QAConvGS
    from qaconv_gs.trainer import Trainer

    model = QAConvGS(6, 8, 4, 2, k_nearest=2, seed=0, n_threads=1)
    labels = np.arange(6).repeat(2)
    feats = rng.standard_normal((12, 8, 4, 2)).astype(np.float32)
    trainer = Trainer(model, lr=0.1)
    trainer.fit([(feats, labels)], epochs=2, progress=False)
    ckpt = trainer.save_checkpoint(tmp_path / "run.npz")
    argv = ["match", str(tmp_path / "p.npy"), str(tmp_path / "g.npy"), str(tmp_path / "s2.npy")]
    assert main(argv + ["--checkpoint", str(ckpt), "--threads", "2"]) == 0
    np.testing.assert_allclose(
        np.load(tmp_path / "s2.npy"), model.match(probe, gallery), rtol=1e-6, atol=1e-6
    )
    capsys.readouterr()
    # mismatched shapes and unreadable checkpoints: exit status 1 with the argument named
    np.save(tmp_path / "bad.npy", rng.standard_normal((2, 7, 4, 2)))
    assert main(["match", str(tmp_path / "p.npy"), str(tmp_path / "bad.npy"), str(tmp_path / "s3.npy")]) == 1
    assert "gallery" in capsys.readouterr().err
    # maps of another shape than the checkpoint's model: refused, even where the head's size would fit
    # (a "separate" head for 4 x 2 locations has the size of a "shared" one for 4 x 4)
    for shape in [(3, 8, 4, 4), (3, 5, 4, 2), (3, 8, 2, 4)]:
        np.save(tmp_path / "other.npy", rng.standard_normal(shape).astype(np.float32))
        other = ["match", str(tmp_path / "other.npy"), str(tmp_path / "other.npy"), str(tmp_path / "s4.npy")]
        assert main(other + ["--checkpoint", str(ckpt)]) == 1
        err = capsys.readouterr().err
        assert "probe" in err and "(8, 4, 2)" in err and str(shape[1:]) in err
        assert not (tmp_path / "s4.npy").exists()
    with pytest.raises(SystemExit):  # argparse: exit status 2, the option named
        main(argv + ["--seed", "-1"])
    assert "--seed: expected an integer >= 0, got -1" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert main(argv + ["--checkpoint", str(tmp_path / "junk.npz")]) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_demo_tiny_via_python_m(tmp_path):
    pytest.importorskip("qaconv_gs.model")
    out = tmp_path / "demo"
    args = ["demo", "--classes", "12", "--samples", "6", "--epochs", "2", "--k", "3", "--batch-size", "8"]
    res = run_module(*args, "--threads", "1", "--out", str(out), "--no-progress", timeout=120)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "restricted scoring" in text and "full scoring" in text
    assert text.count("held-out rank-1") >= 4 and "epoch  2/2" in text
    assert "faster than full scoring" in text
    for name in ("restricted", "full"):
        png = out / f"demo_curves_{name}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert res.stderr == ""  # no progress bar, no warnings


def test_demo_without_matplotlib_still_succeeds(tmp_path, capsys, monkeypatch):
    """A plain `pip install .` has no matplotlib: the demo prints its results and says the curves were
    not drawn, instead of failing after training."""
    pytest.importorskip("qaconv_gs.model")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    args = ["demo", "--classes", "12", "--samples", "6", "--epochs", "1", "--k", "3", "--batch-size", "8"]
    assert main(args + ["--threads", "1", "--out", str(tmp_path), "--no-progress", "--no-full"]) == 0
    out = capsys.readouterr().out
    assert "restricted" in out and "curves not drawn: matplotlib is not installed" in out
    assert not list(tmp_path.glob("*.png"))


def _fonts_installed() -> bool:
    from qaconv_gs import glyphs

    names = {os.path.splitext(os.path.basename(p))[0] for p in glyphs.korean_font_files()}
    return {"NanumMyeongjo", "NanumPen", "UnDotum", "NanumGothic"} <= names


def test_demo_on_fonts(tmp_path, capsys):
    """--data fonts: real glyph images through a fixed random CNN, default init; it learns within one
    epoch (held-out rank-1 far above the 1/30 chance) and reports held-out retrieval before and after."""
    pytest.importorskip("PIL", reason="Pillow is not installed (pip install 'qaconv-gs[fonts]')")
    if not _fonts_installed():
        pytest.skip("Korean fonts not installed (see qaconv_gs.glyphs.DEBIAN_PACKAGES)")
    args = ["demo", "--data", "fonts", "--classes", "30", "--epochs", "1", "--k", "4", "--no-full"]
    assert main(args + ["--threads", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Hangul syllables" in out and "held-out fonts" in out
    row = next(line.split() for line in out.splitlines() if re.match(r"restricted +\d", line))
    assert float(row[-1]) > 0.3  # rank-1 after one epoch; chance 0.033
    assert "before training" in out and "retrieval" in out


def test_demo_argument_errors(capsys):
    assert main(["demo", "--classes", "10", "--k", "10"]) == 1
    assert "--k" in capsys.readouterr().err
    assert main(["demo", "--samples", "2", "--held-out", "2"]) == 1
    assert "--samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--threads", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "x"])


@pytest.mark.slow
def test_demo_default_learns(tmp_path):
    """The default demo (restricted and full runs) learns: held-out rank-1 far above chance."""
    pytest.importorskip("qaconv_gs.model")
    t0 = time.perf_counter()
    res = run_module("demo", "--no-progress", "--out", str(tmp_path), timeout=300)  # default threads
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    rows = {
        line.split()[0]: line.split()
        for line in res.stdout.splitlines()
        if line.startswith(("restricted ", "full "))
    }
    assert float(rows["restricted"][-1]) > 0.5 and float(rows["restricted"][-2]) < 0.05  # chance is 0.01
    print(f"default demo took {elapsed:.1f} s")  # reported, never asserted: tests do not time


def test_quickstart_runs_top_to_bottom(tmp_path):
    if not all(hasattr(qaconv_gs, name) for name in ("QAConvGS", "Trainer", "GraphSampler")):
        pytest.skip("needs the top-level exports qaconv_gs.QAConvGS / Trainer / GraphSampler")
    script = os.path.join(REPO_DIR, "examples", "quickstart.py")
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=180
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out rank-1" in res.stdout and "resumed for one more epoch" in res.stdout
    rank1 = float(res.stdout.split("held-out rank-1 ")[-1].split(",")[0])
    assert rank1 > 0.5  # chance is 1/60
    assert (tmp_path / "quickstart_curves.png").exists() and (tmp_path / "quickstart.npz").exists()
