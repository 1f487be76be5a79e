"""Equal-budget learning-rate search per method on a validation split (never the test set).

Every method gets the same grid (``--lrs``; lr-local = lr-global = lr, the rest as in
pyproject and ``--set``), the same rounds and the same seed; each run evaluates on
``holdout = "validation"``, a per-class split of the training pool
(``federated_data.validation_data``). The criterion is the validation harmonic mean of
local and neighbour accuracy (a class prior cannot win it). Local-only CoOp, the "does
federation help at all?" reference, runs at the same epsilon as the federated methods.
The runs are ``dpfpl sweep`` cells, real ``flwr run`` simulations, one sweep directory
per rate under ``--out`` (resumable, ``--parallel`` cells side by side).

    python benchmarks/tune_lr.py --dataset font-glyphs --lrs 0.1,0.03,0.3 \
        --set model=dpfpl-tiny-glyphs --set max-sample-rate=0.06 \
        --out benchmarks/results/tune-glyphs --parallel 2

It writes ``search.md`` (every run's validation figures), ``search.json`` and
``method-config.toml`` (the choices, as ``dpfpl sweep --method-config`` reads them).
(The styled-digits search of 2026-12-01 in ``results/tune-styled-digits`` predates both
rules: it chose by local accuracy and tuned local CoOp without DP.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfpl_app.config import Method  # noqa: E402
from dpfpl_app.federation.results import LAST_ROUNDS  # noqa: E402
from dpfpl_app.service.sweep import run_sweep  # noqa: E402
from dpfpl_app.service.sweep_cli import parse_override  # noqa: E402
from dpfpl_app.service.sweep_grid import (  # noqa: E402
    SHARED_METHODS,
    SPEC_FILE,
    SweepSpec,
    cell_result,
)

REPO = Path(__file__).resolve().parents[1]
MEASURED = {name: f"val-last{LAST_ROUNDS}-{name}-acc"
            for name in ("harmonic", "local", "neighbour")}
CRITERION = MEASURED["harmonic"]


def specs(args: argparse.Namespace, lr: float) -> dict[str, SweepSpec]:
    """The sweep of one rate, by directory name: every method at ``--epsilon``."""
    overrides = {**dict(args.set), "holdout": "validation", "num-server-rounds": args.rounds,
                 "lr-local": lr, "lr-global": lr}
    return {f"lr-{lr:g}": SweepSpec(
        dataset=args.dataset, methods=tuple(args.methods), epsilons=(args.epsilon,),
        seeds=(args.seed,), clients=args.clients, references=False, overrides=overrides)}


def rows_of(spec: SweepSpec, out_dir: Path, lr: float) -> list[dict[str, object]]:
    """One row per cell that counts (every round, every client): its validation figures."""
    rows = []
    for cell in spec.cells():
        doc = cell_result(out_dir, cell, spec.clients)
        if doc is None:
            continue
        summary = doc["summary"]
        rows.append({
            "method": cell.method.value, "lr": lr, "epsilon": str(cell.epsilon),
            **{key: summary.get(f"last{LAST_ROUNDS}-{name}-acc")
               for name, key in MEASURED.items()},
            "val-zeroshot": doc.get("zeroshot"),
            "cell": f"{out_dir.name}/runs/{cell.name}",
        })
    return rows


def searched(args: argparse.Namespace) -> tuple[list[dict[str, object]], list[float]]:
    """Every run under ``--out``, this invocation's and earlier ones', and their rates.

    A grid is widened by a later invocation (another rate for some methods); a directory
    whose settings other than its methods differ from these arguments is refused.
    """
    every_method = argparse.Namespace(**{**vars(args), "methods": tuple(Method)})
    rows, lrs = [], set()
    for path in sorted(args.out.resolve().glob("lr-*/" + SPEC_FILE)):
        spec = SweepSpec.model_validate_json(path.read_text())
        lr = float(spec.overrides["lr-local"])
        expected = specs(every_method, lr).get(path.parent.name)
        if expected is None or spec.model_dump(exclude={"methods"}) != expected.model_dump(
            exclude={"methods"}
        ):
            raise SystemExit(f"{path.parent} holds a search with other settings than "
                             "these arguments; use another --out")
        rows += rows_of(spec, path.parent, lr)
        lrs.add(lr)
    return rows, sorted(lrs)


def best(rows: list[dict[str, object]]) -> dict[str, float]:
    """Each method's rate with the highest validation harmonic mean (ties: the lower)."""
    chosen: dict[str, tuple[float, float]] = {}
    for r in sorted(rows, key=lambda r: float(r["lr"])):  # type: ignore[arg-type]
        score = float(r[CRITERION])  # type: ignore[arg-type]
        method = str(r["method"])
        if method not in chosen or score > chosen[method][1]:
            chosen[method] = (float(r["lr"]), score)  # type: ignore[arg-type]
    return {m: lr for m, (lr, _) in chosen.items()}


def markdown(rows: list[dict[str, object]], lrs: list[float], meta: str) -> str:
    chosen = best(rows)
    index = {(r["method"], r["lr"]): r for r in rows}
    lines = ["# Learning-rate search on a validation split", "", meta, "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for method in dict.fromkeys(str(r["method"]) for r in rows):
        cells = []
        for lr in lrs:
            r = index.get((method, lr))
            cells.append("-" if r is None else " / ".join(
                f"{100 * float(r[key]):.1f}" for key in MEASURED.values()))  # type: ignore[arg-type]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen[method]:g} |")
    zeroshot = next((r["val-zeroshot"] for r in rows if r.get("val-zeroshot")), None)
    if isinstance(zeroshot, dict):
        lines += ["", "Zero-shot on the same validation images: " + " / ".join(
            f"{100 * zeroshot[f'{name}-acc']:.1f}" for name in MEASURED) + "."]
    return "\n".join(lines) + "\n"


def method_config(chosen: dict[str, float], meta: str) -> str:
    """The choices as ``dpfpl sweep --method-config`` reads them: a table per method."""
    lines = [f"# {line}" for line in textwrap.wrap(meta, 88)]
    for method, lr in chosen.items():
        lines += ["", f"[{method}]", f"lr-local = {lr!r}", f"lr-global = {lr!r}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="styled-digits")
    parser.add_argument("--methods", type=lambda t: tuple(Method(m) for m in t.split(",")),
                        default=(*SHARED_METHODS, Method.LOCAL))
    parser.add_argument("--lrs", type=lambda t: [float(x) for x in t.split(",")],
                        default=[0.003, 0.01, 0.03])
    parser.add_argument("--epsilon", type=float, default=4.0,
                        help="composed per-sample epsilon of the DP methods")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE", help="a run-config value for every run")
    parser.add_argument("--parallel", type=int, default=1, help="cells side by side")
    parser.add_argument("--out", type=Path, required=True, help="directory of the sweeps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the sweeps' progress
    started, failed = time.monotonic(), []
    for lr in args.lrs:
        for name, spec in specs(args, lr).items():
            failed += run_sweep(spec, args.out.resolve() / name, app_dir=REPO,
                                parallel=args.parallel)
    rows, lrs = searched(args)
    meta = (
        f"Written by `python benchmarks/tune_lr.py` on {time.strftime('%Y-%m-%d')}: "
        f"{args.dataset}, {args.clients} clients, {args.rounds} rounds, seed {args.seed}, "
        f"holdout = validation (a split of the training pool; no test image is seen). "
        f"Every method, local-only CoOp included, at per-sample epsilon {args.epsilon:g}. "
        f"Validation accuracy (%), mean over the last {LAST_ROUNDS} rounds, harmonic / "
        f"local / neighbour; chosen: the highest harmonic mean. "
        f"{len(rows)} runs; this invocation took {(time.monotonic() - started) / 60:.0f} min."
    )
    (args.out / "search.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "chosen": best(rows), "failed": [c.name for c in failed]},
        indent=1))
    (args.out / "search.md").write_text(markdown(rows, lrs, meta))
    (args.out / "method-config.toml").write_text(method_config(best(rows), meta))
    print((args.out / "search.md").read_text())
    if failed:
        sys.exit(f"{len(failed)} runs failed: {', '.join(c.name for c in failed)}; rerun")


if __name__ == "__main__":
    main()
