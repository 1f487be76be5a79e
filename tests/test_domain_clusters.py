"""SecFPP's clustering arithmetic: what a client contributes and what the server derives."""

from __future__ import annotations

import numpy as np
import pytest

from dpfpl_app.method import domain_clusters as dc


def _blobs(per: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    points = np.concatenate([c + spread * rng.standard_normal((per, c.size)) for c in centres])
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _unit_summary(features: np.ndarray, labels: np.ndarray, text: np.ndarray, dim: int,
                  seed: int) -> np.ndarray:
    """A client's clustering point without noise (clip large enough never to bind)."""
    vectors = dc.image_vectors(features, labels, text, dim, seed)
    return dc.point(dc.clipped_mean(vectors, clip=1e9, size=len(labels)))


def test_summary_removes_the_class_and_keeps_the_domain() -> None:
    # Prepare: two clients of one domain (shift s) holding different classes
    rng = np.random.default_rng(0)
    text = rng.standard_normal((4, 32))
    shift, other = rng.standard_normal(32), rng.standard_normal(32)
    a_labels, b_labels = np.array([0, 0, 1]), np.array([2, 3, 3])
    a = text[a_labels] + shift + 0.01 * rng.standard_normal((3, 32))
    b = text[b_labels] + shift + 0.01 * rng.standard_normal((3, 32))
    c = text[a_labels] + other  # client a's classes, another domain

    # Execute
    za, zb, zc = (_unit_summary(f, y, text, 8, seed=1) for f, y in ((a, a_labels),
                                                                    (b, b_labels), (c, a_labels)))

    # Assert: unit vectors; same domain close whatever the classes, other domain far
    for z in (za, zb, zc):
        assert z.shape == (8,) and np.linalg.norm(z) == pytest.approx(1.0)
    assert za @ zb > 0.99 and abs(za @ zc) < 0.9


def test_a_square_projection_preserves_distances() -> None:
    rng = np.random.default_rng(1)
    text = np.zeros((1, 16))
    x, y = rng.standard_normal((2, 16))
    zx = _unit_summary(x[None], np.zeros(1, dtype=int), text, 16, seed=0)
    zy = _unit_summary(y[None], np.zeros(1, dtype=int), text, 16, seed=0)
    assert zx @ zy == pytest.approx((x / np.linalg.norm(x)) @ (y / np.linalg.norm(y)))


def test_one_image_moves_the_clipped_mean_by_at_most_clip_over_the_public_size() -> None:
    rng = np.random.default_rng(7)
    vectors = 3.0 * rng.standard_normal((40, 8))  # far beyond the clip
    outlier = 100.0 * rng.standard_normal((1, 8))
    base = dc.clipped_mean(vectors, clip=0.5, size=64.0)
    added = dc.clipped_mean(np.concatenate([vectors, outlier]), clip=0.5, size=64.0)
    removed = dc.clipped_mean(vectors[1:], clip=0.5, size=64.0)
    assert np.linalg.norm(added - base) == pytest.approx(0.5 / 64.0)
    assert np.linalg.norm(removed - base) <= 0.5 / 64.0 + 1e-15


def test_the_release_adds_noise_of_std_z_clip_over_size() -> None:
    mean = np.zeros(4000)
    normal = np.random.default_rng(8).standard_normal(4000)
    released = dc.release(mean, normal, clip=0.5, size=100.0, noise_multiplier=4.0)
    assert released.std() == pytest.approx(4.0 * 0.5 / 100.0, rel=0.05)
    assert np.linalg.norm(dc.point(released)) == pytest.approx(1.0)


def test_count_vector_is_one_slot_per_candidate() -> None:
    layout = dc.Layout((1, 2, 3))
    centroids = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [5, 5]])
    z = np.array([1.0, 0.0])
    vec = dc.client_vector("count", z, centroids, layout, np.ones(6, dtype=bool))
    np.testing.assert_array_equal(vec, [1, 1, 0, 0, 1, 0])


def test_sum_vector_fills_only_open_slots() -> None:
    layout = dc.Layout((2,))
    centroids = np.array([[1.0, 0.0], [-1.0, 0.0]])
    z = np.array([0.6, 0.8])
    open_ = np.array([True, True])
    rows = dc.client_vector("sum", z, centroids, layout, open_).reshape(2, 4)
    np.testing.assert_allclose(rows[0], [0.6, 0.8, 1.0, 0.4**2 + 0.8**2])
    np.testing.assert_array_equal(rows[1], 0)
    closed = dc.client_vector("sum", z, centroids, layout, np.array([False, True]))
    np.testing.assert_array_equal(closed, 0)  # its slot is closed: it sends nothing


@pytest.mark.parametrize("phase", ["moments", "count", "sum"])
def test_every_client_input_fits_the_secure_bound(phase: str) -> None:
    rng = np.random.default_rng(2)
    layout = dc.Layout.search(4, 3)
    bound = dc.input_bound(4, 3)
    for _ in range(50):
        z = rng.standard_normal(8)
        z /= np.linalg.norm(z)
        centroids = 3 * rng.standard_normal((layout.slots, 8))  # even absurd centroids
        vec = dc.client_vector(phase, z, centroids, layout, np.ones(layout.slots, dtype=bool))
        assert np.linalg.norm(vec) <= bound


def test_population_moments_give_the_mean_and_principal_axis() -> None:
    rng = np.random.default_rng(3)
    points = _blobs(20, np.array([[1.0, 0, 0], [-1.0, 0, 0]]), 0.05, rng)
    total = np.sum([dc.client_vector("moments", z, np.zeros((1, 3)), dc.Layout((1,)),
                                     np.ones(1, dtype=bool)) for z in points], axis=0)
    population = dc.Population.from_total(total, 3)
    np.testing.assert_allclose(population.mean, points.mean(0), atol=1e-12)
    assert abs(population.axes[0, 0]) > 0.99  # the blobs differ along x
    top = np.linalg.eigvalsh(np.cov(points.T, bias=True))[-1]
    np.testing.assert_allclose(population.spreads[0], np.sqrt(top), rtol=1e-9)


def _lloyd(points: np.ndarray, max_k: int, restarts: int, min_size: int, seed: int) -> tuple:
    """The server's loop on plain sums (the secure sum gives the same totals)."""
    rng = np.random.default_rng(seed)
    dim, n = points.shape[1], len(points)
    one = dc.Layout((1,))
    ones = np.ones(1, dtype=bool)
    population = dc.Population.from_total(
        np.sum([dc.client_vector("moments", z, np.zeros((1, dim)), one, ones) for z in points], 0),
        dim,
    )
    layout = dc.Layout.search(max_k, restarts)
    centroids = dc.initial_centroids(layout, population, rng)
    for _ in range(6):
        counts = np.sum([dc.client_vector("count", z, centroids, layout, ones) for z in points], 0)
        opened = counts >= min_size
        stats = dc.SlotStats.from_total(
            np.sum([dc.client_vector("sum", z, centroids, layout, opened) for z in points], 0),
            layout,
            dim,
        )
        centroids = dc.lloyd_update(centroids, stats, layout, population, rng)
    return layout, stats, dc.candidate_scores(layout, stats.counts, stats.sse, n, dim, min_size)


def test_bic_chooses_the_true_number_of_well_separated_domains() -> None:
    rng = np.random.default_rng(4)
    centres = np.eye(6)[:3] * 3
    points = _blobs(4, centres, 0.1, rng)

    _, _, scores = _lloyd(points, max_k=4, restarts=6, min_size=3, seed=0)

    assert max(scores, key=lambda k: scores[k][0]) == 3


def test_a_slot_below_the_threshold_is_never_opened() -> None:
    # 7 points: one far outlier and two groups of 3
    rng = np.random.default_rng(5)
    points = np.concatenate([_blobs(3, np.eye(4)[:2] * 3, 0.05, rng), np.eye(4)[3:] * 1.0])

    layout, stats, scores = _lloyd(points, max_k=3, restarts=6, min_size=3, seed=1)

    # no released statistic covers fewer than 3 clients, and no eligible k has a small cluster
    released = stats.counts[stats.counts > 0]
    assert (released >= 3).all()
    for _, index in scores.values():
        lo, hi = layout.bounds[index]
        assert (stats.counts[lo:hi] >= 3).all()
    assert 3 not in scores  # the outlier's singleton cluster cannot open


def test_unknown_phase_and_bad_centroids_are_refused() -> None:
    layout = dc.Layout((2,))
    with pytest.raises(ValueError, match="unknown clustering phase"):
        dc.client_vector("peek", np.ones(2) / 2**0.5, np.zeros((2, 2)), layout, np.ones(2, bool))
    with pytest.raises(ValueError, match="layout needs"):
        dc.client_vector("count", np.ones(2) / 2**0.5, np.zeros((3, 2)), layout, np.ones(2, bool))


def test_overlapping_open_groups_can_isolate_one_summary() -> None:
    """The documented limit: exact sums of overlapping groups difference to one client."""
    rng = np.random.default_rng(6)
    points = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]]) + 0.05 * rng.standard_normal((4, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    layout = dc.Layout((1, 2))
    # candidate 1 (one slot) holds all four; candidate 2 splits three from the fourth
    centroids = np.array([points.mean(0), [1.0, 0, 0], [0, 1.0, 0]])
    opened = np.array([True, True, False])  # the fourth client's own slot stays closed
    total = np.sum([dc.client_vector("sum", z, centroids, layout, opened) for z in points], 0)
    stats = dc.SlotStats.from_total(total, layout, 3)

    # every released group has >= 3 members, yet the difference is one client's summary
    assert stats.counts.tolist() == [4, 3, 0]
    np.testing.assert_allclose(stats.sums[0] - stats.sums[1], points[3], atol=1e-12)
