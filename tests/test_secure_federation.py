"""Secure DP-FPL federations in one process: real ServerApp, ClientApp and messages.

What the server receives is ``grid.replies`` (every reply, after protobuf). The test
hook reads what never leaves a client: each client's clipped vector and its quantised,
noised integer input, by wrapping ``ClientRound.collect_masked`` so that its rounding
and noise come from a stream the test can replay (production draws them from the OS).
The server's unmasked training sums are read by wrapping ``SecureRound.aggregate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from secagg_harness import write_openssh_key

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import RunConfig
from dpfpl_app.federation.client_node import STATE_ARRAYS
from dpfpl_app.federation.secure_client import PROMPT, STATE_KEY
from dpfpl_app.federation.secure_round import SecureRound
from dpfpl_app.privacy.dp_channel import plan_for
from dpfpl_app.secagg import AggregateResult, ClientRound, RoundParams, Stage, fixed_point, skellam
from dpfpl_app.secagg.records import message_type, read_payload
from dpfpl_app.secagg.stream import KeyStream
from dpfpl_app.secagg.wire import MASKED
from tests.flower_harness import federation_config, node_id_of, run_server_app

NODES = 5  # complete graph, threshold 3, min-survivors 4: one dropout per round is fine


@dataclass
class Spy:
    """What the clients fed into SecAgg and what the server unmasked, per round id."""

    vectors: dict[tuple[bytes, int], np.ndarray] = field(default_factory=dict)
    inputs: dict[tuple[bytes, int], np.ndarray] = field(default_factory=dict)
    masked: dict[tuple[bytes, int], np.ndarray] = field(default_factory=dict)
    sums: list[tuple[RoundParams, AggregateResult | None]] = field(default_factory=list)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    record = Spy()
    collect, aggregate = ClientRound.collect_masked, SecureRound.aggregate

    def collect_masked(self: ClientRound, payload, vector, *, stream=None):  # noqa: ANN001, ANN202
        params = RoundParams.from_payload(self.to_state())
        key = (params.round_id, self.node_id)

        def draws() -> KeyStream:
            return KeyStream.from_seed(0, "test-draws", params.round_id.hex(), self.node_id)

        replay = draws()
        q = fixed_point.quantise(vector, clip=params.clip, scale=params.scale, stream=replay)
        record.inputs[key] = q + skellam.skellam(params.client_variance, params.dim, replay)
        record.vectors[key] = np.asarray(vector, dtype=np.float64)
        reply = collect(self, payload, vector, stream=draws())
        record.masked[key] = reply[MASKED].astype(np.uint64)
        return reply

    def spy_aggregate(self: SecureRound, replies):  # noqa: ANN001, ANN202
        result = aggregate(self, replies)
        if self._purpose == PROMPT:  # the training sums (evaluation has its own tests)
            record.sums.append((self.params, result))
        return result

    monkeypatch.setattr(ClientRound, "collect_masked", collect_masked)
    monkeypatch.setattr(SecureRound, "aggregate", spy_aggregate)
    return record


class FailingNodes(ClientApp):
    """The real ClientApp, except that chosen nodes raise at a chosen stage of a round."""

    def __init__(self, failures: dict[tuple[int, str], set[int]]) -> None:
        super().__init__()
        self.failures = failures  # (round, stage) -> node ids that fail there

    def __call__(self, message: Message, context: Context) -> Message:
        stage = message.metadata.message_type.partition(".")[2]
        round_ = int(message.metadata.group_id or 0)
        if context.node_id in self.failures.get((round_, stage), set()):
            raise RuntimeError(f"injected failure at {stage}")
        return client_module.app(message, context)


def _run(
    tmp_path: Path, app: ClientApp, rounds: int, node_configs: list[dict] | None = None
) -> tuple[dict, RunConfig]:
    cfg = federation_config(
        tmp_path, **{"min-nodes": NODES, "aggregation": "secure", "num-server-rounds": rounds}
    )
    run = run_server_app(
        server_module.app,
        client_app=app,
        num_nodes=NODES,
        run_config=cfg,
        node_configs=node_configs,
    )
    doc = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    return {"doc": doc, "replies": run.replies, "grid": run.grid}, RunConfig.from_flower(cfg)


def test_secure_federation_with_a_dropout_at_each_stage(
    digits_backbone: Path, tmp_path: Path, spy: Spy, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: in round r, node r-1 fails at the r-th stage of an unsigned round (no
    # consistency stage: the survivor list goes with the unmask request)
    stages = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK)
    failures = {(r + 1, stage): {node_id_of(r)} for r, stage in enumerate(stages)}

    # Execute
    out, cfg = _run(tmp_path, FailingNodes(failures), rounds=len(stages))

    # Assert: every round released a sum of exactly its survivors' noised inputs
    doc = out["doc"]
    assert doc["status"] == "completed"
    assert len(spy.sums) == len(stages)
    assert all(result is not None for _, result in spy.sums)
    answered = {r.metadata.message_type.partition(".")[2] for r in out["replies"]}
    assert set(stages) <= answered and Stage.CONSISTENCY not in answered
    for (params, result), expected in zip(spy.sums, (4, 4, 4, 5), strict=True):
        assert result is not None and len(result.survivors) == expected
        inputs = [spy.inputs[(params.round_id, v)] for v in result.survivors]
        np.testing.assert_array_equal(result.integer_total, np.sum(inputs, axis=0))
    # every dropout is logged with the node and the stage it was lost at
    for (round_, stage), (node,) in failures.items():
        assert f"secure round {round_}: node {node} dropped out at {stage}" in caplog.text
    # a node failing at unmask is still in the sum (its seed rebuilt from shares)
    assert node_id_of(3) in spy.sums[3][1].survivors  # type: ignore[union-attr]
    # the printed epsilon is the plan's accountant at the actual survivors
    plan = plan_for(cfg)
    ratios = [len(r.survivors) / p.min_survivors for p, r in spy.sums if r is not None]
    for i, row in enumerate(doc["rounds"]):
        assert row["survivors"] == len(spy.sums[i][1].survivors)  # type: ignore[union-attr]
        assert row["epsilon"] == pytest.approx(plan.secure_epsilon(ratios[: i + 1]), rel=1e-12)
    assert doc["rounds"][-1]["epsilon"] <= cfg.epsilon


def test_signed_nodes_sign_the_survivor_list_unsigned_ones_skip_that_stage(
    digits_backbone: Path, tmp_path: Path, spy: Spy
) -> None:
    # Prepare: every node holds its organisation's key and the registry of all of them
    registry = tmp_path / "registry"
    registry.mkdir()
    for i in range(NODES):
        write_openssh_key(registry / f"org-{i}")
    signed = [
        {"secagg-signing-key": str(registry / f"org-{i}"), "secagg-registry": str(registry),
         "secagg-require-signed": "true"}
        for i in range(NODES)
    ]  # fmt: skip

    # Execute: one round signed, one unsigned
    out_signed, _ = _run(tmp_path / "signed", client_module.app, rounds=1, node_configs=signed)
    out_plain, _ = _run(tmp_path / "unsigned", client_module.app, rounds=1)

    # Assert: both released the exact sum of all nodes; only the signed one had the
    # consistency stage, once per node for training and once for the evaluation sum
    for out in (out_signed, out_plain):
        assert out["doc"]["status"] == "completed"
    assert len(spy.sums) == 2
    for params, result in spy.sums:
        assert result is not None and len(result.survivors) == NODES
        inputs = [spy.inputs[(params.round_id, v)] for v in result.survivors]
        np.testing.assert_array_equal(result.integer_total, np.sum(inputs, axis=0))

    def stages(out: dict) -> list[str]:
        return [r.metadata.message_type.partition(".")[2] for r in out["replies"]]

    assert stages(out_signed).count(Stage.CONSISTENCY) == 2 * NODES
    assert Stage.CONSISTENCY not in stages(out_plain)
    assert len(stages(out_signed)) - len(stages(out_plain)) == 2 * NODES


def test_no_message_the_server_receives_carries_a_gradient(
    digits_backbone: Path, tmp_path: Path, spy: Spy
) -> None:
    out, _ = _run(tmp_path, client_module.app, rounds=1)

    masked_type = message_type(Stage.COLLECT_MASKED)
    received = [r for r in out["replies"] if r.metadata.message_type == masked_type]
    assert len(received) == NODES and not any(r.has_error() for r in received)
    params = spy.sums[0][0]
    for reply in received:
        # the only array a training reply carries is the masked vector
        assert set(reply.content.array_records) == {"secagg-arrays"}
        masked = read_payload(reply.content)[MASKED].astype(np.uint64)
        key = (params.round_id, reply.metadata.src_node_id)
        np.testing.assert_array_equal(masked, spy.masked[key])
        # masked - input is a mask: uniform over the ring, unrelated to the input
        ring = float(2**params.bits)
        u = (masked.astype(np.float64) + 0.5) / ring
        tol = 6.0 / np.sqrt(12 * u.size)
        assert abs(u.mean() - 0.5) < tol
        assert abs(np.mean(u < 0.25) - 0.25) < 6 * np.sqrt(0.1875 / u.size)
        x = spy.vectors[key]
        assert abs(np.corrcoef(u, x)[0, 1]) < 6 / np.sqrt(u.size)
        # decoding the reply as a fixed-point vector gives nothing near the gradient
        decoded = fixed_point.dequantise(fixed_point.from_ring(masked, params.bits), params.scale)
        assert np.linalg.norm(decoded - x) > 100 * np.linalg.norm(x)
    # the round's secrets are gone from every node's state; the training state stays
    for context in out["grid"].contexts.values():
        assert STATE_KEY not in context.state
        assert STATE_ARRAYS in context.state


def test_a_round_below_the_release_threshold_releases_nothing(
    digits_backbone: Path, tmp_path: Path, spy: Spy
) -> None:
    # two of five drop before masking: 3 < min-survivors 4
    failures = {(1, Stage.COLLECT_MASKED): {node_id_of(0), node_id_of(1)}}

    out, cfg = _run(tmp_path, FailingNodes(failures), rounds=1)

    row = out["doc"]["rounds"][0]
    assert spy.sums == [(spy.sums[0][0], None)]
    assert row["survivors"] == 0 and row["secagg-aborted-stage"] == 3
    assert "update-norm" not in row  # the global prompt did not move
    # the three that trained released their local carriers: only that is charged
    assert row["epsilon"] == pytest.approx(plan_for(cfg).secure_epsilon([None]), rel=1e-12)
