"""``dpfpl audit``: an empirical lower bound under the epsilon we claim.

Only argparse is imported at module level: ``dpfpl`` builds every subcommand's parser
on each call, and torch, opacus and matplotlib are loaded only when an audit runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Mirrors audit.mechanism.Channel and accounting.AccountantKind without importing them
# (see the module docstring); run() converts through the enums, and a test pins both.
CHANNEL_CHOICES = ("local", "global")
ACCOUNTANT_CHOICES = ("rdp", "prv")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit`` to the ``dpfpl`` subcommands."""
    p = subparsers.add_parser(
        "audit",
        help="empirical lower bound on epsilon (white-box mechanism audit)",
        description=(
            "Attack one noisy release many times, with and without a worst-case canary at "
            "the sensitivity bound, and bound epsilon from below. Exit code 1 when the "
            "lower bound exceeds the claimed epsilon."
        ),
    )
    p.add_argument(
        "--white-box",
        action="store_true",
        help="audit the mechanism itself (one local step / one aggregation); required for now",
    )
    p.add_argument("--noise-multiplier", type=float, required=True, help="z of the release")
    p.add_argument("--trials", type=int, default=20000, help="releases with and without canary")
    p.add_argument("--out", required=True, help="directory for report.json and audit.png")
    p.add_argument(
        "--channel", choices=CHANNEL_CHOICES, action="append", help="repeatable; default: both"
    )
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the claim")
    p.add_argument(
        "--confidence", type=float, default=0.95, help="confidence of the lower bound"
    )
    p.add_argument(
        "--accountant", choices=ACCOUNTANT_CHOICES, default="rdp", help="accountant of the claim"
    )
    p.add_argument("--clip-norm", type=float, default=10.0, help="clip norm C of the release")
    p.add_argument("--batch-size", type=int, default=32, help="expected batch B")
    p.add_argument("--clients", type=int, default=10, help="N clients in the aggregate")
    p.add_argument(
        "--public-noise-seed",
        type=int,
        help="draw the noise from this public seed (as reproducible-noise=true does) and let "
        "the adversary replay it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the audits; print the table; 1 on a violation, 0 otherwise."""
    if not args.white_box:
        raise ValueError(
            "only --white-box is available so far: the one-run canary audit of a whole "
            "federation is still to come (issue 17)"
        )
    if args.trials < 2:
        raise ValueError(f"--trials must be >= 2, got {args.trials}")

    import torch

    from dpfpl_app.accounting import AccountantKind
    from dpfpl_app.audit import white_box
    from dpfpl_app.audit.claims import claimed_epsilon, gaussian_epsilon
    from dpfpl_app.audit.mechanism import Channel, canary_game
    from dpfpl_app.audit.report import summary_table, write_report

    torch.set_num_threads(1)  # tensors of a few hundred numbers: threads only add overhead
    kind = AccountantKind(args.accountant)
    claim = claimed_epsilon(args.noise_multiplier, delta=args.delta, kind=kind)
    exact = gaussian_epsilon(args.noise_multiplier, delta=args.delta)
    audits = []
    for name in dict.fromkeys(args.channel or CHANNEL_CHOICES):
        game = canary_game(
            Channel(name),
            noise_multiplier=args.noise_multiplier,
            clip_norm=args.clip_norm,
            batch=args.batch_size,
            clients=args.clients,
        )
        noise_for, adversary, adversary_name = None, None, "projection on the canary direction"
        if args.public_noise_seed is not None:
            noise_for = white_box.public_seed_noise(args.public_noise_seed)
            adversary = white_box.replay_adversary(game, noise_for)
            adversary_name = "replays the public noise seed, projects the difference"
        audits.append(
            white_box.audit_white_box(
                game,
                trials=args.trials,
                claimed_epsilon=claim,
                exact_epsilon=exact,
                delta=args.delta,
                confidence=args.confidence,
                noise_for=noise_for,
                adversary=adversary,
                adversary_name=adversary_name,
            )
        )
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    path = write_report(audits, Path(args.out), accountant=kind.value, settings=settings)
    print(summary_table(audits))
    print(f"confidence {args.confidence:g}; report: {path}")
    return 1 if any(a.violation for a in audits) else 0
