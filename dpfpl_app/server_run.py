"""The ServerApp's work: validate the config, build the strategy, run it, write results.

Kept out of ``server_app.py`` so the run can be driven and tested without Flower's
runtime (see ``tests/flower_harness.py``).
"""

from __future__ import annotations

import math
import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid
from transformers import AutoConfig

from dpfpl_app import accounting
from dpfpl_app.backbone import resolve_model_source
from dpfpl_app.backbone_build import BACKBONES, CACHE_ENV, cache_root
from dpfpl_app.checkpoint import earlier_rounds, load_checkpoint, save_checkpoint
from dpfpl_app.config import DPMode, RunConfig
from dpfpl_app.node_paths import run_state_name
from dpfpl_app.results import RunRecorder
from dpfpl_app.strategy import DPFPLStrategy, GlobalNoise

HONEST_SERVER = (
    "the server sees each client's clipped global-prompt gradient in clear (honest-server "
    "assumption, as in the paper); eps-global protects against everyone who sees only "
    "the noised global prompt"
)


def global_noise(cfg: RunConfig) -> GlobalNoise:
    if not cfg.dp_on or not cfg.method.has_global:
        return GlobalNoise.off()
    if cfg.dp_mode is DPMode.PAPER:
        return GlobalNoise.paper(
            epsilon=cfg.epsilon_global, delta=cfg.delta, rounds=cfg.num_server_rounds
        )
    return GlobalNoise.per_sample(
        target_epsilon=cfg.epsilon_global,
        delta=cfg.delta,
        total_rounds=cfg.num_server_rounds,
        accountant=accounting.AccountantKind(cfg.accountant.value),
    )


def privacy_notes(cfg: RunConfig) -> dict[str, str]:
    """What the printed epsilons mean for this configuration, in words."""
    if not cfg.dp_on:
        return {"privacy": "no differential privacy: dp-mode is off (or nothing is trained)"}
    if cfg.dp_mode is DPMode.PAPER:
        return {
            "privacy": "dp-mode=paper: batch-mean clipping with the paper's sigma; the "
            "epsilons are the paper's nominal figures, NOT a formal sample-level guarantee"
        }
    return {
        "privacy": "dp-mode=per-sample: every sample's gradient is clipped; eps-local and "
        "eps-global are sample-level (epsilon, delta)-DP bounds from an opacus "
        f"{cfg.accountant.value.upper()} accountant over the steps actually taken",
        "honest-server": HONEST_SERVER,
        "private-state": "local prompts, carriers u, v and residual R never leave the node",
    }


def backbone_note(cfg: RunConfig) -> str:
    if cfg.model in BACKBONES:
        return (
            f"backbone {cfg.model!r} is a tiny CLIP this project pretrains offline on images "
            "disjoint from the federated data; accuracies are only comparable with each other, "
            "not with ViT-B/16 figures"
        )
    return f"backbone {cfg.model!r}"


def initial_prompt(cfg: RunConfig) -> torch.Tensor:
    """p_G ~ N(0, init_std^2) (zeros when the method shares nothing)."""
    width = int(AutoConfig.from_pretrained(resolve_model_source(cfg.model)).text_config.hidden_size)
    if not cfg.method.has_global:
        return torch.zeros(cfg.n_ctx, width)
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.n_ctx, width, generator=generator) * cfg.init_std


def output_dir(cfg: RunConfig, context: Context) -> Path:
    name = (
        cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method.value}-run{context.run_id}"
    )
    return Path(cfg.output_dir).expanduser() / name


def run_server(grid: Grid, context: Context) -> Path:
    """Run the whole federation; returns the results directory.

    Once the results directory exists, whatever stops the run (a missing model, an
    unreachable hub, a crash mid-run) leaves results.json ``failed`` with the reason.
    """
    cfg = RunConfig.from_flower(context.run_config)
    out = output_dir(cfg, context)
    # a resumed run continues the rounds results.json holds: read them before the
    # recorder rewrites it; the checkpoint then says how many of them still count
    recorded = earlier_rounds(out, cfg.num_server_rounds) if cfg.resume else []
    recorder = RunRecorder(
        out, config=cfg.to_flower(), notes={}, run_id=context.run_id, rounds=recorded
    )
    log_locations(recorder.out_dir, cfg, context)
    with recorder.failure_recorded():
        return _run(grid, context, cfg, recorder)


def log_locations(out: Path, cfg: RunConfig, context: Context) -> None:
    """Log where results, private state and the cache are, as absolute paths.

    Relative paths and ``$DPFPL_CACHE`` are resolved by this process, whose cwd and
    environment are the SuperLink's, not those of the shell that ran ``flwr run``.
    """
    state_root = Path(cfg.state_dir).expanduser() if cfg.state_dir else cache_root() / "state"
    state = state_root.resolve() / run_state_name(cfg.run_name, context.run_id)
    log(INFO, "results directory: %s", out)
    log(INFO, "clients' private state (simulation; each SuperNode's own host in a "
        "deployment): %s", state)
    log(INFO, "cache (%s): %s", CACHE_ENV, cache_root().resolve())


def _run(grid: Grid, context: Context, cfg: RunConfig, recorder: RunRecorder) -> Path:
    out = recorder.out_dir
    notes = {"backbone": backbone_note(cfg), **privacy_notes(cfg)}
    for key, text in notes.items():
        log(INFO, "%s: %s", key, text)
    state, resumed = load_checkpoint(Path(cfg.resume), config=cfg) if cfg.resume else (None, None)
    recorder.doc["notes"].update(notes)
    recorder.keep_rounds(up_to=resumed.round if resumed else 0)

    def progress(server_round: int, metrics: dict[str, Any]) -> None:
        recorder.record(server_round, metrics)
        save_checkpoint(out, strategy.state_dict(), config=cfg)
        log(
            INFO,
            "round %d/%d  loss %.4f  local-acc %.3f  neighbour-acc %.3f  "
            "eps-local %.3g  eps-global %.3g",
            server_round,
            cfg.num_server_rounds,
            metrics.get("train-loss", math.nan),
            metrics.get("local-acc", math.nan),
            metrics.get("neighbour-acc", math.nan),
            metrics.get("eps-local", math.nan),
            metrics.get("eps-global", math.nan),
        )

    strategy = DPFPLStrategy(
        initial_prompt=initial_prompt(cfg),
        server_lr=cfg.lr_global,
        clip_norm=cfg.clip_norm,
        batch_size=cfg.batch_size,
        noise=global_noise(cfg),
        min_nodes=cfg.min_nodes,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        node_wait_timeout=cfg.node_wait_timeout,
        seed=cfg.seed if cfg.reproducible_noise else None,
        on_round=progress,
    )
    if state is not None:
        strategy.load_state_dict(state)
        log(INFO, "resumed from %s after round %d", cfg.resume, strategy.rounds_done)
    remaining = cfg.num_server_rounds - strategy.rounds_done
    if remaining > 0:
        strategy.start(grid, strategy.global_arrays(), remaining)
    path = recorder.finish(
        status="completed", extra={"noise-multiplier-global": strategy.noise_multiplier}
    )
    log(INFO, "results written to %s", path)
    return out
