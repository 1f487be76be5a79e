"""Session fixtures for the offline CLIP backbones (built once, reused by every test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dpfpl_app.backbone_build import CACHE_ENV, build_random_clip, ensure_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_backbone() -> Iterator[Path]:
    """The real default backbone, cached in ``<repo>/.cache/dpfpl`` so CI builds it once.

    ``DPFPL_CACHE`` stays pointed there while the fixture lives, so code that resolves the
    backbone by name during the session finds the same directory.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(REPO_ROOT / ".cache" / "dpfpl"))
        yield ensure_backbone("dpfpl-tiny-digits")


@pytest.fixture(scope="session")
def plumbing_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny CLIP (seed 0): proves loading and shapes, never accuracy."""
    return build_random_clip(tmp_path_factory.mktemp("backbones") / "random-plumbing-clip", seed=0)
