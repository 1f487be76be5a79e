"""Styled digits: the offline digits under image styles the offline backbone never saw.

The offline backbone classifies clean digits at ~98% zero-shot, so prompt learning on
them has nothing left to show. Here each client's images (train and test alike) are
seen through one style, as if every organisation scanned with its own device: strokes
thickened or eroded, blurred, noisy, low in contrast. The images are the digits'
*federated* pool, so they stay disjoint from the backbone's pretraining images; only
the pixels change, which the feature cache sees through the image set's fingerprint.

Styles act on one grayscale ``uint8`` image ``(H, W)`` and are pure functions of it
(the noise is seeded by the image's bytes), so a styled feature is reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpfpl_app.data.glyphs import DOMAIN_NAMES

Style = Callable[[np.ndarray], np.ndarray]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _thick(image: np.ndarray) -> np.ndarray:
    """2x2 grey dilation: an 8x8 digit's strokes twice as thick."""
    from scipy import ndimage  # here: the config validator imports this module

    return ndimage.grey_dilation(image, size=2)


def _thin(image: np.ndarray) -> np.ndarray:
    """2x2 grey erosion: an 8x8 digit's thin strokes half gone."""
    from scipy import ndimage

    return ndimage.grey_erosion(image, size=2)


def _blur(image: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return _to_uint8(ndimage.gaussian_filter(image.astype(np.float64), 1.0))


def _noise(image: np.ndarray) -> np.ndarray:
    """Gaussian noise of std 80 grey levels, seeded by the image itself."""
    seed = int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little")
    noise = np.random.default_rng(seed).normal(0.0, 80.0, image.shape)
    return _to_uint8(image.astype(np.float64) + noise)


def _low_contrast(image: np.ndarray) -> np.ndarray:
    return _to_uint8(image.astype(np.float64) * 0.35 + 80.0)


def _invert(image: np.ndarray) -> np.ndarray:
    """Dark strokes on a light ground: a negative scan."""
    return 255 - image


def _rotate(image: np.ndarray) -> np.ndarray:
    """A quarter turn: a scanner that feeds the page sideways."""
    return np.ascontiguousarray(np.rot90(image))


STYLES: dict[str, Style] = {
    "thick": _thick,
    "thin": _thin,
    "blur": _blur,
    "noise": _noise,
    "low-contrast": _low_contrast,
    "invert": _invert,
    "rotate": _rotate,
}
"""Style name -> transform; a name is part of the feature-cache key of styled images."""


@dataclass(frozen=True)
class StyledDataset:
    """An offline dataset whose clients each see it through one style.

    Client ``i`` gets ``styles[i % len(styles)]``: with 10 clients and 5 styles, two
    clients (with different classes) share each style.
    """

    base: str
    styles: tuple[str, ...]
    split_by_domain: bool = False  # classes split within each style's clients

    def style_of(self, partition_id: int) -> str:
        return self.styles[partition_id % len(self.styles)]


STYLED_DATASETS: dict[str, StyledDataset] = {
    "styled-digits": StyledDataset(
        base="digits", styles=("thick", "thin", "blur", "noise", "low-contrast")
    ),
    # SecFPP's benchmark: three domains, clients i, i+3, i+6, ... share one
    "domain-digits": StyledDataset(
        base="digits", styles=("blur", "invert", "rotate"), split_by_domain=True
    ),
    # the many-class testbed: 100 glyph classes, client i drawn in font domain i % 6
    "font-glyphs": StyledDataset(base="glyphs", styles=DOMAIN_NAMES),
    # SecFPP's many-class benchmark: classes split within each font domain's clients
    "domain-glyphs": StyledDataset(base="glyphs", styles=DOMAIN_NAMES, split_by_domain=True),
}
"""Styled dataset names (run-config ``dataset``) -> base offline dataset and styles."""


def apply_style(name: str, images: np.ndarray) -> np.ndarray:
    """``images`` (N, H, W) uint8 through style ``name``; the input is not modified."""
    if name not in STYLES:
        raise ValueError(f"unknown image style {name!r}; known styles: {sorted(STYLES)}")
    style = STYLES[name]
    return np.stack([style(img) for img in images]) if len(images) else images.copy()
