"""The learning-rate search's rule: the validation harmonic mean chooses, and its choices
are a file the sweep reads back.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dpfpl_app.config import Method
from dpfpl_app.service.sweep_cli import method_config

# by path: an installed package (a dependency's) already owns the name "benchmarks"
_SPEC = importlib.util.spec_from_file_location(
    "tune_lr", Path(__file__).resolve().parents[1] / "benchmarks" / "tune_lr.py"
)
assert _SPEC is not None and _SPEC.loader is not None
tune_lr = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tune_lr)


def _row(method: str, lr: float, harmonic: float, local: float) -> dict[str, object]:
    return {"method": method, "lr": lr, tune_lr.CRITERION: harmonic,
            tune_lr.MEASURED["local"]: local, tune_lr.MEASURED["neighbour"]: 0.3}


def test_the_harmonic_mean_chooses_not_local_accuracy_and_ties_go_to_the_lower_rate(
    tmp_path: Path,
) -> None:
    rows = [
        # a rate that only raises a client's own classes loses to a balanced one
        _row("dpfpl", 0.03, harmonic=0.40, local=0.45),
        _row("dpfpl", 0.3, harmonic=0.36, local=0.70),
        _row("promptfl", 0.03, harmonic=0.41, local=0.40),
        _row("promptfl", 0.1, harmonic=0.41, local=0.42),
    ]

    chosen = tune_lr.best(rows)

    assert chosen == {"dpfpl": 0.03, "promptfl": 0.03}
    path = tmp_path / "method-config.toml"
    path.write_text(tune_lr.method_config(chosen, "searched on seed 0"))
    assert method_config(str(path)) == {
        Method.DPFPL: {"lr-local": 0.03, "lr-global": 0.03},
        Method.PROMPTFL: {"lr-local": 0.03, "lr-global": 0.03},
    }
