"""Images to CLIP pixel values: the one preprocessing path of the project.

Pretraining, feature extraction and prediction all go through these functions, so the
backbone sees identical pixels in each; the image processor is always the PIL backend
(``CLIPImageProcessor`` picks torchvision when installed, whose resampling differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil

GRAY_MEAN, GRAY_STD = 0.3, 0.35
"""Pixel statistics shared by digits (0.30/0.38) and Fashion-MNIST (0.29/0.35), for all 3
channels: the images are grayscale repeated as RGB."""



def make_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """A CLIP image processor for grayscale-as-RGB images of side ``image_size``.

    The PIL backend is chosen explicitly (``CLIPImageProcessor`` picks torchvision when it is
    installed, whose resampling need not match PIL's): the backbone must see the same pixels
    in pretraining and in federated use, whatever is installed.
    """
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[GRAY_MEAN] * 3, image_std=[GRAY_STD] * 3,
        resample=PILImageResampling.BICUBIC)


def load_image_processor(model_dir: Path) -> CLIPImageProcessorPil:
    """Load a backbone's image processor, always with the PIL backend (see above)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(model_dir)


def rgb_to_pixel_values(processor: Any, rgb: Sequence[np.ndarray]) -> torch.Tensor:
    """Turn ``uint8`` RGB images ``(H, W, 3)`` of any sizes into CLIP pixel values.

    The one path from images to model input, shared by pretraining, feature extraction
    and prediction, so all of them feed the backbone identical pixels.
    """
    if not rgb:
        size = processor.crop_size["height"]
        return torch.empty((0, 3, size, size))
    out = processor(images=list(rgb), return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"]


def images_to_pixel_values(processor: Any, images: np.ndarray,
                           chunk_size: int = 2048) -> torch.Tensor:
    """Turn grayscale ``uint8`` images ``(N, H, W)`` into CLIP pixel values ``(N, 3, S, S)``."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 of shape (N, H, W); got {images.dtype} "
                         f"{images.shape}.")
    if not len(images):
        return rgb_to_pixel_values(processor, [])
    return torch.cat([
        rgb_to_pixel_values(processor, list(gray_to_rgb(images[start:start + chunk_size])))
        for start in range(0, len(images), chunk_size)
    ])


def gray_to_rgb(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` grayscale to ``(N, H, W, 3)`` by repeating the channel."""
    return np.repeat(images[..., None], 3, axis=-1)
