"""What a SuperNode keeps between messages: the frozen model, features, private state.

In a deployment every message runs in a fresh ClientApp process, and a SuperNode can
restart. So the frozen CLIP is cached per process, image features on node-local disk
(``features.py``), and the private prompt state both in ``context.state`` (kept by the
SuperNode across rounds of a run) and in a node-local state directory (survives a
restart). Neither location is ever part of a Message: ``context.state`` stays on the
node, and the replies are built from ``wire`` builders that carry the global-prompt
gradient and scalar metrics only.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors.torch import load_file, save_file

from dpfpl_app.audit.canaries import injector_from_env
from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.cache import cache_root
from dpfpl_app.config import RunConfig
from dpfpl_app.data.features import FeatureCache
from dpfpl_app.data.federated_data import client_data, load_federated_data, source_spec
from dpfpl_app.federation.node_budget import ledger_charger
from dpfpl_app.federation.node_paths import partition_subdir
from dpfpl_app.federation.node_rate import node_rate
from dpfpl_app.federation.prompt_export import export_path, personalised_prompt_file
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.privacy.dp_channel import plan_for

logger = logging.getLogger(__name__)

STATE_ARRAYS = "dpfpl.private"
STATE_META = "dpfpl.meta"
CANARY_RATE_KEY = "canary-sample-rate"


@lru_cache(maxsize=2)
def cached_clip(model: str) -> FrozenClip:
    return load_frozen_clip(model)


def node_partition(context: Context) -> tuple[int, int]:
    """``partition-id`` and ``num-partitions`` from the SuperNode's node config."""
    try:
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}: start the SuperNode with "
            '--node-config "partition-id=I num-partitions=N"'
        ) from None
    return pid, num


def state_root(cfg: RunConfig, context: Context) -> Path:
    """The node's state root: node config ``state-dir``, else the run's, else the cache's."""
    root = Path(cfg.state_dir).expanduser() if cfg.state_dir else cache_root() / "state"
    node_root = context.node_config.get("state-dir")
    if node_root:
        root = Path(str(node_root)).expanduser()
    return root


def state_directory(cfg: RunConfig, context: Context, partition_id: int) -> Path:
    """Node-local directory of this client's private state for this run."""
    return state_root(cfg, context) / partition_subdir(cfg.run_name, context.run_id, partition_id)


def class_names(cfg: RunConfig) -> tuple[str, ...]:
    """The run's class names in label order (what the prompt's classes are)."""
    return load_federated_data(
        source_spec(cfg), test_fraction=cfg.test_fraction, seed=cfg.seed
    ).class_names


def with_node_data(cfg: RunConfig, context: Context) -> RunConfig:
    """An organisation's own data: node-config ``dataset`` / ``data-dir`` win over the run's.

    In a deployment the images live on each organisation's host, at a path only that
    host knows; the run config names the experiment, the node config names the data.
    """
    updates = {
        key: str(context.node_config[key])
        for key in ("dataset", "data-dir")
        if key in context.node_config
    }
    if not updates:
        return cfg
    return RunConfig.from_flower({**cfg.to_flower(), **updates})


def build_trainer(cfg: RunConfig, context: Context) -> ClientTrainer:
    """A trainer for this node, with its private state restored if any was kept."""
    cfg = with_node_data(cfg, context)
    pid, num = node_partition(context)
    # the Poisson rate is fixed before the data is read (``node_rate``)
    plan = plan_for(cfg)
    rate = node_rate(cfg, plan, context.node_config, partition_id=pid, num_partitions=num)
    logger.info("partition %d samples at %s", pid, rate.describe())
    charge = ledger_charger(
        cfg, plan, context.node_config, state_root=state_root(cfg, context),
        run_id=context.run_id, partition_id=pid, sample_rate=rate.rate,
    )
    clip = cached_clip(cfg.model)
    features = FeatureCache(cache_root() / "features")
    data = client_data(cfg, clip, features, partition_id=pid, num_partitions=num)
    # an audit's canaries: only if this node's operator named a canary file
    canaries = injector_from_env(pid, shape=(cfg.n_ctx, clip.text_width), clip_norm=cfg.clip_norm)
    trainer = ClientTrainer(
        cfg, clip, class_names(cfg), data,
        partition_id=pid, sample_rate=rate.rate, canaries=canaries,
    )
    directory = state_directory(cfg, context, pid)
    restored = _from_context(context) or _from_disk(directory)
    if restored is not None:
        owner = restored[1].get("run_id")
        if owner != context.run_id and cfg.resume:
            # a resumed run (same run-name) continues the interrupted run's prompt and budget
            logger.info("run %s resumes the private state of run %s", context.run_id, owner)
        elif owner != context.run_id:
            # Resuming another run's prompt would silently continue its privacy budget
            # and its personalisation under this run's name.
            raise ValueError(
                f"{directory} holds the private state of run {owner}, not of this run "
                f"({context.run_id}): choose another run-name or state-dir, or move that "
                "directory away (it is the only copy of that run's local prompts)"
            )
        trainer.load_state_dict(*restored)
    trainer.before_round = charge  # every round is in the node's ledger before it samples
    return trainer


def save_state(trainer: ClientTrainer, cfg: RunConfig, context: Context) -> None:
    """Keep the private state in ``context.state`` and on node-local disk (0600).

    The personalised prompt is exported next to it (``prompt.safetensors``, 0600) for
    the organisation to release if it chooses, with the composed epsilon it cost.
    """
    tensors, meta = trainer.state_dict()
    meta = {**meta, "run_id": context.run_id}
    if trainer.canaries is not None:  # the rate they were drawn at, for the audit's report
        meta[CANARY_RATE_KEY] = trainer.sample_rate
    context.state[STATE_ARRAYS] = ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
    context.state[STATE_META] = ConfigRecord({"json": json.dumps(meta)})
    directory = state_directory(cfg, context, trainer.partition_id)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(directory / "private.safetensors", lambda p: save_file(tensors, p))
    _write_private(directory / "meta.json", lambda p: Path(p).write_text(json.dumps(meta)))
    exported = personalised_prompt_file(
        trainer,
        cached_clip(cfg.model),
        class_names(trainer.cfg),  # the node's own data when its node config names it
    )
    exported.save(export_path(directory))


def _write_private(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    write(str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written state


def _from_context(context: Context) -> tuple[dict, dict] | None:
    if STATE_ARRAYS not in context.state:
        return None
    tensors = context.state[STATE_ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    meta = json.loads(str(context.state[STATE_META]["json"]))  # type: ignore[index]
    return tensors, meta


def _from_disk(directory: Path) -> tuple[dict, dict] | None:
    tensors, meta = directory / "private.safetensors", directory / "meta.json"
    if not (tensors.is_file() and meta.is_file()):
        return None
    logger.info("resuming private prompt state from %s", directory)
    return load_file(tensors), json.loads(meta.read_text())
