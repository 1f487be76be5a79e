"""Linear-probe ceiling and zero-shot floor of a backbone's image features on a run's split.

Prompt learning can only choose among directions the frozen features already separate;
a logistic regression trained centrally on every training image of every class (what no
client holds) shows how far that is, and the hand-written template's zero-shot accuracy
shows where prompt learning starts. Same split (seed 0, test-fraction 0.3) and the same
cached features as the federated runs. A styled dataset (each client in one domain) is
measured domain by domain, as its clients see it.

    python benchmarks/linear_probe.py --dataset digits --model dpfpl-tiny-digits
    python benchmarks/linear_probe.py --dataset font-glyphs --model dpfpl-tiny-glyphs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip  # noqa: E402
from dpfpl_app.cache import cache_root  # noqa: E402
from dpfpl_app.data.data_sources import ImageSet, SourceSpec  # noqa: E402
from dpfpl_app.data.features import FeatureCache  # noqa: E402
from dpfpl_app.data.federated_data import load_federated_data  # noqa: E402
from dpfpl_app.data.image_styles import STYLED_DATASETS  # noqa: E402
from dpfpl_app.data.offline_data import DATASETS  # noqa: E402


def _zero_shot(clip: FrozenClip, template: str, class_names: tuple[str, ...],
               features: torch.Tensor, labels: np.ndarray) -> float:
    with torch.inference_mode():
        tokens = clip.tokenizer([template.format(n) for n in class_names], padding=True,
                                return_tensors="pt").to(clip.device)
        text = clip.model.get_text_features(**tokens).pooler_output.float().cpu()
    text = text / text.norm(dim=-1, keepdim=True)
    image = features / features.norm(dim=-1, keepdim=True)
    return float(np.mean((image @ text.T).argmax(dim=-1).numpy() == labels))


def _measure(clip: FrozenClip, cache: FeatureCache, train: ImageSet, test: ImageSet,
             template: str, seed: int) -> dict[str, float]:
    train_f = cache.features(clip, train, views=0, seed=seed)[0]
    test_f = cache.features(clip, test, views=0, seed=seed)[0]
    probe = LogisticRegression(max_iter=3000, C=10.0).fit(train_f.numpy(), train.labels)
    return {"linear-probe-acc": float(np.mean(probe.predict(test_f.numpy()) == test.labels)),
            "zeroshot-acc": _zero_shot(clip, template, test.class_names, test_f, test.labels)}


def linear_probe(dataset: str, model: str, *, seed: int = 0) -> dict[str, object]:
    clip = load_frozen_clip(model)
    data = load_federated_data(SourceSpec(dataset), test_fraction=0.3, seed=seed)
    cache = FeatureCache(cache_root() / "features")
    styled = STYLED_DATASETS.get(dataset)
    base = styled.base if styled else dataset
    template = (DATASETS[base].caption_templates[0] if base in DATASETS else "a photo of a {}.")
    t0 = time.monotonic()
    domains = dict.fromkeys(styled.styles) if styled else {"": None}
    for domain in domains:
        train, test = ((data.train.styled(domain), data.test.styled(domain)) if domain
                       else (data.train, data.test))
        domains[domain] = _measure(clip, cache, train, test, template, seed)
    result: dict[str, object] = {
        "dataset": dataset, "model": model, "seed": seed, "zeroshot-template": template,
        "train-images": len(data.train), "test-images": len(data.test),
        "linear-probe-acc": float(np.mean([d["linear-probe-acc"] for d in domains.values()])),
        "zeroshot-acc": float(np.mean([d["zeroshot-acc"] for d in domains.values()])),
        "fit-seconds": round(time.monotonic() - t0, 1)}
    if styled:
        result["by-domain"] = domains
    return result


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
