"""The one-run canary audit of a whole federation (Steinke, Nasr and Jagielski, 2023).

One real run: ``flwr run`` on a private local SuperLink, the real ServerApp, strategy,
ClientApps and noise, with gradient canaries (``canaries.py``) in one client's data.
Afterwards the adversary scores each canary from what it saw, and the secret coins turn
its guesses into a lower bound on epsilon (``bounds.one_run_lower_bound``).

What the adversary sees, one view each:

* ``broadcasts``: every global prompt the server sent (its checkpoints, one per round).
  Anyone in the federation sees these. With a local channel the claim under test is
  the global channel's own epsilon (``eps-global-alone``); without one (PromptFL) the
  broadcasts are everything released, and the claim is the composed epsilon.
* ``broadcasts, public seed replayed`` (runs with ``reproducible-noise = true`` only):
  the same, by an adversary who regenerates the server's noise from the public seed and
  subtracts it. The epsilon such a run prints is labelled nominal; this view shows why.
* ``released prompt`` (methods with a local prompt): the client's exported personalised
  prompt, which carries both channels; the claim is the composed epsilon the run
  printed.

The score of canary i is how far the released prompt moved against ``u_i`` from its
public start (``-<p_end - p_start, u_i>``: SGD steps against the gradient). Summing all
rounds' moves is what telescopes to ``p_end - p_start``; with the same expected signal
in every round and independent noise, equal weights are the best linear score.

The numbers of guesses are fixed before the run (a few fractions of m, in and out), and
the confidence is split over them (union bound), so reporting the best is valid.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from scipy import optimize, stats
from torch import Tensor

from dpfpl_app.audit.bounds import OneRunBound, one_run_guesses, one_run_lower_bound
from dpfpl_app.audit.canaries import ENV_VAR, CanarySpec, directions
from dpfpl_app.backbones.backbone import load_frozen_clip
from dpfpl_app.config import Aggregation, DPMode, Method, RunConfig
from dpfpl_app.federation.checkpoint import PROMPT_KEY, checkpoint_path
from dpfpl_app.federation.client_node import CANARY_RATE_KEY
from dpfpl_app.federation.flwr_local import LocalFlower
from dpfpl_app.federation.node_paths import partition_subdir
from dpfpl_app.federation.prompt_export import export_path
from dpfpl_app.federation.results import RESULTS_FILE
from dpfpl_app.federation.strategy_build import initial_prompt
from dpfpl_app.method.client_trainer import init_generator
from dpfpl_app.method.prompt_file import load_prompt_file
from dpfpl_app.method.prompt_learner import ctx_init_words, initial_local_prompt
from dpfpl_app.privacy.noise import NoiseSource

logger = logging.getLogger(__name__)

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2)  # guesses on each side, as shares of m
AUDITED_METHODS = (Method.DPFPL, Method.FEDOTP, Method.PROMPTFL, Method.LOCAL)
BROADCASTS, RELEASED = "broadcasts", "released prompt"
REPLAYED = "broadcasts, public seed replayed"


@dataclass(frozen=True)
class ViewAudit:
    """One adversary view of one run: its claim, its bound, the verdict."""

    view: str
    claim_name: str
    claimed_epsilon: float
    bound: OneRunBound
    guess_fraction: float
    scores_in: list[float]
    scores_out: list[float]

    @property
    def violation(self) -> bool:
        return self.bound.epsilon > self.claimed_epsilon

    @property
    def separation(self) -> float:
        """Mean score gap of kept and left-out canaries, in left-out standard deviations."""
        out = np.asarray(self.scores_out)
        return float((np.mean(self.scores_in) - out.mean()) / out.std(ddof=1))

    @property
    def ceiling(self) -> float:
        """The bound at this separation if every count came out at its expectation.

        A measured bound far below the claim with a ceiling just as low says the run
        hides the canaries (or m is too small to see more), not that the audit is weak.
        """
        return expected_bound(
            self.separation,
            canaries=len(self.scores_in) + len(self.scores_out),
            delta=self.bound.delta,
            confidence=self.bound.confidence,
        )


def expected_bound(mu: float, *, canaries: int, delta: float, confidence: float) -> float:
    """Best bound over the guess fractions with kept scores N(mu, 1), left-out N(0, 1)."""
    level = (1.0 - confidence) / len(GUESS_FRACTIONS)
    best = 0.0
    for fraction in GUESS_FRACTIONS:
        k = max(1, round(fraction * canaries))
        # the score above which a fraction k/m of the half-half mixture lies
        share = k / canaries
        top = optimize.brentq(
            lambda t, s=share: 0.5 * (stats.norm.sf(t - mu) + stats.norm.sf(t)) - s, -40, 40
        )
        right_in = 0.5 * stats.norm.sf(top - mu) / share  # share of top guesses right
        correct = 2 * round(k * right_in)  # the bottom guesses are right as often, by symmetry
        bound = one_run_lower_bound(
            canaries=canaries, guesses=2 * k, correct=correct, delta=delta, confidence=1 - level
        )
        best = max(best, bound.epsilon)
    return best


RUN_NAME = "audit"


def audit_config(values: dict[str, Any], *, out_dir: Path, clients: int) -> RunConfig:
    """The run config to audit, with its outputs under ``out_dir``; refused early when
    the audit cannot test its claim.
    """
    out_dir = Path(out_dir).resolve()  # the SuperLink runs elsewhere: absolute paths only
    cfg = RunConfig.from_flower(
        {
            **values,
            "min-nodes": clients,
            "output-dir": str(out_dir / "runs"),
            "run-name": RUN_NAME,
            "state-dir": str(out_dir / "state"),
        }
    )
    if cfg.method not in AUDITED_METHODS:
        raise ValueError(
            f"the one-run audit supports methods {[m.value for m in AUDITED_METHODS]}, got "
            f"{cfg.method.value!r} (its released prompt has no public start to measure from)"
        )
    if cfg.aggregation is Aggregation.SECURE:
        raise ValueError(
            "the one-run audit scores runs with aggregation='plain' (the server's Gaussian "
            "noise; 'auto' is plain in its local simulation); auditing secure aggregation's "
            "client-side Skellam noise is not built yet"
        )
    if cfg.dp_mode is not DPMode.PER_SAMPLE:
        raise ValueError(
            f"dp-mode {cfg.dp_mode.value!r} has no accounted sample-level epsilon to audit: "
            "set dp-mode=per-sample"
        )
    return cfg


def plan_canaries(cfg: RunConfig, *, count: int, partition_id: int = 0) -> CanarySpec:
    """Canaries for one client, each kept by a secret fair coin from the OS; a count the
    prompt or the bound cannot take is refused here, before any run.
    """
    dim = initial_prompt(cfg).numel()
    if not 2 <= count <= dim:
        raise ValueError(
            f"--canaries {count}: orthonormal canaries need 2 <= m <= {dim} (the prompt's "
            f"n-ctx x width numbers)"
        )
    if 2 * count * cfg.delta > 1:
        raise ValueError(
            f"--canaries {count} with delta={cfg.delta}: the one-run bound needs "
            f"2 m delta <= 1, so m <= {int(0.5 / cfg.delta)}"
        )
    source = NoiseSource.secure()
    return CanarySpec(
        partition_id=partition_id,
        direction_seed=int(source.uniform(1).item() * 2**52),
        included=tuple(bool(c) for c in source.bernoulli(count, 0.5)),
    )


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def run_federation(
    cfg: RunConfig, spec: CanarySpec, out_dir: Path, *, app_dir: Path, timeout_s: float
) -> None:
    """One real ``flwr run`` of ``cfg`` with the canaries on their client."""
    out_dir = Path(out_dir).resolve()
    for stale in ("runs", "state", ".flwr"):  # an earlier attempt's private state is refused
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    spec_path = spec.save(out_dir / "canaries.json")
    with LocalFlower(Path(app_dir), out_dir / ".flwr") as flower:
        flower.env[ENV_VAR] = str(spec_path)  # the SuperLink's simulation inherits it
        run_id, status = flower.run(
            cfg.to_flower(), num_supernodes=cfg.min_nodes, timeout_s=timeout_s
        )
        if not status.startswith("finished:completed"):
            log = flower.log(run_id)[-3000:]
            raise RuntimeError(f"audit run {run_id} ended {status}; its log ends:\n{log}")


def adversary_views(cfg: RunConfig, *, partition_id: int) -> dict[str, Tensor]:
    """How far each released prompt moved from its public start, per view.

    Without a local prompt (PromptFL) the released prompt is the last broadcast, and the
    two views are one: only ``broadcasts`` is scored.
    """
    start_global = initial_prompt(cfg)
    views = {}
    if cfg.method.has_global:
        # the adversary saw every round's broadcast; their moves telescope to the last one
        last = _checkpoint_prompt(run_dir(cfg), cfg.num_server_rounds)
        views[BROADCASTS] = last - start_global
        if cfg.reproducible_noise:
            views[REPLAYED] = views[BROADCASTS] + cfg.lr_global * _server_noise(cfg)
    if cfg.method.has_local:
        exported = Path(cfg.state_dir) / partition_subdir(cfg.run_name, 0, partition_id)
        released = load_prompt_file(export_path(exported)).prompt
        views[RELEASED] = released - released_start(cfg, partition_id, start_global)
    return views


def canary_sample_rate(cfg: RunConfig, partition_id: int) -> float:
    """The rate the canaries' client sampled with, as its node recorded it (node-local).

    The trainer draws canaries at its own ``sample_rate``; the node keeps that rate in the
    private state's meta.json, on its own disk, where this local audit can read it.
    """
    meta = Path(cfg.state_dir) / partition_subdir(cfg.run_name, 0, partition_id) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} is missing: the canaries' client never saved its state, so the rate it "
            "drew them at is unknown"
        )
    return float(json.loads(meta.read_text())[CANARY_RATE_KEY])


def released_start(cfg: RunConfig, partition_id: int, start_global: Tensor) -> Tensor:
    """The personalised prompt before any training, from public seeds alone."""
    start = start_global if cfg.method.has_global else torch.zeros_like(start_global)
    words = None  # ctx-init starts only method local's own prompt from words
    if cfg.method is Method.LOCAL and cfg.ctx_init:
        words = ctx_init_words(load_frozen_clip(cfg.model, device="cpu"), cfg.ctx_init, cfg.n_ctx)
    generator = init_generator(cfg.seed, partition_id)
    return start + initial_local_prompt(tuple(start_global.shape), cfg.init_std, generator, words)


def score(moved: Tensor, spec: CanarySpec) -> np.ndarray:
    """``-<moved, u_i>`` for every canary (larger: more likely trained on)."""
    dirs = directions(spec.direction_seed, spec.count, tuple(moved.shape))
    return -(dirs.flatten(1).double() @ moved.flatten().double()).numpy()


def audit_view(
    view: str,
    scores: np.ndarray,
    spec: CanarySpec,
    *,
    claim_name: str,
    claimed_epsilon: float,
    delta: float,
    confidence: float,
) -> ViewAudit:
    """The best bound over the pre-set numbers of guesses, at the split confidence."""
    included = np.asarray(spec.included)
    level = (1.0 - confidence) / len(GUESS_FRACTIONS)
    best: tuple[OneRunBound, float] | None = None
    for fraction in GUESS_FRACTIONS:
        k = max(1, round(fraction * spec.count))
        guesses, correct = one_run_guesses(scores, included, guess_in=k, guess_out=k)
        bound = one_run_lower_bound(
            canaries=spec.count,
            guesses=guesses,
            correct=correct,
            delta=delta,
            confidence=1.0 - level,
        )
        if best is None or bound.epsilon > best[0].epsilon:
            best = (bound, fraction)
    assert best is not None
    bound, fraction = best
    reported = OneRunBound(**{**asdict(bound), "confidence": confidence})
    return ViewAudit(
        view=view,
        claim_name=claim_name,
        claimed_epsilon=claimed_epsilon,
        bound=reported,
        guess_fraction=fraction,
        scores_in=[float(s) for s in scores[included]],
        scores_out=[float(s) for s in scores[~included]],
    )


def audit_run(cfg: RunConfig, spec: CanarySpec, *, confidence: float) -> list[ViewAudit]:
    """Score the finished run from each view and bound its epsilon."""
    privacy = json.loads((run_dir(cfg) / RESULTS_FILE).read_text())["summary"]["privacy"]
    claims = {RELEASED: ("composed epsilon", "epsilon")}
    # with a local channel the broadcasts carry only the global one; without, everything
    claims[BROADCASTS] = claims[REPLAYED] = (
        ("global channel alone", "eps-global-alone")
        if cfg.method.has_local
        else ("composed epsilon", "epsilon")
    )
    audits = []
    for view, moved in adversary_views(cfg, partition_id=spec.partition_id).items():
        name, key = claims[view]
        claim = float(privacy[key])
        audits.append(
            audit_view(
                view,
                score(moved, spec),
                spec,
                claim_name=name,
                claimed_epsilon=claim,
                delta=cfg.delta,
                confidence=confidence,
            )
        )
    return audits


def _server_noise(cfg: RunConfig) -> Tensor:
    """The sum of every round's server noise, regenerated from the public seed.

    The strategy draws round t's noise from ``public_seed(seed, "global-noise", t)`` with
    the std it reported in that round's metrics (``noise-std``, public).
    """
    rounds = json.loads((run_dir(cfg) / RESULTS_FILE).read_text())["rounds"]
    shape = tuple(initial_prompt(cfg).shape)
    total = torch.zeros(shape, dtype=torch.float64)
    for row in rounds:
        std = row.get("noise-std")
        if std:  # a round with every reply refused drew no noise
            total += NoiseSource.public_seed(cfg.seed, "global-noise", int(row["round"])).gaussian(
                shape, std=float(std), dtype=torch.float64
            )
    return total.float()


def _checkpoint_prompt(run_dir: Path, server_round: int) -> Tensor:
    path = checkpoint_path(run_dir, server_round)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the adversary's view needs every round's broadcast prompt"
        )
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(PROMPT_KEY).float()
