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


def _budget(args: argparse.Namespace) -> int:
    """Print every ledger under a state root (``privacy.budget``)."""
    from dpfpl_app.cache import cache_root
    from dpfpl_app.privacy.budget import LEDGER_DIR, ledger_report

    root = Path(args.state_dir).expanduser() if args.state_dir else cache_root() / "state"
    ledgers = sorted((root / LEDGER_DIR).glob("partition-*.json"))
    if not ledgers:
        print(f"no privacy ledger under {root / LEDGER_DIR}: no run has trained on this "
              "node's data with that state-dir")
        return 0
    print("\n\n".join(ledger_report(p, args.delta, args.budget) for p in ledgers))
    return 0


def _sample_rate(args: argparse.Namespace) -> int:
    """The declared rate that matches a node's data (``privacy.sample_rate``)."""
    from dpfpl_app.privacy.sample_rate import matching_rate

    if args.num_train is not None:
        rate = matching_rate(args.batch_size, args.num_train)
        print(f"{rate:.6g}  (batch-size {args.batch_size} / {args.num_train} training images)")
        print(f'start the SuperNode with --node-config "... sample-rate={rate:.6g}"; the run\'s '
              "max-sample-rate must be at least that")
        return 0
    from dpfpl_app.config import RunConfig
    from dpfpl_app.federation.node_rate import planned_sizes

    overrides = {"dataset": args.dataset, "partitioner": args.partitioner, "seed": args.seed,
                 "batch-size": args.batch_size, "dirichlet-alpha": args.dirichlet_alpha}
    cfg = RunConfig.from_flower(overrides)
    sizes = planned_sizes(cfg, args.num_partitions)
    rates = [matching_rate(args.batch_size, n) for n in sizes]
    print(f"{'partition':>9} {'train images':>12} {'rate':>10}")
    for pid, (n, rate) in enumerate(zip(sizes, rates, strict=True)):
        print(f"{pid:>9} {n:>12} {rate:>10.4g}")
    print(f"max {max(rates):.6g}: use max-sample-rate={max(rates):.6g} so the noise is sized "
          "for the rates the simulated nodes really use (each declares its own from this plan)")
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
        "others: dpfpl-tiny-glyphs, dpfpl-tiny-digits-fashion, random-plumbing-clip)",
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

    p = sub.add_parser(
        "budget", help="print this node's privacy ledger: every run's epsilon, the total, left"
    )
    p.add_argument("--state-dir", default="", help="the node's state root (default: the cache's)")
    p.add_argument("--delta", type=float, default=None,
                   help="delta of the epsilons (default: the node's privacy-budget-delta)")
    p.add_argument("--budget", type=float, default=None,
                   help="budget to compare with (default: the node's privacy-budget)")
    p.set_defaults(func=_budget)

    p = sub.add_parser(
        "sample-rate", help="the Poisson rate a node should declare (node config sample-rate)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="expected batch B (default 32)")
    p.add_argument("--num-train", type=int, default=None,
                   help="your node's number of training images: prints B / N")
    p.add_argument("--dataset", default="styled-digits", help="simulation: the public dataset")
    p.add_argument("--partitioner", default="pathological", help="simulation: its partitioner")
    p.add_argument("--dirichlet-alpha", type=float, default=0.3, help="simulation: Dirichlet beta")
    p.add_argument("--num-partitions", type=int, default=10, help="simulation: number of nodes")
    p.add_argument("--seed", type=int, default=0, help="simulation: the run's public seed")
    p.set_defaults(func=_sample_rate)

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
