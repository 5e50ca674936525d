"""Real images that install offline: Hangul syllables drawn from the Korean typefaces Debian ships.

Classes are syllables (U+AC00..U+D7A3, 11,172 of them), samples are typefaces: a glyph of one syllable in
another font is a new image of the same identity, with real style variation (serif / sans / rounded /
handwriting / brush, weights from ultra-light to extra-bold). A font that does not draw a syllable is
detected by its rendering (blank, or the font's own ``.notdef`` box) and that syllable is dropped for every
font, so no sample is tofu.

The benchmark protocol (``glyph_split``) holds out whole font *families*, never single weights, so that no
held-out image has a near-copy in training: a printed serif family (NanumMyeongjo; its regular weight is the
retrieval gallery), a printed sans family (UnDotum) and three handwriting / brush families (NanumPen,
NanumBrush, UnPilgi).

Pillow is an optional dependency (``pip install qaconv-gs[fonts]``); renders are cached as .npz under
``$QG_CACHE`` or ``$XDG_CACHE_HOME/qaconv_gs`` (default ``~/.cache/qaconv_gs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._validate import check_int

__all__ = [
    "FONT_DIRS",
    "FontGlyphs",
    "GlyphSplit",
    "font_glyphs",
    "glyph_split",
    "hangul_syllables",
    "korean_font_files",
    "random_conv_features",
]

# Debian's packages: fonts-nanum, fonts-nanum-extra, fonts-nanum-eco, fonts-unfonts-core, fonts-unfonts-extra,
# fonts-baekmuk, fonts-alee, fonts-lexi-gulim, fonts-lexi-saebom.
FONT_DIRS = tuple(
    f"/usr/share/fonts/truetype/{d}"
    for d in ("nanum", "unfonts-core", "unfonts-extra", "baekmuk", "alee", "lexi")
)
DEBIAN_PACKAGES = (
    "fonts-nanum",
    "fonts-nanum-extra",
    "fonts-nanum-eco",
    "fonts-unfonts-core",
    "fonts-unfonts-extra",
    "fonts-baekmuk",
    "fonts-alee",
    "fonts-lexi-gulim",
    "fonts-lexi-saebom",
)
_HANGUL_FIRST, _HANGUL_LAST = 0xAC00, 0xD7A3
# Held-out families of the benchmark protocol (file-name prefixes). The gallery font is one file of the first.
GALLERY_FONT = "NanumMyeongjo"
HELD_OUT_FAMILIES = ("NanumMyeongjo", "UnDotum", "NanumPen", "NanumBrush", "UnPilgi")
_CACHE_VERSION = 1
_MIN_COVERAGE = 0.5  # default font list: fonts drawing less than this share of the syllables are left out
# Left out of the default list: the Eco fonts are NanumGothic / NanumMyeongjo with holes punched in the
# strokes (near-copies of fonts in the list, and at small sizes FreeType fills some of them into boxes); the
# YetHangul fonts draw the modern syllables exactly as their base fonts.
_DEFAULT_EXCLUDE = ("Eco", "YetHangul")


def hangul_syllables() -> list[str]:
    """The 11,172 precomposed Hangul syllables, in code-point order."""
    return [chr(c) for c in range(_HANGUL_FIRST, _HANGUL_LAST + 1)]


def korean_font_files(dirs: Sequence[str] = FONT_DIRS) -> list[str]:
    """The .ttf / .otf files under `dirs` (the Debian packages' folders), sorted by file name."""
    out = []
    for d in dirs:
        if os.path.isdir(d):
            out += [os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith((".ttf", ".otf"))]
    return sorted(out, key=lambda p: (os.path.basename(p).lower(), p))


def _font_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _require_pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ImportError(
            "font_glyphs needs Pillow: pip install 'qaconv-gs[fonts]' (or pip install pillow)"
        ) from None
    return Image, ImageDraw, ImageFont


class _Renderer:
    """Draws one font's glyphs centred (by their ink box) on a size x size canvas, white ink on black.

    A glyph keeps the font's own scale (a style trait) unless its ink box would not fit, then it is shrunk."""

    def __init__(self, path: str, size: int) -> None:
        Image, ImageDraw, ImageFont = _require_pillow()
        self._Image = Image
        self.size = size
        self.font = ImageFont.truetype(path, max(4, int(round(size * 0.8))))
        self._notdef = self._mask("\uffff")

    def _mask(self, ch: str) -> np.ndarray:
        m = self.font.getmask(ch, mode="L")
        return np.asarray(m, dtype=np.uint8).reshape(m.size[1], m.size[0])

    def draws(self, mask: np.ndarray) -> bool:
        if mask.size == 0 or int(mask.max()) == 0:
            return False
        return not (mask.shape == self._notdef.shape and np.array_equal(mask, self._notdef))

    def place(self, mask: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(mask)
        ink = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        h, w = ink.shape
        n = self.size
        if h > n or w > n:
            f = n / max(h, w)
            img = self._Image.fromarray(ink).resize(
                (max(1, round(w * f)), max(1, round(h * f))), self._Image.BILINEAR
            )
            ink = np.asarray(img, dtype=np.uint8)
            h, w = ink.shape
        out = np.zeros((n, n), dtype=np.uint8)
        top, left = (n - h) // 2, (n - w) // 2
        out[top : top + h, left : left + w] = ink
        return out


@dataclass(repr=False)
class FontGlyphs:
    """Glyph images of `chars` (classes) in `fonts` (samples).

    Attributes:
        images: [F, N, size, size] uint8, ink 255 on 0; images[f, c] is chars[c] drawn in fonts[f].
        chars: the N characters (class c = chars[c]).
        fonts: the F font names (file stems, e.g. "NanumPen").
        paths: the F font files.
    """

    images: np.ndarray
    chars: list
    fonts: list
    paths: list

    @property
    def num_classes(self) -> int:
        return len(self.chars)

    def samples(self, font_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The glyphs of `font_ids` (default all) as a flat set: (images [n, 1, size, size] float32 in [0, 1],
        labels [n] int64 class ids, font ids [n] int64), font-major (all of one font, then the next)."""
        ids = np.arange(len(self.fonts)) if font_ids is None else np.asarray(font_ids, dtype=np.int64)
        imgs = self.images[ids].astype(np.float32) / np.float32(255.0)
        n_cls = self.num_classes
        x = imgs.reshape(-1, 1, imgs.shape[-2], imgs.shape[-1])
        labels = np.tile(np.arange(n_cls, dtype=np.int64), ids.size)
        fonts = np.repeat(ids, n_cls)
        return x, labels, fonts

    def __repr__(self) -> str:
        F, N, s, _ = self.images.shape
        return f"FontGlyphs({N} classes x {F} fonts, {s}x{s} px)"


@dataclass(frozen=True)
class GlyphSplit:
    """Font indices of the benchmark protocol (see the module docstring).

    train: fonts to train on; gallery: the one held-out printed font used as the retrieval gallery;
    probes: the other held-out fonts (not of the gallery's family); held_out: gallery + probes."""

    train: tuple
    gallery: int
    probes: tuple

    @property
    def held_out(self) -> tuple:
        return (self.gallery,) + self.probes


def glyph_split(glyphs: FontGlyphs) -> GlyphSplit:
    """The benchmark's font split of `glyphs`: the families in HELD_OUT_FAMILIES are held out (the other
    weights of the gallery's family are used nowhere), everything else trains."""
    names = list(glyphs.fonts)
    if GALLERY_FONT not in names:
        raise ValueError(f"glyphs: the gallery font {GALLERY_FONT!r} is not among the fonts {names}")
    gallery = names.index(GALLERY_FONT)
    train, probes = [], []
    for i, name in enumerate(names):
        family = next((f for f in HELD_OUT_FAMILIES if name.startswith(f)), None)
        if family is None:
            train.append(i)
        elif family != HELD_OUT_FAMILIES[0]:
            probes.append(i)
    if not probes or not train:
        raise ValueError(
            f"glyphs: the split needs training fonts and held-out probe fonts, got fonts {names}"
        )
    return GlyphSplit(tuple(train), gallery, tuple(probes))


def _cache_dir() -> str:
    if os.environ.get("QG_CACHE"):
        return os.environ["QG_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qaconv_gs")


def _cache_key(paths: Sequence[str], chars: Sequence[str], size: int, min_coverage: float | None) -> str:
    files = []
    for p in paths:
        st = os.stat(p)
        files.append([os.path.abspath(p), st.st_size, int(st.st_mtime)])
    blob = json.dumps([_CACHE_VERSION, files, "".join(chars), size, min_coverage]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _render(paths: Sequence[str], chars: Sequence[str], size: int, min_coverage: float | None):
    n = len(chars)
    for p in paths:
        r = _Renderer(p, size)
        drawn = np.zeros(n, dtype=bool)
        imgs = np.zeros((n, size, size), dtype=np.uint8)
        for i, ch in enumerate(chars):
            m = r._mask(ch)
            if r.draws(m):
                drawn[i] = True
                imgs[i] = r.place(m)
        if min_coverage is not None and drawn.mean() < min_coverage:
            continue  # default list only: a font drawing few of the syllables would shrink every class set
        yield p, drawn, imgs


def font_glyphs(
    num_classes: int | None = None,
    *,
    size: int = 32,
    fonts: Sequence[str] | None = None,
    chars: Sequence[str] | None = None,
    seed: int = 0,
    cache: bool = True,
) -> FontGlyphs:
    """Glyph images of Hangul syllables (classes) drawn in Korean typefaces (samples), cached.

    Args:
        num_classes: how many syllables to keep (a random subset, fixed by `seed`, in code-point order);
            None keeps every syllable that all the fonts draw.
        size: image side in pixels (glyphs drawn at 0.8 x size px, centred by their ink box).
        fonts: font files (or names of files under FONT_DIRS, e.g. "NanumPen"); None = every font under
            FONT_DIRS that draws at least half of the syllables, except the Eco and YetHangul variants
            (near-copies of other fonts in the list).
        chars: the candidate characters; None = the 11,172 Hangul syllables.
        seed: seed of the class subset.
        cache: read / write the renders under the cache folder.

    Returns:
        FontGlyphs over the characters every chosen font draws (by rendering: blank or .notdef = not drawn),
        with fonts whose renders duplicate an earlier font's (same glyphs) removed.

    Raises:
        FileNotFoundError: no font files (install the Debian packages in DEBIAN_PACKAGES).
        ImportError: Pillow is missing.
    """
    size = check_int(size, "size", lo=8, hi=512)
    seed = check_int(seed, "seed", lo=0)
    cand = hangul_syllables() if chars is None else [str(c) for c in chars]
    if not cand or any(len(c) != 1 for c in cand):
        raise ValueError("chars: expected a non-empty sequence of single characters")
    available = korean_font_files()
    if fonts is None:
        paths = [p for p in available if not any(x in _font_name(p) for x in _DEFAULT_EXCLUDE)]
        min_cov = _MIN_COVERAGE
        if not paths:
            raise FileNotFoundError(
                f"no Korean fonts under {list(FONT_DIRS)}; install the Debian packages "
                f"{' '.join(DEBIAN_PACKAGES)}"
            )
    else:
        by_name = {_font_name(p): p for p in available}
        paths, min_cov = [], None
        for f in fonts:
            f = os.fspath(f)
            p = f if os.path.isfile(f) else by_name.get(f)
            if p is None:
                raise FileNotFoundError(
                    f"fonts: {f!r} is neither a font file nor a font under {list(FONT_DIRS)}"
                )
            paths.append(p)
        if not paths:
            raise ValueError("fonts: expected at least one font")

    n = None if num_classes is None else check_int(num_classes, "num_classes", lo=2)
    if n is not None and n <= len(cand):
        # Fast path: draw only the chosen syllables (the same choice as from the full set whenever every
        # font draws every candidate, as Debian's default list does for all 11,172 syllables).
        pick = np.sort(np.random.default_rng(seed).choice(len(cand), size=n, replace=False))
        sub = [cand[i] for i in pick]
        images, drawn, kept = _load_or_render(paths, sub, size, min_cov, cache)
        if drawn.all():
            return _assemble(images, np.arange(n), kept, sub)
    images, drawn, kept = _load_or_render(paths, cand, size, min_cov, cache)
    common = np.flatnonzero(drawn.all(axis=0))
    if n is not None:
        if n > common.size:
            raise ValueError(f"num_classes: expected <= {common.size} (syllables every font draws), got {n}")
        common = np.sort(np.random.default_rng(seed).choice(common, size=n, replace=False))
    return _assemble(images, common, kept, cand)


def _load_or_render(
    paths: Sequence[str], chars: Sequence[str], size: int, min_cov: float | None, cache: bool
) -> tuple[np.ndarray, np.ndarray, list]:
    """(images [F, n, size, size], drawn [F, n] bool, font paths) of `chars`, from the cache or drawn."""
    key = _cache_key(paths, chars, size, min_cov)
    cache_file = os.path.join(_cache_dir(), f"glyphs-{key}.npz")
    data = None
    if cache and os.path.isfile(cache_file):
        try:
            with np.load(cache_file) as z:
                data = {k: z[k] for k in ("images", "drawn", "paths")}
        except (OSError, ValueError, KeyError):
            data = None  # a damaged cache file is drawn again
    if data is None:
        rendered = list(_render(paths, chars, size, min_cov))
        if not rendered:
            raise ValueError("fonts: none of the fonts draws enough of the characters")
        data = {
            "images": np.stack([r[2] for r in rendered]),
            "drawn": np.stack([r[1] for r in rendered]),
            "paths": np.array([r[0] for r in rendered]),
        }
        if cache:
            os.makedirs(_cache_dir(), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=_cache_dir(), suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **data)
            os.replace(tmp, cache_file)
    return data["images"], data["drawn"], [str(p) for p in data["paths"]]


def _assemble(images: np.ndarray, classes: np.ndarray, kept: list, chars: Sequence[str]) -> FontGlyphs:
    """FontGlyphs of the columns `classes` (drawn by every font), without fonts that duplicate an earlier
    font's glyphs (e.g. one font shipped under two names would put copies of a sample on both sides of a
    split)."""
    probe = images[:, classes[:64]].reshape(len(kept), -1)
    keep_font = [i for i in range(len(kept)) if not any(np.array_equal(probe[i], probe[j]) for j in range(i))]
    return FontGlyphs(
        images=np.ascontiguousarray(images[np.ix_(keep_font, classes)]),
        chars=[chars[i] for i in classes],
        fonts=[_font_name(kept[i]) for i in keep_font],
        paths=[kept[i] for i in keep_font],
    )


def random_conv_features(
    images: np.ndarray, channels: int = 32, seed: int = 0, batch: int = 1024
) -> np.ndarray:
    """Feature maps from a fixed, untrained CNN in NumPy: conv3x3 -> ReLU -> max-pool 2, twice, then a
    conv3x3 (He-initialised random weights from `seed`, no training, no deep-learning framework).

    The quickest real-image feature maps for trying the package (the demo, the tests): images [n, 1, H, W]
    (H, W divisible by 4) -> [n, channels, H / 4, W / 4] float32. Deterministic for a seed.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % 4 or x.shape[3] % 4:
        raise ValueError(f"images: expected [n, 1, H, W] with H, W divisible by 4, got {x.shape}")
    channels = check_int(channels, "channels", lo=1)
    rng = np.random.default_rng(check_int(seed, "seed", lo=0))
    shapes = [(1, channels), (channels, channels), (channels, channels)]
    weights = [
        (rng.standard_normal((cin * 9, cout)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        for cin, cout in shapes
    ]

    def conv(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        """a [n, h, w, c] -> [n, h, w, cout], 3x3, zero padding 1 (w's rows in (c, dy, dx) order)."""
        p = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2))  # [n, h, w, c, 3, 3]
        n, h, wd = a.shape[:3]
        return (cols.reshape(n * h * wd, -1) @ w).reshape(n, h, wd, -1)

    def pool(a: np.ndarray) -> np.ndarray:
        n, h, wd, c = a.shape
        return a.reshape(n, h // 2, 2, wd // 2, 2, c).max(axis=(2, 4))

    out = []
    for s in range(0, x.shape[0], batch):
        a = x[s : s + batch].transpose(0, 2, 3, 1)
        a = pool(np.maximum(conv(a, weights[0]), 0))
        a = pool(np.maximum(conv(a, weights[1]), 0))
        out.append(conv(a, weights[2]).transpose(0, 3, 1, 2))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
