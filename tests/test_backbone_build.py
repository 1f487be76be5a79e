"""Tests for the offline tokenizer and the offline CLIP backbones."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
)

from dpfpl_app.backbones import backbone_build
from dpfpl_app.backbones.backbone_build import (
    BACKBONES,
    METADATA_FILE,
    build_pretrained_backbone,
    build_random_clip,
    ensure_backbone,
    weights_sha256,
)
from dpfpl_app.backbones.pretraining import zero_shot_accuracy
from dpfpl_app.backbones.tokenizer_build import (
    CONTEXT_LENGTH,
    LEGACY_VOCABULARY,
    build_tokenizer,
)
from dpfpl_app.cache import cache_root
from dpfpl_app.data.image_processing import (
    GRAY_MEAN,
    GRAY_STD,
    images_to_pixel_values,
    load_image_processor,
)
from dpfpl_app.data.offline_data import (
    DATASETS,
    federated_pool,
    index_hash,
    load_with_split,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
N_CTX = 16  # CoOp's context length, the longest prompt the federated code builds


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("loader", [CLIPTokenizer, AutoTokenizer], ids=["clip", "auto"])
def test_tokenizer_encodes_a_caption_word_by_word(tokenizer_dir: Path, loader: type) -> None:
    # Prepare
    tokenizer = loader.from_pretrained(tokenizer_dir)
    # Execute
    ids = tokenizer("a photo of a sandal.")["input_ids"]
    # Assert
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "sandal</w>", ".</w>",
        "<|endoftext|>"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.model_max_length == CONTEXT_LENGTH


@pytest.mark.parametrize("text", ["a photo of a sandal", "the digit seven, handwritten!",
                                  "quixotic zebras jump 42 times"])
def test_tokenizer_round_trips_lowercase_text(tokenizer_dir: Path, text: str) -> None:
    # Prepare
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # Execute
    ids = tokenizer(text)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    # Assert: CLIP decoding puts a space before punctuation and between digits
    # (each digit is its own word), otherwise the text comes back unchanged.
    assert decoded.replace(" ", "") == text.replace(" ", "")
    assert ids.count(tokenizer.eos_token_id) == 1  # EOS doubles as UNK: nothing was unknown


def test_tokenizer_pads_to_context_length_with_eos_largest(tokenizer_dir: Path) -> None:
    # Prepare
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # Execute
    batch = tokenizer(["a photo of a bag.", "a photo of an ankle boot."],
                      padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt")
    # Assert
    assert batch["input_ids"].shape == (2, CONTEXT_LENGTH)
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # CoOp finds EOS with argmax
    eos_positions = batch["input_ids"].argmax(dim=-1)
    assert eos_positions.tolist() == (batch["attention_mask"].sum(dim=-1) - 1).tolist()


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_class_names_fit_a_coop_prompt(tokenizer_dir: Path, dataset: str,
                                      tmp_path: Path) -> None:
    # Prepare: the tokenizer of the backbone that learns this dataset
    if dataset not in LEGACY_VOCABULARY:
        tokenizer_dir = build_tokenizer(tmp_path, (dataset,))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    for name in DATASETS[dataset].class_names:
        prompt = " ".join(["x"] * N_CTX) + f" {name}."
        # Execute
        ids = tokenizer(prompt)["input_ids"]
        # Assert
        assert len(ids) <= CONTEXT_LENGTH, name
        assert len(tokenizer(name)["input_ids"]) <= 6, f"{name!r} is not compactly tokenised"


def test_tokenizer_build_is_identical_in_a_fresh_process(tokenizer_dir: Path,
                                                         tmp_path: Path) -> None:
    # Execute: another interpreter, so hash-seed-dependent ordering would show
    code = ("from pathlib import Path; "
            "from dpfpl_app.backbones.tokenizer_build import build_tokenizer; "
            f"build_tokenizer(Path({str(tmp_path)!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "123"})
    # Assert
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


# ---------------------------------------------------------------- random plumbing CLIP


def test_plumbing_clip_loads_with_transformers(plumbing_clip: Path) -> None:
    # Execute
    model = CLIPModel.from_pretrained(plumbing_clip)
    tokenizer = CLIPTokenizer.from_pretrained(plumbing_clip)
    processor = CLIPImageProcessor.from_pretrained(plumbing_clip)
    # Assert
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (128, 4, 4)
    assert text.max_position_embeddings == CONTEXT_LENGTH
    assert text.vocab_size == len(tokenizer)
    assert (text.bos_token_id, text.eos_token_id) == (tokenizer.bos_token_id,
                                                      tokenizer.eos_token_id)
    assert (vision.image_size, vision.patch_size, model.config.projection_dim) == (32, 4, 128)
    assert processor.crop_size == {"height": 32, "width": 32}
    metadata = json.loads((plumbing_clip / METADATA_FILE).read_text())
    assert metadata["name"] == "random-plumbing-clip"


def test_plumbing_clip_runs_a_forward_pass(plumbing_clip: Path) -> None:
    # Prepare
    model = CLIPModel.from_pretrained(plumbing_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(plumbing_clip)
    pixels = images_to_pixel_values(load_image_processor(plumbing_clip),
                                    np.zeros((3, 8, 8), dtype=np.uint8))
    tokens = tokenizer(["a photo of a one.", "a photo of a two."], padding="max_length",
                       max_length=CONTEXT_LENGTH, return_tensors="pt")
    # Execute
    with torch.inference_mode():
        out = model(pixel_values=pixels, **tokens)
    # Assert
    assert out.logits_per_image.shape == (3, 2)
    assert torch.isfinite(out.logits_per_image).all()


def test_random_clip_weights_depend_only_on_the_seed(plumbing_clip: Path,
                                                      tmp_path: Path) -> None:
    # Execute
    same = build_random_clip(tmp_path / "same", seed=0)
    other = build_random_clip(tmp_path / "other", seed=1)
    # Assert
    assert weights_sha256(same) == weights_sha256(plumbing_clip)
    assert weights_sha256(other) != weights_sha256(plumbing_clip)


def test_images_to_pixel_values_maps_grayscale_to_normalised_rgb(plumbing_clip: Path) -> None:
    # Prepare
    processor = load_image_processor(plumbing_clip)
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    images[1] = 255
    # Execute
    pixels = images_to_pixel_values(processor, images)
    # Assert
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    black = (0.0 - GRAY_MEAN) / GRAY_STD
    white = (1.0 - GRAY_MEAN) / GRAY_STD
    torch.testing.assert_close(pixels[0], torch.full((3, 32, 32), black))
    torch.testing.assert_close(pixels[1], torch.full((3, 32, 32), white))


def test_images_to_pixel_values_rejects_colour_images(plumbing_clip: Path) -> None:
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, H, W\)"):
        images_to_pixel_values(load_image_processor(plumbing_clip),
                               np.zeros((2, 8, 8, 3), dtype=np.uint8))


# ---------------------------------------------------------------- pretrained backbone


def test_pretraining_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    # Prepare: a short schedule (3 steps draw batches, augment and step the optimiser,
    # all of what a seed must fix); the full one is exercised by the digits_backbone fixture
    settings = {"datasets": ("digits",), "steps": 3, "batch_size": 32, "progress": False}
    # Execute
    first = build_pretrained_backbone(tmp_path / "a", seed=0, **settings)
    again = build_pretrained_backbone(tmp_path / "b", seed=0, **settings)
    other = build_pretrained_backbone(tmp_path / "c", seed=1, **settings)
    # Assert
    assert weights_sha256(first) == weights_sha256(again)
    assert weights_sha256(other) != weights_sha256(first)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"datasets": ()}, "datasets must name at least one"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"batch_size": 1}, "batch_size >= 2"),
        ({"datasets": ("cifar10",)}, "unknown offline dataset 'cifar10'"),
    ],
)
def test_pretraining_rejects_bad_settings(tmp_path: Path, kwargs: dict, match: str) -> None:
    settings = {"datasets": ("digits",), "steps": 1, "batch_size": 8, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        build_pretrained_backbone(tmp_path, **settings)


def test_digits_backbone_is_complete_and_records_its_split(digits_backbone: Path) -> None:
    # Prepare
    _, pretrain, federated = load_with_split("digits")
    # Execute
    metadata = json.loads((digits_backbone / METADATA_FILE).read_text())
    # Assert
    assert metadata["name"] == "dpfpl-tiny-digits"
    assert metadata["datasets"] == ["digits"]
    assert metadata["data"]["digits"]["pretrain_index_sha256"] == index_hash(pretrain)
    assert metadata["data"]["digits"]["pretrain_count"] == len(pretrain)
    assert metadata["data"]["digits"]["zero_shot_eval_count"] == len(federated)
    assert metadata["weights_sha256"] == weights_sha256(digits_backbone)
    assert CLIPModel.from_pretrained(digits_backbone).config.text_config.max_position_embeddings \
        == CONTEXT_LENGTH


def test_digits_backbone_zero_shot_is_far_above_chance(digits_backbone: Path) -> None:
    # Prepare: images the backbone never saw
    pool = federated_pool("digits")
    template = DATASETS["digits"].caption_templates[0]
    # Execute
    accuracy = zero_shot_accuracy(digits_backbone, pool, template)
    # Assert: measured 0.984 (seed 0; seeds 1 and 2 of the same recipe: 0.970, 0.985);
    # chance is 0.1
    assert accuracy > 0.85


# ---------------------------------------------------------------- cache


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("DPFPL_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("DPFPL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "dpfpl"


def test_ensure_backbone_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="known names: .*'dpfpl-tiny-digits'"):
        ensure_backbone("clip-vit-huge")


def test_ensure_backbone_builds_once_then_reuses(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    # Prepare
    monkeypatch.setenv("DPFPL_CACHE", str(tmp_path))
    built = ensure_backbone("random-plumbing-clip")

    def must_not_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a complete backbone was rebuilt")

    monkeypatch.setattr(backbone_build, "build_backbone", must_not_build)
    # Execute
    again = ensure_backbone("random-plumbing-clip")
    # Assert
    assert built == again == tmp_path / "backbones" / "random-plumbing-clip"
    assert (built / METADATA_FILE).is_file()


def test_interrupted_build_leaves_nothing_that_looks_complete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: a build that writes weights, then is interrupted before its metadata
    monkeypatch.setenv("DPFPL_CACHE", str(tmp_path))

    def interrupted(spec: object, out_dir: Path, **kwargs: object) -> Path:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(backbone_build, "build_backbone", interrupted)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        ensure_backbone("random-plumbing-clip")
    # Assert
    parent = tmp_path / "backbones"
    assert not (parent / "random-plumbing-clip").exists()
    assert not list(parent.glob(".random-plumbing-clip.building-*"))


def test_incomplete_cached_directory_is_rebuilt(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    # Prepare: a directory without metadata, e.g. copied by hand or from an old version
    monkeypatch.setenv("DPFPL_CACHE", str(tmp_path))
    stale = tmp_path / "backbones" / "random-plumbing-clip"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"stale")
    # Execute
    path = ensure_backbone("random-plumbing-clip")
    # Assert
    assert (path / METADATA_FILE).is_file()
    assert CLIPModel.from_pretrained(path).config.projection_dim == 128


def test_backbone_table_names_match_their_specs() -> None:
    assert {"dpfpl-tiny-digits", "dpfpl-tiny-digits-fashion", "random-plumbing-clip"} <= set(
        BACKBONES)
    assert all(spec.name == name for name, spec in BACKBONES.items())


def test_a_cached_backbone_whose_recipe_changed_is_rebuilt(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    # Prepare: a finished build, then the project changes the recipe under the same name
    monkeypatch.setenv("DPFPL_CACHE", str(tmp_path))
    old = ensure_backbone("random-plumbing-clip")
    spec = BACKBONES["random-plumbing-clip"]
    assert backbone_build.recipe_changes(old, spec) == []
    changed = dataclasses.replace(spec, image_size=spec.image_size * 2)
    monkeypatch.setitem(BACKBONES, "random-plumbing-clip", changed)
    # Execute
    new = ensure_backbone("random-plumbing-clip")
    # Assert: rebuilt to the new recipe, and that build is then reused as current
    assert CLIPModel.from_pretrained(new).config.vision_config.image_size == changed.image_size
    assert backbone_build.recipe_changes(new, changed) == []
