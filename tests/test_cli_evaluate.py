"""qaconv-gs evaluate: end to end through main([...]) on small maps, numbers equal to the library's."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import qaconv_gs
from qaconv_gs import metrics
from qaconv_gs.cli import main

C, H, W = 8, 4, 2
# 12 probes, 20 gallery maps: ids 1..6, gallery junk (-1) and distractors (id 0; one probe of id 0 too);
# the id-6 probe has only same-camera matches: skipped with cameras, valid without
QID = np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 0, 6])
QCAM = np.array([1, 1, 2, 2, 3, 3, 1, 2, 3, 1, 2, 1])
GID = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0, 0, 0, -1, -1, 1, 2, 3, 6, 6])
GCAM = np.array([1, 2, 1, 3, 2, 1, 2, 3, 3, 1, 1, 2, 3, 1, 2, 3, 2, 2, 1, 1])


def _write_list(path, ids, cams, prefix=""):
    """Market-1501 style names (some with directories), plus a trailing blank line."""
    lines = [f"{prefix}{i:04d}_c{c}s1_{n:06d}_01.jpg" if i >= 0 else f"{prefix}-1_c{c}s2_{n:06d}_02.jpg"
             for n, (i, c) in enumerate(zip(ids, cams))]  # fmt: skip
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from qaconv_gs.model import QAConvGS
    from qaconv_gs.trainer import Trainer

    d = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(7)
    base = rng.standard_normal((7, C, H, W)).astype(np.float32)
    probe = (base[QID] + 1.3 * rng.standard_normal((QID.size, C, H, W))).astype(np.float32)
    gallery = (base[np.maximum(GID, 0)] + 1.3 * rng.standard_normal((GID.size, C, H, W))).astype(np.float32)
    model = QAConvGS(7, C, H, W, k_nearest=2, seed=0, n_threads=1, init="random")
    feats = (base[np.arange(7).repeat(3)] + rng.standard_normal((21, C, H, W))).astype(np.float32)
    trainer = Trainer(model, lr=0.05)
    trainer.fit([(feats, np.arange(7).repeat(3))], epochs=2, progress=False)
    files = {
        "probe": d / "probe.npy",
        "gallery": d / "gallery.npy",
        "qid": d / "qid.npy",
        "gid": d / "gid.npy",
        "qcam": d / "qcam.npy",
        "gcam": d / "gcam.npy",
    }
    for key, arr in zip(files, (probe, gallery, QID, GID, QCAM, GCAM)):
        np.save(files[key], arr)
    files = {k: str(v) for k, v in files.items()}
    files["ckpt"] = str(d / "model.npz")
    model.save(files["ckpt"])
    files["trainer_ckpt"] = str(trainer.save_checkpoint(d / "trainer.npz"))
    head = {k: v.copy() for k, v in model.head_state.items()}
    scores = qaconv_gs.match(probe, gallery, head)
    np.save(d / "scores.npy", scores)
    files["scores"] = str(d / "scores.npy")
    files["qlist"] = _write_list(d / "query.txt", QID, QCAM, prefix="/data/market/query/")
    files["glist"] = _write_list(d / "test.txt", GID, GCAM)
    return {"dir": d, "files": files, "probe": probe, "gallery": gallery, "head": head, "scores": scores}


def _maps_args(f, cams=True):
    argv = ["evaluate", "--probe", f["probe"], "--gallery", f["gallery"], "--checkpoint", f["ckpt"]]
    argv += ["--probe-ids", f["qid"], "--gallery-ids", f["gid"]]
    if cams:
        argv += ["--probe-cams", f["qcam"], "--gallery-cams", f["gcam"]]
    return argv


def _run_json(data, argv, capsys, name="out.json"):
    path = str(data["dir"] / name)
    assert main(argv + ["--json", path]) == 0
    out = capsys.readouterr().out
    with open(path) as fh:
        return json.load(fh), out


def _table_value(out, metric):
    m = re.search(rf"^{re.escape(metric)}\s+(\S.*)$", out, re.M)
    assert m, f"no {metric!r} row in:\n{out}"
    return m.group(1).strip()


def _check_ranking(report, out, want, ranks=(1, 5, 10, 20)):
    """The JSON numbers equal `want` exactly; the table shows them rounded."""
    assert report["cmc"] == {str(r): float(want.cmc[r - 1]) for r in ranks}
    assert report["cmc_curve"] == [float(v) for v in want.cmc]
    assert report["mAP"] == want.mAP
    assert report["num_valid_queries"] == want.num_valid_queries
    assert report["num_skipped_queries"] == want.num_skipped_queries
    for r in ranks:
        assert _table_value(out, f"rank-{r}") == f"{100 * want.cmc[r - 1]:.2f}%"
    assert _table_value(out, "mAP") == f"{100 * want.mAP:.2f}%"
    assert _table_value(out, "valid queries") == str(want.num_valid_queries)
    assert _table_value(out, "skipped queries") == str(want.num_skipped_queries)


def _strip(report):
    return {k: v for k, v in report.items() if k != "seconds"}


def test_maps_equal_cmc_map_of_match(data, capsys):
    f = data["files"]
    want = metrics.cmc_map(data["scores"], QID, GID, QCAM, GCAM, max_rank=50)
    assert 0 < want.cmc[0] < 1 and want.num_skipped_queries == 1  # the id-6 probe
    report, out = _run_json(data, _maps_args(f) + ["--block", "5", "--threads", "1"], capsys)
    _check_ranking(report, out, want)
    assert report["input"] == "maps" and report["cameras"] is True and report["rerank"] is None
    # other ranks; a trainer checkpoint works as well; the blocking does not change a bit
    argv = _maps_args(f) + ["--ranks", "3,1", "--checkpoint", f["trainer_ckpt"]]
    report2, out2 = _run_json(data, argv, capsys)
    _check_ranking(report2, out2, want, ranks=(1, 3))
    # without cameras only junk is ignored
    want_nocam = metrics.cmc_map(data["scores"], QID, GID, max_rank=50)
    assert want_nocam.num_skipped_queries == 0
    report3, out3 = _run_json(data, _maps_args(f, cams=False), capsys)
    _check_ranking(report3, out3, want_nocam)
    assert "same-camera" not in out3 and "same-camera" in out


def test_market_list_equals_npy_ids(data, capsys):
    f = data["files"]
    base = ["evaluate", "--scores", f["scores"]]
    ids = ["--probe-ids", f["qid"], "--gallery-ids", f["gid"], "--probe-cams", f["qcam"]]
    by_ids, _ = _run_json(data, base + ids + ["--gallery-cams", f["gcam"]], capsys)
    by_list, out = _run_json(data, base + ["--probe-list", f["qlist"], "--gallery-list", f["glist"]], capsys)
    assert _strip(by_list) == _strip(by_ids)
    assert by_list["cameras"] is True
    # the list holds junk (-1), distractors (0000) and same-camera matches that were ignored
    text = open(f["glist"]).read()
    assert "-1_c1s2" in text and "0000_c1s1" in text


def test_scores_and_distances_equal_maps(data, capsys):
    f = data["files"]
    maps, _ = _run_json(data, _maps_args(f), capsys)
    labels = ["--probe-ids", f["qid"], "--gallery-ids", f["gid"], "--probe-cams", f["qcam"]]
    labels += ["--gallery-cams", f["gcam"]]
    scores, out = _run_json(data, ["evaluate", "--scores", f["scores"], *labels], capsys)
    assert _strip(scores) == dict(_strip(maps), input="scores")
    assert "scores from" in out
    np.save(data["dir"] / "dist.npy", -data["scores"].astype(np.float64))
    dist, out = _run_json(
        data, ["evaluate", "--scores", str(data["dir"] / "dist.npy"), "--distances", *labels], capsys
    )
    assert _strip(dist) == _strip(scores)
    assert "distances from" in out


def test_rerank_equals_metrics_rerank(data, capsys):
    f = data["files"]
    p, g, head = data["probe"], data["gallery"], data["head"]
    qq, gg = qaconv_gs.match(p, p, head), qaconv_gs.match(g, g, head)
    d = metrics.rerank(
        metrics.scores_to_distances(data["scores"]),
        metrics.scores_to_distances(qq, zero_diagonal=True),
        metrics.scores_to_distances(gg, zero_diagonal=True),
        k1=5,
        k2=2,
        lambda_value=0.4,
    )
    want = metrics.cmc_map(d, QID, GID, QCAM, GCAM, higher_is_better=False, max_rank=50)
    opts = ["--rerank", "--k1", "5", "--k2", "2", "--lambda", "0.4"]
    report, out = _run_json(data, _maps_args(f) + opts + ["--block", "4"], capsys)
    _check_ranking(report, out, want)
    assert report["rerank"] == {"k1": 5, "k2": 2, "lambda": 0.4} and "k-reciprocal" in out
    # from saved scores: the two extra matrices are required
    np.save(data["dir"] / "qq.npy", qq)
    np.save(data["dir"] / "gg.npy", gg)
    labels = ["--probe-ids", f["qid"], "--gallery-ids", f["gid"], "--probe-cams", f["qcam"]]
    labels += ["--gallery-cams", f["gcam"]]
    argv = ["evaluate", "--scores", f["scores"], *labels, *opts]
    assert main(argv) == 2
    assert "--rerank: with --scores" in capsys.readouterr().err
    extra = ["--probe-probe-scores", str(data["dir"] / "qq.npy")]
    extra += ["--gallery-gallery-scores", str(data["dir"] / "gg.npy")]
    report2, out2 = _run_json(data, argv + extra, capsys)
    _check_ranking(report2, out2, want)
    # defaults 20 / 6 / 0.3 as metrics.rerank's
    want_default = metrics.cmc_map(
        metrics.rerank(
            metrics.scores_to_distances(data["scores"]),
            metrics.scores_to_distances(qq, zero_diagonal=True),
            metrics.scores_to_distances(gg, zero_diagonal=True),
        ),
        QID, GID, QCAM, GCAM, higher_is_better=False, max_rank=50,
    )  # fmt: skip
    report3, out3 = _run_json(data, _maps_args(f) + ["--rerank"], capsys)
    _check_ranking(report3, out3, want_default)


def test_two_stage(data, capsys):
    f = data["files"]
    exhaustive, _ = _run_json(data, _maps_args(f), capsys)
    G = GID.size
    for R in (G, G + 30):
        report, out = _run_json(data, _maps_args(f) + ["--two-stage", str(R)], capsys)
        assert "shortlist" in out and "exhaustive" in out
        assert report["two_stage"] == {"candidates": G, "over_shortlist": True}
        for key in ("cmc", "cmc_curve", "mAP", "num_valid_queries", "num_skipped_queries"):
            assert report[key] == exhaustive[key]
    # a real shortlist: the metrics of cmc_map_ranked over two_stage_search's lists
    found = qaconv_gs.two_stage_search(data["probe"], data["gallery"], data["head"], top=6, candidates=6)
    want = metrics.cmc_map_ranked(found.ids, QID, GID, QCAM, GCAM, max_rank=50)
    report, out = _run_json(data, _maps_args(f) + ["--two-stage", "6", "--block", "2"], capsys)
    _check_ranking(report, out, want)
    assert "R = 6 of 20" in out and "outside the shortlist counts as not found" in out


def test_cuhk03_protocol(data, capsys):
    f = data["files"]
    want = metrics.cmc_map(
        data["scores"], QID, GID, QCAM, GCAM, max_rank=50, single_gallery_shot=True, repeat=3, seed=4
    )
    argv = _maps_args(f) + ["--protocol", "cuhk03", "--repeat", "3", "--seed", "4"]
    report, out = _run_json(data, argv, capsys)
    _check_ranking(report, out, want)
    assert report["protocol"] == "cuhk03" and report["repeat"] == 3 and "single-gallery-shot" in out


def _check_verification(report, out, want, folds):
    assert report["accuracy"] == want.accuracy and report["accuracy_std"] == want.accuracy_std
    assert report["fold_accuracies"] == [float(v) for v in want.fold_accuracies]
    assert report["tar_at_far"] == {f"{far:g}": want.tar_at_far[far] for far in (1e-3, 1e-2, 1e-1)}
    assert report["eer"] == want.eer and report["auc"] == want.auc
    acc = f"{100 * want.accuracy:.2f}% ± {100 * want.accuracy_std:.2f}%"
    assert _table_value(out, f"accuracy ({folds}-fold)") == acc
    assert _table_value(out, "TAR @ FAR=0.001") == f"{100 * want.tar_at_far[1e-3]:.2f}%"
    assert _table_value(out, "TAR @ FAR=0.1") == f"{100 * want.tar_at_far[1e-1]:.2f}%"
    assert _table_value(out, "EER") == f"{100 * want.eer:.2f}%"
    assert _table_value(out, "AUC") == f"{want.auc:.4f}"


def test_verification(data, capsys):
    rng = np.random.default_rng(3)
    same = rng.random(200) < 0.5
    s = (same * 1.5 + rng.standard_normal(200)).astype(np.float32)
    d = data["dir"]
    np.save(d / "pair_scores.npy", s)
    np.save(d / "same.npy", same)
    argv = ["evaluate", "--protocol", "verification", "--scores", str(d / "pair_scores.npy")]
    argv += ["--labels", str(d / "same.npy")]
    report, out = _run_json(data, argv, capsys)
    _check_verification(report, out, metrics.verification(s, same), 10)
    assert report["num_pairs"] == 200 and report["num_same"] == int(same.sum())
    # distances: the negated scores
    np.save(d / "pair_dist.npy", -s.astype(np.float64))
    argv_d = ["evaluate", "--protocol", "verification", "--scores", str(d / "pair_dist.npy"), "--distances"]
    report_d, _ = _run_json(data, argv_d + ["--labels", str(d / "same.npy")], capsys)
    assert _strip(report_d) == _strip(report)
    # maps: pairs of probe and gallery rows, scored as match scores them
    f = data["files"]
    pairs = np.stack([rng.integers(0, QID.size, 30), rng.integers(0, GID.size, 30)], axis=1)
    pair_same = QID[pairs[:, 0]] == GID[pairs[:, 1]]
    np.save(d / "pairs.npy", pairs)
    np.save(d / "pair_same.npy", pair_same.astype(np.uint8))
    argv = ["evaluate", "--protocol", "verification", "--probe", f["probe"], "--gallery", f["gallery"]]
    argv += ["--checkpoint", f["ckpt"], "--pairs", str(d / "pairs.npy"), "--labels", str(d / "pair_same.npy")]
    report, out = _run_json(data, argv + ["--folds", "5", "--block", "7"], capsys)
    want = metrics.verification(data["scores"][pairs[:, 0], pairs[:, 1]], pair_same, folds=5)
    _check_verification(report, out, want, 5)
    # aligned rows without --pairs: probe row i with gallery row i
    aligned_same = QID == GID[: QID.size]
    np.save(d / "aligned_same.npy", aligned_same)
    np.save(d / "gallery12.npy", data["gallery"][: QID.size])
    argv = [
        "evaluate",
        "--protocol",
        "verification",
        "--probe",
        f["probe"],
        "--gallery",
        str(d / "gallery12.npy"),
    ]
    argv += ["--checkpoint", f["ckpt"], "--labels", str(d / "aligned_same.npy"), "--folds", "3"]
    report, out = _run_json(data, argv, capsys)
    want = metrics.verification(np.diag(data["scores"][:, : QID.size]), aligned_same, folds=3)
    _check_verification(report, out, want, 3)


def test_plot_dir_writes_pngs(data, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    f, d = data["files"], data["dir"]
    assert main(_maps_args(f) + ["--plot-dir", str(d / "plots"), "--quiet"]) == 0
    np.save(d / "v_scores.npy", np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2]))
    np.save(d / "v_same.npy", np.array([1, 0, 1, 0, 1, 0]))
    argv = ["evaluate", "--protocol", "verification", "--scores", str(d / "v_scores.npy"), "--labels"]
    assert main(argv + [str(d / "v_same.npy"), "--folds", "3", "--plot-dir", str(d / "plots")]) == 0
    out = capsys.readouterr().out
    for name in ("cmc.png", "roc.png"):
        png = d / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out
    # without matplotlib: a clear error before any work
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert main(_maps_args(f) + ["--plot-dir", str(d / "plots2")]) == 2
    err = capsys.readouterr().err
    assert "--plot-dir" in err and "matplotlib" in err and "qaconv-gs[plot]" in err


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(data, capsys, monkeypatch):
    import qaconv_gs._cli_evaluate as ev

    f = data["files"]
    assert main(_maps_args(f)) == 0
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    monkeypatch.setattr(ev, "_PROGRESS_PAIRS", 1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(_maps_args(f) + ["--block", "5"]) == 0
    err = capsys.readouterr().err
    assert "probe x gallery" in err and "12/12" in err
    assert main(_maps_args(f) + ["--block", "5", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--probe-list",
        "--two-stage",
        "--rerank",
        "--protocol",
        "--plot-dir",
        "--json",
        "--distances",
    ):
        assert opt in out


def _bad_inputs(data):
    """(argv, message) cases of bad input; each must exit with status 2 and name the argument."""
    f, d = data["files"], data["dir"]
    rng = np.random.default_rng(5)
    np.save(d / "qid_short.npy", QID[:-1])
    np.save(d / "qid_float.npy", QID + 0.5)
    np.save(d / "qid_str.npy", QID.astype(str))
    np.save(d / "qid_none.npy", np.full(QID.size, 9))
    np.save(d / "gallery_c7.npy", rng.standard_normal((GID.size, 7, H, W)).astype(np.float32))
    np.save(d / "probe_44.npy", rng.standard_normal((QID.size, C, 4, 4)).astype(np.float32))
    np.save(d / "gallery_44.npy", rng.standard_normal((GID.size, C, 4, 4)).astype(np.float32))
    np.save(d / "scores_t.npy", data["scores"].T)
    np.save(d / "flat.npy", np.zeros(5, np.float32))
    (d / "bad.txt").write_text("0001_c1s1_000001_01.jpg\n0002_c2s1_000002_01.jpg\nfoo.jpg\n")
    (d / "junk.npz").write_bytes(b"junk")
    np.save(d / "labels_short.npy", np.array([1, 0, 1]))
    np.save(d / "labels_bad.npy", np.array([1, 0, 2, 1, 0]))
    maps = ["evaluate", "--probe", f["probe"], "--gallery", f["gallery"], "--checkpoint", f["ckpt"]]
    ids = ["--probe-ids", f["qid"], "--gallery-ids", f["gid"]]
    scores = ["evaluate", "--scores", f["scores"]]
    missing = str(d / "missing.npy")
    verif = ["evaluate", "--protocol", "verification", "--scores", str(d / "flat.npy")]
    return [
        (
            maps + ["--probe-ids", str(d / "qid_short.npy"), "--gallery-ids", f["gid"]],
            "--probe-ids: expected 12 ids (one per row of --probe, shape (12, 8, 4, 2)), got 11",
        ),
        (
            scores + ["--probe-ids", f["gid"], "--gallery-ids", f["gid"]],
            "--probe-ids: expected 12 ids (one per row of --scores, shape (12, 20)), got 20",
        ),
        (
            ["evaluate", "--scores", str(d / "scores_t.npy"), *ids],
            "--probe-ids: expected 20 ids (one per row of --scores, shape (20, 12)), got 12",
        ),
        (
            scores + ["--probe-ids", f["qid"], "--gallery-ids", f["qid"]],
            "--gallery-ids: expected 20 ids (one per column of --scores",
        ),
        (
            maps + ["--probe-ids", str(d / "qid_float.npy"), "--gallery-ids", f["gid"]],
            "--probe-ids: expected integer ids, got 12 non-integer value(s) (e.g. 1.5 at index 0)",
        ),
        (
            maps + ["--probe-ids", str(d / "qid_str.npy"), "--gallery-ids", f["gid"]],
            "--probe-ids: expected integer ids, got dtype <U",
        ),
        (
            maps + ids + ["--probe-cams", str(d / "qid_float.npy"), "--gallery-cams", f["gcam"]],
            "--probe-cams: expected integer ids",
        ),
        (
            [
                "evaluate",
                "--probe",
                f["probe"],
                "--gallery",
                str(d / "gallery_c7.npy"),
                "--checkpoint",
                f["ckpt"],
                *ids,
            ],
            "--gallery: expected maps of shape (C, H, W) = (8, 4, 2) like --probe, got (7, 4, 2)",
        ),
        (
            [
                "evaluate",
                "--probe",
                str(d / "probe_44.npy"),
                "--gallery",
                str(d / "gallery_44.npy"),
                "--checkpoint",
                f["ckpt"],
                *ids,
            ],
            "--probe: maps of shape (C, H, W) = (8, 4, 4), but the checkpoint",
        ),
        (["evaluate", "--probe", f["probe"], "--gallery", f["gallery"], *ids], "--checkpoint: required"),
        (
            ["evaluate", "--probe", missing, "--gallery", f["gallery"], "--checkpoint", f["ckpt"], *ids],
            "--probe: no such file",
        ),
        (maps + ["--probe-ids", f["qid"], "--gallery-ids", missing], "--gallery-ids: no such file"),
        (
            ["evaluate", "--probe", f["probe"], "--gallery", f["gallery"], "--checkpoint", missing, *ids],
            "--checkpoint: no such file",
        ),
        (
            [
                "evaluate",
                "--probe",
                f["probe"],
                "--gallery",
                f["gallery"],
                "--checkpoint",
                str(d / "junk.npz"),
                *ids,
            ],
            "--checkpoint: ",
        ),
        (scores + ["--probe-list", missing, "--gallery-ids", f["gid"]], "--probe-list: no such file"),
        (
            scores + ["--probe-list", f["glist"], "--gallery-list", f["glist"]],
            "--probe-list: expected 12 image names (one per row of --scores, shape (12, 20)), got 20",
        ),
        (
            scores + ["--probe-ids", f["qid"], "--gallery-list", str(d / "bad.txt")],
            "--gallery-list: "
            + str(d / "bad.txt")
            + ": line 3: 'foo.jpg' is not a Market-1501 style image name",
        ),
        (
            scores + ["--probe-ids", str(d / "qid_none.npy"), "--gallery-ids", f["gid"]],
            "--probe-ids/--gallery-ids: no valid query",
        ),
        (
            scores + ["--probe-list", f["qlist"], "--gallery-ids", f["gid"]],
            "--probe-cams/--gallery-cams: cameras are known for the probe side only",
        ),
        (
            scores + ["--probe-list", f["qlist"], "--probe-ids", f["qid"], "--gallery-ids", f["gid"]],
            "--probe-list: give either --probe-list or --probe-ids",
        ),
        (scores + ["--probe", f["probe"], *ids], "--scores: give either --scores or --probe/--gallery"),
        (["evaluate", *ids], "--probe/--gallery or --scores: no input given"),
        (
            ["evaluate", "--probe", f["probe"], "--checkpoint", f["ckpt"], *ids],
            "--gallery: required with --probe",
        ),
        (scores + ids + ["--checkpoint", f["ckpt"]], "--checkpoint: only with --probe/--gallery maps"),
        (maps + ids + ["--distances"], "--distances: only with --scores"),
        (maps + ids + ["--two-stage", "5", "--rerank"], "--two-stage: not with --rerank"),
        (
            maps + ids + ["--two-stage", "5", "--protocol", "cuhk03"],
            "--two-stage: only with --protocol market",
        ),
        (["evaluate", "--scores", str(d / "flat.npy"), *ids], "--scores: expected a 2-d [P, G] score matrix"),
        (
            verif + ["--labels", str(d / "labels_short.npy")],
            "--labels: expected 5 labels (one per pair of --scores), got 3",
        ),
        (
            verif + ["--labels", str(d / "labels_bad.npy")],
            "--labels: expected only 0/1 (or True/False), got 2 at index 2",
        ),
        (verif, "--labels: required with --protocol verification"),
        (
            verif + ["--labels", str(d / "labels_bad.npy"), *ids],
            "--probe-ids: not used with --protocol verification",
        ),
        (
            [
                "evaluate",
                "--protocol",
                "verification",
                "--scores",
                f["scores"],
                "--labels",
                str(d / "labels_short.npy"),
            ],
            "--scores: expected a 1-d [N] array of pair scores",
        ),
        (maps + ids + ["--json", str(d / "no" / "such" / "dir.json")], "--json: the directory"),
    ]


def test_bad_input_exits_2_naming_the_argument(data, capsys):
    cases = _bad_inputs(data)
    for argv, message in cases:
        assert main(argv) == 2, (argv, capsys.readouterr())
        err = capsys.readouterr().err
        assert err.startswith("qaconv-gs evaluate: error: "), err
        assert message in err, (message, err)
    assert not (data["dir"] / "no").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ranks", "0,5"], "--ranks: expected comma-separated integers >= 1"),
        (["--ranks", "a"], "--ranks: expected comma-separated integers >= 1"),
        (["--lambda", "1.5"], "--lambda: expected a number in [0, 1], got 1.5"),
        (["--k1", "0"], "--k1: expected an integer >= 1"),
        (["--protocol", "lfw"], "--protocol: invalid choice"),
    ],
)
def test_bad_option_values_are_argparse_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--scores", "s.npy", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
