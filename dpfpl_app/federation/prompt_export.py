"""A node's export of its personalised prompt, with the composed epsilon it cost.

The export runs on the node and writes into the node's own state directory; nothing
here builds or touches a Message, so the server never receives the prompt. The epsilon
comes from the node's own count of the steps it took, through the run's channel plan
(``dp_channel.py``): the same public plan the server accounts with.
"""

from __future__ import annotations

import math
from pathlib import Path

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.config import DPMode
from dpfpl_app.federation.node_paths import PROMPT_FILE
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.method.prompt_file import (
    PromptFile,
    PromptMetadata,
    PromptPrivacy,
    backbone_fingerprint,
    utc_now,
)


def prompt_privacy(trainer: ClientTrainer) -> PromptPrivacy:
    """The guarantee of this node's released prompt, with its meaning."""
    plan, epsilon = trainer.plan, trainer.epsilon()
    return PromptPrivacy(
        guarantee=plan.guarantee,
        meaning=plan.meaning,
        epsilon=epsilon if math.isfinite(epsilon) else None,
        delta=plan.delta if plan.mode is not DPMode.OFF else None,
        steps=trainer.steps_taken,
    )


def personalised_prompt_file(
    trainer: ClientTrainer,
    clip: FrozenClip,
    class_names: tuple[str, ...],
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
        privacy=prompt_privacy(trainer),
        dataset=cfg.dataset,
        partition_id=trainer.partition_id,
        rounds_done=trainer.rounds_done,
        created=utc_now(),
    )
    return PromptFile(prompt=prompt, metadata=metadata)


def export_path(state_directory: Path) -> Path:
    return Path(state_directory) / PROMPT_FILE
