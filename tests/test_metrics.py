"""Metrics on cases small enough to compute by hand."""

import numpy as np
import pytest

from icl.metrics import retrieval_metrics

pytestmark = pytest.mark.unit  # pure and fast: no server


def test_single_query_multiple_positives():
    # Ranking: g0 (id 7), g1 (id 3), g2 (id 7), g3 (id 5) -> positives at ranks 1 and 3.
    sims = np.array([[0.9, 0.8, 0.7, 0.1]])
    m = retrieval_metrics(sims, np.array([7]), np.array([7, 3, 7, 5]))
    assert m.r1 == m.r5 == m.r10 == 100.0
    assert m.map == pytest.approx((1 / 1 + 2 / 3) / 2 * 100)
    assert m.minp == pytest.approx(2 / 3 * 100)
    assert m.rsum == 300.0


def test_two_queries_average():
    sims = np.array(
        [
            [0.1, 0.9, 0.5],  # query id 1: order g1 (2), g2 (1), g0 (3): first positive at rank 2
            [0.9, 0.1, 0.5],  # query id 3: order g0 (3): positive at rank 1
        ]
    )
    m = retrieval_metrics(sims, np.array([1, 3]), np.array([3, 2, 1]))
    assert m.r1 == 50.0 and m.r5 == 100.0
    assert m.map == pytest.approx((1 / 2 + 1) / 2 * 100)
    assert m.minp == pytest.approx((1 / 2 + 1) / 2 * 100)


def test_ties_break_by_gallery_order():
    sims = np.array([[0.5, 0.5, 0.5]])
    first = retrieval_metrics(sims, np.array([1]), np.array([1, 2, 2]))
    last = retrieval_metrics(sims, np.array([1]), np.array([2, 2, 1]))
    assert first.r1 == 100.0 and first.map == 100.0
    assert (
        last.r1 == 0.0
        and last.map == pytest.approx(100 / 3)
        and last.minp == pytest.approx(100 / 3)
    )


def test_query_without_positive_is_left_out_and_counted():
    sims = np.array([[0.9, 0.1], [0.3, 0.8]])
    m = retrieval_metrics(sims, np.array([1, 9]), np.array([1, 2]))
    assert m.queries == 1 and m.queries_without_positive == 1
    assert m.r1 == 100.0 and m.map == 100.0


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(50, 40))
    q, g = rng.integers(0, 10, 50), rng.integers(0, 10, 40)
    assert retrieval_metrics(sims, q, g, chunk=7) == retrieval_metrics(sims, q, g)


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected"):
        retrieval_metrics(np.zeros((2, 3)), np.array([1]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan]]), np.array([1]), np.array([1]))
