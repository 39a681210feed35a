"""Tests for cvgl.evaluate.metrics.

Every vectorised metric is compared with a naive Python-loop reference written directly from
the definition (including the pessimistic tie rule), on random score matrices whose small
integer values force many ties. Hand-computed cases pin the conventions themselves.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pyproj import Geod

from cvgl.evaluate import metrics
from cvgl.evaluate import (
    average_precision,
    correct_within_radius,
    first_positive_rank,
    hit_rate,
    k_for_percent,
    localization_error_m,
    mean_average_precision,
    rank_of_positives,
    recall_at_k,
    recall_at_k_by_distance,
    recall_at_percent,
    summarize,
    valid_queries,
    within_m,
)

# --------------------------------------------------------------------------------------------
# naive references (loops, straight from the definitions)
# --------------------------------------------------------------------------------------------


def naive_ranks(scores: np.ndarray, pos: np.ndarray) -> list[list[int]]:
    """Rank of positive j = 1 + #higher + #tied non-positives + #tied positives with lower index."""
    q, g = scores.shape
    out = [[0] * g for _ in range(q)]
    for i in range(q):
        for j in range(g):
            if not pos[i, j]:
                continue
            r = 1
            for h in range(g):
                if h == j:
                    continue
                if scores[i, h] > scores[i, j]:
                    r += 1
                elif scores[i, h] == scores[i, j] and (not pos[i, h] or h < j):
                    r += 1
            out[i][j] = r
    return out


def naive_recall(scores: np.ndarray, pos: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    ranks = naive_ranks(scores, pos)
    firsts = [min(r for r in row if r > 0) for row in ranks if any(row)]
    return {k: sum(1 for f in firsts if f <= k) / len(firsts) for k in ks}


def naive_ap(scores: np.ndarray, pos: np.ndarray) -> list[Fraction | None]:
    ranks = naive_ranks(scores, pos)
    out: list[Fraction | None] = []
    for row in ranks:
        rs = sorted(r for r in row if r > 0)
        if not rs:
            out.append(None)
            continue
        out.append(sum((Fraction(i + 1, r) for i, r in enumerate(rs)), Fraction(0)) / len(rs))
    return out


def naive_hit_rate(scores: np.ndarray, pos: np.ndarray, semi: np.ndarray) -> float:
    hits = 0
    n = 0
    for i in range(scores.shape[0]):
        if not pos[i].any():
            continue
        n += 1
        top = max(scores[i])
        if all(pos[i, j] or semi[i, j] for j in range(scores.shape[1]) if scores[i, j] == top):
            hits += 1
    return hits / n


def brute_force_worst(scores_row: np.ndarray, pos_row: np.ndarray) -> tuple[int, Fraction]:
    """Worst first-positive rank and worst AP over every order consistent with the scores."""
    g = len(scores_row)
    worst_first, worst_ap = 0, Fraction(2)
    for perm in itertools.permutations(range(g)):
        if any(scores_row[perm[a]] < scores_row[perm[a + 1]] for a in range(g - 1)):
            continue
        hits = [bool(pos_row[p]) for p in perm]
        ranks = [r + 1 for r, h in enumerate(hits) if h]
        worst_first = max(worst_first, ranks[0])
        ap = sum((Fraction(i + 1, r) for i, r in enumerate(ranks)), Fraction(0)) / len(ranks)
        worst_ap = min(worst_ap, ap)
    return worst_first, worst_ap


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------


@st.composite
def score_and_masks(draw, max_q: int = 6, max_g: int = 8, n_masks: int = 1):
    q = draw(st.integers(1, max_q))
    g = draw(st.integers(1, max_g))
    scores = draw(arrays(np.int64, (q, g), elements=st.integers(0, 3)))
    masks = [draw(arrays(np.bool_, (q, g))) for _ in range(n_masks)]
    return (scores.astype(np.float64), *masks)


KS = (1, 2, 3, 5, 10)

# --------------------------------------------------------------------------------------------
# property tests: vectorised == naive
# --------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(score_and_masks())
def test_rank_of_positives_matches_naive(data):
    scores, pos = data
    got = rank_of_positives(scores, pos)
    assert got.dtype == np.int64
    assert got.tolist() == naive_ranks(scores, pos)


@settings(max_examples=100, deadline=None)
@given(score_and_masks())
def test_first_rank_recall_and_ap_match_naive(data):
    scores, pos = data
    ranks = naive_ranks(scores, pos)
    expected_first = [min((r for r in row if r > 0), default=0) for row in ranks]
    assert first_positive_rank(scores, pos).tolist() == expected_first
    assert valid_queries(pos).tolist() == [f > 0 for f in expected_first]

    if not pos.any():
        with pytest.raises(ValueError):
            recall_at_k(scores, pos, ks=KS)
        with pytest.raises(ValueError):
            mean_average_precision(scores, pos)
        assert np.isnan(average_precision(scores, pos)).all()
        return

    assert recall_at_k(scores, pos, ks=KS) == naive_recall(scores, pos, KS)

    ap = average_precision(scores, pos)
    ref = naive_ap(scores, pos)
    assert ap.shape == (scores.shape[0],)
    for got, want in zip(ap.tolist(), ref):
        if want is None:
            assert math.isnan(got)
        else:
            assert abs(got - float(want)) <= 1e-12
    valid = [float(a) for a in ref if a is not None]
    assert abs(mean_average_precision(scores, pos) - sum(valid) / len(valid)) <= 1e-12


@settings(max_examples=100, deadline=None)
@given(score_and_masks(n_masks=2))
def test_hit_rate_matches_naive(data):
    scores, pos, semi = data
    if not pos.any():
        with pytest.raises(ValueError):
            hit_rate(scores, pos, semi)
        return
    assert hit_rate(scores, pos, semi) == naive_hit_rate(scores, pos, semi)


@settings(max_examples=100, deadline=None)
@given(score_and_masks(max_q=3, max_g=5))
def test_pessimistic_ranking_is_the_worst_tie_break(data):
    """The tie rule's promise: no tie-break could give a lower recall or AP than ours."""
    scores, pos = data
    first = first_positive_rank(scores, pos)
    ap = average_precision(scores, pos)
    for i in range(scores.shape[0]):
        if not pos[i].any():
            continue
        worst_first, worst_ap = brute_force_worst(scores[i], pos[i])
        assert first[i] == worst_first
        assert abs(ap[i] - float(worst_ap)) <= 1e-12


@settings(max_examples=50, deadline=None)
@given(score_and_masks(max_q=12, max_g=7, n_masks=2))
def test_chunked_processing_gives_same_result(data):
    """Row-chunking (for memory) must not change any number, even one row per chunk."""
    scores, pos, semi = data
    full = (rank_of_positives(scores, pos), average_precision(scores, pos))
    saved = metrics._CHUNK_ELEMENTS
    metrics._CHUNK_ELEMENTS = 1
    try:
        chunked = (rank_of_positives(scores, pos), average_precision(scores, pos))
        if pos.any():
            assert hit_rate(scores, pos, semi) == naive_hit_rate(scores, pos, semi)
    finally:
        metrics._CHUNK_ELEMENTS = saved
    np.testing.assert_array_equal(full[0], chunked[0])
    np.testing.assert_array_equal(full[1], chunked[1])


# --------------------------------------------------------------------------------------------
# hand cases: ties
# --------------------------------------------------------------------------------------------


def test_positive_tied_with_negative_at_top_is_not_a_top1_hit():
    scores = np.array([[0.9, 0.9, 0.1]])
    pos = np.array([[False, True, False]])
    assert rank_of_positives(scores, pos).tolist() == [[0, 2, 0]]
    assert recall_at_k(scores, pos, ks=(1, 2)) == {1: 0.0, 2: 1.0}
    # Order of storage must not matter: the positive first gives the same rank.
    assert rank_of_positives(scores[:, ::-1], pos[:, ::-1]).tolist() == [[0, 2, 0]]


def test_all_equal_scores():
    # A constant-score model: the single positive ranks last, recall@1 = 0, AP = 1/G.
    scores = np.zeros((1, 4))
    pos = np.array([[False, False, True, False]])
    assert first_positive_rank(scores, pos).tolist() == [4]
    assert recall_at_k(scores, pos, ks=(1, 3, 4, 5)) == {1: 0.0, 3: 0.0, 4: 1.0, 5: 1.0}
    assert average_precision(scores, pos).tolist() == [0.25]
    # If every gallery item is positive, no tie-break can hurt: ranks 1..G, AP = 1.
    all_pos = np.ones((1, 4), dtype=bool)
    assert rank_of_positives(scores, all_pos).tolist() == [[1, 2, 3, 4]]
    assert recall_at_k(scores, all_pos, ks=(1,)) == {1: 1.0}
    assert average_precision(scores, all_pos).tolist() == [1.0]


def test_tied_positives_only_do_not_hurt_each_other():
    scores = np.array([[5.0, 5.0, 1.0]])
    pos = np.array([[True, True, False]])
    assert rank_of_positives(scores, pos).tolist() == [[1, 2, 0]]
    assert recall_at_k(scores, pos, ks=(1,)) == {1: 1.0}
    assert mean_average_precision(scores, pos) == 1.0


def test_ties_with_two_positives_and_a_negative():
    # Tie group {neg, pos, pos}: pessimistic order neg, pos, pos -> ranks 2 and 3.
    scores = np.array([[1.0, 1.0, 1.0]])
    pos = np.array([[True, False, True]])
    assert rank_of_positives(scores, pos).tolist() == [[2, 0, 3]]
    assert average_precision(scores, pos)[0] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-15)


# --------------------------------------------------------------------------------------------
# hand cases: AP, recall@1%, validity
# --------------------------------------------------------------------------------------------


def test_ap_positives_at_ranks_1_and_3_of_5():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    pos = np.array([[True, False, True, False, False]])
    ap = average_precision(scores, pos)[0]
    assert ap == pytest.approx((1 / 1 + 2 / 3) / 2, abs=1e-15)
    # Not the trapezoidal University-1652/Sample4Geo value (1 + (1/2 + 2/3)/2)/2 = 19/24.
    assert ap != pytest.approx(19 / 24)


def test_ap_single_positive_is_reciprocal_rank():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    pos = np.array([[False, False, False, True]])
    assert average_precision(scores, pos).tolist() == [0.25]


def test_queries_without_positive_are_excluded():
    scores = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    pos = np.array([[True, False], [False, False], [True, False]])
    assert valid_queries(pos).tolist() == [True, False, True]
    assert recall_at_k(scores, pos, ks=(1,)) == {1: 0.5}
    ap = average_precision(scores, pos)
    assert ap[0] == 1.0 and math.isnan(ap[1]) and ap[2] == 0.5
    assert mean_average_precision(scores, pos) == 0.75
    summary = summarize(scores, pos, ks=(1,))
    assert summary["n_queries"] == 3 and summary["n_valid"] == 2
    assert summary["R@1"] == 0.5 and summary["mAP"] == 0.75


def test_all_queries_without_positive_raise():
    scores = np.array([[0.5, 0.4]])
    pos = np.zeros((1, 2), dtype=bool)
    for call in (
        lambda: recall_at_k(scores, pos),
        lambda: recall_at_percent(scores, pos),
        lambda: mean_average_precision(scores, pos),
        lambda: hit_rate(scores, pos, pos),
        lambda: summarize(scores, pos),
    ):
        with pytest.raises(ValueError, match="no query has a positive"):
            call()


def test_k_for_percent_convention():
    assert k_for_percent(8884) == 88  # CVUSA: 8884 // 100
    assert k_for_percent(250) == 2
    assert k_for_percent(50) == 1  # floor would be 0; at least 1
    assert k_for_percent(1) == 1
    assert k_for_percent(625, 9.12) == 57  # 625 * 9.12 / 100 == 56.99999999999999 in floats
    assert k_for_percent(10, 100) == 10
    with pytest.raises(ValueError):
        k_for_percent(10, 0)
    with pytest.raises(ValueError):
        k_for_percent(0)


def test_recall_at_percent():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 300))
    pos = np.zeros_like(scores, dtype=bool)
    pos[np.arange(20), rng.integers(0, 300, size=20)] = True
    # G = 300 -> k = 3.
    assert recall_at_percent(scores, pos) == recall_at_k(scores, pos, ks=(3,))[3]
    s = summarize(scores, pos)
    assert s["R@1%"] == recall_at_percent(scores, pos)


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="0 and 1"):
        recall_at_k(np.zeros((1, 3)), np.array([[0, 2, 1]]))
    with pytest.raises(ValueError, match="positive integer"):
        recall_at_k(np.zeros((1, 2)), np.array([[True, False]]), ks=(0,))
    # 0/1 integer masks and integer / float32 scores are fine.
    assert recall_at_k(np.array([[3, 1]], dtype=np.uint8), np.array([[1, 0]]), ks=(1,)) == {1: 1.0}
    assert recall_at_k(np.array([[0.2, 0.7]], dtype=np.float32), [[True, False]], ks=(1,)) == {1: 0.0}


# --------------------------------------------------------------------------------------------
# hit rate
# --------------------------------------------------------------------------------------------


def test_hit_rate_hand_case():
    scores = np.array(
        [
            [0.9, 0.5, 0.1, 0.0],  # top-1 positive -> hit
            [0.2, 0.9, 0.1, 0.0],  # top-1 semi-positive -> hit
            [0.2, 0.3, 0.9, 0.0],  # top-1 neither -> miss
            [0.2, 0.9, 0.1, 0.9],  # semi-positive ties with a negative at top -> miss
        ]
    )
    pos = np.zeros((4, 4), dtype=bool)
    pos[:, 0] = True
    semi = np.zeros((4, 4), dtype=bool)
    semi[:, 1] = True
    assert hit_rate(scores, pos, semi) == 0.5
    # Recall@1 counts only the true positive.
    assert recall_at_k(scores, pos, ks=(1,)) == {1: 0.25}


# --------------------------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------------------------


def test_one_degree_latitude_at_equator():
    d = localization_error_m([1.0], [0.0], [0.0], [0.0])
    assert d.shape == (1,)
    assert abs(d[0] - 110574.0) <= 1.0


def test_distance_to_self_is_zero_and_symmetric():
    lat = np.array([0.0, 45.5, -33.9, 89.0, 40.1672])
    lon = np.array([0.0, 7.7, 151.2, -179.9, -105.1019])
    np.testing.assert_array_equal(localization_error_m(lat, lon, lat, lon), 0.0)
    a = localization_error_m(lat, lon, lat[::-1], lon[::-1])
    b = localization_error_m(lat[::-1], lon[::-1], lat, lon)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_distance_is_not_haversine():
    # At 60 deg N, 1 deg of longitude on WGS84 is ~55800 m; a 6371 km sphere gives ~55597 m.
    d = localization_error_m([60.0], [1.0], [60.0], [0.0])[0]
    assert abs(d - 55800) < 5


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-89, 89), st.floats(-180, 180), st.floats(-89, 89), st.floats(-180, 180)
        ),
        min_size=1,
        max_size=6,
    )
)
def test_localization_error_matches_scalar_loop(rows):
    geod = Geod(ellps="WGS84")
    a = np.array(rows)
    got = localization_error_m(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    want = [geod.inv(lo1, la1, lo2, la2)[2] for la1, lo1, la2, lo2 in rows]
    assert got.tolist() == want


def test_latitude_out_of_range_raises():
    with pytest.raises(ValueError, match="swapped"):
        localization_error_m([105.0], [40.0], [0.0], [0.0])


def test_within_m():
    errors = np.array([10.0, 25.0, 30.0, 75.0, 500.0])
    assert within_m(errors) == {25: 0.4, 50: 0.6, 100: 0.8}
    with pytest.raises(ValueError):
        within_m([])
    with pytest.raises(ValueError):
        within_m([np.nan])


def test_summarize_with_errors():
    scores = np.array([[0.9, 0.1], [0.9, 0.1]])
    pos = np.eye(2, dtype=bool)  # query 0 right at rank 1, query 1 at rank 2
    s = summarize(scores, pos, ks=(1, 5), errors_m=[10.0, 40.0], thresholds=(25, 50))
    assert s == {
        "R@1": 0.5,
        "R@5": 1.0,
        "R@1%": 0.5,
        "mAP": 0.75,
        "n_queries": 2,
        "n_valid": 2,
        "median_error_m": 25.0,
        "mean_error_m": 25.0,
        "within_25m": 0.5,
        "within_50m": 1.0,
    }


# --------------------------------------------------------------------------------------------
# distance-defined correctness (Longmont style)
# --------------------------------------------------------------------------------------------


def _offset_north(lat: float, lon: float, metres: float) -> tuple[float, float]:
    lon2, lat2, _ = Geod(ellps="WGS84").fwd(lon, lat, 0.0, metres)
    return lat2, lon2


def test_correct_within_radius_and_recall_by_distance_hand_case():
    true_lat = np.array([40.1672, 40.2000])
    true_lon = np.array([-105.1019, -105.0500])
    offsets = [[120.0, 40.0, 10.0], [300.0, 200.0, 100.0]]
    topk_lat = np.zeros((2, 3))
    topk_lon = np.zeros((2, 3))
    for i in range(2):
        for k in range(3):
            topk_lat[i, k], topk_lon[i, k] = _offset_north(true_lat[i], true_lon[i], offsets[i][k])
    correct = correct_within_radius(topk_lat, topk_lon, true_lat, true_lon, radius_m=50.0)
    assert correct.tolist() == [[False, True, True], [False, False, False]]
    assert recall_at_k_by_distance(topk_lat, topk_lon, true_lat, true_lon, 50.0, ks=(1, 2, 3)) == {
        1: 0.0,
        2: 0.5,
        3: 0.5,
    }
    with pytest.raises(ValueError, match="exceeds"):
        recall_at_k_by_distance(topk_lat, topk_lon, true_lat, true_lon, 50.0, ks=(5,))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda q: st.integers(1, 4).flatmap(
            lambda k: st.tuples(
                arrays(np.float64, (q, k), elements=st.floats(40.0, 40.01)),
                arrays(np.float64, (q, k), elements=st.floats(-105.01, -105.0)),
                arrays(np.float64, (q,), elements=st.floats(40.0, 40.01)),
                arrays(np.float64, (q,), elements=st.floats(-105.01, -105.0)),
                st.floats(0, 1500),
            )
        )
    )
)
def test_distance_recall_matches_naive(data):
    tlat, tlon, qlat, qlon, radius = data
    geod = Geod(ellps="WGS84")
    q, kk = tlat.shape
    naive = [
        [geod.inv(tlon[i, j], tlat[i, j], qlon[i], qlat[i])[2] <= radius for j in range(kk)]
        for i in range(q)
    ]
    assert correct_within_radius(tlat, tlon, qlat, qlon, radius).tolist() == naive
    ks = tuple(range(1, kk + 1))
    want = {k: sum(any(row[:k]) for row in naive) / q for k in ks}
    assert recall_at_k_by_distance(tlat, tlon, qlat, qlon, radius, ks=ks) == want
