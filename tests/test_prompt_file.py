"""The released-prompt file: round trip, integrity, and refusal of broken or edited files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.config import DPMode, Method
from dpfpl_app.method.prompt_file import (
    FORMAT_NAME,
    PromptFile,
    PromptFileError,
    PromptMetadata,
    PromptPrivacy,
    backbone_fingerprint,
    load_prompt_file,
    utc_now,
)
from dpfpl_app.privacy.dp_channel import MEANINGS, Guarantee


def _prompt_file(clip: FrozenClip, n_ctx: int = 4) -> PromptFile:
    prompt = torch.randn(n_ctx, clip.text_width, generator=torch.Generator().manual_seed(0))
    metadata = PromptMetadata(
        backbone=clip.source,
        backbone_sha256=backbone_fingerprint(clip),
        text_width=clip.text_width,
        n_ctx=n_ctx,
        method=Method.DPFPL,
        rank=2,
        class_names=("zero", "one", "two"),
        dp_mode=DPMode.PER_SAMPLE,
        privacy=PromptPrivacy(
            guarantee=Guarantee.ACCOUNTED,
            meaning=MEANINGS[Guarantee.ACCOUNTED],
            epsilon=1.5,
            delta=1e-5,
            steps=3,
        ),
        dataset="digits",
        partition_id=0,
        rounds_done=3,
        created=utc_now(),
    )
    return PromptFile(prompt=prompt, metadata=metadata)


def _rewrite(path: Path, *, tensor: torch.Tensor | None = None, **changes: object) -> None:
    """Write the file again as an editor would: same layout, edited content, old hash kept."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[FORMAT_NAME])
        prompt = handle.get_tensor("prompt")
    header.update(changes)
    save_file(
        {"prompt": prompt if tensor is None else tensor},
        str(path),
        metadata={FORMAT_NAME: json.dumps(header)},
    )


def test_save_load_round_trip_keeps_prompt_and_metadata(clip: FrozenClip, tmp_path: Path) -> None:
    original = _prompt_file(clip)

    path = original.save(tmp_path / "p.safetensors")
    loaded = load_prompt_file(path)

    assert torch.equal(loaded.prompt, original.prompt)
    assert loaded.metadata.model_copy(update={"content_sha256": ""}) == original.metadata
    assert len(loaded.metadata.content_sha256) == 64
    assert path.stat().st_mode & 0o077 == 0  # private until the organisation releases it


def test_changed_tensor_bytes_are_detected(clip: FrozenClip, tmp_path: Path) -> None:
    # Prepare: flip one bit of the last float in place (the file still parses)
    path = _prompt_file(clip).save(tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(PromptFileError, match="integrity check"):
        load_prompt_file(path)


def test_replaced_prompt_with_original_metadata_is_detected(
    clip: FrozenClip, tmp_path: Path
) -> None:
    path = _prompt_file(clip).save(tmp_path / "p.safetensors")
    _rewrite(path, tensor=torch.zeros(4, clip.text_width))

    with pytest.raises(PromptFileError, match="integrity check"):
        load_prompt_file(path)


@pytest.mark.parametrize(
    "changes",
    [
        {
            "privacy": {
                "guarantee": "accounted",
                "meaning": MEANINGS[Guarantee.ACCOUNTED],
                "epsilon": 0.1,
                "delta": 1e-5,
                "steps": 3,
            }
        },
        {"class_names": ["one", "zero", "two"]},
        {"backbone_sha256": "sha256:" + "0" * 64},
    ],
    ids=["lowered-epsilon", "reordered-classes", "other-backbone"],
)
def test_edited_metadata_is_detected(changes: dict, clip: FrozenClip, tmp_path: Path) -> None:
    path = _prompt_file(clip).save(tmp_path / "p.safetensors")
    _rewrite(path, **changes)

    with pytest.raises(PromptFileError, match="integrity check"):
        load_prompt_file(path)


def test_truncated_file_is_refused_with_a_clear_error(clip: FrozenClip, tmp_path: Path) -> None:
    path = _prompt_file(clip).save(tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(PromptFileError, match="truncated or not safetensors"):
        load_prompt_file(path)


def test_files_that_are_not_dpfpl_prompts_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"prompt": torch.zeros(2, 3)}, str(plain))
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2, 3)}, str(other), metadata={FORMAT_NAME: "{}"})
    text = tmp_path / "text.safetensors"
    text.write_text("not a tensor file")

    with pytest.raises(PromptFileError, match="no 'dpfpl-prompt' metadata"):
        load_prompt_file(plain)
    with pytest.raises(PromptFileError, match="expected 'prompt'"):
        load_prompt_file(other)
    with pytest.raises(PromptFileError, match="not a readable prompt file"):
        load_prompt_file(text)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.safetensors")


def test_metadata_must_match_the_prompt_shape(clip: FrozenClip, tmp_path: Path) -> None:
    good = _prompt_file(clip)
    bad = PromptFile(prompt=torch.zeros(5, clip.text_width), metadata=good.metadata)

    with pytest.raises(PromptFileError, match=r"shape \(5, "):
        bad.save(tmp_path / "p.safetensors")


def test_exports_reuse_the_stored_weights_hash_and_checks_hash_afresh(
    clip: FrozenClip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpfpl_app.method import prompt_file as module

    # Prepare: a first export hashes the weights and stores the hash on node-local disk
    monkeypatch.setenv("DPFPL_CACHE", str(tmp_path))
    module._weights_hash.cache_clear()
    first = module.backbone_fingerprint(clip)
    assert list((tmp_path / "weight-hashes").iterdir())

    # Execute: a fresh process (empty memory cache) that must not hash again
    module._weights_hash.cache_clear()
    hashed: list[Path] = []
    real = module.weights_sha256
    monkeypatch.setattr(module, "weights_sha256", lambda d: hashed.append(d) or real(d))
    again = module.backbone_fingerprint(clip)
    checked = module.backbone_fingerprint(clip, disk_cache=False)

    # Assert: the export reused the stored hash; the check recomputed it
    assert first == again == checked
    assert len(hashed) == 1
    module._weights_hash.cache_clear()
