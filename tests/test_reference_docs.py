"""The documentation's reference pages are the code's: current, and complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpfpl_app.config import RunConfig
from dpfpl_app.service import reference_docs
from dpfpl_app.service.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference"

# How the app reads a node config key: node_config.get(K) / node_config[K], `K in
# node_config`, a comprehension over a tuple of keys, and the two helpers that take a key.
_READS = (
    r'node_config(?:\.get\(|\[)\s*("[a-z-]+"|[A-Z_]+)',
    r"\b([A-Z_]+) in (?:context\.)?node_config",
    r"\b(?:_flag|_positive)\([^,()]+,\s*([A-Z_]+)",
    r"node_config\W[^;]{0,80}?for \w+ in (\([^)]*\)|[A-Z_]+)",
)


def _node_config_keys_in_source() -> set[str]:
    """Every node config key some module of the app reads, constants resolved."""
    sources = [*(REPO / "dpfpl_app").rglob("*.py"), REPO / "client_app.py"]
    texts = [path.read_text() for path in sources]
    constants: dict[str, list[str]] = {}
    for text in texts:
        for name, value in re.findall(r"^([A-Z_]+) = (\"[a-z-]+\"|\([^)]*\))", text, re.M):
            constants[name] = re.findall(r'"([a-z-]+)"', value)
    keys: set[str] = set()
    for text in texts:
        for pattern in _READS:
            for found in re.findall(pattern, text, re.S):
                quoted = re.findall(r'"([a-z-]+)"', found)
                keys.update(constants.get(found, quoted))
    return keys


@pytest.mark.parametrize("path", sorted(reference_docs.PAGES))
def test_the_committed_reference_page_is_what_the_code_gives_now(path: str) -> None:
    committed = (REPO / path).read_text()

    assert committed == reference_docs.PAGES[path](), (
        f"{path} is stale: run `python -m dpfpl_app.service.reference_docs`"
    )


def test_the_check_mode_names_a_stale_page(tmp_path: Path) -> None:
    assert reference_docs.main(["--root", str(tmp_path)]) == 0
    assert reference_docs.main(["--root", str(tmp_path), "--check"]) == 0

    page = tmp_path / "docs" / "reference" / "cli.md"
    page.write_text(page.read_text() + "an edit by hand\n")

    assert reference_docs.stale_pages(tmp_path) == ["docs/reference/cli.md"]
    assert reference_docs.main(["--root", str(tmp_path), "--check"]) == 1


def test_every_run_config_field_has_a_row_with_its_default_and_description() -> None:
    page = (REFERENCE / "run-config.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines()
            if line.startswith("| `")}

    for name, field in RunConfig.model_fields.items():
        key = field.alias or name
        assert key in rows, f"run-config.md lacks {key}"
        assert field.description and " ".join(field.description.split()) in rows[key]
    assert "| `n-ctx` | int | `16` | >= 1, <= 60 |" in page
    assert '| `dp-mode` | one of `off`, `paper`, `per-sample` | `"per-sample"` |' in page


def test_every_node_config_key_the_app_reads_is_documented() -> None:
    read = _node_config_keys_in_source()
    documented = {k.key for k in reference_docs.node_keys()}
    page = (REFERENCE / "node-config.md").read_text()

    assert {"partition-id", "sample-rate", "privacy-budget", "dataset", "data-dir",
            "require-secure-aggregation", "secagg-registry", "worker-dir"} <= read
    assert read - documented == set(), "add these keys to reference_docs.node_keys"
    assert documented - read == set(), "node_keys names keys the app no longer reads"
    for key in documented:
        assert f"| `{key}` |" in page


def test_every_dpfpl_command_and_option_is_on_the_cli_page() -> None:
    page = (REFERENCE / "cli.md").read_text()
    parser = build_parser()
    (commands,) = (a for a in parser._actions if a.dest == "command")

    for name, sub in commands.choices.items():
        assert f"\n## {name}\n" in page
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, f"{name} {flag}"
