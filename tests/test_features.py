"""FeatureCache: served features equal fresh ones, are not recomputed, and never go stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.data import features as features_module
from dpfpl_app.data.data_sources import ImageSet
from dpfpl_app.data.features import FeatureCache, compute_features
from dpfpl_app.data.offline_data import LabelledImages

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _image_set(arrays: np.ndarray) -> ImageSet:
    labels = np.zeros(len(arrays), dtype=np.int64)
    return ImageSet.from_arrays(LabelledImages(arrays, labels, ("thing",), "test"))


@pytest.fixture
def raw_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 8, 8), dtype=np.uint8)


@pytest.fixture
def images(raw_images: ImageSet) -> ImageSet:
    return _image_set(raw_images)


@pytest.fixture
def model_copy(plumbing_clip: Path, tmp_path: Path) -> Path:
    """Copy the backbone directory so that a test may modify it."""
    return Path(shutil.copytree(plumbing_clip, tmp_path / "clip-copy"))


def _forbid_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("compute_features was called although the features are cached")

    monkeypatch.setattr(features_module, "compute_features", fail)


@pytest.mark.parametrize("views", [0, 2])
def test_cached_features_equal_fresh_features(
    clip: FrozenClip, images: ImageSet, tmp_path: Path, views: int
) -> None:
    # Prepare
    fresh = compute_features(clip, images, views=views, seed=3)

    # Execute
    served = FeatureCache(tmp_path / "cache").features(clip, images, views=views, seed=3)

    # Assert
    assert served.shape == (1 + views, len(images), clip.model.config.projection_dim)
    assert torch.equal(served, fresh)


def test_second_call_reads_the_disk_instead_of_recomputing(
    clip: FrozenClip, images: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: fill the cache, then make any recomputation fail
    first = FeatureCache(tmp_path / "cache").features(clip, images, views=1, seed=0)
    _forbid_compute(monkeypatch)

    # Execute: a new cache object on the same root (as a fresh Flower process would make)
    second = FeatureCache(tmp_path / "cache").features(clip, images, views=1, seed=0)

    # Assert
    assert torch.equal(second, first)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_key_changes_with_the_images_views_and_augmentation_seed(
    clip: FrozenClip, raw_images: ImageSet, images: ImageSet, tmp_path: Path
) -> None:
    # Prepare
    cache = FeatureCache(tmp_path)
    one_pixel = raw_images.copy()
    one_pixel[0, 0, 0] ^= 1
    base = cache.key(clip, images, views=2, seed=0)

    # Execute / Assert
    assert cache.key(clip, _image_set(raw_images.copy()), views=2, seed=0) == base  # stable
    assert cache.key(clip, _image_set(one_pixel), views=2, seed=0) != base
    assert cache.key(clip, images.subset(np.arange(4)), views=2, seed=0) != base
    in_order = cache.key(clip, images.subset(np.arange(5)), views=2, seed=0)
    assert cache.key(clip, images.subset(np.array([1, 0, 2, 3, 4])), views=2, seed=0) != in_order
    same_bytes = _image_set(raw_images.reshape(5, 4, 16))
    assert cache.key(clip, same_bytes, views=2, seed=0) != base
    assert cache.key(clip, images, views=1, seed=0) != base
    assert cache.key(clip, images, views=2, seed=1) != base
    # clean features do not depend on the augmentation seed, so they are shared
    assert cache.key(clip, images, views=0, seed=0) == cache.key(clip, images, views=0, seed=1)


def test_key_changes_when_the_weights_are_replaced_in_place(
    model_copy: Path, images: ImageSet, tmp_path: Path
) -> None:
    # Prepare: same directory, same file size, other weights (one tensor perturbed)
    cache = FeatureCache(tmp_path / "cache")
    before = load_frozen_clip(str(model_copy), device="cpu")
    old_key = cache.key(before, images, views=0, seed=0)
    old_features = cache.features(before, images, views=0, seed=0)
    weights_file = model_copy / "model.safetensors"
    size = weights_file.stat().st_size
    tensors = load_file(weights_file)
    name = next(k for k in sorted(tensors) if "vision_model" in k and k.endswith("proj.weight"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights_file, metadata={"format": "pt"})
    assert weights_file.stat().st_size == size

    # Execute
    after = load_frozen_clip(str(model_copy), device="cpu")
    new_key = cache.key(after, images, views=0, seed=0)
    new_features = cache.features(after, images, views=0, seed=0)

    # Assert: a new key, and the features served are the new model's, not the stale ones
    assert new_key != old_key
    assert not torch.allclose(new_features, old_features)
    assert torch.equal(new_features, compute_features(after, images, views=0, seed=0))


def test_key_changes_with_the_image_processor_config(
    model_copy: Path, images: ImageSet, tmp_path: Path
) -> None:
    # Prepare
    cache = FeatureCache(tmp_path)
    old_key = cache.key(load_frozen_clip(str(model_copy), device="cpu"), images, views=0, seed=0)
    config_file = model_copy / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["image_mean"] = [m + 0.1 for m in config["image_mean"]]
    config_file.write_text(json.dumps(config))

    # Execute
    new_key = cache.key(load_frozen_clip(str(model_copy), device="cpu"), images, views=0, seed=0)

    # Assert
    assert new_key != old_key


def test_compute_features_views_are_normalised_seeded_and_view_zero_is_clean(
    clip: FrozenClip, images: ImageSet
) -> None:
    # Execute
    a = compute_features(clip, images, views=2, seed=0)
    a_again = compute_features(clip, images, views=2, seed=0)
    b = compute_features(clip, images, views=2, seed=1)
    clean = compute_features(clip, images, views=0, seed=5)

    # Assert
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3, len(images)))
    assert torch.equal(a, a_again)
    assert torch.equal(a[0], clean[0]) and torch.equal(b[0], clean[0])
    assert not torch.allclose(a[1], a[0]) and not torch.allclose(a[1:], b[1:])


def test_chunked_encoding_equals_encoding_at_once(clip: FrozenClip, images: ImageSet) -> None:
    # Execute: two images per chunk against all five in one
    chunked = compute_features(clip, images, views=0, seed=0, chunk=2)
    at_once = compute_features(clip, images, views=0, seed=0, chunk=512)

    # Assert: chunks change memory use, never the features
    torch.testing.assert_close(chunked, at_once)
