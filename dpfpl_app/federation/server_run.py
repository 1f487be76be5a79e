"""The ServerApp's work: validate the config, build the strategy, run it, write results.

Kept out of ``server_app.py`` so the run can be driven and tested without Flower's
runtime (see ``tests/flower_harness.py``).
"""

from __future__ import annotations

import json
import math
import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.superlink.grid import HttpGrid

from dpfpl_app.backbones.backbone_build import BACKBONES, METADATA_FILE, ensure_backbone
from dpfpl_app.cache import CACHE_ENV, cache_root
from dpfpl_app.config import Aggregation, RunConfig
from dpfpl_app.federation import wire
from dpfpl_app.federation.checkpoint import earlier_rounds, load_checkpoint, save_checkpoint
from dpfpl_app.federation.cluster_strategy import CLUSTERING_NOTE, SecFPPStrategy
from dpfpl_app.federation.node_paths import run_state_name
from dpfpl_app.federation.polling_grid import responsive
from dpfpl_app.federation.results import RunRecorder
from dpfpl_app.federation.secure_evaluation import SECURE_EVALUATION_NOTE
from dpfpl_app.federation.strategy_build import build_strategy
from dpfpl_app.privacy.dp_channel import Guarantee, plan_for


def privacy_notes(cfg: RunConfig) -> dict[str, str]:
    """What the printed epsilon means for this configuration, in words."""
    plan = plan_for(cfg)
    notes = {"privacy": plan.meaning}
    if plan.secure and plan.guarantee in {Guarantee.ACCOUNTED, Guarantee.NOMINAL_PUBLIC_SEED}:
        notes["accountant"] = (
            f"generic Poisson-subsampled RDP (Zhu-Wang) of local Gaussian + client Skellam "
            f"steps over {plan.planned_steps} steps at the public rate bound "
            f"q={plan.sample_rate:g}, composed multiplier z={plan.z_step:.4g} (local "
            f"{plan.z_local:.4g}, global {plan.z_global:.4g} on the sum at min-survivors); "
            "each round's epsilon uses its actual survivors"
        )
    elif plan.guarantee in {Guarantee.ACCOUNTED, Guarantee.NOMINAL_PUBLIC_SEED}:
        notes["accountant"] = (
            f"opacus {plan.accountant.value.upper()} over {plan.planned_steps} Poisson-"
            f"subsampled Gaussian steps at the public rate bound q={plan.sample_rate:g}, "
            f"composed multiplier z={plan.z_step:.4g} (local {plan.z_local:.4g}, global "
            f"{plan.z_global:.4g} x sqrt(local-steps))"
        )
    if plan.z_global > 0:
        notes["secure-aggregation" if plan.secure else "honest-server"] = plan.server_view
    if plan.secure:
        notes["evaluation"] = SECURE_EVALUATION_NOTE
    if cfg.method.clustered:
        notes["clustering"] = CLUSTERING_NOTE
    if cfg.method.has_local:
        notes["private-state"] = (
            "local prompts, carriers u, v and residual R never leave the node; replies carry "
            "the clipped global-prompt gradient only"
        )
    return notes


def backbone_note(cfg: RunConfig) -> str:
    """What the run's accuracies can be compared with.

    A project backbone is pretrained on the machine that first needs it, and two
    machines' builds differ in their last bits (float order), enough to move zero-shot
    accuracy by about a point: the note names the weights this run used.
    """
    if cfg.model in BACKBONES:
        built = json.loads((ensure_backbone(cfg.model) / METADATA_FILE).read_text())
        return (
            f"backbone {cfg.model!r} is a tiny CLIP this project pretrains offline on images "
            "disjoint from the federated data; accuracies are only comparable with each other, "
            "not with ViT-B/16 figures, and only between runs of the same build (weights "
            f"sha256 {built['weights_sha256'][:16]})"
        )
    return f"backbone {cfg.model!r}"


def output_dir(cfg: RunConfig, context: Context) -> Path:
    name = (
        cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method.value}-run{context.run_id}"
    )
    return Path(cfg.output_dir).expanduser() / name


def aggregation_mode(grid: Grid) -> Aggregation:
    """What ``aggregation = "auto"`` means for this grid.

    Flower hands a deployed ServerApp an ``HttpGrid`` to its SuperLink, whose SuperNodes
    are other organisations' machines: secure. A simulation (``InMemoryGrid``) or a test
    grid runs every client in this operator's own processes: plain.
    """
    return Aggregation.SECURE if isinstance(grid, HttpGrid) else Aggregation.PLAIN


def run_server(grid: Grid, context: Context) -> Path:
    """Run the whole federation; returns the results directory.

    Once the results directory exists, whatever stops the run (a missing model, an
    unreachable hub, a crash mid-run) leaves results.json ``failed`` with the reason.
    """
    cfg = RunConfig.from_flower(context.run_config)
    if cfg.aggregation is Aggregation.AUTO:
        cfg = cfg.resolve_aggregation(aggregation_mode(grid))
        log(INFO, "aggregation 'auto' is %r for this run (%s)", cfg.aggregation.value,
            type(grid).__name__)
    out = output_dir(cfg, context)
    # a resumed run continues the rounds results.json holds: read them before the
    # recorder rewrites it; the checkpoint then says how many of them still count
    recorded = earlier_rounds(out, cfg.num_server_rounds) if cfg.resume else []
    recorder = RunRecorder(
        out, config=cfg.to_flower(), notes={}, run_id=context.run_id, rounds=recorded
    )
    log_locations(recorder.out_dir, cfg, context)
    with recorder.failure_recorded():
        return _run(responsive(grid, cfg.message_window), context, cfg, recorder)


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


EVALUATED = ("local-acc", "neighbour-acc", "harmonic-acc", "zeroshot-harmonic-acc",
             "prior-harmonic-acc")


def _run(grid: Grid, context: Context, cfg: RunConfig, recorder: RunRecorder) -> Path:
    out = recorder.out_dir
    notes = {"backbone": backbone_note(cfg), **privacy_notes(cfg)}
    for key, text in notes.items():
        log(INFO, "%s: %s", key, text)
    state, resumed = load_checkpoint(Path(cfg.resume), config=cfg) if cfg.resume else (None, None)
    recorder.doc["notes"].update(notes)
    recorder.keep_rounds(up_to=resumed.round if resumed else 0)

    guarantee = plan_for(cfg).guarantee
    label = "" if guarantee is Guarantee.ACCOUNTED else f" ({guarantee.value})"

    def progress(server_round: int, metrics: dict[str, Any]) -> None:
        recorder.record(server_round, metrics)
        save_checkpoint(out, strategy.state_dict(), config=cfg)
        accuracy = (
            "local-acc {:.3f}  neighbour-acc {:.3f}  harmonic {:.3f}  (zero-shot {:.3f}, "
            "class prior {:.3f})".format(
                *(metrics.get(k, math.nan) for k in EVALUATED)
            )
            if wire.EVAL_ACCEPTED in metrics
            else f"not evaluated (evaluate-every {cfg.evaluate_every})"
        )
        log(
            INFO,
            "round %d/%d  %s  epsilon %.3g%s%s",
            server_round,
            cfg.num_server_rounds,
            accuracy,
            metrics.get("epsilon", math.nan),
            label,
            f"  loss {metrics['train-loss']:.4f}" if "train-loss" in metrics else "",
        )

    strategy = build_strategy(cfg, on_round=progress)
    if state is not None:
        strategy.load_state_dict(state)
        log(INFO, "resumed from %s after round %d", cfg.resume, strategy.rounds_done)
    remaining = cfg.num_server_rounds - strategy.rounds_done
    if remaining > 0:
        strategy.start(grid, strategy.global_arrays(), remaining)
    plan = strategy.channel
    steps = strategy.rounds_done * plan.local_steps
    # "epsilon" is the run's: the largest node's (each node's at its declared rate)
    privacy = {
        **plan.describe(),
        "steps": steps,
        "epsilon": strategy.epsilon(),
        "node-epsilons": strategy.node_epsilons(),
    }
    extra: dict[str, Any] = {"privacy": {**privacy, **plan.components(steps)}}
    if isinstance(strategy, SecFPPStrategy) and strategy.clusters is not None:
        extra["clusters"] = strategy.clusters.to_state()  # all of it known to the server
    path = recorder.finish(status="completed", extra=extra)
    log(INFO, "results written to %s", path)
    return out
