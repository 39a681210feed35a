"""Calibration maths against plain references, and the confidence model's fitting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.confidence import ConfidenceModel, fit_logistic, retrieval_evidence, verification_evidence
from cvgl.evaluate.calibration import auroc, brier_score, expected_calibration_error, reliability_table
from cvgl.geo import geodesic_distance_m, offset_latlon


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60), st.integers(1, 12))
def test_reliability_and_ece_equal_a_plain_loop(rows, bins):
    p = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    table = reliability_table(p, y, bins)
    expected = {}
    for pi, yi in zip(p, y):
        b = min(int(pi * bins), bins - 1)
        # equal-width bins [k/bins, (k+1)/bins); a value on an inner edge belongs to the upper bin
        for k in range(bins):
            if k / bins <= pi < (k + 1) / bins or (k == bins - 1 and pi == 1.0):
                b = k
        expected.setdefault(b, []).append((pi, yi))
    assert [b.count for b in table] == [len(expected[k]) for k in sorted(expected)]
    ece = sum(len(v) * abs(np.mean([a for a, _ in v]) - np.mean([c for _, c in v])) for v in expected.values()) / len(p)
    assert expected_calibration_error(p, y, bins) == pytest.approx(ece, abs=1e-12)
    assert brier_score(p, y) == pytest.approx(np.mean((p - y) ** 2))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auroc_equals_the_pair_count(rows):
    s = np.array([r[0] for r in rows], dtype=float)
    pos = np.array([r[1] for r in rows])
    if pos.all() or not pos.any():
        assert np.isnan(auroc(s, pos))
        return
    pairs = [(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]]
    assert auroc(s, pos) == pytest.approx(np.mean(pairs))


def test_calibrated_synthetic_predictions_have_small_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = rng.uniform(0, 1, p.size) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.clip(p + 0.3, 0, 1), y) > 0.2  # overconfident


def test_fit_logistic_recovers_a_known_model():
    rng = np.random.default_rng(1)
    evidence = [{"a": float(a), "b": float(b)} for a, b in rng.normal(size=(4000, 2))]
    logit = np.array([0.5 + 2.0 * e["a"] - 1.0 * e["b"] for e in evidence])
    y = rng.uniform(size=len(logit)) < 1 / (1 + np.exp(-logit))
    model = fit_logistic("test", ("a", "b"), evidence, y, l2=0.0)
    # standardised coefficients times the feature scale give the raw ones back
    raw = np.array(model.coef) / np.array(model.scale)
    np.testing.assert_allclose(raw, [2.0, -1.0], atol=0.2)
    probs = np.array([model.probability(e) for e in evidence])
    assert expected_calibration_error(probs, y) < 0.03
    again = ConfidenceModel.from_dict(__import__("json").loads(__import__("json").dumps(model.__dict__, default=list)))
    assert again.probability(evidence[0]) == pytest.approx(model.probability(evidence[0]))
    with pytest.raises(ValueError, match="needs"):
        model.probability({"a": 1.0})


def test_retrieval_evidence_against_a_plain_loop():
    rng = np.random.default_rng(2)
    grid = [offset_latlon(40.0, -105.0, 60.0 * e, 60.0 * n) for n in range(6) for e in range(6)]
    lat, lon = np.array([g[0] for g in grid]), np.array([g[1] for g in grid])
    scores = rng.uniform(0.2, 0.5, len(lat))
    scores[14] = 0.9
    scores[3] = -np.inf  # not scored
    radius = 80.0
    ev = retrieval_evidence(scores, lat, lon, radius)
    finite = [i for i in range(len(scores)) if np.isfinite(scores[i])]
    s = np.array([scores[i] for i in finite])
    assert ev["z_score"] == pytest.approx((0.9 - s.mean()) / s.std())
    far = [scores[i] for i in finite if geodesic_distance_m(lat[14], lon[14], lat[i], lon[i]) > 2 * radius]
    assert ev["margin"] == pytest.approx(0.9 - max(far))
    w = {i: np.exp((scores[i] - 0.9) / 0.02) for i in finite}
    near = sum(w[i] for i in finite if geodesic_distance_m(lat[14], lon[14], lat[i], lon[i]) <= radius)
    assert ev["mass"] == pytest.approx(near / sum(w.values()))
    assert verification_evidence(True, 99, 0.5) == {"verified": 1.0, "log_inliers": pytest.approx(np.log(100)), "inlier_ratio": 0.5}
