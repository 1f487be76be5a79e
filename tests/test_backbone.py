"""Loading a frozen CLIP and choosing its device and dtype."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch

from dpfpl_app.backbones.backbone import (
    load_frozen_clip,
    resolve_model_source,
    select_device,
    select_dtype,
)


def test_cpu_device_and_dtype() -> None:
    # Execute
    device = select_device("cpu")

    # Assert
    assert device == torch.device("cpu")
    assert select_dtype(device) is torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_device_falls_back_to_cpu_and_cuda_request_fails_clearly() -> None:
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='cuda' was requested but CUDA is not available"):
        select_device("cuda")


def test_load_frozen_clip_freezes_every_weight_and_sets_eval(plumbing_clip: Path) -> None:
    # Execute
    clip = load_frozen_clip(str(plumbing_clip), device="cpu")

    # Assert
    params = list(clip.model.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert all(not m.training for m in clip.model.modules())
    assert clip.dtype is torch.float32 and all(p.dtype is torch.float32 for p in params)
    assert clip.device == torch.device("cpu") and clip.source == str(plumbing_clip)
    assert clip.text_width == 128 and clip.context_length == 77
    assert clip.tokenizer.eos_token_id is not None and clip.processor is not None


def test_missing_model_directory_raises_file_not_found_naming_the_path() -> None:
    with pytest.raises(FileNotFoundError, match="'/nonexistent/dir'"):
        load_frozen_clip("/nonexistent/dir")


def test_directory_without_config_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    # Prepare
    empty = tmp_path / "not-a-model"
    empty.mkdir()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=rf"{empty}.*has no config\.json"):
        load_frozen_clip(str(empty))


def test_directory_with_config_but_no_weights_raises_file_not_found(
    plumbing_clip: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of the backbone without its weight file
    broken = tmp_path / "no-weights"
    shutil.copytree(plumbing_clip, broken)
    (broken / "model.safetensors").unlink()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=f"could not load CLIP '{broken}'"):
        load_frozen_clip(str(broken))


def test_resolve_model_source_passes_hub_ids_through_and_checks_paths(
    plumbing_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the hub cache holds the model (no network needed)
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}"
    )

    # Execute / Assert: hub ids are not touched; existing directories come back as paths
    assert resolve_model_source("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert resolve_model_source(str(plumbing_clip)) == str(plumbing_clip)
    with pytest.raises(FileNotFoundError, match="directory 'no-such-model' has no config.json"):
        resolve_model_source("./no-such-model")


@pytest.mark.parametrize("offline_flag", [True, False])
def test_an_unreachable_hub_model_fails_fast_naming_the_fix(
    offline_flag: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: not cached; offline either by HF_HUB_OFFLINE or by a hub that cannot answer
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline_flag)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    started = time.monotonic()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"'dpfpl-test/not-cached'.*point `model` at it"):
        resolve_model_source("dpfpl-test/not-cached")
    assert time.monotonic() - started < 5
