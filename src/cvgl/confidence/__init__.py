"""Calibrated confidence: the probability that an answer lies within its stated radius.

The evidence of one answer is a handful of numbers (:func:`retrieval_evidence`: how far the best
tile stands out from the rest of the index; :func:`verification_evidence`: how many inliers the
geometric stage found and how consistent they are). A :class:`ConfidenceModel` — logistic
regression on those numbers — turns them into ``P(error <= uncertainty_m)``. Models are fitted
once by the ``confidence`` benchmark on labelled photos that are never its test photos (the west
half of the Longmont scene, with photos of ground cut out of the reference as negatives) and
shipped as JSON next to this file; nothing is fitted on the photos being located.

Why logistic and not isotonic: with a few hundred labelled photos a smooth, monotone model of a
few features extrapolates sanely to index sizes it was not fitted on (more distractor tiles move
the margin, not the meaning of a margin); isotonic regression on one score overfits its steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from cvgl.errors import InputError
from cvgl.geo import geodesic_distance_m
from cvgl.io import write_text_atomic

RETRIEVAL_FEATURES = ("z_score", "margin", "mass")
VERIFIED_FEATURES = ("verified", "log_inliers", "inlier_ratio")
TEMPERATURE = 0.02  # softmax temperature of the ``mass`` feature (cosine scores)


def retrieval_evidence(tile_scores: np.ndarray, lat: np.ndarray, lon: np.ndarray, radius_m: float) -> dict[str, float]:
    """How strongly per-tile scores (``-inf`` = not scored) point at one place.

    ``z_score``: the best score in standard deviations above the scored tiles' mean (scale-free);
    ``margin``: best score minus the best score of a tile more than two radii away (another
    place); ``mass``: softmax mass (T = 0.02) within one radius of the best tile.
    """
    scored = np.isfinite(tile_scores)
    s = tile_scores[scored].astype(np.float64)
    if s.size == 0:
        return {"z_score": 0.0, "margin": 0.0, "mass": 0.0}
    s_lat, s_lon = lat[scored], lon[scored]
    best = int(np.argmax(s))
    spread = float(s.std())
    z = float((s[best] - s.mean()) / spread) if spread > 1e-9 else 0.0
    dist = np.asarray(geodesic_distance_m(s_lat[best], s_lon[best], s_lat, s_lon))
    elsewhere = s[dist > 2.0 * radius_m]
    margin = float(s[best] - elsewhere.max()) if elsewhere.size else float(s[best] - s.min())
    w = np.exp((s - s[best]) / TEMPERATURE)
    mass = float(w[dist <= radius_m].sum() / w.sum())
    return {"z_score": z, "margin": margin, "mass": mass}


def verification_evidence(verified: bool, inliers: int, inlier_ratio: float) -> dict[str, float]:
    return {"verified": float(bool(verified)), "log_inliers": math.log1p(max(int(inliers), 0)), "inlier_ratio": float(inlier_ratio)}


@dataclass(frozen=True)
class ConfidenceModel:
    """``P = sigmoid(intercept + coef . (x - mean) / scale)`` over named evidence features."""

    name: str
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    fitted_on: dict = field(default_factory=dict)

    def probability(self, evidence: dict[str, float]) -> float:
        missing = [f for f in self.features if f not in evidence]
        if missing:
            raise ValueError(f"confidence model {self.name} needs {missing}")
        x = (np.array([evidence[f] for f in self.features]) - np.array(self.mean)) / np.array(self.scale)
        logit = float(self.intercept + np.dot(self.coef, x))
        return float(1.0 / (1.0 + math.exp(-max(min(logit, 60.0), -60.0))))

    def says_not_found(self, p: float, verified: bool) -> bool:
        """The "not in this index" rule: confidence below ``fitted_on["not_found_below"]`` and
        nothing verified (a verified homography is evidence of the place itself)."""
        threshold = self.fitted_on.get("not_found_below")
        return threshold is not None and not verified and p < float(threshold)

    def save(self, path: Path) -> Path:
        return write_text_atomic(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> ConfidenceModel:
        return cls(str(data["name"]), tuple(data["features"]), tuple(data["mean"]), tuple(data["scale"]),
                   tuple(data["coef"]), float(data["intercept"]), dict(data.get("fitted_on", {})))


def shipped_model(name: str) -> ConfidenceModel:
    """A model shipped with the package (``<name>.json`` beside this module)."""
    try:
        text = (resources.files("cvgl.confidence") / f"{name}.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no shipped confidence model '{name}'; run `cvgl bench confidence --fit` to make it") from None
    return ConfidenceModel.from_dict(json.loads(text))


def fit_logistic(name: str, features: tuple[str, ...], evidence: list[dict[str, float]], correct,
                 l2: float = 1e-2, fitted_on: dict | None = None) -> ConfidenceModel:
    """Maximum-likelihood logistic regression (L2 ``l2`` on standardised coefficients)."""
    from scipy.optimize import minimize

    x = np.array([[e[f] for f in features] for e in evidence], dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if len(x) < 10 or y.min() == y.max():
        raise ValueError(f"fitting {name} needs at least 10 photos with both outcomes (got {len(x)}, {int(y.sum())} correct)")
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0
    z = (x - mean) / scale

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logit = theta[0] + z @ theta[1:]
        p = 1.0 / (1.0 + np.exp(-logit))
        nll = np.sum(np.logaddexp(0.0, logit) - y * logit) + 0.5 * l2 * np.sum(theta[1:] ** 2) * len(y)
        grad = np.concatenate([[np.sum(p - y)], z.T @ (p - y) + l2 * theta[1:] * len(y)])
        return float(nll), grad

    theta = minimize(loss, np.zeros(len(features) + 1), jac=True, method="L-BFGS-B").x
    return ConfidenceModel(name, tuple(features), tuple(map(float, mean)), tuple(map(float, scale)),
                           tuple(map(float, theta[1:])), float(theta[0]), dict(fitted_on or {}))
