"""Privacy audit: the bounds are valid, the audit fails broken mechanisms and passes ours."""

from __future__ import annotations

import ast
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
from dpfpl_app.audit.bounds import (
    clopper_pearson_upper,
    epsilon_from_error_rates,
    many_trial_lower_bound,
    one_run_audit,
    one_run_guesses,
    one_run_lower_bound,
    one_run_p_value,
)
from dpfpl_app.audit.claims import claimed_epsilon, gaussian_epsilon, release_claim
from dpfpl_app.audit.measurements import noise_check, shift_check
from dpfpl_app.audit.mechanism import Channel, canary_game
from dpfpl_app.audit.white_box import WhiteBoxAudit, audit_white_box, replay_adversary
from dpfpl_app.federation import reply_checks
from dpfpl_app.method.prompt_learner import PromptLearner
from dpfpl_app.privacy import mechanics
from dpfpl_app.privacy.accounting import AccountantKind
from dpfpl_app.privacy.dp_channel import ChannelPlan
from dpfpl_app.privacy.noise import NoiseSource
from dpfpl_app.privacy.secure_channel import secagg_config
from dpfpl_app.secagg import skellam
from dpfpl_app.service import cli

DELTA = 1e-5
CLIP, BATCH, CLIENTS = 10.0, 8, 4
# what one sample moves each scored release by (ALGORITHM.md section 4), written out by
# hand: local scores dv (C / B of the pair's sqrt(2) C / B), global the mean, secure the sum
SENSITIVITY = [
    (Channel.LOCAL, CLIP / BATCH),
    (Channel.GLOBAL, CLIP / (BATCH * CLIENTS)),
    (Channel.SECURE, CLIP / BATCH),
]
# and the noise std per scored coordinate at multiplier z = 1 (secure: 4 survivors, t = 3)
NOISE_AT_Z1 = {
    Channel.LOCAL: math.sqrt(2) * CLIP / BATCH,
    Channel.GLOBAL: CLIP / (BATCH * CLIENTS),
    Channel.SECURE: CLIP / BATCH * math.sqrt(4 / 3),
}


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


def _audit(channel: Channel, *, z: float, trials: int, replay: bool = False) -> WhiteBoxAudit:
    """The audit ``dpfpl audit --white-box`` runs, on this file's C, B and N."""
    game = canary_game(
        channel,
        noise_multiplier=z,
        clip_norm=CLIP,
        batch=BATCH,
        clients=CLIENTS,
        public_seed=7 if replay else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns on log(0) at sample rate 1
        claim, exact = release_claim(z, survivor_ratio=game.survivor_ratio, delta=DELTA)
    return audit_white_box(
        game,
        trials=trials,
        claimed_epsilon=claim,
        exact_epsilon=exact,
        delta=DELTA,
        adversary=replay_adversary(game) if replay else None,
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


# --- the measurements ---------------------------------------------------------------------------
def test_noise_and_shift_tests_fail_at_their_stated_rate() -> None:
    """Correct Gaussian releases fail each test with probability false_alarm, no more."""
    # Prepare: 1000 audits of releases that are exactly what they claim, tests at 10%
    rng = np.random.default_rng(0)
    std, shift, level, audits = 0.7, 0.3, 0.1, 1000
    noise_fails = shift_fails = 0

    # Execute
    for _ in range(audits):
        without = rng.normal(0.0, std, size=(40, 5))
        with_ = rng.normal(0.0, std, size=(40, 5)) + np.array([shift, 0, 0, 0, 0])
        noise_fails += not noise_check(with_, without, claimed_std=std, false_alarm=level).ok
        shift_fails += not shift_check(
            with_[:, 0], without[:, 0], claimed_shift=shift, claimed_std=std, false_alarm=level
        ).ok

    # Assert: each count is Bin(1000, 0.1): mean 100, sd 9.5; and both tests have power
    assert 60 <= noise_fails <= 140 and 60 <= shift_fails <= 140
    assert not noise_check(with_, without / 3, claimed_std=std).ok
    assert not shift_check(with_[:, 0] + 5, without[:, 0], claimed_shift=shift, claimed_std=std).ok


@pytest.mark.parametrize(("channel", "sensitivity"), SENSITIVITY)
def test_canary_moves_the_release_by_exactly_the_sensitivity(
    channel: Channel, sensitivity: float
) -> None:
    # Prepare: no noise, so the two releases differ by the canary's clipped contribution
    # (secure: up to one rounding unit per coordinate and client, 1 / scale)
    game = canary_game(
        channel, noise_multiplier=0.0, clip_norm=CLIP, batch=BATCH, clients=CLIENTS, public_seed=0
    )
    dim = game.release(False, 0).numel()
    scale = secagg_config(dim=dim, clip_norm=CLIP, batch_size=BATCH, z_global=0.0).effective_scale
    slack = math.sqrt(dim) * CLIENTS / scale if channel is Channel.SECURE else 1e-5

    # Execute
    shift = game.release(True, 0) - game.release(False, 0)

    # Assert: length at the bound, along the direction the adversary projects on
    assert float(torch.linalg.vector_norm(shift)) == pytest.approx(sensitivity, abs=slack)
    assert float(shift @ game.direction) == pytest.approx(sensitivity, abs=slack)
    assert game.sensitivity == pytest.approx(sensitivity)


@pytest.mark.parametrize("channel", list(Channel))
def test_games_claim_the_noise_of_algorithm_md(channel: Channel) -> None:
    game = canary_game(channel, noise_multiplier=1.0, clip_norm=CLIP, batch=BATCH, clients=CLIENTS)

    assert game.noise_std == pytest.approx(NOISE_AT_Z1[channel])


# --- the audit: passes the production code, fails mutants of it --------------------------------
@pytest.mark.parametrize("channel", list(Channel))
def test_audit_passes_the_production_code(channel: Channel) -> None:
    # Execute
    audit = _audit(channel, z=1.0, trials=300)

    # Assert: noise and shift as claimed (each test false-alarms w.p. 1e-6), and a bound
    # at or below the truth and so the claim
    assert audit.noise.ok and audit.shift.ok
    assert not audit.violation
    assert audit.bound.epsilon <= audit.exact_epsilon
    assert audit.noise.measured_std == pytest.approx(NOISE_AT_Z1[channel], rel=0.05)


def _scaled(method, factor: float):  # noqa: ANN001, ANN202 (any method, same signature)
    """``method`` with its float result multiplied by ``factor``: a mutant."""
    return lambda *args, **kwargs: method(*args, **kwargs) * factor


def test_audit_fails_a_tenth_of_the_noise_in_prompt_learner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the bug: the learner's local noise std cut 10x (its unit tests aside)
    monkeypatch.setattr(PromptLearner, "_noise_std", _scaled(PromptLearner._noise_std, 0.1))

    # Execute
    audit = _audit(Channel.LOCAL, z=1.0, trials=300)

    # Assert
    assert audit.violation and not audit.noise.ok
    assert audit.noise.measured_std < audit.noise.low


def test_audit_fails_a_tenth_of_the_noise_in_the_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the bug: the aggregation's noise std (plan.global_std) cut 10x
    monkeypatch.setattr(ChannelPlan, "global_std", _scaled(ChannelPlan.global_std, 0.1))

    # Execute
    audit = _audit(Channel.GLOBAL, z=1.0, trials=300)

    # Assert
    assert audit.violation and not audit.noise.ok
    assert audit.noise.measured_std < audit.noise.low


def test_audit_fails_a_wrong_divisor_in_the_strategy_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the bug: the clipped sum divided by N / 2 instead of N
    mean = reply_checks.clipped_mean

    def halved(accepted: list, clip_norm: float, round_: int) -> torch.Tensor:
        return mean(accepted, clip_norm, round_) * len(accepted) / (len(accepted) // 2)

    monkeypatch.setattr(reply_checks, "clipped_mean", halved)

    # Execute
    audit = _audit(Channel.GLOBAL, z=1.0, trials=300)

    # Assert: the canary moves the release twice as far as claimed
    assert audit.violation and not audit.shift.ok
    assert audit.shift.measured == pytest.approx(2 * audit.shift.claimed, rel=0.3)


@pytest.mark.parametrize("channel", list(Channel))
def test_audit_fails_without_clipping(channel: Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the bug: per-sample gradients summed unclipped (the canary is 100 C long),
    # on the clients and in the server's re-clip alike
    monkeypatch.setattr(mechanics, "clipped_sum", lambda rows, _max_norm: rows.sum(0))

    # Execute
    audit = _audit(channel, z=1.0, trials=300)

    # Assert
    assert audit.violation and not audit.shift.ok
    assert audit.shift.measured > 2 * audit.shift.claimed


def test_audit_fails_a_tenth_of_the_skellam_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the bug: each client's Skellam share drawn with a tenth of its variance
    draw = skellam.skellam
    monkeypatch.setattr(skellam, "skellam", lambda var, n, stream: draw(var / 10, n, stream))

    # Execute
    audit = _audit(Channel.SECURE, z=1.0, trials=300)

    # Assert: std sqrt(10) times too small
    assert audit.violation and not audit.noise.ok
    assert audit.noise.measured_std == pytest.approx(
        audit.noise.claimed_std / math.sqrt(10), rel=0.1
    )


@pytest.mark.parametrize("channel", [Channel.LOCAL, Channel.GLOBAL])
def test_audit_fails_a_tenth_of_the_noise_in_noise_source(
    channel: Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the bug: the noise source draws a tenth of the std it is asked for
    gaussian = NoiseSource.gaussian

    def weak(self: NoiseSource, shape, *, std: float, **kwargs) -> torch.Tensor:  # noqa: ANN001
        return gaussian(self, shape, std=std / 10, **kwargs)

    monkeypatch.setattr(NoiseSource, "gaussian", weak)

    # Execute
    audit = _audit(channel, z=1.0, trials=300)

    # Assert
    assert audit.violation and not audit.noise.ok


@pytest.mark.parametrize("channel", list(Channel))
def test_audit_fails_noise_from_a_public_seed(channel: Channel) -> None:
    # 150 trials told apart without error bound epsilon by 2.98 > every claim at z = 2
    audit = _audit(channel, z=2.0, trials=150, replay=True)

    assert audit.violation and audit.epsilon_violation
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


def test_cli_exits_non_zero_on_a_noise_cut_in_prompt_learner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the mutant that exited 0 when the audit ran a copy of the release
    monkeypatch.setattr(PromptLearner, "_noise_std", _scaled(PromptLearner._noise_std, 0.1))
    args = "audit --white-box --noise-multiplier 1 --trials 200 --channel local --batch-size 8"

    # Execute
    code = cli.main([*args.split(), "--out", str(tmp_path)])

    # Assert
    (entry,) = json.loads((tmp_path / "report.json").read_text())["audits"]
    assert code == 1
    assert entry["noise"]["verdict"] == "VIOLATION" and entry["verdict"] == "VIOLATION"


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


# --- layers -----------------------------------------------------------------------------------
def test_method_imports_nothing_from_audit() -> None:
    """``method/`` is below ``audit/``: the canary hook is a Protocol the node fills in."""
    method = Path(audit_cli.__file__).parents[1] / "method"
    offenders = []
    for path in sorted(method.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("dpfpl_app.audit")]

    assert method.is_dir() and len(list(method.glob("*.py"))) > 3
    assert offenders == []
