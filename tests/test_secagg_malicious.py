"""Secure aggregation against a server that cheats (issue 28, item 5).

The key-substitution server: it answers for a victim's neighbours with X25519 keys of
its own, decrypts both kinds of Shamir share the victim encrypts to them, rebuilds its
self-mask seed and mask key, and strips every mask off the victim's individual input.
Against an unsigned client it succeeds (the first test shows it, against the production
``ClientRound``); a signed client refuses the round before any share leaves it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from secagg_harness import (
    Federation,
    draws,
    expected_integer_input,
    random_inputs,
    signing_identities,
    write_openssh_key,
)

from dpfpl_app.federation.secure_identity import IdentityConfigError, node_identity
from dpfpl_app.secagg import (
    ClientRound,
    SecAggAbort,
    SecAggConfig,
    ServerRound,
    Stage,
    crypto,
    fixed_point,
    wire,
)
from dpfpl_app.secagg.signing import Identity, SigningKey, advert_message
from dpfpl_app.secagg.stream import ring_mask

DIM = 64
CONFIG = SecAggConfig(dim=DIM, clip=1.0, sum_noise_std=0.3)
NODES = [11, 22, 33, 44, 55, 66, 77]  # n = 7: complete graph, threshold 4, min survivors 5
VICTIM = 11


# --- the key-substitution server, played against the production ClientRound -----------------
def key_substitution(
    identities: dict[int, Identity], sign_with: Identity | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run the attack on VICTIM; return (what the server recovers, the victim's true
    quantised noised input). ``sign_with``: a registered organisation colluding with
    the server signs the fake advertisements (else the real signatures are forwarded).
    """
    inputs = random_inputs(NODES, DIM, CONFIG.clip)
    server = ServerRound(CONFIG, NODES)
    setup = server.setup()
    clients = {v: ClientRound(CONFIG, v, identities.get(v)) for v in NODES}
    adverts = {v: clients[v].setup(setup[v]) for v in NODES}
    payload = dict(server.share_keys(adverts)[VICTIM])
    p, peers = server.params, payload[wire.PEERS]

    # the cheat: the server's own key pairs stand in for every neighbour of the victim
    fake = {u: (crypto.new_key_pair(), crypto.new_key_pair()) for u in peers}
    payload[wire.PEER_PK_MASK] = [fake[u][0][1] for u in peers]
    payload[wire.PEER_PK_ENC] = [fake[u][1][1] for u in peers]
    if sign_with is not None:
        payload[wire.PEER_SIGNERS] = [sign_with.key.public] * len(peers)
        payload[wire.PEER_SIGNATURES] = [
            sign_with.key.sign(
                advert_message(sign_with.session, p.round_id, u, fake[u][0][1], fake[u][1][1])
            )
            for u in peers
        ]
    shares = clients[VICTIM].share_keys(payload)  # a signed victim refuses here

    # decrypt what the victim encrypted to its "neighbours": both kinds of share
    seed_shares, key_shares = [], []
    for dst, ct in zip(shares[wire.DESTINATIONS], shares[wire.CIPHERTEXTS], strict=True):
        key = crypto.derive_key(
            fake[dst][1][0], adverts[VICTIM][wire.PK_ENC], crypto.SHARE_PURPOSE, p.round_id, dst,
            VICTIM,
        )  # fmt: skip
        _, _, seed_share, key_share = crypto.unpack_share_bundle(crypto.open_sealed(key, ct))
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    seed = crypto.join_secret(seed_shares[: p.threshold])
    sk_mask = crypto.join_secret(key_shares[: p.threshold])

    # hand the victim well-formed shares "from" its neighbours, take its masked input
    junk = crypto.split_secret(os.urandom(32), p.threshold, len(peers) + 1)
    cts = [
        crypto.seal(
            crypto.derive_key(
                fake[u][1][0], adverts[VICTIM][wire.PK_ENC], crypto.SHARE_PURPOSE, p.round_id, u,
                VICTIM,
            ),
            crypto.pack_share_bundle(u, VICTIM, junk[i], junk[i]),
        )
        for i, u in enumerate(peers)
    ]  # fmt: skip
    masked = clients[VICTIM].collect_masked(
        {wire.SOURCES: peers, wire.CIPHERTEXTS: cts}, inputs[VICTIM], stream=draws(0, VICTIM)
    )[wire.MASKED].astype(np.uint64)

    # remove the self-mask and every pairwise mask: the victim's input alone is left
    y = masked - ring_mask(seed, p.dim, p.bits)
    for u in peers:
        pair = crypto.derive_key(sk_mask, fake[u][0][1], crypto.MASK_PURPOSE, p.round_id, VICTIM, u)
        mask = ring_mask(pair, p.dim, p.bits)
        y = y - mask if VICTIM < u else y + mask
    y &= np.uint64((1 << p.bits) - 1)
    truth = expected_integer_input(CONFIG, server, inputs[VICTIM], 0, VICTIM)
    return fixed_point.from_ring(y, p.bits), truth


def test_key_substitution_unmasks_an_unsigned_clients_input() -> None:
    """The threat, shown: an honest-but-curious-only client loses its individual input."""
    recovered, truth = key_substitution({})
    np.testing.assert_array_equal(recovered, truth)


def test_signed_client_refuses_the_key_substitution_server() -> None:
    identities, _ = signing_identities(NODES)
    with pytest.raises(SecAggAbort, match=r"node 11: neighbour \d+'s key advertisement has an"
                       r" invalid signature.*signature check failed"):  # fmt: skip
        key_substitution(identities)


def test_signed_client_refuses_stripped_signatures() -> None:
    identities, _ = signing_identities(NODES)
    server = ServerRound(CONFIG, NODES)
    setup = server.setup()
    clients = {v: ClientRound(CONFIG, v, identities[v]) for v in NODES}
    payload = server.share_keys({v: clients[v].setup(setup[v]) for v in NODES})[VICTIM]
    state = clients[VICTIM].to_state()
    payload[wire.PEER_SIGNATURES] = [b""] * len(payload[wire.PEERS])
    with pytest.raises(SecAggAbort, match="invalid signature"):
        ClientRound.from_state(CONFIG, VICTIM, state, identities[VICTIM]).share_keys(payload)
    payload[wire.PEER_SIGNERS] = [b""] * len(payload[wire.PEERS])
    with pytest.raises(SecAggAbort, match="is unsigned: signature check failed"):
        ClientRound.from_state(CONFIG, VICTIM, state, identities[VICTIM]).share_keys(payload)
    del payload[wire.PEER_SIGNERS]
    with pytest.raises(SecAggAbort, match="requires signed key advertisements"):
        ClientRound.from_state(CONFIG, VICTIM, state, identities[VICTIM]).share_keys(payload)
    with pytest.raises(SecAggAbort, match="different signing configuration"):
        ClientRound.from_state(CONFIG, VICTIM, state).share_keys(payload)


def test_one_registered_key_cannot_stand_for_two_neighbours() -> None:
    """A registered organisation colluding with the server signs every fake advertisement."""
    identities, (colluder_key,) = signing_identities(NODES, extra=1)
    colluder = Identity(colluder_key, identities[VICTIM].registry, identities[VICTIM].session)
    with pytest.raises(SecAggAbort, match=r"registered key also stands for node \d+"):
        key_substitution(identities, sign_with=colluder)


def test_unregistered_signer_is_refused() -> None:
    identities, _ = signing_identities(NODES)
    stranger, _ = signing_identities([VICTIM])  # same session, a registry of its own
    with pytest.raises(SecAggAbort, match="signed by an unregistered key"):
        key_substitution(identities, sign_with=stranger[VICTIM])


# --- the consistency round ----------------------------------------------------------------
def signed_federation(nodes: list[int] = NODES, dim: int = DIM) -> Federation:
    config = dataclasses.replace(CONFIG, dim=dim)
    identities, _ = signing_identities(nodes)
    return Federation(config, random_inputs(nodes, dim, config.clip), identities=identities)


def test_signed_round_sums_exactly() -> None:
    fed = signed_federation()
    result = fed.run()
    assert result.survivors == tuple(NODES) and result.faults == ()
    np.testing.assert_array_equal(result.integer_total, fed.expected_integer_total(NODES))
    assert Stage.CONSISTENCY in {stage for stage, _, _ in fed.received}


def test_signed_client_refuses_to_unmask_before_signing_the_survivor_list() -> None:
    # a server that skips the consistency stage, as it may in an unsigned round, to
    # collect shares against a survivor list no registered organisation has signed
    fed = signed_federation()
    server, clients = fed.server, {}
    out = server.setup()
    for v in NODES:
        clients[v] = ClientRound(fed.config, v, fed.identities[v])
    out = server.share_keys({v: clients[v].setup(out[v]) for v in NODES})
    out = server.collect_masked({v: clients[v].share_keys(out[v]) for v in NODES})
    for v in NODES:
        clients[v].collect_masked(out[v], fed.inputs[v])
    skipped = {wire.SURVIVORS: NODES, wire.DROPPED: [], wire.SIGNERS: [],
               wire.SIGNER_KEYS: [], wire.SIGNATURES: []}
    with pytest.raises(SecAggAbort, match="only after signing the survivor list"):
        clients[NODES[0]].unmask(skipped)


@pytest.mark.parametrize(
    ("stage", "dropped"),
    [
        (Stage.SETUP, {11}),
        (Stage.SHARE_KEYS, {22}),
        (Stage.COLLECT_MASKED, {33, 44}),
        (Stage.CONSISTENCY, {55}),  # its input counts: the others reveal its seed shares
        (Stage.UNMASK, {66, 77}),
    ],
)
def test_signed_round_survives_dropouts_at_every_stage(stage: str, dropped: set[int]) -> None:
    fed = signed_federation()
    result = fed.run(drop={stage: dropped})
    counted = stage in (Stage.CONSISTENCY, Stage.UNMASK)  # dropped after sending the input
    assert set(result.survivors) == set(NODES) - (set() if counted else dropped)
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


def test_forged_consistency_signature_aborts_before_any_share_is_revealed() -> None:
    fed = signed_federation()

    def forge(out: dict[int, dict]) -> dict[int, dict]:
        for payload in out.values():
            sigs = list(payload[wire.SIGNATURES])
            sigs[2] = sigs[2][:-1] + bytes([sigs[2][-1] ^ 1])
            payload[wire.SIGNATURES] = sigs
        return out

    with pytest.raises(SecAggAbort, match=r"signature of the survivor list is invalid"):
        fed.run(relay={Stage.UNMASK: forge})
    assert not [r for stage, _, r in fed.received if stage == Stage.UNMASK]


def test_inconsistent_survivor_lists_abort() -> None:
    """The server shows some clients a list without node 77 (to ask them for its mask key)
    and the others the full list (to ask them for its seed shares).
    """
    fed = signed_federation()
    shown: dict[int, list[int]] = {}

    def split(out: dict[int, dict]) -> dict[int, dict]:
        for v, payload in out.items():
            if v in (11, 22, 33):
                payload[wire.SURVIVORS] = [u for u in payload[wire.SURVIVORS] if u != 77]
            shown[v] = payload[wire.SURVIVORS]
        return out

    def echo(out: dict[int, dict]) -> dict[int, dict]:
        for v, payload in out.items():
            payload[wire.SURVIVORS] = shown[v]
            payload[wire.DROPPED] = [77] if 77 not in shown[v] else []
        return out

    with pytest.raises(SecAggAbort, match=r"signature of the survivor list is invalid"):
        fed.run(relay={Stage.CONSISTENCY: split, Stage.UNMASK: echo})
    assert not [r for stage, _, r in fed.received if stage == Stage.UNMASK]


def test_unmask_list_must_be_the_signed_one() -> None:
    fed = signed_federation()

    def change(out: dict[int, dict]) -> dict[int, dict]:
        return {v: {**p, wire.SURVIVORS: p[wire.SURVIVORS][:-1]} for v, p in out.items()}

    with pytest.raises(SecAggAbort, match="differs from the one it signed"):
        fed.run(relay={Stage.UNMASK: change})


def test_signed_round_needs_min_survivors_signatures() -> None:
    fed = signed_federation()  # min_survivors 5 of 7
    with pytest.raises(SecAggAbort, match=r"4 of 7 nodes signed the survivor list < min_surv"):
        fed.run(drop={Stage.CONSISTENCY: {11, 22, 33}})


def test_too_few_signers_reveal_nothing() -> None:
    """A server claiming survivors that never signed (fake or silent) cannot pass the count."""
    fed = signed_federation()

    def withhold(out: dict[int, dict]) -> dict[int, dict]:
        for payload in out.values():
            for key in (wire.SIGNERS, wire.SIGNER_KEYS, wire.SIGNATURES):
                payload[key] = payload[key][:4]  # min_survivors is 5
        return out

    with pytest.raises(SecAggAbort, match=r"4 registered organisations signed .* < min_survivors"):
        fed.run(relay={Stage.UNMASK: withhold})


def test_signed_node_refuses_an_unsigned_round_and_vice_versa() -> None:
    identities, _ = signing_identities(NODES)
    mixed = {v: identities[v] for v in NODES if v != 44}  # node 44 has no keys
    fed = Federation(CONFIG, random_inputs(NODES, DIM, CONFIG.clip), identities=mixed)
    with pytest.raises(SecAggAbort, match="neighbour 44's key advertisement is unsigned"):
        fed.run()


# --- node config ----------------------------------------------------------------------------
def _context(node_config: dict[str, str | bool]) -> Context:
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_node_identity_from_the_supernode_key_and_a_registry_directory(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    mine = write_openssh_key(registry / "org-a")
    write_openssh_key(registry / "org-b")
    ident = node_identity(
        _context({"secagg-signing-key": str(registry / "org-a"),
                  "secagg-registry": str(registry)}), "prompt",
    )  # fmt: skip
    assert ident is not None and ident.key.public == mine and len(ident.registry) == 2
    assert isinstance(SigningKey.from_file(registry / "org-b"), SigningKey)


def test_node_that_requires_signed_rounds_refuses_without_keys(tmp_path: Path) -> None:
    assert node_identity(_context({}), "prompt") is None  # honest-server protocol, logged
    with pytest.raises(IdentityConfigError, match="refuses unsigned secure rounds"):
        node_identity(_context({"secagg-require-signed": "true"}), "prompt")
    with pytest.raises(IdentityConfigError, match="set secagg-registry too"):
        node_identity(_context({"secagg-signing-key": str(tmp_path / "k")}), "prompt")
    other = tmp_path / "other"
    other.mkdir()
    write_openssh_key(other / "org-c")
    write_openssh_key(tmp_path / "mine")
    with pytest.raises(IdentityConfigError, match="own public key is not in its registry"):
        node_identity(
            _context({"secagg-signing-key": str(tmp_path / "mine"),
                      "secagg-registry": str(other)}), "prompt",
        )  # fmt: skip
