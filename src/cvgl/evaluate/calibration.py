"""Is a confidence a probability? Reliability tables, expected calibration error, and AUROC.

``reliability_table`` bins predictions by confidence; in each bin a calibrated model's mean
confidence equals the observed share of correct answers. ``expected_calibration_error`` is the
count-weighted mean gap over the bins (Guo et al. 2017, equal-width bins). ``auroc`` is the
probability that a random positive scores above a random negative (ties count one half), the
measure of how well a score separates photos in the index from photos that are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    mean_confidence: float
    accuracy: float


def _checked(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(confidence, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=bool).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} confidences for {y.size} outcomes")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("confidences must be finite probabilities in [0, 1]")
    return p, y


def reliability_table(confidence, correct, bins: int = 10) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1] (the last bin includes 1.0); empty bins are left out."""
    p, y = _checked(confidence, correct)
    edges = np.arange(bins + 1) / bins  # exactly k / bins (linspace gives 0.7000000000000001 for 7 of 10)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), int(mask.sum()), float(p[mask].mean()), float(y[mask].mean())))
    return out


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
    p, y = _checked(confidence, correct)
    if p.size == 0:
        return float("nan")
    return float(sum(b.count * abs(b.mean_confidence - b.accuracy) for b in reliability_table(p, y, bins)) / p.size)


def brier_score(confidence, correct) -> float:
    p, y = _checked(confidence, correct)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def auroc(scores, positive) -> float:
    """Area under the ROC curve via the rank-sum statistic (ties: average ranks)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
