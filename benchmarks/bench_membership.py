"""Membership-inference audit of released prompts, against privacy level and method.

For each setting (method x DP mode x epsilon) and each of ``--seeds`` seeds this trains
one federation with the real ``ClientTrainer`` and the real ``DPFPLStrategy`` (global
noise and accounting included), driven through the project's in-process Flower grid
(``tests/flower_harness.py``, real message serialisation). Client 0 exports its
personalised prompt with the node's export code; the audit loads that file, as a public
user would, and attacks it:

* members = client 0's training images (only those: what the prompt really trained on);
* non-members = images of the same pool that no client of that federation ever used.

A seed changes the data split (members, non-members, the other client's images), the
prompt initialisation, and the DP noise: the noise is never reproducible here (OS
entropy, ``reproducible-noise = false``), so no two rows share a noise draw rescaled.

Threshold attack: scores of all seeds pooled. Shadow attack, leave-one-seed-out: the
attacker's shadow federations for seed s are the same setting's federations of the
other seeds (trained the same way, on splits drawn independently of seed s's), so the
classifier and its decision rule never see seed s's prompt or labels.

Data: the offline dataset's federated pool (images the backbone never saw), encoded
once. Small client datasets and many rounds make the non-private prompt overfit, so
that leakage is measurable at all; the numbers are for this tiny backbone and pool.

Usage::

    python benchmarks/bench_membership.py             # the sweep; writes benchmarks/results/
    python benchmarks/bench_membership.py --quick     # smoke run (3 settings, 2 seeds)
    python benchmarks/bench_membership.py --replot benchmarks/results/membership.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.audit.membership import (  # noqa: E402
    MIN_FALSE_POSITIVES,
    Estimate,
    Outputs,
    Scores,
    ShadowAttack,
    auc,
    balanced_accuracy,
    check_disjoint,
    pooled_estimates,
    resolves,
    threshold_scores,
    tpr_at_fpr,
)
from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip  # noqa: E402
from dpfpl_app.config import DPMode, Method, RunConfig  # noqa: E402
from dpfpl_app.data.features import encode_pixels  # noqa: E402
from dpfpl_app.data.federated_data import ClientData  # noqa: E402
from dpfpl_app.data.image_processing import images_to_pixel_values  # noqa: E402
from dpfpl_app.data.offline_data import federated_pool  # noqa: E402
from dpfpl_app.federation.client_messages import (  # noqa: E402
    answer_evaluate,
    answer_train,
    cluster_contribution,
    secure_contribution,
)
from dpfpl_app.federation.prompt_export import personalised_prompt_file  # noqa: E402
from dpfpl_app.federation.secure_client import (  # noqa: E402
    CLUSTERING,
    answer_stage,
    masked_content,
)
from dpfpl_app.federation.strategy import DPFPLStrategy  # noqa: E402
from dpfpl_app.federation.strategy_build import build_strategy  # noqa: E402
from dpfpl_app.method.client_trainer import ClientTrainer  # noqa: E402
from dpfpl_app.method.prompt_file import load_prompt_file  # noqa: E402
from dpfpl_app.secagg import Stage  # noqa: E402
from dpfpl_app.service.predict import PromptClassifier  # noqa: E402
from tests.flower_harness import run_strategy  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
logger = logging.getLogger("bench_membership")


@dataclass(frozen=True)
class AuditSetup:
    """Data sizes and training schedule shared by every setting of a sweep.

    The regime in which a non-private prompt overfits, chosen for that: an organisation
    whose images the backbone never saw (Fashion-MNIST on the digits-only backbone, so
    the prompt must learn the task from its own few images), 20 images per client, 15
    rounds x 20 local steps. Many local steps per round, rather than many rounds, keep
    per-sample DP affordable here. On digits the backbone already scores 98% zero-shot,
    and no regime tried made a prompt leak there.
    """

    dataset: str = "fashion-mnist"
    model: str = "dpfpl-tiny-digits"
    pool_size: int = 2000  # the first images of the federated pool (encoding all is slow)
    clients: int = 2
    train_per_client: int = 20
    non_members: int = 200  # per seed: 5 seeds pool 1000, enough for TPR at FPR 1%
    shadow_out: int = 20  # non-members per shadow prompt (as many as its members)
    rounds: int = 15
    local_steps: int = 20
    batch_size: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    seeds: int = 5
    delta: float = 1e-5
    bootstrap: int = 2000


FPRS = (0.01, 0.1)  # TPR reported at these FPRs where the pooled non-members resolve them


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: prompt method and privacy level (target composed epsilon)."""

    method: Method
    dp_mode: DPMode
    epsilon: float | None = None  # None with dp-mode off

    @property
    def label(self) -> str:
        eps = "" if self.epsilon is None else f" eps={self.epsilon:g}"
        return f"{self.method.value} {self.dp_mode.value}{eps}"


@dataclass(frozen=True)
class Pool:
    """The encoded federated pool of a dataset."""

    clip: FrozenClip
    features: torch.Tensor  # (n, e)
    labels: torch.Tensor  # (n,)
    class_names: tuple[str, ...]


def load_pool(setup: AuditSetup) -> Pool:
    clip = load_frozen_clip(setup.model, device="cpu")
    data = federated_pool(setup.dataset)
    data = data.subset(np.arange(min(setup.pool_size, len(data))))
    features = encode_pixels(clip, images_to_pixel_values(clip.processor, data.images))
    return Pool(clip, features, torch.from_numpy(data.labels), data.class_names)


def run_config(setup: AuditSetup, setting: Setting, seed: int) -> RunConfig:
    eps = setting.epsilon or 1.0  # unused with dp off
    return RunConfig(
        method=setting.method,
        dp_mode=setting.dp_mode,
        epsilon=eps,
        delta=setup.delta,
        max_sample_rate=1.0,  # every client trains on all of its few images each step
        num_server_rounds=setup.rounds,
        local_steps=setup.local_steps,
        batch_size=setup.batch_size,
        lr_local=setup.lr,
        lr_global=setup.lr,
        momentum=setup.momentum,
        weight_decay=0.0,
        model=setup.model,
        dataset=setup.dataset,
        min_nodes=setup.clients,
        node_wait_timeout=5.0,
        seed=seed,  # prompt initialisation (the split is drawn from the same seed)
        reproducible_noise=False,  # fresh noise from OS entropy in every run
    )


def _client_app(trainers: dict[int, ClientTrainer]) -> ClientApp:
    """A ClientApp over in-memory trainers (the audit chooses each client's data).

    SecFPP runs under secure aggregation only: its stages answer as ``client_app.py``'s.
    """
    app = ClientApp()

    def trainer_of(context: Context) -> ClientTrainer:
        return trainers[int(context.node_config["partition-id"])]

    def key_stage(stage: str) -> None:
        @app.query(stage)
        def _answer(msg: Message, context: Context) -> Message:
            return answer_stage(msg, context, trainer_of(context).cfg, stage)

    for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.CONSISTENCY, Stage.UNMASK):
        key_stage(stage)

    @app.train(Stage.COLLECT_MASKED)
    def _masked(msg: Message, context: Context) -> Message:
        trainer = trainer_of(context)
        content = masked_content(
            msg, context, trainer.cfg, lambda: secure_contribution(trainer, msg)
        )
        return Message(content, reply_to=msg)

    @app.query(Stage.COLLECT_MASKED)
    def _cluster(msg: Message, context: Context) -> Message:
        trainer = trainer_of(context)
        content = masked_content(
            msg, context, trainer.cfg, lambda: cluster_contribution(trainer, msg),
            purpose=CLUSTERING,
        )
        return Message(content, reply_to=msg)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        trainer = trainers[int(context.node_config["partition-id"])]
        return Message(answer_train(trainer, msg), reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        trainer = trainers[int(context.node_config["partition-id"])]
        return Message(answer_evaluate(trainer, msg), reply_to=msg)

    return app


def train_federation(
    pool: Pool, cfg: RunConfig, clients: list[np.ndarray], held_out: np.ndarray
) -> tuple[ClientTrainer, DPFPLStrategy]:
    """Train a federation whose client i trains on ``clients[i]``; returns client 0 and the server.

    ``held_out`` (never trained on) is every client's evaluation set; after the last
    evaluation each learner holds the final global prompt, as a deployed client would.
    """
    f, y = pool.features, pool.labels
    trainers = {}
    for i, idx in enumerate(clients):
        data = ClientData(
            f[idx][None],
            y[idx],
            f[held_out],
            y[held_out],
            f[held_out],
            y[held_out],
            tuple(range(len(pool.class_names))),
        )
        trainers[i] = ClientTrainer(cfg, pool.clip, pool.class_names, data, partition_id=i)
    strategy = build_strategy(cfg)
    run_strategy(
        strategy,
        client_app=_client_app(trainers),
        num_nodes=len(clients),
        initial_arrays=strategy.global_arrays(),
        num_rounds=cfg.num_server_rounds,
    )
    return trainers[0], strategy


def _draw(
    rng: np.random.Generator, candidates: np.ndarray, labels: np.ndarray, n: int
) -> np.ndarray:
    """``n`` samples spread over the classes as evenly as the candidates allow."""
    order = rng.permutation(candidates)
    by_class = [order[labels[order] == c] for c in np.unique(labels[order])]
    picked = [
        idx for rank in range(n) for cls in by_class if rank < len(cls) for idx in [cls[rank]]
    ]
    return np.sort(np.asarray(picked[:n], dtype=np.int64))


def _split(setup: AuditSetup, labels: np.ndarray, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Disjoint training sets for each client, and the non-members, all from one seed."""
    rng = np.random.default_rng([seed, 0])
    clients = []
    free = np.arange(len(labels))
    for _ in range(setup.clients):
        clients.append(_draw(rng, free, labels, setup.train_per_client))
        free = np.setdiff1d(free, clients[-1])
    return clients, _draw(rng, free, labels, setup.non_members)


@dataclass(frozen=True)
class Target:
    """One seed's released prompt: its outputs on members and non-members, and its record."""

    seed: int
    outputs: Outputs  # members first, then every non-member
    shadow_rows: np.ndarray  # rows of ``outputs`` it contributes as a shadow (balanced)
    epsilon: float | None  # the composed epsilon recorded in the exported file
    guarantee: str
    heldout_accuracy: float
    seconds: float


def audit_target(
    pool: Pool, setup: AuditSetup, setting: Setting, seed: int, work_dir: Path
) -> Target:
    """Train one federation, export client 0's prompt, and load it as a user would."""
    started = time.perf_counter()
    labels = pool.labels.numpy()
    clients, non_members = _split(setup, labels, seed)
    members = clients[0]
    check_disjoint(np.concatenate(clients), non_members)
    trainer, _ = train_federation(pool, run_config(setup, setting, seed), clients, non_members)
    name = f"{setting.label.replace(' ', '_')}-seed{seed}.safetensors"
    released = load_prompt_file(
        personalised_prompt_file(trainer, pool.clip, pool.class_names).save(work_dir / name)
    )
    idx = np.concatenate([members, non_members])
    is_member = torch.arange(len(idx)) < len(members)
    logits = PromptClassifier(released, pool.clip).logits(pool.features[idx])
    outputs = Outputs(logits, pool.labels[idx], is_member)
    # as a shadow: its members and as many non-members, class-balanced like the members
    out_rows = len(members) + np.searchsorted(
        non_members,
        _draw(np.random.default_rng([seed, 1]), non_members, labels, setup.shadow_out),
    )
    correct = (logits.argmax(1) == outputs.labels)[~is_member].float().mean()
    privacy = released.metadata.privacy
    return Target(
        seed=seed,
        outputs=outputs,
        shadow_rows=np.concatenate([np.arange(len(members)), out_rows]),
        epsilon=privacy.epsilon,
        guarantee=privacy.guarantee.value,
        heldout_accuracy=float(correct),
        seconds=round(time.perf_counter() - started, 1),
    )


def shadow_attacks(targets: list[Target]) -> list[tuple[Scores, Scores]]:
    """Leave-one-seed-out shadow attack: (probabilities, decisions) on each target."""
    out = []
    for t in targets:
        shadows = [s.outputs.subset(s.shadow_rows) for s in targets if s.seed != t.seed]
        attack = ShadowAttack(seed=t.seed).fit(shadows)
        out.append((attack.scores(t.outputs), attack.decisions(t.outputs)))
    return out


def summarise(setting: Setting, targets: list[Target], setup: AuditSetup) -> dict:
    """One row: pooled figures with intervals, per-seed spread, and the raw scores."""
    threshold = [threshold_scores(t.outputs) for t in targets]
    shadow = shadow_attacks(targets) if len(targets) > 1 else []
    n_out = sum(r.non_members for r in threshold)
    stats = {"auc": auc}
    for fpr in FPRS:
        if resolves(n_out, fpr):
            stats[f"tpr@{fpr:g}"] = partial(tpr_at_fpr, fpr=fpr)
    figures = {f"threshold {k}": v for k, v in _estimate(threshold, stats, setup).items()}
    if shadow:
        probs, verdicts = zip(*shadow, strict=True)
        figures["shadow auc"] = _estimate(list(probs), {"auc": auc}, setup)["auc"]
        figures["shadow rule balanced acc"] = _estimate(
            list(verdicts), {"acc": lambda d, m: balanced_accuracy(d > 0.5, m)}, setup
        )["acc"]
    return {
        "setting": setting.label,
        "method": setting.method.value,
        "dp_mode": setting.dp_mode.value,
        "target_epsilon": setting.epsilon,
        "epsilon": [t.epsilon for t in targets],
        "guarantee": sorted({t.guarantee for t in targets}),
        "heldout_accuracy": [t.heldout_accuracy for t in targets],
        "members": sum(r.members for r in threshold),
        "non_members": n_out,
        "figures": {k: asdict(v) for k, v in figures.items()},
        "per_seed": [
            {
                "seed": t.seed,
                "seconds": t.seconds,
                "threshold_auc": auc(r.scores, r.is_member),
                "shadow_auc": auc(s[0].scores, s[0].is_member) if shadow else None,
                "is_member": r.is_member.astype(int).tolist(),
                "threshold_scores": _rounded(r.scores),
                "shadow_probabilities": _rounded(s[0].scores) if shadow else None,
            }
            for t, r, s in zip(targets, threshold, shadow or [None] * len(targets), strict=True)
        ],
    }


def _estimate(runs: list[Scores], stats: dict, setup: AuditSetup) -> dict[str, Estimate]:
    return pooled_estimates(runs, stats, reps=setup.bootstrap, seed=0)


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def sweep(quick: bool, secfpp: bool = False) -> list[Setting]:
    if secfpp:  # SecFPP adds no noise: set beside non-private DP-FPL, same 3 clients
        return [Setting(Method.DPFPL, DPMode.OFF), Setting(Method.SECFPP, DPMode.OFF)]
    off = [Setting(m, DPMode.OFF) for m in (Method.PROMPTFL, Method.DPFPL)]
    if quick:
        return [*off, Setting(Method.DPFPL, DPMode.PER_SAMPLE, 8.0)]
    private = [
        Setting(m, DPMode.PER_SAMPLE, eps)
        for m in (Method.DPFPL, Method.PROMPTFL)  # DP-FPL first: its prompt is the leaky one
        for eps in (1.0, 8.0)
    ]
    return off + private


def caption(setup: AuditSetup, rows: list[dict]) -> str:
    n_in = rows[0]["members"] if rows else 0
    n_out = rows[0]["non_members"] if rows else 0
    return (
        f"Membership inference on client 0's exported prompt: {setup.dataset} images on the "
        f"{setup.model} backbone (one backbone, one pool of {setup.pool_size} images). The "
        "setting was chosen to make non-private leakage measurable: tiny client datasets "
        f"({setup.clients} clients x {setup.train_per_client} images) and many steps "
        f"({setup.rounds} rounds x {setup.local_steps} local steps, batch "
        f"{setup.batch_size}, lr {setup.lr:g}, momentum {setup.momentum:g}); on digits, "
        "where the backbone is 98% zero-shot, nothing leaked. Each row pools "
        f"{setup.seeds} seeds (each seed: a new split, prompt initialisation and fresh DP "
        f"noise): {n_in} members (client 0's training images) vs {n_out} non-members "
        f"({setup.non_members} per seed, never used by that federation). [95% CI]: "
        f"two-stage bootstrap ({setup.bootstrap} replicates) resampling seeds, then "
        "members and non-members within each seed. Per-seed AUC: mean +- s.d. (min-max) "
        "over seeds. TPR @ FPR<=a: threshold at the non-members' (1-a) quantile, reported "
        f"only where a x non-members >= {MIN_FALSE_POSITIVES}. Shadow attack: per-class "
        "MLPs on log-softmax outputs, fit leave-one-seed-out on the other seeds' "
        f"federations of the same setting ({setup.seeds - 1} shadow prompts, "
        f"{setup.train_per_client} in + {setup.shadow_out} out each); 'shadow rule bal. "
        "acc' is the balanced accuracy on the target of its own decision (probability > "
        "0.5), no threshold tuned on the target. eps: the composed epsilon per client "
        f"recorded in the exported file (delta {setup.delta:g}; both channels, all "
        "releases; 'accounted' = formal sample-level bound)."
    )


def markdown(rows: list[dict], setup: AuditSetup) -> str:
    n_out = rows[0]["non_members"] if rows else 0
    fprs = [f for f in FPRS if resolves(n_out, f)]
    tpr_heads = "".join(f" | TPR @ FPR<={f:.0%} (n_out={n_out})" for f in fprs)
    lines = [
        caption(setup, rows),
        "",
        "| method | DP mode | target eps | eps (composed, per client) | held-out acc "
        f"| threshold AUC [95% CI] | per-seed threshold AUC{tpr_heads} "
        "| shadow AUC [95% CI] | shadow rule bal. acc [95% CI] |",
        "|---|---|---:|---:|---:|---:|---:" + "|---:" * len(fprs) + "|---:|---:|",
    ]
    for r in rows:
        fig = r["figures"]
        per_seed = np.array([s["threshold_auc"] for s in r["per_seed"]])
        tprs = "".join(f" | {_ci(fig[f'threshold tpr@{f:g}'])}" for f in fprs)
        lines.append(
            f"| {r['method']} | {r['dp_mode']} | {_num(r['target_epsilon'])} "
            f"| {_eps(r['epsilon'], r['guarantee'])} | {np.mean(r['heldout_accuracy']):.2f} "
            f"| {_ci(fig['threshold auc'])} | {_spread(per_seed)}{tprs} "
            f"| {_ci(fig.get('shadow auc'))} | {_ci(fig.get('shadow rule balanced acc'))} |"
        )
    return "\n".join(lines) + "\n"


def _ci(e: dict | None) -> str:
    return "-" if e is None else f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"


def _spread(values: np.ndarray) -> str:
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} +- {sd:.2f} ({values.min():.2f}-{values.max():.2f})"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _eps(values: list[float | None], guarantees: list[str]) -> str:
    meaning = "/".join(guarantees)
    known = [v for v in values if v is not None]
    if not known:
        return meaning
    low, high = min(known), max(known)
    figure = f"{low:.2f}" if high - low < 0.005 else f"{low:.2f}-{high:.2f}"
    return figure if meaning == "accounted" else f"{figure} ({meaning})"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    epsilons = sorted({r["target_epsilon"] for r in rows if r["target_epsilon"] is not None})
    for ax, attack in zip(axes, ("threshold", "shadow"), strict=True):
        for method, colour, shift in (
            ("promptfl", "tab:orange", 0.94),
            ("dpfpl", "tab:blue", 1.06),
        ):
            for r in rows:
                est = r["figures"].get(f"{attack} auc")
                if r["method"] != method or est is None:
                    continue
                seeds = [s[f"{attack}_auc"] for s in r["per_seed"]]
                if r["target_epsilon"] is None:  # no DP: a band across the plot
                    ax.axhspan(est["low"], est["high"], color=colour, alpha=0.15)
                    ax.axhline(est["value"], color=colour, ls="--", label=f"{method} no DP")
                    continue
                x = r["target_epsilon"] * shift
                ax.errorbar(
                    x,
                    est["value"],
                    yerr=[[est["value"] - est["low"]], [est["high"] - est["value"]]],
                    fmt="o",
                    color=colour,
                    capsize=3,
                    label=f"{method} per-sample DP" if r["target_epsilon"] == epsilons[0] else None,
                )
                ax.scatter([x] * len(seeds), seeds, s=8, color=colour, alpha=0.4)
        ax.axhline(0.5, color="lightgrey", lw=1)
        if epsilons:
            ax.set_xscale("log")
            ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
            ax.set_xlim(epsilons[0] / 2, epsilons[-1] * 2)
        ax.minorticks_off()
        ax.set_xlabel("target epsilon (composed, per client)")
        ax.set_title(f"{attack} attack: pooled AUC, 95% CI; dots: seeds")
    axes[0].set_ylabel("attack AUC (0.5 = guessing)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(path: Path) -> int:
    """Rewrite ``<stem>.md`` and ``<stem>.png`` beside a results JSON (no training)."""
    doc = json.loads(path.read_text())
    setup = AuditSetup(**doc["setup"])
    path.with_suffix(".md").write_text(markdown(doc["rows"], setup))
    plot(doc["rows"], path.with_suffix(".png"))
    print(markdown(doc["rows"], setup))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 settings, 2 seeds, 3 rounds")
    parser.add_argument("--dataset", default=AuditSetup.dataset)
    parser.add_argument("--model", default=AuditSetup.model)
    parser.add_argument("--seeds", type=int, default=AuditSetup.seeds)
    parser.add_argument("--rounds", type=int, default=AuditSetup.rounds)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw the table and plot of a JSON"
    )
    parser.add_argument(
        "--secfpp", action="store_true",
        help="SecFPP beside non-private DP-FPL, 3 clients (SecFPP needs 3 for its secure "
        "sums); writes membership-secfpp.*",
    )
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.replot)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the shadow attack is fit on the other seeds)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round strategy logs: too many
    warnings.filterwarnings("ignore", message="dp-mode='paper'")
    warnings.filterwarnings("ignore", message="Stochastic Optimizer: Maximum iterations")
    torch.set_num_threads(1)
    setup = AuditSetup(dataset=args.dataset, model=args.model, seeds=args.seeds, rounds=args.rounds)
    if args.secfpp:
        setup = replace(setup, clients=3)
    if args.quick:
        setup = replace(setup, seeds=2, rounds=3, bootstrap=200)
    pool = load_pool(setup)
    work = Path(tempfile.mkdtemp(prefix="dpfpl-audit-"))  # exported prompts: not results
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "membership" + ("-secfpp" if args.secfpp else "") + ("-quick" if args.quick else "")
    command = "python benchmarks/bench_membership.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    started = time.perf_counter()
    rows = []
    for setting in sweep(args.quick, args.secfpp):
        targets = []
        for seed in range(setup.seeds):
            targets.append(audit_target(pool, setup, setting, seed, work))
            logger.info("%s seed %d: %.0f s", setting.label, seed, targets[-1].seconds)
        rows.append(summarise(setting, targets, setup))
        logger.info(
            "%s: threshold AUC %s, shadow AUC %s",
            setting.label,
            _ci(rows[-1]["figures"]["threshold auc"]),
            _ci(rows[-1]["figures"].get("shadow auc")),
        )
        doc = {
            "setup": asdict(setup),
            "command": command,
            "minutes": round((time.perf_counter() - started) / 60, 1),
            "rows": rows,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1))  # after each row
        (args.out / f"{stem}.md").write_text(markdown(rows, setup))
    plot(rows, args.out / f"{stem}.png")
    print(markdown(rows, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
