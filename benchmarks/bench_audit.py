"""White-box privacy audit of DP-FPL's two noisy releases: claimed epsilon vs lower bound.

For each channel (one local step's carriers du, dv; one server aggregation of the global
gradient) and each noise multiplier z, ``--trials`` releases are made on a fixed input
with a worst-case canary at the sensitivity bound and as many without it, with secure
(OS-keyed) noise; the adversary projects each release on the canary's direction (the
optimal test for a Gaussian mechanism). ``dpfpl_app.audit.bounds`` turns the scores into
a lower bound on epsilon at 95% confidence, which is set against the accountant's claim
for that one release (RDP, sample rate 1) and the exact epsilon of the Gaussian mechanism.
The last rows rerun each channel with the noise drawn from a public seed (what
``reproducible-noise = true`` does) against an adversary who replays the seed: the
epsilon such a run prints is nominal, and the audit says so.

Usage::

    python benchmarks/bench_audit.py                  # writes benchmarks/results/audit.{md,json}
    python benchmarks/bench_audit.py --quick          # smoke run (2000 trials)
    python benchmarks/bench_audit.py --trials 100000 --noise-multipliers 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpfpl_app.audit.claims import claimed_epsilon, gaussian_epsilon  # noqa: E402
from dpfpl_app.audit.mechanism import Channel, canary_game  # noqa: E402
from dpfpl_app.audit.report import audit_record, summary_table  # noqa: E402
from dpfpl_app.audit.white_box import (  # noqa: E402
    WhiteBoxAudit,
    audit_white_box,
    public_seed_noise,
    replay_adversary,
)

CLIP, BATCH, CLIENTS, DELTA = 10.0, 32, 10, 1e-5
REPLAY_TRIALS = 1000


def _audit(channel: Channel, z: float, trials: int, *, replay: bool) -> WhiteBoxAudit:
    game = canary_game(channel, noise_multiplier=z, clip_norm=CLIP, batch=BATCH, clients=CLIENTS)
    kwargs = {}
    if replay:
        noise_for = public_seed_noise(0)
        kwargs = {
            "noise_for": noise_for,
            "adversary": replay_adversary(game, noise_for),
            "adversary_name": "replays the public noise seed, projects the difference",
        }
    return audit_white_box(
        game,
        trials=trials,
        claimed_epsilon=claimed_epsilon(z, delta=DELTA),
        exact_epsilon=gaussian_epsilon(z, delta=DELTA),
        delta=DELTA,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50000, help="releases with and without")
    parser.add_argument("--noise-multipliers", default="1,2")
    parser.add_argument("--quick", action="store_true", help="2000 trials, for CI")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    trials = 2000 if args.quick else args.trials
    zs = [float(z) for z in args.noise_multipliers.split(",")]
    torch.set_num_threads(1)  # releases of a few hundred numbers: threads only contend
    warnings.filterwarnings("ignore", module="opacus")

    audits, seconds = [], []
    for channel in Channel:
        for z in zs:
            start = time.perf_counter()
            audits.append(_audit(channel, z, trials, replay=False))
            seconds.append(time.perf_counter() - start)
            print(f"{channel.value} z={z:g}: {seconds[-1]:.0f} s", flush=True)
    replays = [_audit(channel, zs[-1], REPLAY_TRIALS, replay=True) for channel in Channel]

    command = "python benchmarks/bench_audit.py " + " ".join(sys.argv[1:])
    header = (
        f"White-box audit of one release per channel (`{command.strip()}`): clip C = {CLIP:g}, "
        f"expected batch B = {BATCH}, N = {CLIENTS} clients, delta = {DELTA:g}; worst-case "
        "canary at the sensitivity bound; secure noise; adversary = projection on the "
        "canary's direction; lower bound at 95% confidence (threshold chosen on half the "
        "trials, Clopper-Pearson on the other half). Claimed = RDP accountant for one step at "
        "sample rate 1; exact = the Gaussian mechanism's true epsilon (Balle and Wang 2018)."
    )
    replay_note = (
        f"Noise from a public seed (reproducible-noise = true), z = {zs[-1]:g}, "
        f"{REPLAY_TRIALS} trials, adversary replays the seed:"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.md").write_text(
        f"{header}\n\n{summary_table(audits)}\n\n{replay_note}\n\n{summary_table(replays)}\n"
    )
    (out / "audit.json").write_text(
        json.dumps(
            {
                "command": command.strip(),
                "audits": [audit_record(a, accountant="rdp") for a in audits],
                "seconds": seconds,
                "public_seed_audits": [audit_record(a, accountant="rdp") for a in replays],
            },
            indent=2,
        )
        + "\n"
    )
    print(summary_table(audits))
    print(summary_table(replays))


if __name__ == "__main__":
    main()
