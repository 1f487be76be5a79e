"""The experiment runner: its grid, its tables, resuming, and reruns that reproduce bytes."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest

from dpfpl_app.config import Method, RunConfig
from dpfpl_app.federation.results import RESULTS_FILE
from dpfpl_app.service import sweep as sweep_module
from dpfpl_app.service.sweep import run_sweep
from dpfpl_app.service.sweep_grid import FAILED_DIR, Cell, SweepSpec, read_cell
from dpfpl_app.service.sweep_tables import markdown_table, write_tables
from tests.deploy_processes import app_copy

REPO = Path(__file__).resolve().parents[1]


def _complete_doc(summary: dict, *, clients: int = 10, rounds: int = 3) -> dict:
    """A results.json whose every round had all clients trained and evaluated."""
    per_client = {f"local-acc/node-{n}": 0.5 for n in range(clients)}
    row = {"accepted": float(clients), "rejected": 0.0, "eval-accepted": float(clients),
           "eval-rejected": 0.0, **per_client}
    return {
        "status": "completed",
        "config": {"num-server-rounds": rounds},
        "rounds": [{"round": r, **row} for r in range(1, rounds + 1)],
        "summary": summary,
    }


def _fake_result(
    out: Path, cell: Cell, local: float, neighbour: float, *, doc: dict | None = None,
    more: dict | None = None,
) -> None:
    run = out / "runs" / cell.name
    run.mkdir(parents=True)
    summary = {
        "last10-local-acc": local,
        "last10-neighbour-acc": neighbour,
        "final-epsilon": 0.0 if math.isinf(cell.epsilon) else cell.epsilon,
        **(more or {}),
    }
    (run / RESULTS_FILE).write_text(json.dumps({**_complete_doc(summary), **(doc or {})}))


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
    for cell in spec.cells():  # harmonic, all-class and the references: the seed's too
        s = cell.seed
        refs = {"zeroshot": {"harmonic-acc": 0.5 + 0.1 * s, "local-acc": 0.5},
                "prior": {"harmonic-acc": 0.6 + 0.1 * s, "local-acc": 0.7}}
        _fake_result(tmp_path, cell, *values[s], doc=refs,
                     more={"last10-harmonic-acc": 0.6 + 0.1 * s, "last10-all-acc": 0.62 + 0.1 * s})

    write_tables(spec, tmp_path)

    md = (tmp_path / "table.md").read_text()
    assert "| digits | 1 | 85.0 ± 7.1 (n=2) | 85.0 ± 7.1 (n=2) |" in md  # local, both methods
    assert "| digits | no DP | 65.0 ± 7.1 (n=2) | 65.0 ± 7.1 (n=2) |" in md  # neighbour
    assert ("| Zero-shot CLIP | 65.0 ± 7.1 (n=2) | 85.0 ± 7.1 (n=2) | 65.0 ± 7.1 (n=2) "
            "| 67.0 ± 7.1 (n=2) |") in md
    assert "left out" not in md
    # ... the headline's table, and the references once per seed (not once per cell)
    harmonic = md.split("## Harmonic mean")[1].split("##")[0]
    assert "| digits | 1 | 65.0 ± 7.1 (n=2) | 65.0 ± 7.1 (n=2) |" in harmonic
    assert "| Zero-shot template | 55.0 ± 7.1 (n=2) | 50.0 ± 0.0 (n=2) | - | - |" in md
    assert "| Class-prior frontier (zero-shot + best own-class bias) | 65.0 ± 7.1 (n=2) |" in md
    rows = (tmp_path / "table.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,method,epsilon,rank,seeds,seeds_planned,local_mean")
    assert rows[0].endswith("epsilon_spent,harmonic_mean,harmonic_std,all_mean,all_std")
    assert ("digits,dpfpl,1,8,2,2,0.8500,0.0707,0.6500,0.0707,1.0000,"
            "0.6500,0.0707,0.6700,0.0707") in rows
    assert len(rows) == 1 + 2 * 2 + 2  # header, methods x epsilons, two reference rows
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 0


def test_secfpp_has_its_column_csv_rows_and_plot(tmp_path: Path) -> None:
    spec = SweepSpec(
        methods=(Method.DPFPL, Method.SECFPP), epsilons=(4.0, math.inf), seeds=(0,),
        references=False,
    )
    for cell in spec.cells():
        _fake_result(tmp_path, cell, 0.4, 0.3)

    write_tables(spec, tmp_path)

    assert "| digits | 4 | 40.0 (n=1) | 40.0 (n=1) |" in (tmp_path / "table.md").read_text()
    assert "| dataset | epsilon | DP-FPL | SecFPP |" in (tmp_path / "table.md").read_text()
    rows = (tmp_path / "table.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["dpfpl", "secfpp", "dpfpl", "secfpp"]
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 0


def test_missing_cells_show_as_dashes_not_as_numbers(tmp_path: Path) -> None:
    spec = SweepSpec(methods=(Method.PROMPTFL, Method.DPFPL), epsilons=(1.0,), references=False)
    _fake_result(tmp_path, Cell(Method.PROMPTFL, 1.0, 0, 0), 0.5, 0.4)

    write_tables(spec, tmp_path)

    assert "| digits | 1 | 50.0 (n=1) | - |" in (tmp_path / "table.md").read_text()


def _round_with(**change: float) -> list[dict]:
    rounds = _complete_doc({})["rounds"]
    rounds[1] = {**rounds[1], **change}
    return rounds


INCOMPLETE = {
    "failed run": ({"status": "failed", "reason": "ValueError: boom"}, "status 'failed'"),
    "train reply refused": ({"rounds": _round_with(accepted=9.0, rejected=1.0)}, "round 2"),
    "evaluate reply refused": (
        {"rounds": _round_with(**{"eval-accepted": 9.0, "eval-rejected": 1.0})}, "round 2"
    ),
    "a client not sampled": ({"rounds": _round_with(accepted=9.0)}, "round 2"),
    "a round missing": ({"rounds": _complete_doc({})["rounds"][:2]}, "2 rounds recorded, 3"),
}


@pytest.mark.parametrize("change", INCOMPLETE.values(), ids=INCOMPLETE.keys())
def test_a_seed_with_an_incomplete_run_does_not_count_and_the_table_says_why(
    tmp_path: Path, change: tuple[dict, str]
) -> None:
    # Prepare: seed 0 complete, seed 1 with a refused reply, a missing round or a failure
    doc, reason = change
    spec = SweepSpec(methods=(Method.PROMPTFL,), epsilons=(1.0,), seeds=(0, 1), references=False)
    _fake_result(tmp_path, Cell(Method.PROMPTFL, 1.0, 0, 0), 0.8, 0.6)
    _fake_result(tmp_path, Cell(Method.PROMPTFL, 1.0, 1, 0), 0.2, 0.1, doc=doc)

    # Execute
    write_tables(spec, tmp_path)

    # Assert: one seed of two, no "± 0.0", and the left-out cell with its reason
    md = (tmp_path / "table.md").read_text()
    assert "| digits | 1 | 80.0 (n=1 of 2) |" in md
    assert "± 0.0" not in md
    assert f"- promptfl-eps1-s1: {reason}" in md
    assert sweep_module.cell_result(tmp_path, Cell(Method.PROMPTFL, 1.0, 1, 0), 10) is None


def test_parallel_below_one_is_refused_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        run_sweep(SweepSpec(), tmp_path, app_dir=REPO, parallel=0)
    assert not (tmp_path / sweep_module.SPEC_FILE).exists()


def test_a_directory_holding_another_sweep_is_refused(tmp_path: Path) -> None:
    (tmp_path / sweep_module.SPEC_FILE).write_text(SweepSpec(seeds=(0,)).model_dump_json(indent=2))

    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(SweepSpec(seeds=(0, 1)), tmp_path, app_dir=REPO)
    (tmp_path / sweep_module.SPEC_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(SweepSpec(seeds=(0, 1)), tmp_path, app_dir=REPO)


def test_a_grid_saved_before_a_defaulted_field_existed_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the saved grid lacks method_overrides, as sweeps written before it did
    monkeypatch.setattr(sweep_module, "LocalFlower", _FlowerResolvingLikeASuperLink)
    spec = SweepSpec(methods=(Method.PROMPTFL,), epsilons=(1.0, math.inf), references=False)
    saved = json.loads(spec.model_dump_json())
    assert saved["epsilons"] == [1.0, None]  # no DP, as JSON can hold it
    del saved["method_overrides"]
    (tmp_path / sweep_module.SPEC_FILE).write_text(json.dumps(saved, indent=2))

    # Execute / Assert: the same grid resumes
    assert run_sweep(spec, tmp_path, app_dir=Path(os.path.relpath(REPO))) == []


@pytest.mark.slow
def test_tiny_sweep_is_complete_resumable_and_the_same_run_side_by_side_or_serially(
    digits_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two private DP-FPL cells (two seeds) on 2 clients, 2 rounds
    spec = SweepSpec(
        methods=(Method.DPFPL,),
        epsilons=(4.0,),
        seeds=(0, 1),
        references=False,
        clients=2,
        overrides={"num-server-rounds": 2},
    )

    app = app_copy(tmp_path / "app")  # the checkout's app, without its .venv to walk

    # Execute: the same grid twice, both cells side by side, then one after the other
    # with torch's threads as side by side on 2 cores (float sums depend on the count)
    failed = run_sweep(spec, tmp_path / "a", app_dir=app, timeout_s=600, parallel=2)
    assert failed == [], _why(tmp_path / "a", failed, spec.clients)
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    failed = run_sweep(spec, tmp_path / "b", app_dir=app, timeout_s=600)
    assert failed == [], _why(tmp_path / "b", failed, spec.clients)

    # Assert: every cell has a number, each side-by-side cell had its own SuperLink,
    # and the two sweeps agree to the byte
    md = (tmp_path / "a" / "table.md").read_text()
    assert "| digits | 4 | " in md and " - " not in md and "(n=2)" in md
    assert (tmp_path / "a" / ".flwr-1").is_dir() and not (tmp_path / "b" / ".flwr-1").exists()
    for name in ("table.md", "table.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    # Resuming a finished sweep starts no Flower run at all
    def no_runs(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(sweep_module.LocalFlower, "run", no_runs)
    assert run_sweep(spec, tmp_path / "a", app_dir=app) == []


def _why(out: Path, failed: list[Cell], clients: int) -> str:
    """Each failed cell's reason and the end of its Flower log, for the test report."""
    parts = []
    for cell in failed:
        log = out / FAILED_DIR / f"{cell.name}.log"
        tail = log.read_text()[-4000:] if log.is_file() else "(no Flower log kept)"
        parts.append(f"{cell.name}: {read_cell(out, cell, clients)[1]}\n{tail}")
    return "\n".join(parts)


def test_cli_parses_the_grid_and_refuses_a_directory_that_is_no_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dpfpl_app.service import cli

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

    homes: dict[str, int | None] = {}  # FLWR_HOME name -> threads it was given

    def __init__(self, app_dir: Path, flwr_home: Path, *, threads: int | None = None) -> None:
        self.app_dir = Path(app_dir)
        self.homes[Path(flwr_home).name] = threads

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
        doc = _complete_doc(summary, clients=num_supernodes,
                            rounds=run_config["num-server-rounds"])
        (run / RESULTS_FILE).write_text(json.dumps(doc))
        return 1, "finished:completed"


def test_relative_out_and_app_dir_find_the_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: call from a directory that is neither the app nor the sweep directory
    from dpfpl_app.service import cli

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
    assert "| digits | 1 | 90.0 (n=1) |" in table


def test_side_by_side_cells_share_the_cores_and_all_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a 4-core machine, 3 cells, 2 at a time
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_module, "LocalFlower", _FlowerResolvingLikeASuperLink)
    monkeypatch.setattr(sweep_module.os, "cpu_count", lambda: 4)
    _FlowerResolvingLikeASuperLink.homes.clear()
    spec = SweepSpec(methods=(Method.PROMPTFL,), epsilons=(1.0,), seeds=(0, 1, 2),
                     references=False)

    # Execute
    failed = run_sweep(spec, tmp_path / "s", app_dir=Path(os.path.relpath(REPO)), parallel=2)

    # Assert: two SuperLinks of 2 threads each, and every cell counted once
    assert failed == []
    assert _FlowerResolvingLikeASuperLink.homes == {".flwr": 2, ".flwr-1": 2}
    assert "| digits | 1 | 90.0 ± 0.0 (n=3) |" in (tmp_path / "s" / "table.md").read_text()


def test_cells_run_seed_by_seed_so_a_stopped_sweep_has_every_method_at_its_first_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a stand-in that records the order cells are run in
    order: list[str] = []

    class Recording(_FlowerResolvingLikeASuperLink):
        def run(self, run_config: dict, *, num_supernodes: int,
                timeout_s: float) -> tuple[int, str]:
            order.append(run_config["run-name"])
            return super().run(run_config, num_supernodes=num_supernodes, timeout_s=timeout_s)

    monkeypatch.setattr(sweep_module, "LocalFlower", Recording)
    spec = SweepSpec(methods=(Method.PROMPTFL, Method.FEDOTP), epsilons=(1.0,),
                     seeds=(3, 0), references=False)

    # Execute
    assert run_sweep(spec, tmp_path, app_dir=Path(os.path.relpath(REPO))) == []

    # Assert: the grid lists method by method; the runs go seed by seed, in the spec's order
    assert [c.name for c in spec.cells()] == [
        "promptfl-eps1-s3", "promptfl-eps1-s0", "fedotp-eps1-s3", "fedotp-eps1-s0"]
    assert order == ["promptfl-eps1-s3", "fedotp-eps1-s3", "promptfl-eps1-s0",
                     "fedotp-eps1-s0"]


def _flower_failing(times: int, cell: str | None = None) -> type[_FlowerResolvingLikeASuperLink]:
    """A stand-in whose first ``times`` runs of ``cell`` (None: of every cell) fail and
    write nothing; later ones complete.
    """

    class FlowerFailing(_FlowerResolvingLikeASuperLink):
        runs: dict[str, int] = {}

        def run(self, run_config: dict, *, num_supernodes: int,
                timeout_s: float) -> tuple[int, str]:
            name = run_config["run-name"]
            self.runs[name] = self.runs.get(name, 0) + 1
            if cell in (None, name) and self.runs[name] <= times:
                return 7, "finished:failed"
            return super().run(run_config, num_supernodes=num_supernodes, timeout_s=timeout_s)

        def log(self, run_id: int) -> str:
            return f"run {run_id}: ClientApp raised ValueError\n"

    return FlowerFailing


def test_a_failed_cell_keeps_its_flower_log_until_a_retry_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(sweep_module, "LocalFlower", _flower_failing(times=1))
    spec = SweepSpec(methods=(Method.PROMPTFL,), epsilons=(1.0,), references=False)
    (cell,) = spec.cells()
    kept = tmp_path / FAILED_DIR / f"{cell.name}.log"

    # Execute / Assert: without retries the failure names its cell and its log survives
    assert run_sweep(spec, tmp_path, app_dir=Path(os.path.relpath(REPO)), retries=0) == [cell]
    assert kept.read_text() == "run 7: ClientApp raised ValueError\n"

    # the next invocation's run counts, and no stale log says otherwise
    assert run_sweep(spec, tmp_path, app_dir=Path(os.path.relpath(REPO))) == []
    assert not kept.exists()


@pytest.mark.parametrize(("fails", "retries", "runs", "failed"),
                         [(1, 1, 2, False), (2, 1, 2, True), (2, 2, 3, False)])
def test_a_failed_cell_is_run_again_up_to_retries_more_times_in_the_same_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fails: int, retries: int, runs: int, failed: bool,
) -> None:
    # Prepare: a cell whose first `fails` runs die before writing anything (as a
    # simulation whose Ray never started does), beside one that completes
    spec = SweepSpec(methods=(Method.PROMPTFL,), epsilons=(1.0,), seeds=(0, 1),
                     references=False)
    first, second = spec.cells()
    flower = _flower_failing(times=fails, cell=first.name)
    monkeypatch.setattr(sweep_module, "LocalFlower", flower)

    # Execute
    with caplog.at_level(logging.INFO, logger="dpfpl_app.service.sweep"):
        left = run_sweep(spec, tmp_path, app_dir=Path(os.path.relpath(REPO)), retries=retries)

    # Assert: runs stop at the first that counts or after 1 + retries attempts; the
    # attempt is named, and the progress count grows with each retry
    assert flower.runs == {first.name: runs, second.name: 1}
    assert left == ([first] if failed else [])
    attempts = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert attempts == [f"{first.name}: running it again after the cells still waiting "
                        f"(attempt {a} of {retries + 1})" for a in range(2, runs + 1)]
    assert f"[{runs + 1}/{runs + 1}]" in caplog.text


def test_negative_retries_are_refused_before_any_run(tmp_path: Path) -> None:
    spec = SweepSpec(methods=(Method.PROMPTFL,), epsilons=(1.0,), references=False)
    with pytest.raises(ValueError, match="retries must be >= 0"):
        run_sweep(spec, tmp_path, app_dir=REPO, retries=-1)
    assert not (tmp_path / "runs").exists()


def test_a_method_config_sets_that_methods_cells_only(tmp_path: Path) -> None:
    # Prepare: DP-FPL's tuned rate in a file, a global override for every cell
    from dpfpl_app.service.sweep_cli import method_config

    path = tmp_path / "lrs.toml"
    path.write_text('[dpfpl]\nlr-local = 0.03\nlr-global = 0.03\n\n[promptfl]\nlr-global = 0.003\n')
    spec = SweepSpec(methods=(Method.PROMPTFL, Method.DPFPL), epsilons=(1.0,),
                     overrides={"lr-local": 0.01, "lr-global": 0.01},
                     method_overrides=method_config(str(path)))

    # Execute
    configs = {c.method: spec.run_config(c, tmp_path) for c in spec.cells()}

    # Assert: each method's values win over --set for its own cells, nowhere else
    assert (configs[Method.DPFPL]["lr-local"], configs[Method.DPFPL]["lr-global"]) == (0.03, 0.03)
    assert (configs[Method.PROMPTFL]["lr-local"], configs[Method.PROMPTFL]["lr-global"]) == (
        0.01, 0.003)
    assert configs[Method.LOCAL]["lr-local"] == 0.01
    assert "DP-FPL only: lr-local=0.03, lr-global=0.03." in markdown_table(spec, [])


@pytest.mark.parametrize(
    ("text", "refusal"),
    [("[dpfp]\nlr-local = 0.1\n", r"\[dpfp\] is no method"),
     ("[dpfpl]\nlr-local = [0.1]\n", r"\[dpfpl\] must hold run-config keys with scalar"),
     ("[dpfpl\n", r"cannot read .*bad.toml")],
)
def test_a_method_config_that_names_no_method_or_holds_no_scalar_is_refused(
    tmp_path: Path, text: str, refusal: str
) -> None:
    import argparse

    from dpfpl_app.service.sweep_cli import method_config

    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(argparse.ArgumentTypeError, match=refusal):
        method_config(str(tmp_path / "bad.toml"))


def test_a_method_config_key_the_run_config_does_not_know_fails_before_any_run(
    tmp_path: Path,
) -> None:
    spec = SweepSpec(methods=(Method.DPFPL,), method_overrides={Method.DPFPL: {"lr-locl": 0.1}})
    with pytest.raises(ValueError, match="lr-locl"):
        run_sweep(spec, tmp_path, app_dir=REPO)
