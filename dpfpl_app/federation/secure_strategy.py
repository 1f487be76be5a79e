"""The strategy under secure aggregation: the server learns only a noised sum.

Each training round is a SecAgg+ round (``secure_round``): a key exchange with the
sampled nodes, then masked vectors whose sum the server unmasks. What it learns is the
sum of the survivors' clipped global-prompt gradients with the clients' Skellam noise in
it; it divides that sum by the number of survivors m (public; the accounting covers the
SUM, whose sensitivity does not depend on m, so the division is post-processing) and
takes the parent's step. The epsilon counts each round with its actual survivors.

Evaluation is a secure sum too (``secure_evaluation``): the server learns the nodes'
summed counts of correct predictions and test examples, never one node's figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from dpfpl_app.federation import reply_checks, wire
from dpfpl_app.federation.secure_evaluation import EvaluationOutcome, run_secure_evaluation
from dpfpl_app.federation.secure_round import SecureRound, global_release, metrics_of
from dpfpl_app.federation.strategy import DPFPLStrategy
from dpfpl_app.privacy import secure_channel
from dpfpl_app.privacy.dp_channel import ACCOUNTED_KINDS

SECURE_STAGE_TIMEOUT = 3600.0  # seconds per key-exchange stage (Flower's start() default)


class SecureDPFPLStrategy(DPFPLStrategy):
    """``DPFPLStrategy`` whose training exchange is a secure-aggregation round.

    Takes the parent's arguments; the channel plan must be a secure one.
    """

    secure_training = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._secure: SecureRound | None = None  # the current round's exchange
        # per trained round: survivors / min-survivors of the sum the server may hold,
        # or None when none could be rebuilt (``secure_round.global_release``)
        self._secure_rounds: list[float | None] = []
        self._evaluated: EvaluationOutcome | None = None  # the current round's evaluation sum

    def epsilon(self) -> float:
        """As the parent's, but each round counted with the survivors of its sum."""
        if self.channel.guarantee in ACCOUNTED_KINDS:
            return self.channel.secure_epsilon(self._secure_rounds)
        return super().epsilon()

    # --- configure -------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Key exchange with a sample of nodes; the masked-input messages (none if aborted)."""
        round_ = self._round_offset + server_round
        self._adopt(arrays)
        nodes = self._sample_nodes(grid, self.fraction_train, MessageType.TRAIN, round_)
        self._before_secure_round(grid, nodes, round_)
        plan = self.channel
        secagg = secure_channel.secagg_config(
            dim=self._prompt.numel(),
            clip_norm=plan.clip_norm,
            batch_size=plan.batch_size,
            z_global=plan.z_global,
            clustered=plan.method.clustered,
        )
        self._secure = SecureRound(
            secagg, nodes, grid=grid, round_=round_, timeout=SECURE_STAGE_TIMEOUT
        )
        payloads = self._secure.key_exchange()
        if payloads is None:
            return []
        self._sent = self._secure.masked_messages(payloads, self._content(config, round_))
        return self._sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Run the round's evaluation as a secure sum of counts, here; Flower sends nothing.

        The whole secure round (retries included) runs inside this call, so that a
        discarded sum can be asked again; ``aggregate_evaluate`` reports its figures.
        """
        round_ = self._round_offset + server_round
        self._sent, self._evaluated = [], None
        if not self.evaluates(round_):
            return []
        self._adopt(arrays)
        self._evaluated = run_secure_evaluation(
            lambda: self._sample_nodes(grid, self.fraction_evaluate, MessageType.EVALUATE, round_),
            self._content(config, round_),
            grid=grid,
            round_=round_,
            timeout=SECURE_STAGE_TIMEOUT,
        )
        return []

    def _before_secure_round(self, grid: Grid, nodes: list[int], round_: int) -> None:
        """Work a subclass does with the round's sample before its key exchange (SecFPP
        clusters the nodes here); nothing for one global prompt.
        """

    # --- aggregate -------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum, charge the round, step with the survivors' noised mean."""
        replies = list(replies)
        round_ = self._last_round = self._round_offset + server_round
        secure, self._secure = self._secure, None
        if secure is None:
            raise RuntimeError(f"train round {round_}: replies without a key exchange")
        record = secure.record
        result = secure.aggregate(replies) if record.trained else None
        if record.trained:  # the clients trained and released masked vectors
            self._secure_rounds.append(global_release(record))
        survivors = len(result.survivors) if result else 0
        metrics: dict[str, float | int] = {
            wire.ACCEPTED: survivors,
            wire.REJECTED: record.sampled - survivors,
            wire.BYTES_RECEIVED: sum(wire.reply_array_bytes(msg) for msg in replies),
            wire.EPSILON: self.epsilon(),
            **metrics_of(record),
        }
        self._train_metrics = metrics
        if result is None:
            log(WARNING, "train round %d: no sum released: global prompt unchanged", round_)
            return None, MetricRecord(dict(metrics))
        metrics |= self._step(*self._secure_mean(result, survivors))
        return self.global_arrays(), MetricRecord(dict(metrics))

    def _secure_mean(self, result: Any, survivors: int) -> tuple[torch.Tensor, float]:
        """The survivors' mean gradient from the released sum, and the std of its noise."""
        mean = torch.from_numpy(result.total).reshape(self._prompt.shape) / survivors
        return mean, result.accounting().noise_std(survivors) / survivors

    def _evaluation(
        self, replies: list[Message], round_: int
    ) -> tuple[dict[str, float | int], dict[str, float | int]]:
        """The federation-wide figures of the round's evaluation sum; nothing per client.

        ``configure_evaluate`` sent no evaluate message of Flower's, so any reply here
        is refused: in a secure run a node's figures never reach the server.
        """
        for reply in replies:
            reply_checks.refuse("evaluate", round_, reply, self._sent, "fault: an evaluate "
                                "reply outside the secure sum (per-node figures) in a secure run")
        outcome, self._evaluated = self._evaluated, None
        if outcome is None:
            raise RuntimeError(f"evaluate round {round_}: aggregated without a secure evaluation")
        return outcome.metrics(), {}

    # --- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The parent's state and each trained round's release (what the epsilon counts)."""
        return {**super().state_dict(), "secure_rounds": list(self._secure_rounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._secure_rounds = list(state["secure_rounds"])
