"""``dpfpl sweep``: the experiment grid from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import tomllib

from dpfpl_app.config import DPMode, Method
from dpfpl_app.service.sweep import run_sweep
from dpfpl_app.service.sweep_grid import SHARED_METHODS, SweepSpec

logger = logging.getLogger(__name__)


def _list(kind: type) -> Any:
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def parse_override(text: str) -> tuple[str, int | float | bool | str]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    value: int | float | bool | str = raw
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key, value


def method_config(path: str) -> dict[Method, dict[str, int | float | bool | str]]:
    """Per-method run-config values from a TOML file of one table per method.

    ``[dpfpl]`` then ``lr-local = 0.01`` sets DP-FPL's cells only (the file of a
    per-method learning-rate search, for instance); a table that names no method, or a
    value that is a table or a list, is refused with the file and the name.
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err}") from None
    out: dict[Method, dict[str, int | float | bool | str]] = {}
    for name, table in doc.items():
        try:
            method = Method(name)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{path}: [{name}] is no method; tables are named after methods "
                f"({', '.join(m.value for m in Method)})"
            ) from None
        if not isinstance(table, dict) or not all(
            isinstance(v, (int, float, bool, str)) for v in table.values()
        ):
            raise argparse.ArgumentTypeError(
                f"{path}: [{name}] must hold run-config keys with scalar values"
            )
        out[method] = dict(table)
    return out


def _sweep(args: argparse.Namespace) -> int:
    spec = SweepSpec(
        dataset=args.dataset,
        methods=args.methods,
        epsilons=args.epsilons,
        seeds=args.seeds,
        ranks=args.ranks,
        ablation_epsilon=args.ablation_epsilon,
        references=not args.no_references,
        dp_mode=DPMode(args.dp_mode),
        clients=args.clients,
        overrides=dict(args.set or []),
        method_overrides=args.method_config or {},
    )
    # resolved against the caller's cwd now: the runs execute with cwd=app_dir
    app_dir, out = Path(args.app_dir).resolve(), Path(args.out).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{app_dir} holds no pyproject.toml: run `dpfpl sweep` from the dpfpl "
            "project directory (the Flower app) or pass --app-dir"
        )
    failed = run_sweep(spec, out, app_dir=app_dir, timeout_s=args.timeout,
                       parallel=args.parallel, retries=args.retries)
    print((out / "table.md").read_text())
    if failed:
        logger.error("%d cells failed: %s (rerun the same command to retry them)",
                     len(failed), ", ".join(c.name for c in failed))
        return 1
    return 0


def add_sweep_command(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of Flower simulations and write the paper-style tables"
    )
    p.add_argument("--out", required=True, help="sweep directory (resumable; relative to cwd)")
    p.add_argument("--dataset", default="digits", help="run-config dataset of every cell")
    p.add_argument(
        "--methods", type=_list(Method), default=SHARED_METHODS,
        help="comma-separated, e.g. promptfl,fedotp,fedpgp,dplora,dpfpl (and secfpp)",
    )
    p.add_argument("--epsilons", type=_list(float), default=(1.0, 4.0, float("inf")),
                   help="composed targets of both channels, comma-separated; inf = no DP")
    p.add_argument("--seeds", type=_list(int), default=(0,), help="comma-separated seeds")
    p.add_argument("--ranks", type=_list(int), default=(8,),
                   help="first = main grid; more = DP-FPL vs DP-LoRA rank ablation")
    p.add_argument("--ablation-epsilon", type=float, default=None,
                   help="epsilon of the rank ablation (default: the first of --epsilons)")
    p.add_argument("--no-references", action="store_true", help="skip zero-shot / local CoOp")
    p.add_argument("--dp-mode", choices=["per-sample", "paper"], default="per-sample",
                   help="DP mode of every private cell")
    p.add_argument("--clients", type=int, default=10, help="simulated SuperNodes per cell")
    p.add_argument("--set", type=parse_override, action="append", metavar="KEY=VALUE",
                   help="any run-config key for every cell, e.g. --set num-server-rounds=20")
    p.add_argument(
        "--method-config", type=method_config, default=None, metavar="TOML",
        help="per-method run-config values: one table per method, e.g. [fedotp] lr-local = "
        "0.03 (over --set)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    p.add_argument("--retries", type=int, default=1, metavar="N",
                   help="extra attempts of a failed cell within this invocation (0: none)")
    p.add_argument(
        "--parallel", type=int, default=1, metavar="N",
        help="cells run side by side, each on its own local SuperLink (2 uses both cores "
        "of a 2-core machine)",
    )
    p.add_argument("--app-dir", default=".",
                   help="the Flower app's directory (this project; relative to cwd)")
    p.set_defaults(func=_sweep)
