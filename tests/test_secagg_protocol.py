"""One SecAgg+ round end to end: exact sums, hidden inputs, dropouts, faulty clients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_harness import Federation, random_inputs

from dpfpl_app.secagg import (
    ClientRound,
    SecAggAbort,
    SecAggConfig,
    Stage,
    crypto,
    fixed_point,
    wire,
)

DIM = 512
NODES = [
    11,
    22,
    33,
    44,
    55,
    66,
    77,
    88,
    99,
    2**64 - 7,
]  # a uint64 id beyond sint64, as Flower makes
CONFIG = SecAggConfig(dim=DIM, clip=1.0, sum_noise_std=0.3)


def federation(
    nodes: list[int] = NODES, config: SecAggConfig = CONFIG, seed: int = 0
) -> Federation:
    return Federation(config, random_inputs(nodes, config.dim, config.clip, seed), seed=seed)


def test_sum_is_exactly_the_sum_of_quantised_noised_inputs() -> None:
    fed = federation()
    result = fed.run()
    assert result.survivors == tuple(sorted(NODES))
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )
    # and it is the float sum up to rounding and the calibrated noise (std 0.3 at >= 7 survivors)
    error = result.total - sum(fed.inputs[v].astype(np.float64) for v in NODES)
    expected_std = 0.3 * np.sqrt(len(NODES) / fed.server.params.min_survivors)
    assert abs(error.std() / expected_std - 1) < 0.15
    assert result.faults == ()


def test_sparse_graph_round_is_exact() -> None:
    nodes = list(range(1, 21))  # n = 20: degree 12 < 19, a real SecAgg+ graph
    fed = federation(nodes, dataclasses.replace(CONFIG, dim=64))
    result = fed.run()
    assert fed.server.params.degree == 12 and fed.server.params.threshold == 7
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


def _high_bits_chi2(vector: np.ndarray, bits: int, top: int = 4) -> float:
    """Chi-square statistic of the top ``top`` bits of ring elements against uniform."""
    counts = np.bincount((vector >> np.uint64(bits - top)).astype(np.int64), minlength=2**top)
    expected = vector.size / 2**top
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_15_DOF_P1E6 = 56.5  # chi-square 15 dof, upper 1e-6 quantile (masks use OS keys)


def test_masked_vectors_are_uniform_and_uncorrelated_with_inputs() -> None:
    fed = federation(config=dataclasses.replace(CONFIG, dim=8192))
    fed.run()
    bits = fed.server.params.bits
    masked = [
        (node, p[wire.MASKED]) for stage, node, p in fed.received if stage == Stage.COLLECT_MASKED
    ]
    assert len(masked) == len(NODES)
    for node, y in masked:
        assert _high_bits_chi2(y, bits) < CHI2_15_DOF_P1E6, (
            f"masked vector of node {node} is not uniform"
        )
        centred = fixed_point.from_ring(y, bits).astype(np.float64)
        corr = np.corrcoef(centred, fed.inputs[node])[0, 1]
        assert abs(corr) < 5 / np.sqrt(y.size), (
            f"masked vector of node {node} correlates with its input"
        )
    # power check: the same statistics on an unmasked encoded input fail clearly
    node = NODES[0]
    plain = fixed_point.to_ring(
        np.round(fed.inputs[node] * fed.server.params.scale).astype(np.int64), bits
    )
    assert _high_bits_chi2(plain, bits) > 100 * CHI2_15_DOF_P1E6
    assert np.corrcoef(fixed_point.from_ring(plain, bits), fed.inputs[node])[0, 1] > 0.99


def test_no_secret_or_input_appears_in_any_message_the_server_receives() -> None:
    fed = federation()
    fed.run()
    secrets = []
    for states in fed.states_seen.values():
        for state in states:
            secrets += [state[k] for k in ("sk-mask", "sk-enc", "seed") if k in state]
            secrets += state.get("held-seed-shares", []) + state.get("held-key-shares", [])
    assert len(secrets) > 3 * len(NODES)
    blobs = []
    for _, _, payload in fed.received:
        for value in payload.values():
            items = value if isinstance(value, list) else [value]
            blobs += [
                v.tobytes() if isinstance(v, np.ndarray) else v
                for v in items
                if isinstance(v, (bytes, np.ndarray))
            ]
    # shares revealed in the last stage are public by design; every other secret never appears
    revealed = {
        s
        for _, _, p in fed.received
        for s in p.get(wire.SEED_SHARES, []) + p.get(wire.KEY_SHARES, [])
    }
    for secret in secrets:
        if secret in revealed:
            continue
        assert not any(secret in blob for blob in blobs)
    # each input's float bytes and its quantised form never appear either
    for x in fed.inputs.values():
        assert not any(x.tobytes()[:64] in blob for blob in blobs)
    # the clients' stored state is empty after the round
    assert all(state == {"stage": "done"} for state in fed.states.values())


def test_each_survivor_reveals_only_one_kind_of_share_per_owner() -> None:
    fed = federation()
    fed.run(drop={Stage.UNMASK: set(), Stage.COLLECT_MASKED: {NODES[0]}})
    for stage, _, p in fed.received:
        if stage == Stage.UNMASK:
            assert not set(p[wire.SEED_OWNERS]) & set(p[wire.KEY_OWNERS])
            assert NODES[0] not in p[wire.SEED_OWNERS]


# --- dropouts ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "dropped"),
    [
        (Stage.SETUP, {11, 22}),  # before keys
        (Stage.SHARE_KEYS, {33}),  # after keys, before shares
        (Stage.COLLECT_MASKED, {44, 55, 66}),  # after shares, before the masked input
        (Stage.UNMASK, {77, 88}),  # after the masked input: its input still counts
        # unsigned, 6 answers < 7 min-survivors are enough while every secret keeps
        # t = 6 holders
        (Stage.UNMASK, {11, 22, 77, 88}),
    ],
)
def test_dropouts_at_each_stage_keep_the_sum_exact(stage: str, dropped: set[int]) -> None:
    fed = federation()
    result = fed.run(drop={stage: dropped})
    late = stage == Stage.UNMASK
    expected_survivors = set(NODES) if late else set(NODES) - dropped
    assert set(result.survivors) == expected_survivors
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


@pytest.mark.parametrize(
    ("stage", "n_drop", "message"),
    [
        (Stage.SETUP, 4, r"'secagg_setup'.*6 of 10 nodes sent valid public keys < min_survivors 7"),
        (
            Stage.SHARE_KEYS,
            4,
            r"'secagg_share_keys'.*6 of 10 nodes sent their encrypted shares < min_survivors 7",
        ),
        (
            Stage.COLLECT_MASKED,
            4,
            r"'secagg_collect_masked'.*6 of 10 nodes sent valid masked inputs < min_survivors 7",
        ),
        (
            Stage.UNMASK,
            6,
            r"'secagg_unmask'.*4 shares of node \d+'s self-mask seed revealed < threshold 6",
        ),
    ],
)
def test_too_many_dropouts_release_nothing(stage: str, n_drop: int, message: str) -> None:
    fed = federation()
    with pytest.raises(SecAggAbort, match=message):
        fed.run(drop={stage: set(NODES[:n_drop])})


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED, Stage.UNMASK])
def test_three_nodes_release_the_sum_after_one_drops_between_stages(stage: str) -> None:
    # Prepare: 3 nodes, complete graph k = 2: each secret has 3 holders (the two
    # neighbours and its owner) and threshold 2, so one loss after the key shares is
    # survivable; without the owner's own share it would leave one holder < 2
    fed = federation([11, 12, 13], dataclasses.replace(CONFIG, dim=64))

    # Execute
    result = fed.run(drop={stage: {12}})

    # Assert: a node that never sent its input is out of the sum; one that sent it but
    # never unmasked is in it (its seed rebuilt from the others' shares)
    expected = {11, 13} if stage == Stage.COLLECT_MASKED else {11, 12, 13}
    assert set(result.survivors) == expected
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


def test_dropouts_at_every_stage_together() -> None:
    fed = federation(list(range(1, 21)), dataclasses.replace(CONFIG, dim=64))
    result = fed.run(
        drop={
            Stage.SETUP: {1},
            Stage.SHARE_KEYS: {2},
            Stage.COLLECT_MASKED: {3, 4},
            Stage.UNMASK: {5},
        }
    )
    assert set(result.survivors) == set(range(5, 21))
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


# --- faulty clients -----------------------------------------------------------------------
def test_corrupted_share_ciphertext_is_named_and_the_round_recovers_without_its_sender() -> None:
    bad = 33

    def corrupt(node: int, reply: dict) -> dict:
        if node == bad:
            cts = list(reply[wire.CIPHERTEXTS])
            cts[0] = cts[0][:-5] + b"AAAA="  # breaks the Fernet MAC
            reply = {**reply, wire.CIPHERTEXTS: cts}
        return reply

    fed = federation()
    result = fed.run(tamper={Stage.SHARE_KEYS: corrupt})
    assert bad not in result.survivors and len(result.survivors) == len(NODES) - 1
    assert any(f.node == bad and "failed to authenticate" in f.reason for f in result.faults)
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


@pytest.mark.parametrize("length", [DIM - 1, DIM + 3])
def test_wrong_length_masked_vector_is_named_and_left_out(length: int) -> None:
    bad = 44

    def resize(node: int, reply: dict) -> dict:
        if node == bad:
            reply = {**reply, wire.MASKED: np.resize(reply[wire.MASKED], length)}
        return reply

    fed = federation()
    result = fed.run(tamper={Stage.COLLECT_MASKED: resize})
    assert bad not in result.survivors
    assert any(
        f.node == bad and f.stage == Stage.COLLECT_MASKED and f"length {length}" in f.reason
        for f in result.faults
    )
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


def test_masked_vector_outside_the_ring_is_refused() -> None:
    def widen(node: int, reply: dict) -> dict:
        if node == 55:
            y = reply[wire.MASKED].copy()
            y[0] = np.iinfo(y.dtype).max  # beyond the 2^bits ring
            reply = {**reply, wire.MASKED: y}
        return reply

    fed = federation()
    result = fed.run(tamper={Stage.COLLECT_MASKED: widen})
    assert 55 not in result.survivors and any(
        f.node == 55 and "outside" in f.reason for f in result.faults
    )


def test_wrong_revealed_share_is_named_and_the_sum_still_exact() -> None:
    liar = 66

    def lie(node: int, reply: dict) -> dict:
        if node == liar and reply[wire.SEED_SHARES]:
            shares = list(reply[wire.SEED_SHARES])
            shares[0] = shares[0][:4] + bytes(b ^ 0x5A for b in shares[0][4:])
            reply = {**reply, wire.SEED_SHARES: shares}
        return reply

    fed = federation()
    result = fed.run(tamper={Stage.UNMASK: lie})
    assert any(
        f.node == liar and f.stage == Stage.UNMASK and "wrong share" in f.reason
        for f in result.faults
    )
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


def test_too_many_wrong_shares_abort_naming_the_owner() -> None:
    def lie(node: int, reply: dict) -> dict:
        shares = [s[:4] + bytes(b ^ 0x5A for b in s[4:]) for s in reply[wire.SEED_SHARES]]
        return {**reply, wire.SEED_SHARES: shares}

    fed = federation()
    with pytest.raises(
        SecAggAbort, match=r"'secagg_unmask'.*self-mask seed cannot be reconstructed"
    ):
        fed.run(tamper={Stage.UNMASK: lie})


def test_out_of_bound_sum_is_refused() -> None:
    """A client bypassing its own bound check (400x its input) gets no wrapped sum released."""
    fed = federation()
    original = fixed_point.quantise

    def inflated(x, *, clip, scale, stream):  # type: ignore[no-untyped-def]
        return original(x, clip=clip, scale=scale, stream=stream) * 400

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fixed_point, "quantise", inflated)
        with pytest.raises(SecAggAbort, match=r"'secagg_unmask'.*out of bound"):
            fed.run()


def test_duplicate_public_keys_are_named() -> None:
    fed = federation()
    copied: dict[str, bytes] = {}

    def copy_key(node: int, reply: dict) -> dict:
        if node == 11:
            copied["pk"] = reply[wire.PK_MASK]
        if node == 22:
            reply = {**reply, wire.PK_MASK: copied["pk"]}
        return reply

    result = fed.run(tamper={Stage.SETUP: copy_key})
    assert {11, 22} <= {f.node for f in result.faults} and not {11, 22} & set(result.survivors)


# --- the client guards the server ---------------------------------------------------------
def test_client_refuses_a_server_that_lowers_the_noise() -> None:
    fed = federation()
    payload = fed.server.setup()[11]
    payload["client-variance"] = payload["client-variance"] / 100
    with pytest.raises(SecAggAbort, match="client_variance"):
        ClientRound(CONFIG, 11).setup(payload)


def test_client_refuses_to_unmask_below_min_survivors_or_with_overlapping_lists() -> None:
    fed = federation()
    out = fed.server.setup()
    clients = {v: ClientRound(CONFIG, v) for v in NODES}
    out = fed.server.share_keys({v: clients[v].setup(out[v]) for v in NODES})
    out = fed.server.collect_masked({v: clients[v].share_keys(out[v]) for v in NODES})
    for v in NODES:
        clients[v].collect_masked(out[v], fed.inputs[v])
    state = clients[11].to_state()
    few = {wire.SURVIVORS: NODES[:6]}
    with pytest.raises(SecAggAbort, match="6 survivors < min_survivors 7"):
        ClientRound.from_state(CONFIG, 11, state).consistency(few)
    client = ClientRound.from_state(CONFIG, 11, state)
    client.consistency({wire.SURVIVORS: NODES})
    both = {wire.SURVIVORS: NODES, wire.DROPPED: [22]}
    with pytest.raises(SecAggAbort, match=r"both survived and dropped"):
        client.unmask(both)
    # an unsigned round's unmask stage follows the masked one: the same checks hold there
    with pytest.raises(SecAggAbort, match="6 survivors < min_survivors 7"):
        ClientRound.from_state(CONFIG, 11, state).unmask({**few, wire.DROPPED: []})
    with pytest.raises(SecAggAbort, match=r"both survived and dropped"):
        ClientRound.from_state(CONFIG, 11, state).unmask(both)


def test_unsigned_round_has_four_stages_and_reveals_one_kind_of_share_per_owner() -> None:
    fed = federation()
    dropped = {NODES[0]}
    result = fed.run(drop={Stage.COLLECT_MASKED: dropped})
    stages = [stage for stage, _, _ in fed.received]
    assert Stage.CONSISTENCY not in stages
    assert sorted(set(stages), key=Stage.ORDER.index) == [
        Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK
    ]
    assert set(result.survivors) == set(NODES) - dropped
    for stage, _, reply in fed.received:
        if stage == Stage.UNMASK:  # seeds of survivors only, the dropped node's key only
            assert set(reply[wire.SEED_OWNERS]) <= set(result.survivors)
            assert set(reply[wire.KEY_OWNERS]) <= dropped


def test_stages_out_of_order_are_refused() -> None:
    with pytest.raises(SecAggAbort, match="expected 'secagg_setup'"):
        ClientRound(CONFIG, 11).share_keys({})
    fed = federation()
    with pytest.raises(RuntimeError, match="expects 'secagg_setup'"):
        fed.server.share_keys({})


def test_share_bundle_is_bound_to_its_pair() -> None:
    sk, pk = crypto.new_key_pair()
    sk2, pk2 = crypto.new_key_pair()
    rid = bytes(16)
    k_ab = crypto.derive_key(sk, pk2, crypto.SHARE_PURPOSE, rid, 1, 2)
    assert k_ab == crypto.derive_key(sk2, pk, crypto.SHARE_PURPOSE, rid, 2, 1)
    assert k_ab != crypto.derive_key(sk, pk2, crypto.MASK_PURPOSE, rid, 1, 2)
    assert k_ab != crypto.derive_key(sk, pk2, crypto.SHARE_PURPOSE, bytes([1] * 16), 1, 2)
    with pytest.raises(ValueError, match="authenticate"):
        crypto.open_sealed(
            crypto.derive_key(sk, pk2, crypto.MASK_PURPOSE, rid, 1, 2), crypto.seal(k_ab, b"x")
        )


def test_client_refuses_its_own_key_passed_off_as_a_neighbours() -> None:
    fed = federation()
    out = fed.server.setup()
    clients = {v: ClientRound(CONFIG, v) for v in NODES}
    replies = {v: clients[v].setup(out[v]) for v in NODES}
    out = fed.server.share_keys(replies)
    payload = dict(out[11])
    payload[wire.PEER_PK_MASK] = [replies[11][wire.PK_MASK], *payload[wire.PEER_PK_MASK][1:]]
    with pytest.raises(SecAggAbort, match="not all distinct"):
        clients[11].share_keys(payload)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda r: {
                **r,
                wire.DESTINATIONS: r[wire.DESTINATIONS][1:],
                wire.CIPHERTEXTS: r[wire.CIPHERTEXTS][1:],
            },
            "expected one for each",
        ),
        (lambda r: {**r, wire.CIPHERTEXTS: r[wire.CIPHERTEXTS][1:]}, "expected one for each"),
        (lambda r: {wire.DESTINATIONS: r[wire.DESTINATIONS]}, "missing field 'ciphertexts'"),
    ],
)
def test_malformed_share_replies_are_named_and_the_sender_excluded(tamper, reason) -> None:  # type: ignore[no-untyped-def]
    bad = 77
    fed = federation()
    result = fed.run(tamper={Stage.SHARE_KEYS: lambda node, r: tamper(r) if node == bad else r})
    assert bad not in result.survivors
    assert any(
        f.node == bad and f.stage == Stage.SHARE_KEYS and reason in f.reason for f in result.faults
    )
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )


def test_replies_from_nodes_not_asked_are_ignored_and_named() -> None:
    fed = federation()
    out = fed.server.setup()
    clients = {v: ClientRound(CONFIG, v) for v in NODES}
    replies = {v: clients[v].setup(out[v]) for v in NODES}
    replies[12345] = dict(replies[11])
    fed.server.share_keys(replies)
    assert any(f.node == 12345 and "not asked" in f.reason for f in fed.server.faults)
