"""Paired differences between a sweep's methods: seed by seed, with a 95% t interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpfpl_app.config import Method
from dpfpl_app.service.sweep_grid import Cell, SweepSpec
from dpfpl_app.service.sweep_pairs import Pair, pairs
from dpfpl_app.service.sweep_tables import write_tables
from tests.test_sweep import _fake_result

# Seeds whose partitions differ a lot (0.3 to 0.7) while DP-FPL is 1, 2 and 3 points
# above PromptFL on each: means ± std overlap, the paired difference does not straddle 0.
BASE = {0: 0.30, 1: 0.50, 2: 0.70}
LEAD = {0: 0.01, 1: 0.02, 2: 0.03}


def _sweep(tmp_path: Path) -> SweepSpec:
    spec = SweepSpec(
        methods=(Method.PROMPTFL, Method.DPFPL), epsilons=(4.0,), seeds=(0, 1, 2),
        references=False,
    )
    for cell in spec.cells():
        s = cell.seed
        harmonic = BASE[s] + (LEAD[s] if cell.method is Method.DPFPL else 0.0)
        refs = {"zeroshot": {"harmonic-acc": BASE[s] + 0.05},
                "prior": {"harmonic-acc": BASE[s] + 0.10}}
        _fake_result(tmp_path, cell, 0.5, 0.5, doc=refs, more={"last10-harmonic-acc": harmonic})
    return spec


def test_differences_are_paired_by_seed_with_a_t_interval(tmp_path: Path) -> None:
    spec = _sweep(tmp_path)
    done = {cell: _read(tmp_path, cell) for cell in spec.cells()}

    found = {(p.first, p.second): p for p in pairs(spec, done, "harmonic")}

    lead = found[("DP-FPL", "PromptFL")]
    assert lead.differences == pytest.approx((0.01, 0.02, 0.03))
    # t(0.975, df 2) = 4.3027; the differences' std is 0.01, over sqrt(3)
    assert lead.half_width == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-4)
    assert lead.text() == "+2.0 [-0.5, +4.5] (n=3)"
    # every method against each reference of its own seed
    assert found[("PromptFL", "zero-shot")].differences == pytest.approx((-0.05,) * 3)
    assert found[("DP-FPL", "class-prior frontier")].differences == pytest.approx(
        (-0.09, -0.08, -0.07)
    )


def test_only_seeds_both_methods_have_count_and_one_seed_has_no_interval() -> None:
    one = Pair("a", "b", 4.0, (0.031,))
    assert math.isnan(one.half_width) and one.text() == "+3.1 (n=1)"
    spec = SweepSpec(methods=(Method.PROMPTFL, Method.DPFPL), epsilons=(4.0,), seeds=(0, 1))
    doc = {"summary": {"last10-harmonic-acc": 0.5}}
    done = {Cell(Method.DPFPL, 4.0, 0, 8): doc, Cell(Method.DPFPL, 4.0, 1, 8): doc,
            Cell(Method.PROMPTFL, 4.0, 1, 0): {"summary": {"last10-harmonic-acc": 0.4}}}

    (lead,) = pairs(spec, done, "harmonic")

    assert (lead.first, lead.second) == ("DP-FPL", "PromptFL")
    assert lead.differences == pytest.approx((0.1,))  # seed 1 only


def test_the_sweep_writes_the_paired_table(tmp_path: Path) -> None:
    spec = _sweep(tmp_path)

    write_tables(spec, tmp_path)

    md = (tmp_path / "pairs.md").read_text()
    assert "## epsilon 4" in md
    assert "| DP-FPL | PromptFL | " in md and "+2.0 [-0.5, +4.5] (n=3)" in md
    assert "| PromptFL | zero-shot | " in md


def _read(out: Path, cell: Cell) -> dict:
    return json.loads((out / "runs" / cell.name / "results.json").read_text())
