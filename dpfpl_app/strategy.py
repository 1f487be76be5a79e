"""Server side of DP-FPL: Algorithm 1, steps 7-8, as a Flower message-API strategy.

The server holds the global prompt ``p_G``, broadcasts it, receives each client's
clipped global-prompt gradient, averages them with an unweighted ``1/N`` mean, adds
Gaussian noise (the "global DP" channel) and applies ``p_G <- p_G - server_lr * mean``.
Only the global prompt ever travels; replies that carry anything else are refused
(see :mod:`dpfpl_app.wire`).

Per-round metrics reach the ServerApp two ways: ``strategy.start(...)`` returns a Flower
``Result`` whose ``train_metrics_clientapp[r]`` and ``evaluate_metrics_clientapp[r]``
hold this strategy's train and evaluate ``MetricRecord`` of round ``r``; and the
optional ``on_round(round, metrics)`` callback receives both merged into one plain dict
as soon as the round's evaluation is aggregated (for progress lines and results files
written while the run is still going).
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from logging import DEBUG, INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from dpfpl_app import wire
from dpfpl_app.accounting import (
    AccountantKind,
    ChannelAccountant,
    PrivacyBudgetError,
    calibrate_noise_multiplier,
    paper_noise_multiplier,
)
from dpfpl_app.config import DPMode
from dpfpl_app.node_wait import wait_for_nodes

RoundCallback = Callable[[int, dict[str, float | int]], None]

# An honest client's clipped gradient can exceed clip_norm by float rounding only.
_SUSPICIOUS_FACTOR = 2.0
_CLIP_SLACK = 1e-4


@dataclass(frozen=True)
class GlobalNoise:
    """Noise settings of the global (server) channel.

    Parameters
    ----------
    mode : DPMode
        ``off``: no noise. ``paper``: the paper's fixed multiplier; ``epsilon`` is the
        nominal paper epsilon, reported but not a formal sample-level guarantee.
        ``per-sample``: the multiplier is calibrated so that ``total_rounds`` noisy
        rounds spend at most the target ``epsilon`` at ``delta``.
    noise_multiplier : float, optional
        Paper mode only: the fixed multiplier z (see ``GlobalNoise.paper``).
    epsilon : float, optional
        Paper mode: nominal epsilon. Per-sample mode: target epsilon.
    delta : float
        The delta of the (epsilon, delta) statements.
    accountant : AccountantKind
        Per-sample mode: the opacus accountant that converts steps into epsilon.
    total_rounds : int, optional
        Per-sample mode: the number of noisy rounds the budget must cover.

    """

    mode: DPMode = DPMode.OFF
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    accountant: AccountantKind = AccountantKind.RDP
    total_rounds: int | None = None

    def __post_init__(self) -> None:
        """Coerce enum values given as strings and check the fields each mode needs."""
        object.__setattr__(self, "mode", DPMode(self.mode))
        object.__setattr__(self, "accountant", AccountantKind(self.accountant))
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.mode is DPMode.OFF:
            return
        if self.epsilon is None or not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0 in mode '{self.mode.value}', got {self.epsilon}")
        if self.mode is DPMode.PAPER and not (self.noise_multiplier or 0.0) > 0:
            raise ValueError(
                f"noise_multiplier must be > 0 in mode 'paper', got {self.noise_multiplier}"
            )
        if self.mode is DPMode.PER_SAMPLE and not (self.total_rounds or 0) >= 1:
            raise ValueError(
                f"total_rounds must be >= 1 in mode 'per-sample', got {self.total_rounds}"
            )

    @classmethod
    def off(cls) -> GlobalNoise:
        """No global noise (no privacy on the global channel)."""
        return cls(mode=DPMode.OFF)

    @classmethod
    def paper(cls, *, epsilon: float, delta: float, rounds: int) -> GlobalNoise:
        """Use the paper's fixed multiplier ``sqrt(T ln(1/delta)) / epsilon``."""
        z = paper_noise_multiplier(epsilon=epsilon, delta=delta, rounds=rounds)
        return cls(mode=DPMode.PAPER, noise_multiplier=z, epsilon=epsilon, delta=delta)

    @classmethod
    def per_sample(
        cls,
        *,
        target_epsilon: float,
        delta: float,
        total_rounds: int,
        accountant: AccountantKind = AccountantKind.RDP,
    ) -> GlobalNoise:
        """Calibrate the multiplier from a target (epsilon, delta) over ``total_rounds``."""
        return cls(
            mode=DPMode.PER_SAMPLE,
            epsilon=target_epsilon,
            delta=delta,
            accountant=accountant,
            total_rounds=total_rounds,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and for comparing with a loaded checkpoint."""
        values = asdict(self)
        values["mode"] = self.mode.value
        values["accountant"] = self.accountant.value
        return values


class DPFPLStrategy(Strategy):
    """Global prompt, unweighted mean of clipped gradients, Gaussian noise, accounting.

    Sensitivity of the global channel (what the noise is calibrated against)
    ------------------------------------------------------------------------
    Each client sends ``g_i = (1/B) * sum_{s in batch_i} clip_C(grad_s)``: the sum of its
    per-sample-clipped gradients over a Poisson-sampled batch, divided by the EXPECTED
    batch size ``B`` (not the realised one, which would leak whether a sample was
    drawn). Adding or removing one sample of client i changes ``g_i`` by at most
    ``C/B`` in L2 norm and leaves every other ``g_j`` unchanged, so the server's
    UNWEIGHTED mean ``(1/N) sum_i g_i`` over the N accepted replies moves by at most
    ``C/(B*N)``. A mean weighted by ``num-examples`` would make this client-dependent and
    is therefore not used. Gaussian noise of std ``z*C/(B*N)`` on the mean is thus a
    Gaussian mechanism with multiplier z; with Poisson rate ``q = B/|D_i|`` every round
    is one subsampled Gaussian step of the accountant, recorded with the largest q of
    the round (an upper bound for every client). Each node counts once per round:
    duplicate replies from one node are refused, since they would double its weight.
    The server re-clips every ``g_i`` to ``C``: this bounds what a client that skips
    clipping can do to ``p_G`` (at most ``server_lr*C/N`` per round), but it cannot
    restore sample-level sensitivity for such a client; per-sample clipping is the
    client's job. The server sees each clipped ``g_i`` in clear (the paper's
    honest-server assumption) until secure aggregation removes that assumption.

    Parameters
    ----------
    initial_prompt : torch.Tensor
        The global prompt ``p_G`` (``n_ctx x d``, float32); fixes the shape and dtype
        every reply must match. ``global_arrays()`` returns it for ``start(...)``.
    server_lr : float
        Server learning rate ``eta_G`` (> 0).
    clip_norm : float
        ``C_th``: the per-sample clip of the clients and the server's re-clip (> 0).
    batch_size : int
        The clients' expected batch size ``B`` (>= 1), the denominator of their mean.
    noise : GlobalNoise
        Global-channel noise and accounting settings.
    min_nodes : int
        Connected nodes required before a round starts; also the minimum sample.
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled per round, in (0, 1].
    node_wait_timeout : float
        Seconds to wait for ``min_nodes`` before failing with a RuntimeError.
    seed : int, optional
        Seeds the noise generator and node sampling (tests, reproducible studies).
        Without it both are seeded from the OS (``secrets``).
    generator : torch.Generator, optional
        An explicit noise generator (exclusive with ``seed``).
    on_round : callable, optional
        ``on_round(round, metrics)`` after each round's evaluation is aggregated.

    Notes
    -----
    torch's CPU generator is a Mersenne Twister and floating-point Gaussian samples are
    not a perfect Gaussian (Mironov, CCS 2012): the OS seed keeps the noise
    unpredictable across runs, not cryptographically secure. The generator state is
    deliberately not checkpointed: whoever read it could predict and remove the noise.

    """

    def __init__(
        self,
        *,
        initial_prompt: torch.Tensor,
        server_lr: float,
        clip_norm: float,
        batch_size: int,
        noise: GlobalNoise,
        min_nodes: int = 2,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        node_wait_timeout: float = 300.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        _validate_arguments(locals())
        self.server_lr = float(server_lr)
        self.clip_norm = float(clip_norm)
        self.batch_size = int(batch_size)
        self.noise = noise
        self.min_nodes = int(min_nodes)
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.node_wait_timeout = float(node_wait_timeout)
        self.on_round = on_round
        self._prompt = initial_prompt.detach().clone()
        os_seed = seed if seed is not None else secrets.randbits(63)
        self._public_seed = seed  # only a public seed may be replayed on resume
        self._generator = generator or torch.Generator().manual_seed(os_seed)
        self._noise_draws = 0
        self._node_rng = random.Random(os_seed)
        self._accountant = (
            ChannelAccountant(kind=noise.accountant, delta=noise.delta)
            if noise.mode is DPMode.PER_SAMPLE
            else None
        )
        self._multiplier: float | None = noise.noise_multiplier
        self._calibration_rate: float | None = None
        self._round_offset = 0
        self._last_round = 0
        self._train_metrics: dict[str, float | int] = {}
        self._said_once: set[str] = set()
        self._epsilon_spent: float | None = None  # cache of the accountant's epsilon
        # The messages of the current phase: Flower's own error replies (e.g. for a node
        # that died) come from the SuperLink, so only these say which node was asked.
        self._sent: list[Message] = []

    # --- public views ----------------------------------------------------------------
    @property
    def global_prompt(self) -> torch.Tensor:
        """A copy of the current global prompt ``p_G``."""
        return self._prompt.clone()

    @property
    def noise_multiplier(self) -> float | None:
        """The multiplier in use (None while off, or per-sample before calibration)."""
        return self._multiplier if self.noise.mode is not DPMode.OFF else None

    @property
    def rounds_done(self) -> int:
        """The last round this strategy aggregated (counting across resumes)."""
        return self._last_round

    def global_arrays(self) -> ArrayRecord:
        """Return the current global prompt as the ArrayRecord to pass to ``start(...)``."""
        return wire.global_prompt_record(self._prompt)

    def epsilon(self) -> float:
        """Epsilon of the global channel so far (see ``GlobalNoise`` for its meaning)."""
        if self.noise.mode is DPMode.OFF:
            return math.inf
        if self.noise.mode is DPMode.PAPER:
            return float(self.noise.epsilon or math.inf)
        if self._accountant is None:
            return math.inf
        if self._epsilon_spent is None:  # recomputed only after a release (costly: RDP orders)
            self._epsilon_spent = self._accountant.epsilon()
        return self._epsilon_spent

    def summary(self) -> None:
        """Log the configuration, including what the printed epsilon means."""
        log(INFO, "\t├──> DP-FPL global channel: mode=%s", self.noise.mode.value)
        log(
            INFO,
            "\t│\t├── server_lr=%g clip_norm=%g batch_size=%d",
            self.server_lr,
            self.clip_norm,
            self.batch_size,
        )
        log(INFO, "\t│\t└── noise: %s", self.noise.to_dict())
        log(
            INFO,
            "\t└──> Sampling: min_nodes=%d fraction train=%.2f evaluate=%.2f wait<=%gs",
            self.min_nodes,
            self.fraction_train,
            self.fraction_evaluate,
            self.node_wait_timeout,
        )
        self._explain_epsilon()

    # --- configure -------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Broadcast the global prompt to a sample of nodes for one training step."""
        return self._configure(
            server_round, arrays, config, grid, MessageType.TRAIN, self.fraction_train
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Broadcast the global prompt to a sample of nodes for evaluation."""
        return self._configure(
            server_round, arrays, config, grid, MessageType.EVALUATE, self.fraction_evaluate
        )

    def _configure(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
        fraction: float,
    ) -> list[Message]:
        """One message per sampled node carrying ``p_G`` and a copy of ``config``.

        ``arrays`` is Flower's current global model; it is adopted as ``p_G`` after a
        check, so the strategy follows ``start(...)`` exactly. The caller's config is
        copied, never mutated (``start`` reuses one ConfigRecord for every round).
        """
        round_ = self._round_offset + server_round
        self._adopt(arrays)
        node_ids = self._sample_nodes(grid, fraction, message_type)
        payload = ConfigRecord(dict(config))
        payload[wire.SERVER_ROUND] = round_
        if self.noise.mode is not DPMode.OFF:
            # public: what the broadcast p_G has spent, for the clients' exported prompts
            payload[wire.EPS_GLOBAL] = self.epsilon()
        content = RecordDict(
            {wire.ARRAYS_RECORD: self.global_arrays(), wire.CONFIG_RECORD: payload}
        )
        log(INFO, "%s round %d: sampled %d node(s)", message_type, round_, len(node_ids))
        self._sent = [
            Message(content, node, message_type, group_id=str(round_)) for node in node_ids
        ]
        return self._sent

    def _adopt(self, arrays: ArrayRecord) -> None:
        prompt = wire.read_global_prompt(arrays)
        if prompt.shape != self._prompt.shape:
            raise ValueError(
                f"arrays hold a global prompt of shape {tuple(prompt.shape)}, but this "
                f"strategy was built for {tuple(self._prompt.shape)}; pass "
                "strategy.global_arrays() as start(initial_arrays=...)"
            )
        self._prompt = prompt

    def _sample_nodes(self, grid: Grid, fraction: float, purpose: str) -> list[int]:
        """Sample nodes like FedAvg, but give up after ``node_wait_timeout`` seconds."""
        nodes = wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout, purpose)
        size = min(len(nodes), max(int(len(nodes) * fraction), self.min_nodes))
        return sorted(self._node_rng.sample(nodes, size))

    # --- aggregate train -------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply steps 7-8: noisy unweighted mean of re-clipped gradients, then the update.

        A round in which every reply is refused adds no noise, leaves ``p_G`` as it is
        and spends no privacy budget; its metrics still say what was refused.
        """
        replies = list(replies)
        round_ = self._last_round = self._round_offset + server_round
        accepted = self._accept_train_replies(round_, replies)
        accepted = self._within_budget(round_, accepted)
        counts: dict[str, float | int] = {
            wire.ACCEPTED: len(accepted),
            wire.REJECTED: len(replies) - len(accepted),
            wire.BYTES_RECEIVED: sum(wire.reply_array_bytes(msg) for msg in replies),
        }
        if not accepted:
            log(
                WARNING,
                "train round %d: all %d replies refused: global prompt unchanged, no noise "
                "added, no privacy budget spent",
                round_,
                len(replies),
            )
            self._train_metrics = {**counts, wire.EPS_GLOBAL: self.epsilon()}
            return None, MetricRecord(dict(self._train_metrics))
        mean, n_clipped = self._clipped_mean(round_, accepted)
        multiplier, noise_std = self._step_noise(accepted)
        noise = torch.randn(mean.shape, generator=self._generator, dtype=mean.dtype) * noise_std
        self._noise_draws += 1
        self._prompt = (self._prompt.double() - self.server_lr * (mean + noise)).to(
            self._prompt.dtype
        )
        self._spend(multiplier, max(r.sample_rate for r in accepted))
        self._train_metrics = {
            **counts,
            wire.SERVER_CLIPPED: n_clipped,
            wire.TRAIN_LOSS: sum(r.train_loss for r in accepted) / len(accepted),
            wire.EPS_LOCAL: max(r.eps_local for r in accepted),
            wire.EPS_GLOBAL: self.epsilon(),
            wire.NOISE_MULTIPLIER: multiplier,
            wire.NOISE_STD: noise_std,
            wire.GRAD_NORM: float(mean.norm()),
        }
        return self.global_arrays(), MetricRecord(dict(self._train_metrics))

    def _accept_train_replies(self, round_: int, replies: list[Message]) -> list[wire.TrainReply]:
        """Keep the replies that pass the protocol checks; log every refusal with its node."""
        accepted: list[wire.TrainReply] = []
        seen: set[int] = set()
        for msg in replies:
            try:
                reply = wire.parse_train_reply(
                    msg, expected_shape=tuple(self._prompt.shape), expected_dtype=self._prompt.dtype
                )
                if reply.node_id in seen:
                    raise wire.InvalidReply("duplicate reply: a node counts once per round")
            except wire.InvalidReply as err:
                self._log_refusal("train", round_, msg, str(err))
                continue
            seen.add(reply.node_id)
            accepted.append(reply)
        return accepted

    def _clipped_mean(
        self, round_: int, accepted: list[wire.TrainReply]
    ) -> tuple[torch.Tensor, int]:
        """Unweighted mean of the replies, each re-clipped to ``clip_norm`` (float64)."""
        grads = torch.stack([r.grad.to(torch.float64) for r in accepted])  # (N, n_ctx, d)
        norms = grads.flatten(1).norm(dim=1)  # (N,)
        # clamp(min=C): the factor is exactly 1 for norms <= C, and never divides by zero.
        factors = self.clip_norm / norms.clamp(min=self.clip_norm)
        n_clipped = 0
        for reply, norm in zip(accepted, norms.tolist(), strict=True):
            if norm > self.clip_norm * (1.0 + _CLIP_SLACK):
                n_clipped += 1
                # A Poisson batch larger than B legitimately exceeds C (sum of clipped
                # samples / B); only far beyond that does a client look broken or hostile.
                suspicious = norm > _SUSPICIOUS_FACTOR * self.clip_norm
                log(
                    WARNING if suspicious else DEBUG,
                    "train round %d: node %d sent a gradient of norm %.4g > clip_norm %.4g; "
                    "re-clipped on the server (clipping is non-expansive: the C/B "
                    "sensitivity still holds)",
                    round_,
                    reply.node_id,
                    norm,
                    self.clip_norm,
                )
        return (grads * factors[:, None, None]).mean(dim=0), n_clipped

    # --- noise and accounting --------------------------------------------------------
    def _step_noise(self, accepted: list[wire.TrainReply]) -> tuple[float, float]:
        """``(z, std)`` for this round; std = z * C / (B * N_accepted), see the class."""
        if self.noise.mode is DPMode.OFF:
            return 0.0, 0.0
        multiplier = float(self._multiplier or 0.0)
        return multiplier, multiplier * self.clip_norm / (self.batch_size * len(accepted))

    def _within_budget(self, round_: int, accepted: list[wire.TrainReply]) -> list[wire.TrainReply]:
        """Calibrate (per-sample mode) for the round's largest sampling rate.

        The first aggregation calibrates z for ``total_rounds`` at the largest reported
        ``q``. A later, larger ``q`` recalibrates z so that the steps already taken plus
        the remaining ones still fit the target; if no multiplier can, the replies with
        that larger ``q`` are refused instead (the run goes on, the budget holds).
        """
        if self.noise.mode is not DPMode.PER_SAMPLE or not accepted:
            return accepted
        rate = max(r.sample_rate for r in accepted)
        if self._calibration_rate is not None and rate <= self._calibration_rate:
            return accepted
        try:
            self._calibrate(rate)
        except PrivacyBudgetError as err:
            if self._calibration_rate is None:
                raise
            for reply in accepted:
                if reply.sample_rate > self._calibration_rate:
                    self._log_refusal("train", round_, reply.node_id, f"sample-rate: {err}")
            return [r for r in accepted if r.sample_rate <= self._calibration_rate]
        return accepted

    def _calibrate(self, rate: float) -> None:
        total, taken = int(self.noise.total_rounds or 1), self._steps_taken()
        multiplier = calibrate_noise_multiplier(
            target_epsilon=float(self.noise.epsilon or 0.0),
            delta=self.noise.delta,
            sample_rate=rate,
            steps=max(total - taken, 1),
            kind=self.noise.accountant,
            # the steps already taken used another rate and multiplier: the whole mixed
            # history must fit the target, not each part alone
            prior_history=self._accountant.history if self._accountant is not None else (),
        )
        if self._calibration_rate is not None:
            log(
                WARNING,
                "sample rate rose from %.4g to %.4g: noise multiplier recalibrated %.4g -> %.4g",
                self._calibration_rate,
                rate,
                self._multiplier,
                multiplier,
            )
        log(INFO, "global noise multiplier z=%.4g (q=%.4g, %d rounds)", multiplier, rate, total)
        self._multiplier, self._calibration_rate = multiplier, rate

    def _steps_taken(self) -> int:
        return self._accountant.steps if self._accountant is not None else 0

    def _spend(self, multiplier: float, rate: float) -> None:
        """Record the release just made, with the (z, q) actually used."""
        self._explain_epsilon()
        if self._accountant is None:
            return
        self._accountant.step(noise_multiplier=multiplier, sample_rate=rate)
        self._epsilon_spent = None
        if self._steps_taken() > int(self.noise.total_rounds or 0):
            log(
                WARNING,
                "global channel: %d noisy rounds exceed total_rounds=%s; epsilon is now "
                "%.4g, above the target %.4g",
                self._steps_taken(),
                self.noise.total_rounds,
                self.epsilon(),
                self.noise.epsilon,
            )

    def _explain_epsilon(self) -> None:
        """Say once what the printed eps-global means, and what it assumes."""
        if self.noise.mode is DPMode.OFF:
            self._log_once(
                "off",
                "global channel without noise (dp mode 'off'): eps-global is infinite and "
                "the server update reveals the clients' clipped gradients",
            )
        elif self.noise.mode is DPMode.PAPER:
            self._log_once(
                "paper",
                "eps-global in 'paper' mode is the paper's nominal epsilon: NOT a formal "
                "sample-level guarantee (batch-mean clipping, advanced-composition formula)",
            )
        elif self.noise.mode is DPMode.PER_SAMPLE:
            self._log_once(
                "honest-server",
                "eps-global assumes an honest server: it sees each client's clipped "
                "global-prompt gradient in clear (no secure aggregation)",
            )

    def _log_once(self, key: str, text: str) -> None:
        if key not in self._said_once:
            self._said_once.add(key)
            log(WARNING, "%s", text)

    def _log_refusal(
        self, phase: str, round_: int, msg_or_node: Message | int, reason: str
    ) -> None:
        node = msg_or_node if isinstance(msg_or_node, int) else self._node_of(msg_or_node)
        log(WARNING, "%s round %d: refused reply from node %d: %s", phase, round_, node, reason)

    def _node_of(self, reply: Message) -> int:
        """The node a reply answers for: the destination of the message it replies to.

        A reply's ``src_node_id`` is the SuperLink's (1) when Flower itself stands in for
        a node that died or whose reply was lost, so the sent message decides.
        """
        asked = reply.metadata.reply_to_message_id
        for sent in self._sent if asked else ():
            if sent.metadata.message_id == asked:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    # --- aggregate evaluate ----------------------------------------------------------
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Mean over clients of local / neighbour accuracy (the paper's protocol).

        The unweighted mean over clients is the paper's number; the example-weighted
        variants are reported alongside. A client with no local (or neighbour) test
        examples has no such accuracy and is left out of that mean.
        """
        replies = list(replies)
        round_ = self._round_offset + server_round
        accepted: list[wire.EvaluateReply] = []
        for msg in replies:
            try:
                accepted.append(wire.parse_evaluate_reply(msg))
            except wire.InvalidReply as err:
                self._log_refusal("evaluate", round_, msg, str(err))
        metrics: dict[str, float | int] = {
            wire.EVAL_ACCEPTED: len(accepted),
            wire.EVAL_REJECTED: len(replies) - len(accepted),
            **_accuracy_means(accepted),
        }
        if self.on_round is not None:
            per_client = _per_client(accepted)  # for the results files, not for Flower's log
            self.on_round(round_, {**self._train_metrics, **metrics, **per_client})
        self._train_metrics = {}
        return MetricRecord(dict(metrics))

    # --- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "global_prompt": self._prompt.clone(),
            "round": self._last_round,
            "noise": self.noise.to_dict(),
            "noise_multiplier": self._multiplier,
            "calibration_sample_rate": self._calibration_rate,
            "accountant": self._accountant.state_dict() if self._accountant else None,
            "noise_draws": self._noise_draws,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; rounds then continue from the saved round.

        Raises
        ------
        ValueError
            If keys, the noise settings or the prompt shape differ from this strategy.

        """
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"state keys {sorted(state)} differ from {sorted(expected)}")
        if state["noise"] != self.noise.to_dict():
            raise ValueError(
                f"checkpoint noise settings {state['noise']} differ from this strategy's "
                f"{self.noise.to_dict()}; resume with the settings the run started with"
            )
        prompt = state["global_prompt"]
        if tuple(prompt.shape) != tuple(self._prompt.shape) or prompt.dtype != self._prompt.dtype:
            raise ValueError(
                f"checkpoint global_prompt is {tuple(prompt.shape)} {prompt.dtype}, expected "
                f"{tuple(self._prompt.shape)} {self._prompt.dtype}"
            )
        self._prompt = prompt.detach().clone()
        self._last_round = self._round_offset = int(state["round"])
        self._multiplier = state["noise_multiplier"]
        self._calibration_rate = state["calibration_sample_rate"]
        if state["accountant"] is not None:
            self._accountant = ChannelAccountant.from_state_dict(state["accountant"])
            self._epsilon_spent = None
        self._noise_draws = int(state["noise_draws"])
        if self._public_seed is not None:
            # a public-seed stream continues where it stopped (the same draws, in order); an
            # OS-entropy generator is never saved, so its resumed noise is fresh
            self._generator = torch.Generator().manual_seed(self._public_seed)
            for _ in range(self._noise_draws):
                torch.randn(prompt.shape, generator=self._generator, dtype=torch.float64)


def _per_client(accepted: list[wire.EvaluateReply]) -> dict[str, float | int]:
    """Each client's own accuracies, keyed ``local-acc/node-<id>`` (none without examples).

    ``partition-id/node-<id>`` goes along for results.json's node map.
    """
    out: dict[str, float | int] = {}
    for r in sorted(accepted, key=lambda r: r.node_id):
        if r.local_examples:
            out[f"{wire.LOCAL_ACC}/node-{r.node_id}"] = r.local_acc
        if r.neighbour_examples:
            out[f"{wire.NEIGHBOUR_ACC}/node-{r.node_id}"] = r.neighbour_acc
        out[f"{wire.PARTITION_ID}/node-{r.node_id}"] = r.partition_id
    return out


def _accuracy_means(accepted: list[wire.EvaluateReply]) -> dict[str, float]:
    """Unweighted (per-client) and example-weighted means of both accuracies."""
    out: dict[str, float] = {}
    columns = (
        (
            wire.LOCAL_ACC,
            wire.LOCAL_ACC_WEIGHTED,
            [(r.local_acc, r.local_examples) for r in accepted],
        ),
        (
            wire.NEIGHBOUR_ACC,
            wire.NEIGHBOUR_ACC_WEIGHTED,
            [(r.neighbour_acc, r.neighbour_examples) for r in accepted],
        ),
    )
    for key, weighted_key, pairs in columns:
        pairs = [(acc, n) for acc, n in pairs if n > 0]
        if pairs:
            out[key] = sum(acc for acc, _ in pairs) / len(pairs)
            out[weighted_key] = sum(acc * n for acc, n in pairs) / sum(n for _, n in pairs)
    return out


def _validate_arguments(args: dict[str, Any]) -> None:
    """ValueErrors that name the argument, for every constructor rule."""
    prompt = args["initial_prompt"]
    if (
        not isinstance(prompt, torch.Tensor)
        or prompt.dim() != 2
        or prompt.dtype != wire.PROMPT_DTYPE
    ):
        raise ValueError(f"initial_prompt must be a 2-D {wire.PROMPT_DTYPE} tensor (n_ctx x d)")
    if not bool(torch.isfinite(prompt).all()):
        raise ValueError("initial_prompt must be finite")
    rules = (
        ("server_lr", args["server_lr"] > 0, "> 0"),
        ("clip_norm", args["clip_norm"] > 0, "> 0"),
        (
            "batch_size",
            isinstance(args["batch_size"], int) and args["batch_size"] >= 1,
            "an int >= 1",
        ),
        ("min_nodes", isinstance(args["min_nodes"], int) and args["min_nodes"] >= 1, "an int >= 1"),
        ("fraction_train", 0.0 < args["fraction_train"] <= 1.0, "in (0, 1]"),
        ("fraction_evaluate", 0.0 < args["fraction_evaluate"] <= 1.0, "in (0, 1]"),
        ("node_wait_timeout", args["node_wait_timeout"] > 0, "> 0"),
        ("noise", isinstance(args["noise"], GlobalNoise), "a GlobalNoise"),
    )
    for name, ok, requirement in rules:
        if not ok:
            raise ValueError(f"{name} must be {requirement}, got {args[name]!r}")
    if args["seed"] is not None and args["generator"] is not None:
        raise ValueError("seed and generator are exclusive: seed the generator yourself")
