"""The glyph testbed: 100 named classes, font domains the backbone never saw, pure renders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dpfpl_app.backbones.tokenizer_build import caption_corpus
from dpfpl_app.config import RunConfig
from dpfpl_app.data import glyphs
from dpfpl_app.data.federated_data import load_federated_data, partitions_for, source_spec
from dpfpl_app.data.glyphs import DOMAINS, GLYPHS, PRETRAIN_FONTS, render, render_many
from dpfpl_app.data.image_styles import STYLED_DATASETS


def test_the_testbed_has_100_distinct_named_classes_and_at_least_4_domains() -> None:
    assert len(set(GLYPHS.class_names)) == len(GLYPHS.class_names) == 100
    assert all(name.isascii() and name == name.strip() for name in GLYPHS.class_names)
    assert len(DOMAINS) >= 4


def test_domains_use_fonts_the_backbone_never_pretrains_on() -> None:
    pretrain = {font.font_file for font in PRETRAIN_FONTS}
    assert pretrain.isdisjoint(domain.font_file for domain in DOMAINS)


def test_a_render_is_a_pure_function_of_style_class_variation_and_seed() -> None:
    # Prepare
    style, labels = DOMAINS[2], np.array([3, 50, 99, 3])
    variations = np.array([0, 7, 1, 5])
    # Execute
    batch = render_many(style, labels, variations, seed=1)
    one_by_one = [render(style, int(c), int(v), seed=1)
                  for c, v in zip(labels, variations, strict=True)]
    # Assert: order and batching change nothing; pose, seed and style each change the image
    assert batch.dtype == np.uint8 and batch.shape == (4, glyphs.IMAGE_SIDE, glyphs.IMAGE_SIDE)
    assert all(np.array_equal(a, b) for a, b in zip(batch, one_by_one, strict=True))
    assert not np.array_equal(batch[0], batch[3])  # same class, another pose
    assert not np.array_equal(batch[0], render(style, 3, 0, seed=2))
    assert not np.array_equal(batch[0], render(DOMAINS[0], 3, 0, seed=1))
    assert batch.max() > 200 and batch.min() < 50  # something drawn on a background


def test_the_pretraining_images_never_appear_in_a_domain() -> None:
    # Prepare: a small testbed of the same fonts, so the whole of it can be compared
    small = dataclasses.replace(GLYPHS, pretrain_variations=2, pool_variations=2)
    pretrain = {image.tobytes() for image in small.pretrain_pool().images}
    # Execute
    federated = small.federated_pool()
    # Assert
    assert len(federated) == 2 * 100 * len(DOMAINS)
    assert not any(image.tobytes() in pretrain for image in federated.images)


def test_a_glyph_image_set_renders_the_same_rows_in_each_clients_domain() -> None:
    # Prepare
    pool = GLYPHS.image_set().subset(np.array([5, 400, 7999]))
    # Execute
    garamond, chancery = pool.styled("garamond"), pool.styled("chancery")
    # Assert: labels follow the rows; pixels and feature-cache keys follow the domain
    assert pool.labels.tolist() == [0, 5, 99]
    expected = GLYPHS.domain_images("chancery", np.array([5, 400, 7999])).images
    assert all(np.array_equal(rgb[..., 0], img)
               for rgb, img in zip(chancery.rgb(0, 3), expected, strict=True))
    assert garamond.fingerprint != chancery.fingerprint != pool.fingerprint
    assert chancery.subset(np.array([1])).rgb(0, 1)[0].tobytes() == chancery.rgb(1, 2)[0].tobytes()


def test_an_unknown_domain_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known domains: .*'garamond'"):
        GLYPHS.image_set().styled("comic-sans")


def test_a_missing_font_names_the_debian_packages(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(glyphs, "FONT_DIRS", (tmp_path,))
    with pytest.raises(FileNotFoundError, match="apt-get install .*fonts-cmu"):
        glyphs.font_path("cmuntt.ttf")


def test_the_paper_split_gives_ten_classes_to_each_of_ten_clients_in_rotating_domains() -> None:
    # Prepare
    cfg = RunConfig.from_flower({"dataset": "font-glyphs", "model": "dpfpl-tiny-glyphs"})
    # Execute
    parts = partitions_for(cfg, 10)
    data = load_federated_data(source_spec(cfg), test_fraction=cfg.test_fraction, seed=cfg.seed)
    # Assert: every class held by exactly one client; neighbours are the other 90 classes
    assert [len(part.classes) for part in parts] == [10] * 10
    assert sorted(np.concatenate([part.classes for part in parts]).tolist()) == list(range(100))
    assert all(len(np.unique(data.test.labels[part.neighbour_test])) == 90 for part in parts)
    styled = STYLED_DATASETS["font-glyphs"]
    assert [styled.style_of(i) for i in range(7)] == [*glyphs.DOMAIN_NAMES, "garamond"]


def test_glyph_names_stay_out_of_the_first_backbones_tokenizer_corpus() -> None:
    # the digits backbones' vocabulary (hence their weights) must not change as datasets arrive
    corpus = " ".join(caption_corpus())
    assert "cyrillic" not in corpus and "greek" not in corpus
    assert "cyrillic capital zhe" in " ".join(caption_corpus(("glyphs",)))


def test_a_federation_of_one_client_per_domain_runs_on_the_glyph_testbed(
    plumbing_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the real apps, one client per domain, random weights, no DP: wiring only
    # (per-sample DP over 100 classes costs B text-encoder backward passes per step), on
    # the same 100 classes and domains with 10 poses per class instead of 80 (the clients
    # run in this process, so they read the smaller testbed from the registry)
    import json

    import client_app as client_module
    import server_app as server_module
    from dpfpl_app.data.offline_data import DATASETS
    from tests.flower_harness import federation_config, run_server_app

    monkeypatch.setitem(DATASETS, "glyphs", dataclasses.replace(GLYPHS, pool_variations=10))
    cfg = federation_config(tmp_path, **{
        "dataset": "font-glyphs", "model": str(plumbing_clip), "min-nodes": 6,
        "num-server-rounds": 1, "dp-mode": "off", "batch-size": 8, "feature-views": 0})
    # Execute
    run_server_app(server_module.app, client_app=client_module.app, num_nodes=6,
                   run_config=cfg)
    # Assert: all six clients trained and were evaluated on their own classes and the
    # others' (accuracies in [0, 1], per client and averaged)
    doc = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    assert doc["status"] == "completed"
    last = doc["rounds"][-1]
    assert last["accepted"] == last["eval-accepted"] == 6, last
    per_client = {key: value for key, value in last.items() if key.startswith("harmonic-acc/")}
    assert len(per_client) == 6, sorted(last)
    assert all(0.0 <= value <= 1.0 for value in [*per_client.values(), last["harmonic-acc"]])
    assert 0.0 <= last["neighbour-acc"] <= 1.0


def test_the_install_script_installs_every_font_package_the_testbed_names() -> None:
    script = (Path(__file__).resolve().parents[1] / "scripts" / "install.sh").read_text()
    line = next(row for row in script.splitlines() if row.startswith("fonts="))
    assert set(line.split("=", 1)[1].strip('"').split()) == set(glyphs.FONT_PACKAGES)
