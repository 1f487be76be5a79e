"""Evaluation in a secure run: the server learns summed counts, never one node's figures.

The federation tests run the real ServerApp and ClientApp in one process
(``flower_harness``); what the server receives is ``grid.replies``, and what each node
kept is the ``evaluation.jsonl`` record in its own state directory. They import only
modules that existed before secure evaluation, so that on the earlier code they fail on
what the server receives, not on an import.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import ConfigError, RunConfig
from dpfpl_app.federation import wire
from dpfpl_app.secagg import Stage
from dpfpl_app.secagg.records import PAYLOAD_ARRAYS, PAYLOAD_CONFIG, read_payload
from dpfpl_app.secagg.wire import MASKED
from tests.flower_harness import (
    federation_config,
    make_instruction,
    node_id_of,
    run_server_app,
)

NODES = 4  # the fewest with a tolerated training dropout (min-survivors 3)
EVAL_MASKED = f"evaluate.{Stage.COLLECT_MASKED}"
NODE_RECORD = "evaluation.jsonl"  # a node's own figures, in its state directory
ATTEMPTS = 3  # secure sums an evaluation may take (secure_evaluation.ATTEMPTS)
COUNTS = (  # accuracy -> (correct, examples): the counts a node's record holds
    ("local-acc", "local_correct", "local_examples"),
    ("neighbour-acc", "neighbour_correct", "neighbour_examples"),
    ("zeroshot-local-acc", "zeroshot_local_correct", "local_examples"),
    ("zeroshot-neighbour-acc", "zeroshot_neighbour_correct", "neighbour_examples"),
)
ACCURACY_ENDINGS = ("-acc", "-acc-weighted")


def _figure_keys(keys: Iterable[object]) -> list[str]:
    """Keys naming an accuracy, a count of examples or of correct predictions, a partition."""
    return [
        key for key in map(str, keys)
        if key.endswith(ACCURACY_ENDINGS) or any(w in key for w in ("examples", "correct",
                                                                     "partition"))
    ]


def test_a_node_of_a_secure_run_refuses_to_send_its_figures_in_clear() -> None:
    # Prepare: a plain evaluate message, as the pre-issue server sent, in a secure run
    run_config = RunConfig(aggregation="secure", min_nodes=3).to_flower()
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0,
                      "num-partitions": 3}, state=RecordDict(), run_config=run_config)
    config = ConfigRecord({wire.SERVER_ROUND: 1, wire.AGGREGATION: "secure"})
    msg = make_instruction(RecordDict({wire.CONFIG_RECORD: config}), dst_node_id=5,
                           message_type=MessageType.EVALUATE)

    # Execute / Assert: refused before anything is evaluated
    with pytest.raises(ConfigError, match="does not send its own accuracies"):
        client_module.evaluate(msg, context)


# --- a secure federation -------------------------------------------------------------------
class Nodes(ClientApp):
    """The real ClientApp; ``fail`` nodes raise at the evaluation sum's masked stage for
    their first ``times`` attempts, ``leak`` nodes add their figures to that reply.
    """

    def __init__(self, *, fail: set[int] = frozenset(), times: int = 0,
                 leak: set[int] = frozenset()) -> None:
        super().__init__()
        self.fail, self.times, self.leak = fail, times, leak
        self.failed: dict[int, int] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        node = context.node_id
        if message.metadata.message_type == EVAL_MASKED and node in self.fail:
            self.failed[node] = self.failed.get(node, 0) + 1
            if self.failed[node] <= self.times:
                raise RuntimeError("injected failure at the evaluation sum")
        reply = client_module.app(message, context)
        if message.metadata.message_type != EVAL_MASKED or node not in self.leak:
            return reply
        content = RecordDict(dict(reply.content.items()))
        content["metrics"] = MetricRecord({"local-acc": 0.5, "local-examples": 10})
        return Message(content, reply_to=message)


def _run(tmp_path: Path, app: ClientApp, rounds: int = 1) -> tuple[dict, list[Message]]:
    cfg = federation_config(
        tmp_path, **{"min-nodes": NODES, "aggregation": "secure", "num-server-rounds": rounds}
    )
    run = run_server_app(server_module.app, client_app=app, num_nodes=NODES, run_config=cfg)
    doc = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    return doc, run.replies


def _node_record(tmp_path: Path, partition: int) -> Path:
    return tmp_path / "state" / "t" / f"partition-{partition}" / NODE_RECORD


def _records(tmp_path: Path, partition: int) -> list[dict]:
    lines = _node_record(tmp_path, partition).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _weighted_from_node_records(
    tmp_path: Path, partitions: list[int], round_: int
) -> dict[str, float]:
    """Correct / examples summed over the nodes' own records (each node's last line)."""
    fields = {name for _, correct, examples in COUNTS for name in (correct, examples)}
    totals = dict.fromkeys(fields, 0)
    for p in partitions:
        (*_, line) = [x for x in _records(tmp_path, p) if x["round"] == round_]
        for name in fields:
            totals[name] += int(line[name])
    return {
        accuracy: totals[correct] / totals[examples]
        for accuracy, correct, examples in COUNTS
        if totals[examples]
    }


def test_secure_evaluation_reveals_only_federation_wide_figures(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Execute: a secure run of two rounds, both evaluated
    doc, replies = _run(tmp_path, client_module.app, rounds=2)

    # Assert: no evaluate reply the server received carries a node's figures: only the
    # masked counts, which decode to nothing like them
    assert doc["status"] == "completed"
    evaluate = [r for r in replies if r.metadata.message_type.startswith("evaluate")]
    assert len(evaluate) == 2 * NODES and not any(r.has_error() for r in evaluate)
    for reply in evaluate:
        assert set(reply.content.keys()) == {PAYLOAD_CONFIG, PAYLOAD_ARRAYS}
        assert not reply.content.metric_records
        assert not _figure_keys(read_payload(reply.content))
    fields = [name for _, correct, examples in COUNTS for name in (correct, examples)]
    counts = [[line[f] for f in fields] for p in range(NODES) for line in _records(tmp_path, p)]
    for reply in evaluate:  # and the masked vector is not the counts in clear
        masked = set(read_payload(reply.content)[MASKED].astype(np.int64).tolist())
        assert not any(set(c) <= masked for c in counts)
    # ... results.json holds no per-node evaluation, and no node map built from one
    assert doc["nodes"] == {}
    for row in doc["rounds"]:
        assert not [key for key in row if "/node-" in key], row
        assert not [key for key in _figure_keys(row) if not key.endswith(ACCURACY_ENDINGS)]
        assert row["eval-accepted"] == NODES and row["eval-rejected"] == 0
    assert "federation-wide" in doc["notes"]["evaluation"]
    # ... the federation-wide figures are the example-weighted ones of the nodes' records
    for row in doc["rounds"]:
        expected = _weighted_from_node_records(tmp_path, list(range(NODES)), row["round"])
        assert set(expected) >= {"local-acc", "zeroshot-local-acc"}
        for name, value in expected.items():
            assert row[name] == value and row[f"{name}-weighted"] == value
    # ... each node keeps its own figures, readable by its owner only
    for p in range(NODES):
        path = _node_record(tmp_path, p)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        (first, second) = _records(tmp_path, p)
        assert (first["round"], second["round"]) == (1, 2)
    # ... the harmonic means are the mean of the nodes' own (fixed point), never below
    # zero-shot's for the class prior
    for row in doc["rounds"]:
        for name in ("harmonic-acc", "zeroshot-harmonic-acc", "prior-harmonic-acc"):
            own = [line[name] for p in range(NODES) for line in _records(tmp_path, p)
                   if line["round"] == row["round"]]
            assert len(own) == NODES
            assert row[name] == pytest.approx(sum(own) / NODES, abs=1e-6)
        assert row["prior-harmonic-acc"] >= row["zeroshot-harmonic-acc"]
    # ... and the run's summary works on them
    assert doc["summary"]["final-local-acc"] == doc["rounds"][-1]["local-acc"]
    assert doc["zeroshot"]["local-acc"] > 0
    assert doc["prior"]["harmonic-acc"] >= doc["zeroshot"]["harmonic-acc"]


def test_a_reply_carrying_a_nodes_figures_is_refused_as_a_fault(
    digits_backbone: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: partition 1 adds its figures to its masked evaluation reply
    leaker = node_id_of(1)

    # Execute
    doc, _ = _run(tmp_path, Nodes(leak={leaker}))

    # Assert: refused and logged as a fault; the sum asked again without that node
    (row,) = doc["rounds"]
    assert f"evaluate round 1: refused reply from node {leaker}: fault" in caplog.text
    assert row["eval-attempts"] == 2 and row["eval-accepted"] == NODES - 1
    assert not [key for key in row if "/node-" in key], row
    expected = _weighted_from_node_records(tmp_path, [0, 2, 3], 1)
    assert all(row[name] == value for name, value in expected.items())


def test_a_dropout_in_the_evaluation_sum_is_retried_or_reported_missing(
    digits_backbone: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute: partition 2 fails the masked stage of the first evaluation sum only ...
    retried, _ = _run(tmp_path / "once", Nodes(fail={node_id_of(2)}, times=1))
    # ... and of every attempt
    missing, _ = _run(tmp_path / "always", Nodes(fail={node_id_of(2)}, times=ATTEMPTS))

    # Assert: the retry's sum has every node; the missing one has no figure at all
    (row,) = retried["rounds"]
    assert row["eval-attempts"] == 2 and row["eval-accepted"] == NODES
    expected = _weighted_from_node_records(tmp_path / "once", list(range(NODES)), 1)
    assert all(row[name] == value for name, value in expected.items())
    (row,) = missing["rounds"]
    assert row["eval-attempts"] == ATTEMPTS and row["eval-accepted"] == 0
    assert not _figure_keys(row), row
    assert "evaluate round 1: no evaluation sum released" in caplog.text
    assert missing["status"] == "completed" and "final-local-acc" not in missing["summary"]
