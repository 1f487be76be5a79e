"""The app's shipped configuration: pyproject, RunConfig and the documentation agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from dpfpl_app.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_run_config_is_valid_and_equals_the_defaults() -> None:
    shipped = _pyproject()["tool"]["flwr"]["app"]["config"]

    cfg = RunConfig.from_flower(shipped)

    assert cfg == RunConfig()
    assert set(shipped) == set(RunConfig().to_flower())


def test_pyproject_has_no_federations_table_and_names_the_components() -> None:
    flwr = _pyproject()["tool"]["flwr"]

    assert "federations" not in flwr  # flwr run rewrites it; federations live in FLWR_HOME
    assert flwr["app"]["components"] == {
        "serverapp": "server_app:app",
        "clientapp": "client_app:app",
    }


@pytest.mark.parametrize("key", sorted(RunConfig().to_flower()))
def test_the_run_config_reference_documents_every_key(key: str) -> None:
    assert f"| `{key}` |" in (REPO / "docs" / "reference" / "run-config.md").read_text()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")))
def test_shipped_run_config_files_validate(path: Path) -> None:
    overrides = tomllib.loads(path.read_text())
    if overrides and all(isinstance(v, dict) for v in overrides.values()):
        # one table per method: a `dpfpl sweep --method-config` file
        from dpfpl_app.service.sweep_cli import method_config

        for method, values in method_config(str(path)).items():
            RunConfig.from_flower({**RunConfig().to_flower(), "method": method.value, **values})
        return

    RunConfig.from_flower({**RunConfig().to_flower(), **overrides})


def test_the_app_bundle_ships_the_app_and_nothing_of_tests_docs_or_deployment(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys
    import zipfile

    flwr = str(Path(sys.executable).with_name("flwr"))
    out = subprocess.run(
        [flwr, "build", "--app", str(REPO)], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, check=False,
    )
    bundles = list(tmp_path.glob("*.fab"))
    assert len(bundles) == 1, out.stdout + out.stderr

    names = zipfile.ZipFile(bundles[0]).namelist()

    shipped = {"client_app.py", "server_app.py", "pyproject.toml", "dpfpl_app/federation/wire.py"}
    assert shipped <= set(names)
    shipped_dirs = {n.split("/")[0] for n in names if "/" in n}
    assert shipped_dirs == {".info", "dpfpl_app"}, shipped_dirs


@pytest.mark.parametrize("app", ["server_app", "client_app"])
def test_a_bad_run_config_stops_the_app_before_torch_is_imported(app: str) -> None:
    # a fresh interpreter: validating must not wait for torch, transformers or opacus
    probe = f"""
import sys
from flwr.app import Context, RecordDict
import {app} as module
from dpfpl_app.config import ConfigError
context = Context(run_id=1, node_id=1, node_config={{"partition-id": 0, "num-partitions": 1}},
                  state=RecordDict(), run_config={{"rank": 32, "n-ctx": 16}})
try:
    module.main(None, context) if "{app}" == "server_app" else module.train(None, context)
except ConfigError as err:
    print("refused:", err)
print("torch" in sys.modules)
"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )

    assert "refused: invalid run config:" in out.stdout, out.stderr
    assert "rank=32 exceeds n-ctx=16" in out.stdout
    assert out.stdout.strip().endswith("False"), out.stdout


def test_check_config_names_an_unknown_key_flower_would_refuse_without_naming(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dpfpl_app.service.cli import main

    assert main(["check-config", "--app-dir", str(REPO), "epsilon=2.0 seed=3"]) == 0
    assert main(["check-config", "--app-dir", str(REPO), "learning-rate=0.1"]) == 2

    err = capsys.readouterr().err
    assert "learning-rate: unknown key; known keys:" in err and "lr-global" in err


def test_the_layout_page_module_table_lists_every_module() -> None:
    layout = (REPO / "docs" / "development" / "layout.md").read_text()
    table = layout[layout.index("| module (under `dpfpl_app/`) | holds |") :].split("\n\n", 1)[0]
    named = {
        name.split("(")[0].strip().removesuffix(".py")
        for row in table.splitlines()[2:]
        for name in row.split("|")[1].replace("`", "").replace("*", "").split(",")
    }

    package = REPO / "dpfpl_app"
    listed_whole = {"secagg", "audit"}  # packages the table names as a whole
    modules = {
        str(p.relative_to(package).with_suffix(""))
        for p in package.rglob("*.py")
        if p.stem != "__init__" and p.relative_to(package).parts[0] not in listed_whole
    }
    modules |= {f"{p.parent.name}/" for p in package.glob("*/__init__.py")}  # sub-packages

    assert modules - named == set(), "add these modules to docs/development/layout.md's table"
    assert named - modules - {"client_app", "server_app"} == set(), "the table names gone modules"
