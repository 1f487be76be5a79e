"""Linear-probe ceiling of a backbone's image features on a run's train/test split.

Prompt learning can only choose among directions the frozen features already separate;
a logistic regression trained centrally on every training image of every class (what no
client holds) shows how far that is. Same split (seed 0, test-fraction 0.3) and the same
cached features as the federated runs.

    python benchmarks/linear_probe.py --dataset digits --model dpfpl-tiny-digits
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.backbones.backbone import load_frozen_clip  # noqa: E402
from dpfpl_app.cache import cache_root  # noqa: E402
from dpfpl_app.data.data_sources import SourceSpec  # noqa: E402
from dpfpl_app.data.features import FeatureCache  # noqa: E402
from dpfpl_app.data.federated_data import load_federated_data  # noqa: E402


def linear_probe(dataset: str, model: str, *, seed: int = 0) -> dict[str, float | int | str]:
    clip = load_frozen_clip(model)
    data = load_federated_data(SourceSpec(dataset), test_fraction=0.3, seed=seed)
    cache = FeatureCache(cache_root() / "features")
    train = cache.features(clip, data.train, views=0, seed=seed)[0].numpy()
    test = cache.features(clip, data.test, views=0, seed=seed)[0].numpy()
    t0 = time.monotonic()
    probe = LogisticRegression(max_iter=3000, C=10.0).fit(train, data.train.labels)
    accuracy = float(np.mean(probe.predict(test) == data.test.labels))
    return {
        "dataset": dataset,
        "model": model,
        "seed": seed,
        "train-images": len(data.train),
        "test-images": len(data.test),
        "linear-probe-acc": accuracy,
        "fit-seconds": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="dpfpl-tiny-digits")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    result = linear_probe(args.dataset, args.model)
    out = Path(args.out) / f"linear_probe_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
