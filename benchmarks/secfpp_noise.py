"""How well SecFPP's DP clustering recovers the true domains at a summary noise multiplier.

For each client of the benchmark (``domain-digits``, the clients' real features) this
script computes the per-image vectors exactly as its ClientApp does, releases the
summary as ``ClientTrainer.domain_point`` does (clip, divide by the public size B / q,
Gaussian noise from a secret stream, unit direction), runs the server's clustering
(``SecureClustering.run``) on the exact sums SecAgg+ would unmask, assigns every client
to its nearest centroid (the client's own rule) and scores the assignment against the
true domains with the adjusted Rand index. Repeated over fresh noise draws, per
multiplier; it also prints the composed epsilon of a SecFPP run at each multiplier.

    python benchmarks/secfpp_noise.py --noise 0,1,2,4,8 --trials 20

Writes ``benchmarks/results/secfpp-noise.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.cache import cache_root  # noqa: E402
from dpfpl_app.config import RunConfig  # noqa: E402
from dpfpl_app.data.features import FeatureCache  # noqa: E402
from dpfpl_app.data.federated_data import client_data  # noqa: E402
from dpfpl_app.data.image_styles import STYLED_DATASETS  # noqa: E402
from dpfpl_app.federation.client_node import cached_clip, class_names  # noqa: E402
from dpfpl_app.federation.domain_wire import own_cluster  # noqa: E402
from dpfpl_app.federation.secure_clustering import Clusters  # noqa: E402
from dpfpl_app.method import domain_clusters as dc  # noqa: E402
from dpfpl_app.method.client_trainer import ClientTrainer  # noqa: E402
from dpfpl_app.privacy.dp_channel import plan_for  # noqa: E402
from dpfpl_app.privacy.noise import NoiseSource  # noqa: E402
from tests.secfpp_replay import ExactSums  # noqa: E402


def noised_point(vectors: np.ndarray, cfg: RunConfig, size: float, z: float) -> np.ndarray:
    """A client's clustering point after one release at multiplier ``z`` (z = 0: none)."""
    mean = dc.clipped_mean(vectors, clip=cfg.summary_clip, size=size)
    normal = NoiseSource.secure().gaussian((mean.size,), std=1.0, dtype=torch.float64).numpy()
    released = dc.release(mean, normal, clip=cfg.summary_clip, size=size, noise_multiplier=z)
    return dc.point(released)


def client_vectors(cfg: RunConfig) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Every client's per-image vectors, its public size B / q, its true domain."""
    clip = cached_clip(cfg.model)
    cache = FeatureCache(cache_root() / "features")
    names = class_names(cfg)
    styled = STYLED_DATASETS[cfg.dataset]
    out: tuple[list[np.ndarray], list[float], list[int]] = ([], [], [])
    for pid in range(cfg.min_nodes):
        data = client_data(cfg, clip, cache, partition_id=pid, num_partitions=cfg.min_nodes)
        trainer = ClientTrainer(cfg, clip, names, data, partition_id=pid)
        out[0].append(dc.image_vectors(
            data.train_features[0].double().numpy(), data.train_labels.numpy(),
            trainer.template_text().double().numpy(), cfg.summary_dim, cfg.seed,
        ))
        out[1].append(cfg.batch_size / trainer.sample_rate)
        out[2].append(styled.styles.index(styled.style_of(pid)))
    return out


def trial(cfg: RunConfig, vectors: list[np.ndarray], sizes: list[float], truth: list[int],
          z: float) -> tuple[float, Clusters]:
    points = [noised_point(v, cfg, n, z) for v, n in zip(vectors, sizes, strict=True)]
    clusters = ExactSums(cfg, points).run()
    found = [own_cluster(p, clusters.centroids) for p in points]
    return float(adjusted_rand_score(truth, found)), clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", default="0,1,2,4,8", help="summary noise multipliers")
    parser.add_argument("--trials", type=int, default=20, help="noise draws per multiplier")
    parser.add_argument("--epsilon", type=float, default=4.0, help="the SecFPP run's target")
    parser.add_argument("--set", nargs="*", default=[], help="run-config overrides key=value")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    base = {"method": "secfpp", "dataset": "domain-digits", "min-nodes": 12,
            "dp-mode": "per-sample", "epsilon": args.epsilon, "num-server-rounds": 10,
            **{k: json.loads(v) if v[:1].isdigit() else v for k, v in overrides.items()}}
    cfg = RunConfig.from_flower(base)
    start = time.perf_counter()
    vectors, sizes, truth = client_vectors(cfg)
    norms = np.concatenate([np.linalg.norm(v, axis=1) for v in vectors])
    means = [float(np.linalg.norm(dc.clipped_mean(v, clip=cfg.summary_clip, size=n)))
             for v, n in zip(vectors, sizes, strict=True)]
    rows: dict[str, Any] = {}
    for z in (float(x) for x in args.noise.split(",")):
        runs = [trial(cfg, vectors, sizes, truth, z) for _ in range(args.trials)]
        aris = [a for a, _ in runs]
        ks = [c.k for _, c in runs]
        eps = math_eps(base, z) if z > 0 else None
        rows[f"{z:g}"] = {
            "ari-mean": statistics.fmean(aris), "ari-min": min(aris),
            "ari-1-share": sum(a == 1.0 for a in aris) / len(aris),
            "k": {str(k): ks.count(k) for k in sorted(set(ks))},
            "noise-std-over-mean-norm": (z * cfg.summary_clip / sizes[0]) / means[0],
            **(eps or {}),
        }
    doc = {
        "command": "python benchmarks/secfpp_noise.py " + " ".join(sys.argv[1:]),
        "config": {k: base[k] for k in base} | {"summary-clip": cfg.summary_clip,
                                                "summary-dim": cfg.summary_dim},
        "image-vector-norm-quantiles": {str(q): float(np.quantile(norms, q))
                                        for q in (0.1, 0.5, 0.9, 0.99, 1.0)},
        "clients": {"sizes-public": sizes, "images": [len(v) for v in vectors],
                    "clipped-mean-norms": means, "domains": truth},
        "trials": args.trials,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    lines = [f"`{doc['command']}` (summary-clip {cfg.summary_clip}, summary-dim "
             f"{cfg.summary_dim}, {cfg.min_nodes} clients, {args.trials} noise draws each)", "",
             "| summary-noise-multiplier | ARI mean | ARI min | share ARI = 1 | k chosen | "
             "epsilon of the summary alone | composed epsilon (target) | prompt z_step |",
             "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for z, r in rows.items():
        lines.append(
            f"| {z} | {r['ari-mean']:.3f} | {r['ari-min']:.2f} | {r['ari-1-share']:.2f} | "
            f"{r['k']} | {r.get('eps-summary-alone', float('nan')):.3f} | "
            f"{r.get('eps-composed', float('nan')):.3f} ({args.epsilon:g}) | "
            f"{r.get('z-step', float('nan')):.3f} |")
    out = REPO / "benchmarks" / "results" / "secfpp-noise"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: doc[k] for k in ("image-vector-norm-quantiles", "clients")}, indent=1))
    print("\n".join(lines))


def math_eps(base: dict[str, Any], z: float) -> dict[str, float]:
    """The SecFPP plan at summary multiplier ``z``: its epsilons and prompt multiplier."""
    plan = plan_for(RunConfig.from_flower({**base, "summary-noise-multiplier": z}))
    return {
        "eps-summary-alone": plan.components(plan.planned_steps)["eps-summary-alone"],
        "eps-composed": plan.epsilon(plan.planned_steps),
        "z-step": plan.z_step,
    }


if __name__ == "__main__":
    main()
