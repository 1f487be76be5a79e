"""Server checkpoints: saved every round; a resumed run continues exactly, accounting included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import Aggregation, ConfigError, RunConfig
from dpfpl_app.federation import server_run
from dpfpl_app.federation.checkpoint import (
    FORMAT_NAME,
    CheckpointError,
    CheckpointMeta,
    checkpoint_path,
    load_checkpoint,
)
from dpfpl_app.privacy.dp_channel import plan_for
from tests.flower_harness import federation_config, run_server_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROUNDS = 4
STOP_AFTER = 2


class _Interrupted(Exception):
    """Stands in for a crashed ServerApp."""


def _config(tmp: Path, **overrides: object) -> dict[str, Any]:
    base = {"num-server-rounds": ROUNDS, "min-nodes": 3, "batch-size": 16}
    return federation_config(
        tmp, **{**base, "epsilon": 2.0, **overrides}
    )


def _run(cfg: dict[str, Any]) -> None:
    run_server_app(server_module.app, client_app=client_module.app, num_nodes=3, run_config=cfg)


def _rounds(tmp: Path) -> list[dict[str, Any]]:
    return json.loads((tmp / "runs" / "t" / "results.json").read_text())["rounds"]


def _prompt(tmp: Path, server_round: int) -> torch.Tensor:
    return load_file(checkpoint_path(tmp / "runs" / "t", server_round))["global_prompt"]


@pytest.fixture(scope="module")
def uninterrupted(digits_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _run(_config(tmp))
    return tmp


def test_a_checkpoint_is_written_every_round(uninterrupted: Path) -> None:
    # as the ServerApp resolves it in a simulation: 'auto' is plain
    cfg = RunConfig.from_flower(_config(uninterrupted)).resolve_aggregation(Aggregation.PLAIN)

    metas = []
    for r in range(1, ROUNDS + 1):
        with safe_open(str(checkpoint_path(uninterrupted / "runs" / "t", r)), "pt") as handle:
            metas.append(CheckpointMeta.model_validate_json(handle.metadata()[FORMAT_NAME]))
    latest, _ = load_checkpoint(checkpoint_path(uninterrupted / "runs" / "t", ROUNDS), config=cfg)

    assert [meta.round for meta in metas] == list(range(1, ROUNDS + 1))
    assert all(meta.strategy["channel"] == plan_for(cfg).describe() for meta in metas)
    assert not torch.equal(_prompt(uninterrupted, 1), latest["global_prompt"])


def test_resume_after_round_k_continues_the_uninterrupted_trajectory(
    uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the same run, crashed right after round STOP_AFTER was checkpointed
    real_save = server_run.save_checkpoint

    def save_then_crash(run_dir: Path, state: dict, **kwargs: Any) -> Path:
        path = real_save(run_dir, state, **kwargs)
        if state["round"] == STOP_AFTER:
            raise _Interrupted
        return path

    monkeypatch.setattr(server_run, "save_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        _run(_config(tmp_path))
    monkeypatch.setattr(server_run, "save_checkpoint", real_save)
    assert not checkpoint_path(tmp_path / "runs" / "t", STOP_AFTER + 1).exists()
    resume = str(checkpoint_path(tmp_path / "runs" / "t", STOP_AFTER))

    # Execute: a new ServerApp run (fresh node contexts) resumes from the checkpoint
    _run(_config(tmp_path, resume=resume))

    # Assert: the same global prompts, the same epsilons (continued, not restarted)
    for r in range(1, ROUNDS + 1):
        assert torch.equal(_prompt(tmp_path, r), _prompt(uninterrupted, r)), r
    resumed, reference = _rounds(tmp_path), _rounds(uninterrupted)
    assert [row["round"] for row in resumed] == list(range(1, ROUNDS + 1))
    for key in ("epsilon", "update-norm", "local-acc"):
        assert [row[key] for row in resumed] == [row[key] for row in reference], key
    eps = [row["epsilon"] for row in resumed]
    assert 0 < eps[STOP_AFTER - 1] < eps[STOP_AFTER] < eps[-1] <= 2.0


def test_resume_refuses_a_changed_config(uninterrupted: Path) -> None:
    path = checkpoint_path(uninterrupted / "runs" / "t", 2)
    changed = RunConfig.from_flower(_config(uninterrupted, **{"epsilon": 8.0}))
    path = checkpoint_path(uninterrupted / "runs" / "t", ROUNDS)

    with pytest.raises(CheckpointError, match=r"epsilon \(2.0 -> 8.0\)"):
        load_checkpoint(path, config=changed)
    with pytest.raises(CheckpointError, match="cannot resume from"):
        load_checkpoint(uninterrupted / "missing.safetensors", config=changed)


def test_resume_from_an_older_checkpoint_is_refused(uninterrupted: Path) -> None:
    # the clients trained rounds 3 and 4 already: resuming after round 2 would have them
    # spend those rounds' budget twice
    cfg = RunConfig.from_flower(_config(uninterrupted))
    older = checkpoint_path(uninterrupted / "runs" / "t", 2)

    latest = r"older than this run's latest checkpoint \(round 4\).*twice.*round-0004"
    with pytest.raises(CheckpointError, match=latest):
        load_checkpoint(older, config=cfg)


def test_resume_needs_the_run_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs run-name"):
        RunConfig.from_flower(_config(tmp_path, resume="x.safetensors", **{"run-name": ""}))
