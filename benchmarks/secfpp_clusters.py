"""How well SecFPP's secure clustering recovered the true domains, per sweep cell.

The server of a SecFPP run knows the centroids (``results.json``: ``summary.clusters``)
but not who is in which cluster. The experimenter, who holds every simulated node's
state directory, can: this script reads each client's released (noised) summary from
its private state (``secfpp.released-summary``, drawn once by the node), assigns it
to the nearest recorded centroid (the client's own rule) and scores the assignment
against the true domains with the adjusted Rand index (1 = the domains exactly,
0 = chance), at the run's own noise draw. Writes ``clusters.md`` and ``clusters.json``
into the sweep.

    python benchmarks/secfpp_clusters.py /work/sweeps/secfpp-domains
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from sklearn.metrics import adjusted_rand_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.cache import cache_root  # noqa: E402
from dpfpl_app.config import RunConfig  # noqa: E402
from dpfpl_app.data.image_styles import STYLED_DATASETS  # noqa: E402
from dpfpl_app.federation.domain_wire import own_cluster  # noqa: E402
from dpfpl_app.federation.node_paths import partition_subdir  # noqa: E402
from dpfpl_app.method import domain_clusters  # noqa: E402
from dpfpl_app.method.client_trainer import SUMMARY_KEY  # noqa: E402


def cell_clusters(doc: dict[str, Any]) -> dict[str, Any]:
    """The cell's chosen k, cluster sizes and ARI against the true domains."""
    cfg = RunConfig.from_flower(doc["config"])
    styled = STYLED_DATASETS[cfg.dataset]
    centroids = np.asarray(doc["summary"]["clusters"]["centroids"])
    found, truth = [], []
    for pid in range(cfg.min_nodes):
        root = Path(cfg.state_dir) if cfg.state_dir else cache_root() / "state"
        state = root / partition_subdir(cfg.run_name, 0, pid)
        released = load_file(str(state / "private.safetensors"))[SUMMARY_KEY]
        found.append(own_cluster(domain_clusters.point(released), centroids))
        truth.append(styled.styles.index(styled.style_of(pid)))
    return {
        "k": len(centroids),
        "sizes": doc["summary"]["clusters"]["counts"],
        "ari": float(adjusted_rand_score(truth, found)),
        "summary-noise-multiplier": doc["summary"].get("privacy", {}).get(
            "noise-multiplier-summary", 0.0),
        "secure_sums": doc["summary"]["clusters"]["secure_sums"],
        "clustering_s": doc["summary"]["clusters"]["seconds"],
        "assignment": found,
        "domains": truth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="a `dpfpl sweep --methods ...,secfpp` directory")
    args = parser.parse_args()
    rows = {}
    for path in sorted((args.sweep / "runs").glob("secfpp-*/results.json")):
        doc = json.loads(path.read_text())
        if doc.get("status") == "completed":
            rows[path.parent.name] = cell_clusters(doc)
    if not rows:
        raise SystemExit(f"{args.sweep} holds no completed secfpp cell")
    lines = [
        "| cell | summary noise | k chosen | cluster sizes | ARI vs true domains | secure sums "
        "| clustering (s) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['summary-noise-multiplier']:g} | {r['k']} | {r['sizes']} "
                     f"| {r['ari']:.2f} | {r['secure_sums']} | {r['clustering_s']:.1f} |")
    aris = [r["ari"] for r in rows.values()]
    lines.append(f"\nARI mean {statistics.fmean(aris):.2f} over {len(aris)} cells "
                 f"(min {min(aris):.2f}).")
    (args.sweep / "clusters.md").write_text("\n".join(lines) + "\n")
    (args.sweep / "clusters.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
