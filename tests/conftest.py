"""Session fixtures for the offline CLIP backbones (built once, reused by every test), and
each test's CPU priority (``priority`` says why real-process tests go first).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from priority import niceness_for, set_niceness
from scheduling import DeploymentsOneAfterTheOther

from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.backbones.backbone_build import build_random_clip, ensure_backbone
from dpfpl_app.cache import CACHE_ENV, cache_root


def pytest_configure(config: pytest.Config) -> None:
    """Start nicer than the session; ``pytest_runtest_setup`` moves each test to its level."""
    set_niceness(niceness_for(real_processes=False))  # raising one's niceness needs no root


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``slow`` test (real Flower or Ray processes) at the session's niceness, before
    its fixtures start any process (they inherit it); every other test nicer.
    """
    set_niceness(niceness_for(real_processes=item.get_closest_marker("slow") is not None))


@pytest.fixture(scope="session")
def digits_backbone() -> Iterator[Path]:
    """The real default backbone, in the cache ``dpfpl`` itself uses (``$DPFPL_CACHE``, else
    ``~/.cache/dpfpl``), so the tests reuse the one the quickstart built.

    ``DPFPL_CACHE`` stays pointed there while the fixture lives, so code that resolves the
    backbone by name during the session (also in processes started with another HOME)
    finds the same directory.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache_root()))
        yield ensure_backbone("dpfpl-tiny-digits")


@pytest.fixture(scope="session")
def plumbing_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny CLIP (seed 0): proves loading and shapes, never accuracy."""
    return build_random_clip(tmp_path_factory.mktemp("backbones") / "random-plumbing-clip", seed=0)


@pytest.fixture(scope="session")
def clip(plumbing_clip: Path) -> FrozenClip:
    """The plumbing CLIP loaded frozen on the CPU, shared by the unit tests."""
    return load_frozen_clip(str(plumbing_clip), device="cpu")


@pytest.fixture(autouse=True)
def loggers_restored() -> Iterator[None]:
    """Each test leaves the root and app loggers' handlers as it found them.

    ``dpfpl``'s ``main`` rebinds the root logger to the ``sys.stderr`` of the moment,
    which inside a test is pytest's capture stream, closed when the test ends. Every
    later test in the same process then lost its log lines to "I/O operation on closed
    file", among them the reason a sweep cell failed in CI.
    """
    loggers = [logging.getLogger(), logging.getLogger("dpfpl_app")]
    saved = [(list(lg.handlers), lg.level) for lg in loggers]
    yield
    for lg, (handlers, level) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: one thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-process tests first, so that their modules start first.

    They are the longest (minutes, most of it waiting on Flower's processes), and with
    ``--dist loadfile --no-loadscope-reorder`` pytest-xdist hands modules out in this
    order: started last, they would run alone at the end while the other test processes
    sat idle. The sort is stable, so the order inside each group is unchanged.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``--dist loadfile``, the deployment modules in one process (``scheduling``)."""
    if config.getoption("dist") != "loadfile":
        return None
    return DeploymentsOneAfterTheOther(config, log)
