"""The ``dpfpl`` command itself: cheap to start, every option explained."""

from __future__ import annotations

import argparse
import subprocess
import sys

from dpfpl_app.service import cli


def test_importing_the_cli_loads_no_torch_transformers_or_opacus() -> None:
    # a fresh interpreter: this test process may already hold torch
    probe = (
        "import sys, dpfpl_app.service.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'opacus', 'flwr') if m in sys.modules))"
    )

    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout

    assert out.strip() == "[]"


def test_help_builds_without_heavy_imports_and_every_option_has_help() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    missing = [
        f"{name} {action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]

    assert set(subparsers.choices) >= {"build-backbone", "summary", "predict", "sweep"}
    assert missing == []
