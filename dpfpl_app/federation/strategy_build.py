"""The one way to build the strategy from a run config (ServerApp, benchmarks, audits).

Everything the strategy needs is public: the run config fixes the initial global prompt
(from the seed), the server learning rate, node sampling and the channel plan, so any
caller that builds from the same config gets the same strategy.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig

from dpfpl_app.backbones.backbone import load_frozen_clip, resolve_model_source
from dpfpl_app.config import RunConfig
from dpfpl_app.federation.cluster_strategy import SecFPPStrategy
from dpfpl_app.federation.secure_strategy import SecureDPFPLStrategy
from dpfpl_app.federation.strategy import DPFPLStrategy, RoundCallback
from dpfpl_app.method.prompt_learner import ctx_init_words, initial_local_prompt
from dpfpl_app.privacy.dp_channel import plan_for


def initial_prompt(cfg: RunConfig) -> torch.Tensor:
    """p_G ~ N(0, init_std^2) from the seed (zeros when the method shares nothing).

    With ``ctx-init`` its first rows are those words' token embeddings (the backbone is
    loaded for its token table only then), so training starts at the zero-shot prompt.
    """
    width = int(AutoConfig.from_pretrained(resolve_model_source(cfg.model)).text_config.hidden_size)
    if not cfg.method.has_global:
        return torch.zeros(cfg.n_ctx, width)
    words = (
        ctx_init_words(load_frozen_clip(cfg.model, device="cpu"), cfg.ctx_init, cfg.n_ctx)
        if cfg.ctx_init
        else None
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    return initial_local_prompt((cfg.n_ctx, width), cfg.init_std, generator, words)


def build_strategy(
    cfg: RunConfig, *, on_round: RoundCallback | None = None, prompt: torch.Tensor | None = None
) -> DPFPLStrategy:
    """The run's strategy; ``prompt`` overrides the initial global prompt (tests, audits).

    Secure aggregation makes the training exchange a SecAgg+ round; SecFPP's is that
    strategy with one shared prompt per secure cluster.
    """
    channel = plan_for(cfg)
    kind: Any = SecureDPFPLStrategy if channel.secure else DPFPLStrategy
    extra: dict[str, Any] = {}
    if cfg.method.clustered:
        kind, extra = SecFPPStrategy, {"cfg": cfg}
    return kind(
        **extra,
        initial_prompt=initial_prompt(cfg) if prompt is None else prompt,
        server_lr=cfg.lr_global,
        channel=channel,
        min_nodes=cfg.min_nodes,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        evaluate_every=cfg.evaluate_every,
        fold_evaluation=cfg.fold_evaluation,
        final_round=cfg.num_server_rounds,
        node_wait_timeout=cfg.node_wait_timeout,
        seed=cfg.seed if cfg.reproducible_noise else None,
        on_round=on_round,
    )
