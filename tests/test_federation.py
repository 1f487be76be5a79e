"""Whole federations in one process: the real ServerApp and ClientApp, no SuperLink.

These drive ``server_app.app`` and ``client_app.app`` exactly as Flower does (through the
in-process Grid of ``flower_harness``, with protobuf round trips of every message) on the
project's pretrained offline backbone and scikit-learn's digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import ConfigError, Method, RunConfig
from dpfpl_app.federation import wire
from dpfpl_app.federation.client_node import STATE_ARRAYS, build_trainer, save_state
from dpfpl_app.privacy.accounting import RDP_ORDERS
from tests.flower_harness import federation_config, run_server_app


def _config(tmp_path: Path, **overrides: object) -> dict:
    return federation_config(tmp_path, **{"min-nodes": 4, **overrides})


def _results(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "t" / "results.json").read_text())


def _private_states(tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((tmp_path / "state" / "t").glob("partition-*/private.safetensors"))
    return [load_file(f) for f in files]


def test_dpfpl_federation_learns_and_writes_results(digits_backbone: Path, tmp_path: Path) -> None:
    # Prepare: no DP so the accuracy trend is the method's, 8 rounds, 4 clients, at a
    # rate that shows it within 8 rounds (the default is tuned for 30 rounds under DP)
    cfg = _config(tmp_path, **{"dp-mode": "off", "num-server-rounds": 8, "lr-local": 0.01,
                               "lr-global": 0.01})
    # ... and the same run with learning off (rates 1e-9): same seed, so the same
    # minibatches and test images; evaluated once, at the end
    frozen = _config(tmp_path / "frozen", **{"dp-mode": "off", "num-server-rounds": 8,
                                             "lr-local": 1e-9, "lr-global": 1e-9,
                                             "evaluate-every": 8})

    # Execute
    run_server_app(server_module.app, client_app=client_module.app, num_nodes=4, run_config=cfg)
    run_server_app(server_module.app, client_app=client_module.app, num_nodes=4,
                   run_config=frozen)

    # Assert: completed, every round recorded, local accuracy rose over the run
    doc = _results(tmp_path)
    assert doc["status"] == "completed"
    assert [r["round"] for r in doc["rounds"]] == list(range(1, 9))
    # which build of the backbone (builds on two machines differ in their last bits)
    built = json.loads((digits_backbone / "dpfpl_backbone.json").read_text())
    assert f"weights sha256 {built['weights_sha256'][:16]}" in doc["notes"]["backbone"]
    # against the frozen run, not a figure of one machine's trajectory (float order and
    # the locally built backbone differ between CPUs): round 1's loss is taken before any
    # update, so it is the same; later rounds' losses on the same minibatches and the
    # final local accuracy on the same images are clearly better for the learner
    base = _results(tmp_path / "frozen")["rounds"]
    losses, base_losses = ([r["train-loss"] for r in rs] for rs in (doc["rounds"], base))
    assert losses[0] == pytest.approx(base_losses[0], rel=1e-4), (losses, base_losses)
    assert sum(losses[-3:]) < 0.9 * sum(base_losses[-3:]), (losses, base_losses)
    last, base_last = doc["rounds"][-1]["local-acc"], base[-1]["local-acc"]
    assert last >= base_last + 0.02, (last, base_last)
    for name in ("metrics.csv", "accuracy.png", "epsilon.png"):
        assert (tmp_path / "runs" / "t" / name).stat().st_size > 0


def _recording_client(private: list[torch.Tensor]) -> ClientApp:
    """The real ClientApp, recording the node's private state after every message it
    answers (every round's state, not only the final one).
    """
    spy = ClientApp()

    def record(reply: Message, context: Context) -> Message:
        state = context.state.array_records[STATE_ARRAYS].to_torch_state_dict()
        private.extend(t.clone() for t in state.values())
        return reply

    @spy.train()
    def _train(msg: Message, context: Context) -> Message:
        return record(client_module.train(msg, context), context)

    @spy.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return record(client_module.evaluate(msg, context), context)

    return spy


def test_no_private_tensor_ever_leaves_a_client(digits_backbone: Path, tmp_path: Path) -> None:
    # Prepare: record every reply as it would go over the wire, and every round's state
    replies: list[Message] = []
    private: list[torch.Tensor] = []
    cfg = _config(tmp_path, **{"dp-mode": "per-sample", "num-server-rounds": 3})

    # Execute
    run_server_app(
        server_module.app,
        client_app=_recording_client(private),
        num_nodes=4,
        run_config=cfg,
        on_reply=replies.append,
    )

    # Assert: only the global-prompt gradient is ever sent, and it is none of the private
    # tensors (local prompt, carriers, residual-bearing momentum) of any node in any round
    assert len(private) >= 4 * 3 * 2
    for reply in replies:
        content = reply.content
        for name in content.array_records:
            assert set(content.array_records[name].keys()) == {wire.GLOBAL_PROMPT_GRAD}
        assert not content.config_records
        for record in content.array_records.values():
            sent = record.to_torch_state_dict()[wire.GLOBAL_PROMPT_GRAD]
            for tensor in private:
                if tensor.shape == sent.shape:
                    assert not torch.allclose(sent, tensor, atol=1e-6)
                    assert not torch.allclose(sent, -tensor, atol=1e-6)


# with DP the only metric is the node's declared rate: public, fixed before its data is read
TRAIN_METRICS = {"per-sample": {wire.SAMPLE_RATE}, "paper": {wire.SAMPLE_RATE},
                 "off": {wire.TRAIN_LOSS}}
ROUND_KEYS = {
    "round", "elapsed-s", wire.ACCEPTED, wire.REJECTED, wire.BYTES_RECEIVED, wire.EPSILON,
    wire.NOISE_STD, wire.UPDATE_NORM, wire.EVAL_ACCEPTED, wire.EVAL_REJECTED, wire.LOCAL_ACC,
    wire.NEIGHBOUR_ACC, wire.LOCAL_ACC_WEIGHTED, wire.NEIGHBOUR_ACC_WEIGHTED,
    wire.ZEROSHOT_LOCAL_ACC, wire.ZEROSHOT_NEIGHBOUR_ACC, wire.ZEROSHOT_LOCAL_ACC_WEIGHTED,
    wire.ZEROSHOT_NEIGHBOUR_ACC_WEIGHTED, wire.PRIOR_LOCAL_ACC, wire.PRIOR_NEIGHBOUR_ACC,
    wire.PRIOR_LOCAL_ACC_WEIGHTED, wire.PRIOR_NEIGHBOUR_ACC_WEIGHTED, wire.HARMONIC_ACC,
    wire.ZEROSHOT_HARMONIC_ACC, wire.PRIOR_HARMONIC_ACC, wire.ALL_ACC, wire.ZEROSHOT_ALL_ACC,
    wire.PRIOR_ALL_ACC, wire.ALL_ACC_WEIGHTED, wire.ZEROSHOT_ALL_ACC_WEIGHTED,
    wire.PRIOR_ALL_ACC_WEIGHTED,
}


@pytest.mark.parametrize("dp_mode", ["per-sample", "paper", "off"])
def test_replies_and_results_carry_exactly_what_the_dp_mode_allows(
    dp_mode: str, digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: with DP, nothing about a client's training data but the clipped gradient
    # may leave it (no loss, size or pre-noise norm; its rate is declared, not measured),
    # nor reach the results
    replies: list[Message] = []
    cfg = _config(tmp_path, **{"dp-mode": dp_mode, "num-server-rounds": 2, "min-nodes": 3})

    # Execute
    run_server_app(
        server_module.app,
        client_app=client_module.app,
        num_nodes=3,
        run_config=cfg,
        on_reply=replies.append,
    )

    # Assert
    train = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train) == 6
    assert all(set(r.content.metric_records["metrics"]) == TRAIN_METRICS[dp_mode] for r in train)
    doc = _results(tmp_path)
    for row in doc["rounds"]:
        per_client = {k for k in row if "/node-" in k}
        expected = ROUND_KEYS | ({wire.TRAIN_LOSS} if dp_mode == "off" else set())
        assert set(row) - per_client == expected, set(row) ^ expected
    csv_header = (tmp_path / "runs" / "t" / "metrics.csv").read_text().splitlines()[0]
    assert ("train-loss" in csv_header) is (dp_mode == "off")


def test_printed_epsilon_equals_an_independent_recomputation(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the main job's settings, shortened
    cfg = _config(
        tmp_path, **{"num-server-rounds": 3, "local-steps": 2, "reproducible-noise": False}
    )

    # Execute
    run_server_app(server_module.app, client_app=client_module.app, num_nodes=4, run_config=cfg)

    # Assert: a fresh opacus accountant fed the logged multiplier, the largest node rate
    # (each node's from the public partition plan, never above the bound) and the steps,
    # one step at a time, gives every printed epsilon; the last is within the target
    doc = _results(tmp_path)
    privacy = doc["summary"]["privacy"]
    assert privacy["guarantee"] == "accounted" and privacy["steps"] == 6
    nodes = privacy["node-epsilons"]
    assert len(nodes) == 4
    assert all(0 < node["sample-rate"] <= privacy["sample-rate-bound"] for node in nodes.values())
    z, q = privacy["noise-multiplier-step"], max(node["sample-rate"] for node in nodes.values())
    assert privacy["epsilon"] == max(node["epsilon"] for node in nodes.values())
    accountant = RDPAccountant()
    for row in doc["rounds"]:
        for _ in range(2):
            accountant.step(noise_multiplier=z, sample_rate=q)
        assert row["epsilon"] == pytest.approx(
            accountant.get_epsilon(delta=1e-5, alphas=RDP_ORDERS), rel=1e-9
        )
    assert doc["rounds"][-1]["epsilon"] == privacy["epsilon"] <= privacy["target-epsilon"]
    # the two channels' multipliers compose into the accounted one
    z_local, z_global = privacy["noise-multiplier-local"], privacy["noise-multiplier-global"]
    assert (z_local**-2 + 1 / (2 * z_global**2)) ** -0.5 == pytest.approx(z, rel=1e-12)


def test_global_prompt_identical_across_clients_local_prompts_differ(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: a ClientApp that records the prompt each node receives, then delegates
    received: dict[int, list[torch.Tensor]] = {}
    spy = ClientApp()

    @spy.train()
    def _train(msg: Message, context: Context) -> Message:
        prompt = wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD])
        received.setdefault(int(msg.content["config"][wire.SERVER_ROUND]), []).append(prompt)
        return client_module.train(msg, context)

    @spy.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_module.evaluate(msg, context)

    # Execute
    run_server_app(server_module.app, client_app=spy, num_nodes=4, run_config=_config(tmp_path))

    # Assert
    for prompts in received.values():
        assert len(prompts) == 4
        assert all(torch.equal(prompts[0], p) for p in prompts[1:])
    assert not torch.equal(received[1][0], received[3][0])  # the global prompt moved
    locals_ = [s["local_prompt"] for s in _private_states(tmp_path)]
    assert len(locals_) == 4
    assert all(not torch.allclose(locals_[0], other) for other in locals_[1:])


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_every_method_runs_as_a_federation(
    method: str, digits_backbone: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, method=method, **{"num-server-rounds": 2, "min-nodes": 3})

    run_server_app(server_module.app, client_app=client_module.app, num_nodes=3, run_config=cfg)

    doc = _results(tmp_path)
    assert doc["status"] == "completed"
    assert len(doc["rounds"]) == 2
    assert all(0.0 <= r["local-acc"] <= 1.0 for r in doc["rounds"])
    # the headline metrics and the references a class prior sets: every round, in [0, 1],
    # and the prior's frontier never below zero-shot (its bias 0 is zero-shot itself)
    for row in doc["rounds"]:
        for key in ("harmonic-acc", "all-acc", "zeroshot-harmonic-acc", "zeroshot-all-acc",
                    "prior-harmonic-acc", "prior-local-acc", "prior-neighbour-acc"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert row["prior-harmonic-acc"] >= row["zeroshot-harmonic-acc"]
    assert 0.0 <= doc["summary"]["last10-harmonic-acc"] <= 1.0
    assert doc["prior"]["harmonic-acc"] >= doc["zeroshot"]["harmonic-acc"]


def test_restarted_node_resumes_its_private_prompt(digits_backbone: Path, tmp_path: Path) -> None:
    # Prepare: one run, then the node's in-memory state is lost (a SuperNode restart)
    cfg = RunConfig.from_flower(_config(tmp_path))
    node_config = {"partition-id": 0, "num-partitions": 4}

    def new_context() -> Context:
        return Context(
            run_id=7,
            node_id=1,
            node_config=node_config,
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )

    context = new_context()
    trainer = build_trainer(cfg, context)
    trainer.train_round(torch.zeros_like(trainer.learner.global_prompt), 1)
    save_state(trainer, cfg, context)
    saved = trainer.learner.private_state()["local_prompt"]
    fresh = new_context()

    # Execute
    resumed = build_trainer(cfg, fresh)

    # Assert
    assert resumed.rounds_done == 1
    assert torch.equal(resumed.learner.private_state()["local_prompt"], saved)
    state_file = next((tmp_path / "state").rglob("private.safetensors"))
    assert state_file.stat().st_mode & 0o077 == 0  # readable by the node's user only


def test_invalid_run_config_stops_the_run_before_anything_runs(
    digits_backbone: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, rank=40)

    with pytest.raises(ConfigError, match=r"rank=40 exceeds n-ctx=16"):
        run_server_app(server_module.app, client_app=client_module.app, num_nodes=2, run_config=cfg)
    assert not (tmp_path / "runs").exists()


def test_state_of_another_run_is_never_resumed(digits_backbone: Path, tmp_path: Path) -> None:
    # Prepare: run 7 leaves its private state under run-name "t"
    cfg = RunConfig.from_flower(_config(tmp_path))
    node_config = {"partition-id": 0, "num-partitions": 4}
    first = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(),
                    run_config=cfg.to_flower())
    trainer = build_trainer(cfg, first)
    trainer.train_round(torch.zeros_like(trainer.learner.global_prompt), 1)
    save_state(trainer, cfg, first)
    other = Context(run_id=8, node_id=1, node_config=node_config, state=RecordDict(),
                    run_config=cfg.to_flower())

    # Execute / Assert: a new run with the same run-name refuses instead of inheriting
    # run 7's prompt and privacy budget
    with pytest.raises(ValueError, match="holds the private state of run 7"):
        build_trainer(cfg, other)
