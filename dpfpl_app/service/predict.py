"""Using a released prompt: classify images with a frozen CLIP and a prompt file.

The user's side of prompt as a service. The prompt file names the backbone and the
class names; the classifier refuses a backbone whose weights or embedding width differ
from the ones the prompt was trained on, since a prompt is meaningless on other
weights (it would still produce confident-looking, wrong probabilities). Images are
read with PIL (any format PIL reads, RGB or grayscale) and preprocessed by the
backbone's own image processor, exactly as the federated features were.

A batch never stops at a bad input: an unreadable image or folder becomes a
:class:`Failure` in the output and the rest is still classified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.data.features import encode_pixels
from dpfpl_app.data.image_processing import rgb_to_pixel_values
from dpfpl_app.method.gradients import class_logits
from dpfpl_app.method.prompt_file import (
    PromptFile,
    PromptFileError,
    backbone_fingerprint,
    load_prompt_file,
)
from dpfpl_app.method.text_encoder import CoOpTextEncoder

logger = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An input could not be read as an image; the message names the file and the cause.

    ``reason`` is the cause alone, for outputs that already show the path next to it
    (a :class:`Failure`), so the path is printed once.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Failure:
    """An input that could not be classified, and why."""

    path: str
    error: str


class PromptClassifier:
    """A frozen CLIP plus a verified prompt file: class probabilities for images."""

    def __init__(self, prompt_file: PromptFile, clip: FrozenClip) -> None:
        meta = prompt_file.metadata
        if meta.text_width != clip.text_width:
            raise PromptFileError(
                f"the prompt was trained for text embedding width {meta.text_width} "
                f"(backbone {meta.backbone!r}), but {clip.source!r} has width "
                f"{clip.text_width}: load the backbone named in the prompt file"
            )
        found = backbone_fingerprint(clip, disk_cache=False)
        if found != meta.backbone_sha256:
            raise PromptFileError(
                f"the prompt was trained on backbone {meta.backbone!r} with weights "
                f"{meta.backbone_sha256}, but {clip.source!r} has {found}: a prompt only "
                "works on the exact weights it was trained on; pass a copy of that backbone"
            )
        self.clip = clip
        self.metadata = meta
        self.class_names = meta.class_names
        encoder = CoOpTextEncoder(clip.model, clip.tokenizer, meta.class_names, meta.n_ctx)
        with torch.no_grad():
            self._text = encoder.to(clip.device)(prompt_file.prompt.to(clip.device))  # (C, e)
        self._logit_scale = clip.model.logit_scale.exp().detach().float().cpu()

    @classmethod
    def from_file(
        cls, path: Path, *, model: str | None = None, device: str = "auto"
    ) -> PromptClassifier:
        """Load and verify ``path``, then the backbone it names (or ``model`` instead)."""
        prompt_file = load_prompt_file(path)
        clip = load_frozen_clip(model or prompt_file.metadata.backbone, device=device)
        return cls(prompt_file, clip)

    def logits(self, features: Tensor) -> Tensor:
        """Logits (N, C) for normalised image features (N, e), as the client computes them."""
        return class_logits(self._text.cpu(), features.float().cpu(), self._logit_scale)

    def image_features(self, images: list[Image.Image]) -> Tensor:
        """Normalised features (N, e) through the backbone's own processor and image tower."""
        pixels = rgb_to_pixel_values(self.clip.processor, [np.asarray(image) for image in images])
        return encode_pixels(self.clip, pixels)

    def top_k(self, images: list[Image.Image], k: int) -> list[tuple[tuple[str, float], ...]]:
        """The ``k`` most probable classes of each image with their softmax probabilities."""
        probs = torch.softmax(self.logits(self.image_features(images)), dim=1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            tuple((self.class_names[i], float(p)) for p, i in zip(row_p, row_i, strict=True))
            for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]


def read_image(path: Path) -> Image.Image:
    """An RGB copy of the image at ``path`` (grayscale, palette and alpha images included)."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not mid-batch
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image format PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(path, f"cannot decode image ({err})") from None


def expand_inputs(inputs: Iterable[Path]) -> Iterator[Path | Failure]:
    """Files as given, folders as their files (sorted, not recursive); unreadable -> Failure."""
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            yield path
            continue
        try:
            entries = sorted(entry for entry in path.iterdir() if entry.is_file())
        except OSError as err:
            yield Failure(str(path), f"cannot list folder: {err.strerror or err}")
            continue
        if not entries:
            yield Failure(str(path), "folder holds no files")
        yield from entries


def classify(
    classifier: PromptClassifier,
    inputs: Iterable[Path],
    *,
    top_k: int = 3,
    batch_size: int = 64,
) -> Iterator[Prediction | Failure]:
    """Classify every image under ``inputs`` in batches, in input order, logging progress."""
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    items = list(expand_inputs(inputs))
    total = sum(isinstance(item, Path) for item in items)
    done = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loaded: list[tuple[int, Image.Image]] = []
        results: list[Prediction | Failure | None] = [None] * len(chunk)
        for position, item in enumerate(chunk):
            if isinstance(item, Failure):
                results[position] = item
                continue
            try:
                loaded.append((position, read_image(item)))
            except ImageReadError as err:
                results[position] = Failure(str(item), err.reason)
        if loaded:
            tops = classifier.top_k([image for _, image in loaded], top_k)
            for (position, _), top in zip(loaded, tops, strict=True):
                results[position] = Prediction(os.fspath(chunk[position]), top)  # type: ignore[arg-type]
        done += sum(isinstance(item, Path) for item in chunk)
        logger.info("processed %d/%d images", done, total)
        yield from (r for r in results if r is not None)
