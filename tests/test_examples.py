"""examples/reid_torchvision.py end to end on a generated Market-1501-layout folder (ResNet-50 at 64 x 32)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from qaconv_gs import metrics  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reid_torchvision.py"


@pytest.fixture(scope="module")
def reid():
    spec = importlib.util.spec_from_file_location("qg_example_reid_torchvision", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_parse_market_name(reid):
    assert reid.parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert reid.parse_market_name("/x/bounding_box_test/-1_c3s2_012345_01.jpg") == (-1, 3)
    assert reid.parse_market_name("0000_c6s4_002202_04.jpg") == (0, 6)
    assert reid.parse_market_name("0001_c2_f0046182.jpg") == (1, 2)  # DukeMTMC-reID
    with pytest.raises(ValueError, match="0002_c1s1"):
        reid.parse_market_name("Thumbs.db")


def test_toy_layout_and_market_rules(reid, tmp_path):
    root = reid.make_toy(tmp_path / "toy", num_ids=3, num_cams=2, per_cam=2, height=32, width=16, seed=1)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    names = sorted(p.name for p in (root / "bounding_box_test").iterdir())
    assert sum(n.startswith("-1_") for n in names) == 2 and sum(n.startswith("0000_") for n in names) == 2
    tr_paths, tr_ids, tr_cams = reid.list_split(root / "bounding_box_train", keep_distractors=False)
    assert len(tr_paths) == 12 and set(tr_ids) == {1, 2, 3} and set(tr_cams) == {1, 2}
    q_paths, q_ids, q_cams = reid.list_split(root / "query", keep_distractors=False)
    assert len(q_paths) == 6 and set(q_ids) == {4, 5, 6}  # one query per (test id, camera)
    g_paths, g_ids, _ = reid.list_split(root / "bounding_box_test", keep_distractors=True)
    assert len(g_paths) == 8 and -1 not in g_ids and int(np.sum(g_ids == 0)) == 2  # junk out, distractors in
    with Image.open(q_paths[0]) as im:
        x = reid.Transform(32, 16, train=False)(im.convert("RGB"))
    assert tuple(x.shape) == (3, 32, 16) and x.dtype == torch.float32
    # rewriting a toy folder leaves nothing stale; a folder of other images is refused and left alone
    reid.make_toy(root, num_ids=2, num_cams=2, per_cam=2, height=32, width=16)
    assert len(list((root / "bounding_box_train").iterdir())) == 8
    other = tmp_path / "market" / "query"
    other.mkdir(parents=True)
    (other / "0001_c1s1_000151_01.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not made by make_toy"):
        reid.make_toy(tmp_path / "market")
    assert [p.name for p in other.iterdir()] == ["0001_c1s1_000151_01.jpg"]
    with pytest.raises(ValueError, match="per_cam"):
        reid.make_toy(tmp_path / "bad", per_cam=1)


def test_reid_example_trains_evaluates_and_saves(reid, tmp_path, capsys):
    ckpt = tmp_path / "reid.pt"
    argv = ["--make-toy", str(tmp_path / "toy"), "--toy-ids", "6", "--height", "64", "--width", "32"]
    argv += ["--epochs", "1", "--batch-size", "12", "--num-instances", "3", "--max-steps", "3"]
    argv += ["--k-nearest", "4", "--threads", "1", "--seed", "0", "--no-progress", "--save", str(ckpt)]
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            result = reid.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    m = re.search(r"rank-1 (\S+)\s+rank-5 (\S+)\s+rank-10 (\S+)\s+mAP (\S+)", out)
    assert m, out
    printed = [float(v) for v in m.groups()]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in printed), printed
    assert printed[0] <= printed[1] <= printed[2]
    assert printed[0] == pytest.approx(result["rank1"], abs=5e-5)
    assert printed[3] == pytest.approx(result["mAP"], abs=5e-5)
    assert result["steps"] == 3 and result["num_valid_queries"] == 12
    assert "maps [128, 4, 2]" in out and "epoch 1/1: loss" in out

    # the checkpoint reloads (weights only) into a backbone + loss that reproduce the reported ranking
    net, criterion, meta = reid.load_checkpoint(ckpt)
    assert meta["height"] == 64 and meta["width"] == 32 and meta["train_ids"] == list(range(1, 7))
    assert meta["metrics"]["mAP"] == pytest.approx(result["mAP"])
    assert criterion.config["num_classes"] == 6 and criterion.config["k_nearest"] == 4
    ImageList, tf = reid.ImageList, reid.Transform(64, 32, train=False)
    splits = [
        reid.list_split(tmp_path / "toy" / s, keep_distractors=s != "query")
        for s in ("query", "bounding_box_test")
    ]
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        try:
            feats = [reid.extract(net, ImageList(p, i, tf), 16, progress=False) for p, i, _ in splits]
        finally:
            torch.set_num_threads(threads)
    scores = criterion.match(*feats).numpy()
    r = metrics.cmc_map(scores, splits[0][1], splits[1][1], splits[0][2], splits[1][2])
    assert r.rank(1) == pytest.approx(result["rank1"]) and r.mAP == pytest.approx(result["mAP"], abs=1e-6)


def test_fallback_resnet_matches_torchvision(reid):
    """The file's own ResNet-50 (used where torchvision cannot be imported) has torchvision's parameters."""
    tv, why = reid._torchvision()
    if tv is None:
        pytest.skip(f"torchvision cannot be imported here: {why.splitlines()[0]}")
    ref = tv.models.resnet50(weights=None)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    got = {k: tuple(v.shape) for k, v in reid._resnet50_to_layer3().state_dict().items()}
    assert got == want
