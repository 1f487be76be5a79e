"""Datasets by name, hub id, saved copy or image folder: labels, class names, pixels, identity.

Nothing is downloaded: the loaders are exercised on local data in the formats users
have (an ``imagefolder`` tree of PNG/JPEG files, a ``save_to_disk`` copy of a hub
dataset), and an unreachable hub id must fail with a message that says what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import ConfigError, RunConfig
from dpfpl_app.data.data_sources import SourceSpec, load_splits
from dpfpl_app.data.federated_data import load_federated_data
from tests.flower_harness import run_server_app

CLASSES = ("red_square", "green_circle", "blue_bar")


def _picture(cls: int, k: int) -> np.ndarray:
    """A small RGB image whose colour says its class; sizes vary like real photos."""
    size = (12 + k % 3, 10 + cls)
    img = np.zeros((*size, 3), dtype=np.uint8)
    img[..., cls] = 120 + 10 * k
    return img


def _imagefolder(root: Path, per_class: dict[str, int]) -> Path:
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(_picture(c, k)).save(folder / f"{k}.png")
    return root


def _saved_hub_copy(root: Path, *, names: tuple[str, ...] = CLASSES) -> Path:
    """A hub-style dataset (columns ``img``/``fine_label`` as in uoft-cs/cifar100) saved."""
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=list(names))}
    )

    def split(n: int) -> datasets.Dataset:
        rows = [(c, k) for c in range(len(names)) for k in range(n)]
        return datasets.Dataset.from_dict(
            {
                "img": [Image.fromarray(_picture(c, k)) for c, k in rows],
                "fine_label": [c for c, _ in rows],
            },
            features=features,
        )

    datasets.DatasetDict({"train": split(4), "test": split(2)}).save_to_disk(str(root))
    return root


def test_imagefolder_gives_folder_classes_labels_and_pixels(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "photos", {"train": 4, "test": 2})

    train, test = load_splits(SourceSpec("imagefolder", data_dir=str(root)))

    assert test is not None
    assert train.class_names == ("blue bar", "green circle", "red square")  # sorted folders
    assert len(train) == 12 and len(test) == 6
    assert np.bincount(train.labels).tolist() == [4, 4, 4]
    # every image's dominant channel is the colour of the class its label names
    channel = {"red square": 0, "green circle": 1, "blue bar": 2}
    for i, img in enumerate(train.rgb(0, len(train))):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.mean(axis=(0, 1)).argmax() == channel[train.class_names[train.labels[i]]]


def test_saved_hub_copy_loads_under_the_hub_name_with_its_columns(tmp_path: Path) -> None:
    root = _saved_hub_copy(tmp_path / "cifar100-copy")

    train, test = load_splits(SourceSpec("cifar100", data_dir=str(root)))

    assert train.class_names == ("red square", "green circle", "blue bar")
    assert test is not None and len(test) == 6
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert train.rgb(4, 5)[0].mean(axis=(0, 1)).argmax() == 1


def test_hf_form_auto_detects_the_image_and_label_columns(tmp_path: Path) -> None:
    root = _saved_hub_copy(tmp_path / "copy")

    train, _ = load_splits(SourceSpec("hf:someone/some-dataset", data_dir=str(root)))

    assert len(train) == 12 and train.class_names[0] == "red square"


def test_a_wrong_column_name_says_which_columns_exist(tmp_path: Path) -> None:
    root = _saved_hub_copy(tmp_path / "copy")

    with pytest.raises(ValueError, match=r"image-column 'image'.*fine_label.*img"):
        load_splits(SourceSpec("hf:x/y", data_dir=str(root), image_column="image"))


def test_numeric_class_names_need_a_names_file(tmp_path: Path) -> None:
    root = _saved_hub_copy(tmp_path / "copy", names=("1", "10", "100"))
    names = tmp_path / "names.txt"

    with pytest.raises(ValueError, match="class-names-file"):
        load_splits(SourceSpec("hf:x/flowers", data_dir=str(root)))
    names.write_text("pink primrose\nglobe thistle\n")
    with pytest.raises(ValueError, match="has 2 names but hf:x/flowers has 3 classes"):
        load_splits(SourceSpec("hf:x/flowers", data_dir=str(root), class_names_file=str(names)))
    names.write_text("pink primrose\nglobe thistle\nblanket flower\n")
    train, _ = load_splits(
        SourceSpec("hf:x/flowers", data_dir=str(root), class_names_file=str(names))
    )
    assert train.class_names == ("pink primrose", "globe thistle", "blanket flower")


def test_an_unreachable_hub_dataset_names_the_id_and_the_local_copy_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    with pytest.raises(ValueError, match=r"uoft-cs/cifar10.*save_to_disk.*data-dir=DIR"):
        load_splits(SourceSpec("cifar10"))


def test_a_missing_or_unreadable_data_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_splits(SourceSpec("imagefolder", data_dir=str(tmp_path / "nowhere")))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a dataset")
    # HF reads a folder of text files as a text dataset: the columns show what went wrong
    with pytest.raises(ValueError, match=r"image-column 'img' is not a column.*\['text'\]"):
        load_splits(SourceSpec("cifar100", data_dir=str(junk)))


def test_unknown_dataset_names_are_refused_by_the_run_config() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnits'.*cifar100"):
        RunConfig.from_flower({"dataset": "mnits"})
    with pytest.raises(ConfigError, match="imagefolder' needs data-dir"):
        RunConfig.from_flower({"dataset": "imagefolder"})


def test_a_dataset_without_test_split_is_split_per_class(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "flat", {"train": 10})
    spec = SourceSpec("imagefolder", data_dir=str(root))

    data = load_federated_data(spec, test_fraction=0.3, seed=0)

    assert len(data.train) == 21 and len(data.test) == 9
    assert np.bincount(data.test.labels).tolist() == [3, 3, 3]
    # disjoint: the two sides hold different image rows of the one source
    assert not set(data.train.rows.tolist()) & set(data.test.rows.tolist())


def test_an_edited_image_changes_the_fingerprint_features_are_keyed_on(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "photos", {"train": 3, "test": 1})
    before, _ = load_splits(SourceSpec("imagefolder", data_dir=str(root)))
    target = root / "train" / "red_square" / "0.png"
    Image.fromarray(_picture(1, 7)).save(target)
    os.utime(target, ns=(1, 1))  # even a restored timestamp cannot hide a size change

    after, _ = load_splits(SourceSpec("imagefolder", data_dir=str(root)))

    assert after.fingerprint != before.fingerprint


def _small_run(model: Path, tmp_path: Path, name: str, nodes: int, **data: str) -> dict:
    """Two quick non-private rounds on the plumbing CLIP (the data path is what is tested)."""
    return RunConfig(
        model=str(model),
        num_server_rounds=2,
        min_nodes=nodes,
        batch_size=4,
        dp_mode="off",
        output_dir=str(tmp_path / "runs"),
        run_name=name,
        state_dir=str(tmp_path / "state"),
        **data,
    ).to_flower()


def test_a_federation_runs_on_an_image_folder(plumbing_clip: Path, tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "photos", {"train": 6, "test": 3})
    data = {"dataset": "imagefolder", "data_dir": str(root)}
    cfg = _small_run(plumbing_clip, tmp_path, "folder", 3, **data)

    run_server_app(server_module.app, client_app=client_module.app, num_nodes=3, run_config=cfg)

    doc = json.loads((tmp_path / "runs" / "folder" / "results.json").read_text())
    assert doc["status"] == "completed" and len(doc["rounds"]) == 2
    final = doc["rounds"][-1]
    assert final["eval-accepted"] == 3 and final["accepted"] == 3
    assert 0.0 <= final["local-acc"] <= 1.0 and 0.0 <= final["neighbour-acc"] <= 1.0


def test_each_organisation_can_bring_its_own_folder_by_node_config(
    plumbing_clip: Path, tmp_path: Path
) -> None:
    # Prepare: two organisations, each with its whole own image folder (one partition)
    folders = [_imagefolder(tmp_path / f"org{i}", {"train": 4 + i, "test": 2}) for i in (0, 1)]
    cfg = _small_run(plumbing_clip, tmp_path, "orgs", 2)  # the run config names digits
    # each on its own host: its own state directory (both are partition 0 of 1; sharing
    # one directory, the second would load the first's private state, and its budget)
    nodes = [
        {
            "partition-id": 0,
            "num-partitions": 1,
            "dataset": "imagefolder",
            "data-dir": str(f),
            "state-dir": str(tmp_path / f"state-org{i}"),
        }
        for i, f in enumerate(folders)
    ]

    run = run_server_app(
        server_module.app, client_app=client_module.app, num_nodes=2, run_config=cfg,
        node_configs=nodes,
    )

    # Assert: both trained on their folders (not on digits) and were evaluated; holding
    # every class of their own data, they have no neighbour data, which is not an error
    doc = json.loads((tmp_path / "runs" / "orgs" / "results.json").read_text())
    assert doc["status"] == "completed"
    assert all(r["accepted"] == 2 and r["eval-accepted"] == 2 for r in doc["rounds"])
    assert "neighbour-acc" not in doc["rounds"][-1]
    examples = sorted(
        int(m.content["metrics"]["local-examples"])
        for m in run.replies
        if "local-examples" in m.content["metrics"]
    )
    assert set(examples) == {6}  # 3 classes x 2 test images in each organisation's folder
