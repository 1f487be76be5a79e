"""Where a run's images come from: offline arrays, Hugging Face datasets, image folders.

Every source becomes an ``ImageSet``: labels and class names in memory, images read
lazily in batches (Food-101 decoded at once would not fit in memory), and a fingerprint
of the content that the feature cache keys on. Class names matter twice over here:
they are the text the prompts are built from, so they come from the dataset's own
``ClassLabel`` names (or a file the user gives), never from bare label numbers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpfpl_app.data.offline_data import LabelledImages

RgbReader = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class ImageSet:
    """Labelled images of one split, read lazily; ``rows`` index the underlying source."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    fingerprint: str
    reader: RgbReader = field(repr=False, compare=False)
    rows: np.ndarray = field(repr=False, compare=False)
    # a source that renders each domain itself (the glyph testbed): style name -> reader
    restyle: Callable[[str], RgbReader] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        # the rows in their order: a permuted subset has its features in another order
        rows = hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
        digest = hashlib.sha256(f"{self.fingerprint}|{rows}".encode()).hexdigest()
        return ImageSet(
            labels=self.labels[idx],
            class_names=self.class_names,
            name=self.name,
            fingerprint=digest,
            reader=self.reader,
            rows=self.rows[idx],
            restyle=self.restyle,
        )

    def styled(self, style: str) -> ImageSet:
        """The same images through an ``image_styles`` style (grayscale-as-RGB sources), or,
        for a source that renders its own domains, the same rows drawn in domain ``style``.

        The fingerprint names the style, so styled features are cached apart.
        """
        from dpfpl_app.data.image_processing import gray_to_rgb
        from dpfpl_app.data.image_styles import apply_style

        source = self.reader

        def read(rows: np.ndarray) -> list[np.ndarray]:
            gray = [image[..., 0] for image in source(rows)]
            return list(gray_to_rgb(apply_style(style, np.stack(gray)))) if gray else []

        digest = hashlib.sha256(f"{self.fingerprint}|style={style}".encode()).hexdigest()
        reader = read if self.restyle is None else self.restyle(style)
        return ImageSet(self.labels, self.class_names, self.name, digest, reader, self.rows)

    def rgb(self, start: int, stop: int) -> list[np.ndarray]:
        """Images ``start:stop`` as ``uint8`` RGB arrays ``(H, W, 3)``."""
        return self.reader(self.rows[start:stop])

    @classmethod
    def from_arrays(cls, data: LabelledImages) -> ImageSet:
        # here, not at the top: the config validator imports this module and must stay
        # torch-free, so a bad run config is refused in a second, not after torch loads
        from dpfpl_app.data.image_processing import gray_to_rgb

        images = data.images
        digest = hashlib.sha256(
            np.ascontiguousarray(images).tobytes() + str(images.shape).encode()
        ).hexdigest()
        return cls(
            labels=data.labels,
            class_names=data.class_names,
            name=data.name,
            fingerprint=digest,
            reader=lambda rows: list(gray_to_rgb(images[rows])),
            rows=np.arange(len(images), dtype=np.int64),
        )


@dataclass(frozen=True)
class HubDataset:
    """A public dataset on the Hugging Face hub and the columns the prompts need."""

    hub_id: str
    image_column: str
    label_column: str


HUB_DATASETS: dict[str, HubDataset] = {
    "caltech101": HubDataset("flwrlabs/caltech101", "image", "label"),
    "oxford-pets": HubDataset("timm/oxford-iiit-pet", "image", "label"),
    "flowers102": HubDataset("dpdl-benchmark/oxford_flowers102", "image", "label"),
    "food101": HubDataset("ethz/food101", "image", "label"),
    "cifar100": HubDataset("uoft-cs/cifar100", "img", "fine_label"),
    "cifar10": HubDataset("uoft-cs/cifar10", "img", "label"),
}
"""The paper's datasets (and CIFAR-10) by short name."""

TEST_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class SourceSpec:
    """What to load: a dataset name or form, plus the keys that refine it."""

    dataset: str
    data_dir: str = ""
    image_column: str = ""
    label_column: str = ""
    class_names_file: str = ""


def check_dataset_name(dataset: str, data_dir: str) -> None:
    """Reject a dataset name no loader knows, before any node starts loading."""
    from dpfpl_app.data.image_styles import STYLED_DATASETS
    from dpfpl_app.data.offline_data import DATASETS

    if dataset in DATASETS or dataset in STYLED_DATASETS:
        return
    if dataset == "imagefolder":
        if not data_dir:
            raise ValueError("dataset='imagefolder' needs data-dir=<folder of class folders>")
        return
    _hub_entry(dataset)


def load_splits(spec: SourceSpec) -> tuple[ImageSet, ImageSet | None]:
    """Train split and, if the source has one, its official test split."""
    import datasets

    local_hint = "data-dir must hold a save_to_disk copy, data files, or class folders"
    if spec.dataset == "imagefolder":
        directory = _existing_dir(spec.data_dir, "dataset=imagefolder needs data-dir=<folder>")
        dd = _load(lambda: datasets.load_dataset("imagefolder", data_dir=str(directory)),
                   spec.dataset, str(directory), local_hint)
        files = _files_digest(directory)
        name, image_col, label_col = f"imagefolder:{directory.name}", "image", "label"
    else:
        hub = _hub_entry(spec.dataset)
        if spec.data_dir:
            directory = _existing_dir(spec.data_dir, "data-dir must name a local copy")
            # a save_to_disk copy carries the hub's fingerprint; loose files get our digest
            saved = any((directory / f).is_file() for f in ("dataset_dict.json", "state.json"))
            load = datasets.load_from_disk if saved else datasets.load_dataset
            dd = _load(lambda: load(str(directory)), spec.dataset, str(directory), local_hint)
            files = "" if saved else _files_digest(directory)
        else:
            offline_fix = (
                "Without internet, save a copy where there is one with `python -c \"import "
                f"datasets; datasets.load_dataset('{hub.hub_id}').save_to_disk('DIR')\"`, "
                "copy DIR here and set data-dir=DIR"
            )
            dd = _load(lambda: datasets.load_dataset(hub.hub_id), spec.dataset, hub.hub_id,
                       offline_fix)
            files = ""
        name, image_col, label_col = spec.dataset, hub.image_column, hub.label_column
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    image_col = spec.image_column or image_col
    label_col = spec.label_column or label_col
    if "train" not in dd:
        raise ValueError(
            f"{spec.dataset}: no 'train' split (found {sorted(dd)}); name the splits train/test"
        )
    train = _image_set(dd["train"], name, image_col, label_col, files, spec.class_names_file)
    test_split = next((s for s in TEST_SPLITS if s in dd), None)
    if test_split is None:
        return train, None
    test = _image_set(dd[test_split], name, image_col, label_col, files, spec.class_names_file)
    if test.class_names != train.class_names:
        raise ValueError(f"{spec.dataset}: its train and {test_split} splits name other classes")
    return train, test


def _hub_entry(dataset: str) -> HubDataset:
    if dataset in HUB_DATASETS:
        return HUB_DATASETS[dataset]
    if dataset.startswith("hf:") and len(dataset) > 3:
        return HubDataset(dataset[3:], "", "")
    from dpfpl_app.data.image_styles import STYLED_DATASETS
    from dpfpl_app.data.offline_data import DATASETS

    offline = sorted({*DATASETS, *STYLED_DATASETS})
    raise ValueError(
        f"unknown dataset {dataset!r}: use an offline dataset ({', '.join(offline)}), "
        f"a hub dataset ({', '.join(sorted(HUB_DATASETS))}), "
        "'hf:<hub id>' (with image-column / label-column if not auto-detected), or "
        "'imagefolder' with data-dir"
    )


def _load(load: Callable[[], Any], dataset: str, where: str, fix: str) -> Any:
    try:
        return load()
    except Exception as err:  # hub, network and format errors all end the same way here
        raise ValueError(
            f"could not load dataset {dataset!r} from {where!r}: {type(err).__name__}: "
            f"{err}. {fix}"
        ) from None


def _existing_dir(path: str, hint: str) -> Path:
    if not path:
        raise ValueError(hint)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data-dir {str(directory)!r} is not a directory ({hint})")
    return directory.resolve()


def _files_digest(directory: Path) -> str:
    """Names, sizes and modification times of every file: a changed image changes it."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            stat = (Path(root) / name).stat()
            rel = os.path.relpath(Path(root) / name, directory)
            h.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _image_set(
    table: Any, name: str, image_col: str, label_col: str, files: str, names_file: str
) -> ImageSet:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    features = table.features
    image_col = image_col or next(
        (k for k, f in features.items() if isinstance(f, ImageFeature)), ""
    )
    label_col = label_col or next((k for k, f in features.items() if isinstance(f, ClassLabel)), "")
    for role, col in (("image-column", image_col), ("label-column", label_col)):
        if col not in features:
            raise ValueError(
                f"{name}: {role} {col!r} is not a column (columns: {sorted(features)}); "
                f"set {role} in the run config"
            )
    raw = table[label_col]
    if isinstance(features[label_col], ClassLabel):
        labels = np.asarray(raw, dtype=np.int64)
        class_names = tuple(features[label_col].names)
    else:  # string labels: classes in sorted order
        class_names = tuple(sorted({str(v) for v in raw}))
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.asarray([index[str(v)] for v in raw], dtype=np.int64)
    class_names = _readable(class_names, names_file, name)
    digest = hashlib.sha256(
        f"{table._fingerprint}|{files}|{image_col}|{label_col}".encode()
    ).hexdigest()
    images = table.select_columns([image_col])

    def read(rows: np.ndarray) -> list[np.ndarray]:
        batch = images.select(rows.tolist())[image_col]
        return [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in batch]

    return ImageSet(labels, class_names, name, digest, read, np.arange(len(labels)))


def _readable(names: tuple[str, ...], names_file: str, dataset: str) -> tuple[str, ...]:
    """Class names as prompt text; a user file overrides numeric or cryptic ones."""
    if names_file:
        path = Path(names_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class-names-file {str(path)!r} does not exist")
        given = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if len(given) != len(names):
            raise ValueError(
                f"class-names-file {str(path)!r} has {len(given)} names but {dataset} has "
                f"{len(names)} classes: one name per line, in label order"
            )
        return given
    if all(n.strip().isdigit() for n in names):
        raise ValueError(
            f"{dataset} names its classes by numbers only ({names[:3]}...): prompts need "
            "words. Give class-names-file=<file with one name per line, in label order>"
        )
    return tuple(n.replace("_", " ").strip() for n in names)
