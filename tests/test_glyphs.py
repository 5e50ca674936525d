"""qaconv_gs.glyphs: real glyph images from Debian's Korean fonts (skips without the fonts or Pillow)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from qaconv_gs import glyphs

pytest.importorskip("PIL", reason="Pillow is not installed (pip install 'qaconv-gs[fonts]')")
_FONTS = {os.path.splitext(os.path.basename(p))[0] for p in glyphs.korean_font_files()}
needs_fonts = pytest.mark.skipif(
    not {"NanumGothic", "NanumPen", "UnBatang"} <= _FONTS,
    reason="Korean fonts not installed (apt-get install " + " ".join(glyphs.DEBIAN_PACKAGES) + ")",
)
CHARS = [chr(c) for c in range(0xAC00, 0xAC00 + 40)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QG_CACHE", str(tmp_path / "cache"))


def test_hangul_syllables():
    s = glyphs.hangul_syllables()
    assert len(s) == 11172 and s[0] == "\uac00" and s[-1] == "\ud7a3"


@needs_fonts
def test_font_glyphs_shapes_and_content():
    g = glyphs.font_glyphs(fonts=["NanumGothic", "NanumPen", "UnBatang"], chars=CHARS, size=24)
    assert g.images.shape == (3, 40, 24, 24) and g.images.dtype == np.uint8
    assert g.chars == CHARS and g.fonts == ["NanumGothic", "NanumPen", "UnBatang"]
    ink = g.images.reshape(3, 40, -1)
    assert (ink.max(axis=2) > 128).all()  # every glyph has ink
    # distinct syllables give distinct images in every font, and fonts differ from each other
    for f in range(3):
        assert len({ink[f, c].tobytes() for c in range(40)}) == 40
    assert not np.array_equal(g.images[0], g.images[1])
    # centred by the ink box: the ink's bounding box centre is within a pixel of the canvas centre
    ys, xs = np.nonzero(g.images[0, 0])
    assert abs((ys.min() + ys.max()) / 2 - 11.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 11.5) <= 1


@needs_fonts
def test_tofu_is_dropped_for_every_font():
    # U+E000 (private use) and U+0378 (unassigned) are drawn by no Korean font: as blank or the .notdef box
    chars = CHARS[:5] + ["\ue000", "\u0378"]
    g = glyphs.font_glyphs(fonts=["NanumGothic", "UnBatang"], chars=chars, size=24)
    assert g.chars == CHARS[:5]
    r = glyphs._Renderer(glyphs.korean_font_files()[0], 24)
    assert not r.draws(r._mask("\u0378"))


@needs_fonts
def test_cache_round_trip(monkeypatch):
    a = glyphs.font_glyphs(fonts=["NanumGothic", "NanumPen"], chars=CHARS, size=16)
    files = os.listdir(os.environ["QG_CACHE"])
    assert len(files) == 1 and files[0].endswith(".npz")

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(glyphs, "_render", no_render)
    b = glyphs.font_glyphs(fonts=["NanumGothic", "NanumPen"], chars=CHARS, size=16)
    assert np.array_equal(a.images, b.images) and a.chars == b.chars and a.fonts == b.fonts
    # a damaged cache file is rendered again, not trusted
    path = os.path.join(os.environ["QG_CACHE"], files[0])
    with open(path, "wb") as fh:
        fh.write(b"not an npz")
    monkeypatch.undo()
    monkeypatch.setenv("QG_CACHE", os.path.dirname(path))
    c = glyphs.font_glyphs(fonts=["NanumGothic", "NanumPen"], chars=CHARS, size=16)
    assert np.array_equal(a.images, c.images)


@needs_fonts
def test_class_subset_is_seeded_and_sorted():
    a = glyphs.font_glyphs(5, fonts=["NanumGothic", "NanumPen"], chars=CHARS, size=16, seed=3)
    b = glyphs.font_glyphs(5, fonts=["NanumGothic", "NanumPen"], chars=CHARS, size=16, seed=3)
    c = glyphs.font_glyphs(5, fonts=["NanumGothic", "NanumPen"], chars=CHARS, size=16, seed=4)
    assert a.chars == b.chars and a.chars != c.chars and a.chars == sorted(a.chars)
    assert a.images.shape == (2, 5, 16, 16)


@needs_fonts
def test_samples_layout():
    g = glyphs.font_glyphs(fonts=["NanumGothic", "NanumPen", "UnBatang"], chars=CHARS[:4], size=16)
    x, y, f = g.samples([2, 0])
    assert x.shape == (8, 1, 16, 16) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and f.tolist() == [2, 2, 2, 2, 0, 0, 0, 0]
    assert np.array_equal(x[5, 0], g.images[0, 1] / np.float32(255.0))


def test_split_holds_out_whole_families():
    names = [
        "NanumGothic",
        "NanumMyeongjo",
        "NanumMyeongjoBold",
        "NanumPen",
        "UnDotum",
        "UnDotumBold",
        "UnBatang",
    ]
    g = glyphs.FontGlyphs(np.zeros((len(names), 2, 8, 8), np.uint8), ["a", "b"], names, names)
    sp = glyphs.glyph_split(g)
    assert [names[i] for i in sp.train] == ["NanumGothic", "UnBatang"]
    assert names[sp.gallery] == "NanumMyeongjo"
    assert [names[i] for i in sp.probes] == ["NanumPen", "UnDotum", "UnDotumBold"]
    assert sp.held_out == (sp.gallery,) + sp.probes
    with pytest.raises(ValueError, match="gallery font"):
        glyphs.glyph_split(glyphs.FontGlyphs(np.zeros((1, 2, 8, 8), np.uint8), ["a", "b"], ["X"], ["X"]))


@needs_fonts
def test_bad_input():
    with pytest.raises(FileNotFoundError, match="NoSuchFont"):
        glyphs.font_glyphs(fonts=["NoSuchFont"], chars=CHARS)
    with pytest.raises(ValueError, match="single characters"):
        glyphs.font_glyphs(fonts=["NanumGothic"], chars=["ab"])
    with pytest.raises(ValueError, match="num_classes"):
        glyphs.font_glyphs(100, fonts=["NanumGothic"], chars=CHARS)
    with pytest.raises(ValueError, match="size"):
        glyphs.font_glyphs(fonts=["NanumGothic"], chars=CHARS, size=4)


def test_missing_fonts_message(monkeypatch):
    monkeypatch.setattr(glyphs, "korean_font_files", lambda dirs=glyphs.FONT_DIRS: [])
    with pytest.raises(FileNotFoundError, match="fonts-nanum"):
        glyphs.font_glyphs(chars=CHARS)
