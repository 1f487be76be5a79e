"""Privacy audit: the bounds are valid, the audit fails broken mechanisms and passes ours."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

from dpfpl_app.audit import cli as audit_cli
from dpfpl_app.audit import mechanism
from dpfpl_app.audit.bounds import (
    clopper_pearson_upper,
    epsilon_from_error_rates,
    many_trial_lower_bound,
    one_run_audit,
    one_run_guesses,
    one_run_lower_bound,
    one_run_p_value,
)
from dpfpl_app.audit.claims import claimed_epsilon, gaussian_epsilon
from dpfpl_app.audit.mechanism import Channel, canary_game
from dpfpl_app.audit.white_box import (
    WhiteBoxAudit,
    audit_white_box,
    public_seed_noise,
    replay_adversary,
)
from dpfpl_app.privacy.accounting import AccountantKind
from dpfpl_app.privacy.noise import NoiseSource
from dpfpl_app.service import cli

DELTA = 1e-5
CLIP, BATCH, CLIENTS = 10.0, 8, 4
# what one sample can move each release by (ALGORITHM.md section 4), written out by hand
SENSITIVITY = [
    (Channel.LOCAL, math.sqrt(2) * CLIP / BATCH),
    (Channel.GLOBAL, CLIP / (BATCH * CLIENTS)),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Releases are a few hundred numbers: extra threads only contend for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _claim(z: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus PRV warns on log(0) at sample rate 1
        return claimed_epsilon(z, delta=DELTA)


def _audit(channel: Channel, *, z: float, claimed_z: float, trials: int, **kw) -> WhiteBoxAudit:
    game = canary_game(channel, noise_multiplier=z, clip_norm=CLIP, batch=BATCH, clients=CLIENTS)
    if kw.pop("replay", False):
        kw["noise_for"] = public_seed_noise(7)
        kw["adversary"] = replay_adversary(game, kw["noise_for"])
    return audit_white_box(
        game,
        trials=trials,
        claimed_epsilon=_claim(claimed_z),
        exact_epsilon=gaussian_epsilon(claimed_z, delta=DELTA),
        delta=DELTA,
        **kw,
    )


# --- Clopper-Pearson and the many-trial bound ---------------------------------------------------
@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (17, 400), (399, 400)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int) -> None:
    # a two-sided exact interval at 90% has the one-sided 95% bound as its upper end
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high

    assert clopper_pearson_upper(k, n, 0.05) == pytest.approx(expected, rel=1e-9)


def test_clopper_pearson_zero_and_all_successes() -> None:
    # P[Bin(n, p) = 0] = (1 - p)^n = alpha  <=>  p = 1 - alpha^(1/n)
    assert clopper_pearson_upper(0, 50, 0.05) == pytest.approx(1 - 0.05 ** (1 / 50))
    assert clopper_pearson_upper(50, 50, 0.05) == 1.0


@pytest.mark.parametrize(
    ("k", "n", "alpha", "match"),
    [
        (3, 0, 0.05, "trials > 0"),
        (-1, 5, 0.05, "successes"),
        (6, 5, 0.05, "successes"),
        (1, 5, 0.0, "alpha"),
    ],
)
def test_clopper_pearson_rejects_bad_input(k: int, n: int, alpha: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clopper_pearson_upper(k, n, alpha)


@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
def test_randomised_response_error_rates_give_its_epsilon(eps: float) -> None:
    # eps-DP randomised response errs with probability 1 / (1 + e^eps) on both sides
    err = 1.0 / (1.0 + math.exp(eps))

    assert float(epsilon_from_error_rates(err, err, 0.0)) == pytest.approx(eps, abs=1e-12)


def test_many_trial_bound_of_a_perfect_attack() -> None:
    # Prepare: every trial told apart, threshold fixed in advance: both counts are 0
    n = 2000
    upper = 1 - 0.025 ** (1 / n)  # each rate at half the 5% error budget

    # Execute
    bound = many_trial_lower_bound(np.ones(n), np.zeros(n), delta=DELTA, threshold=0.5)

    # Assert
    assert (bound.false_positives, bound.false_negatives) == (0, 0)
    assert bound.epsilon == pytest.approx(math.log((1 - DELTA - upper) / upper))


def test_many_trial_bound_holds_with_its_confidence() -> None:
    """Randomised response at eps = 1 is exactly 1-DP: the bound may pass 1 in <= 5% of runs."""
    # Prepare
    rng = np.random.default_rng(0)
    eps, trials, runs = 1.0, 400, 300
    p_in = special.expit(eps)

    # Execute
    bounds = [
        many_trial_lower_bound(
            rng.random(trials) < p_in, rng.random(trials) < 1 - p_in, delta=0.0, split_seed=r
        ).epsilon
        for r in range(runs)
    ]

    # Assert: exceedances of a valid 95% bound are Bin(300, <= 0.05): mean <= 15, 3 s.d. ~ 11
    assert sum(b > eps for b in bounds) <= 26
    assert np.median(bounds) > 0.3  # and it has power


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": 1.0}, "confidence"),
        ({"delta": 1.0}, "delta"),
        ({"scores_with": [1.0]}, "at least 2 trials"),
        ({"scores_with": [1.0, np.nan]}, "finite"),
    ],
)
def test_many_trial_bound_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"scores_with": [1.0, 2.0], "scores_without": [0.0, 1.0], "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=match):
        many_trial_lower_bound(**args)


# --- the one-run bound ------------------------------------------------------------------------
def test_one_run_all_correct_without_delta_has_closed_form() -> None:
    # P[Bin(r, q) >= r] = q^r = 0.05  <=>  q = 0.05^(1/r), eps = logit(q)
    r = 100
    closed = float(special.logit(0.05 ** (1 / r)))

    bound = one_run_lower_bound(canaries=1000, guesses=r, correct=r, delta=0.0, resolution=1e-4)

    assert closed - 1e-4 <= bound.epsilon <= closed


@pytest.mark.parametrize(("r", "v"), [(200, 140), (1000, 560), (50, 45)])
def test_one_run_without_delta_is_the_binomial_tail(r: int, v: int) -> None:
    # Prepare: with delta = 0 the bound solves P[Bin(r, e^eps / (1 + e^eps)) >= v] = 0.05
    root = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, special.expit(e)) - 0.05, 0, 20)

    # Execute
    bound = one_run_lower_bound(canaries=r, guesses=r, correct=v, delta=0.0)

    # Assert
    assert root - 1e-3 <= bound.epsilon <= root


def test_one_run_bound_grows_with_right_guesses_and_is_zero_at_chance() -> None:
    bounds = [
        one_run_lower_bound(canaries=1000, guesses=500, correct=v, delta=DELTA).epsilon
        for v in range(250, 501, 25)
    ]

    assert bounds[0] == 0.0  # half right: what coin flips give
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] > 1.5


def test_one_run_delta_only_lowers_the_bound() -> None:
    args = {"canaries": 1000, "guesses": 300, "correct": 260}
    plain = one_run_lower_bound(**args, delta=0.0).epsilon
    with_delta = one_run_lower_bound(**args, delta=1e-4).epsilon

    assert 0 < with_delta <= plain
    assert one_run_p_value(**args, epsilon=1.0, delta=1e-4) >= one_run_p_value(
        **args, epsilon=1.0, delta=0.0
    )


@pytest.mark.parametrize("delta", [0.0, 1e-4])
def test_one_run_bound_holds_with_its_confidence(delta: float) -> None:
    """An exactly 1-DP auditee (randomised response per canary) passes eps = 1 w.p. <= 5%."""
    # Prepare: the bound depends only on v; find the fewest right guesses that pass eps
    eps, r = 1.0, 400
    fewest = next(
        v
        for v in range(r // 2, r + 1)
        if one_run_lower_bound(canaries=r, guesses=r, correct=v, delta=delta).epsilon > eps
    )

    # Execute: exact probability that randomised response gets at least that many right
    chance = stats.binom.sf(fewest - 1, r, special.expit(eps))

    # Assert
    assert chance <= 0.05


def test_one_run_guesses_count_top_and_bottom() -> None:
    scores = [0.1, 0.9, 0.5, 0.3, 0.7]
    included = [False, True, True, True, False]

    # top 2 = {0.9 in, 0.7 out}; bottom 1 = {0.1 out}: 3 guesses, 2 right
    assert one_run_guesses(scores, included, guess_in=2, guess_out=1) == (3, 2)
    assert one_run_audit(scores, included, guess_in=2, guess_out=1, delta=0.0).guesses == 3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: one_run_guesses([1.0, 2.0], [True], guess_in=1, guess_out=0), "one coin"),
        (lambda: one_run_guesses([1.0, 2.0], [True, False], guess_in=2, guess_out=1), "at most"),
        (lambda: one_run_lower_bound(canaries=10, guesses=11, correct=5, delta=0.0), "guesses"),
        (lambda: one_run_lower_bound(canaries=10**5, guesses=10, correct=5, delta=1e-5), "2 \\*"),
    ],
)
def test_one_run_rejects_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- claims -----------------------------------------------------------------------------------
@pytest.mark.parametrize("z", [0.7, 1.0, 2.0])
def test_exact_gaussian_epsilon_is_below_every_accountant(z: float) -> None:
    exact = gaussian_epsilon(z, delta=DELTA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prv = claimed_epsilon(z, delta=DELTA, kind=AccountantKind.PRV)
    rdp = claimed_epsilon(z, delta=DELTA, kind=AccountantKind.RDP)

    assert exact <= prv <= rdp
    assert prv == pytest.approx(exact, rel=0.02)  # PRV is near-exact for one Gaussian


# --- the mechanisms under audit ---------------------------------------------------------------
@pytest.mark.parametrize(("channel", "sensitivity"), SENSITIVITY)
def test_canary_moves_the_release_by_exactly_the_sensitivity(
    channel: Channel, sensitivity: float
) -> None:
    # Prepare: no noise, so the two releases differ by the canary's clipped contribution
    game = canary_game(channel, noise_multiplier=0.0, clip_norm=CLIP, batch=BATCH, clients=CLIENTS)

    # Execute
    shift = game.release(True, NoiseSource.public_seed(0)) - game.release(
        False, NoiseSource.public_seed(0)
    )

    # Assert: length at the bound, along the direction the adversary projects on
    assert float(torch.linalg.vector_norm(shift)) == pytest.approx(sensitivity, rel=1e-5)
    assert float(shift @ game.direction) == pytest.approx(sensitivity, rel=1e-5)


# --- the audit: passes the real mechanism, fails broken ones ----------------------------------
# power: the bound 1000 trials reliably reach (>= 0.53 in 1000 simulated audits at z = 1;
# at z = 2 they see too little to promise more than 0; benchmarks/ has the full-size run)
@pytest.mark.parametrize(("z", "power"), [(1.0, 0.3), (2.0, 0.0)])
@pytest.mark.parametrize(("channel", "sensitivity"), SENSITIVITY)
def test_audit_passes_the_real_mechanism(
    channel: Channel, sensitivity: float, z: float, power: float
) -> None:
    # Execute
    trials = 1000
    audit = _audit(channel, z=z, claimed_z=z, trials=trials)

    # Assert: a bound at or below the truth (and so the claim), with power
    assert not audit.violation
    assert power <= audit.bound.epsilon <= audit.exact_epsilon
    # and the scores are what the noise says: std z * sensitivity, shift = sensitivity
    noise_std = np.std(audit.scores_without)
    shift = audit.scores_with.mean() - audit.scores_without.mean()
    assert noise_std == pytest.approx(z * sensitivity, rel=4 / math.sqrt(2 * trials))
    assert shift / noise_std == pytest.approx(1.0 / z, abs=4 * math.sqrt(2 / trials))


@pytest.mark.parametrize("channel", list(Channel))
def test_audit_fails_noise_scaled_by_a_tenth(channel: Channel) -> None:
    audit = _audit(channel, z=0.2, claimed_z=2.0, trials=300)

    assert audit.violation
    assert audit.bound.epsilon > audit.claimed_epsilon


@pytest.mark.parametrize("channel", list(Channel))
def test_audit_fails_without_clipping(channel: Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the bug: per-sample gradients pass unclipped (the canary is 100 C long)
    monkeypatch.setattr(mechanism, "clipped_sum", lambda rows, _max_norm: rows.sum(0))

    # Execute
    audit = _audit(channel, z=2.0, claimed_z=2.0, trials=300)

    # Assert
    assert audit.violation
    assert mechanism.CANARY_NORM_FACTOR == 100.0


@pytest.mark.parametrize("channel", list(Channel))
def test_audit_fails_noise_from_a_public_seed(channel: Channel) -> None:
    audit = _audit(channel, z=2.0, claimed_z=2.0, trials=300, replay=True)

    assert audit.violation
    assert audit.bound.false_positives == audit.bound.false_negatives == 0


# --- dpfpl audit ------------------------------------------------------------------------------
def test_cli_writes_a_report_and_passes(tmp_path: Path) -> None:
    # Execute
    args = "audit --white-box --noise-multiplier 2 --trials 200 --channel global --batch-size 8"
    code = cli.main([*args.split(), "--clients", "4", "--out", str(tmp_path)])

    # Assert
    report = json.loads((tmp_path / "report.json").read_text())
    (entry,) = report["audits"]
    assert code == 0 and report["violation"] is False
    assert entry["channel"] == "global" and entry["verdict"] == "pass"
    assert entry["claimed_epsilon"] == pytest.approx(_claim(2.0))
    assert entry["trials"] == {"with_canary": 200, "without_canary": 200}
    assert entry["lower_bound"] <= entry["claimed_epsilon"] and entry["confidence"] == 0.95
    assert "adversary" in entry and (tmp_path / "audit.png").stat().st_size > 0


def test_cli_exits_non_zero_on_a_violation(tmp_path: Path) -> None:
    args = "audit --white-box --noise-multiplier 2 --trials 100 --channel local --batch-size 8"
    code = cli.main([*args.split(), "--public-noise-seed", "0", "--out", str(tmp_path)])

    assert code == 1
    assert json.loads((tmp_path / "report.json").read_text())["violation"] is True


def test_cli_without_a_kind_says_which_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main(["audit", "--noise-multiplier", "2", "--out", "unused"])

    err = capsys.readouterr().err
    assert ended.value.code == 2 and "--white-box" in err and "--one-run" in err


def test_cli_white_box_needs_its_noise_multiplier(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["audit", "--white-box", "--out", "unused"])

    assert code == 2 and "--noise-multiplier" in capsys.readouterr().err


def test_cli_choices_match_the_enums() -> None:
    # the CLI mirrors them as strings so that building the parser stays import-light
    assert audit_cli.CHANNEL_CHOICES == tuple(c.value for c in Channel)
    assert audit_cli.ACCOUNTANT_CHOICES == tuple(k.value for k in AccountantKind)
