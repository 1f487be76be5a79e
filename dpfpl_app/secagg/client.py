"""One client's side of one SecAgg+ round, as five stage methods over plain payloads.

Each Flower message runs in a fresh process, so the object lives only for one stage:
build it with ``ClientRound(config)`` (stage 0) or ``ClientRound.from_state(...)``
(later stages), call the stage method, store ``to_state()`` back in the node's
``context.state``. The state holds the round's secrets (two X25519 private keys, the
self-mask seed, the shares received from neighbours and its own share of its secrets);
none of them is ever put in a reply except as shares encrypted to a neighbour, or, in
the last stage, as the one kind of share (seed OR key) the protocol allows per owner.
After ``unmask`` the state is empty: the caller must then delete the record (Python
cannot wipe ``bytes`` in place; in deployment the process ends with the message).

The client checks what the server could abuse: the round parameters against its own
config (noise, threshold, ring), its neighbours' keys, at least ``threshold`` live
neighbours at every stage, at least ``min_survivors`` inputs before revealing a share,
and never revealing both kinds of share for one owner.

With an ``Identity`` (``signing``: the organisation's long-term key and the registry of
organisations' public keys) the round is the malicious-server variant (Bonawitz et al.
2017 sec. 6, Bell et al. 2020): the client signs its key advertisement and refuses any
neighbour whose advertisement is not signed by a registered key, or whose key also
stands for another node; after the masked inputs it signs the survivor list it was
shown (``consistency``) and reveals shares only once at least ``min_survivors``
registered organisations (so at least ``threshold``) have signed that same list, and
every forwarded signature verifies. Any mismatch is a ``SecAggAbort`` naming the node
and the reason. Without an identity the round is the honest-but-curious protocol: the
server is trusted to forward keys and the survivor list faithfully, so the unmask stage
may follow the masked stage directly (the consistency stage, which only collects
signatures, is then skipped); a signed client refuses to unmask before it has signed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import crypto, fixed_point, skellam, wire
from .errors import SecAggAbort
from .graph import share_holders
from .params import RoundParams, SecAggConfig
from .signing import Identity, advert_message, survivors_message
from .stream import KeyStream, ring_mask
from .wire import Stage

_DONE = "done"


class ClientRound:
    """The per-round client state machine (see module docstring)."""

    def __init__(
        self, config: SecAggConfig, node_id: int, identity: Identity | None = None
    ) -> None:
        self.config = config
        self.node_id = int(node_id)
        self.identity = identity
        self._state: dict[str, Any] = {"stage": "new"}

    # --- persistence ---------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """A flat dict of ints, floats, bytes and lists: storable in a ConfigRecord."""
        return dict(self._state)

    @classmethod
    def from_state(
        cls,
        config: SecAggConfig,
        node_id: int,
        state: Mapping[str, Any],
        identity: Identity | None = None,
    ) -> ClientRound:
        """Resume a round from ``to_state()`` (a fresh process per message)."""
        client = cls(config, node_id, identity)
        client._state = dict(state)
        return client

    @property
    def signed(self) -> bool:
        """Whether this node runs the malicious-server variant (it has an identity)."""
        return self.identity is not None

    def erase(self) -> None:
        """Forget every secret of the round (also done by ``unmask``)."""
        self._state = {"stage": _DONE}

    @property
    def stage(self) -> str:
        """The last stage completed ("new" before setup, "done" after unmask)."""
        return str(self._state["stage"])

    def _params(self) -> RoundParams:
        return RoundParams.from_payload(self._state)

    def _expect(self, stage: str) -> None:
        done = self.stage
        want = "new" if stage == Stage.SETUP else Stage.ORDER[Stage.ORDER.index(stage) - 1]
        skipped = (
            stage == Stage.UNMASK and done == Stage.COLLECT_MASKED and not self._state.get("signed")
        )
        if done != want and not skipped:
            raise SecAggAbort(
                stage,
                f"node {self.node_id} is at stage {done!r}, expected {want!r}"
                + (" (a signed round reveals shares only after signing the survivor list)"
                   if stage == Stage.UNMASK and done == Stage.COLLECT_MASKED else ""),
            )
        if stage != Stage.SETUP and bool(self._state.get("signed", 0)) != self.signed:
            raise SecAggAbort(
                stage,
                f"node {self.node_id} began this round {'' if self.signed else 'un'}signed"
                " and now has a different signing configuration",
            )

    # --- stage 0 -> 1 -----------------------------------------------------------------
    def setup(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Check the round, make two key pairs and a self-mask seed; reply public values."""
        self._expect(Stage.SETUP)
        try:
            params = RoundParams.from_payload(payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggAbort(Stage.SETUP, f"malformed round parameters ({exc!r})") from None
        try:
            params.check_against(self.config)
        except ValueError as exc:
            raise SecAggAbort(Stage.SETUP, str(exc)) from None
        neighbours = wire.id_list(payload, wire.NEIGHBOURS)
        if self.node_id not in params.nodes or self.node_id in neighbours:
            raise SecAggAbort(
                Stage.SETUP, f"node {self.node_id} is not a sampled node or is its own neighbour"
            )
        if len(neighbours) != params.degree or not set(neighbours) <= set(params.nodes):
            raise SecAggAbort(
                Stage.SETUP,
                f"node {self.node_id} got {len(neighbours)} neighbours, degree is {params.degree}",
            )
        sk_mask, pk_mask = crypto.new_key_pair()
        sk_enc, pk_enc = crypto.new_key_pair()
        seed = os.urandom(crypto.SEED_BYTES)
        self._state = {
            **params.to_payload(),
            "stage": Stage.SETUP,
            "signed": int(self.signed),
            wire.NEIGHBOURS: sorted(neighbours),
            "sk-mask": sk_mask,
            "sk-enc": sk_enc,
            "seed": seed,
        }
        signer = signature = b""
        if self.identity is not None:
            signer = self.identity.key.public
            signature = self.identity.key.sign(
                advert_message(
                    self.identity.session, params.round_id, self.node_id, pk_mask, pk_enc
                )
            )
        return {
            wire.PK_MASK: pk_mask,
            wire.PK_ENC: pk_enc,
            wire.SEED_COMMIT: crypto.commit(params.round_id, self.node_id, seed),
            wire.SIGNER: signer,
            wire.SIGNATURE: signature,
        }

    # --- stage 1 -> 2 -----------------------------------------------------------------
    def share_keys(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Shamir-share the seed and the mask key among live neighbours, encrypted to each."""
        self._expect(Stage.SHARE_KEYS)
        params, st = self._params(), self._state
        peers = wire.id_list(payload, wire.PEERS)
        pk_mask = wire.bytes_list(payload, wire.PEER_PK_MASK, crypto.KEY_BYTES)
        pk_enc = wire.bytes_list(payload, wire.PEER_PK_ENC, crypto.KEY_BYTES)
        if not set(peers) <= set(st[wire.NEIGHBOURS]) or not len(peers) == len(pk_mask) == len(
            pk_enc
        ):
            raise SecAggAbort(
                Stage.SHARE_KEYS,
                f"node {self.node_id}: peers are not my neighbours or keys are misaligned",
            )
        if len(peers) + 1 < params.threshold:
            raise SecAggAbort(
                Stage.SHARE_KEYS,
                f"node {self.node_id} has {len(peers)} live neighbours + itself"
                f" < threshold {params.threshold}",
            )
        own = {crypto.public_of(st["sk-mask"]), crypto.public_of(st["sk-enc"])}
        if len(set(pk_mask) | set(pk_enc) | own) != 2 * len(peers) + 2:
            raise SecAggAbort(
                Stage.SHARE_KEYS,
                f"node {self.node_id}: public keys of neighbours (and mine) are not all distinct",
            )
        signers = self._verify_adverts(payload, params, peers, pk_mask, pk_enc)
        order = sorted(range(len(peers)), key=lambda i: peers[i])
        peers, pk_mask, pk_enc, signers = (
            [peers[i] for i in order],
            [pk_mask[i] for i in order],
            [pk_enc[i] for i in order],
            [signers[i] for i in order],
        )
        holders = share_holders(self.node_id, peers)
        seed_shares = crypto.split_secret(st["seed"], params.threshold, len(holders))
        key_shares = crypto.split_secret(st["sk-mask"], params.threshold, len(holders))
        mine = holders.index(self.node_id)
        own = (seed_shares.pop(mine), key_shares.pop(mine))
        ciphertexts = []
        for peer, pk, s_share, k_share in zip(peers, pk_enc, seed_shares, key_shares, strict=True):
            try:
                key = crypto.derive_key(
                    st["sk-enc"], pk, crypto.SHARE_PURPOSE, params.round_id, self.node_id, peer
                )
            except ValueError:
                raise SecAggAbort(
                    Stage.SHARE_KEYS, f"node {self.node_id}: neighbour {peer}'s key is invalid"
                ) from None
            bundle = crypto.pack_share_bundle(self.node_id, peer, s_share, k_share)
            ciphertexts.append(crypto.seal(key, bundle))
        st.update(
            {
                "stage": Stage.SHARE_KEYS,
                "own-seed-share": own[0],
                "own-key-share": own[1],
                wire.PEERS: peers,
                wire.PEER_PK_MASK: pk_mask,
                wire.PEER_PK_ENC: pk_enc,
                wire.PEER_SIGNERS: signers,
            }
        )
        return {wire.DESTINATIONS: peers, wire.CIPHERTEXTS: ciphertexts}

    def _verify_adverts(
        self,
        payload: Mapping[str, Any],
        params: RoundParams,
        peers: list[int],
        pk_mask: list[bytes],
        pk_enc: list[bytes],
    ) -> list[bytes]:
        """Each neighbour's registered key, after checking its signed advertisement.

        Unsigned round: the server's word is taken (``b""`` per neighbour). Signed round:
        every advertisement must be signed by a registered key over this session, round,
        node id and both keys; no key may stand for two nodes (or for this node's peer
        while being this node's own).
        """
        if self.identity is None:
            return [b""] * len(peers)
        stage = Stage.SHARE_KEYS
        try:
            signers = wire.bytes_list(payload, wire.PEER_SIGNERS)
            signatures = wire.bytes_list(payload, wire.PEER_SIGNATURES)
        except wire.PayloadError as exc:
            raise SecAggAbort(
                stage, f"node {self.node_id} requires signed key advertisements: {exc}"
            ) from None
        if not len(signers) == len(signatures) == len(peers):
            raise SecAggAbort(
                stage, f"node {self.node_id}: {len(signatures)} signatures for {len(peers)} peers"
            )
        seen = {self.identity.key.public: self.node_id}
        registry, session = self.identity.registry, self.identity.session
        for peer, signer, sig, pk_m, pk_e in zip(
            peers, signers, signatures, pk_mask, pk_enc, strict=True
        ):
            if signer not in registry:
                raise SecAggAbort(
                    stage,
                    f"node {self.node_id}: neighbour {peer}'s key advertisement is"
                    f" {'unsigned' if not signer else 'signed by an unregistered key'}:"
                    " signature check failed, refusing the round",
                )
            if signer in seen:
                raise SecAggAbort(
                    stage,
                    f"node {self.node_id}: neighbour {peer}'s registered key also stands for"
                    f" node {seen[signer]}: one organisation cannot be two nodes",
                )
            seen[signer] = peer
            message = advert_message(session, params.round_id, peer, pk_m, pk_e)
            if not registry.verify(signer, message, sig):
                raise SecAggAbort(
                    stage,
                    f"node {self.node_id}: neighbour {peer}'s key advertisement has an invalid"
                    " signature (keys substituted or replayed): signature check failed,"
                    " refusing the round",
                )
        return signers

    # --- stage 2 -> 3 -----------------------------------------------------------------
    def collect_masked(
        self, payload: Mapping[str, Any], vector: np.ndarray, *, stream: KeyStream | None = None
    ) -> dict[str, Any]:
        """Keep the neighbours' shares; reply the noised, quantised, masked input.

        ``vector`` must already be clipped to L2 norm ``clip`` (InputOutOfBound
        otherwise: nothing leaves the node). ``stream`` (tests only) replaces the OS
        keyed stream that draws the rounding and the Skellam noise.
        """
        self._expect(Stage.COLLECT_MASKED)
        params, st = self._params(), self._state
        sources = wire.id_list(payload, wire.SOURCES)
        ciphertexts = wire.bytes_list(payload, wire.CIPHERTEXTS)
        peers = dict(
            zip(
                st[wire.PEERS],
                zip(st[wire.PEER_PK_MASK], st[wire.PEER_PK_ENC], strict=True),
                strict=True,
            )
        )
        if len(sources) != len(ciphertexts) or not set(sources) <= set(peers):
            raise SecAggAbort(
                Stage.COLLECT_MASKED,
                f"node {self.node_id}: shares from non-neighbours or misaligned",
            )
        held: dict[int, tuple[bytes, bytes]] = {}
        rejected: list[int] = []
        for src, ct in zip(sources, ciphertexts, strict=True):
            key = crypto.derive_key(
                st["sk-enc"],
                peers[src][1],
                crypto.SHARE_PURPOSE,
                params.round_id,
                self.node_id,
                src,
            )
            try:
                s, d, seed_share, key_share = crypto.unpack_share_bundle(
                    crypto.open_sealed(key, ct)
                )
            except ValueError:
                rejected.append(src)
                continue
            if (s, d) != (src, self.node_id):
                rejected.append(src)
                continue
            held[src] = (seed_share, key_share)
        if len(held) + 1 < params.threshold:
            raise SecAggAbort(
                Stage.COLLECT_MASKED,
                f"node {self.node_id} holds shares of {len(held)} neighbours + itself"
                f" < threshold {params.threshold}",
            )
        if np.size(vector) != params.dim:
            raise ValueError(f"input has {np.size(vector)} entries, the round sums {params.dim}")
        draws = stream or KeyStream.secure()
        q = fixed_point.quantise(vector, clip=params.clip, scale=params.scale, stream=draws)
        noise = skellam.skellam(params.client_variance, params.dim, draws)
        y = fixed_point.to_ring(q + noise, params.bits) + ring_mask(
            st["seed"], params.dim, params.bits
        )
        for peer in sorted(held):  # mask only with neighbours whose shares arrived intact
            seed = crypto.derive_key(
                st["sk-mask"],
                peers[peer][0],
                crypto.MASK_PURPOSE,
                params.round_id,
                self.node_id,
                peer,
            )
            mask = ring_mask(seed, params.dim, params.bits)
            y = y + mask if self.node_id < peer else y - mask  # uint64 wraps mod 2^64
        y &= np.uint64((1 << params.bits) - 1)
        held[self.node_id] = (st.pop("own-seed-share"), st.pop("own-key-share"))
        owners = sorted(held)
        st.update(
            {
                "stage": Stage.COLLECT_MASKED,
                "held-owners": owners,
                "held-seed-shares": [held[o][0] for o in owners],
                "held-key-shares": [held[o][1] for o in owners],
            }
        )
        return {wire.MASKED: y.astype(wire.ring_dtype(params.bits)), wire.REJECTED: rejected}

    # --- stage 3 -> 4 -----------------------------------------------------------------
    def consistency(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Sign the survivor list the server shows (empty signature in an unsigned round).

        The list is kept: ``unmask`` refuses any other list, and in a signed round it
        reveals nothing until enough registered organisations have signed this one.
        """
        self._expect(Stage.CONSISTENCY)
        params, st = self._params(), self._state
        try:
            survivors = sorted(wire.id_list(payload, wire.SURVIVORS))
            self._check_survivors(Stage.CONSISTENCY, params, set(survivors))
        except (SecAggAbort, wire.PayloadError):
            self.erase()
            raise
        st.update({"stage": Stage.CONSISTENCY, "signed-survivors": survivors})
        signature = b""
        if self.identity is not None:
            signature = self.identity.key.sign(
                survivors_message(self.identity.session, params.round_id, self.node_id, survivors)
            )
        return {wire.SIGNATURE: signature}

    def _check_survivors(self, stage: str, params: RoundParams, survivors: set[int]) -> None:
        if self.node_id not in survivors or not survivors <= set(params.nodes):
            raise SecAggAbort(
                stage, f"node {self.node_id}: survivor list is inconsistent with the round"
            )
        if len(survivors) < params.min_survivors:
            raise SecAggAbort(
                stage,
                f"{len(survivors)} survivors < min_survivors {params.min_survivors}:"
                " their noise would not reach the calibrated total",
            )

    def _verify_survivor_signatures(
        self, payload: Mapping[str, Any], params: RoundParams, survivors: list[int]
    ) -> None:
        """Abort unless >= min_survivors registered organisations signed ``survivors``.

        Every forwarded signature must verify; a neighbour must sign with the key its
        advertisement was signed with; no key may sign for two nodes.
        """
        assert self.identity is not None
        stage = Stage.UNMASK
        try:
            nodes = wire.id_list(payload, wire.SIGNERS)
            keys = wire.bytes_list(payload, wire.SIGNER_KEYS)
            signatures = wire.bytes_list(payload, wire.SIGNATURES)
        except wire.PayloadError as exc:
            raise SecAggAbort(
                stage, f"node {self.node_id} requires a signed survivor list: {exc}"
            ) from None
        if not len(nodes) == len(keys) == len(signatures):
            raise SecAggAbort(stage, f"node {self.node_id}: signers and signatures misaligned")
        st, ident = self._state, self.identity
        known = dict(zip(st[wire.PEERS], st[wire.PEER_SIGNERS], strict=True))
        known[self.node_id] = ident.key.public
        seen: dict[bytes, int] = {}
        for node, key, sig in zip(nodes, keys, signatures, strict=True):
            if node not in survivors:
                raise SecAggAbort(stage, f"node {self.node_id}: signer {node} is not a survivor")
            if node in known and key != known[node]:
                raise SecAggAbort(
                    stage,
                    f"node {self.node_id}: node {node} signs the survivor list with another"
                    " key than its key advertisement: signature check failed",
                )
            if key in seen:
                raise SecAggAbort(
                    stage,
                    f"node {self.node_id}: one registered key signs for nodes {seen[key]}"
                    f" and {node}: signature check failed",
                )
            seen[key] = node
            message = survivors_message(ident.session, params.round_id, node, survivors)
            if not ident.registry.verify(key, message, sig):
                raise SecAggAbort(
                    stage,
                    f"node {self.node_id}: node {node}'s signature of the survivor list is"
                    " invalid (forged, or the lists shown differ): signature check failed",
                )
        if len(seen) < params.min_survivors:
            raise SecAggAbort(
                stage,
                f"node {self.node_id}: {len(seen)} registered organisations signed the survivor"
                f" list < min_survivors {params.min_survivors} (>= threshold"
                f" {params.threshold}): no share is revealed",
            )

    # --- stage 4 -> 5 -----------------------------------------------------------------
    def unmask(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Reveal seed shares of survivors and key shares of the dropped; then forget all."""
        self._expect(Stage.UNMASK)
        params, st = self._params(), self._state
        try:
            survivors = set(wire.id_list(payload, wire.SURVIVORS))
            dropped = set(wire.id_list(payload, wire.DROPPED))
            if "signed-survivors" in st and sorted(survivors) != st["signed-survivors"]:
                raise SecAggAbort(
                    Stage.UNMASK,
                    f"node {self.node_id}: the survivor list differs from the one it signed"
                    " in the consistency stage",
                )
            if self.identity is not None:  # _expect: a signed client has signed a list
                self._verify_survivor_signatures(payload, params, st["signed-survivors"])
            if survivors & dropped:
                raise SecAggAbort(
                    Stage.UNMASK,
                    f"server lists nodes {sorted(survivors & dropped)}"
                    " as both survived and dropped",
                )
            if not dropped <= set(params.nodes):
                raise SecAggAbort(
                    Stage.UNMASK,
                    f"node {self.node_id}: dropped list is inconsistent with the round",
                )
            self._check_survivors(Stage.UNMASK, params, survivors)
            held = dict(
                zip(
                    st["held-owners"],
                    zip(st["held-seed-shares"], st["held-key-shares"], strict=True),
                    strict=True,
                )
            )
            seed_owners = sorted(o for o in held if o in survivors)
            key_owners = sorted(o for o in held if o in dropped)
            return {
                wire.SEED_OWNERS: seed_owners,
                wire.SEED_SHARES: [held[o][0] for o in seed_owners],
                wire.KEY_OWNERS: key_owners,
                wire.KEY_SHARES: [held[o][1] for o in key_owners],
            }
        finally:
            self.erase()
