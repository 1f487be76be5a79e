"""Tests for the offline datasets and the pretraining/federated split."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from dpfpl_app.data import offline_data
from dpfpl_app.data.offline_data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_CLASS_NAMES,
    LabelledImages,
    federated_pool,
    index_hash,
    load_digits,
    load_fashion_mnist,
    load_with_split,
    pretrain_pool,
    read_idx,
    split_pretrain_federated,
)


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    """Write ``array`` (uint8) as IDX, per the spec: 0, 0, type, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_tiny_fashion_dir(directory: Path, *, compress: bool) -> dict[str, np.ndarray]:
    """A Fashion-MNIST-shaped directory with 6 train and 4 test images of 5x4 pixels."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 1, 2, 9, 9, 5], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([3, 4, 8, 7], dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(directory / stem, array, compress=compress)
    return arrays


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, compress: bool) -> None:
    # Prepare
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    image_path = write_idx(tmp_path / "images", images, compress=compress)
    label_path = write_idx(tmp_path / "labels", labels, compress=compress)
    # Execute
    read_images, read_labels = read_idx(image_path), read_idx(label_path)
    # Assert
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_images.dtype == np.uint8


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_load_fashion_mnist_reads_both_splits(tmp_path: Path, compress: bool) -> None:
    # Prepare
    arrays = write_tiny_fashion_dir(tmp_path, compress=compress)
    # Execute
    train = load_fashion_mnist(tmp_path, split="train")
    test = load_fashion_mnist(tmp_path, split="test")
    # Assert
    np.testing.assert_array_equal(train.images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(test.labels, [3, 4, 8, 7])
    assert train.labels.dtype == np.int64
    assert train.class_names[9] == "ankle boot"
    assert train.name == test.name == "fashion-mnist"


def test_load_fashion_mnist_uses_environment_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    write_tiny_fashion_dir(tmp_path, compress=True)
    monkeypatch.setenv("DPFPL_FASHION_MNIST_DIR", str(tmp_path))
    # Execute
    test = load_fashion_mnist(split="test")
    # Assert
    assert len(test) == 4


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x1f\x8bXXXXXXXXXXXXXX")
    # Execute / Assert
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_truncated_payload(tmp_path: Path) -> None:
    # Prepare
    path = write_idx(tmp_path / "images", np.zeros((3, 2, 2), dtype=np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-1])
    # Execute / Assert
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path)


def test_missing_fashion_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(FileNotFoundError) as caught:
        load_fashion_mnist(tmp_path / "nowhere", split="test")
    message = str(caught.value)
    assert "t10k-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "DPFPL_FASHION_MNIST_DIR" in message


def test_load_fashion_mnist_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_fashion_mnist(tmp_path, split="validation")  # type: ignore[arg-type]


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files() -> None:
    # Execute
    train = load_fashion_mnist(DEFAULT_FASHION_MNIST_DIR, split="train")
    test = load_fashion_mnist(DEFAULT_FASHION_MNIST_DIR, split="test")
    # Assert
    assert train.images.shape == (60000, 28, 28)
    assert test.images.shape == (10000, 28, 28)
    assert np.array_equal(np.unique(train.labels), np.arange(10))
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names == FASHION_CLASS_NAMES


# ---------------------------------------------------------------- datasets


def test_load_digits_is_uint8_full_range() -> None:
    # Execute
    digits = load_digits()
    # Assert
    assert digits.images.shape == (1797, 8, 8)
    assert digits.images.dtype == np.uint8
    assert (digits.images.min(), digits.images.max()) == (0, 255)
    assert digits.class_names[0] == "zero" and digits.class_names[9] == "nine"
    assert np.array_equal(np.unique(digits.labels), np.arange(10))


def test_labelled_images_subset_copies_selected_items() -> None:
    # Prepare
    digits = load_digits()
    # Execute
    subset = digits.subset([5, 0])
    # Assert
    np.testing.assert_array_equal(subset.images[0], digits.images[5])
    assert subset.labels.tolist() == [digits.labels[5], digits.labels[0]]
    assert subset.class_names == digits.class_names and subset.name == "digits"
    assert not np.shares_memory(subset.images, digits.images)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64), "images must be a uint8"),
        (np.zeros((2, 4), np.uint8), np.zeros(2, np.int64), "images must be a uint8"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), "labels must be an int64"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0, 2], np.int64), r"labels must lie in \[0, 2\)"),
    ],
)
def test_labelled_images_rejects_inconsistent_arrays(
    images: np.ndarray, labels: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        LabelledImages(images=images, labels=labels, class_names=("a", "b"), name="x")


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("stratify", [False, True])
def test_split_is_disjoint_and_covers_everything(stratify: bool) -> None:
    # Prepare
    labels = np.arange(101) % 7 if stratify else None
    # Execute
    pretrain, federated = split_pretrain_federated(101, pretrain_fraction=0.3, seed=3,
                                                   labels=labels)
    # Assert
    assert np.intersect1d(pretrain, federated).size == 0
    assert np.array_equal(np.sort(np.concatenate([pretrain, federated])), np.arange(101))
    assert np.all(np.diff(pretrain) > 0) and np.all(np.diff(federated) > 0)
    assert 25 <= len(pretrain) <= 36


def test_split_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    # Execute
    first = split_pretrain_federated(500, pretrain_fraction=0.5, seed=11)
    again = split_pretrain_federated(500, pretrain_fraction=0.5, seed=11)
    other = split_pretrain_federated(500, pretrain_fraction=0.5, seed=12)
    # Assert
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_split_stratifies_by_label() -> None:
    # Prepare: classes of very different sizes
    labels = np.repeat([0, 1, 2], [200, 50, 10])
    # Execute
    pretrain, _ = split_pretrain_federated(len(labels), pretrain_fraction=0.4, seed=0,
                                           labels=labels)
    # Assert
    assert np.bincount(labels[pretrain]).tolist() == [80, 20, 4]


def test_split_keeps_a_group_on_one_side() -> None:
    # Prepare: items 0, 10, 20, ... are copies of one image
    groups = np.arange(100)
    groups[::10] = -1
    # Execute
    pretrain, federated = split_pretrain_federated(100, pretrain_fraction=0.5, seed=1,
                                                   groups=groups)
    # Assert
    copies = set(range(0, 100, 10))
    assert copies <= set(pretrain.tolist()) or copies <= set(federated.tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 10, "pretrain_fraction": 0.0}, r"pretrain_fraction must be in \(0, 1\)"),
        ({"n": 10, "pretrain_fraction": 1.0}, r"pretrain_fraction must be in \(0, 1\)"),
        ({"n": -1, "pretrain_fraction": 0.5}, "n must be >= 0"),
        ({"n": 10, "pretrain_fraction": 0.5, "labels": np.zeros(9)}, r"labels must have shape"),
        ({"n": 10, "pretrain_fraction": 0.5, "groups": np.zeros(11)}, r"groups must have shape"),
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_pretrain_federated(seed=0, **kwargs)


def test_digits_pools_share_no_image() -> None:
    # Execute
    pretrain = pretrain_pool("digits")
    federated = federated_pool("digits")
    # Assert: by content, not by index, so a duplicated image would also be caught
    def digests(pool: LabelledImages) -> set[str]:
        return {hashlib.sha256(image.tobytes()).hexdigest() for image in pool.images}

    assert digests(pretrain).isdisjoint(digests(federated))
    assert len(pretrain) + len(federated) == 1797
    assert 0.35 < len(pretrain) / 1797 < 0.45
    assert np.array_equal(np.unique(federated.labels), np.arange(10))


def test_dataset_split_is_fixed_in_one_place() -> None:
    # Execute
    _, pretrain, federated = load_with_split("digits")
    _, pretrain_again, _ = load_with_split("digits")
    # Assert: the recorded split is reproducible and matches the pools
    assert index_hash(pretrain) == index_hash(pretrain_again)
    assert len(federated_pool("digits")) == len(federated)


def test_index_hash_ignores_order_but_not_content() -> None:
    assert index_hash(np.array([3, 1, 2])) == index_hash(np.array([1, 2, 3]))
    assert index_hash(np.array([1, 2, 3])) != index_hash(np.array([1, 2, 4]))


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"known names: \['digits', 'fashion-mnist', 'glyphs'\]"):
        federated_pool("cifar10")


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_split_covers_both_official_splits() -> None:
    # Execute
    data, pretrain, federated = load_with_split("fashion-mnist")
    # Assert
    assert len(data) == 70000
    assert len(pretrain) == round(offline_data.DATASETS["fashion-mnist"].pretrain_fraction * 70000)
    assert np.intersect1d(pretrain, federated).size == 0
    assert np.bincount(data.labels[pretrain]).tolist() == [1400] * 10
