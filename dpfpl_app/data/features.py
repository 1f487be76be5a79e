"""Image features of the frozen image encoder, computed once per image and cached on disk.

The image tower never changes and there is no image-side prompt, so a client's features
are a pure function of (model weights, preprocessing, image set, augmentation recipe).
They are computed once and stored under a key hashed from exactly those inputs, so a
changed model, processor or image set can never be served stale features. In a
deployment every Flower message runs in a fresh process; the disk cache is what keeps
rounds after the first from paying the image encoder again.

Augmented views (random-resized-crop + horizontal flip, the paper's recipe) are drawn
with a seeded generator, so the K views of an image are also a pure function of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.data.data_sources import ImageSet
from dpfpl_app.data.image_processing import rgb_to_pixel_values

logger = logging.getLogger(__name__)

FEATURE_FORMAT = 2  # bump when the way features are computed changes


def model_identity(clip: FrozenClip) -> str:
    """Fingerprint of the weights and preprocessing a feature depends on.

    For a local directory: the config, processor config and every weight file's name,
    size and modification time (hashing gigabytes of weights per process would cost more
    than the features). For a hub id: the resolved commit hash.
    """
    h = hashlib.sha256()
    h.update(clip.source.encode())
    h.update(json.dumps(clip.model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(clip.processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(clip.dtype).encode())
    source = Path(clip.source)
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.suffix in {".safetensors", ".bin"}:
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        h.update(str(getattr(clip.model.config, "_commit_hash", "")).encode())
    return h.hexdigest()


def random_resized_crop_flip(pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Random-resized-crop (scale 0.08-1, ratio 3/4-4/3) and a coin-flip mirror, per image."""
    n, _, height, width = pixels.shape
    out = torch.empty_like(pixels)
    for i in range(n):
        area = height * width * float(torch.empty(1).uniform_(0.08, 1.0, generator=generator))
        log_ratio = torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
        ratio = math.exp(float(log_ratio))
        h = min(height, max(1, round(math.sqrt(area / ratio))))
        w = min(width, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        crop = pixels[i : i + 1, :, top : top + h, left : left + w]
        crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out


@torch.no_grad()
def encode_pixels(clip: FrozenClip, pixels: Tensor, *, batch_size: int = 256) -> Tensor:
    """Normalised image features (N, e) in float32."""
    chunks = []
    for start in range(0, pixels.shape[0], batch_size):
        batch = pixels[start : start + batch_size].to(clip.device, clip.dtype)
        out = clip.model.get_image_features(pixel_values=batch)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        chunks.append(F.normalize(feats.float(), dim=-1).cpu())
    if not chunks:
        return torch.empty((0, int(clip.model.config.projection_dim)))
    return torch.cat(chunks)


def compute_features(
    clip: FrozenClip, images: ImageSet, *, views: int, seed: int, chunk: int = 512
) -> Tensor:
    """Features (V, N, e): view 0 is the clean image, views 1..K are augmented.

    Images are decoded and preprocessed ``chunk`` at a time, so memory stays flat on
    datasets of any size.
    """
    generator = torch.Generator().manual_seed(seed)
    stacks: list[list[Tensor]] = [[] for _ in range(1 + views)]
    n = len(images)
    for start in range(0, n, chunk):
        pixels = rgb_to_pixel_values(clip.processor, images.rgb(start, start + chunk))
        stacks[0].append(encode_pixels(clip, pixels))
        for v in range(1, 1 + views):
            stacks[v].append(encode_pixels(clip, random_resized_crop_flip(pixels, generator)))
        if n > 4 * chunk:
            logger.info("  encoded %d/%d images", min(n, start + chunk), n)
    if n == 0:
        return torch.empty((1 + views, 0, int(clip.model.config.projection_dim)))
    return torch.stack([torch.cat(view) for view in stacks])


class FeatureCache:
    """Disk cache of ``compute_features`` results keyed by everything they depend on."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def key(self, clip: FrozenClip, images: ImageSet, *, views: int, seed: int) -> str:
        parts = [str(FEATURE_FORMAT), model_identity(clip), images.fingerprint, str(views)]
        parts.append(str(seed) if views else "-")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def features(self, clip: FrozenClip, images: ImageSet, *, views: int, seed: int) -> Tensor:
        key = self.key(clip, images, views=views, seed=seed)
        path = self.root / f"{key}.safetensors"
        if path.is_file():
            return load_file(path)["features"]
        logger.info(
            "computing image features for %d images of %s (%d augmented views)",
            len(images),
            images.name,
            views,
        )
        feats = compute_features(clip, images, views=views, seed=seed)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": feats.contiguous()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing
        return feats
