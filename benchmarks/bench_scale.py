"""Many simulated clients per round: framework overhead against compute, and memory.

``flwr run`` on a private local SuperLink (``LocalFlower``, the sweep's runner) with N
simulated SuperNodes, all of them (or ``--fraction`` of them, with ``min-nodes`` set to
that many) sampled every round: the main job's DP-FPL, per-sample
DP at epsilon 4, plain aggregation, Fashion-MNIST split IID (1000 clients get ~49
training images each, where digits' 754 images could not feed them), tiny offline
backbone, Flower's default client resources.

What is measured, per N:

* **round time**: the server's ``elapsed-s`` per round from ``results.json``, the median
  of rounds 2..T (round 1 also fills the feature cache and starts the actors);
* **handler time**: every train and evaluate message logs its parts
  (``federation/message_timing.py``: model and features, compute, state saved); the
  parts of the messages of rounds 2..T are summed from the run's log;
* **overhead** = round time / compute - 1: everything a round costs beyond the clients'
  own training and evaluation (Flower's message passing, Ray, the ServerApp, our
  restore and save); **wall share** = (round time - compute) / round time, the same
  cost as a share of the round (the issue's figure: below 10% at 100, 20% at 1000).
  With Flower's default of 2 CPUs per client this machine runs one actor, so the
  messages' compute adds up serially. Compute is wall time inside the actor, so CPU
  that other processes take from it (Flower's engine, below) inflates compute and
  hides from this ratio: compare compute per message across N too;
* **CPU by process** over the whole run: the actors, Flower's simulation engine (which
  also runs the ServerApp), the SuperLink, and the rest (Ray, the ``flwr`` CLI polls);
* **memory**: the peak, sampled every second, of the summed RSS of the run's processes
  (every process whose environment names this run's ``FLWR_HOME``: the SuperLink, the
  ServerApp, Ray and its actors) and of the actors alone; and **state per client**, the
  bytes of each client's private state on disk (``state-dir``) after the run, the only
  memory a simulated client holds between its messages.
* **message window**: the ServerApp's ``message-window`` (``off``: every message of an
  exchange pushed at once, as Flower does; a number or ``auto``: at most that many in
  flight, ``federation/polling_grid.py``).

Usage::

    python benchmarks/bench_scale.py                       # 100 and 1000 clients, 3 rounds
    python benchmarks/bench_scale.py --clients 100 --rounds 2
    python benchmarks/bench_scale.py --clients 1000 --fraction 0.1   # 100 sampled per round
    python benchmarks/bench_scale.py --clients 100 --windows off,auto --name scale-window
Writes ``benchmarks/results/scale.{json,md}`` (``scale-fraction-F.{json,md}`` with
``--fraction F`` below 1, ``NAME.{json,md}`` with ``--name``); with ``--append`` the new
rows are added to that file's rows (one client count per invocation on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpfpl_app.backbones.backbone_build import ensure_backbone  # noqa: E402
from dpfpl_app.cache import CACHE_ENV  # noqa: E402
from dpfpl_app.federation.flwr_local import LocalFlower  # noqa: E402
from dpfpl_app.federation.message_timing import read_line  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
HANDLER_PARTS = ("model and features", "compute", "state saved")


class MemorySampler:
    """Peak summed RSS of the processes whose environment holds ``marker``, and the CPU
    seconds each kind of process used (``cpu_by_kind``, last sample of each process).
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.peak_total = self.peak_actors = 0
        self._cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            total = actors = 0
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if self.marker not in (proc / "environ").read_bytes():
                        continue
                    rss = int((proc / "statm").read_text().split()[1]) * PAGE
                    cmdline = (proc / "cmdline").read_bytes()
                    ticks = (proc / "stat").read_text().rsplit(")", 1)[1].split()[11:13]
                except (OSError, ValueError, IndexError):
                    continue  # ended, or not ours to read
                self._cpu[int(proc.name)] = (kind_of(cmdline), sum(map(int, ticks)) / TICK)
                total += rss
                actors += rss if b"ClientAppActor" in cmdline else 0
            self.peak_total = max(self.peak_total, total)
            self.peak_actors = max(self.peak_actors, actors)


    @property
    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, seconds in self._cpu.values():
            out[kind] = out.get(kind, 0.0) + seconds
        return out


def kind_of(cmdline: bytes) -> str:
    """Which part of a simulation a process is, from its command line."""
    for token, kind in (
        (b"ClientAppActor", "actors"),
        (b"flwr-simulation", "flower simulation engine + ServerApp"),
        (b"flower-superlink", "superlink"),
    ):
        if token in cmdline:
            return kind
    return "other (ray, flwr cli)"


def sampled(nodes: int, fraction: float) -> int:
    """Clients per round: the strategy samples max(fraction x nodes, min-nodes) of them."""
    return max(1, round(nodes * fraction))


def run_config(
    nodes: int, rounds: int, out: Path, dataset: str, fraction: float, window: str
) -> dict[str, Any]:
    return {
        "message-window": int(window) if window.isdigit() else window,
        "aggregation": "plain",
        "dataset": dataset,
        "partitioner": "iid",
        "num-server-rounds": rounds,
        "min-nodes": sampled(nodes, fraction),
        "fraction-train": fraction,
        "fraction-evaluate": fraction,
        "node-wait-timeout": 600,
        "output-dir": str(out),
        "run-name": f"scale-{nodes}",
        "state-dir": str(out / "state"),
    }


def handler_seconds(log: str, first_counted: int) -> dict[str, float]:
    """Summed parts of the ``message timing`` lines after the first ``first_counted``."""
    lines = [t for t in map(read_line, log.splitlines()) if t]
    sums = dict.fromkeys(HANDLER_PARTS, 0.0)
    for _kind, parts in lines[first_counted:]:
        for name in HANDLER_PARTS:
            sums[name] += parts.get(name, 0.0)
    sums["messages"] = float(len(lines) - first_counted)
    return sums


def state_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (the clients' private state)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def measure(
    nodes: int, rounds: int, work: Path, dataset: str, fraction: float, window: str
) -> dict[str, Any]:
    with LocalFlower(ROOT, work / "flwr-home") as flower, MemorySampler(
        f"FLWR_HOME={flower.flwr_home}"
    ) as memory:
        started = time.monotonic()
        load = os.getloadavg()[0]
        print(f"[{nodes} clients, window {window}] {rounds} rounds ...", flush=True)
        run_id, status = flower.run(
            run_config(nodes, rounds, work / "runs", dataset, fraction, window),
            num_supernodes=nodes, timeout_s=4 * 3600,
        )
        log = flower.log(run_id)
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} {status}:\n{log[-3000:]}")
    doc = json.loads((work / "runs" / f"scale-{nodes}" / "results.json").read_text())
    elapsed = [row["elapsed-s"] for row in doc["rounds"]]
    later = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    per_round = sampled(nodes, fraction)
    parts = handler_seconds(log, first_counted=2 * per_round)  # round 1: train + evaluate
    compute = parts["compute"]
    round_s = statistics.median(later)
    row = {
        "clients": nodes,
        "message-window": window,
        "sampled": per_round,
        "rounds": rounds,
        "round-1-s": elapsed[0],
        "round-s": round_s,
        "round-s-all": [round(t, 1) for t in later],
        "messages-counted": int(parts["messages"]),
        "compute-s-per-round": compute / (rounds - 1),
        "restore-s-per-round": parts["model and features"] / (rounds - 1),
        "save-s-per-round": parts["state saved"] / (rounds - 1),
        "overhead": sum(later) / compute - 1,
        "wall-share": 1 - compute / sum(later),
        "state-bytes-per-client": state_bytes(work / "runs" / "state") / nodes,
        "peak-rss-gib": memory.peak_total / 2**30,
        "peak-actor-rss-gib": memory.peak_actors / 2**30,
        "cpu-s": {k: round(v, 1) for k, v in memory.cpu_by_kind.items()},
        "local-acc": doc["rounds"][-1].get("local-acc"),
        "wall-s": time.monotonic() - started,
        "load-before": load,
        "load-after": os.getloadavg()[0],
    }
    print(f"[{nodes} clients, window {window}] {json.dumps(row)}", flush=True)
    return row


def _share(fraction: float) -> str:
    return "all clients" if fraction >= 1 else f"a fraction {fraction:g} of the clients"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Many simulated clients per round",
        "",
        f"Written by `python benchmarks/bench_scale.py` on {meta['date']}, {meta['machine']}, "
        f"load average {meta['load-before']:.1f} before / {meta['load-after']:.1f} after. "
        f"DP-FPL, per-sample DP, epsilon 4, plain aggregation, {meta['dataset']} (iid), tiny "
        f"offline backbone, {_share(meta.get('fraction', 1.0))} sampled per round, "
        "Flower's default client "
        "resources (one actor on 2 cores). Rounds 2..T: round = train + evaluate; compute = "
        "the clients' own training and evaluation, summed from their `message timing` lines; "
        "overhead = round / compute - 1; wall share = (round - compute) / round; window = "
        "the ServerApp's `message-window` (off: all messages of an exchange at once); state = "
        "a client's private state on disk; load = the 1-minute load average before / after "
        "the run (2 cores, shared with other jobs).",
        "",
        "| clients | sampled / round | window | round s | compute s | restore s | save s "
        "| overhead | wall share | s / sampled client | peak RSS, all (GiB) "
        "| peak RSS, actors (GiB) | state / client (KiB) | round 1 s | load |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        load = f"{r['load-before']:.1f} / {r['load-after']:.1f}" if "load-before" in r else ""
        state = r.get("state-bytes-per-client")
        lines.append(
            f"| {r['clients']} | {r.get('sampled', r['clients'])} | "
            f"{r.get('message-window', 'off')} | {r['round-s']:.1f} | "
            f"{r['compute-s-per-round']:.1f} | "
            f"{r['restore-s-per-round']:.1f} | {r['save-s-per-round']:.1f} | "
            f"{100 * r['overhead']:.1f}% | "
            f"{100 * r.get('wall-share', 1 - r['compute-s-per-round'] / r['round-s']):.1f}% | "
            f"{r['round-s'] / r.get('sampled', r['clients']):.3f} | "
            f"{r['peak-rss-gib']:.2f} | {r['peak-actor-rss-gib']:.2f} | "
            f"{'' if state is None else f'{state / 1024:.1f}'} | {r['round-1-s']:.0f} | {load} |"
        )
    lines += [
        "",
        "CPU seconds of the whole run (round 1 included) by process:",
        "",
        "| clients | window | " + " | ".join(CPU_KINDS) + " |",
        "|---:|---|" + "---:|" * len(CPU_KINDS),
    ]
    for r in rows:
        cells = " | ".join(f"{r['cpu-s'].get(kind, 0.0):.0f}" for kind in CPU_KINDS)
        lines.append(f"| {r['clients']} | {r.get('message-window', 'off')} | {cells} |")
    return "\n".join(lines) + "\n"


CPU_KINDS = ("actors", "flower simulation engine + ServerApp", "superlink", "other (ray, flwr cli)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="100,1000", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="share of the clients sampled per round"
    )
    parser.add_argument(
        "--windows", default="auto",
        help="comma-separated message-window settings, each measured at every client count "
        "(off | auto | a number)",
    )
    parser.add_argument("--name", default="", help="result file name (default: scale...)")
    parser.add_argument(
        "--append", action="store_true", help="add the rows to those of the existing file"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of scale.{md,json}")
    args = parser.parse_args()
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.rounds < 2 or not counts or min(counts) < 1 or not 0 < args.fraction <= 1:
        parser.error("--rounds must be >= 2, --clients positive integers, --fraction in (0, 1]")
    os.environ.setdefault(CACHE_ENV, str(ROOT / ".cache" / "dpfpl"))
    ensure_backbone("dpfpl-tiny-digits")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load-before": os.getloadavg()[0],
        "dataset": args.dataset,
        "fraction": args.fraction,
    }
    name = args.name or (
        "scale" if args.fraction == 1.0 else f"scale-fraction-{args.fraction:g}"
    )
    path = args.out / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if args.append and path.exists() else []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in counts:
            for window in windows:
                work = Path(tmp) / f"n{n}-{window}"
                rows.append(measure(n, args.rounds, work, args.dataset, args.fraction, window))
    meta["load-after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / f"{name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
