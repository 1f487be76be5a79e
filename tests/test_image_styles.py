"""Styled digits (each client sees the digits through one style) and the tuning holdout."""

from __future__ import annotations

import numpy as np
import pytest

from dpfpl_app.config import RunConfig
from dpfpl_app.data.data_sources import ImageSet
from dpfpl_app.data.federated_data import load_federated_data, source_spec, validation_data
from dpfpl_app.data.image_styles import STYLED_DATASETS, STYLES, apply_style
from dpfpl_app.data.offline_data import federated_pool, pretrain_pool

IMAGES = federated_pool("digits").images[:20]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_changes_the_pixels_and_is_a_pure_function_of_the_image(style: str) -> None:
    # Execute
    once, again = apply_style(style, IMAGES), apply_style(style, IMAGES.copy())

    # Assert
    assert once.dtype == np.uint8 and once.shape == IMAGES.shape
    assert np.array_equal(once, again)
    assert not np.array_equal(once, IMAGES)
    assert np.array_equal(IMAGES, federated_pool("digits").images[:20])  # input untouched


def test_unknown_style_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known styles: .*'thick'"):
        apply_style("sepia", IMAGES)


def test_styled_digits_use_the_digits_federated_pool_never_the_pretraining_images() -> None:
    # Prepare
    cfg = RunConfig.from_flower({"dataset": "styled-digits"})
    pretrain = {img.tobytes() for img in pretrain_pool("digits").images}

    # Execute
    data = load_federated_data(source_spec(cfg), test_fraction=0.3, seed=0)
    digits = load_federated_data(
        source_spec(RunConfig.from_flower({"dataset": "digits"})), test_fraction=0.3, seed=0
    )

    # Assert: the same unstyled split as digits; no image the backbone pretrained on
    assert data.train.fingerprint == digits.train.fingerprint
    assert data.test.fingerprint == digits.test.fingerprint
    for part in (data.train, data.test):
        images = [rgb[..., 0] for rgb in part.rgb(0, len(part))]
        assert not any(img.tobytes() in pretrain for img in images)


def test_a_styled_image_set_reads_styled_pixels_under_its_own_fingerprint() -> None:
    # Prepare
    plain = ImageSet.from_arrays(federated_pool("digits")).subset(np.arange(5))
    styled = STYLED_DATASETS["styled-digits"]

    # Execute
    thick, thin = plain.styled("thick"), plain.styled("thin")

    # Assert: pixels styled; features of different styles can never share a cache key
    expected = apply_style("thick", np.stack([rgb[..., 0] for rgb in plain.rgb(0, 5)]))
    assert np.array_equal(np.stack([rgb[..., 0] for rgb in thick.rgb(0, 5)]), expected)
    assert len({plain.fingerprint, thick.fingerprint, thin.fingerprint}) == 3
    assert thick.fingerprint == plain.styled("thick").fingerprint
    assert [styled.style_of(i) for i in (0, 5)] == [styled.styles[0]] * 2
    assert len({styled.style_of(i) for i in range(10)}) == len(styled.styles) == 5


def test_validation_holdout_is_carved_from_the_train_pool_and_never_holds_a_test_image() -> None:
    # Prepare
    data = load_federated_data(
        source_spec(RunConfig.from_flower({"dataset": "styled-digits"})), test_fraction=0.3, seed=0
    )

    # Execute
    tuning = validation_data(data, validation_fraction=0.3, seed=0)

    # Assert: train' and validation split the train rows; no test row is used at all
    train, val, test = (set(s.rows.tolist()) for s in (tuning.train, tuning.test, data.test))
    assert train | val == set(data.train.rows.tolist()) and not train & val
    assert not (train | val) & test
    assert set(tuning.test.labels.tolist()) == set(data.train.labels.tolist())  # every class
