"""The ``dpfpl`` command: helpers around Flower runs (the runs themselves use ``flwr run``).

Only the standard library is imported here and in the parser builders: torch,
transformers and opacus cost seconds and hundreds of MB, so each subcommand imports
what it needs when it runs, and ``dpfpl --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dpfpl_app.audit.cli import add_parser as add_audit_command
from dpfpl_app.config import Accountant
from dpfpl_app.service.node_worker import add_node_worker_command
from dpfpl_app.service.service_cli import add_service_commands
from dpfpl_app.service.sweep_cli import add_sweep_command


def _build_backbone(args: argparse.Namespace) -> int:
    from dpfpl_app.backbones.backbone_build import ensure_backbone

    print(ensure_backbone(args.name))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from dpfpl_app.federation.results import load_results, run_failed, summary_table

    doc = load_results(Path(args.run_dir))
    print(summary_table(doc))
    return 1 if run_failed(doc) else 0


def _check_config(args: argparse.Namespace) -> int:
    """Validate pyproject's run config with ``--run-config``-style overrides, key by key.

    ``flwr run`` refuses an unknown key with a bare "Invalid run configuration." that
    names no key; this names it, lists the known ones, and checks every value too.
    """
    import tomli  # a Flower dependency; tomllib needs Python 3.11
    from flwr.common.config import parse_config_args  # Flower's own --run-config parser

    from dpfpl_app.config import RunConfig

    pyproject = Path(args.app_dir).resolve() / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject} does not exist: pass the app directory as --app-dir")
    shipped = tomli.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    overrides = parse_config_args([args.run_config] if args.run_config else None)
    cfg = RunConfig.from_flower({**shipped, **overrides})
    print(f"run config OK ({len(overrides)} override(s)): method={cfg.method.value} "
          f"dp-mode={cfg.dp_mode.value} aggregation={cfg.aggregation.value} model={cfg.model} "
          f"dataset={cfg.dataset}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from dpfpl_app.privacy import accounting

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
    parser = argparse.ArgumentParser(prog="dpfpl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-backbone", help="pretrain (once) and cache an offline backbone")
    p.add_argument(
        "name",
        nargs="?",
        default="dpfpl-tiny-digits",
        help="offline backbone to build into $DPFPL_CACHE/backbones (default: %(default)s; "
        "others: dpfpl-tiny-digits-fashion, random-plumbing-clip)",
    )
    p.set_defaults(func=_build_backbone)

    p = sub.add_parser(
        "summary", help="print a run's per-round table and summary (exit 1 if it failed)"
    )
    p.add_argument("run_dir", help="a run's output directory (holds results.json)")
    p.set_defaults(func=_summary)

    p = sub.add_parser(
        "check-config", help="validate a --run-config before `flwr run` (names any bad key)"
    )
    p.add_argument(
        "run_config",
        nargs="?",
        default="",
        help="what you would pass to flwr run --run-config: \"key=value ...\" or a .toml file",
    )
    p.add_argument("--app-dir", default=".", help="the Flower app's directory (default: cwd)")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("calibrate", help="noise multiplier for a target (epsilon, delta)")
    p.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    p.add_argument("--delta", type=float, default=1e-5, help="target delta (default %(default)g)")
    p.add_argument("--sample-rate", type=float, required=True, help="q = B / |D_i|")
    p.add_argument("--steps", type=int, required=True, help="noisy steps (rounds x local steps)")
    p.add_argument(
        "--accountant",
        choices=[k.value for k in Accountant],
        default="rdp",
        help="opacus accountant (default %(default)s)",
    )
    p.set_defaults(func=_calibrate)

    add_service_commands(sub)
    add_sweep_command(sub)
    add_audit_command(sub)
    add_node_worker_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: an imported library may already have configured the root logger at WARNING
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"dpfpl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
