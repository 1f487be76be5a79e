"""Secure vs plain aggregation in real Flower runs: round time, messages and bytes.

Three settings, each run once per mode (``aggregation = plain`` and ``secure``) with the
same run config (the main job's DP-FPL, per-sample DP at epsilon 4, digits, iid
partitions so that 100 clients all have images):

* ``sim-10`` and ``sim-100``: ``flwr run`` on a private local SuperLink
  (``LocalFlower``, the sweep's runner) with 10 and 100 simulated SuperNodes;
* ``deploy-3``: the topology of docs/deployment.md as real processes on loopback: a
  SuperLink with TLS and SuperNode authentication, 3 SuperNodes with their own keys
  (the deployment tests' harness, ``tests/deploy_processes.py``), with Flower's
  defaults: every message starts a fresh ClientApp process that imports torch and loads
  the model, which is what the per-stage times show;
* ``deploy-3-worker``: the same with ``node-worker=true`` (each node's long-lived worker
  answers) and the SuperExec polling every 0.2 s;
* ``deploy-3-forked``: the same again with ``--isolation process`` and ``dpfpl-superexec``
  beside each SuperNode (each message's ClientApp forked from a process that imported
  Flower once), as docs/deployment.md recommends.

Round time is read from the server's ``results.json`` (``elapsed-s`` per round; round 1
pays start-up and feature caching, so the figure is the median of the later rounds).
A round is train + evaluate. Messages per client per round: plain 1 train + 1 evaluate;
secure 5 stages + 1 evaluate. Upload bytes per client per round are what the server
received (``bytes-received`` / ``secagg-bytes-received`` over the sampled clients);
download sizes of the key exchange are in ``bench_secagg.py``'s pure-protocol table.
Secure rounds also report each stage's wall time as the server saw it.

Usage::

    python benchmarks/bench_rounds.py                    # all four; ~30 min on 2 idle cores
    python benchmarks/bench_rounds.py --settings sim-10  # one setting
Writes ``benchmarks/results/rounds.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the deployment tests' process harness

from dpfpl_app.backbones.backbone_build import ensure_backbone  # noqa: E402
from dpfpl_app.cache import CACHE_ENV  # noqa: E402
from dpfpl_app.federation.flwr_local import LocalFlower, toml_value  # noqa: E402
from dpfpl_app.federation.message_timing import read_line  # noqa: E402
from dpfpl_app.secagg import Stage  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODES = ("plain", "secure")
STAGES = Stage.ORDER  # an unsigned round (simulation) has no consistency stage
SETTINGS = {
    "sim-10": 10, "sim-100": 100, "deploy-3": 3, "deploy-3-worker": 3, "deploy-3-forked": 3
}  # fmt: skip


def run_config(nodes: int, rounds: int, out: Path, name: str, mode: str) -> dict[str, Any]:
    return {
        "aggregation": mode,
        "dataset": "digits",
        "partitioner": "iid",
        "num-server-rounds": rounds,
        "min-nodes": nodes,
        "node-wait-timeout": 300,
        "output-dir": str(out),
        "run-name": name,
        "state-dir": str(out / "state"),
    }


def summarise(results: Path, mode: str, nodes: int) -> dict[str, Any]:
    """Round times and traffic of one finished run, from its results.json."""
    doc = json.loads(results.read_text())
    if doc["status"] != "completed":
        raise RuntimeError(f"{results}: run {doc['status']}: {doc.get('reason', '')}")
    rows = doc["rounds"]
    elapsed = [row["elapsed-s"] for row in rows]
    times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    upload = "secagg-bytes-received" if mode == "secure" else "bytes-received"
    later = rows[1:]
    out: dict[str, Any] = {
        "mode": mode,
        "nodes": nodes,
        "rounds": len(rows),
        "round-1-s": elapsed[0],
        "round-s": statistics.median(times),
        "round-s-all": [round(t, 2) for t in times],
        # plain: train + evaluate; secure: the training round's stages, and as many for
        # the secure evaluation (a first attempt)
        "messages-per-client": 2 * len(_stages(later[0])) if mode == "secure" else 2,
        "upload-kib-per-client": statistics.median(r[upload] for r in later) / nodes / 1024,
        "epsilon": rows[-1]["epsilon"],
        "local-acc": rows[-1]["local-acc"],
    }
    if mode == "secure":
        out["stage-s"] = {
            s: statistics.median(r[f"{s}-s"] for r in later) for s in _stages(later[0])
        }
        out["survivors"] = [r["survivors"] for r in rows]
    return out


def _stages(row: dict[str, Any]) -> list[str]:
    """The secure stages a round ran (its ``<stage>-s`` metrics)."""
    return [s for s in STAGES if f"{s}-s" in row]


def simulate(nodes: int, rounds: int, work: Path) -> list[dict[str, Any]]:
    out = []
    with LocalFlower(ROOT, work / "flwr-home") as flower:
        for mode in MODES:
            name = f"sim-{nodes}-{mode}"
            started = time.monotonic()
            print(f"[{name}] {nodes} simulated clients, {rounds} rounds ...", flush=True)
            run_id, status = flower.run(
                run_config(nodes, rounds, work / "runs", name, mode),
                num_supernodes=nodes,
                timeout_s=3600,
            )
            if status != "finished:completed":
                raise RuntimeError(f"run {run_id} {status}:\n{flower.log(run_id)[-3000:]}")
            out.append(summarise(work / "runs" / name / "results.json", mode, nodes))
            print(f"[{name}] done in {time.monotonic() - started:.0f} s", flush=True)
    return out


def deploy(rounds: int, work: Path, setting: str) -> list[dict[str, Any]]:
    """3 SuperNodes on loopback, configured as ``setting`` says (see the module's help)."""
    from deploy_processes import Federation, wait_until

    nodes = SETTINGS[setting]
    worker = setting != "deploy-3"
    fed = Federation(work / setting, nodes)
    if not worker:
        fed.supernode_env = {}
    out = []
    try:
        for node in fed.nodes:
            node.worker = worker
            node.forked = setting == "deploy-3-forked"
        fed.make_credentials(extra_keys=[])
        fed.start_superlink()
        for node in fed.nodes:
            fed.register(node)
            fed.start_supernode(node)
        expected = {node.node_id for node in fed.nodes}
        wait_until(lambda: fed.online_node_ids() == expected, 120, "3 SuperNodes online")
        roots = [node.root for node in fed.nodes]
        for mode in MODES:
            name = f"{setting}-{mode}"
            print(f"[{name}] 3 SuperNodes (TLS, node auth), {rounds} rounds ...", flush=True)
            config = run_config(nodes, rounds, fed.runs, name, mode)
            config.pop("state-dir")  # each SuperNode has its own (node config)
            before = len(timing_lines(roots))
            overrides = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
            run_id = fed.submit(fed.app, overrides)
            info = fed.wait_finished(run_id, 3600)
            if info.get("status") != "finished:completed":
                raise RuntimeError(f"run {run_id}: {info}")
            row = summarise(fed.runs / name / "results.json", mode, nodes)
            row["message-parts"] = message_parts(timing_lines(roots)[before:])
            out.append(row)
    finally:
        fed.close()
    return out


def timing_lines(node_roots: list[Path]) -> list[tuple[str, dict[str, float]]]:
    """Every ``message timing`` line the nodes' ClientApps logged so far (into their
    SuperNode's log, or with ``--isolation process`` their SuperExec's).
    """
    lines = []
    for root in node_roots:
        for log in sorted([*root.glob("supernode-*.log"), *root.glob("superexec-*.log")]):
            lines += [t for t in map(read_line, log.read_text().splitlines()) if t]
    return lines


def message_parts(lines: list[tuple[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median seconds of each part of a message, per message kind.

    One line per train/evaluate message (``federation/message_timing.py``), e.g.
    ``message timing (train): process start and imports 5.91 s, compute 0.30 s``.
    """
    seen: dict[str, dict[str, list[float]]] = {}
    for kind, parts in lines:
        for name, seconds in parts.items():
            seen.setdefault(kind, {}).setdefault(name, []).append(seconds)
    return {kind: {k: statistics.median(v) for k, v in ps.items()} for kind, ps in seen.items()}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Secure vs plain aggregation: whole rounds in real Flower runs",
        "",
        f"Written by `python benchmarks/bench_rounds.py` on {meta['date']}, {meta['machine']}, "
        f"load average {meta['load-before']:.1f} before / {meta['load-after']:.1f} after. "
        "DP-FPL, per-sample DP, epsilon 4, digits (iid), tiny offline backbone. "
        "A round = train + evaluate; its time is the median over rounds 2..T "
        "(round 1 includes start-up).",
        "",
        "| setting | mode | round s | secure / plain | round 1 s | messages / client "
        "| upload KiB / client | epsilon | local acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain = {r["setting"]: r["round-s"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        ratio = r["round-s"] / plain[r["setting"]] if r["setting"] in plain else float("nan")
        lines.append(
            f"| {r['setting']} | {r['mode']} | {r['round-s']:.1f} | "
            f"{ratio:.2f} | {r['round-1-s']:.1f} | {r['messages-per-client']} | "
            f"{r['upload-kib-per-client']:.1f} | {r['epsilon']:.2f} | {r['local-acc']:.3f} |"
        )
    lines += [
        "",
        "Secure rounds, wall time of each stage as the server saw it (median over rounds "
        "2..T; in a deployment each is one fresh ClientApp process per node):",
        "",
        "| setting | " + " | ".join(STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for r in rows:
        if r["mode"] == "secure":
            cells = " | ".join(
                f"{r['stage-s'][s]:.1f}" if s in r["stage-s"] else "-" for s in STAGES
            )
            lines.append(f"| {r['setting']} | {cells} |")
    lines += [
        "",
        "Deployment messages, where a node's time goes (median seconds per part over all "
        "rounds, from the `message timing` line each ClientApp logs; with the node worker, "
        "the ClientApp process's line and the worker's own):",
        "",
        "| setting | mode | message | parts (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        for kind, parts in sorted(r.get("message-parts", {}).items()):
            cell = "; ".join(f"{name} {seconds:.2f}" for name, seconds in parts.items())
            lines.append(f"| {r['setting']} | {r['mode']} | {kind} | {cell} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=",".join(SETTINGS))
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of rounds.{md,json}")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(chosen) - set(SETTINGS)
    if unknown or args.rounds < 2:
        parser.error(f"unknown settings {sorted(unknown)} or --rounds < 2")
    os.environ.setdefault(CACHE_ENV, str(ROOT / ".cache" / "dpfpl"))
    ensure_backbone("dpfpl-tiny-digits")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load-before": os.getloadavg()[0],
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as tmp:
        for setting in chosen:
            run: Callable[[], list[dict[str, Any]]] = (
                (lambda s=setting: deploy(args.rounds, Path(tmp), s))
                if setting.startswith("deploy")
                else (lambda s=setting: simulate(SETTINGS[s], args.rounds, Path(tmp) / s))
            )
            rows += [{"setting": setting, **row} for row in run()]
    meta["load-after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rounds.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "rounds.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
