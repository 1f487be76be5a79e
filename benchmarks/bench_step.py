"""Time one DP-FPL client training step: the authors' cost structure against ours.

Two paths, same prompt, same batch (B = 32 images, n_ctx = 16 context vectors):

* **reference**: the cost structure of the authors' implementation. The image encoder
  runs on the 32 images every step; every class prompt runs at the full 77 tokens
  through transformers' own text encoder (``CoOpTextEncoder.plain_features``); one
  backward of the batch-mean loss w.r.t. the prompt; paper-mode DP (clip the batch
  gradient, add noise).
* **ours**: ``PromptLearner.train_step`` (method dpfpl, rank 8) on image features
  computed once, in DP mode off, paper and per-sample (vmap over VJPs, several chunk
  sizes).

Every configuration runs in its own child process (``--child``), which times one
warm-up step and ``--reps`` measured steps with ``torch.set_num_threads(2)`` (see
``--threads``) and reports its peak RSS (``ru_maxrss`` at its end), so configurations
never share a peak.
Weights are random: the cost of a step does not depend on their values.

Usage::

    python benchmarks/bench_step.py                 # full run, writes benchmarks/results/
    python benchmarks/bench_step.py --quick         # smoke run (small model, C=10, 1 rep)
    python benchmarks/bench_step.py --models vitb16 --classes 100 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

BATCH = 32
N_CTX = 16
RANK = 8
CLIP_NORM = 10.0
NOISE_MULTIPLIER = 1.0  # any value > 0 makes the noise path run; its size costs nothing
THREADS = 2
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"  # see child_env
CHUNK_SIZES = (8, 16, 32)
NAME_WORDS = (1, 2, 3, 4)
"""Words per generated class name, cycled. Our path's cost grows with the longest name
(sequences stop at the last EOS) while the reference always runs 77 tokens, so names
stay at a realistic length: up to 4 words, i.e. class suffixes of at most 6 tokens."""

TARGET_MODEL, TARGET_CLASSES = "vitb16", 100
PAPER_SPEEDUP_TARGET = 8.0  # ours-paper at least 8x faster than the reference
PER_SAMPLE_SPEEDUP_TARGET = 1.0  # ours-per-sample not slower than reference-paper
AUTHORS_FIGURES = (
    "Authors' implementation on this CPU kind (context, not measured here): median "
    "10.4 s per client step at 100 classes (image encoder 4.2 s + text forward 2.7 s + "
    "text backward 3.3 s), 5.3 s at 10 classes; peak RSS 5.9 GiB."
)
RESULTS_STEM = "step_times"


class Model(str, Enum):
    """Architectures timed: ViT-B/16 CLIP (built in memory) and the project's small CLIP."""

    VITB16 = "vitb16"
    SMALL = "small"


class PathKind(str, Enum):
    REFERENCE = "reference"
    OURS = "ours"


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration, run alone in a child process."""

    model: Model
    classes: int
    path: PathKind
    dp_mode: str  # a dpfpl_app.config.DPMode value
    chunk_size: int | None  # per-sample vmap chunk; None for the other modes
    reps: int
    threads: int
    backbone_dir: str  # random-plumbing-clip: weights (small) and tokenizer (both)

    @property
    def label(self) -> str:
        chunk = f" chunk={self.chunk_size}" if self.chunk_size else ""
        return f"{self.model.value} C={self.classes} {self.path.value} {self.dp_mode}{chunk}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw = json.loads(text)
        return cls(**dict(raw, model=Model(raw["model"]), path=PathKind(raw["path"])))


# ----- the child: build one configuration, time it, report --------------------------
def vitb16_config(tokenizer: Any) -> Any:
    """OpenAI's ViT-B/16 CLIP geometry, with the vocabulary of ``tokenizer``."""
    from transformers import CLIPConfig

    text = {"vocab_size": len(tokenizer), "hidden_size": 512, "intermediate_size": 2048,
            "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
            "projection_dim": 512, "hidden_act": "quick_gelu",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
              "projection_dim": 512, "hidden_act": "quick_gelu"}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def load_model(model: Model, backbone_dir: str) -> tuple[Any, Any]:
    """Frozen CLIP in eval mode and its tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(backbone_dir)
    if model is Model.SMALL:
        clip = CLIPModel.from_pretrained(backbone_dir)
    else:
        torch.manual_seed(0)
        clip = CLIPModel(vitb16_config(tokenizer))
    clip.requires_grad_(False)
    clip.eval()
    return clip, tokenizer


def class_names(tokenizer: Any, count: int) -> list[str]:
    """Return ``count`` distinct names of 1-4 words; each word is one token of ``tokenizer``.

    The words are those of the tokenizer's own training captions (real words, not BPE
    fragments), so a name costs about as many tokens as under OpenAI's tokenizer.
    """
    from dpfpl_app.backbones.tokenizer_build import caption_corpus

    words = {w for text in caption_corpus() for w in re.findall(r"[a-z]{3,}", text.lower())}
    pool = sorted(w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1)
    rng = random.Random(0)
    names: list[str] = []
    while len(names) < count:
        name = " ".join(rng.sample(pool, NAME_WORDS[len(names) % len(NAME_WORDS)]))
        if name not in names:
            names.append(name)
    return names


def image_features(clip: Any, pixels: Tensor) -> Tensor:
    """Normalised image features (B, e), as ``dpfpl_app.data.features.encode_pixels`` computes."""
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=pixels)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return F.normalize(feats.float(), dim=-1)


def reference_step(clip: Any, encoder: Any, pixels: Tensor, labels: Tensor, prompt: Tensor,
                   generator: torch.Generator) -> dict[str, float]:
    """One step with the authors' cost structure; returns the time of each phase (s)."""
    from dpfpl_app.method.gradients import class_logits
    from dpfpl_app.privacy import mechanics

    logit_scale = clip.logit_scale.exp()
    t0 = time.perf_counter()
    image = image_features(clip, pixels)  # every step: (B, e)
    t1 = time.perf_counter()
    ctx = prompt.detach().requires_grad_(True)
    text = encoder.plain_features(ctx, clip.text_model)  # (C, e), all 77 tokens per class
    loss = F.cross_entropy(class_logits(text, image, logit_scale), labels)
    t2 = time.perf_counter()
    (grad,) = torch.autograd.grad(loss, ctx)
    t3 = time.perf_counter()
    std = NOISE_MULTIPLIER * CLIP_NORM / labels.numel()  # paper mode: sensitivity C/B
    # the authors' code draws torch noise; a timing reference, not a privacy mechanism
    noise = std * torch.randn(grad.shape, generator=generator)
    noised = mechanics.clip_tensor(grad, CLIP_NORM) + noise
    prompt.sub_(0.1 * noised)
    t4 = time.perf_counter()
    return {"total": t4 - t0, "image_encoder": t1 - t0, "text_forward": t2 - t1,
            "text_backward": t3 - t2, "dp": t4 - t3}


def make_step(cfg: Config, clip: Any, tokenizer: Any
              ) -> tuple[Callable[[], dict[str, float]], dict[str, Any]]:
    """Build everything outside the timed region; return the step and facts about it."""
    from dpfpl_app.config import DPMode, Method
    from dpfpl_app.method.prompt_learner import LearnerSettings, PromptLearner
    from dpfpl_app.method.text_encoder import CoOpTextEncoder

    encoder = CoOpTextEncoder(clip, tokenizer, class_names(tokenizer, cfg.classes), N_CTX)
    gen = torch.Generator().manual_seed(0)
    size = int(clip.config.vision_config.image_size)
    labels = torch.randint(cfg.classes, (BATCH,), generator=gen)
    width = int(clip.config.text_config.hidden_size)
    facts: dict[str, Any] = {"image_size": size, "text_width": width,
                             "suffix_tokens": int(cast(Tensor, encoder.suffix_ids).shape[1])}
    if cfg.path is PathKind.REFERENCE:
        pixels = torch.randn(BATCH, 3, size, size, generator=gen)
        prompt = torch.randn(N_CTX, width, generator=gen) * 0.02
        return (lambda: reference_step(clip, encoder, pixels, labels, prompt, gen)), facts
    # Features come from the feature cache, computed once outside training; the step's
    # cost does not depend on their values, so random unit vectors of the right shape
    # stand in for them (and the one-off encoder pass stays out of the step's peak RSS).
    dim = int(clip.config.projection_dim)
    features = F.normalize(torch.randn(BATCH, dim, generator=gen), dim=-1)
    mode = DPMode(cfg.dp_mode)
    settings = LearnerSettings(
        method=Method.DPFPL, n_ctx=N_CTX, rank=RANK, init_std=0.02, lr=0.1, momentum=0.9,
        weight_decay=5e-4, dp_mode=mode, clip_norm=CLIP_NORM,
        local_noise_multiplier=0.0 if mode is DPMode.OFF else NOISE_MULTIPLIER,
        chunk_size=cfg.chunk_size or default_chunk_size(),
    )
    learner = PromptLearner(encoder, clip.logit_scale.exp(), settings, generator=gen,
                            width=width)
    learner.set_global_prompt(torch.randn(N_CTX, width, generator=gen) * 0.02)

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        learner.train_step(features, labels, expected_batch=float(BATCH))
        return {"total": time.perf_counter() - t0}

    return step, facts


def vm_rss_mib() -> float | None:
    """Return the current resident set size in MiB (Linux /proc), or None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) / 1024


def run_child(cfg: Config) -> dict[str, Any]:
    """Time ``cfg`` in this process: one warm-up, then ``cfg.reps`` measured steps."""
    torch.set_num_threads(cfg.threads)
    # The whole frozen CLIP stays loaded while the steps run, as in a client process
    # (client_node caches it), even where the step only uses the text layers.
    clip, tokenizer = load_model(cfg.model, cfg.backbone_dir)
    step, facts = make_step(cfg, clip, tokenizer)
    setup_rss = vm_rss_mib()
    step()  # warm-up: allocator, lazy initialisation, vmap tracing
    runs = [step() for _ in range(cfg.reps)]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    totals = [r["total"] for r in runs]
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "total"}
    record = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "backbone_dir"}
    return {**record, "label": cfg.label, "threads": torch.get_num_threads(),
            "times_s": totals, "median_s": statistics.median(totals), "min_s": min(totals),
            "phase_median_s": phases, "setup_rss_mib": setup_rss,
            "peak_rss_mib": peak_kib / 1024, **facts}


# ----- the parent: one child per configuration, then the tables -----------------------
def default_chunk_size() -> int:
    from dpfpl_app.method.prompt_learner import LearnerSettings

    default = {f.name: f.default for f in dataclasses.fields(LearnerSettings)}["chunk_size"]
    if not isinstance(default, int):
        raise TypeError(f"LearnerSettings.chunk_size has no int default ({default!r})")
    return default


def configurations(args: argparse.Namespace, backbone_dir: str) -> list[Config]:
    """List, per model and C: reference, ours off/paper, ours per-sample at each chunk."""
    out = []
    for model in args.models:
        for c in args.classes:
            def cfg(path: PathKind, mode: str, chunk: int | None = None,
                    model: Model = model, c: int = c) -> Config:
                return Config(model, c, path, mode, chunk, args.reps, args.threads, backbone_dir)

            out += [cfg(PathKind.REFERENCE, "paper"), cfg(PathKind.OURS, "off"),
                    cfg(PathKind.OURS, "paper")]
            out += [cfg(PathKind.OURS, "per-sample", k) for k in args.chunks]
    return out


def child_env(threads: int) -> dict[str, str]:
    """Offline, quiet children with OpenMP sized to ``threads``.

    OpenMP threads spin while they wait for each other. On a CPU shared with other
    processes a spinning thread steals the core its partner needs, and 2-thread steps
    became 10-100x slower and erratic (measured on the small model); passive waiting
    keeps the figures about the work. An ``OMP_WAIT_POLICY`` already set is kept.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    env.setdefault("OMP_WAIT_POLICY", DEFAULT_OMP_WAIT_POLICY)
    return env


def run_in_child(cfg: Config) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", cfg.to_json()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(cfg.threads),
                          check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise SystemExit(f"configuration '{cfg.label}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def speedup(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """How many times faster ``other`` is than ``reference``, by median and by min."""
    return {"median": reference["median_s"] / other["median_s"],
            "min": reference["min_s"] / other["min_s"]}


def ratios(results: list[dict[str, Any]], model: str, classes: int) -> dict[str, Any] | None:
    """Speed-ups over the reference and memory, for one (model, C); None if incomplete."""
    rows = [r for r in results if r["model"] == model and r["classes"] == classes]
    ref = next((r for r in rows if r["path"] == "reference"), None)
    ours = [r for r in rows if r["path"] == "ours"]
    paper = next((r for r in ours if r["dp_mode"] == "paper"), None)
    per_sample = [r for r in ours if r["dp_mode"] == "per-sample"]
    if ref is None or paper is None or not per_sample:
        return None
    best = min(per_sample, key=lambda r: r["median_s"])
    default = next((r for r in per_sample if r["chunk_size"] == default_chunk_size()), None)
    return {
        "model": model, "classes": classes,
        "paper_speedup": speedup(ref, paper),
        "per_sample_best_chunk": best["chunk_size"],
        "per_sample_best_speedup": speedup(ref, best),
        "per_sample_default_speedup": None if default is None else speedup(ref, default),
        "reference_peak_rss_mib": ref["peak_rss_mib"],
        "ours_max_peak_rss_mib": max(r["peak_rss_mib"] for r in ours),
    }


def times_faster(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.2f}x by median ({ratio['min']:.2f}x by min)"


def targets(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Check the issue's three targets at ViT-B/16, C=100 (empty when that was not run).

    Speed targets are judged on medians; the min-based ratio is shown next to them.
    """
    if summary is None:
        return []
    best, default = summary["per_sample_best_speedup"], summary["per_sample_default_speedup"]
    per_sample = f"best chunk {summary['per_sample_best_chunk']}: {times_faster(best)}"
    if default is not None:
        per_sample += f"; default chunk {default_chunk_size()}: {times_faster(default)}"
    return [
        {"target": f"ours-paper >= {PAPER_SPEEDUP_TARGET:g}x faster than the reference",
         "measured": times_faster(summary["paper_speedup"]),
         "met": summary["paper_speedup"]["median"] >= PAPER_SPEEDUP_TARGET},
        {"target": "ours-per-sample not slower than the reference (paper DP)",
         "measured": per_sample,
         "met": best["median"] >= PER_SAMPLE_SPEEDUP_TARGET},
        {"target": "peak RSS of ours (every mode) below the reference's",
         "measured": f"{gib(summary['ours_max_peak_rss_mib'])} GiB vs "
                     f"{gib(summary['reference_peak_rss_mib'])} GiB",
         "met": summary["ours_max_peak_rss_mib"] < summary["reference_peak_rss_mib"]},
    ]


def markdown(report: dict[str, Any]) -> str:
    meta, results = report["meta"], report["results"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), torch "
        f"{meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads "
        f"(OMP_WAIT_POLICY={meta['omp_wait_policy']}), "
        f"B={BATCH}, n_ctx={N_CTX}, rank={RANK}, {meta['reps']} reps after 1 warm-up. "
        f"Load average before/after: {meta['load_before']} / {meta['load_after']} "
        "(the machine was shared: other processes may have been running).",
        f"Command: `{meta['command']}`",
        "",
        "| model | C | path | DP mode | chunk | median (s) | min (s) | x faster than ref "
        "(median) | peak RSS (GiB) | RSS after setup (GiB) | suffix tokens | load (1 min) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = next(x for x in results if x["model"] == r["model"]
                   and x["classes"] == r["classes"] and x["path"] == "reference")
        setup = "-" if r["setup_rss_mib"] is None else gib(r["setup_rss_mib"])
        lines.append(
            f"| {r['model']} | {r['classes']} | {r['path']} | {r['dp_mode']} | "
            f"{r['chunk_size'] or '-'} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
            f"{speedup(ref, r)['median']:.2f} | {gib(r['peak_rss_mib'])} | {setup} | "
            f"{r['suffix_tokens']} | {r['load_after']} |")
    lines += ["", "Reference phases (median s): " + "; ".join(
        f"{r['model']} C={r['classes']}: " + " + ".join(
            f"{k.replace('_', ' ')} {v:.3f}" for k, v in r["phase_median_s"].items())
        for r in results if r["path"] == "reference")]
    if report["targets"]:
        lines += ["", f"Targets ({TARGET_MODEL}, C={TARGET_CLASSES}):", "",
                  "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
                  for t in report["targets"]]
    lines += ["", AUTHORS_FIGURES, ""]
    return "\n".join(lines)


def system_facts(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": args.threads, "omp_wait_policy": child_env(args.threads)["OMP_WAIT_POLICY"],
            "reps": args.reps, "batch": BATCH, "n_ctx": N_CTX, "rank": RANK,
            "command": shlex.join(["python", *sys.argv])}


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_parent(args: argparse.Namespace) -> None:
    from dpfpl_app.backbones.backbone_build import build_random_clip

    stem = RESULTS_STEM + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = system_facts(args)
    meta["load_before"] = load_text()
    print(f"load average before: {meta['load_before']} ({os.cpu_count()} cores)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        print("building random-plumbing-clip (weights + tokenizer) ...", flush=True)
        backbone = build_random_clip(Path(tmp) / "random-plumbing-clip")
        configs = configurations(args, str(backbone))
        results = []
        for i, cfg in enumerate(configs, 1):
            print(f"[{i}/{len(configs)}] {cfg.label} ...", flush=True)
            r = dict(run_in_child(cfg), load_after=f"{os.getloadavg()[0]:.1f}")
            results.append(r)
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phase_median_s"].items())
            print(f"    median {r['median_s']:.3f} s, min {r['min_s']:.3f} s, peak RSS "
                  f"{gib(r['peak_rss_mib'])} GiB" + (f" ({phases})" if phases else ""), flush=True)
    meta["load_after"] = load_text()
    summaries = [s for m in args.models for c in args.classes
                 if (s := ratios(results, m.value, c)) is not None]
    target = next((s for s in summaries
                   if s["model"] == TARGET_MODEL and s["classes"] == TARGET_CLASSES), None)
    report = {"meta": meta, "results": results, "summaries": summaries,
              "targets": targets(target), "authors_figures": AUTHORS_FIGURES}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {args.out / stem}.json and .md")


# ----- command line ------------------------------------------------------------------
def comma_list(kind: Callable[[str], Any], name: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{name}: {err}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} needs at least one value")
        return values
    return parse


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small model, C=10, 1 rep, default chunk only; "
                             f"writes {RESULTS_STEM}_quick.*")
    parser.add_argument("--models", type=comma_list(Model, "--models"),
                        default=[Model.VITB16, Model.SMALL],
                        help="comma-separated: vitb16, small (default: both)")
    parser.add_argument("--classes", type=comma_list(positive, "--classes"), default=[10, 100],
                        help="comma-separated class counts C (default: 10,100)")
    parser.add_argument("--chunks", type=comma_list(positive, "--chunks"),
                        default=list(CHUNK_SIZES),
                        help="per-sample vmap chunk sizes (default: 8,16,32)")
    parser.add_argument("--reps", type=positive, default=5,
                        help="measured steps per configuration after 1 warm-up (default: 5)")
    parser.add_argument("--threads", type=positive, default=THREADS,
                        help=f"torch threads in each child (default: {THREADS})")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the results files (default: benchmarks/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.classes, args.reps = [Model.SMALL], [10], 1
        args.chunks = [default_chunk_size()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(Config.from_json(args.child))), flush=True)
        return
    run_parent(args)


if __name__ == "__main__":
    main()
