"""The server's side of one SecAgg+ round: route, count, reconstruct, unmask, check.

Stage methods take the replies of the previous stage as ``{node_id: payload}`` (a node
missing from the dict dropped out; a Flower error reply should simply be left out) and
return ``{node_id: payload}`` for the next stage. A reply that breaks the protocol is
recorded as a ``Fault`` naming the node, the stage and why, and the round goes on
without that node whenever the thresholds still hold; otherwise ``SecAggAbort`` names
the stage and the counts and nothing is released.

What the server can check without seeing an input: public keys are well formed and
distinct; every client sent exactly one ciphertext per live neighbour; masked vectors
have the round's length, dtype and ring; every revealed share has the x-coordinate of
its holder and reconstructs a secret consistent with the commitment (self-mask seed)
or public key (mask key) the owner advertised in stage 1; at least ``threshold`` share
holders and ``min_survivors`` inputs at every stage; and the unmasked sum within a
high-probability bound on the norm of m in-bound inputs plus the m survivors' summed
noise (``params.RoundParams.sum_norm_bound``). It cannot check a single client's input
norm: secure aggregation trades per-client poisoning checks for confidentiality; an
input inside the bound can still bias the sum.

Signatures (malicious-server variant): the server forwards each node's registered
public key and signatures (key advertisement, survivor list) unread; the clients verify
them (``client``). It needs no registry and cannot forge them. A round in which no node
signed its key advertisement is the honest-but-curious protocol (Bonawitz et al. 2017
sec. 4): there the survivor list goes straight to the unmask stage, one exchange fewer,
since the consistency stage exists only to collect signatures of that list.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from . import crypto, fixed_point, shamir, wire
from .dp import DistributedSkellam
from .errors import SecAggAbort
from .graph import neighbour_graph, share_holders
from .params import ROUND_ID_BYTES, RoundParams, SecAggConfig
from .stream import ring_mask
from .wire import PayloadError, Stage

Replies = Mapping[int, Mapping[str, Any]]
Payloads = dict[int, dict[str, Any]]
_MAX_SUBSETS = 2000  # share subsets tried before giving up on a corrupted secret


@dataclass(frozen=True)
class Fault:
    """A node that broke the protocol (or was left without enough neighbours)."""

    node: int
    stage: str
    reason: str


@dataclass(frozen=True)
class AggregateResult:
    """The one thing a round releases, and what the accounting needs to know about it."""

    total: np.ndarray  # float64 sum of the survivors' noised inputs (de-quantised)
    integer_total: np.ndarray  # the same in fixed point (int64), exact
    survivors: tuple[int, ...]  # nodes whose noised input is in the sum
    dropped: tuple[int, ...]  # sampled nodes whose input is not in the sum
    faults: tuple[Fault, ...]
    params: RoundParams

    def accounting(self, l2_sensitivity: float | None = None) -> DistributedSkellam:
        """``dp.DistributedSkellam`` of this round; use ``.rdp(orders, len(survivors))``."""
        return self.params.accounting(l2_sensitivity)

    def rdp(self, orders: Sequence[float], l2_sensitivity: float | None = None) -> np.ndarray:
        """RDP curve of this release, with the noise of the ACTUAL number of survivors."""
        return self.accounting(l2_sensitivity).rdp(orders, len(self.survivors))


DONE = "done"
_BUSY = "a call in progress (or aborted)"


class ServerRound:
    """One round's server state machine.

    ``setup`` -> ``share_keys`` -> ``collect_masked`` -> ``survivor_list`` -> (``unmask``,
    signed rounds only) -> ``finish``. ``pending`` names the stage whose payloads the last
    call returned, and ``receive`` takes that stage's replies, so a driver need not know
    whether the round is signed.
    """

    def __init__(
        self,
        config: SecAggConfig,
        nodes: Sequence[int],
        *,
        round_id: bytes | None = None,
        verify_all_shares: bool = True,
    ) -> None:
        self.params = RoundParams.derive(config, nodes, round_id or os.urandom(ROUND_ID_BYTES))
        self.graph = neighbour_graph(self.params.nodes, self.params.degree)
        self.verify_all_shares = verify_all_shares
        self.faults: list[Fault] = []
        self.pending = ""  # the stage whose payloads the last call returned ("": none yet)
        self.signed = False  # some node signed its key advertisement (known after SETUP)
        self._pk_mask: dict[int, bytes] = {}
        self._pk_enc: dict[int, bytes] = {}
        self._commit: dict[int, bytes] = {}
        self._peers: dict[int, list[int]] = {}  # share holders chosen in stage 1
        self._cts: dict[int, dict[int, bytes]] = {}
        self._routed: dict[int, list[int]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._mask_set: dict[int, set[int]] = {}
        self._signer: dict[int, tuple[bytes, bytes]] = {}  # (registered key, advert signature)
        self._survivors: list[int] = []
        self._responders: list[int] = []  # survivors that signed the list: asked to unmask
        self._dropped_keys: list[int] = []

    # --- helpers ------------------------------------------------------------------------
    def _take(self, awaited: str, call: str) -> None:
        """Refuse ``call`` unless the round awaits the replies of ``awaited``; until the
        call returns (or forever, if it aborts) no other call is accepted.
        """
        if self.pending != awaited:
            want = repr(Stage.SETUP) if not self.pending else f"the replies of {self.pending!r}"
            raise RuntimeError(f"{call}() called, but the round expects {want}")
        self.pending = _BUSY

    def _fault(self, node: int, stage: str, reason: str) -> None:
        self.faults.append(Fault(node, stage, reason))

    def _accept(
        self,
        stage: str,
        replies: Replies,
        expected: set[int],
        check: Callable[[int, Mapping[str, Any]], Any],
    ) -> dict[int, Any]:
        """Run ``check`` on each expected reply; faults for bad and unexpected replies."""
        good: dict[int, Any] = {}
        for node, payload in replies.items():
            if node not in expected:
                self._fault(node, stage, "reply from a node not asked at this stage (ignored)")
                continue
            try:
                good[node] = check(node, payload)
            except (PayloadError, ValueError, TypeError) as exc:
                self._fault(node, stage, f"invalid reply: {exc}")
        return good

    def _need(self, stage: str, alive: set[int], what: str) -> None:
        if len(alive) < self.params.min_survivors:
            raise SecAggAbort(
                stage,
                f"{len(alive)} of {len(self.params.nodes)} nodes {what}"
                f" < min_survivors {self.params.min_survivors}: nothing is released",
            )

    def _prune(
        self, stage: str, alive: set[int], holders: Callable[[int, set[int]], set[int]]
    ) -> set[int]:
        """Drop nodes with fewer than ``threshold`` live share holders, until stable."""
        alive = set(alive)
        changed = True
        while changed:
            changed = False
            for node in sorted(alive):
                live = len(holders(node, alive))
                if live < self.params.threshold:
                    self._fault(
                        node,
                        stage,
                        f"only {live} live share holders (neighbours and itself)"
                        f" < threshold {self.params.threshold}: excluded",
                    )
                    alive.discard(node)
                    changed = True
        return alive

    def receive(self, replies: Replies) -> Any:
        """The replies of the ``pending`` stage: the next stage's payloads, or the result."""
        step = {
            Stage.SETUP: self.share_keys,
            Stage.SHARE_KEYS: self.collect_masked,
            Stage.COLLECT_MASKED: self.survivor_list,
            Stage.CONSISTENCY: self.unmask,
            Stage.UNMASK: self.finish,
        }.get(self.pending)
        if step is None:
            raise RuntimeError(f"no stage is awaiting replies (pending {self.pending!r})")
        return step(replies)

    # --- stage 0 ----------------------------------------------------------------------
    def setup(self) -> Payloads:
        """Round parameters and each node's neighbours (SecAgg+ graph)."""
        self._take("", "setup")
        self.pending = Stage.SETUP
        public = self.params.to_payload()
        return {v: {**public, wire.NEIGHBOURS: list(self.graph[v])} for v in self.params.nodes}

    # --- stage 1 ----------------------------------------------------------------------
    def share_keys(self, replies: Replies) -> Payloads:
        """Collect public keys; forward each node its live neighbours' keys."""
        self._take(Stage.SETUP, "share_keys")
        self.pending = Stage.SHARE_KEYS

        def check(node: int, p: Mapping[str, Any]) -> tuple[bytes, bytes, bytes, bytes, bytes]:
            keys = (
                wire.bytes_field(p, wire.PK_MASK, crypto.KEY_BYTES),
                wire.bytes_field(p, wire.PK_ENC, crypto.KEY_BYTES),
            )
            for key in keys:
                crypto.check_public_key(key)
            if keys[0] == keys[1]:
                raise ValueError("mask and encryption keys are equal")
            return (
                *keys,
                wire.bytes_field(p, wire.SEED_COMMIT, 32),
                wire.optional_bytes(p, wire.SIGNER),
                wire.optional_bytes(p, wire.SIGNATURE),
            )

        good = self._accept(Stage.SETUP, replies, set(self.params.nodes), check)
        owners: dict[bytes, list[int]] = {}
        for node, (pk_m, pk_e, *_) in good.items():
            for key in (pk_m, pk_e):
                owners.setdefault(key, []).append(node)
        for nodes in owners.values():
            if len(nodes) > 1:
                for node in nodes:
                    self._fault(
                        node,
                        Stage.SETUP,
                        f"public key shared with nodes {sorted(set(nodes) - {node})}",
                    )
                    good.pop(node, None)
        alive = self._prune(Stage.SETUP, set(good), lambda v, a: (set(self.graph[v]) & a) | {v})
        self._need(Stage.SETUP, alive, "sent valid public keys")
        for node in alive:
            self._pk_mask[node], self._pk_enc[node], self._commit[node], *signer = good[node]
            self._signer[node] = (signer[0], signer[1])
            self._peers[node] = sorted(set(self.graph[node]) & alive)
        self.signed = any(self._signer[v][0] for v in alive)
        return {
            v: {
                wire.PEERS: self._peers[v],
                wire.PEER_PK_MASK: [self._pk_mask[u] for u in self._peers[v]],
                wire.PEER_PK_ENC: [self._pk_enc[u] for u in self._peers[v]],
                wire.PEER_SIGNERS: [self._signer[u][0] for u in self._peers[v]],
                wire.PEER_SIGNATURES: [self._signer[u][1] for u in self._peers[v]],
            }
            for v in sorted(alive)
        }

    # --- stage 2 ----------------------------------------------------------------------
    def collect_masked(self, replies: Replies) -> Payloads:
        """Collect encrypted shares; route each to its recipient."""
        self._take(Stage.SHARE_KEYS, "collect_masked")
        self.pending = Stage.COLLECT_MASKED

        def check(node: int, p: Mapping[str, Any]) -> dict[int, bytes]:
            dst = wire.id_list(p, wire.DESTINATIONS)
            cts = wire.bytes_list(p, wire.CIPHERTEXTS)
            if sorted(dst) != self._peers[node] or len(cts) != len(dst):
                raise ValueError(
                    f"ciphertexts for {sorted(dst)}, expected one for each of {self._peers[node]}"
                )
            if any(not ct for ct in cts):
                raise ValueError("empty ciphertext")
            return dict(zip(dst, cts, strict=True))

        good = self._accept(Stage.SHARE_KEYS, replies, set(self._peers), check)
        alive = self._prune(
            Stage.SHARE_KEYS, set(good), lambda v, a: (set(self._peers[v]) & a) | {v}
        )
        self._need(Stage.SHARE_KEYS, alive, "sent their encrypted shares")
        self._cts = {v: good[v] for v in alive}
        out: Payloads = {}
        for v in sorted(alive):
            self._routed[v] = [u for u in self._peers[v] if u in alive]
            out[v] = {
                wire.SOURCES: self._routed[v],
                wire.CIPHERTEXTS: [self._cts[u][v] for u in self._routed[v]],
            }
        self._cts = {}  # routed: the server keeps no ciphertext it does not need
        return out

    # --- stage 3 ----------------------------------------------------------------------
    def survivor_list(self, replies: Replies) -> Payloads:
        """Collect masked inputs; show every survivor the survivor list: to sign (signed
        round, ``pending`` CONSISTENCY), or with the unmask request (unsigned, UNMASK).
        """
        self._take(Stage.COLLECT_MASKED, "survivor_list")
        p = self.params

        def check(node: int, pl: Mapping[str, Any]) -> tuple[np.ndarray, list[int]]:
            vec = wire.ring_vector(pl, wire.MASKED, p.dim, p.bits)
            rejected = wire.id_list(pl, wire.REJECTED)
            if not set(rejected) <= set(self._routed[node]):
                raise ValueError(
                    f"rejects shares from {sorted(set(rejected) - set(self._routed[node]))},"
                    " which were not sent to it"
                )
            return vec, rejected

        good = self._accept(Stage.COLLECT_MASKED, replies, set(self._routed), check)
        accused: dict[int, list[int]] = {}
        for node, (_, rejected) in good.items():
            for bad in rejected:
                accused.setdefault(bad, []).append(node)
        for bad, by in sorted(accused.items()):
            self._fault(
                bad,
                Stage.SHARE_KEYS,
                f"its encrypted shares failed to authenticate at nodes {sorted(by)}:"
                " input discarded",
            )
        survivors = set(good) - set(accused)
        self._need(Stage.COLLECT_MASKED, survivors, "sent valid masked inputs")
        self._mask_set = {v: set(self._routed[v]) - set(good[v][1]) for v in survivors}
        self._masked = {v: good[v][0] for v in survivors}  # discarded inputs are not kept
        dropped = sorted({u for v in survivors for u in self._mask_set[v]} - survivors)
        self._survivors, self._dropped_keys = sorted(survivors), dropped
        self._check_holders(Stage.COLLECT_MASKED, survivors)
        if not self.signed:
            return self._unmask_payloads({v: b"" for v in self._survivors})
        self.pending = Stage.CONSISTENCY
        return {v: {wire.SURVIVORS: self._survivors} for v in self._survivors}

    def _check_holders(self, stage: str, responders: set[int]) -> None:
        """Abort unless every secret to rebuild has >= threshold holders among ``responders``."""
        for owner in self._survivors + self._dropped_keys:
            holders = self._holders(owner, responders)
            if len(holders) < self.params.threshold:
                what = "self-mask seed" if owner in self._survivors else "mask key"
                raise SecAggAbort(
                    stage,
                    f"node {owner}'s {what} is held by {len(holders)} responding survivors"
                    f" < threshold {self.params.threshold}: nothing is released",
                )

    # --- stage 4 ----------------------------------------------------------------------
    def unmask(self, replies: Replies) -> Payloads:
        """Collect survivor-list signatures; ask the signers for the shares that unmask.

        Every signer gets the list, the dropped nodes whose mask keys are needed, and
        all signatures (the clients verify them; a signed client reveals nothing unless
        ``min_survivors`` registered organisations signed the same list, so a signed
        round needs that many answers here; an unsigned one, as before, only enough
        holders of every secret).
        """
        self._take(Stage.CONSISTENCY, "unmask")
        signed = self._accept(
            Stage.CONSISTENCY,
            replies,
            set(self._survivors),
            lambda node, pl: wire.optional_bytes(pl, wire.SIGNATURE),
        )
        if any(signed.values()):
            self._need(Stage.CONSISTENCY, set(signed), "signed the survivor list")
        self._check_holders(Stage.CONSISTENCY, set(signed))
        return self._unmask_payloads(signed)

    def _unmask_payloads(self, signed: Mapping[int, bytes]) -> Payloads:
        """Ask ``signed``'s nodes (every survivor, unsigned) for the shares that unmask."""
        self.pending = Stage.UNMASK
        self._responders = sorted(signed)
        signers = {
            wire.SIGNERS: self._responders,
            wire.SIGNER_KEYS: [self._signer[v][0] for v in self._responders],
            wire.SIGNATURES: [signed[v] for v in self._responders],
        }
        return {
            v: {wire.SURVIVORS: self._survivors, wire.DROPPED: self._dropped_keys, **signers}
            for v in self._responders
        }

    def _holders(self, owner: int, responders: set[int]) -> set[int]:
        """Responders that hold a verified share of ``owner`` (they masked with it).

        A responding owner holds its own share too (only its seed's is ever revealed).
        """
        held = {h for h in responders if owner in self._mask_set.get(h, ())}
        return held | ({owner} & responders)

    # --- stage 5 ----------------------------------------------------------------------
    def finish(self, replies: Replies) -> AggregateResult:
        """Reconstruct seeds and keys, remove every mask, check and release the sum."""
        self._take(Stage.UNMASK, "finish")
        p = self.params
        seeds, keys = self._collect_shares(replies)
        total = np.zeros(p.dim, dtype=np.uint64)
        for v in self._survivors:
            seed = self._recover(v, seeds.get(v, []), partial(self._seed_ok, v), "self-mask seed")
            total += self._masked[v] - ring_mask(seed, p.dim, p.bits)
        for j in self._dropped_keys:
            sk = self._recover(j, keys.get(j, []), partial(self._key_ok, j), "mask key")
            for v in self._survivors:
                if j in self._mask_set[v]:  # v added +mask if v < j, else -mask
                    seed = crypto.derive_key(
                        sk, self._pk_mask[v], crypto.MASK_PURPOSE, p.round_id, j, v
                    )
                    mask = ring_mask(seed, p.dim, p.bits)
                    total = total - mask if v < j else total + mask
        integer = fixed_point.from_ring(total, p.bits)
        self._check_sum(integer)
        survivors = tuple(self._survivors)
        self._masked = {}
        self.pending = DONE
        return AggregateResult(
            total=fixed_point.dequantise(integer, p.scale),
            integer_total=integer,
            survivors=survivors,
            dropped=tuple(v for v in p.nodes if v not in survivors),
            faults=tuple(self.faults),
            params=p,
        )

    def _seed_ok(self, owner: int, secret: bytes) -> bool:
        """A reconstructed self-mask seed matches the owner's stage-1 commitment."""
        return crypto.commit(self.params.round_id, owner, secret) == self._commit[owner]

    def _key_ok(self, owner: int, secret: bytes) -> bool:
        """A reconstructed mask key matches the owner's stage-1 public key."""
        return crypto.public_of(secret) == self._pk_mask[owner]

    def _collect_shares(
        self, replies: Replies
    ) -> tuple[dict[int, list[tuple[int, bytes]]], dict[int, list[tuple[int, bytes]]]]:
        """Per owner, the (holder, share) pairs revealed, checked for routing and x-coordinate."""
        seeds: dict[int, list[tuple[int, bytes]]] = {}
        keys: dict[int, list[tuple[int, bytes]]] = {}
        survivors, dropped = set(self._survivors), set(self._dropped_keys)

        def check(
            node: int, pl: Mapping[str, Any]
        ) -> list[tuple[dict[int, list[tuple[int, bytes]]], int, bytes]]:
            out = []
            for owners_key, shares_key, allowed, sink in (
                (wire.SEED_OWNERS, wire.SEED_SHARES, survivors, seeds),
                (wire.KEY_OWNERS, wire.KEY_SHARES, dropped, keys),
            ):
                owners, shares = wire.id_list(pl, owners_key), wire.bytes_list(pl, shares_key)
                if len(owners) != len(shares):
                    raise ValueError(f"{owners_key} and {shares_key} differ in length")
                for owner, share in zip(owners, shares, strict=True):
                    holds = owner in self._mask_set[node] or (owner == node and sink is seeds)
                    if owner not in allowed or not holds:
                        raise ValueError(f"revealed a share of node {owner} it should not reveal")
                    x = share_holders(owner, self._peers[owner]).index(node) + 1
                    if shamir.share_x(share) != x:
                        raise ValueError(
                            f"share of node {owner} has x-coordinate {shamir.share_x(share)},"
                            f" expected {x}"
                        )
                    out.append((sink, owner, share))
            return out

        asked = set(self._responders)
        for node, items in self._accept(Stage.UNMASK, replies, asked, check).items():
            for sink, owner, share in items:
                sink.setdefault(owner, []).append((node, share))
        return seeds, keys

    def _recover(
        self, owner: int, shares: list[tuple[int, bytes]], valid: Callable[[bytes], bool], what: str
    ) -> bytes:
        """Reconstruct a secret that passes ``valid``; name holders of wrong shares."""
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggAbort(
                Stage.UNMASK,
                f"{len(shares)} shares of node {owner}'s {what} revealed < threshold {t}:"
                " nothing is released",
            )

        def attempt(subset: Sequence[tuple[int, bytes]]) -> bytes | None:
            try:
                secret = crypto.join_secret([s for _, s in subset])
            except ValueError:
                return None
            return secret if valid(secret) else None

        first = shares[:t]
        found = _first_valid([first], attempt)
        if found is None:  # some share is wrong: search the t-subsets for a consistent one
            found = _first_valid(
                itertools.islice(itertools.combinations(shares, t), _MAX_SUBSETS), attempt
            )
        if found is None:
            raise SecAggAbort(
                Stage.UNMASK,
                f"node {owner}'s {what} cannot be reconstructed consistently from holders"
                f" {sorted(h for h, _ in shares)}",
            )
        subset, secret = found
        if self.verify_all_shares or subset is not first:
            # t - 1 known-good shares plus one more reconstruct the secret iff that one is right
            base = list(subset[: t - 1])
            for item in shares:
                if item not in subset and attempt([*base, item]) != secret:
                    self._fault(
                        item[0], Stage.UNMASK, f"revealed a wrong share of node {owner}'s {what}"
                    )
        return secret

    def _check_sum(self, integer: np.ndarray) -> None:
        """Abort unless the sum is within the bounds of m in-bound inputs plus their noise.

        The per-coordinate bound catches a wrap; the norm bound (``RoundParams.
        sum_norm_bound``, false alarm <= wrap_probability) also catches inputs larger
        than the clip norm by a few clip norms in total. The fault is logged by the
        caller from the abort's reason; an aborted round releases nothing.
        """
        m, p = len(self._survivors), self.params
        coord, norm = (
            int(np.abs(integer).max()) if integer.size else 0,
            float(np.linalg.norm(integer.astype(np.float64))),
        )
        if coord > p.sum_coord_bound(m) or norm > p.sum_norm_bound(m):
            raise SecAggAbort(
                Stage.UNMASK,
                f"unmasked sum out of bound (max |coord| {coord} vs {p.sum_coord_bound(m)},"
                f" L2 {norm / p.scale:.4g} vs {p.sum_norm_bound(m) / p.scale:.4g}"
                f" = {p.sum_norm_bound(m) / (p.scale * p.clip):.4g} clip norms) for {m}"
                f" survivors: an input above the clip norm (poisoned), a wrap-around or"
                f" corrupted unmasking (false alarm <= {p.wrap_probability:.3g});"
                " nothing is released",
            )


def _first_valid(
    subsets: Iterable[Sequence[tuple[int, bytes]]],
    attempt: Callable[[Sequence[tuple[int, bytes]]], bytes | None],
) -> tuple[Sequence[tuple[int, bytes]], bytes] | None:
    """The first subset whose reconstruction passes, with its secret."""
    for subset in subsets:
        secret = attempt(subset)
        if secret is not None:
            return subset, secret
    return None
