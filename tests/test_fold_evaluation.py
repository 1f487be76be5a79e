"""fold-evaluation: round r's evaluation rides on round r+1's train message.

It must give the run the same figures with one exchange a round instead of two, and the
server must still accept nothing a reply was not asked for.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import Aggregation, ConfigError, RunConfig
from dpfpl_app.federation import reply_checks, wire
from tests.flower_harness import federation_config, make_reply, run_server_app
from tests.test_strategy import _eval_reply, _prompt, _train_content

ROUNDS, NODES = 3, 4


def _run(tmp_path: Path, fold: bool) -> tuple[dict, Counter]:
    cfg = federation_config(tmp_path, **{"min-nodes": NODES, "num-server-rounds": ROUNDS,
                                         "fold-evaluation": fold})
    run = run_server_app(server_module.app, client_app=client_module.app, num_nodes=NODES,
                         run_config=cfg)
    doc = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    return doc, Counter(reply.metadata.message_type for reply in run.replies)


def test_folded_run_gives_the_same_figures_with_one_exchange_a_round(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Execute: the same seeded DP-FPL run (per-sample DP), evaluation separate and folded
    separate, separate_messages = _run(tmp_path / "separate", fold=False)
    folded, folded_messages = _run(tmp_path / "folded", fold=True)

    # Assert: every round's figures, training and evaluation, are the same
    assert separate["status"] == folded["status"] == "completed"
    timing = {"elapsed-s"}
    rows = [[{k: v for k, v in row.items() if k not in timing} for row in doc["rounds"]]
            for doc in (separate, folded)]
    assert rows[0] == rows[1]
    assert [row["eval-accepted"] for row in folded["rounds"]] == [NODES] * ROUNDS
    # ... with one evaluate exchange (after the last round) instead of one a round
    assert separate_messages == {MessageType.TRAIN: NODES * ROUNDS,
                                 MessageType.EVALUATE: NODES * ROUNDS}
    assert folded_messages == {MessageType.TRAIN: NODES * ROUNDS, MessageType.EVALUATE: NODES}
    # ... and the clients' private prompts end the same
    for name in ("partition-0", "partition-3"):
        paths = [tmp_path / run / "state" / "t" / name / "private.safetensors"
                 for run in ("separate", "folded")]
        assert paths[0].read_bytes() == paths[1].read_bytes(), name


def test_a_train_reply_carries_an_evaluation_only_when_asked() -> None:
    grad = torch.zeros_like(_prompt())
    evaluation = _eval_reply(5, 0.8, 10, 0.6).content
    folded = make_reply(wire.fold_evaluation(_train_content(grad), evaluation), src_node_id=5)
    plain = make_reply(_train_content(grad), src_node_id=6)

    def train(replies: list, folded_round: bool) -> list[int]:
        accepted = reply_checks.accept_train_replies(
            replies, [], 2, prompt=_prompt(), dp_on=False, folded=folded_round
        )
        return [r.node_id for r in accepted]

    # not asked: an extra record is refused (it could carry anything out)
    assert train([folded, plain], folded_round=False) == [6]
    # asked: the training is accepted with or without it; a missing evaluation is refused
    # as an evaluation only
    assert train([folded, plain], folded_round=True) == [5, 6]
    evaluations = reply_checks.accept_evaluate_replies([folded, plain], [], 1, folded=True)
    assert [(e.node_id, e.local_acc) for e in evaluations] == [(5, 0.8)]


def test_fold_evaluation_is_refused_where_it_cannot_give_the_same_figures() -> None:
    with pytest.raises(ConfigError, match="fraction-evaluate = fraction-train"):
        RunConfig.from_flower({"fold-evaluation": True, "fraction-train": 0.5})
    with pytest.raises(ConfigError, match="secure round evaluates through its own secure sum"):
        RunConfig.from_flower({"fold-evaluation": True, "aggregation": "secure"})
    # 'auto' against real SuperNodes is secure: folding is dropped there, kept in simulation
    auto = RunConfig.from_flower({"fold-evaluation": True})
    assert auto.resolve_aggregation(Aggregation.SECURE).fold_evaluation is False
    assert auto.resolve_aggregation(Aggregation.PLAIN).fold_evaluation is True
