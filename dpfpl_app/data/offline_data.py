"""Offline image datasets and the split that keeps backbone pretraining apart from federated use.

The project must run without internet, so its data comes from what installed packages ship:
scikit-learn's handwritten digits and, optionally, Fashion-MNIST in the standard IDX format
(Debian's ``dataset-fashion-mnist`` installs it, and anyone who downloads Fashion-MNIST has the
same files). The offline CLIP backbone is pretrained on part of these images, so every dataset
is split once, deterministically, into a *pretraining* part and a *federated* part. The
constants of that split live in :data:`DATASETS` and nowhere else: the backbone builder and the
federated code both ask this module, so they cannot disagree about which images the backbone
has seen.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dpfpl_app.data.glyphs import GLYPHS, GlyphDataset

if TYPE_CHECKING:
    from dpfpl_app.data.data_sources import ImageSet

logger = logging.getLogger(__name__)

FASHION_MNIST_ENV = "DPFPL_FASHION_MNIST_DIR"
"""Environment variable naming a directory with the four Fashion-MNIST IDX files."""

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files (gzipped)."""

DIGIT_CLASS_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
FASHION_CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

_FASHION_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_SIZES = {"train": 60000, "test": 10000}

# IDX type codes (third byte of the magic number) and the big-endian numpy dtype they stand for.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}


@dataclass(frozen=True)
class LabelledImages:
    """Grayscale images with integer labels and the names of their classes.

    Parameters
    ----------
    images
        ``uint8`` array of shape ``(N, H, W)``; 0 is black, 255 is white.
    labels
        ``int64`` array of shape ``(N,)`` with values in ``[0, len(class_names))``.
    class_names
        Human-readable class names; index ``k`` names label ``k``. Prompts are built from them.
    name
        Dataset name, e.g. ``"digits"`` or ``"fashion-mnist"``.

    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        """Reject arrays that downstream code would silently misread."""
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(
                f"images must be a uint8 array of shape (N, H, W); got dtype {self.images.dtype} "
                f"and shape {self.images.shape}. Convert with np.asarray(x, dtype=np.uint8)."
            )
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be an int64 array of shape ({self.images.shape[0]},); got dtype "
                f"{self.labels.dtype} and shape {self.labels.shape}."
            )
        n_classes = len(self.class_names)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}) to index class_names; got range "
                f"[{self.labels.min()}, {self.labels.max()}]."
            )

    def __len__(self) -> int:
        """Return the number of images."""
        return int(self.images.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> LabelledImages:
        """Return the images at ``indices`` (a copy), keeping class names and dataset name."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            images=self.images[idx].copy(),
            labels=self.labels[idx].copy(),
            class_names=self.class_names,
            name=self.name,
        )


def load_digits() -> LabelledImages:
    """Load scikit-learn's 1797 handwritten digits (8x8) rescaled from 0..16 to uint8 0..255.

    The data ship inside scikit-learn itself, so this never touches the network.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    # 0..16 -> 0..255; rounding keeps the 17 grey levels distinct and exactly reproducible.
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return LabelledImages(images=images, labels=labels, class_names=DIGIT_CLASS_NAMES,
                          name="digits")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a numpy array of its declared type and shape.

    Parameters
    ----------
    path
        The file. A name ending in ``.gz`` is decompressed.

    Raises
    ------
    ValueError
        If the magic number, declared dimensions or payload size are inconsistent.

    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: its magic number {raw[:4].hex()!r} should be 0000TTDD "
            f"with type code TT in {sorted(hex(k) for k in _IDX_DTYPES)}. Is it a complete, "
            "uncorrupted Fashion-MNIST/MNIST file?"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_end:
        raise ValueError(f"{path}: truncated IDX header (declares {ndim} dimensions).")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header_end} bytes; the file is truncated or corrupt."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def fashion_mnist_dir(directory: Path | None = None) -> Path:
    """Fashion-MNIST directory: the argument, else ``$DPFPL_FASHION_MNIST_DIR``, else Debian's."""
    if directory is not None:
        return Path(directory)
    from_env = os.environ.get(FASHION_MNIST_ENV)
    return Path(from_env) if from_env else DEFAULT_FASHION_MNIST_DIR


def _find_idx_file(directory: Path, stem: str) -> Path:
    """Return ``directory/stem`` or ``directory/stem.gz``, or say exactly how to get it."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem!r} (or {stem}.gz) not found in {directory}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (installs into {DEFAULT_FASHION_MNIST_DIR}) "
        f"or set {FASHION_MNIST_ENV} to a directory holding the four standard IDX files."
    )


def load_fashion_mnist(
    directory: Path | None = None, *, split: Literal["train", "test"] = "train"
) -> LabelledImages:
    """Load one split of Fashion-MNIST (28x28 grayscale, 10 classes) from IDX files.

    Parameters
    ----------
    directory
        Directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``.
        Defaults to ``$DPFPL_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``.
    split
        ``"train"`` (60000 images) or ``"test"`` (10000 images).

    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    root = fashion_mnist_dir(directory)
    image_stem, label_stem = _FASHION_FILES[split]
    image_path, label_path = _find_idx_file(root, image_stem), _find_idx_file(root, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{image_path}: expected uint8 images (N, H, W); got {images.dtype} "
                         f"{images.shape}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path} holds {labels.shape} labels for {images.shape[0]} images "
                         f"in {image_path}; the pair does not belong together.")
    if images.shape[0] != _FASHION_SIZES[split]:
        logger.warning("Fashion-MNIST %s split has %d images, not the standard %d (%s)",
                       split, images.shape[0], _FASHION_SIZES[split], image_path)
    return LabelledImages(images=images, labels=labels.astype(np.int64),
                          class_names=FASHION_CLASS_NAMES, name="fashion-mnist")


def _load_fashion_mnist_all(directory: Path | None = None) -> LabelledImages:
    """Both Fashion-MNIST splits concatenated (train first, then test): the dataset we split."""
    train = load_fashion_mnist(directory, split="train")
    test = load_fashion_mnist(directory, split="test")
    return LabelledImages(images=np.concatenate([train.images, test.images]),
                          labels=np.concatenate([train.labels, test.labels]),
                          class_names=FASHION_CLASS_NAMES, name="fashion-mnist")


@dataclass(frozen=True)
class OfflineDataset:
    """One offline dataset: how to load all of it, how it is split, and how to caption it.

    Parameters
    ----------
    name
        Registry key, also ``LabelledImages.name``.
    class_names
        Names of the classes, known without loading the data (whose files may be absent).
    load
        Loads the whole dataset; takes an optional data directory (ignored by digits).
    pretrain_fraction
        Share of images (per class) reserved for backbone pretraining.
    split_seed
        Seed of the pretraining/federated split. Changing it changes which images the cached
        backbones have seen, so it is recorded in the backbone metadata via the index hash.
    caption_templates
        Captions for contrastive pretraining; ``{}`` is replaced by the class name. The first
        one is the template used to measure zero-shot accuracy.

    """

    name: str
    class_names: tuple[str, ...]
    load: Callable[[Path | None], LabelledImages]
    pretrain_fraction: float
    split_seed: int
    caption_templates: tuple[str, ...]

    def split(self, directory: Path | None = None) -> tuple[LabelledImages, np.ndarray, np.ndarray]:
        """The whole dataset and its fixed ``(pretrain_indices, federated_indices)`` split."""
        data = self.load(directory)
        pretrain, federated = split_pretrain_federated(
            len(data), pretrain_fraction=self.pretrain_fraction, seed=self.split_seed,
            labels=data.labels, groups=image_groups(data.images))
        return data, pretrain, federated

    def pretrain_pool(self, directory: Path | None = None) -> LabelledImages:
        data, pretrain, _ = self.split(directory)
        return data.subset(pretrain)

    def federated_pool(self, directory: Path | None = None) -> LabelledImages:
        data, _, federated = self.split(directory)
        return data.subset(federated)

    def recipe(self) -> dict[str, Any]:
        """What decides which images the backbone learns from (compared on every cache hit)."""
        return {"pretrain_fraction": self.pretrain_fraction, "split_seed": self.split_seed}

    def provenance(self) -> dict[str, Any]:
        """The recipe plus what it selected: counts and a fingerprint of the pretraining rows."""
        data, pretrain, _ = self.split()
        return {**self.recipe(), "pretrain_count": len(pretrain),
                "federated_count": len(data) - len(pretrain),
                "pretrain_index_sha256": index_hash(pretrain)}

    def zero_shot_sets(self, limit: int) -> dict[str, LabelledImages]:
        """Federated images (at most ``limit``, evenly spaced) the build scores zero-shot."""
        pool = self.federated_pool()
        keep = np.unique(np.linspace(0, len(pool) - 1, limit).astype(np.int64))
        return {"": pool.subset(keep)}

    def image_set(self, directory: Path | None = None) -> ImageSet:
        """The federated pool as the ``ImageSet`` runs train and test on."""
        from dpfpl_app.data.data_sources import ImageSet

        return ImageSet.from_arrays(self.federated_pool(directory))


DATASETS: dict[str, OfflineDataset | GlyphDataset] = {
    "digits": OfflineDataset(
        name="digits",
        class_names=DIGIT_CLASS_NAMES,
        load=lambda _directory: load_digits(),
        # 1797 images: ~720 train the backbone, ~1080 stay for the federated runs.
        pretrain_fraction=0.4,
        split_seed=20_240_601,
        caption_templates=(
            "a photo of the number {}.",
            "a drawing of the number {}.",
            "a handwritten digit {}.",
            "a photo of a {}.",
            "a low resolution black and white photo of the handwritten number {}.",
            "the digit {}, written by hand on a scanned form.",
            "a blurry pixelated image of the number {}.",
            "a {}.",
        ),
    ),
    "fashion-mnist": OfflineDataset(
        name="fashion-mnist",
        class_names=FASHION_CLASS_NAMES,
        load=_load_fashion_mnist_all,
        # 70000 images: 14000 train the backbone, 56000 stay for the federated runs.
        pretrain_fraction=0.2,
        split_seed=20_240_602,
        caption_templates=(
            "a photo of a {}, a type of clothing.",
            "a photo of a {}.",
            "a black and white photo of a {}.",
            "a product photo of the {}, a piece of clothing or an accessory.",
            "a low resolution grayscale photo of a {} from an online fashion shop.",
            "a small photo of a {}.",
            "a photo of the {}, a type of clothing.",
            "a {}.",
        ),
    ),
    "glyphs": GLYPHS,
}
"""The offline datasets and their one pretraining/federated split policy."""


def get_dataset(name: str) -> OfflineDataset | GlyphDataset:
    """Look up an offline dataset by name, with an error listing the known names."""
    if name not in DATASETS:
        raise ValueError(f"unknown offline dataset {name!r}; known names: {sorted(DATASETS)}.")
    return DATASETS[name]


def image_groups(images: np.ndarray) -> np.ndarray:
    """Group ids such that byte-identical images share an id (used to keep copies on one side)."""
    digests = [hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for img in images]
    _, inverse = np.unique(np.array(digests), return_inverse=True)
    return inverse.astype(np.int64)


def split_pretrain_federated(
    n: int,
    *,
    pretrain_fraction: float,
    seed: int,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into disjoint, sorted pretraining and federated index arrays.

    Parameters
    ----------
    n
        Number of items.
    pretrain_fraction
        Share of items (of groups, if ``groups`` is given) for pretraining, in ``(0, 1)``.
    seed
        Seed of the permutation; the same arguments always give the same split.
    labels
        Optional labels; if given, the fraction is applied within each class (stratified).
    groups
        Optional group ids; items of one group (e.g. duplicate images) land on the same side,
        so no image can be both pretrained on and evaluated on. A group is stratified by the
        label of its first item.

    Returns
    -------
    tuple of np.ndarray
        ``(pretrain_indices, federated_indices)``, both int64, sorted, disjoint, covering
        ``range(n)``.

    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}.")
    if not 0.0 < pretrain_fraction < 1.0:
        raise ValueError(f"pretrain_fraction must be in (0, 1); got {pretrain_fraction}.")
    for field, values in (("labels", labels), ("groups", groups)):
        if values is not None and np.shape(values) != (n,):
            raise ValueError(f"{field} must have shape ({n},); got {np.shape(values)}.")
    group_ids = np.arange(n) if groups is None else np.asarray(groups)
    unique_groups, first_item, item_group = np.unique(
        group_ids, return_index=True, return_inverse=True)
    group_labels = (np.zeros(len(unique_groups), dtype=np.int64) if labels is None
                    else np.asarray(labels)[first_item])
    rng = np.random.default_rng(seed)
    pretrain_group = np.zeros(len(unique_groups), dtype=bool)
    for label in np.unique(group_labels):  # sorted, so the rng is consumed in a fixed order
        members = np.flatnonzero(group_labels == label)
        chosen = rng.permutation(members)[: round(pretrain_fraction * len(members))]
        pretrain_group[chosen] = True
    is_pretrain = pretrain_group[item_group.reshape(-1)]
    return (np.flatnonzero(is_pretrain).astype(np.int64),
            np.flatnonzero(~is_pretrain).astype(np.int64))


def index_hash(indices: np.ndarray) -> str:
    """SHA-256 of the sorted indices as little-endian int64: a fingerprint of a split."""
    canonical = np.sort(np.asarray(indices, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(canonical.tobytes()).hexdigest()


def load_with_split(
    name: str, *, directory: Path | None = None
) -> tuple[LabelledImages, np.ndarray, np.ndarray]:
    """Load a whole array dataset and its fixed split: ``(data, pretrain, federated)``."""
    spec = get_dataset(name)
    if not isinstance(spec, OfflineDataset):
        raise ValueError(f"{name!r} is rendered per domain and has no single array to split")
    return spec.split(directory)


def pretrain_pool(name: str, *, directory: Path | None = None) -> LabelledImages:
    """Images reserved for backbone pretraining; federated code must not use these."""
    return get_dataset(name).pretrain_pool(directory)


def federated_pool(name: str, *, directory: Path | None = None) -> LabelledImages:
    """Images reserved for federated training and testing: never seen by the offline backbone.

    Parameters
    ----------
    name
        A key of :data:`DATASETS`.
    directory
        Fashion-MNIST directory (see :func:`load_fashion_mnist`); ignored by the others.

    """
    return get_dataset(name).federated_pool(directory)
