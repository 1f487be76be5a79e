"""The three noisy releases of DP-FPL, produced by the production code, with a canary.

Nothing here re-implements a release: each game drives the code a run executes and
reads what it released, so a bug anywhere on that path (noise size, clipping, divisor,
noise source) changes what the audit measures.

* ``local``: ``PromptLearner.train_step`` of a DP-FPL learner (per-sample mode) on a
  batch of B synthetic samples whose per-sample gradients ``prompt_gradients`` computes
  through a small synthetic text encoder, plus the canary through the trainer's canary
  hook (``canary_rows``). The adversary sees the learner's local prompt before and
  after the step (the update is what the personalised prompt carries).
* ``global``: ``DPFPLStrategy.aggregate_train`` on N train replies (real Flower
  messages built by ``wire``), each the ``global_grad`` of one client's ``train_step``,
  the canary in client 0's batch. The adversary sees the new global prompt.
* ``secure``: one whole SecAgg+ round in process (``secagg.ServerRound`` and N
  ``secagg.ClientRound``, every stage) with the production config rule
  (``secure_channel.secagg_config``): each client's input is its ``global_grad``
  projected on the C ball (as ``client_messages.secure_contribution`` does), quantised,
  noised with its Skellam share and masked by ``collect_masked``; the adversary sees the
  unmasked sum the server releases.

What each release is claimed to be (ALGORITHM.md section 4, written out here and NOT
taken from the code under audit), for clip norm C, expected batch B, N clients, z:

* local: the pair (du, dv) moves by at most sqrt(2) C / B and carries noise of std
  z sqrt(2) C / B per coordinate. The update p_L <- p_L - lr (du v + u dv - u u^T du v)
  reveals dv exactly (dv = u^T Delta / -lr, as u has orthonormal columns) but not the
  part of du inside u's column space, where this canary's du lies: the adversary scores
  dv, in which the canary moves the release by C / B against noise of std z sqrt(2) C / B.
* global: the mean moves by at most C / (B N), noise std z C / (B N).
* secure: the float sum moves by at most C / B, noise std z C / B sqrt(m / t) for m
  survivors and release threshold t (any t survivors reach z C / B), plus randomised
  rounding (at most 1/4 per coordinate per client in integer units).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Message, MessageType, Metadata
from torch import Tensor, nn

from dpfpl_app.config import Aggregation, DPMode, Method
from dpfpl_app.federation import wire
from dpfpl_app.federation.strategy import DPFPLStrategy
from dpfpl_app.method.prompt_learner import LearnerSettings, PromptLearner, initial_local_prompt
from dpfpl_app.privacy import mechanics
from dpfpl_app.privacy.accounting import AccountantKind
from dpfpl_app.privacy.dp_channel import ChannelPlan, Guarantee
from dpfpl_app.privacy.keystream import KeyStream
from dpfpl_app.privacy.noise import NoiseSource
from dpfpl_app.privacy.secure_channel import secagg_config
from dpfpl_app.secagg import ClientRound, SecAggConfig, ServerRound

# The canary's per-sample gradient is this many clip norms long: a correct clip brings
# it back to exactly C (the sensitivity bound), a missing or loose one shows at once.
CANARY_NORM_FACTOR = 100.0
# The background (prompts, carriers, samples) is public to a white-box adversary.
_BACKGROUND_SEED = 0
_CLASSES, _EMBED = 6, 8
_INIT_STD, _RANK = 0.02, 2
_SERVER_LR = 1.0
_NODE_BASE = 1_000_003  # node ids of the secure round: any distinct ints will do


class Channel(str, Enum):
    """Which release of DP-FPL is audited."""

    LOCAL = "local"
    GLOBAL = "global"
    SECURE = "secure"


@dataclass(frozen=True)
class CanaryGame:
    """Two neighbouring inputs of one release: a fixed background with or without a canary.

    ``release(with_canary, trial)`` runs the production code once and returns what the
    adversary scores, flattened to float64; trial ``i`` draws its noise from the public
    seed's stream for ``i`` when the game has one, else from fresh OS-keyed streams.
    ``direction`` is the unit vector along which the canary moves it (what the optimal
    test for a Gaussian mechanism projects on). ``sensitivity`` and ``noise_std`` are the
    claimed shift along ``direction`` and the claimed noise std per coordinate;
    ``rounding_var`` bounds any extra variance per coordinate the claim allows (the
    secure channel's randomised rounding); ``survivor_ratio`` is the secure round's
    m / t, which its accounting takes. ``observed`` says in words what is scored.
    """

    channel: Channel
    noise_multiplier: float
    release: Callable[[bool, int], Tensor]
    direction: Tensor
    sensitivity: float
    noise_std: float
    observed: str
    rounding_var: float = 0.0
    survivor_ratio: float | None = None  # secure: survivors / release threshold


class SyntheticTextEncoder(nn.Module):
    """Prompt (n_ctx, d) -> normalised class features (C, e) through a fixed random map.

    Stands in for CLIP's text tower so that the audit's learner computes real per-sample
    gradients (``prompt_gradients``) in milliseconds; the mechanism under audit (clip,
    divide, noise, update) does not depend on which encoder made the gradients.
    """

    def __init__(self, n_ctx: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        dim = n_ctx * width
        self.register_buffer("weight", torch.randn(_CLASSES, _EMBED, dim, generator=generator))
        self.register_buffer("offset", torch.randn(_CLASSES, _EMBED, generator=generator))

    def forward(self, prompt: Tensor) -> Tensor:
        return F.normalize(self.offset + self.weight @ prompt.flatten(), dim=-1)


@dataclass(frozen=True)
class _Client:
    """One audited client: its learner's public start and its synthetic batch."""

    encoder: SyntheticTextEncoder
    settings: LearnerSettings
    width: int
    seed: int
    features: Tensor
    labels: Tensor

    def learner(self, noise: NoiseSource | None = None) -> PromptLearner:
        """A fresh learner at the public start (same prompt and carriers every time)."""
        return PromptLearner(
            self.encoder,
            torch.tensor(10.0),
            self.settings,
            generator=torch.Generator().manual_seed(self.seed),
            width=self.width,
            noise=noise,
        )

    def carriers(self) -> tuple[Tensor, Tensor]:
        """The carriers (u, v) the learner's first step uses, from its public seeds."""
        s = self.settings
        generator = torch.Generator().manual_seed(self.seed)
        start = initial_local_prompt((s.n_ctx, self.width), s.init_std, generator)
        u, v, _ = mechanics.factorise(start, s.rank, generator)
        return u, v

    def global_grad(self, canary: Tensor | None) -> Tensor:
        """The clipped global-prompt gradient ``train_step`` returns for the server."""
        rows = None if canary is None else canary.unsqueeze(0)
        step = self.learner().train_step(
            self.features, self.labels, expected_batch=self._batch, canary_rows=rows
        )
        assert step.global_grad is not None  # DP-FPL shares a global prompt
        return step.global_grad

    @property
    def _batch(self) -> float:
        return float(self.labels.numel())


def _clients(
    count: int, *, noise_multiplier: float, clip_norm: float, batch: int, n_ctx: int, width: int
) -> list[_Client]:
    gen = torch.Generator().manual_seed(_BACKGROUND_SEED)
    encoder = SyntheticTextEncoder(n_ctx, width, gen)
    settings = LearnerSettings(
        method=Method.DPFPL,
        n_ctx=n_ctx,
        rank=_RANK,
        init_std=_INIT_STD,
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        dp_mode=DPMode.PER_SAMPLE,
        clip_norm=clip_norm,
        local_noise_multiplier=noise_multiplier,
    )
    return [
        _Client(
            encoder,
            settings,
            width,
            seed=_BACKGROUND_SEED + i,
            features=F.normalize(torch.randn(batch, _EMBED, generator=gen), dim=-1),
            labels=torch.randint(0, _CLASSES, (batch,), generator=gen),
        )
        for i in range(count)
    ]


def _trial_seed(seed: int, trial: int) -> int:
    """A distinct public seed per trial (the strategy derives its noise from one seed)."""
    digest = hashlib.sha256(f"audit/{seed}/{trial}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def local_step_game(
    *,
    noise_multiplier: float,
    clip_norm: float = 10.0,
    batch: int = 8,
    n_ctx: int = 4,
    width: int = 16,
    public_seed: int | None = None,
) -> CanaryGame:
    """One local step of a DP-FPL learner on a known batch, with or without a canary.

    The canary's per-sample gradient is ``a u_0 v_0`` (first carrier column times first
    carrier row, a = CANARY_NORM_FACTOR C): its du = a u_0 e_0^T and dv = a e_0 v_0 both
    have norm a, so after clipping each sits at C.
    """
    (client,) = _clients(
        1,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        batch=batch,
        n_ctx=n_ctx,
        width=width,
    )
    u, v = client.carriers()
    canary = (CANARY_NORM_FACTOR * clip_norm * torch.outer(u[:, 0], v[0])).unsqueeze(0)
    direction = torch.outer(torch.eye(_RANK, dtype=v.dtype)[0], v[0]).flatten().double()

    def release(include: bool, trial: int) -> Tensor:
        public = public_seed is not None
        learner = client.learner(
            NoiseSource.public_seed(public_seed, "local", trial) if public else None
        )
        before = learner.private_state()["local_prompt"].double()
        learner.train_step(
            client.features,
            client.labels,
            expected_batch=float(batch),
            canary_rows=canary if include else None,
        )
        moved = (before - learner.private_state()["local_prompt"].double()) / client.settings.lr
        return (u.double().T @ moved).flatten()  # dv, exactly (module docstring)

    sensitivity = clip_norm / batch
    return CanaryGame(
        channel=Channel.LOCAL,
        noise_multiplier=noise_multiplier,
        release=release,
        direction=direction,
        sensitivity=sensitivity,
        noise_std=noise_multiplier * math.sqrt(2.0) * sensitivity,
        observed=(
            f"the local prompt ({n_ctx}x{width}) before and after one PromptLearner.train_step "
            f"(dpfpl, per-sample) on a known batch of {batch}, carriers known; scored: "
            f"dv = u^T (p_L before - after) / lr ({_RANK}x{width})"
        ),
    )


def _reply(node: int, grad: Tensor) -> Message:
    """A client's train reply as the server receives it (content built by ``wire``).

    The metadata is given whole (Flower's constructor for a received message): outside
    a Flower runtime no task identity exists to derive it from.
    """
    metadata = Metadata(
        run_id=0,
        message_id=f"audit-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    content = wire.train_reply_content(grad=grad, train_loss=0.0, dp_on=True, sample_rate=1.0)
    return Message(content=content, metadata=metadata)


def _audit_plan(noise_multiplier: float, clip_norm: float, batch: int) -> ChannelPlan:
    """A plain per-sample plan whose global channel has multiplier ``noise_multiplier``."""
    return ChannelPlan(
        mode=DPMode.PER_SAMPLE,
        method=Method.DPFPL,
        aggregation=Aggregation.PLAIN,
        guarantee=Guarantee.ACCOUNTED,
        delta=1e-5,
        accountant=AccountantKind.RDP,
        sample_rate=1.0,
        local_steps=1,
        rounds=1,
        clip_norm=clip_norm,
        batch_size=batch,
        target_epsilon=math.inf,
        z_step=noise_multiplier,
        z_local=0.0,
        z_global=noise_multiplier,
    )


def _canary_direction(n_ctx: int, width: int) -> Tensor:
    gen = torch.Generator().manual_seed(_BACKGROUND_SEED + 1)
    direction = torch.randn(n_ctx, width, generator=gen)
    return direction / torch.linalg.vector_norm(direction)


def _client_grads(clients: list[_Client], canary: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Every client's global gradient without and with the canary in client 0's batch."""
    without = [c.global_grad(None) for c in clients]
    return without, [clients[0].global_grad(canary), *without[1:]]


def global_round_game(
    *,
    noise_multiplier: float,
    clip_norm: float = 10.0,
    batch: int = 8,
    clients: int = 4,
    n_ctx: int = 4,
    width: int = 16,
    public_seed: int | None = None,
) -> CanaryGame:
    """One ``DPFPLStrategy.aggregate_train`` of N known replies, the canary in client 0.

    The canary is a per-sample gradient of norm CANARY_NORM_FACTOR C in a fixed
    direction; clipped to C by the client it moves the mean by C / (B N).
    """
    members = _clients(
        clients, noise_multiplier=0.0, clip_norm=clip_norm, batch=batch, n_ctx=n_ctx, width=width
    )
    direction = _canary_direction(n_ctx, width)
    without, with_ = _client_grads(members, CANARY_NORM_FACTOR * clip_norm * direction)
    plan = _audit_plan(noise_multiplier, clip_norm, batch)
    nodes = [_NODE_BASE + i for i in range(clients)]

    def release(include: bool, trial: int) -> Tensor:
        strategy = DPFPLStrategy(
            initial_prompt=torch.zeros(n_ctx, width),
            server_lr=_SERVER_LR,
            channel=plan,
            min_nodes=1,
            seed=None if public_seed is None else _trial_seed(public_seed, trial),
        )
        grads = with_ if include else without
        arrays, _ = strategy.aggregate_train(
            1, [_reply(n, g) for n, g in zip(nodes, grads, strict=True)]
        )
        if arrays is None:
            raise RuntimeError("the strategy refused the audit's replies: see its log")
        return (-wire.read_global_prompt(arrays).double() / _SERVER_LR).flatten()

    sensitivity = clip_norm / (batch * clients)
    return CanaryGame(
        channel=Channel.GLOBAL,
        noise_multiplier=noise_multiplier,
        release=release,
        direction=direction.flatten().double(),
        sensitivity=sensitivity,
        noise_std=noise_multiplier * sensitivity,
        observed=(
            f"the global prompt ({n_ctx}x{width}) after one DPFPLStrategy.aggregate_train of "
            f"{clients} replies (each a train_step's global gradient on a known batch of "
            f"{batch}), the canary in client 0"
        ),
    )


def secure_round_game(
    *,
    noise_multiplier: float,
    clip_norm: float = 10.0,
    batch: int = 8,
    clients: int = 4,
    n_ctx: int = 4,
    width: int = 16,
    public_seed: int | None = None,
) -> CanaryGame:
    """One whole SecAgg+ round of N clients' global gradients, the canary in client 0.

    Every stage runs (keys, shares, masked inputs, consistency, unmasking) with the secure config a
    run derives (``secure_channel.secagg_config``); all N survive. With a public seed
    each client draws its rounding and Skellam noise from the seed's stream for the trial
    (``collect_masked``'s ``stream``), else from a fresh OS-keyed one, as in production.
    """
    if clients < 3:
        raise ValueError(f"secure aggregation needs >= 3 clients, got {clients}")
    members = _clients(
        clients, noise_multiplier=0.0, clip_norm=clip_norm, batch=batch, n_ctx=n_ctx, width=width
    )
    direction = _canary_direction(n_ctx, width)
    without, with_ = _client_grads(members, CANARY_NORM_FACTOR * clip_norm * direction)
    config = secagg_config(
        dim=n_ctx * width, clip_norm=clip_norm, batch_size=batch, z_global=noise_multiplier
    )
    nodes = [_NODE_BASE + i for i in range(clients)]

    def inputs(grads: list[Tensor]) -> dict[int, np.ndarray]:
        # what client_messages.secure_contribution hands to collect_masked
        return {
            n: mechanics.clip_tensor(g.double(), clip_norm).flatten().numpy()
            for n, g in zip(nodes, grads, strict=True)
        }

    vectors = {True: inputs(with_), False: inputs(without)}

    def release(include: bool, trial: int) -> Tensor:
        streams = {
            n: None if public_seed is None else KeyStream.from_seed(public_seed, "secure", trial, n)
            for n in nodes
        }
        result = _secure_round(config, vectors[include], streams)
        return torch.from_numpy(result).double()

    server = ServerRound(config, nodes)  # the round's public parameters, for the claim
    t, m = server.params.min_survivors, clients
    sensitivity = clip_norm / batch
    return CanaryGame(
        channel=Channel.SECURE,
        noise_multiplier=noise_multiplier,
        release=release,
        direction=direction.flatten().double(),
        sensitivity=sensitivity,
        noise_std=noise_multiplier * sensitivity * math.sqrt(m / t),
        rounding_var=clients / (4.0 * server.params.scale**2),
        survivor_ratio=m / t,
        observed=(
            f"the unmasked sum ({n_ctx}x{width}) of one SecAgg+ round of {clients} clients "
            f"(all survive, release threshold {t}), each input a train_step's global "
            f"gradient on a known batch of {batch}, the canary in client 0"
        ),
    )


def _secure_round(
    config: SecAggConfig, vectors: dict[int, np.ndarray], streams: dict[int, KeyStream | None]
) -> np.ndarray:
    """Drive every stage of one round in process; the released float sum."""
    server = ServerRound(config, list(vectors))
    clients = {n: ClientRound(config, n) for n in vectors}
    out = server.setup()
    out = server.share_keys({n: clients[n].setup(p) for n, p in out.items()})
    out = server.collect_masked({n: clients[n].share_keys(p) for n, p in out.items()})
    out = server.survivor_list(
        {n: clients[n].collect_masked(p, vectors[n], stream=streams[n]) for n, p in out.items()}
    )  # unsigned: the unmask stage follows at once
    result = server.finish({n: clients[n].unmask(p) for n, p in out.items()})
    return result.total


def canary_game(
    channel: Channel,
    *,
    noise_multiplier: float,
    clip_norm: float,
    batch: int,
    clients: int,
    public_seed: int | None = None,
) -> CanaryGame:
    """The game of a channel with the run's clip norm, batch and number of clients."""
    if channel is Channel.LOCAL:
        return local_step_game(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            batch=batch,
            public_seed=public_seed,
        )
    build = global_round_game if channel is Channel.GLOBAL else secure_round_game
    return build(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        batch=batch,
        clients=clients,
        public_seed=public_seed,
    )
