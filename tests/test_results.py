"""Run results: a failed run says so and why, nodes map to partitions, plots read clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.colors import to_rgba

import client_app as client_module
import server_app as server_module
from dpfpl_app.federation.results import RunRecorder, draw_run, load_results, summary_table
from dpfpl_app.service.cli import main as cli_main
from tests.flower_harness import federation_config, run_server_app


def _rounds(n: int) -> list[dict[str, Any]]:
    return [
        {"round": r, "local-acc": 0.5 + 0.01 * r, "neighbour-acc": 0.4 + 0.01 * r,
         "eps-local": 0.3 * r, "eps-global": 0.3 * r}
        for r in range(1, n + 1)
    ]


def _doc(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"config": {"method": "dpfpl", "dp-mode": "per-sample", **config},
            "rounds": _rounds(7), **extra}


# --- failures ---------------------------------------------------------------------------
def test_a_model_that_does_not_exist_leaves_a_failed_run_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    cfg = federation_config(tmp_path, model="/nonexistent", **{"min-nodes": 2})

    # Execute
    with pytest.raises(FileNotFoundError):
        run_server_app(server_module.app, client_app=client_module.app, num_nodes=2,
                       run_config=cfg)
    code = cli_main(["summary", str(tmp_path / "runs" / "t")])

    # Assert
    doc = load_results(tmp_path / "runs" / "t")
    assert doc["status"] == "failed"
    assert "FileNotFoundError" in doc["reason"] and "/nonexistent" in doc["reason"]
    assert code == 1
    assert "reason: FileNotFoundError" in capsys.readouterr().out


def test_an_exception_mid_run_is_recorded_as_failed(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "run", config={}, notes={}, run_id=3)
    recorder.record(1, {"local-acc": 0.5})

    with pytest.raises(RuntimeError), recorder.failure_recorded():
        raise RuntimeError("train: only 2 node(s) connected")

    doc = load_results(tmp_path / "run")
    assert doc["status"] == "failed"
    assert doc["reason"] == "RuntimeError: train: only 2 node(s) connected"
    assert [r["round"] for r in doc["rounds"]] == [1]  # what it finished is kept


def test_a_completed_run_summarises_with_exit_zero(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "run", config={}, notes={}, run_id=3)
    recorder.record(1, {"local-acc": 0.5})
    recorder.finish(status="completed")

    assert cli_main(["summary", str(tmp_path / "run")]) == 0
    assert "reason" not in load_results(tmp_path / "run")


# --- node map ---------------------------------------------------------------------------
def test_nodes_map_to_partitions_and_their_prompt_files(tmp_path: Path) -> None:
    config = {"state-dir": "/srv/dpfpl/state", "run-name": ""}
    recorder = RunRecorder(tmp_path / "run", config=config, notes={}, run_id=42)

    recorder.record(1, {"local-acc": 0.5, "partition-id/node-1001": 1, "partition-id/node-7": 0})

    doc = load_results(tmp_path / "run")
    assert doc["run-id"] == 42 and doc["results-dir"] == str((tmp_path / "run").resolve())
    assert doc["nodes"] == {
        "1001": {"partition-id": 1,
                 "prompt-file": "/srv/dpfpl/state/run-42/partition-1/prompt.safetensors"},
        "7": {"partition-id": 0,
              "prompt-file": "/srv/dpfpl/state/run-42/partition-0/prompt.safetensors"},
    }
    assert "partition-id/node-7" not in doc["rounds"][0]  # not a metrics.csv column
    assert "node-config state-dir" in doc["notes"]["nodes"]


# --- plots ------------------------------------------------------------------------------
def _lines(fig: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def test_round_ticks_are_whole_numbers() -> None:
    for fig in draw_run(_doc({"epsilon-local": 4.0, "epsilon-global": 4.0})).values():
        fig.canvas.draw()
        ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 7]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_epsilon_curves_differ_in_colour_style_and_marker_with_both_targets_drawn() -> None:
    lines = _lines(draw_run(_doc({"epsilon-local": 4.0, "epsilon-global": 2.0}))["epsilon.png"])

    local, global_ = lines["eps-local"], lines["eps-global"]
    assert to_rgba(local.get_color()) != to_rgba(global_.get_color())
    assert local.get_linestyle() != global_.get_linestyle()
    assert local.get_marker() != global_.get_marker()
    assert set(lines["target epsilon-local = 4"].get_ydata()) == {4.0}
    assert set(lines["target epsilon-global = 2"].get_ydata()) == {2.0}


def test_equal_channel_targets_share_one_labelled_line() -> None:
    lines = _lines(draw_run(_doc({"epsilon-local": 4.0, "epsilon-global": 4.0}))["epsilon.png"])

    targets = [label for label in lines if label.startswith("target")]
    assert targets == ["target epsilon-local = epsilon-global = 4"]


def test_the_composed_epsilon_is_drawn_with_its_target_and_no_target_without_dp() -> None:
    doc = _doc({"epsilon": 3.0})
    for row in doc["rounds"]:
        row["epsilon"] = 0.4 * row["round"]

    composed = _lines(draw_run(doc)["epsilon.png"])
    off = _lines(draw_run(_doc({"dp-mode": "off", "epsilon": 3.0}))["epsilon.png"])

    assert composed["epsilon"].get_ydata()[-1] == pytest.approx(2.8)
    target = composed["target epsilon = 3"]
    assert set(target.get_ydata()) == {3.0}
    assert to_rgba(target.get_color()) == to_rgba(composed["epsilon"].get_color())
    assert not any(label.startswith("target") for label in off)


def test_zero_shot_levels_are_drawn_on_the_accuracy_plot_when_known() -> None:
    zeroshot = {"local-acc": 0.61, "neighbour-acc": 0.58}

    with_ref = _lines(draw_run(_doc({}, zeroshot=zeroshot))["accuracy.png"])
    without = _lines(draw_run(_doc({}))["accuracy.png"])

    assert set(with_ref["zero-shot local-acc"].get_ydata()) == {0.61}
    assert set(with_ref["zero-shot neighbour-acc"].get_ydata()) == {0.58}
    assert not any(label.startswith("zero-shot") for label in without)


def test_plots_are_written_for_a_synthetic_results_file(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "run", config={"epsilon-local": 1.0}, notes={})
    for row in _rounds(3):
        recorder.record(row.pop("round"), row)
    recorder.doc["zeroshot"] = {"local-acc": 0.6, "neighbour-acc": 0.5}

    recorder.finish(status="completed")

    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"
    for name in ("accuracy.png", "epsilon.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0


def test_finish_keeps_the_clients_zero_shot_accuracies_as_the_reference(tmp_path: Path) -> None:
    # Prepare: clients report the template's accuracy beside their own each round
    recorder = RunRecorder(tmp_path / "run", config={}, notes={})
    for r, (zs_local, zs_neighbour) in enumerate([(0.5, 0.4), (0.7, 0.4)], start=1):
        recorder.record(r, {"local-acc": 0.9, "zeroshot-local-acc": zs_local,
                            "zeroshot-neighbour-acc": zs_neighbour})

    # Execute
    recorder.finish(status="completed")

    # Assert: the mean over rounds becomes the plot's reference and a summary line
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["zeroshot"] == pytest.approx({"local-acc": 0.6, "neighbour-acc": 0.4})
    assert "zeroshot-local-acc: 0.6" in summary_table(doc).splitlines()


def test_the_summary_carries_the_harmonic_mean_all_class_and_both_references(
    tmp_path: Path,
) -> None:
    # Prepare: 12 evaluated rounds; the harmonic mean climbs 0.01 a round
    recorder = RunRecorder(tmp_path / "run", config={}, notes={})
    for r in range(1, 13):
        recorder.record(r, {
            "local-acc": 0.9, "neighbour-acc": 0.3, "harmonic-acc": 0.3 + 0.01 * r,
            "all-acc": 0.4, "zeroshot-local-acc": 0.6, "zeroshot-neighbour-acc": 0.6,
            "zeroshot-harmonic-acc": 0.58, "zeroshot-all-acc": 0.6,
            "prior-local-acc": 0.7, "prior-neighbour-acc": 0.55,
            "prior-harmonic-acc": 0.6, "prior-all-acc": 0.57,
        })

    # Execute
    recorder.finish(status="completed")

    # Assert: last-10 and final figures, and the two reference blocks
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    summary = doc["summary"]
    assert summary["last10-harmonic-acc"] == pytest.approx(0.3 + 0.01 * 7.5)
    assert summary["final-harmonic-acc"] == pytest.approx(0.42)
    assert summary["last10-all-acc"] == pytest.approx(0.4)
    assert doc["zeroshot"]["harmonic-acc"] == pytest.approx(0.58)
    assert doc["zeroshot"]["all-acc"] == pytest.approx(0.6)
    assert doc["prior"] == pytest.approx(
        {"local-acc": 0.7, "neighbour-acc": 0.55, "harmonic-acc": 0.6, "all-acc": 0.57}
    )
    # ... the printed summary shows them, and the plot draws the headline and its lines
    lines = summary_table(doc).splitlines()
    assert "harmonic-acc" in lines[0] and "all-acc" in lines[0]
    assert {"zeroshot-harmonic-acc: 0.58", "prior-harmonic-acc: 0.6"} <= set(lines)
    drawn = _lines(draw_run(doc)["accuracy.png"])
    assert drawn["harmonic-acc"].get_ydata()[-1] == pytest.approx(0.42)
    assert list(drawn["zero-shot harmonic-acc"].get_ydata()) == [pytest.approx(0.58)] * 2
    assert list(drawn["class-prior frontier harmonic-acc"].get_ydata()) == [pytest.approx(0.6)] * 2


def test_a_secfpp_summary_prints_the_clusters_not_their_centroids(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "run", config={"method": "secfpp"}, notes={})
    recorder.record(1, {"local-acc": 0.5})
    clusters = {"centroids": [[0.123456789] * 64] * 3, "counts": [4, 4, 4], "secure_sums": 12,
                "seconds": 83.4, "nodes": [1, 2, 3], "scores": {"3": 1.0}}
    recorder.finish(status="completed", extra={"clusters": clusters})

    table = summary_table(json.loads((tmp_path / "run" / "results.json").read_text()))

    assert "clusters: k=3 sizes [4, 4, 4] (12 secure sums, 83.4 s)" in table.splitlines()
    assert "0.1234" not in table
