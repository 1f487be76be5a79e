"""Time one DP-FPL client training step: the authors' cost structure against ours.

Same prompt, same batch (B = 32 images, n_ctx = 16 context vectors), per workload
(model, class-name set):

* **reference**: the cost structure of the authors' implementation. The image encoder
  runs on the 32 images every step; every class prompt runs at the full 77 tokens
  through transformers' own text encoder (``CoOpTextEncoder.plain_features``); one
  backward of the batch-mean loss w.r.t. the prompt; paper-mode DP (clip the batch
  gradient, add noise).
* **ours**: ``PromptLearner.train_step`` (method dpfpl, rank 8) on cached image
  features, in DP mode off, paper and per-sample (vmap over VJPs at one chunk size,
  fixed before measuring); and **cache fill**: the image encoder on the batch's 32
  images, which ours runs once per image instead of once per step.

Each workload runs in its own child process (``--child``). The machine's load swings
between minutes, so the paths alternate repetition by repetition (the order rotates
every repetition) and speed-ups are per-repetition ratios, reported with a 95%
t-interval of their geometric mean. Weights are random: a step's cost does not depend
on their values.

Usage::

    python benchmarks/bench_step.py                 # full run, writes benchmarks/results/
    python benchmarks/bench_step.py --quick         # smoke run (small model, C=10, 1 rep)
    python benchmarks/bench_step.py --models vitb16 --names caltech101 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
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
from typing import Any

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
DP_MODES = ("off", "paper", "per-sample")
SUFFIX_SPECIALS = 2  # a class suffix is the name's tokens, then "." and [EOS]

NAME_SETS: dict[str, dict[int, int] | None] = {
    # suffix tokens -> classes. The lengths of the real datasets' class names under
    # CLIP's BPE, estimated by hand (no tokenizer download here): Caltech101's names are
    # mostly one or two tokens and at most three (suffix <= 5); Food101's mostly two or
    # three, at most six (suffix <= 8).
    "caltech101": {3: 55, 4: 35, 5: 10},
    "food101": {3: 15, 4: 38, 5: 30, 6: 12, 7: 4, 8: 2},
    "uniform": None,  # --classes classes, suffixes of 3, 4, 5, 6 tokens in turn
}
UNIFORM_SUFFIXES = (3, 4, 5, 6)

TARGET_MODEL, TARGET_CLASSES = "vitb16", 100
AUTHORS_STEP_S = 10.4
PAPER_SPEEDUP_TARGET = 8.0  # ours-paper at least 8x faster than the reference
AUTHORS_FIGURES = (
    "Authors' implementation on this CPU kind (context, not measured here): median "
    f"{AUTHORS_STEP_S} s per client step at 100 classes (image encoder 4.2 s + text forward "
    "2.7 s + text backward 3.3 s), 5.3 s at 10 classes; peak RSS 5.9 GiB."
)
RESULTS_STEM = "step_times"
REFERENCE, FILL = "reference", "cache-fill"


class Model(str, Enum):
    """Architectures timed: ViT-B/16 CLIP (built in memory) and the project's small CLIP."""

    VITB16 = "vitb16"
    SMALL = "small"


@dataclasses.dataclass(frozen=True)
class Workload:
    """One (model, class-name set) run alone in a child process, every path alternating."""

    model: Model
    names: str  # a NAME_SETS key
    classes: int
    chunk_size: int  # per-sample vmap chunk, fixed before measuring
    reps: int
    threads: int
    backbone_dir: str  # random-plumbing-clip: weights (small) and tokenizer (both)

    @property
    def label(self) -> str:
        return f"{self.model.value} {self.names} C={self.classes}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        raw = json.loads(text)
        return cls(**dict(raw, model=Model(raw["model"])))


# ----- the child: build one workload, time every path, report --------------------
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


def suffix_histogram(names: str, classes: int) -> dict[int, int]:
    """Suffix tokens -> class count for a name set (``uniform``: ``classes`` classes)."""
    fixed = NAME_SETS[names]
    if fixed is not None:
        return dict(fixed)
    counts: dict[int, int] = {}
    for i in range(classes):
        length = UNIFORM_SUFFIXES[i % len(UNIFORM_SUFFIXES)]
        counts[length] = counts.get(length, 0) + 1
    return counts


def class_names(tokenizer: Any, histogram: dict[int, int]) -> list[str]:
    """Distinct names whose suffixes have the lengths of ``histogram``.

    A suffix of n tokens is a name of n - 2 words, each one token of ``tokenizer``:
    words of the tokenizer's own training captions, so the names are real words and
    only their token counts stand for the real dataset's.
    """
    from dpfpl_app.backbones.tokenizer_build import caption_corpus

    words = {w for text in caption_corpus() for w in re.findall(r"[a-z]{3,}", text.lower())}
    pool = sorted(w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1)
    rng = random.Random(0)
    names: list[str] = []
    for length, count in sorted(histogram.items()):
        wanted = len(names) + count
        while len(names) < wanted:
            name = " ".join(rng.sample(pool, length - SUFFIX_SPECIALS))
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


def learner_step(clip: Any, encoder: Any, mode: str, chunk_size: int, features: Tensor,
                 labels: Tensor, gen: torch.Generator) -> Callable[[], dict[str, float]]:
    """``PromptLearner.train_step`` (dpfpl, rank 8) in DP mode ``mode``, on cached features."""
    from dpfpl_app.config import DPMode, Method
    from dpfpl_app.method.prompt_learner import LearnerSettings, PromptLearner

    dp_mode = DPMode(mode)
    width = int(clip.config.text_config.hidden_size)
    settings = LearnerSettings(
        method=Method.DPFPL, n_ctx=N_CTX, rank=RANK, init_std=0.02, lr=0.1, momentum=0.9,
        weight_decay=5e-4, dp_mode=dp_mode, clip_norm=CLIP_NORM,
        local_noise_multiplier=0.0 if dp_mode is DPMode.OFF else NOISE_MULTIPLIER,
        chunk_size=chunk_size,
    )
    learner = PromptLearner(encoder, clip.logit_scale.exp(), settings, generator=gen,
                            width=width)
    learner.set_global_prompt(torch.randn(N_CTX, width, generator=gen) * 0.02)

    def step() -> dict[str, float]:
        learner.train_step(features, labels, expected_batch=float(BATCH))
        return {}

    return step


def make_paths(work: Workload, clip: Any, tokenizer: Any
               ) -> tuple[dict[str, Callable[[], dict[str, float]]], dict[str, Any]]:
    """Build every path outside the timed region, in warm-up order; facts about the workload.

    Warm-up order is memory order: ours' modes, then the cache fill, then the reference,
    so that the running peak RSS read after each path is ours' own until the reference.
    """
    from dpfpl_app.method.text_encoder import CoOpTextEncoder

    names = class_names(tokenizer, suffix_histogram(work.names, work.classes))
    encoder = CoOpTextEncoder(clip, tokenizer, names, N_CTX)
    gen = torch.Generator().manual_seed(0)
    size = int(clip.config.vision_config.image_size)
    labels = torch.randint(len(names), (BATCH,), generator=gen)
    width = int(clip.config.text_config.hidden_size)
    pixels = torch.randn(BATCH, 3, size, size, generator=gen)
    # Features come from the feature cache; a step's cost does not depend on their
    # values, so random unit vectors of the right shape stand in for them.
    features = F.normalize(torch.randn(BATCH, int(clip.config.projection_dim), generator=gen),
                           dim=-1)
    paths: dict[str, Callable[[], dict[str, float]]] = {
        mode: learner_step(clip, encoder, mode, work.chunk_size, features, labels, gen)
        for mode in DP_MODES
    }
    paths[FILL] = lambda: (image_features(clip, pixels), {})[1]
    prompt = torch.randn(N_CTX, width, generator=gen) * 0.02
    paths[REFERENCE] = lambda: reference_step(clip, encoder, pixels, labels, prompt, gen)
    suffixes = (encoder.eos_index + 1).tolist()
    facts = {"image_size": size, "text_width": width, "classes": len(names),
             "suffix_tokens": {str(n): suffixes.count(n) for n in sorted(set(suffixes))}}
    return paths, facts


def timed(path: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run ``path`` once: wall time, this process's CPU time (all threads) and its phases."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    phases = path()
    return {**phases, "total": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}


def vm_rss_mib() -> float | None:
    """Return the current resident set size in MiB (Linux /proc), or None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(work: Workload) -> dict[str, Any]:
    """Warm every path up once, then ``work.reps`` rounds of every path, order rotating."""
    torch.set_num_threads(work.threads)
    # The whole frozen CLIP stays loaded while the steps run, as in a client process
    # (client_node caches it), even where the step only uses the text layers.
    clip, tokenizer = load_model(work.model, work.backbone_dir)
    paths, facts = make_paths(work, clip, tokenizer)
    setup_rss = vm_rss_mib()
    peaks = {}
    for name, path in paths.items():  # warm-up: allocator, lazy initialisation, vmap
        path()
        peaks[name] = peak_rss_mib()
    order = list(paths)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for rep in range(work.reps):
        shift = rep % len(order)
        for name in order[shift:] + order[:shift]:
            runs[name].append(timed(paths[name]))
    record = {k: v for k, v in dataclasses.asdict(work).items() if k != "backbone_dir"}
    return {**record, **facts, "label": work.label, "threads": torch.get_num_threads(),
            "setup_rss_mib": setup_rss, "running_peak_rss_mib": peaks, "runs": runs}


# ----- the parent: one child per workload, then statistics and tables -------------
def default_chunk_size() -> int:
    from dpfpl_app.method.prompt_learner import LearnerSettings

    default = {f.name: f.default for f in dataclasses.fields(LearnerSettings)}["chunk_size"]
    if not isinstance(default, int):
        raise TypeError(f"LearnerSettings.chunk_size has no int default ({default!r})")
    return default


def workloads(args: argparse.Namespace, backbone_dir: str) -> list[Workload]:
    """One workload per model and name set (and per C for the ``uniform`` set)."""
    out = []
    for model in args.models:
        for names in args.names:
            fixed = NAME_SETS[names]
            counts = args.classes if fixed is None else [sum(fixed.values())]
            out += [Workload(model, names, c, args.chunk, args.reps, args.threads, backbone_dir)
                    for c in counts]
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


def run_in_child(work: Workload) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", work.to_json()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(work.threads),
                          check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise SystemExit(f"workload '{work.label}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def ratio_stats(values: list[float]) -> dict[str, Any]:
    """Median and geometric mean of per-repetition ratios, with a 95% t-interval.

    The interval is Student's t on the logarithms (ratios are multiplicative), so it
    bounds the geometric mean; None with a single repetition.
    """
    logs = [math.log(v) for v in values]
    mean = statistics.fmean(logs)
    stats: dict[str, Any] = {"n": len(values), "median": statistics.median(values),
                             "geomean": math.exp(mean), "ci95": None}
    if len(logs) >= 2:
        from scipy.stats import t

        half = float(t.ppf(0.975, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))
        stats["ci95"] = [math.exp(mean - half), math.exp(mean + half)]
    return stats


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per path: wall and CPU times; per-repetition speed-ups over the reference."""
    runs = result["runs"]
    totals = {name: [r["total"] for r in rows] for name, rows in runs.items()}
    end_to_end = [s + f for s, f in zip(totals["per-sample"], totals[FILL], strict=True)]
    ref = totals[REFERENCE]
    paths = {name: {"median_s": statistics.median(t), "min_s": min(t),
                    "cpu_median_s": statistics.median(r["cpu"] for r in runs[name])}
             for name, t in totals.items()}

    def faster(ours: list[float]) -> dict[str, Any]:
        return ratio_stats([r / o for r, o in zip(ref, ours, strict=True)])

    phases = {k: statistics.median(r[k] for r in runs[REFERENCE])
              for k in runs[REFERENCE][0] if k not in {"total", "cpu"}}
    return {
        "paths": paths,
        "end_to_end_median_s": statistics.median(end_to_end),
        "speedup": {mode: faster(totals[mode]) for mode in DP_MODES},
        "end_to_end_speedup": faster(end_to_end),
        "per_sample_over_paper": ratio_stats(
            [s / p for s, p in zip(totals["per-sample"], totals["paper"], strict=True)]),
        "reference_phases_s": phases,
    }


def fmt_stats(stats: dict[str, Any]) -> str:
    ci = stats["ci95"]
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{stats['median']:.2f} ({stats['geomean']:.2f}{interval})"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for one ViT-B/16 workload of about 100 classes.

    A speed-up counts as shown only when its whole 95% interval clears the bar.
    """
    s, peaks = result["summary"], result["running_peak_rss_mib"]
    per_sample = s["paths"]["per-sample"]

    def verdict(stats: dict[str, Any], bar: float) -> str:
        low, high = stats["ci95"] or (stats["geomean"], stats["geomean"])
        return "yes" if low >= bar else ("NO" if high < bar else "not shown (CI spans it)")

    ours_peak = max(peaks[m] for m in DP_MODES)
    return [
        {"target": f"ours per-sample step <= the authors' {AUTHORS_STEP_S} s",
         "measured": f"median {per_sample['median_s']:.2f} s wall on this shared machine; "
                     f"CPU time {per_sample['cpu_median_s']:.1f} s over {result['threads']} "
                     "threads",
         "met": "yes" if per_sample["median_s"] <= AUTHORS_STEP_S else "NO"},
        {"target": f"ours-paper >= {PAPER_SPEEDUP_TARGET:g}x faster than the reference",
         "measured": fmt_stats(s["speedup"]["paper"]),
         "met": verdict(s["speedup"]["paper"], PAPER_SPEEDUP_TARGET)},
        {"target": "ours per-sample not slower than the reference (paper DP)",
         "measured": fmt_stats(s["speedup"]["per-sample"]),
         "met": verdict(s["speedup"]["per-sample"], 1.0)},
        {"target": "peak RSS of ours (every mode) below the reference's",
         "measured": f"{gib(ours_peak)} GiB vs {gib(peaks[REFERENCE])} GiB",
         "met": "yes" if ours_peak < peaks[REFERENCE] else "NO"},
    ]


PATH_ROWS = (
    (REFERENCE, "reference (paper DP)"), ("off", "ours, DP off"), ("paper", "ours, paper DP"),
    ("per-sample", "ours, per-sample DP"), (FILL, "cache fill (image encoder, 32 images)"),
)


def workload_table(result: dict[str, Any]) -> list[str]:
    s, peaks = result["summary"], result["running_peak_rss_mib"]
    suffixes = ", ".join(f"{n} tok x {c}" for n, c in result["suffix_tokens"].items())
    lines = [f"### {result['label']} (class suffixes: {suffixes})", "",
             "| path | median (s) | min (s) | CPU median (s) | x faster than reference: "
             "median (geomean [95% CI]) | running peak RSS (GiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, label in PATH_ROWS:
        p = s["paths"][name]
        speed = fmt_stats(s["speedup"][name]) if name in DP_MODES else "-"
        if name == "per-sample":
            label += f" (chunk {result['chunk_size']})"
        lines.append(f"| {label} | {p['median_s']:.3f} | {p['min_s']:.3f} | "
                     f"{p['cpu_median_s']:.2f} | {speed} | {gib(peaks[name])} |")
    lines += [f"| ours per-sample + cache fill (each image used once) | "
              f"{s['end_to_end_median_s']:.3f} | - | - | "
              f"{fmt_stats(s['end_to_end_speedup'])} | - |",
              "", f"Per-sample step / paper step: {fmt_stats(s['per_sample_over_paper'])}. "
              "Reference phases (median s): " + " + ".join(
                  f"{k.replace('_', ' ')} {v:.3f}" for k, v in s["reference_phases_s"].items())
              + f". Load average (1, 5, 15 min) before / after: {result['load_before']} / "
              f"{result['load_after']}.", ""]
    if result["targets"]:
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in result["targets"]]
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), torch "
        f"{meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads "
        f"(OMP_WAIT_POLICY={meta['omp_wait_policy']}), B={BATCH}, n_ctx={N_CTX}, "
        f"rank={RANK}, per-sample chunk {meta['chunk_size']} (fixed before measuring). "
        f"{meta['reps']} repetitions after 1 warm-up; in each repetition every path runs "
        "once, in an order rotating by one per repetition. Speed-ups are per-repetition "
        "ratios reference / ours: median, then geometric mean with a 95% t-interval. "
        "CPU time is the process's (all threads). Running peak RSS is ru_maxrss read "
        "after each path's warm-up, in the order ours' modes, cache fill, reference: "
        "ours' figures are their own, the reference's is the peak of the whole process. "
        "Class names are synthetic words with the token counts given (Caltech101 and "
        "Food101: hand estimates of CLIP's BPE lengths). The machine was shared.",
        f"Command: `{meta['command']}`", "",
    ]
    for result in report["results"]:
        lines += workload_table(result)
    lines += [AUTHORS_FIGURES, ""]
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
            "reps": args.reps, "chunk_size": args.chunk, "batch": BATCH, "n_ctx": N_CTX,
            "rank": RANK,
            "command": shlex.join(["python", *sys.argv])}


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_parent(args: argparse.Namespace) -> None:
    from dpfpl_app.backbones.backbone_build import build_random_clip

    stem = RESULTS_STEM + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = system_facts(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        print("building random-plumbing-clip (weights + tokenizer) ...", flush=True)
        backbone = build_random_clip(Path(tmp) / "random-plumbing-clip")
        todo = workloads(args, str(backbone))
        for i, work in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {work.label} ...", flush=True)
            before = load_text()
            result = dict(run_in_child(work), load_before=before, load_after=load_text())
            result["summary"] = summarise(result)
            at_target = work.model.value == TARGET_MODEL and work.classes >= TARGET_CLASSES
            result["targets"] = targets(result) if at_target else []
            results.append(result)
            print("\n".join(workload_table(result)), flush=True)
    report = {"meta": meta, "results": results, "authors_figures": AUTHORS_FIGURES}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
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
                        help="smoke run: small model, uniform names, C=10, 1 rep; "
                             f"writes {RESULTS_STEM}_quick.*")
    parser.add_argument("--models", type=comma_list(Model, "--models"),
                        default=[Model.VITB16, Model.SMALL],
                        help="comma-separated: vitb16, small (default: both)")
    parser.add_argument("--names", type=comma_list(name_set, "--names"),
                        default=list(NAME_SETS),
                        help="comma-separated class-name sets: " + ", ".join(NAME_SETS)
                             + " (default: all)")
    parser.add_argument("--classes", type=comma_list(positive, "--classes"), default=[100],
                        help="class counts C for the uniform name set (default: 100)")
    parser.add_argument("--chunk", type=positive, default=None,
                        help="per-sample vmap chunk size (default: the library's)")
    parser.add_argument("--reps", type=positive, default=5,
                        help="measured repetitions after 1 warm-up (default: 5)")
    parser.add_argument("--threads", type=positive, default=THREADS,
                        help=f"torch threads in each child (default: {THREADS})")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the results files (default: benchmarks/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.names, args.classes, args.reps = [Model.SMALL], ["uniform"], [10], 1
    if args.chunk is None:
        args.chunk = default_chunk_size()
    return args


def name_set(text: str) -> str:
    if text not in NAME_SETS:
        raise ValueError(f"unknown name set {text!r}")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(Workload.from_json(args.child))), flush=True)
        return
    run_parent(args)


if __name__ == "__main__":
    main()
