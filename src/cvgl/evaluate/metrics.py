"""Retrieval and localization metrics for cross-view geo-localization.

Every retrieval metric here works on a dense similarity matrix ``scores`` of shape ``(Q, G)``
(higher means more similar; one row per query, one column per gallery tile) and a boolean
matrix ``positives`` of the same shape that marks the correct gallery tiles of each query.

Tie rule (pessimistic ranking)
------------------------------
Gallery items are ranked by descending score. When a positive and a non-positive have the same
score, the non-positive is ranked ABOVE the positive. Positives that tie with each other are
ordered by gallery index; that choice cannot change any metric because the positives are
interchangeable. The resulting order is the worst of all orders consistent with the scores, so
ties never inflate recall or AP (a model that outputs a constant score gets recall@1 = 0 unless
every gallery item is positive), and the result is deterministic - it does not depend on the
sort algorithm or on the order the gallery happens to be stored in. Some public code (for
example Sample4Geo's CVUSA evaluation, which counts only strictly higher scores) resolves ties
optimistically instead, so numbers on tie-heavy models are not directly comparable.

Queries without any positive
----------------------------
A query whose row of ``positives`` is all ``False`` cannot be answered correctly by any ranking,
so it is excluded from recall, AP, mAP and hit rate rather than counted as a miss (that would
conflate a gallery/labelling gap with a model error). :func:`valid_queries` tells which queries
count and ``summarize`` reports ``n_valid``. If no query has a positive, the metrics raise
``ValueError`` because a share of zero queries is undefined.

Distances are WGS84 geodesics (:func:`cvgl.geo.geodesic_distance_m`, i.e. ``pyproj.Geod``);
haversine on a sphere is off by up to about 0.5 % and is deliberately not used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvgl.geo import geodesic_distance_m

__all__ = [
    "valid_queries",
    "rank_of_positives",
    "first_positive_rank",
    "recall_at_k",
    "k_for_percent",
    "recall_at_percent",
    "average_precision",
    "mean_average_precision",
    "hit_rate",
    "localization_error_m",
    "within_m",
    "correct_within_radius",
    "recall_at_k_by_distance",
    "summarize",
]

# Upper bound on the number of matrix elements sorted at once. Ranking sorts whole rows, so a
# 40k x 50k benchmark would otherwise need several temporary (Q, G) int64 arrays; processing a
# block of rows at a time keeps peak memory near a few hundred MB regardless of Q.
_CHUNK_ELEMENTS = 1 << 22



# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------


def _as_scores(scores: ArrayLike) -> NDArray[np.floating]:
    """Return ``scores`` as a 2-D float array, rejecting NaN (it has no place in an order)."""
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"scores must be a 2-D (queries, gallery) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {arr.dtype}")
    # Integers are widened to float so that negation (used for the descending sort) is safe for
    # unsigned types; float32 stays float32 to avoid doubling memory on large matrices.
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError("scores contain NaN; a NaN similarity cannot be ranked")
    return arr


def _as_mask(mask: ArrayLike, name: str, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    """Return ``mask`` as a boolean array of ``shape``.

    Integer masks are accepted only if they hold 0/1, so that passing gallery *labels* by
    mistake fails loudly instead of being silently read as "everything non-zero is positive".
    """
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (same as scores), got {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1); got integer values other than 0 and 1")
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must be boolean, got dtype {arr.dtype}")
    return arr.astype(bool)


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = []
    for k in ks:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
        out.append(int(k))
    if not out:
        raise ValueError("ks must contain at least one k")
    return out


def _require_valid(valid: NDArray[np.bool_]) -> None:
    if not valid.any():
        raise ValueError(
            "no query has a positive gallery item; retrieval metrics are undefined "
            "(check that the gallery contains the ground-truth tiles)"
        )


def _row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _pessimistic_order(scores: NDArray[np.floating], positives: NDArray[np.bool_]) -> NDArray[np.intp]:
    """Column order of each row under the pessimistic tie rule.

    ``np.lexsort`` sorts by the last key first: descending score, then non-positives (False)
    before positives (True), then - because lexsort is stable - ascending gallery index.
    """
    return np.lexsort((positives, -scores), axis=-1)


# --------------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------------


def valid_queries(positives: ArrayLike) -> NDArray[np.bool_]:
    """Return a ``(Q,)`` mask of the queries that have at least one positive.

    Only these queries enter recall, AP, mAP and hit rate; the others cannot be answered by any
    ranking and are excluded instead of being scored as failures.
    """
    arr = np.asarray(positives)
    if arr.ndim != 2:
        raise ValueError(f"positives must be a 2-D (queries, gallery) array, got shape {arr.shape}")
    return _as_mask(arr, "positives", arr.shape).any(axis=1)


def rank_of_positives(scores: ArrayLike, positives: ArrayLike) -> NDArray[np.int64]:
    """Return the 1-based rank of every positive gallery item, ``0`` for non-positives.

    Result has shape ``(Q, G)``, dtype int64. Tie rule: a non-positive gallery item with a score
    equal to a positive's score is ranked ABOVE that positive (pessimistic ranking), and tied
    positives are ordered by gallery index, so ties never inflate recall or AP and the ranks are
    deterministic. Equivalently, the rank of positive ``j`` is ``1 + #{g : s_g > s_j}
    + #{non-positive g : s_g == s_j} + #{positive g < j : s_g == s_j}``.

    Non-positives get 0 rather than a rank because their rank under this order is optimistic
    for them and would be misleading if reused.
    """
    s = _as_scores(scores)
    pos = _as_mask(positives, "positives", s.shape)
    q, g = s.shape
    ranks = np.zeros((q, g), dtype=np.int64)
    positions = np.arange(1, g + 1, dtype=np.int64)
    for rows in _row_chunks(q, g):
        order = _pessimistic_order(s[rows], pos[rows])
        block = np.empty((order.shape[0], g), dtype=np.int64)
        np.put_along_axis(block, order, np.broadcast_to(positions, order.shape), axis=1)
        ranks[rows] = np.where(pos[rows], block, 0)
    return ranks


def _first_rank_and_ap(
    s: NDArray[np.floating], pos: NDArray[np.bool_], with_ap: bool
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """One pass over the ranking: rank of the best positive and (optionally) AP per query.

    First rank is 0 and AP is NaN for queries without positives.
    """
    q, g = s.shape
    first = np.zeros(q, dtype=np.int64)
    ap = np.full(q, np.nan, dtype=np.float64)
    positions = np.arange(1, g + 1, dtype=np.float64)
    for rows in _row_chunks(q, g):
        order = _pessimistic_order(s[rows], pos[rows])
        hits = np.take_along_axis(pos[rows], order, axis=1)
        has = hits.any(axis=1)
        first[rows] = np.where(has, np.argmax(hits, axis=1) + 1, 0)
        if with_ap:
            # Precision at the rank of each positive = (positives so far) / rank; AP is the mean
            # of those precisions over the query's positives (no interpolation, no trapezoid).
            cum = np.cumsum(hits, axis=1, dtype=np.float64)
            prec_sum = np.where(hits, cum / positions, 0.0).sum(axis=1)
            n_pos = hits.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                ap[rows] = np.where(has, prec_sum / n_pos, np.nan)
    return first, ap


def first_positive_rank(scores: ArrayLike, positives: ArrayLike) -> NDArray[np.int64]:
    """Return the ``(Q,)`` 1-based rank of each query's best-ranked positive (0 if it has none).

    Tie rule: a non-positive gallery item with a score equal to a positive's score is ranked
    ABOVE it (pessimistic ranking); deterministic. This is the quantity behind recall@k and the
    CMC curve: a query is a hit at k exactly when its first positive rank is in ``1..k``.
    """
    s = _as_scores(scores)
    pos = _as_mask(positives, "positives", s.shape)
    return _first_rank_and_ap(s, pos, with_ap=False)[0]


# --------------------------------------------------------------------------------------------
# recall
# --------------------------------------------------------------------------------------------


def _recall_from_first(first: NDArray[np.int64], ks: Sequence[int]) -> dict[int, float]:
    valid = first > 0
    _require_valid(valid)
    fv = first[valid]
    return {k: float(np.mean(fv <= k)) for k in _check_ks(ks)}


def recall_at_k(
    scores: ArrayLike, positives: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Return ``{k: share of valid queries with at least one positive in the top k}``.

    Tie rule: a non-positive gallery item with a score equal to a positive's score is ranked
    ABOVE it (pessimistic ranking), so ties never inflate recall; deterministic. Queries with
    no positive are excluded (see :func:`valid_queries`); ``ValueError`` if none remain. A ``k``
    larger than the gallery is allowed and then equals recall over the whole gallery (1.0).
    """
    s = _as_scores(scores)
    pos = _as_mask(positives, "positives", s.shape)
    ks = _check_ks(ks)
    first, _ = _first_rank_and_ap(s, pos, with_ap=False)
    return _recall_from_first(first, ks)


def k_for_percent(n_gallery: int, percent: float = 1.0) -> int:
    """Return the cut-off ``k`` used for recall@``percent``%: ``max(1, floor(G * percent / 100))``.

    This follows the Sample4Geo / CVUSA convention (``k = G // 100`` for 1 %) but never goes
    below 1, so tiny galleries still get a meaningful top-1 check instead of an always-zero
    recall@0. The percentage is taken through its decimal text (``0.29`` means exactly 29/100)
    so that binary floating point cannot shave a whole item off ``k``.
    """
    if n_gallery < 1:
        raise ValueError(f"gallery must hold at least one item, got {n_gallery}")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    frac = Fraction(str(float(percent)))
    return max(1, int(n_gallery * frac // 100))


def recall_at_percent(scores: ArrayLike, positives: ArrayLike, percent: float = 1.0) -> float:
    """Return recall@``percent``% of the gallery, with ``k`` from :func:`k_for_percent`.

    ``k = max(1, floor(G * percent / 100))`` (Sample4Geo/CVUSA convention, at least 1).
    Tie rule: a non-positive gallery item with a score equal to a positive's score is ranked
    ABOVE it (pessimistic ranking); deterministic. Queries with no positive are excluded.
    """
    s = _as_scores(scores)
    k = k_for_percent(s.shape[1], percent)
    return recall_at_k(s, positives, ks=(k,))[k]


# --------------------------------------------------------------------------------------------
# average precision
# --------------------------------------------------------------------------------------------


def average_precision(scores: ArrayLike, positives: ArrayLike) -> NDArray[np.float64]:
    """Return the ``(Q,)`` average precision of each query (NaN for queries without positives).

    University-1652 style with several positives: AP = mean over the query's positives of the
    precision at that positive's 1-based rank, i.e. ``mean_i (i / r_i)`` where ``r_i`` is the
    rank of the i-th positive. Example: positives at ranks 1 and 3 of 5 give
    ``(1/1 + 2/3) / 2 = 5/6``. (The official University-1652 / Sample4Geo code averages
    neighbouring precisions with a trapezoid and would report 19/24 here; this is plain,
    non-interpolated AP.)

    Tie rule: a non-positive gallery item with a score equal to a positive's score is ranked
    ABOVE it (pessimistic ranking), so AP is the minimum over all tie-breaks; deterministic.
    NaN marks queries that :func:`mean_average_precision` excludes.
    """
    s = _as_scores(scores)
    pos = _as_mask(positives, "positives", s.shape)
    return _first_rank_and_ap(s, pos, with_ap=True)[1]


def mean_average_precision(scores: ArrayLike, positives: ArrayLike) -> float:
    """Return mAP: the mean of :func:`average_precision` over queries that have a positive.

    Tie rule: a non-positive gallery item with a score equal to a positive's score is ranked
    ABOVE it (pessimistic ranking); deterministic. ``ValueError`` if no query has a positive.
    """
    ap = average_precision(scores, positives)
    valid = ~np.isnan(ap)
    _require_valid(valid)
    return float(ap[valid].mean())


# --------------------------------------------------------------------------------------------
# VIGOR hit rate
# --------------------------------------------------------------------------------------------


def hit_rate(scores: ArrayLike, positives: ArrayLike, semi_positives: ArrayLike) -> float:
    """Return the VIGOR hit rate: share of queries whose top-1 is a positive or semi-positive.

    VIGOR places each street photo inside one positive aerial tile that also overlaps three
    semi-positive neighbours; hitting any of them still puts the answer close to the truth.

    Tie rule: the pessimistic ranking applied to the "hit" set (positives OR semi-positives): a
    gallery item that is neither, tying with the top score, is ranked ABOVE the tied hits, so a
    query counts only if every item sharing the top score is a hit; deterministic. Queries are
    excluded when they have no *positive* (same set as recall/AP, so ``n_valid`` agrees across
    metrics); ``ValueError`` if none remain.
    """
    s = _as_scores(scores)
    pos = _as_mask(positives, "positives", s.shape)
    semi = _as_mask(semi_positives, "semi_positives", s.shape)
    valid = pos.any(axis=1)
    _require_valid(valid)
    good = pos | semi
    hit = np.empty(s.shape[0], dtype=bool)
    for rows in _row_chunks(*s.shape):
        block = s[rows]
        at_top = block == block.max(axis=1, keepdims=True)
        hit[rows] = ~(at_top & ~good[rows]).any(axis=1)
    return float(hit[valid].mean())


# --------------------------------------------------------------------------------------------
# metric localization
# --------------------------------------------------------------------------------------------


def _geodesic_m(lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike) -> NDArray[np.float64]:
    """WGS84 geodesic distance in metres, broadcasting the four inputs."""
    a, b, c, d = (np.asarray(x, dtype=np.float64) for x in (lat1, lon1, lat2, lon2))
    a, b, c, d = np.broadcast_arrays(a, b, c, d)
    for name, arr in (("latitude", a), ("longitude", b), ("latitude", c), ("longitude", d)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} values must be finite")
    for arr in (a, c):
        if (np.abs(arr) > 90).any():
            raise ValueError("latitude must lie in [-90, 90] degrees (are lat and lon swapped?)")
    # cvgl.geo owns the single WGS84 Geod (and pyproj's lon/lat argument order).
    return np.asarray(geodesic_distance_m(a, b, c, d), dtype=np.float64).reshape(a.shape)


def localization_error_m(
    pred_lat: ArrayLike, pred_lon: ArrayLike, true_lat: ArrayLike, true_lon: ArrayLike
) -> NDArray[np.float64]:
    """Return the ``(Q,)`` WGS84 geodesic distance in metres between predicted and true points.

    Uses :class:`pyproj.Geod` on the WGS84 ellipsoid, never haversine on a sphere, because the
    spherical error (up to ~0.5 %) is the same order as the 25-100 m thresholds reported.
    Inputs are degrees and broadcast against each other.
    """
    return _geodesic_m(pred_lat, pred_lon, true_lat, true_lon)


def within_m(errors: ArrayLike, thresholds: Sequence[float] = (25, 50, 100)) -> dict[float, float]:
    """Return ``{t: share of errors <= t metres}`` for each threshold ``t``.

    The bound is inclusive so that an error of exactly ``t`` counts as within ``t``.
    """
    err = np.asarray(errors, dtype=np.float64).ravel()
    if err.size == 0:
        raise ValueError("errors is empty; a share of zero queries is undefined")
    if np.isnan(err).any() or (err < 0).any():
        raise ValueError("errors must be non-negative distances without NaN")
    out: dict[float, float] = {}
    for t in thresholds:
        if not t >= 0:
            raise ValueError(f"thresholds must be non-negative, got {t}")
        out[t] = float(np.mean(err <= t))
    return out


def correct_within_radius(
    topk_lat: ArrayLike,
    topk_lon: ArrayLike,
    true_lat: ArrayLike,
    true_lon: ArrayLike,
    radius_m: float,
) -> NDArray[np.bool_]:
    """Return a ``(Q, K)`` mask: is the k-th predicted location within ``radius_m`` of the truth?

    Used where the benchmark defines a correct tile by distance rather than by identity (e.g.
    Longmont: a tile is correct when its centre lies within the tile half-diagonal of the true
    location). The bound is inclusive. ``topk_*`` are ``(Q, K)`` degrees in retrieval order;
    ``true_*`` are ``(Q,)``.
    """
    tlat = np.asarray(topk_lat, dtype=np.float64)
    tlon = np.asarray(topk_lon, dtype=np.float64)
    if tlat.ndim != 2 or tlat.shape != tlon.shape:
        raise ValueError(
            f"topk_lat and topk_lon must both be (queries, K), got {tlat.shape} and {tlon.shape}"
        )
    qlat = np.asarray(true_lat, dtype=np.float64)
    qlon = np.asarray(true_lon, dtype=np.float64)
    if qlat.shape != (tlat.shape[0],) or qlon.shape != (tlat.shape[0],):
        raise ValueError(
            f"true_lat and true_lon must be ({tlat.shape[0]},), got {qlat.shape} and {qlon.shape}"
        )
    if not radius_m >= 0:
        raise ValueError(f"radius_m must be non-negative, got {radius_m}")
    dist = _geodesic_m(tlat, tlon, qlat[:, None], qlon[:, None])
    return dist <= radius_m


def recall_at_k_by_distance(
    topk_lat: ArrayLike,
    topk_lon: ArrayLike,
    true_lat: ArrayLike,
    true_lon: ArrayLike,
    radius_m: float,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Return ``{k: share of queries with any of the first k predictions within radius_m}``.

    The predictions are taken in the order given (already ranked by the index), so ties are the
    caller's responsibility here. ``ValueError`` if some ``k`` exceeds ``K``, the number of
    predictions supplied: recall@k would otherwise be silently under-counted.
    """
    correct = correct_within_radius(topk_lat, topk_lon, true_lat, true_lon, radius_m)
    q, kmax = correct.shape
    if q == 0:
        raise ValueError("no queries; a share of zero queries is undefined")
    ks = _check_ks(ks)
    too_big = [k for k in ks if k > kmax]
    if too_big:
        raise ValueError(f"k={too_big} exceeds the {kmax} predictions supplied per query")
    hit_by = np.logical_or.accumulate(correct, axis=1)
    return {k: float(hit_by[:, k - 1].mean()) for k in ks}


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def summarize(
    scores: ArrayLike,
    positives: ArrayLike,
    *,
    ks: Sequence[int] = (1, 5, 10),
    percent: float = 1.0,
    errors_m: ArrayLike | None = None,
    thresholds: Sequence[float] = (25, 50, 100),
) -> dict[str, float]:
    """Return a flat dict of the usual numbers, computed with one ranking pass.

    Keys: ``R@k`` for each k, ``R@{percent}%`` (e.g. ``R@1%``), ``mAP``, ``n_queries``,
    ``n_valid``, and, when ``errors_m`` is given, ``median_error_m``, ``mean_error_m`` and
    ``within_{t}m`` for each threshold. Tie rule: a non-positive gallery item with a score equal
    to a positive's score is ranked ABOVE it (pessimistic ranking); deterministic. Queries with
    no positive are excluded from the retrieval numbers (counted in ``n_queries`` but not
    ``n_valid``); localization numbers use every error supplied.
    """
    s = _as_scores(scores)
    pos = _as_mask(positives, "positives", s.shape)
    ks = _check_ks(ks)
    k_pct = k_for_percent(s.shape[1], percent)
    first, ap = _first_rank_and_ap(s, pos, with_ap=True)
    rec = _recall_from_first(first, [*ks, k_pct])
    out: dict[str, float] = {f"R@{k}": rec[k] for k in ks}
    out[f"R@{percent:g}%"] = rec[k_pct]
    out["mAP"] = float(np.nanmean(ap))
    out["n_queries"] = int(s.shape[0])
    out["n_valid"] = int(np.count_nonzero(first))
    if errors_m is not None:
        err = np.asarray(errors_m, dtype=np.float64).ravel()
        shares = within_m(err, thresholds)
        out["median_error_m"] = float(np.median(err))
        out["mean_error_m"] = float(np.mean(err))
        for t, share in shares.items():
            out[f"within_{t:g}m"] = share
    return out
