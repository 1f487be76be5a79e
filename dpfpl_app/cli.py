"""The ``dpfpl`` command: helpers around Flower runs (the runs themselves use ``flwr run``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dpfpl_app import accounting
from dpfpl_app.audit.cli import add_parser as add_audit_command
from dpfpl_app.backbone_build import BACKBONES, ensure_backbone
from dpfpl_app.results import load_results, summary_table
from dpfpl_app.service_cli import add_service_commands
from dpfpl_app.sweep_cli import add_sweep_command


def _build_backbone(args: argparse.Namespace) -> int:
    path = ensure_backbone(args.name)
    print(path)
    return 0


def _summary(args: argparse.Namespace) -> int:
    print(summary_table(load_results(Path(args.run_dir))))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    kind = accounting.AccountantKind(args.accountant)
    z = accounting.calibrate_noise_multiplier(
        target_epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=args.sample_rate,
        steps=args.steps,
        kind=kind,
    )
    eps = accounting.epsilon_for(
        noise_multiplier=z,
        sample_rate=args.sample_rate,
        steps=args.steps,
        delta=args.delta,
        kind=kind,
    )
    paper = accounting.paper_noise_multiplier(
        epsilon=args.epsilon, delta=args.delta, rounds=args.steps
    )
    print(f"noise multiplier {z:.4g} ({kind.value}) -> epsilon {eps:.4g} at delta {args.delta:g}")
    print(f"the paper's formula would use {paper:.4g} ({paper / z:.1f}x more noise)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpfpl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-backbone", help="pretrain (once) and cache an offline backbone")
    p.add_argument("name", nargs="?", default="dpfpl-tiny-digits", choices=sorted(BACKBONES))
    p.set_defaults(func=_build_backbone)

    p = sub.add_parser("summary", help="print a run's per-round table and summary")
    p.add_argument("run_dir", help="a run's output directory (holds results.json)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("calibrate", help="noise multiplier for a target (epsilon, delta)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--sample-rate", type=float, required=True, help="q = B / |D_i|")
    p.add_argument("--steps", type=int, required=True, help="noisy steps (rounds x local steps)")
    p.add_argument(
        "--accountant", choices=[k.value for k in accounting.AccountantKind], default="rdp"
    )
    p.set_defaults(func=_calibrate)

    add_service_commands(sub)
    add_sweep_command(sub)
    add_audit_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # force: an imported library has already configured the root logger at WARNING
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"dpfpl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
