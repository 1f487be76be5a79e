"""``dpfpl audit``: an empirical lower bound under the epsilon we claim.

Two audits: ``--white-box`` attacks one release of each channel many times;
``--one-run`` runs whole federations with canaries and attacks what they released.

Only argparse (and the sweep's KEY=VALUE parser) is imported at module level: ``dpfpl``
builds every subcommand's parser on each call, and torch, opacus and matplotlib are
loaded only when an audit runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpfpl_app.service.sweep_cli import parse_override

# Mirrors audit.mechanism.Channel and accounting.AccountantKind without importing them
# (see the module docstring); run() converts through the enums, and a test pins both.
CHANNEL_CHOICES = ("local", "global", "secure")
ACCOUNTANT_CHOICES = ("rdp", "prv")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit`` to the ``dpfpl`` subcommands."""
    p = subparsers.add_parser(
        "audit",
        help="empirical lower bound on epsilon (white-box or one-run canary audit)",
        description=(
            "--white-box: run one noisy release of the production code many times (a "
            "PromptLearner step, the strategy's aggregation, a SecAgg+ round with Skellam "
            "noise), with and without a worst-case canary at the sensitivity bound; bound "
            "epsilon from below and test the measured noise std and canary shift against "
            "the claim. --one-run: run real federations "
            "(flwr run on a private local SuperLink) with gradient canaries in one client's "
            "data, score them from the broadcast global prompts and the released prompt. "
            "Exit code 1 on a violation: a bound above its claim, or (white-box) noise or "
            "shift outside its interval at the stated false-alarm probability."
        ),
    )
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--white-box", action="store_true", help="one local step / one aggregation, many trials"
    )
    kind.add_argument("--one-run", action="store_true", help="whole federations with canaries")
    p.add_argument("--out", required=True, help="directory for report.json and the plot")
    w = p.add_argument_group("--white-box")
    w.add_argument("--noise-multiplier", type=float, help="z of the release (required)")
    w.add_argument("--trials", type=int, default=4000, help="releases with and without canary")
    w.add_argument(
        "--channel", choices=CHANNEL_CHOICES, action="append", help="repeatable; default: both"
    )
    w.add_argument("--delta", type=float, default=1e-5, help="delta of the claim")
    w.add_argument(
        "--false-alarm",
        type=float,
        default=1e-6,
        help="probability that a correct release fails the noise (or the shift) test",
    )
    w.add_argument(
        "--accountant", choices=ACCOUNTANT_CHOICES, default="rdp", help="accountant of the claim"
    )
    w.add_argument("--clip-norm", type=float, default=10.0, help="clip norm C of the release")
    w.add_argument("--batch-size", type=int, default=32, help="expected batch B")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound")
    p.add_argument(
        "--clients", type=int, default=10, help="N clients (aggregate / simulated SuperNodes)"
    )
    o = p.add_argument_group("--one-run")
    o.add_argument("--method", action="append", help="repeatable; default: dpfpl and promptfl")
    o.add_argument(
        "--epsilon", type=float, action="append", help="target epsilons; default: 1 and 4"
    )
    o.add_argument("--canaries", type=int, default=1000, help="m canaries (<= prompt size)")
    o.add_argument(
        "--set",
        type=parse_override,
        action="append",
        metavar="KEY=VALUE",
        help="run-config value of every audited run (repeatable)",
    )
    o.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    o.add_argument("--app-dir", default=".", help="the dpfpl app (its pyproject.toml)")
    w.add_argument(
        "--public-noise-seed",
        type=int,
        help="draw the noise from this public seed (as reproducible-noise=true does) and let "
        "the adversary replay it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the audits; print the table; 1 on a violation, 0 otherwise."""
    if args.one_run:
        return run_one_run(args)
    if args.noise_multiplier is None:
        raise ValueError("--white-box needs --noise-multiplier (z of the release to attack)")
    if args.trials < 2:
        raise ValueError(f"--trials must be >= 2, got {args.trials}")

    import torch

    from dpfpl_app.audit import white_box
    from dpfpl_app.audit.claims import release_claim
    from dpfpl_app.audit.mechanism import Channel, canary_game
    from dpfpl_app.audit.report import summary_table, write_report
    from dpfpl_app.privacy.accounting import AccountantKind

    torch.set_num_threads(1)  # tensors of a few hundred numbers: threads only add overhead
    kind = AccountantKind(args.accountant)
    z = args.noise_multiplier
    audits = []
    for name in dict.fromkeys(args.channel or CHANNEL_CHOICES):
        game = canary_game(
            Channel(name),
            noise_multiplier=z,
            clip_norm=args.clip_norm,
            batch=args.batch_size,
            clients=args.clients,
            public_seed=args.public_noise_seed,
        )
        claim, exact = release_claim(
            z, survivor_ratio=game.survivor_ratio, delta=args.delta, kind=kind
        )
        adversary, adversary_name = None, "projection on the canary direction"
        if args.public_noise_seed is not None:
            adversary = white_box.replay_adversary(game)
            adversary_name = "replays the public noise seed, projects the difference"
        audits.append(
            white_box.audit_white_box(
                game,
                trials=args.trials,
                claimed_epsilon=claim,
                exact_epsilon=exact,
                delta=args.delta,
                confidence=args.confidence,
                false_alarm=args.false_alarm,
                adversary=adversary,
                adversary_name=adversary_name,
            )
        )
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    path = write_report(audits, Path(args.out), accountant=kind.value, settings=settings)
    print(summary_table(audits))
    print(
        f"confidence {args.confidence:g}; noise and shift tests at false-alarm "
        f"{args.false_alarm:g} each; report: {path}"
    )
    return 1 if any(a.violation for a in audits) else 0


def run_one_run(args: argparse.Namespace) -> int:
    """One audited federation per (method, epsilon), resumable; report, table, plot."""
    import json
    import logging
    import time

    from dpfpl_app.audit import one_run, one_run_report

    log = logging.getLogger("dpfpl.audit")
    out = Path(args.out).resolve()
    cells = [
        (method, eps)
        for method in dict.fromkeys(args.method or ("dpfpl", "promptfl"))
        for eps in dict.fromkeys(args.epsilon or (1.0, 4.0))
    ]
    plans = {}  # every cell's config and canaries are checked before the first run starts
    for method, eps in cells:
        cell_dir = out / f"{method}-eps{eps:g}"
        cfg = one_run.audit_config(
            {**dict(args.set or []), "method": method, "epsilon": eps},
            out_dir=cell_dir,
            clients=args.clients,
        )
        plans[cell_dir] = cfg, one_run.plan_canaries(cfg, count=args.canaries)
    records, started = [], time.monotonic()
    for i, (cell_dir, (cfg, spec)) in enumerate(plans.items(), 1):
        done = cell_dir / "record.json"
        if done.is_file():
            log.info("[%d/%d] %s: audited before, kept", i, len(cells), cell_dir.name)
            records.append(json.loads(done.read_text()))
            continue
        log.info(
            "[%d/%d] %s: running the federation with %d canaries ...",
            i,
            len(cells),
            cell_dir.name,
            args.canaries,
        )
        one_run.run_federation(
            cfg, spec, cell_dir, app_dir=Path(args.app_dir), timeout_s=args.timeout
        )
        record = one_run_report.run_record(
            cfg,
            spec,
            one_run.audit_run(cfg, spec, confidence=args.confidence),
            sample_rate=one_run.canary_sample_rate(cfg, spec.partition_id),
        )
        done.write_text(json.dumps(record, indent=1) + "\n")
        records.append(record)
        left = (time.monotonic() - started) / i * (len(cells) - i)
        log.info("[%d/%d] %s done (about %.0f min left)", i, len(cells), cell_dir.name, left / 60)
    path = one_run_report.write(records, out)
    table = one_run_report.table(records)
    (out / "report.md").write_text(table + "\n")
    print(table)
    print(f"confidence {args.confidence:g}; report: {path}")
    return 1 if any(r["violation"] for r in records) else 0
