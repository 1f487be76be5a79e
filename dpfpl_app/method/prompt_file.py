"""The released-prompt file: one personalised prompt, what it needs, and what it cost.

Prompt as a service means a prompt leaves the organisation that trained it, so the file
must say everything a user needs to use it correctly (which backbone, which classes in
which order) and everything an auditor needs to judge it (method, DP mode, the composed
epsilon this node's releases spent, with its meaning). Format: a ``safetensors`` file
holding one float32 tensor ``prompt`` (n_ctx x d) and, in the header's string metadata,
the JSON of :class:`PromptMetadata` under ``dpfpl-prompt``.

``content_sha256`` covers the tensor bytes, dtype, shape and every other metadata field,
so a truncated, corrupted or edited file (a changed byte of the prompt, a lowered
epsilon) is refused on load. It is an integrity check, not a signature: whoever edits
the file can recompute it. Authenticity needs a signature over the file, which is out
of scope here.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.backbones.backbone_build import weights_sha256
from dpfpl_app.cache import cache_root
from dpfpl_app.config import DPMode, Method
from dpfpl_app.privacy.dp_channel import Guarantee

FORMAT_NAME = "dpfpl-prompt"
TENSOR_KEY = "prompt"


class PromptFileError(ValueError):
    """A prompt file cannot be used: unreadable, tampered with, or for another backbone."""


class PromptPrivacy(BaseModel):
    """The guarantee of the prompt in this file for its node's training data.

    One composed figure, not one per channel: the personalised prompt is post-processing
    of both noisy channels run on the same batches (``dp_channel.py``). The meaning is
    written out beside the number, so an epsilon never travels without it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    guarantee: Guarantee
    meaning: str = Field(min_length=1)
    epsilon: float | None = Field(ge=0, description="None: no bound (trained without DP)")
    delta: float | None = Field(default=None, gt=0, lt=1)
    steps: int = Field(ge=0, description="local steps of the composed mechanism taken")


class PromptMetadata(BaseModel):
    """Everything recorded about a released prompt (pydantic: this is an edge of the system)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dpfpl-prompt"] = "dpfpl-prompt"
    format_version: Literal[2] = 2
    backbone: str = Field(min_length=1, description="the run's `model`: name, hub id or dir")
    backbone_sha256: str = Field(min_length=8, description="fingerprint of the weights")
    text_width: int = Field(ge=1)
    n_ctx: int = Field(ge=1)
    method: Method
    rank: int | None = Field(default=None, ge=1, description="carrier rank (low-rank methods only)")
    class_names: tuple[str, ...] = Field(min_length=1)
    dp_mode: DPMode
    privacy: PromptPrivacy
    dataset: str
    partition_id: int | None = None
    rounds_done: int = Field(ge=0)
    created: datetime
    content_sha256: str = ""


class PromptFile(BaseModel):
    """A prompt tensor with its metadata; ``save`` and ``load`` keep them consistent."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    prompt: Tensor
    metadata: PromptMetadata

    def save(self, path: Path) -> Path:
        """Write atomically with mode 0600: a personalised prompt is private until released."""
        prompt = self.prompt.detach().to(torch.float32).contiguous().cpu()
        _check_shape(prompt, self.metadata)
        sealed = self.metadata.model_copy(
            update={"content_sha256": content_hash(prompt, self.metadata)}
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        save_file({TENSOR_KEY: prompt}, str(tmp), metadata={FORMAT_NAME: sealed.model_dump_json()})
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path


def content_hash(prompt: Tensor, metadata: PromptMetadata) -> str:
    """SHA-256 over every metadata field but the hash itself, then dtype, shape and bytes."""
    fields = metadata.model_dump(mode="json", exclude={"content_sha256"})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    tensor = prompt.detach().contiguous().cpu()
    digest.update(f"|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def load_prompt_file(path: Path) -> PromptFile:
    """Read and verify a prompt file; every failure is a :class:`PromptFileError` saying why."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            keys = set(handle.keys())
            prompt = handle.get_tensor(TENSOR_KEY) if keys == {TENSOR_KEY} else None
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {str(path)!r} does not exist") from None
    except (SafetensorError, OSError) as err:
        raise PromptFileError(
            f"{str(path)!r} is not a readable prompt file (truncated or not safetensors): {err}"
        ) from None
    if prompt is None:
        raise PromptFileError(
            f"{str(path)!r} holds tensors {sorted(keys)}, expected {TENSOR_KEY!r}"
        )
    if FORMAT_NAME not in header:
        raise PromptFileError(f"{str(path)!r} has no {FORMAT_NAME!r} metadata: not a dpfpl prompt")
    try:
        metadata = PromptMetadata.model_validate_json(header[FORMAT_NAME])
    except ValidationError as err:
        raise PromptFileError(f"{str(path)!r} has invalid prompt metadata:\n{err}") from None
    if prompt.dtype != torch.float32:
        raise PromptFileError(f"{str(path)!r}: prompt dtype {prompt.dtype}, expected float32")
    _check_shape(prompt, metadata, source=str(path))
    if content_hash(prompt, metadata) != metadata.content_sha256:
        raise PromptFileError(
            f"{str(path)!r} failed its integrity check: the prompt or its metadata changed "
            "after export (corrupted or edited). Ask the publisher for the original file"
        )
    return PromptFile(prompt=prompt, metadata=metadata)


def _check_shape(prompt: Tensor, metadata: PromptMetadata, source: str = "prompt") -> None:
    expected = (metadata.n_ctx, metadata.text_width)
    if tuple(prompt.shape) != expected:
        raise PromptFileError(
            f"{source}: prompt has shape {tuple(prompt.shape)}, metadata says {expected} "
            "(n_ctx x text width)"
        )


def backbone_fingerprint(clip: FrozenClip, *, disk_cache: bool = True) -> str:
    """Identity of a backbone's weights, independent of where the directory lives.

    A local directory (the project's backbones, any ``save_pretrained`` copy) is hashed
    tensor by tensor; a hub checkpoint is named by its resolved commit. ``disk_cache``
    reuses a hash stored for the same file size and time (exports, every message);
    checking a prompt against its backbone passes False and hashes afresh.
    """
    source = Path(clip.source)
    weights = source / "model.safetensors"
    if weights.is_file():
        if not disk_cache:
            return "sha256:" + weights_sha256(source)
        stat = weights.stat()
        return "sha256:" + _weights_hash(str(source.resolve()), stat.st_size, stat.st_mtime_ns)
    commit = getattr(clip.model.config, "_commit_hash", None)
    if commit:
        return f"hub:{clip.source}@{commit}"
    raise PromptFileError(
        f"cannot fingerprint backbone {clip.source!r}: no model.safetensors and no hub commit; "
        "save it with save_pretrained(safe_serialization=True) and use that directory"
    )


@lru_cache(maxsize=8)
def _weights_hash(directory: str, size: int, mtime_ns: int) -> str:
    """Cached per file version, in memory and on node-local disk.

    A node exports after every message and, in a deployment, every message runs in a
    fresh process: without the disk copy a ViT-B/16 node would re-hash 600 MB each time.
    """
    key = hashlib.sha256(f"{directory}|{size}|{mtime_ns}".encode()).hexdigest()
    cached = cache_root() / "weight-hashes" / key
    if cached.is_file():
        return cached.read_text().strip()
    digest = weights_sha256(Path(directory))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{key}.{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, cached)  # atomic: a concurrent reader sees all or nothing
    return digest


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
