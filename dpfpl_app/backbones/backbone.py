"""Loading a frozen CLIP (weights, tokenizer, image processor) and choosing its device.

Every backbone goes through ``from_pretrained``: a hub id such as
``openai/clip-vit-base-patch16`` and a local directory (including the project's own
offline backbones, see ``backbone_build.py``) take exactly the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenClip:
    """A CLIP whose weights never change, with what is needed to feed it."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    processor: BaseImageProcessor
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def select_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (or asked for), CPU otherwise."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(prefer)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={prefer!r} was requested but CUDA is not available")
    return device


def select_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it (half the memory, same range), else float32.

    Learned prompts and privacy arithmetic stay float32 whatever the encoder runs in.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_model_source(name_or_path: str) -> str:
    """Map a project backbone name to its cached directory; pass ids and paths through.

    A string that looks like a filesystem path must exist: a missing local directory
    would otherwise be sent to the hub as an id and fail with an unrelated message.
    """
    from dpfpl_app.backbones import backbone_build

    if name_or_path in backbone_build.BACKBONES:
        return str(backbone_build.ensure_backbone(name_or_path))
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local:
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no config.json; point `model` at a "
                "directory written by save_pretrained, a hub id such as "
                f"'openai/clip-vit-base-patch16', or one of {sorted(backbone_build.BACKBONES)}"
            )
        return str(path)
    check_hub_model_reachable(name_or_path)
    return name_or_path


def check_hub_model_reachable(hub_id: str) -> None:
    """Fail in seconds, with the fix, when a hub model can be neither found nor fetched.

    ``from_pretrained`` on an unreachable hub retries HTTP for half a minute and ends in
    a raw connection traceback; every node and the server would each pay that. A model
    in the local hub cache needs no network, so only an uncached one is checked: offline
    mode is read first, then one short metadata request tells whether the hub answers.
    """
    import httpx
    import huggingface_hub
    from huggingface_hub import constants

    if isinstance(huggingface_hub.try_to_load_from_cache(hub_id, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            huggingface_hub.model_info(hub_id, timeout=10)
            return
        except (OSError, httpx.HTTPError) as err:  # no route, no such repo, no access
            reason = f"the hub did not serve it ({type(err).__name__}: {err})"
    raise FileNotFoundError(
        f"model {hub_id!r} is a Hugging Face hub id that is not in the local hub cache, "
        f"and {reason}. Download it where there is internet "
        f"(CLIPModel.from_pretrained({hub_id!r}).save_pretrained(DIR), and the same for "
        "AutoTokenizer and AutoImageProcessor), copy DIR to this host and point `model` "
        "at it: --run-config \"model='DIR'\""
    )


def load_frozen_clip(name_or_path: str, *, device: str = "auto") -> FrozenClip:
    """Load a CLIP checkpoint with every weight frozen and in eval mode."""
    from dpfpl_app.data.image_processing import load_image_processor

    source = resolve_model_source(name_or_path)
    dev = select_device(device)
    dtype = select_dtype(dev)
    try:
        model = CLIPModel.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = load_image_processor(source)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load CLIP {source!r}: {err}. Without internet, give a local "
            "directory (save_pretrained of a CLIP checkpoint) or a project backbone name"
        ) from err
    model.requires_grad_(False)
    model.eval()
    model.to(dev)
    logger.info("loaded frozen CLIP %s on %s (%s)", source, dev, dtype)
    return FrozenClip(model, tokenizer, processor, source, dev, dtype)
