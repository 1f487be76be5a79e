"""The experiment runner: its grid, its tables, resuming, and reruns that reproduce bytes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from dpfpl_app import sweep as sweep_module
from dpfpl_app.config import Method, RunConfig
from dpfpl_app.results import RESULTS_FILE
from dpfpl_app.sweep import Cell, SweepSpec, run_sweep, write_tables

REPO = Path(__file__).resolve().parents[1]


def _fake_result(out: Path, cell: Cell, local: float, neighbour: float) -> None:
    run = out / "runs" / cell.name
    run.mkdir(parents=True)
    summary = {
        "last10-local-acc": local,
        "last10-neighbour-acc": neighbour,
        "final-epsilon": 0.0 if math.isinf(cell.epsilon) else cell.epsilon,
    }
    (run / RESULTS_FILE).write_text(json.dumps({"status": "completed", "summary": summary}))


def test_grid_has_main_cells_rank_ablation_and_references_once_each() -> None:
    spec = SweepSpec(
        methods=(Method.PROMPTFL, Method.DPFPL),
        epsilons=(1.0, math.inf),
        seeds=(0, 1),
        ranks=(8, 2),
        ablation_epsilon=1.0,
    )

    names = [c.name for c in spec.cells()]

    assert len(names) == len(set(names))
    main = {f"{m}-eps{e}-s{s}" for m in ("promptfl",) for e in ("1", "inf") for s in (0, 1)}
    main |= {f"dpfpl-eps{e}-r8-s{s}" for e in ("1", "inf") for s in (0, 1)}
    ablation = {f"{m}-eps1-r{r}-s{s}" for m in ("dpfpl", "dplora") for r in (8, 2) for s in (0, 1)}
    references = {f"{m}-epsinf-s{s}" for m in ("zeroshot", "local") for s in (0, 1)}
    assert set(names) == main | ablation | references


def test_cell_run_configs_are_valid_and_carry_the_cell(tmp_path: Path) -> None:
    spec = SweepSpec(clients=4, overrides={"num-server-rounds": 3})
    private = Cell(Method.DPFPL, 2.0, 1, 4)
    public = Cell(Method.FEDOTP, math.inf, 0, 0)

    dp = RunConfig.from_flower(spec.run_config(private, tmp_path))
    off = RunConfig.from_flower(spec.run_config(public, tmp_path))

    assert (dp.method, dp.rank, dp.seed, dp.min_nodes) == (Method.DPFPL, 4, 1, 4)
    assert dp.epsilon == 2.0 and dp.dp_mode.value == "per-sample"
    assert dp.num_server_rounds == 3 and dp.run_name == private.name
    assert off.dp_mode.value == "off" and off.method is Method.FEDOTP


def test_a_bad_grid_fails_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        SweepSpec(epsilons=(0.0,))
    spec = SweepSpec(methods=(Method.DPFPL,), ranks=(32,))  # rank > n-ctx 16
    with pytest.raises(ValueError, match="rank=32 exceeds n-ctx=16"):
        run_sweep(spec, tmp_path / "sweep", app_dir=REPO)
    # nothing was claimed: the corrected grid may use the same directory
    assert not (tmp_path / "sweep" / sweep_module.SPEC_FILE).exists()


def test_tables_have_every_cell_with_mean_and_std_over_seeds(tmp_path: Path) -> None:
    spec = SweepSpec(
        methods=(Method.PROMPTFL, Method.DPFPL), epsilons=(1.0, math.inf), seeds=(0, 1)
    )
    values = {0: (0.80, 0.60), 1: (0.90, 0.70)}
    for cell in spec.cells():
        _fake_result(tmp_path, cell, *values[cell.seed])

    write_tables(spec, tmp_path)

    md = (tmp_path / "table.md").read_text()
    assert "| digits | 1 | 85.0 ± 7.1 | 85.0 ± 7.1 |" in md  # local, both methods
    assert "| digits | no DP | 65.0 ± 7.1 | 65.0 ± 7.1 |" in md  # neighbour
    assert "| Zero-shot CLIP | 85.0 ± 7.1 | 65.0 ± 7.1 |" in md
    rows = (tmp_path / "table.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,method,epsilon,rank,seeds,local_mean")
    assert "digits,dpfpl,1,8,2,0.8500,0.0707,0.6500,0.0707,1.0000" in rows
    assert len(rows) == 1 + 2 * 2 + 2  # header, methods x epsilons, two reference rows
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 0


def test_missing_cells_show_as_dashes_not_as_numbers(tmp_path: Path) -> None:
    spec = SweepSpec(methods=(Method.PROMPTFL, Method.DPFPL), epsilons=(1.0,), references=False)
    _fake_result(tmp_path, Cell(Method.PROMPTFL, 1.0, 0, 0), 0.5, 0.4)

    write_tables(spec, tmp_path)

    assert "| digits | 1 | 50.0 ± 0.0 | - |" in (tmp_path / "table.md").read_text()


def test_a_directory_holding_another_sweep_is_refused(tmp_path: Path) -> None:
    (tmp_path / sweep_module.SPEC_FILE).write_text(SweepSpec(seeds=(0,)).model_dump_json(indent=2))

    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(SweepSpec(seeds=(0, 1)), tmp_path, app_dir=REPO)


@pytest.mark.slow
def test_tiny_sweep_is_complete_resumable_and_byte_identical_on_rerun(
    digits_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: one private DP-FPL cell on 2 clients, 2 rounds
    spec = SweepSpec(
        methods=(Method.DPFPL,),
        epsilons=(4.0,),
        seeds=(0,),
        references=False,
        clients=2,
        overrides={"num-server-rounds": 2},
    )

    # Execute: the same grid twice, in two directories
    assert run_sweep(spec, tmp_path / "a", app_dir=REPO, timeout_s=600) == []
    assert run_sweep(spec, tmp_path / "b", app_dir=REPO, timeout_s=600) == []

    # Assert: every cell has a number, and the reruns agree to the byte
    md = (tmp_path / "a" / "table.md").read_text()
    assert "| digits | 4 | " in md and " - " not in md
    for name in ("table.md", "table.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    # Resuming a finished sweep starts no Flower run at all
    def no_runs(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(sweep_module.LocalFlower, "run", no_runs)
    assert run_sweep(spec, tmp_path / "a", app_dir=REPO) == []


def test_cli_parses_the_grid_and_refuses_a_directory_that_is_no_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dpfpl_app import cli

    args = cli.build_parser().parse_args(
        ["sweep", "--out", str(tmp_path), "--methods", "promptfl,dpfpl", "--epsilons",
         "0.5,inf", "--set", "num-server-rounds=5", "--set", "dataset-name=x"]
    )
    assert args.methods == (Method.PROMPTFL, Method.DPFPL)
    assert args.epsilons == (0.5, math.inf)
    assert args.set == [("num-server-rounds", 5), ("dataset-name", "x")]

    code = cli.main(["sweep", "--out", str(tmp_path / "s"), "--app-dir", str(tmp_path)])

    assert code == 2
    assert "holds no pyproject.toml" in capsys.readouterr().err


class _FlowerResolvingLikeASuperLink:
    """Stands in for ``LocalFlower``, resolving paths the way a real run does.

    ``flwr`` runs with cwd = the app directory and is handed the app directory again,
    and the ServerApp writes a relative ``output-dir`` against that cwd.
    """

    def __init__(self, app_dir: Path, flwr_home: Path) -> None:
        self.app_dir = Path(app_dir)

    def __enter__(self) -> _FlowerResolvingLikeASuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, run_config: dict, *, num_supernodes: int, timeout_s: float) -> tuple[int, str]:
        if not (self.app_dir / self.app_dir / "pyproject.toml").is_file():
            raise RuntimeError(f"flwr run: no pyproject.toml in {self.app_dir / self.app_dir}")
        run = self.app_dir / run_config["output-dir"] / run_config["run-name"]
        run.mkdir(parents=True)
        summary = {"last10-local-acc": 0.9, "last10-neighbour-acc": 0.8}
        (run / RESULTS_FILE).write_text(json.dumps({"status": "completed", "summary": summary}))
        return 1, "finished:completed"


def test_relative_out_and_app_dir_find_the_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: call from a directory that is neither the app nor the sweep directory
    from dpfpl_app import cli

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sweep_module, "LocalFlower", _FlowerResolvingLikeASuperLink)
    app_dir = Path(os.path.relpath(REPO, work))

    # Execute
    code = cli.main(["sweep", "--out", "sweeps/rel", "--app-dir", str(app_dir),
                     "--methods", "promptfl", "--epsilons", "1", "--no-references"])

    # Assert: the cell counts as finished, its numbers are in the table, in the cwd's sweep
    assert code == 0, capsys.readouterr().err
    table = (work / "sweeps" / "rel" / "table.md").read_text()
    assert "| digits | 1 | 90.0 ± 0.0 |" in table
