"""requirements.lock: what scripts/install.sh installs, pinned, and what is installed here."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    return [Requirement(r) for r in declared]


@pytest.mark.parametrize("requirement", _declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(requirement: Requirement) -> None:
    pinned = _pins().get(canonicalize_name(requirement.name))

    assert pinned is not None, f"{requirement.name} is not locked: run bash scripts/lock.sh"
    assert requirement.specifier.contains(pinned, prereleases=True)


def test_torch_is_the_cpu_wheel_and_flower_the_tested_release() -> None:
    pins = _pins()

    assert pins["torch"] == "2.13.0+cpu"
    assert pins["flwr"] == "1.42.0"
    assert canonicalize_name("dpfpl") not in pins  # the project itself is never locked


@pytest.mark.parametrize("name", ["flwr", "transformers", "opacus", "pydantic", "numpy"])
def test_this_environment_is_the_locked_one(name: str) -> None:
    # install.sh installs with the lock as constraints: anything else means a stale venv
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed")

    assert installed == _pins()[canonicalize_name(name)], "rerun bash scripts/install.sh"


def test_install_uses_the_lock_and_lock_sh_rewrites_it() -> None:
    install = (REPO / "scripts" / "install.sh").read_text()
    lock_sh = (REPO / "scripts" / "lock.sh").read_text()

    assert "LOCK=requirements.lock" in install and '-c "$constraints"' in install
    assert "pip freeze --exclude-editable" in lock_sh and "requirements.lock" in lock_sh
