"""A 100-class, multi-domain image testbed rendered offline from Debian's font packages.

The ten-class testbeds cannot run the paper's split (about ten classes per client) and let a
one-class-per-client prompt win by answering "my class". This one has 100 classes, each a
character whose Unicode name is its class name (Latin, Greek and Cyrillic letters, digits,
a few signs), and two kinds of font:

* **pretraining fonts**, plain renderings the offline CLIP learns from (captions carry the
  class names, so the text tower can address every class);
* **domains**, font-and-rendering pairs the backbone never saw (a calligraphic italic, a
  geometric bold, an outlined typewriter, white-on-black Bookman, a noisy Concrete, an
  old-style Garamond). A client lives in one domain: zero-shot transfer to it is imperfect
  but the frozen features still separate the classes, which leaves prompt learning room.

Every image is a pure function of (font, rendering, class, variation index, seed): the
random pose (scale, rotation, shift, stroke) is drawn from a generator seeded with those
integers, so any subset renders identically in any order, on any node, without a cache.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dpfpl_app.data.data_sources import ImageSet
    from dpfpl_app.data.offline_data import LabelledImages

IMAGE_SIDE = 32
"""Side of a rendered image: the glyph backbone's input size."""

_CANVAS = 96
"""Glyphs are drawn and posed at 3x the output size, then downsampled (anti-aliased)."""

FONT_DIRS: tuple[Path, ...] = (Path("/usr/share/fonts"), Path("/usr/share/texmf/fonts"))
"""Where Debian installs fonts; a font is looked up by file name below these."""

FONT_PACKAGES = ("fonts-dejavu-core", "fonts-liberation2", "fonts-freefont-ttf",
                 "fonts-urw-base35", "fonts-cmu", "fonts-ebgaramond")
"""The Debian packages that ship every font below (``apt-get install`` them)."""

_CHARACTERS = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    # lower-case letters whose shape is not a scaled capital (c, o, s, v, w, x, z, p) nor an
    # upright stroke (l): after scale jitter those could not be told apart from the image
    "abdefghijkmnqrtuy"
    "23456789"  # 0 and 1 look like O and I
    "ΓΔΘΛΞΠΣΦΨΩ"  # Greek capitals not shaped like a Latin one
    "αβγδεζηθλμξπρστφχψω"
    "БДЖЗИЛЦЧШЩЪЫЬЭЮЯ"  # Cyrillic capitals not shaped like a Latin or Greek one
    "&@?§"
)

GLYPH_CLASS_NAMES: tuple[str, ...] = tuple(
    unicodedata.name(char).lower().replace("latin ", "").replace(" letter", "")
    for char in _CHARACTERS
)
"""Class names: Unicode names, shortened ("capital a", "greek small alpha", "digit two")."""

GLYPH_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of the character {}.",
    "the symbol {}, printed.",
    "a rendering of the {} glyph.",
    "a photo of a {}.",
    "typeset {} in a font.",
    "the {} character on a page.",
    "a {}.",
)
"""Pretraining captions; the first is the zero-shot template."""


@dataclass(frozen=True)
class GlyphStyle:
    """A font file and how it is rendered: one pretraining font or one client domain."""

    name: str
    font_file: str
    rendering: str = "plain"  # plain | noisy | varied (random stroke width and noise)


PRETRAIN_FONTS: tuple[GlyphStyle, ...] = tuple(
    GlyphStyle(name, file, "varied") for name, file in (
        ("dejavu-sans", "DejaVuSans.ttf"),
        ("dejavu-serif", "DejaVuSerif.ttf"),
        ("dejavu-mono", "DejaVuSansMono.ttf"),
        ("liberation-sans", "LiberationSans-Regular.ttf"),
        ("liberation-serif", "LiberationSerif-Regular.ttf"),
        ("freesans", "FreeSans.ttf"),
        ("freeserif", "FreeSerif.ttf"),
        ("freemono", "FreeMono.ttf"),
    )
)
"""What the offline backbone learns from, each image with a random stroke and a little noise
(so that its features carry the character, not one font's stroke width)."""

DOMAINS: tuple[GlyphStyle, ...] = (
    GlyphStyle("garamond", "EBGaramond12-Regular.otf"),
    GlyphStyle("gothic", "URWGothic-Book.otf"),
    GlyphStyle("typewriter", "cmuntt.ttf"),
    GlyphStyle("bookman-demi", "URWBookman-Demi.otf"),
    GlyphStyle("concrete-noisy", "cmunorm.ttf", "noisy"),
    GlyphStyle("chancery", "Z003-MediumItalic.otf"),
)
"""Client domains: fonts the backbone never saw (one of them noisier than it ever saw)."""

DOMAIN_NAMES: tuple[str, ...] = tuple(style.name for style in DOMAINS)


def font_path(file_name: str) -> Path:
    """The installed font file ``file_name``, or an error naming the packages to install."""
    for root in FONT_DIRS:
        found = sorted(root.rglob(file_name)) if root.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(
        f"font {file_name!r} is not installed (looked under {', '.join(map(str, FONT_DIRS))}); "
        f"the glyph testbed needs Debian's {' '.join(FONT_PACKAGES)}: "
        f"apt-get install {' '.join(FONT_PACKAGES)}")


@lru_cache(maxsize=32)
def _font(file_name: str):  # noqa: ANN202 - PIL's FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path(file_name)), size=_CANVAS * 2 // 3)


def font_digest(styles: Sequence[GlyphStyle]) -> str:
    """SHA-256 over the font files' bytes: a different font version renders other images."""
    digest = hashlib.sha256()
    for style in styles:
        digest.update(style.name.encode() + b"|" + font_path(style.font_file).read_bytes())
    return digest.hexdigest()


def render(style: GlyphStyle, label: int, variation: int, *, seed: int) -> np.ndarray:
    """Character ``label`` in ``style``, posed by variation ``variation``: ``uint8 (32, 32)``.

    White ink on black (as the other offline datasets); ``inverted`` swaps them.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, label, variation, *style.name.encode()])
    font = _font(style.font_file)
    char = _CHARACTERS[label]
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    left, top, right, bottom = font.getbbox(char)
    origin = ((_CANVAS - (right - left)) / 2 - left, (_CANVAS - (bottom - top)) / 2 - top)
    ImageDraw.Draw(canvas).text(origin, char, fill=255, font=font)
    # pose: scale to a jittered share of the canvas, rotate, shift
    scale = rng.uniform(0.75, 1.0) * 0.8 * _CANVAS / max(right - left, bottom - top, 1)
    angle = np.deg2rad(rng.uniform(-12, 12))
    shift = rng.uniform(-0.08, 0.08, size=2) * _CANVAS
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    centre = _CANVAS / 2
    # inverse map: output (x, y) -> input, about the centre
    matrix = (cos, sin, centre - cos * (centre + shift[0]) - sin * (centre + shift[1]),
              -sin, cos, centre + sin * (centre + shift[0]) - cos * (centre + shift[1]))
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, matrix,
                              resample=Image.Resampling.BILINEAR)
    noise = 0.0
    if style.rendering == "varied":
        stroke = rng.integers(-1, 2)  # thinner, as drawn, or bolder
        if stroke:
            canvas = canvas.filter(ImageFilter.MaxFilter(3) if stroke > 0
                                   else ImageFilter.MinFilter(3))
        noise = rng.uniform(0.0, 15.0)
    elif style.rendering == "noisy":
        noise = 35.0
    image = np.asarray(canvas.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS),
                       dtype=np.float64)
    if noise:
        image = image * 0.8 + np.abs(rng.normal(0.0, noise, size=image.shape))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_many(style: GlyphStyle, labels: np.ndarray, variations: np.ndarray, *,
                seed: int) -> np.ndarray:
    """``render`` over paired label and variation arrays: ``uint8 (N, 32, 32)``."""
    if len(labels) == 0:
        return np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    return np.stack([render(style, int(c), int(v), seed=seed)
                     for c, v in zip(labels, variations, strict=True)])


RENDER_VERSION = 1
"""Bumped whenever :func:`render` changes what it draws (recorded in backbone recipes)."""


@dataclass(frozen=True)
class GlyphDataset:
    """The glyph testbed as the backbone builder and the runs see it.

    The federated pool is ``len(class_names) * pool_variations`` rows (row ``r`` is class
    ``r // pool_variations``, variation ``r % pool_variations``); a client renders its rows
    in its own domain (:meth:`image_set` then ``ImageSet.styled(domain)``).
    """

    name: str = "glyphs"
    class_names: tuple[str, ...] = GLYPH_CLASS_NAMES
    caption_templates: tuple[str, ...] = GLYPH_CAPTION_TEMPLATES
    pretrain_fonts: tuple[GlyphStyle, ...] = PRETRAIN_FONTS
    domains: tuple[GlyphStyle, ...] = DOMAINS
    pretrain_variations: int = 24
    pool_variations: int = 80
    seed: int = 20_261_207

    def domain(self, name: str) -> GlyphStyle:
        for style in self.domains:
            if style.name == name:
                return style
        raise ValueError(f"unknown glyph domain {name!r}; known domains: {list(DOMAIN_NAMES)}")

    def pool_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, variations)`` of the federated pool's rows."""
        rows = np.arange(len(self.class_names) * self.pool_variations, dtype=np.int64)
        return rows // self.pool_variations, rows % self.pool_variations

    def pretrain_pool(self, directory: Path | None = None) -> LabelledImages:
        """Every class in every pretraining font, ``pretrain_variations`` poses each."""
        from dpfpl_app.data.offline_data import LabelledImages

        per_font = len(self.class_names) * self.pretrain_variations
        labels = np.arange(per_font, dtype=np.int64) // self.pretrain_variations
        variations = np.arange(per_font, dtype=np.int64) % self.pretrain_variations
        images = np.concatenate([render_many(font, labels, variations, seed=self.seed)
                                 for font in self.pretrain_fonts])
        return LabelledImages(images, np.tile(labels, len(self.pretrain_fonts)),
                              self.class_names, self.name)

    def domain_images(self, domain: str, rows: np.ndarray | None = None) -> LabelledImages:
        """Pool ``rows`` (all by default) rendered in ``domain``."""
        from dpfpl_app.data.offline_data import LabelledImages

        labels, variations = self.pool_rows()
        if rows is not None:
            labels, variations = labels[rows], variations[rows]
        images = render_many(self.domain(domain), labels, variations, seed=self.seed)
        return LabelledImages(images, labels.copy(), self.class_names, self.name)

    def federated_pool(self, directory: Path | None = None) -> LabelledImages:
        """The pool in every domain, one after the other (for whole-testbed statistics)."""
        from dpfpl_app.data.offline_data import LabelledImages

        parts = [self.domain_images(style.name) for style in self.domains]
        return LabelledImages(np.concatenate([p.images for p in parts]),
                              np.concatenate([p.labels for p in parts]),
                              self.class_names, self.name)

    def recipe(self) -> dict[str, object]:
        """What decides the images: fonts (their bytes), poses, seed, renderer version."""
        return {"fonts_sha256": font_digest(self.pretrain_fonts + self.domains),
                "pretrain_fonts": [f.name for f in self.pretrain_fonts],
                "domains": [d.name for d in self.domains],
                "pretrain_variations": self.pretrain_variations,
                "pool_variations": self.pool_variations, "seed": self.seed,
                "render_version": RENDER_VERSION}

    def provenance(self) -> dict[str, object]:
        return {**self.recipe(),
                "pretrain_count": len(self.class_names) * self.pretrain_variations
                * len(self.pretrain_fonts),
                "federated_count": len(self.class_names) * self.pool_variations}

    def zero_shot_sets(self, limit: int) -> dict[str, LabelledImages]:
        """An evenly spaced share of the pool in each domain: zero-shot is reported per domain."""
        rows = len(self.class_names) * self.pool_variations
        keep = np.unique(np.linspace(0, rows - 1, max(1, limit // len(self.domains)))
                         .astype(np.int64))
        return {style.name: self.domain_images(style.name, keep) for style in self.domains}

    def image_set(self, directory: Path | None = None) -> ImageSet:
        """The pool as an ``ImageSet`` rendered lazily: in the first domain, or ``styled(d)``."""
        from dpfpl_app.data.data_sources import ImageSet
        from dpfpl_app.data.image_processing import gray_to_rgb

        labels, variations = self.pool_rows()

        def reader_in(domain: str) -> Callable[[np.ndarray], list[np.ndarray]]:
            style = self.domain(domain)

            def read(rows: np.ndarray) -> list[np.ndarray]:
                images = render_many(style, labels[rows], variations[rows], seed=self.seed)
                return list(gray_to_rgb(images))

            return read

        fingerprint = hashlib.sha256(repr(sorted(self.recipe().items())).encode()).hexdigest()
        return ImageSet(labels=labels, class_names=self.class_names, name=self.name,
                        fingerprint=fingerprint, reader=reader_in(self.domains[0].name),
                        rows=np.arange(len(labels), dtype=np.int64), restyle=reader_in)


GLYPHS = GlyphDataset()
"""The glyph testbed (registered in ``offline_data.DATASETS`` as ``"glyphs"``)."""
