"""The main job's configuration run in-process, with overrides: the glyph results' runs.

Drives the real ServerApp and ClientApp through the tests' in-process grid
(``tests/flower_harness.py``: protobuf round trips of every message, no SuperLink), with
noise derived from the seed so that a rerun on the same machine gives the same figures.
``bash scripts/quickstart.sh`` runs the same configuration under Flower's simulation
engine with secret noise.

    python benchmarks/glyph_main_job.py --out /tmp/glyph-dpfpl
    python benchmarks/glyph_main_job.py --out /tmp/glyph-local --set '{"method": "local"}'
    python benchmarks/glyph_main_job.py --out /tmp/val --set '{"holdout": "validation",
        "lr-local": 0.01, "lr-global": 0.01}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import client_app  # noqa: E402
import server_app  # noqa: E402
from tests.flower_harness import federation_config, run_server_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for runs/ and state/")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--set", default="{}", help="JSON object of run-config overrides")
    args = parser.parse_args()
    main_job = tomllib.loads((REPO / "configs" / "main-job.toml").read_text())
    cfg = federation_config(Path(args.out), **{
        **main_job, "min-nodes": args.clients, "num-server-rounds": args.rounds,
        **json.loads(args.set)})
    started = time.perf_counter()
    run_server_app(server_app.app, client_app=client_app.app, num_nodes=args.clients,
                   run_config=cfg)
    results = Path(args.out) / "runs" / "t" / "results.json"
    summary = json.loads(results.read_text())["summary"]
    print(json.dumps({"wall-s": round(time.perf_counter() - started, 1), **{
        k: v for k, v in summary.items() if isinstance(v, int | float)}}, indent=1))
    print(f"results: {results}")


if __name__ == "__main__":
    main()
