"""Server side of DP-FPL: Algorithm 1, steps 7-8, as a Flower message-API strategy.

The server holds the global prompt ``p_G``, broadcasts it, receives each client's
clipped global-prompt gradient, averages them with an unweighted ``1/N`` mean, adds
the global Gaussian noise and applies ``p_G <- p_G - server_lr * noised mean``. Only the
global prompt ever travels; replies that carry anything else are refused (``wire``).
How much noise, and what epsilon it buys, is the channel plan's business
(``dp_channel.py``): this class is the Flower plumbing around it.

With ``aggregation = "secure"`` the training exchange is a SecAgg+ round instead
(``secure_strategy``, a subclass; ``strategy_build`` picks the class from the config).

Per-round metrics reach the ServerApp two ways: ``strategy.start(...)`` returns a Flower
``Result`` with this strategy's train and evaluate ``MetricRecord`` of each round; and
the optional ``on_round(round, metrics)`` callback receives both merged into one dict as
soon as the round's evaluation is aggregated (progress lines, results files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from dpfpl_app.config import DPMode
from dpfpl_app.federation import reply_checks, wire
from dpfpl_app.federation.evaluate_metrics import accuracy_means, per_client_metrics
from dpfpl_app.federation.node_wait import wait_for_nodes
from dpfpl_app.privacy.dp_channel import ChannelPlan
from dpfpl_app.privacy.noise import NoiseSource

RoundCallback = Callable[[int, dict[str, float | int]], None]


class DPFPLStrategy(Strategy):
    """Global prompt, unweighted mean of re-clipped gradients, Gaussian noise.

    Parameters
    ----------
    initial_prompt : torch.Tensor
        ``p_G`` (``n_ctx x d``, float32); fixes the shape and dtype every reply must match.
    server_lr : float
        Server learning rate ``eta_G`` (> 0).
    channel : ChannelPlan
        Noise and accounting of the run (clip norm C, batch size B, multipliers).
    min_nodes : int
        Connected nodes required before a round starts; also the minimum sample.
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled per round, in (0, 1].
    node_wait_timeout : float
        Seconds to wait for ``min_nodes`` before failing with a RuntimeError.
    seed : int, optional
        Public seed for reproducible experiments: noise and node sampling are then
        derived from it per round, and the epsilon is nominal (``dp_channel``). Without
        it both come from secret 256-bit OS keys that are never stored (a checkpoint
        that held them would let its reader subtract the noise).
    on_round : callable, optional
        ``on_round(round, metrics)`` after each round's evaluation is aggregated.
    fold_evaluation : bool
        Plain rounds: an evaluated round r other than the last sends no evaluate
        message; round r+1's train message asks each node to evaluate first, with the
        same ``p_G`` the evaluate message would have carried, so a round is one exchange.
        Round r's figures (and ``on_round(r, ...)``) arrive with round r+1's replies.

    Notes
    -----
    What the server accepts from a client (shape, dtype, one reply per node, re-clipping
    to C) is ``reply_checks``; per-sample clipping, which protects a client's own data,
    is the client's job.

    """

    secure_training = False  # the training exchange is a plain one (see secure_strategy)

    def __init__(
        self,
        *,
        initial_prompt: torch.Tensor,
        server_lr: float,
        channel: ChannelPlan,
        min_nodes: int = 2,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        evaluate_every: int = 1,
        final_round: int | None = None,
        node_wait_timeout: float = 300.0,
        seed: int | None = None,
        on_round: RoundCallback | None = None,
        fold_evaluation: bool = False,
    ) -> None:
        _validate_arguments(locals())
        if channel.secure is not self.secure_training:
            raise ValueError(
                f"a channel with aggregation {channel.aggregation.value!r} needs "
                f"{'SecureDPFPLStrategy' if channel.secure else 'DPFPLStrategy'}; "
                "build_strategy(cfg) picks the class from the run config"
            )
        self.server_lr = float(server_lr)
        self.channel = channel
        self.min_nodes = int(min_nodes)
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.evaluate_every = int(evaluate_every)
        self.final_round = final_round
        self.node_wait_timeout = float(node_wait_timeout)
        self.on_round = on_round
        if fold_evaluation and self.secure_training:
            raise ValueError("fold-evaluation is for plain rounds: a secure round evaluates "
                             "through its own secure sum")
        self.fold_evaluation = fold_evaluation
        # fold-evaluation: the round whose evaluation rides on the next train message,
        # with that round's training figures
        self._pending: tuple[int, dict[str, float | int]] | None = None
        self._prompt = initial_prompt.detach().clone()
        self._seed = seed
        self._secret_noise, self._secret_nodes = NoiseSource.secure(), NoiseSource.secure()
        self._round_offset = 0
        self._last_round = 0
        self._train_metrics: dict[str, float | int] = {}
        # Each node's declared Poisson rate (public: stated in its DP replies), and whether
        # some node trained without a rate reaching us (then the bound covers it).
        self._node_rates: dict[int, float] = {}
        self._unreported_rates = False
        # The messages of the current phase: Flower's own error replies (e.g. for a node
        # that died) come from the SuperLink, so only these say which node was asked.
        self._sent: list[Message] = []

    # --- public views ----------------------------------------------------------------
    @property
    def global_prompt(self) -> torch.Tensor:
        """A copy of the current global prompt ``p_G``."""
        return self._prompt.clone()

    @property
    def rounds_done(self) -> int:
        """The last round this strategy aggregated (counting across resumes)."""
        return self._last_round

    @property
    def dp_on(self) -> bool:
        return self.channel.mode is not DPMode.OFF

    def global_arrays(self) -> ArrayRecord:
        """Return the current global prompt as the ArrayRecord to pass to ``start(...)``."""
        return wire.global_prompt_record(self._prompt)

    def epsilon(self) -> float:
        """The run's epsilon: the largest of the nodes' composed epsilons after the rounds
        trained so far (``dp_channel`` says what it means).

        Every round that sent training messages counts for every node, accepted or not:
        the clients took their local steps either way. A node is accounted at its
        declared rate; a node that trained but whose rate never reached the server (a
        refused or failed reply) at the bound, which covers every node.
        """
        steps = self._last_round * self.channel.local_steps
        rates = set(self._node_rates.values())
        if self._unreported_rates or not rates:
            rates.add(self.channel.sample_rate)
        return max(self.channel.epsilon(steps, rate) for rate in sorted(rates))

    def node_epsilons(self) -> dict[str, dict[str, float]]:
        """Per node id: its declared rate and its composed epsilon (results.json)."""
        steps = self._last_round * self.channel.local_steps
        return {
            str(node): {"sample-rate": rate, "epsilon": self.channel.epsilon(steps, rate)}
            for node, rate in sorted(self._node_rates.items())
        }

    def summary(self) -> None:
        """Log the configuration and what the printed epsilon means."""
        plan = self.channel
        log(INFO, "\t├──> DP channel: %s (%s)", plan.mode.value, plan.guarantee.value)
        log(INFO, "\t│\t├── %s", plan.meaning)
        log(
            INFO,
            "\t│\t└── z_step=%.4g z_local=%.4g z_global=%.4g q<=%.4g over %d steps",
            plan.z_step,
            plan.z_local,
            plan.z_global,
            plan.sample_rate,
            plan.planned_steps,
        )
        if self.dp_on and plan.z_global > 0:
            log(INFO if plan.secure else WARNING, "%s", plan.server_view)
        log(
            INFO,
            "\t└──> Sampling: min_nodes=%d fraction train=%.2f evaluate=%.2f every %d "
            "round(s) wait<=%gs",
            self.min_nodes,
            self.fraction_train,
            self.fraction_evaluate,
            self.evaluate_every,
            self.node_wait_timeout,
        )

    # --- configure -------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Broadcast the global prompt to a sample of nodes for one training step."""
        return self._configure(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Broadcast the global prompt to a sample of nodes for evaluation.

        Only every ``evaluate_every``-th round and the final one: with many clients an
        evaluation costs about as much as the training it checks.
        """
        round_ = self._round_offset + server_round
        if not self.evaluates(round_) or self.folds(round_):
            self._sent = []
            return []
        return self._configure(server_round, arrays, config, grid, MessageType.EVALUATE)

    def evaluates(self, round_: int) -> bool:
        """Whether round ``round_`` (counted across resumes) is evaluated."""
        return round_ % self.evaluate_every == 0 or round_ == self.final_round

    def folds(self, round_: int) -> bool:
        """Whether round ``round_``'s evaluation rides on the next train message."""
        return self.fold_evaluation and round_ != self.final_round

    def _configure(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
    ) -> list[Message]:
        """One message per sampled node carrying ``p_G`` and a copy of ``config``.

        ``arrays`` is Flower's current global model, adopted as ``p_G`` after a shape
        check; the caller's config is copied, never mutated (``start`` reuses it).
        """
        round_ = self._round_offset + server_round
        self._adopt(arrays)
        train = message_type == MessageType.TRAIN
        fraction = self.fraction_train if train else self.fraction_evaluate
        node_ids = self._sample_nodes(grid, fraction, message_type, round_)
        content = self._content(config, round_)
        if train and self._pending is not None:  # evaluate the previous round first
            content[wire.CONFIG_RECORD][wire.EVALUATE_FIRST] = self._pending[0]
        log(INFO, "%s round %d: sampled %d node(s)", message_type, round_, len(node_ids))
        self._sent = [
            Message(content, node, message_type, group_id=str(round_)) for node in node_ids
        ]
        return self._sent

    def _content(self, config: ConfigRecord, round_: int) -> RecordDict:
        """What every message of a round carries: ``p_G``, the caller's config, the round
        and the aggregation mode.
        """
        payload = ConfigRecord(
            {
                **dict(config),
                wire.SERVER_ROUND: round_,
                wire.AGGREGATION: self.channel.aggregation.value,
            }
        )
        return RecordDict({wire.ARRAYS_RECORD: self.global_arrays(), wire.CONFIG_RECORD: payload})

    def _adopt(self, arrays: ArrayRecord) -> None:
        prompt = wire.read_global_prompt(arrays)
        if prompt.shape != self._prompt.shape:
            raise ValueError(
                f"arrays hold a global prompt of shape {tuple(prompt.shape)}, but this "
                f"strategy was built for {tuple(self._prompt.shape)}; pass "
                "strategy.global_arrays() as start(initial_arrays=...)"
            )
        self._prompt = prompt

    def _sample_nodes(self, grid: Grid, fraction: float, purpose: str, round_: int) -> list[int]:
        """Sample nodes like FedAvg, but give up after ``node_wait_timeout`` seconds."""
        nodes = wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout, purpose)
        size = min(len(nodes), max(int(len(nodes) * fraction), self.min_nodes))
        return self._source("nodes", purpose, round_, secret=self._secret_nodes).sample(nodes, size)

    def _source(self, *purpose: object, secret: NoiseSource) -> NoiseSource:
        """The secret stream, or one derived per purpose from the public seed."""
        return secret if self._seed is None else NoiseSource.public_seed(self._seed, *purpose)

    # --- aggregate train -------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply steps 7-8: noisy unweighted mean of re-clipped gradients, then the update.

        A round in which every reply is refused adds no noise and leaves ``p_G`` as it
        is; its clients' local steps still count towards the epsilon.
        """
        replies = list(replies)
        pending, self._pending = self._pending, None
        if pending is not None:  # the previous round's evaluation, before this round counts
            self._report_folded(pending, replies)
        round_ = self._last_round = self._round_offset + server_round
        accepted = reply_checks.accept_train_replies(
            replies, self._sent, round_, prompt=self._prompt, dp_on=self.dp_on,
            rate_bound=self.channel.sample_rate, folded=pending is not None,
        )
        self._note_rates(accepted, asked=max(len(replies), len(self._sent)))
        metrics: dict[str, float | int] = {
            wire.ACCEPTED: len(accepted),
            wire.REJECTED: len(replies) - len(accepted),
            wire.BYTES_RECEIVED: sum(wire.reply_array_bytes(msg) for msg in replies),
            wire.EPSILON: self.epsilon(),
        }
        self._train_metrics = metrics
        if not accepted:
            log(WARNING, "train round %d: every reply refused: global prompt unchanged", round_)
            return None, MetricRecord(dict(metrics))
        std = self.channel.global_std(len(accepted))
        mean = reply_checks.clipped_mean(accepted, self.channel.clip_norm, round_)
        noised = mean + self._source(
            "global-noise", round_, secret=self._secret_noise
        ).gaussian(self._prompt.shape, std=std, dtype=torch.float64)
        metrics |= self._step(noised, std)
        if not self.dp_on:  # without DP nothing is protected, so the loss may be shown
            losses = [r.train_loss for r in accepted if r.train_loss is not None]
            metrics[wire.TRAIN_LOSS] = sum(losses) / max(1, len(losses))
        return self.global_arrays(), MetricRecord(dict(metrics))

    def _note_rates(self, accepted: list[wire.TrainReply], asked: int) -> None:
        """Keep each node's declared rate (the largest it ever stated)."""
        for reply in accepted:
            if reply.sample_rate is not None:
                known = self._node_rates.get(reply.node_id, 0.0)
                self._node_rates[reply.node_id] = max(known, reply.sample_rate)
        if self.dp_on and len(accepted) < asked:
            self._unreported_rates = True

    def _step(self, noised: torch.Tensor, noise_std: float) -> dict[str, float]:
        """``p_G <- p_G - server_lr * noised`` (float64); the step's metrics, its norm taken
        after the noise (post-processing).
        """
        self._prompt = (self._prompt.double() - self.server_lr * noised).to(self._prompt.dtype)
        return {wire.NOISE_STD: noise_std, wire.UPDATE_NORM: float(noised.norm())}

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
        if self.evaluates(round_) and self.folds(round_):  # reported with the next round
            self._pending, self._train_metrics = (round_, self._train_metrics), {}
            return None
        if not self.evaluates(round_):  # the round's record holds its training only
            if self.on_round is not None:
                self.on_round(round_, self._train_metrics)
            self._train_metrics = {}
            return None
        metrics, per_client = self._evaluation(replies, round_)
        if self.on_round is not None:  # per-client figures: for the results files, not Flower's log
            self.on_round(round_, {**self._train_metrics, **metrics, **per_client})
        self._train_metrics = {}
        return MetricRecord(dict(metrics))

    def _evaluation(
        self, replies: list[Message], round_: int
    ) -> tuple[dict[str, float | int], dict[str, float | int]]:
        """The round's evaluation metrics, and each client's own figures (results files).

        A secure run overrides this: its server learns federation-wide figures only.
        """
        accepted = reply_checks.accept_evaluate_replies(replies, self._sent, round_)
        return _evaluation_figures(accepted, asked=len(replies))

    def _report_folded(
        self, pending: tuple[int, dict[str, float | int]], replies: list[Message]
    ) -> None:
        """Round r's evaluation from round r+1's train replies; its ``on_round`` now, while
        the strategy's state (``p_G``, rounds done) is still round r's (its checkpoint).
        """
        round_, train_metrics = pending
        accepted = reply_checks.accept_evaluate_replies(replies, self._sent, round_, folded=True)
        metrics, per_client = _evaluation_figures(accepted, asked=len(replies))
        if self.on_round is not None:
            self.on_round(round_, {**train_metrics, **metrics, **per_client})

    # --- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (loadable with ``torch.load(weights_only=True)``).

        No noise key or stream state is saved: resumed noise is fresh (or, with a public
        seed, derived from it per round as before).
        """
        return {
            "global_prompt": self._prompt.clone(),
            "round": self._last_round,
            "channel": self.channel.describe(),
            "node_rates": {str(node): rate for node, rate in self._node_rates.items()},
            "unreported_rates": self._unreported_rates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; rounds then continue from the saved round.

        Raises
        ------
        ValueError
            If keys, the channel plan or the prompt shape differ from this strategy.

        """
        expected = set(self.state_dict())
        if state.get("secure_rounds") == [] and "secure_rounds" not in expected:
            # a plain run's checkpoint written when one class held both exchanges
            state = {k: v for k, v in state.items() if k != "secure_rounds"}
        if "node_rates" not in state:  # written before nodes declared rates: the bound
            state = {**state, "node_rates": {}, "unreported_rates": state["round"] > 0}
        if set(state) != expected:
            raise ValueError(f"state keys {sorted(state)} differ from {sorted(expected)}")
        if state["channel"] != self.channel.describe():
            raise ValueError(
                f"checkpoint privacy plan {state['channel']} differs from this run's "
                f"{self.channel.describe()}; resume with the settings the run started with"
            )
        prompt = state["global_prompt"]
        if tuple(prompt.shape) != tuple(self._prompt.shape) or prompt.dtype != self._prompt.dtype:
            raise ValueError(
                f"checkpoint global_prompt is {tuple(prompt.shape)} {prompt.dtype}, expected "
                f"{tuple(self._prompt.shape)} {self._prompt.dtype}"
            )
        self._prompt = prompt.detach().clone()
        self._last_round = self._round_offset = int(state["round"])
        self._node_rates = {int(node): float(rate) for node, rate in state["node_rates"].items()}
        self._unreported_rates = bool(state["unreported_rates"])


def _evaluation_figures(
    accepted: list[wire.EvaluateReply], asked: int
) -> tuple[dict[str, float | int], dict[str, float | int]]:
    """An evaluation's metrics (counts, accuracy means) and each client's own figures."""
    metrics: dict[str, float | int] = {
        wire.EVAL_ACCEPTED: len(accepted),
        wire.EVAL_REJECTED: asked - len(accepted),
        **accuracy_means(accepted),
    }
    return metrics, per_client_metrics(accepted)


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
        ("channel", isinstance(args["channel"], ChannelPlan), "a ChannelPlan"),
        ("min_nodes", isinstance(args["min_nodes"], int) and args["min_nodes"] >= 1, "an int >= 1"),
        ("fraction_train", 0.0 < args["fraction_train"] <= 1.0, "in (0, 1]"),
        ("fraction_evaluate", 0.0 < args["fraction_evaluate"] <= 1.0, "in (0, 1]"),
        ("evaluate_every", args["evaluate_every"] >= 1, ">= 1"),
        ("node_wait_timeout", args["node_wait_timeout"] > 0, "> 0"),
    )
    for name, ok, requirement in rules:
        if not ok:
            raise ValueError(f"{name} must be {requirement}, got {args[name]!r}")
    if not math.isfinite(float(args["server_lr"])):
        raise ValueError(f"server_lr must be finite, got {args['server_lr']!r}")
