"""The deployment modules share one test process (``scheduling`` says why)."""

from __future__ import annotations

from pathlib import Path

from scheduling import DEPLOYMENT_MODULES, DEPLOYMENT_SCOPE, unit_of

TESTS = Path(__file__).parent


def test_every_module_that_starts_a_deployment_federation_is_in_the_shared_unit() -> None:
    # A new module starting its own federation beside the others would bring back the
    # load that failed Flower's and Ray's start-up deadlines
    starting = {
        path.name for path in TESTS.glob("test_*.py")
        if path.name != Path(__file__).name and "three_organisations(" in path.read_text()
    }
    assert starting == DEPLOYMENT_MODULES


def test_the_deployment_modules_are_one_unit_and_every_other_module_its_own() -> None:
    assert unit_of("tests/test_deployment.py::test_a") == DEPLOYMENT_SCOPE
    assert unit_of("tests/test_deployment_faults.py::test_b[x]") == DEPLOYMENT_SCOPE
    assert unit_of("tests/test_sweep.py::test_c") == "tests/test_sweep.py"
