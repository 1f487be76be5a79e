"""SecFPP federations in one process: real ServerApp, ClientApp, SecAgg+ and messages.

What the server receives is ``grid.replies`` (every reply, after protobuf). The spies
read what never leaves a client (each client's input vector to every secure sum) and
what the server unmasked, per secure round and purpose, so the tests can say exactly
what the server learned: per-cluster aggregates, never a client's summary or cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import ConfigError, RunConfig
from dpfpl_app.federation.secure_round import SecureRound
from dpfpl_app.method import domain_clusters as dc
from dpfpl_app.secagg import AggregateResult, ClientRound, RoundParams
from tests.flower_harness import federation_config, make_instruction, run_server_app

NODES = 6
MIN_SIZE = 3


@dataclass
class Spy:
    vectors: dict[bytes, dict[int, np.ndarray]] = field(default_factory=dict)
    sums: list[tuple[str, RoundParams, AggregateResult | None]] = field(default_factory=list)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    record = Spy()
    collect, aggregate = ClientRound.collect_masked, SecureRound.aggregate

    def collect_masked(self: ClientRound, payload, vector, *, stream=None):  # noqa: ANN001, ANN202
        params = RoundParams.from_payload(self.to_state())
        record.vectors.setdefault(params.round_id, {})[self.node_id] = np.asarray(vector)
        return collect(self, payload, vector, stream=stream)

    def spy_aggregate(self: SecureRound, replies):  # noqa: ANN001, ANN202
        result = aggregate(self, replies)
        record.sums.append((self._purpose, self.params, result))
        return result

    monkeypatch.setattr(ClientRound, "collect_masked", collect_masked)
    monkeypatch.setattr(SecureRound, "aggregate", spy_aggregate)
    return record


def _config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    return federation_config(
        tmp,
        **{
            "method": "secfpp",
            "dataset": "domain-digits",
            "min-nodes": NODES,
            "num-server-rounds": 2,
            "max-clusters": 2,
            "cluster-iterations": 2,
            "cluster-restarts": 2,
            "summary-dim": 8,
            **overrides,
        },
    )


def _run(tmp: Path, app: ClientApp, **overrides: Any) -> tuple[dict[str, Any], list[Message]]:
    cfg = _config(tmp, **overrides)
    run = run_server_app(server_module.app, client_app=app, num_nodes=NODES, run_config=cfg)
    doc = json.loads((tmp / "runs" / "t" / "results.json").read_text())
    return doc, run.replies


def test_secfpp_server_sees_only_per_cluster_aggregates(
    digits_backbone: Path, tmp_path: Path, spy: Spy
) -> None:
    doc, replies = _run(tmp_path, client_module.app, **{"dp-mode": "off"})

    assert doc["status"] == "completed", doc.get("reason")
    assert doc["config"]["aggregation"] == "secure"  # in simulation too
    clusters = doc["summary"]["clusters"]
    assert sum(clusters["counts"]) == NODES and min(clusters["counts"]) >= MIN_SIZE
    # every reply of every stage carries SecAgg records only: masked vectors, no summary
    for reply in replies:
        kind = reply.metadata.message_type
        if "secagg" in kind:
            assert set(reply.content.array_records) <= {"secagg-arrays"}, kind
            assert set(reply.content.config_records) <= {"secagg"}, kind
    clustering = [(p, r) for purpose, p, r in spy.sums if purpose == "clustering"]
    assert len(clustering) == clusters["secure_sums"]
    for params, result in clustering:
        assert result is not None
        # what the server unmasked is the sum of ALL sampled clients' inputs, nothing less
        inputs = spy.vectors[params.round_id]
        assert set(result.survivors) == set(inputs) and len(inputs) == NODES
        np.testing.assert_allclose(result.total, np.sum(list(inputs.values()), 0), atol=1e-3)
        # a sum phase releases statistics of open slots (>= min-cluster-size) only
        d = doc["config"]["summary-dim"]
        if params.dim % (d + 2) == 0 and params.dim != d + 1 + d * d:
            counts = np.rint(result.total.reshape(-1, d + 2)[:, d])
            assert ((counts == 0) | (counts >= MIN_SIZE)).all(), counts
    # training: each client's vector has one non-zero block, its cluster's
    k = len(clusters["counts"])
    training = [(p, r) for purpose, p, r in spy.sums if purpose == "prompt"]
    assert len(training) == 2
    for params, result in training:
        assert result is not None and len(result.survivors) == NODES
        for vector in spy.vectors[params.round_id].values():
            blocks = vector.reshape(k, -1)
            assert int((np.abs(blocks).sum(1) > 0).sum()) == 1
    assert doc["rounds"][0]["clusters"] == k and "clusters" not in doc["rounds"][1]


def test_secfpp_with_dp_reports_an_epsilon_that_covers_the_clustering(
    digits_backbone: Path, tmp_path: Path
) -> None:
    doc, _ = _run(tmp_path, client_module.app, **{"num-server-rounds": 1,
                                                  "cluster-iterations": 1})

    assert doc["status"] == "completed", doc.get("reason")
    eps = doc["rounds"][0]["epsilon"]
    assert 0 < eps <= doc["config"]["epsilon"]
    privacy = doc["summary"]["privacy"]
    assert privacy["noise-multiplier-summary"] == doc["config"]["summary-noise-multiplier"]
    assert 0 < privacy["eps-summary-alone"] < eps  # the summary's release is in the epsilon
    assert "counted in the printed epsilon" in doc["notes"]["clustering"]
    assert "domain summary" in doc["notes"]["privacy"]
    assert "NOT covered" not in doc["notes"]["privacy"]
    # the prompt an organisation may release says the same in its own metadata
    from dpfpl_app.method.prompt_file import load_prompt_file

    exported = sorted((tmp_path / "state").rglob("prompt.safetensors"))
    assert len(exported) == NODES
    meaning = load_prompt_file(exported[0]).metadata.privacy.meaning
    assert "domain summary" in meaning


class FailFirstClusteringSum(ClientApp):
    """The real ClientApp, except one node fails its first clustering masked stage."""

    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id, self.failed = node_id, False

    def __call__(self, message: Message, context: Context) -> Message:
        if (
            context.node_id == self.node_id
            and message.metadata.message_type == "query.secagg_collect_masked"
            and not self.failed
        ):
            self.failed = True
            raise RuntimeError("injected failure in a clustering sum")
        return client_module.app(message, context)


def test_a_clustering_sum_with_a_dropout_releases_nothing_and_is_asked_again(
    digits_backbone: Path, tmp_path: Path, spy: Spy, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.flower_harness import node_id_of

    doc, _ = _run(tmp_path, FailFirstClusteringSum(node_id_of(2)), **{
        "dp-mode": "off", "num-server-rounds": 1, "cluster-iterations": 1})

    assert doc["status"] == "completed", doc.get("reason")
    clustering = [r for purpose, _, r in spy.sums if purpose == "clustering"]
    assert clustering[0] is None  # every node must survive: 5 of 6 release nothing
    assert all(r is not None for r in clustering[1:])
    assert "sum discarded (attempt 1 of 3)" in caplog.text


def test_the_train_handler_refuses_a_clustering_round(tmp_path: Path) -> None:
    """A clustering round (noiseless config) must never carry a prompt gradient."""
    from flwr.app import RecordDict

    from dpfpl_app.federation.secure_client import masked_content
    from dpfpl_app.secagg.records import add_purpose

    cfg = RunConfig.from_flower(_config(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg = make_instruction(add_purpose(RecordDict(), "clustering"), dst_node_id=1,
                           message_type="train.secagg_collect_masked")
    trained = []
    with pytest.raises(ValueError, match="got a message for 'clustering'"):
        masked_content(msg, context, cfg, lambda: trained.append(1) or np.zeros(1))
    assert not trained


def test_secfpp_config_rules() -> None:
    with pytest.raises(ConfigError, match="aggregation='plain'"):
        RunConfig.from_flower({"method": "secfpp", "aggregation": "plain"})
    with pytest.raises(ConfigError, match="fraction-train"):
        RunConfig.from_flower({"method": "secfpp", "fraction-train": 0.5})
    with pytest.raises(ConfigError, match="min-cluster-size=11 exceeds min-nodes=10"):
        RunConfig.from_flower({"method": "secfpp", "min-cluster-size": 11})
    with pytest.raises(ConfigError, match="min-nodes >= 3"):
        RunConfig.from_flower({"method": "secfpp", "min-nodes": 2})
    from dpfpl_app.config import Aggregation

    cfg = RunConfig.from_flower({"method": "secfpp"})
    assert cfg.resolve_aggregation(Aggregation.PLAIN).aggregation is Aggregation.SECURE


def test_a_client_refuses_a_layout_beyond_the_run_configs_search(tmp_path: Path) -> None:
    """A server asking for more candidates than the config allows could exceed the bound."""
    from types import SimpleNamespace

    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from dpfpl_app.federation.client_messages import cluster_contribution
    from dpfpl_app.federation.secure_clustering import CLUSTER_ARRAYS, CLUSTER_RECORD

    cfg = RunConfig.from_flower(_config(tmp_path))  # max-clusters 2, restarts 2: (1, 2, 2)
    allowed = dc.Layout.search(cfg.max_clusters, cfg.cluster_restarts)
    for ks in ((1, 2, 2, 2), (3,)):
        content = RecordDict({
            CLUSTER_RECORD: ConfigRecord({"phase": "count", "ks": list(ks)}),
            CLUSTER_ARRAYS: ArrayRecord({
                "centroids": Array(np.zeros((sum(ks), cfg.summary_dim))),
                "open": Array(np.ones(sum(ks), dtype=np.uint8)),
            }),
        })
        msg = make_instruction(content, dst_node_id=1, message_type="query.secagg_collect_masked")
        with pytest.raises(ValueError, match="exceeds this run's search"):
            cluster_contribution(SimpleNamespace(cfg=cfg), msg)  # type: ignore[arg-type]
    assert allowed.ks == (1, 2, 2)


def test_a_secfpp_checkpoint_resumes_its_clusters_and_domain_prompts(
    digits_backbone: Path, tmp_path: Path
) -> None:
    import torch

    from dpfpl_app.federation.checkpoint import load_checkpoint, save_checkpoint
    from dpfpl_app.federation.cluster_strategy import SecFPPStrategy
    from dpfpl_app.federation.secure_clustering import Clusters
    from dpfpl_app.federation.strategy_build import build_strategy

    # Prepare: a strategy that has clustered into 2 domains and trained them apart
    cfg = RunConfig.from_flower(_config(tmp_path))
    strategy = build_strategy(cfg)
    assert isinstance(strategy, SecFPPStrategy)
    strategy.clusters = Clusters(
        nodes=(1, 2, 3, 4, 5, 6), centroids=np.eye(2, cfg.summary_dim), counts=(3, 3),
        scores={1: -5.0, 2: 1.5}, secure_sums=7, seconds=0.5,
    )
    strategy._prompt = torch.randn(2, *strategy._prompt.shape[1:])
    strategy._last_round = 1

    # Execute: through the checkpoint file, into a fresh strategy
    path = save_checkpoint(tmp_path / "run", strategy.state_dict(), config=cfg)
    state, _ = load_checkpoint(path, config=cfg)
    resumed = build_strategy(cfg)
    resumed.load_state_dict(state)

    # Assert
    assert isinstance(resumed, SecFPPStrategy) and resumed.clusters is not None
    torch.testing.assert_close(resumed.global_prompt, strategy.global_prompt)
    np.testing.assert_array_equal(resumed.clusters.centroids, strategy.clusters.centroids)
    assert resumed.clusters.counts == (3, 3) and resumed.rounds_done == 1
