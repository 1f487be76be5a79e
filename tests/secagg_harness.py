"""A whole SecAgg+ round in one process, every message through Flower's record serde.

Each stage rebuilds every client from its stored state (``ClientRound.from_state``), as
a fresh ClientApp process would; each payload and state goes through ``ConfigRecord`` /
``ArrayRecord`` and their protobuf form, so the types are proven storable. Every
payload the server receives is recorded in ``Federation.received``. Dropouts and
tampering (of a client's reply, or of what the server sends: ``relay``) are injected
per stage. ``identities`` makes it a signed round (``signing_identities``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from dpfpl_app.secagg import (
    ARRAY_KEYS,
    ClientRound,
    SecAggConfig,
    ServerRound,
    Stage,
    fixed_point,
    skellam,
)
from dpfpl_app.secagg.server import DONE
from dpfpl_app.secagg.signing import Identity, Registry, SigningKey, session_id
from dpfpl_app.secagg.stream import KeyStream

Tamper = Callable[[int, dict[str, Any]], dict[str, Any]]
Relay = Callable[[dict[int, dict[str, Any]]], dict[int, dict[str, Any]]]


def signing_identities(
    nodes: list[int], extra: int = 0, session: bytes | None = None
) -> tuple[dict[int, Identity], list[SigningKey]]:
    """One P-384 key per node (as Flower's node auth uses) and ``extra`` registered keys
    that belong to no node, all in every node's registry.
    """
    private = [ec.generate_private_key(ec.SECP384R1()) for _ in range(len(nodes) + extra)]
    keys = [SigningKey(k) for k in private]
    registry = Registry([k.public_key() for k in private])
    session = session or session_id(1, "prompt")
    ids = {v: Identity(k, registry, session) for v, k in zip(nodes, keys, strict=False)}
    return ids, keys[len(nodes) :]


def through_flower(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Store a payload in records, serialise to protobuf and back."""
    arrays = {k: Array(v) for k, v in payload.items() if k in ARRAY_KEYS}
    config = {k: v for k, v in payload.items() if k not in ARRAY_KEYS}
    rd = RecordDict({"config": ConfigRecord(config), "arrays": ArrayRecord(arrays)})
    back = recorddict_from_proto(recorddict_to_proto(rd))
    out: dict[str, Any] = dict(back["config"])
    out.update({k: back["arrays"][k].numpy() for k in back["arrays"]})
    return out


def draws(seed: int, node: int) -> KeyStream:
    """The (public, test-only) stream a client draws rounding and noise from."""
    return KeyStream.from_seed(seed, "client-draws", node)


def expected_integer_input(
    config: SecAggConfig, server: ServerRound, x: np.ndarray, seed: int, node: int
) -> np.ndarray:
    """A client's quantised noised input, recomputed from its stream outside the client."""
    p = server.params
    stream = draws(seed, node)
    q = fixed_point.quantise(x, clip=p.clip, scale=p.scale, stream=stream)
    return q + skellam.skellam(p.client_variance, p.dim, stream)


@dataclass
class Federation:
    """Clients' stored states, the server, and a log of what the server received."""

    config: SecAggConfig
    inputs: dict[int, np.ndarray]
    seed: int = 0
    server: ServerRound = field(init=False)
    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    received: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    states_seen: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    identities: dict[int, Identity] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = ServerRound(self.config, list(self.inputs))

    def _client_stage(self, stage: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        identity = self.identities.get(node)
        if stage == Stage.SETUP:
            client = ClientRound(self.config, node, identity)
        else:
            state = through_flower(self.states[node])
            client = ClientRound.from_state(self.config, node, state, identity)
        payload = through_flower(payload)
        if stage == Stage.SETUP:
            reply = client.setup(payload)
        elif stage == Stage.SHARE_KEYS:
            reply = client.share_keys(payload)
        elif stage == Stage.COLLECT_MASKED:
            reply = client.collect_masked(payload, self.inputs[node], stream=draws(self.seed, node))
        elif stage == Stage.CONSISTENCY:
            reply = client.consistency(payload)
        else:
            reply = client.unmask(payload)
        self.states[node] = client.to_state()
        self.states_seen.setdefault(node, []).append(dict(self.states[node]))
        return reply

    def run(
        self,
        drop: Mapping[str, set[int]] | None = None,
        tamper: Mapping[str, Tamper] | None = None,
        relay: Mapping[str, Relay] | None = None,
    ) -> Any:
        """Drive all stages; ``drop[stage]``: nodes that do not answer that stage;
        ``relay[stage]`` rewrites what the server sends at that stage (a cheating server).
        """
        drop = drop or {}
        tamper = tamper or {}
        relay = relay or {}
        server = self.server
        out = server.setup()
        ran = []
        while server.pending != DONE:  # unsigned rounds skip the consistency stage
            stage = server.pending
            ran.append(stage)
            if stage in relay:
                out = relay[stage](out)
            replies = {}
            for node, payload in out.items():
                if node in drop.get(stage, set()):
                    continue
                reply = self._client_stage(stage, node, payload)
                if stage in tamper:
                    reply = tamper[stage](node, reply)
                reply = through_flower(reply)
                self.received.append((stage, node, reply))
                replies[node] = reply
            out = server.receive(replies)
        never = (set(drop) | set(tamper) | set(relay)) - set(ran)
        assert not never, f"the round never ran stage(s) {sorted(never)}: a test that cannot fail"
        return out

    def expected_integer_total(self, survivors: tuple[int, ...]) -> np.ndarray:
        """Sum of the survivors' quantised noised inputs, recomputed independently."""
        return sum(
            expected_integer_input(self.config, self.server, self.inputs[v], self.seed, v)
            for v in survivors
        )


def random_inputs(nodes: list[int], dim: int, clip: float, seed: int = 0) -> dict[int, np.ndarray]:
    """Float32 vectors of norm uniform in [0, clip] (float32 like a torch gradient)."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in nodes:
        x = rng.normal(size=dim)
        out[v] = (x / np.linalg.norm(x) * clip * rng.uniform(0.2, 1.0)).astype(np.float32)
    return out


def write_openssh_key(path: Path) -> bytes:
    """A P-384 key as a SuperNode's node-auth key files (``path``, ``path.pub``); its
    OpenSSH public line.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    Path(f"{path}.pub").write_bytes(public + b" comment\n")
    return public
