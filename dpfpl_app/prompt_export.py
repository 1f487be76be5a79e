"""A node's export of its personalised prompt, with the epsilon each channel really spent.

The export runs on the node and writes into the node's own state directory; nothing
here builds or touches a Message, so the server never receives the prompt. The
numbers come from where they are known: the local channel from the trainer's own
accountant, the global channel from the figure the server broadcast with the global
prompt this client last used. When that figure never reached the node the file says
``unknown``, it never guesses.
"""

from __future__ import annotations

import math
from pathlib import Path

from flwr.app import Message

from dpfpl_app import wire
from dpfpl_app.backbone import FrozenClip
from dpfpl_app.client_trainer import ClientTrainer
from dpfpl_app.config import DPMode, RunConfig
from dpfpl_app.node_paths import PROMPT_FILE
from dpfpl_app.prompt_file import (
    ChannelPrivacy,
    PrivacyStatus,
    PromptFile,
    PromptMetadata,
    backbone_fingerprint,
    utc_now,
)


def local_channel(trainer: ClientTrainer) -> ChannelPrivacy:
    """The local channel's spend, from the trainer's accountant (or the paper's nominal)."""
    cfg = trainer.cfg
    if not cfg.method.has_local:
        return ChannelPrivacy(status=PrivacyStatus.NOT_APPLICABLE)
    if not cfg.dp_on:
        return ChannelPrivacy(status=PrivacyStatus.NO_DP)
    if cfg.dp_mode is DPMode.PAPER:
        return ChannelPrivacy(
            status=PrivacyStatus.NOMINAL, epsilon=trainer.eps_local(), delta=cfg.delta
        )
    accountant = trainer.local_accountant
    return ChannelPrivacy(
        status=PrivacyStatus.ACCOUNTED,
        epsilon=accountant.epsilon(),
        delta=accountant.delta,
        steps=accountant.steps,
    )


def global_channel(cfg: RunConfig, broadcast_epsilon: float | None) -> ChannelPrivacy:
    """The global channel's spend as the server announced it for the prompt in use."""
    if not cfg.method.has_global:
        return ChannelPrivacy(status=PrivacyStatus.NOT_APPLICABLE)
    if not cfg.dp_on:
        return ChannelPrivacy(status=PrivacyStatus.NO_DP)
    if broadcast_epsilon is None:
        return ChannelPrivacy(status=PrivacyStatus.UNKNOWN, delta=cfg.delta)
    status = PrivacyStatus.NOMINAL if cfg.dp_mode is DPMode.PAPER else PrivacyStatus.ACCOUNTED
    return ChannelPrivacy(status=status, epsilon=broadcast_epsilon, delta=cfg.delta)


def personalised_prompt_file(
    trainer: ClientTrainer,
    clip: FrozenClip,
    class_names: tuple[str, ...],
    *,
    broadcast_epsilon: float | None,
) -> PromptFile:
    """The prompt this client predicts with, and its metadata, ready to ``save``."""
    cfg = trainer.cfg
    prompt = trainer.learner.personalised_prompt()
    metadata = PromptMetadata(
        backbone=cfg.model,
        backbone_sha256=backbone_fingerprint(clip),
        text_width=clip.text_width,
        n_ctx=int(prompt.shape[0]),
        method=cfg.method,
        rank=cfg.rank if cfg.method.low_rank else None,
        class_names=class_names,
        dp_mode=cfg.dp_mode if cfg.dp_on else DPMode.OFF,
        local_privacy=local_channel(trainer),
        global_privacy=global_channel(cfg, broadcast_epsilon),
        dataset=cfg.dataset,
        partition_id=trainer.partition_id,
        rounds_done=trainer.rounds_done,
        created=utc_now(),
    )
    return PromptFile(prompt=prompt, metadata=metadata)


def broadcast_epsilon(msg: Message) -> float | None:
    """The eps-global the server sent with this message's global prompt, if it sent one."""
    config = msg.content.config_records.get(wire.CONFIG_RECORD)
    value = None if config is None else config.get(wire.EPS_GLOBAL)
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def export_path(state_directory: Path) -> Path:
    return Path(state_directory) / PROMPT_FILE
