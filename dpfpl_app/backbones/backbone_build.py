"""Build the offline CLIP backbones: a tiny CLIP pretrained here, and a random one for plumbing.

Prompt learning needs a CLIP whose text and image towers already agree; a random CLIP leaves
prompt learning at chance. Without internet no real checkpoint can be fetched, so this module
pretrains a tiny CLIP (4-layer, 128-wide towers) contrastively on the *pretraining* split of
the offline datasets (:mod:`dpfpl_app.data.offline_data`), deterministically, in about three minutes
on two idle CPU cores, and caches it as an ordinary Hugging Face directory. The federated code then
loads it with ``from_pretrained`` exactly as it would load ``openai/clip-vit-base-patch16``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpfpl_app.backbones.pretraining import (
    ZERO_SHOT_EVAL_MAX,
    pretrain,
    pretrain_data,
    zero_shot_accuracy,
)
from dpfpl_app.backbones.tokenizer_build import (
    CONTEXT_LENGTH,
    LEGACY_VOCABULARY,
    build_tokenizer,
)
from dpfpl_app.cache import cache_root
from dpfpl_app.data.image_processing import make_image_processor
from dpfpl_app.data.offline_data import get_dataset

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPTokenizer

logger = logging.getLogger(__name__)

METADATA_FILE = "dpfpl_backbone.json"
"""Written last into a backbone directory: its presence marks the directory complete."""

BUILD_THREADS = 2
"""Torch threads during a build (unless a spec says otherwise); fixed so the arithmetic, and
with it the weights, does not vary with the machine's thread count."""

@dataclass(frozen=True)
class BackboneSpec:
    """A named offline backbone: what it is trained on and how.

    Parameters
    ----------
    name
        Directory name under ``cache_root()/backbones``.
    datasets
        Offline datasets whose pretraining split it learns; empty means random weights.
    image_size, patch_size
        Vision tower geometry (square images, square patches).
    steps, batch_size, learning_rate
        Contrastive pretraining schedule (AdamW, warm-up then cosine decay).
    approx_minutes
        Rough build time on two CPU cores, shown to the user before a build starts.
    threads
        Torch threads of the build. Two threads on a busy machine stall each other: the
        glyph backbone made 160 steps in 668 s at load 8 with two, 1600 in 733 s with one.
    vocabulary
        Datasets whose captions the tokenizer's merges are learned from. The first
        backbones learned theirs from digits and Fashion-MNIST; keeping that corpus keeps
        their tokenizers, hence their weights, unchanged as datasets are added.

    """

    name: str
    datasets: tuple[str, ...]
    image_size: int
    patch_size: int
    steps: int
    batch_size: int
    learning_rate: float
    approx_minutes: float
    vocabulary: tuple[str, ...] = LEGACY_VOCABULARY
    threads: int = BUILD_THREADS


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # Digits are 8x8: 16x16 input keeps 16 patches (about 3 min to build on 2 idle cores).
        # Measured zero-shot on the federated pool: 97-98.5% over seeds 0, 1, 2.
        BackboneSpec("dpfpl-tiny-digits", ("digits",), image_size=16, patch_size=4,
                     steps=400, batch_size=128, learning_rate=5e-4, approx_minutes=3.0),
        # Batches are half digits, half Fashion-MNIST; 8x8 patches keep 16 tokens per image.
        BackboneSpec("dpfpl-tiny-digits-fashion", ("digits", "fashion-mnist"), image_size=32,
                     patch_size=8, steps=600, batch_size=128, learning_rate=5e-4,
                     approx_minutes=3.0),
        # 100 glyph classes from 8 pretraining fonts; clients live in 6 unseen font domains.
        # 600 steps of 128 left it at 8% zero-shot (loss 2.4, still falling); 1600 of 64
        # (more updates for about the same compute) reach 46% zero-shot, 84-92% probes.
        BackboneSpec("dpfpl-tiny-glyphs", ("glyphs",), image_size=32, patch_size=8,
                     steps=1600, batch_size=64, learning_rate=5e-4, approx_minutes=5.0,
                     vocabulary=("glyphs",), threads=1),
        # Random weights: only proves the plumbing (loading, shapes); useless for accuracy.
        BackboneSpec("random-plumbing-clip", (), image_size=32, patch_size=4, steps=0,
                     batch_size=0, learning_rate=0.0, approx_minutes=0.1),
    )
}
"""Every backbone :func:`ensure_backbone` can build, by name."""


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished backbone (metadata is written last)."""
    return (Path(model_dir) / METADATA_FILE).is_file()


def recipe_changes(model_dir: Path, spec: BackboneSpec) -> list[str]:
    """How a finished build's recorded recipe differs from ``spec`` (empty: it matches).

    A cache keyed by name alone would keep serving a backbone trained on another split
    or schedule after the project changed its recipe; comparing the recorded recipe
    (including each dataset's pretraining split) catches that.
    """
    recorded = json.loads((Path(model_dir) / METADATA_FILE).read_text(encoding="utf-8"))
    wanted: dict[str, Any] = {
        "datasets": list(spec.datasets), "steps": spec.steps, "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate, "image_size": spec.image_size,
        "patch_size": spec.patch_size, "vocabulary": list(spec.vocabulary),
        "torch_threads": spec.threads,
    }
    for name in spec.datasets:
        for field, value in get_dataset(name).recipe().items():
            wanted[f"{name}.{field}"] = value
    recorded.setdefault("vocabulary", list(LEGACY_VOCABULARY))  # built before it was recorded
    changes = []
    for key, value in wanted.items():
        dataset, _, field = key.rpartition(".")
        section = recorded.get("data", {}).get(dataset, {}) if dataset else recorded
        have = section.get(field)
        if have != value:
            changes.append(f"{key}: built with {have!r}, recipe now {value!r}")
    return changes


def tiny_clip_config(tokenizer: CLIPTokenizer, *, image_size: int, patch_size: int) -> CLIPConfig:
    """The tiny CLIP architecture, with token ids taken from ``tokenizer``.

    The text tower keeps 77 positions so CoOp prompts (``[SOS]`` + 16 context tokens + class
    name + ``[EOS]``) fit, as in OpenAI's CLIP.
    """
    from transformers import CLIPConfig

    tower = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 4, "projection_dim": 128}
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT_LENGTH,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(tower, image_size=image_size, patch_size=patch_size, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


@contextlib.contextmanager
def _deterministic_torch(seed: int, threads: int = BUILD_THREADS) -> Iterator[None]:
    """Seed torch, fix its thread count and demand deterministic kernels; restore afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in ``model.safetensors``."""
    from safetensors.numpy import load_file

    tensors = load_file(Path(model_dir) / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


def _write_metadata(out_dir: Path, metadata: dict[str, Any],
                    threads: int = BUILD_THREADS) -> Path:
    """Write ``dpfpl_backbone.json`` after weights and processor: it marks the build complete."""
    metadata = dict(metadata, weights_sha256=weights_sha256(out_dir),
                    library_versions=_library_versions(), torch_threads=threads)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return out_dir


def build_random_clip(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny CLIP with random weights: for plumbing tests only, never for results.

    Parameters
    ----------
    out_dir
        Directory to create; afterwards ``CLIPModel``, ``CLIPTokenizer`` and
        ``CLIPImageProcessor`` all load from it with ``from_pretrained``.
    seed
        Seed of the weight initialisation; equal seeds give identical weights.

    """
    from transformers import CLIPModel, CLIPTokenizer

    spec = BACKBONES["random-plumbing-clip"]
    out_dir = build_tokenizer(Path(out_dir))
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    with _deterministic_torch(seed):
        model = CLIPModel(tiny_clip_config(tokenizer, image_size=spec.image_size,
                                           patch_size=spec.patch_size))
    model.save_pretrained(out_dir)
    make_image_processor(spec.image_size).save_pretrained(out_dir)
    return _write_metadata(out_dir, {
        "name": spec.name, "seed": seed, "datasets": [], "steps": spec.steps,
        "batch_size": spec.batch_size, "learning_rate": spec.learning_rate,
        "image_size": spec.image_size, "patch_size": spec.patch_size,
        "purpose": "plumbing tests only: random weights, prompt learning stays at chance"})


def build_pretrained_backbone(
    out_dir: Path,
    *,
    datasets: tuple[str, ...] = ("digits",),
    seed: int = 0,
    steps: int,
    batch_size: int,
    progress: bool,
    image_size: int = 16,
    patch_size: int = 4,
    learning_rate: float = 5e-4,
    name: str = "dpfpl-tiny-custom",
    vocabulary: tuple[str, ...] = LEGACY_VOCABULARY,
    threads: int = BUILD_THREADS,
) -> Path:
    """Pretrain the tiny CLIP contrastively on the pretraining split of offline datasets.

    Deterministic for a given seed and machine: seeded initialisation and data order, fixed
    thread count, deterministic kernels. The federated split is never touched except to
    measure zero-shot accuracy at the end, which is recorded in ``dpfpl_backbone.json``.

    Parameters
    ----------
    out_dir
        Directory to write (a normal Hugging Face CLIP directory plus metadata).
    datasets
        Names from :data:`dpfpl_app.data.offline_data.DATASETS`; their classes are concatenated.
    seed
        Seed of initialisation, data order, caption choice and augmentation.
    steps, batch_size, learning_rate
        Optimisation schedule (AdamW, warm-up, cosine decay).
    progress
        Log progress at INFO (else DEBUG) every tenth of the steps.
    image_size, patch_size
        Vision tower geometry.
    name
        Name recorded in the metadata.
    vocabulary
        Datasets whose captions the tokenizer learns its merges from.
    threads
        Torch threads (the weights depend on it).

    Returns
    -------
    Path
        ``out_dir``.

    """
    from transformers import CLIPModel, CLIPTokenizer

    if not datasets:
        raise ValueError("datasets must name at least one offline dataset, e.g. ('digits',).")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2; got {steps} and {batch_size}.")
    for dataset in datasets:
        get_dataset(dataset)  # fail before any work on an unknown name
    started = time.perf_counter()
    out_dir = build_tokenizer(Path(out_dir), vocabulary)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    processor = make_image_processor(image_size)
    data, provenance = pretrain_data(tuple(datasets), processor, tokenizer)
    with _deterministic_torch(seed, threads):
        model = CLIPModel(tiny_clip_config(tokenizer, image_size=image_size,
                                           patch_size=patch_size))
        final_loss = pretrain(model, data, steps=steps, batch_size=batch_size,
                               learning_rate=learning_rate, seed=seed, progress=progress)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    for dataset in datasets:
        template = get_dataset(dataset).caption_templates[0]
        sets = get_dataset(dataset).zero_shot_sets(ZERO_SHOT_EVAL_MAX)
        scores = {part: zero_shot_accuracy(out_dir, images, template)
                  for part, images in sets.items()}
        counts = {part: len(images) for part, images in sets.items()}
        provenance[dataset].update(
            zero_shot_template=template, zero_shot_eval_count=sum(counts.values()),
            zero_shot_accuracy=sum(scores[p] * counts[p] for p in sets) / sum(counts.values()))
        if "" not in scores:  # a testbed of domains: the figure of each
            provenance[dataset]["zero_shot_by_domain"] = scores
    return _write_metadata(out_dir, {
        "name": name, "seed": seed, "datasets": list(datasets), "vocabulary": list(vocabulary),
        "steps": steps,
        "batch_size": batch_size, "learning_rate": learning_rate, "image_size": image_size,
        "patch_size": patch_size, "final_loss": final_loss, "data": provenance,
        "build_seconds": round(time.perf_counter() - started, 1)}, threads)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look up a named offline backbone, with an error listing the known names."""
    if name not in BACKBONES:
        raise ValueError(f"unknown offline backbone {name!r}; known names: {sorted(BACKBONES)}.")
    return BACKBONES[name]


def build_backbone(spec: BackboneSpec, out_dir: Path, *, seed: int = 0,
                   progress: bool = True) -> Path:
    """Build the backbone ``spec`` describes into ``out_dir``."""
    if not spec.datasets:
        return build_random_clip(out_dir, seed=seed)
    return build_pretrained_backbone(
        out_dir, datasets=spec.datasets, seed=seed, steps=spec.steps,
        batch_size=spec.batch_size, progress=progress, image_size=spec.image_size,
        patch_size=spec.patch_size, learning_rate=spec.learning_rate, name=spec.name,
        vocabulary=spec.vocabulary, threads=spec.threads)


def _duration(minutes: float) -> str:
    return "under a minute" if minutes < 1 else f"{minutes:g} minutes"


def _make_readable(directory: Path) -> None:
    """Open the build up to what the umask allows (mkdtemp and safetensors use 0o700/0o600).

    A cache built by one user must be readable by another, e.g. Flower's uid-49999 containers.
    """
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def ensure_backbone(name: str, *, progress: bool = True) -> Path:
    """Return the cached backbone ``name``, building it once if it is missing.

    The build goes into a temporary sibling directory that is renamed into place only when
    complete, so an interrupted build never leaves a directory that looks finished. A lock
    file serialises concurrent callers (e.g. several simulated clients starting at once):
    the first builds, the others wait and reuse the result.

    Parameters
    ----------
    name
        A key of :data:`BACKBONES`.
    progress
        Log pretraining progress at INFO.

    Returns
    -------
    Path
        ``cache_root()/backbones/<name>``.

    """
    spec = get_backbone_spec(name)
    parent = cache_root() / "backbones"
    target = parent / name
    if is_complete(target) and not recipe_changes(target, spec):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if is_complete(target):
            changes = recipe_changes(target, spec)
            if not changes:  # another process built it while we waited
                return target
            logger.warning("cached backbone %r no longer matches its recipe (%s): rebuilding",
                           name, "; ".join(changes))
        for stale in parent.glob(f".{name}.building-*"):  # left by a build that died
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("building the one-off offline backbone %r (about %s on 2 CPU cores; "
                    "cached for later runs) into %s", name, _duration(spec.approx_minutes),
                    target)
        building = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent))
        try:
            build_backbone(spec, building, progress=progress)
            _make_readable(building)
            if target.exists():  # an incomplete directory from elsewhere: replace it
                shutil.rmtree(target)
            os.replace(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    logger.info("offline backbone %r ready at %s", name, target)
    return target
