"""Ring width, fixed point, parameter rules and the neighbour graph."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from secagg_harness import Federation

from dpfpl_app.secagg import (
    ClientRound,
    InputOutOfBound,
    RoundParams,
    SecAggConfig,
    ServerRound,
    Stage,
    fixed_point,
)
from dpfpl_app.secagg.graph import check_graph, neighbour_graph
from dpfpl_app.secagg.params import coord_bound
from dpfpl_app.secagg.stream import KeyStream

CONFIG = SecAggConfig(dim=64, clip=1.0, sum_noise_std=0.2)


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_worst_case_in_bound_inputs_do_not_wrap_and_the_ring_is_minimal(noise: float) -> None:
    """Every client puts its whole norm C on coordinate 0, same sign: the largest sum."""
    config = dataclasses.replace(CONFIG, sum_noise_std=noise)
    nodes = list(range(1, 11))
    worst = np.zeros(config.dim, dtype=np.float32)
    worst[0] = config.clip
    fed = Federation(config, {v: worst for v in nodes})
    result = fed.run()
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )
    p = fed.server.params
    if noise == 0.0:  # with noise the sum is the worst case plus a symmetric noise draw
        assert result.integer_total[0] >= len(nodes) * math.floor(p.scale * p.clip)
    # minimal: one bit less could not hold n in-bound inputs plus the noise tail
    assert 2 ** (p.bits - 2) <= p.sum_coord_bound(len(nodes)) < 2 ** (p.bits - 1)
    # and with one bit less this very sum would have wrapped
    total = result.integer_total
    assert not np.array_equal(
        fixed_point.from_ring(fixed_point.to_ring(total, p.bits - 2), p.bits - 2), total
    )


def _client_at_collect_masked(config: SecAggConfig) -> tuple[ClientRound, dict]:
    nodes = list(range(1, 6))
    server = ServerRound(config, nodes)
    clients = {v: ClientRound(config, v) for v in nodes}
    out = server.setup()
    out = server.share_keys({v: clients[v].setup(out[v]) for v in nodes})
    out = server.collect_masked({v: clients[v].share_keys(out[v]) for v in nodes})
    return clients[1], out[1]


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (np.full(64, 0.2), r"norm 1\.6 exceeds the bound 1"),
        (np.r_[np.nan, np.zeros(63)], "NaN or Inf"),
    ],
)
def test_out_of_bound_inputs_are_refused_before_anything_leaves(
    vector: np.ndarray, message: str
) -> None:
    client, payload = _client_at_collect_masked(CONFIG)
    before = client.to_state()
    with pytest.raises(InputOutOfBound, match=message):
        client.collect_masked(payload, vector)
    assert client.to_state() == before  # nothing recorded: the node may retry with a clipped input


def test_float32_clipping_a_hair_above_the_bound_is_accepted() -> None:
    client, payload = _client_at_collect_masked(CONFIG)
    x = np.ones(64, dtype=np.float32)
    x = (x / np.linalg.norm(x) * np.float32(1.0000001)).astype(np.float32)
    assert "masked" in client.collect_masked(payload, x)


def test_wrong_input_length_is_refused() -> None:
    client, payload = _client_at_collect_masked(CONFIG)
    with pytest.raises(ValueError, match="input has 63 entries, the round sums 64"):
        client.collect_masked(payload, np.zeros(63))


def test_quantisation_is_unbiased_and_within_one_unit() -> None:
    x = np.array([0.123456, -0.5, 0.0, 0.999])
    scale = 100.0
    stream = KeyStream.from_seed(0)
    draws = np.stack(
        [fixed_point.quantise(x, clip=2.0, scale=scale, stream=stream) for _ in range(4000)]
    )
    assert np.all(np.abs(draws - scale * x) < 1)
    assert np.all(np.abs(draws.mean(axis=0) - scale * x) < 5 * 0.5 / math.sqrt(4000))


def test_ring_encoding_round_trips_signed_values() -> None:
    bits = 20
    values = np.array([0, 1, -1, 2**19 - 1, -(2**19), 12345, -54321], dtype=np.int64)
    ring = fixed_point.to_ring(values, bits)
    assert ring.dtype == np.uint64 and int(ring.max()) < 2**bits
    np.testing.assert_array_equal(fixed_point.from_ring(ring, bits), values)


@pytest.mark.parametrize(
    ("n", "degree", "threshold", "min_survivors"),
    [(3, 2, 2, 2), (10, 9, 6, 7), (20, 12, 7, 14), (100, 16, 9, 67)],
)
def test_default_rules(n: int, degree: int, threshold: int, min_survivors: int) -> None:
    p = RoundParams.derive(CONFIG, range(n), bytes(16))
    assert (p.degree, p.threshold, p.min_survivors) == (degree, threshold, min_survivors)
    assert p.threshold > (p.degree + 1) / 2  # a strict majority of neighbours + owner


def test_ring_grows_with_the_number_of_clients() -> None:
    bits = [RoundParams.derive(CONFIG, range(n), bytes(16)).bits for n in (3, 10, 100, 1000)]
    assert bits == sorted(bits) and bits[-1] > bits[0]


@pytest.mark.parametrize(
    ("nodes", "override", "message"),
    [
        (range(2), {}, "needs >= 3 nodes"),
        (range(10), {"degree": 5}, "degree must be even"),
        (range(10), {"degree": 4, "threshold": 6}, r"threshold must be in \[2, degree \+ 1 = 5\]"),
        (range(10), {"min_survivors": 11}, r"min_survivors must be in \[2, 10\]"),
        (range(10), {"scale": 1e18}, "bit ring"),
        ([1, 1, 2], {}, "distinct"),
    ],
)
def test_parameter_validation(nodes: range, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoundParams.derive(dataclasses.replace(CONFIG, **override), nodes, bytes(16))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dim", 0, "dim must be"),
        ("clip", 0.0, "clip must be"),
        ("sum_noise_std", -1.0, "sum_noise_std"),
        ("wrap_probability", 1.0, "wrap_probability"),
    ],
)
def test_config_validation(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **{field: value})


def test_params_round_trip_and_mismatch_is_named() -> None:
    p = RoundParams.derive(CONFIG, [5, 9, 2, 7], bytes(range(16)))
    assert RoundParams.from_payload(p.to_payload()) == p
    with pytest.raises(ValueError, match="threshold: server 3, ours 4"):
        p.check_against(dataclasses.replace(CONFIG, threshold=4))


@pytest.mark.parametrize(("n", "k"), [(5, 4), (20, 12), (100, 16)])
def test_neighbour_graph_is_regular_symmetric_and_random(n: int, k: int) -> None:
    nodes = list(range(1000, 1000 + n))
    g = neighbour_graph(nodes, k)
    check_graph(g, k)
    assert set(g) == set(nodes)
    if k < n - 1:
        assert any(neighbour_graph(nodes, k) != g for _ in range(3))


def test_coordinate_bound_covers_rounding_up() -> None:
    assert coord_bound(1.0, 100.0) == 101
    assert Stage.ORDER[0] == Stage.SETUP


def test_a_minority_threshold_warns() -> None:
    with pytest.warns(UserWarning, match="not a strict majority"):
        RoundParams.derive(dataclasses.replace(CONFIG, degree=4, threshold=2), range(10), bytes(16))


def test_wide_ring_travels_as_uint64_and_stays_exact() -> None:
    config = dataclasses.replace(CONFIG, scale=1e10)
    nodes = list(range(1, 6))
    rng = np.random.default_rng(5)
    fed = Federation(config, {v: rng.normal(size=64) / 10 for v in nodes})
    result = fed.run()
    assert fed.server.params.bits > 32
    masked = [p["masked"] for stage, _, p in fed.received if stage == Stage.COLLECT_MASKED]
    assert all(m.dtype == np.uint64 for m in masked)
    np.testing.assert_array_equal(
        result.integer_total, fed.expected_integer_total(result.survivors)
    )
