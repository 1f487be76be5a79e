"""Membership-inference audit of released prompts, against privacy level and method.

For each setting (method x DP mode x epsilon) this trains one *target* federation and
``--shadows`` *shadow* federations with the real ``ClientTrainer`` and the real
``DPFPLStrategy`` (global noise and accounting included), driven through the project's
in-process Flower grid (``tests/flower_harness.py``, real message serialisation). The
target's client 0 exports its personalised prompt with the node's export code; the
audit then loads that file, as a public user would, and attacks it:

* members = client 0's training images (only those: what the prompt really trained on);
* non-members = images of the same pool that no client of the target ever used;
* shadow federations train on a disjoint shadow pool, their client 0's training
  images labelled "in" and unused shadow-pool images "out".

Data: the offline dataset's federated pool (images the backbone never saw), encoded
once. Small client datasets and many rounds make the non-private prompt overfit, so
that leakage is measurable at all; the numbers are for this tiny backbone and pool.

Usage::

    python benchmarks/bench_membership.py             # the sweep; writes benchmarks/results/
    python benchmarks/bench_membership.py --quick     # smoke run (2 settings, 1 shadow)
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
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.audit.membership import (  # noqa: E402
    Outputs,
    ShadowAttack,
    check_disjoint,
    threshold_attack,
)
from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip  # noqa: E402
from dpfpl_app.config import DPMode, Method, RunConfig  # noqa: E402
from dpfpl_app.data.features import encode_pixels  # noqa: E402
from dpfpl_app.data.federated_data import ClientData  # noqa: E402
from dpfpl_app.data.image_processing import images_to_pixel_values  # noqa: E402
from dpfpl_app.data.offline_data import federated_pool  # noqa: E402
from dpfpl_app.federation.client_messages import answer_evaluate, answer_train  # noqa: E402
from dpfpl_app.federation.prompt_export import personalised_prompt_file  # noqa: E402
from dpfpl_app.federation.strategy import DPFPLStrategy  # noqa: E402
from dpfpl_app.federation.strategy_build import build_strategy  # noqa: E402
from dpfpl_app.method.client_trainer import ClientTrainer  # noqa: E402
from dpfpl_app.method.prompt_file import PromptMetadata, load_prompt_file  # noqa: E402
from dpfpl_app.service.predict import PromptClassifier  # noqa: E402
from tests.flower_harness import run_strategy  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
logger = logging.getLogger("bench_membership")


@dataclass(frozen=True)
class AuditSetup:
    """Data sizes and training schedule shared by every setting of a sweep.

    The regime in which a non-private prompt overfits: an organisation whose images the
    backbone never saw (Fashion-MNIST on the digits-only backbone, so the prompt must
    learn the task from its own few images), 20 images per client, 300 local steps. Many
    local steps per round, rather than many rounds, keep per-sample DP affordable here:
    its cost is dominated by the accountants, which run once per round. On digits the
    backbone already scores 98% zero-shot, and no regime tried made a prompt leak there.
    """

    dataset: str = "fashion-mnist"
    model: str = "dpfpl-tiny-digits"
    pool_size: int = 2000  # the first images of the federated pool (encoding all is slow)
    clients: int = 2
    train_per_client: int = 20
    rounds: int = 15
    local_steps: int = 20
    batch_size: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    shadows: int = 2
    delta: float = 1e-5
    seed: int = 0


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: prompt method and privacy level (epsilon of both channels)."""

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


def run_config(setup: AuditSetup, setting: Setting) -> RunConfig:
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
        seed=setup.seed,
        reproducible_noise=True,
    )


def _client_app(trainers: dict[int, ClientTrainer]) -> ClientApp:
    """A ClientApp over in-memory trainers (the audit chooses each client's data)."""
    app = ClientApp()

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


def _split(
    setup: AuditSetup, labels: np.ndarray, rng: np.random.Generator, candidates: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Disjoint training sets for each client, and equally many held-out non-members."""
    clients = []
    free = candidates
    for _ in range(setup.clients):
        clients.append(_draw(rng, free, labels, setup.train_per_client))
        free = np.setdiff1d(free, clients[-1])
    return clients, _draw(rng, free, labels, setup.train_per_client)


def _outputs(logits: torch.Tensor, pool: Pool, members: np.ndarray, others: np.ndarray) -> Outputs:
    idx = np.concatenate([members, others])
    is_member = torch.zeros(len(idx), dtype=torch.bool)
    is_member[: len(members)] = True
    return Outputs(logits, pool.labels[idx], is_member)


@dataclass(frozen=True)
class Target:
    """The audited prompt as released, and the ground truth about its training data."""

    outputs: Outputs
    metadata: PromptMetadata
    members: np.ndarray  # pool indices client 0 trained on
    non_members: np.ndarray  # pool indices no client of the target federation used


def _pools(setup: AuditSetup, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint target and shadow halves of the pool (the attacker's data is its own)."""
    everything = np.random.default_rng(setup.seed).permutation(n)
    return np.sort(everything[::2]), np.sort(everything[1::2])


def audit_target(pool: Pool, setup: AuditSetup, setting: Setting, work_dir: Path) -> Target:
    """Train the target federation, export client 0's prompt, and load it as a user would."""
    cfg = run_config(setup, setting)
    labels = pool.labels.numpy()
    target_pool, _ = _pools(setup, len(labels))
    clients, non_members = _split(
        setup, labels, np.random.default_rng([setup.seed, 0]), target_pool
    )
    check_disjoint(np.concatenate(clients), non_members)
    target, strategy = train_federation(pool, cfg, clients, non_members)
    exported = personalised_prompt_file(target, pool.clip, pool.class_names).save(
        work_dir / f"{setting.label.replace(' ', '_')}.safetensors"
    )
    released = load_prompt_file(exported)
    classifier = PromptClassifier(released, pool.clip)
    idx = np.concatenate([clients[0], non_members])
    outputs = _outputs(classifier.logits(pool.features[idx]), pool, clients[0], non_members)
    return Target(outputs, released.metadata, clients[0], non_members)


def shadow_outputs(pool: Pool, setup: AuditSetup, setting: Setting) -> list[Outputs]:
    """Shadow federations trained the same way on the shadow half, with in/out labels."""
    cfg = run_config(setup, setting)
    labels = pool.labels.numpy()
    _, shadow_pool = _pools(setup, len(labels))
    shadows = []
    for s in range(setup.shadows):
        clients, out = _split(
            setup, labels, np.random.default_rng([setup.seed, s + 1]), shadow_pool
        )
        s_cfg = RunConfig.model_validate({**cfg.model_dump(), "seed": setup.seed + s + 1})
        shadow, _ = train_federation(pool, s_cfg, clients, out)
        idx = np.concatenate([clients[0], out])
        shadows.append(_outputs(shadow.learner.logits(pool.features[idx]), pool, clients[0], out))
    return shadows


def audit_setting(pool: Pool, setup: AuditSetup, setting: Setting, work_dir: Path) -> dict:
    """One row of the sweep: both attacks on the target's released prompt."""
    started = time.perf_counter()
    target = audit_target(pool, setup, setting, work_dir)
    threshold = threshold_attack(target.outputs)
    shadow = ShadowAttack(seed=setup.seed).fit(shadow_outputs(pool, setup, setting))
    out = target.outputs
    held_out = (out.logits.argmax(1) == out.labels)[~out.is_member].float().mean()
    meta = target.metadata
    return {
        "setting": setting.label,
        "method": setting.method.value,
        "dp_mode": setting.dp_mode.value,
        "epsilon": setting.epsilon,
        "eps": meta.privacy.epsilon,
        "eps_guarantee": meta.privacy.guarantee.value,
        "heldout_accuracy": float(held_out),
        "threshold": asdict(threshold),
        "shadow": asdict(shadow.attack(out)),
        "seconds": round(time.perf_counter() - started, 1),
    }


def sweep(quick: bool) -> list[Setting]:
    off = [Setting(m, DPMode.OFF) for m in (Method.PROMPTFL, Method.DPFPL)]
    if quick:
        return off
    private = [
        Setting(m, mode, eps)
        for m in (Method.PROMPTFL, Method.DPFPL)
        for mode in (DPMode.PAPER, DPMode.PER_SAMPLE)
        for eps in (1.0, 8.0)
    ]
    return off + private


def markdown(rows: list[dict], setup: AuditSetup) -> str:
    n = setup.train_per_client
    sd = ((2 * n + 1) / (12 * n * n)) ** 0.5  # s.d. of the AUC of a blind attack (Mann-Whitney)
    lines = [
        f"Membership inference on client 0's exported prompt ({setup.dataset} on "
        f"{setup.model}; {setup.clients} clients x {n} training images; {setup.rounds} rounds "
        f"x {setup.local_steps} local steps, batch {setup.batch_size}, lr {setup.lr:g}, "
        f"momentum {setup.momentum:g}; {setup.shadows} shadow federation(s) per setting; "
        f"{n} members vs {n} non-members: a blind attack's AUC has s.d. {sd:.2f}).",
        "",
        "| method | DP mode | target eps | eps (composed) | held-out acc "
        "| threshold AUC | TPR@1%FPR | shadow AUC | shadow acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['dp_mode']} | {_num(r['epsilon'])} "
            f"| {_eps(r['eps'], r['eps_guarantee'])} | {r['heldout_accuracy']:.3f} "
            f"| {r['threshold']['auc']:.3f} | {r['threshold']['tpr_at_low_fpr']:.3f} "
            f"| {r['shadow']['auc']:.3f} | {r['shadow']['accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _eps(value: float | None, guarantee: str) -> str:
    if value is None:
        return guarantee
    if guarantee == "accounted":
        return f"{value:.2f}"
    return f"{value:.2f} ({guarantee})"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, attack in zip(axes, ("threshold", "shadow"), strict=True):
        for method, marker in (("promptfl", "o"), ("dpfpl", "s")):
            for mode, colour in (("paper", "tab:orange"), ("per-sample", "tab:blue")):
                pts = sorted(
                    (r["epsilon"], r[attack]["auc"])
                    for r in rows
                    if r["method"] == method and r["dp_mode"] == mode
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker=marker,
                        color=colour,
                        label=f"{method} {mode}",
                    )
            for r in rows:
                if r["method"] == method and r["dp_mode"] == "off":
                    ax.axhline(
                        r[attack]["auc"],
                        ls="--",
                        color="grey" if method == "dpfpl" else "k",
                        label=f"{method} no DP",
                    )
        ax.axhline(0.5, color="lightgrey", lw=1)
        ax.set_xscale("log")
        epsilons = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.minorticks_off()
        ax.set_xlabel("target epsilon (each channel)")
        ax.set_title(f"{attack} attack")
    axes[0].set_ylabel("attack AUC (0.5 = guessing)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 settings, 1 shadow, 3 rounds")
    parser.add_argument("--dataset", default=AuditSetup.dataset)
    parser.add_argument("--model", default=AuditSetup.model)
    parser.add_argument("--shadows", type=int, default=AuditSetup.shadows)
    parser.add_argument("--rounds", type=int, default=AuditSetup.rounds)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round strategy logs: too many
    warnings.filterwarnings("ignore", message="reproducible-noise=true")
    warnings.filterwarnings("ignore", message="dp-mode='paper'")
    torch.set_num_threads(1)
    setup = AuditSetup(
        dataset=args.dataset, model=args.model, shadows=args.shadows, rounds=args.rounds
    )
    if args.quick:
        setup = replace(setup, shadows=1, rounds=3)
    pool = load_pool(setup)
    work = Path(tempfile.mkdtemp(prefix="dpfpl-audit-"))  # exported prompts: not results
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "membership-quick" if args.quick else "membership"
    command = "python benchmarks/bench_membership.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for setting in sweep(args.quick):
        rows.append(audit_setting(pool, setup, setting, work))
        r = rows[-1]
        logger.info(
            "%s: threshold AUC %.3f, shadow AUC %.3f (%.0f s)",
            r["setting"],
            r["threshold"]["auc"],
            r["shadow"]["auc"],
            r["seconds"],
        )
        doc = {"setup": asdict(setup), "command": command, "rows": rows}  # kept after each row
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(rows, setup))
    plot(rows, args.out / f"{stem}.png")
    print(markdown(rows, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
