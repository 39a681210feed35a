"""Score street-photo products against candidate centres: polar columns, BEV correlation, fusion, heading, evidence.

Every score is a ``[K, N]`` array: ``K`` heading hypotheses × ``N`` candidate centres. The two
signals are made comparable by a z-score over the candidates, per hypothesis (each heading is
scored against its own spread of candidates), summed with weights, and each candidate keeps
its best hypothesis: that hypothesis is the heading estimate, and the BEV's best translation at
it the camera's offset from the candidate centre.

The **evidence** of an answer is how far the best candidate stands above the best *other place*
(candidates within ``exclusion_m`` of the winner are the same place seen from a neighbouring
centre), in units of the candidates' score spread: near 0 when several places fit as well, large
when one place stands out. :func:`confidence` maps it to [0, 1] with fixed constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvgl.street.descriptors import column_scores, token_map_scores
from cvgl.street.products import QueryProducts, ReferenceProducts, StreetConfig

__all__ = [
    "CONFIDENCE_MODEL",
    "SIGNALS",
    "HeadingPrior",
    "StreetMatch",
    "StreetRanking",
    "StreetScores",
    "confidence",
    "evidence",
    "fuse",
    "match",
    "rank",
    "score_bev",
    "score_polar",
    "score_query",
    "zscore",
]


@dataclass(frozen=True)
class HeadingPrior:
    """What is known about the heading (azimuth of the photo's centre column): ``known`` (``heading``),
    ``compass`` (``heading ± tolerance``) or ``unknown`` (whole circle)."""

    kind: str = "unknown"
    heading: float = 0.0
    tolerance: float = 25.0

    def __post_init__(self) -> None:
        if self.kind not in ("known", "compass", "unknown"):
            raise ValueError(f"heading prior must be known, compass or unknown, got '{self.kind}'")

    def hypotheses(self, config: StreetConfig) -> np.ndarray:
        if self.kind == "known":
            return np.array([self.heading])
        return config.headings(self.heading, self.tolerance if self.kind == "compass" else None)


@dataclass
class StreetScores:
    """Raw scores ``[K, N]`` and the BEV's best camera offset ``[K, N, 2]`` (east, north metres from the centre)."""

    headings: np.ndarray
    polar: np.ndarray
    bev: np.ndarray
    bev_offset_m: np.ndarray


def score_polar(query: QueryProducts, reference: ReferenceProducts) -> np.ndarray:
    """``[K, N]`` mean column cosine of each heading hypothesis against each candidate."""
    return column_scores(query.columns.float(), reference.columns.float(), query.column_valid).numpy()


def score_bev(query: QueryProducts, reference: ReferenceProducts, config: StreetConfig, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` best BEV correlation over the translation search, and its camera offset ``[K, N, 2]`` (east, north m)."""
    k = len(query.headings)
    n = reference.token_maps.shape[0]
    best = np.empty((k, n), dtype=np.float32)
    where = np.empty((k, n, 2), dtype=np.float32)
    search = config.search_cells
    cells = torch.as_tensor(np.maximum(np.asarray(query.bev_cells, dtype=np.float32), 1.0)).view(1, k, 1)
    kernels = query.bev.float()
    for start in range(0, n, chunk):
        maps = token_map_scores(kernels, reference.token_maps[start : start + chunk].float(), 1)  # [n, K, oy, ox]
        flat = maps.flatten(2) / cells
        value, index = flat.max(dim=2)  # [n, K]
        dy, dx = np.divmod(index.numpy(), maps.shape[-1])
        best[:, start : start + chunk] = value.numpy().T
        where[:, start : start + chunk, 0] = ((dx - search) * config.bev_token_m).T
        where[:, start : start + chunk, 1] = (-(dy - search) * config.bev_token_m).T
    return best, where


def score_query(query: QueryProducts, reference: ReferenceProducts, config: StreetConfig) -> StreetScores:
    bev, offset = score_bev(query, reference, config)
    return StreetScores(query.headings, score_polar(query, reference), bev, offset)


def zscore(scores: np.ndarray) -> np.ndarray:
    """z-score over the candidates (last axis), per hypothesis."""
    scores = np.asarray(scores, dtype=np.float64)
    return (scores - scores.mean(-1, keepdims=True)) / np.maximum(scores.std(-1, keepdims=True), 1e-12)


def fuse(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of the z-scored ``[K, N]`` signals named in ``weights``."""
    return sum(w * zscore(scores[name]) for name, w in weights.items() if w)


@dataclass
class StreetRanking:
    """Candidates best first (``order``), each candidate's fused ``score`` ``[N]`` at its best hypothesis,
    its ``heading`` estimate ``[N]`` and BEV camera offset ``[N, 2]`` (NaN without BEV)."""

    order: np.ndarray
    score: np.ndarray
    heading: np.ndarray
    offset_m: np.ndarray


def rank(fused: np.ndarray, headings: np.ndarray, offsets_m: np.ndarray | None = None) -> StreetRanking:
    """Each candidate's best hypothesis of a ``[K, N]`` score, and the candidates sorted best first."""
    best = fused.argmax(0)
    cols = np.arange(fused.shape[1])
    score = fused[best, cols]
    offset = offsets_m[best, cols] if offsets_m is not None else np.full((fused.shape[1], 2), np.nan)
    return StreetRanking(np.argsort(-score, kind="stable"), score, np.asarray(headings)[best] % 360.0, offset)


def evidence(score: np.ndarray, positions_m: np.ndarray | None = None, exclusion_m: float = 15.0) -> float:
    """(best − best other place) / std of the candidates' scores; ``positions_m`` ``[N, 2]`` groups candidates
    within ``exclusion_m`` of the winner as the same place (all distinct places when None)."""
    score = np.asarray(score, dtype=np.float64)
    if score.size < 2:
        return 0.0
    top = int(np.argmax(score))
    others = np.ones(score.size, dtype=bool)
    others[top] = False
    if positions_m is not None:
        others &= np.hypot(*(np.asarray(positions_m) - np.asarray(positions_m)[top]).T) > exclusion_m
    if not others.any():
        return 0.0
    return float((score[top] - score[others].max()) / max(score.std(), 1e-12))


#: Evidence (σ units) at which :func:`confidence` is 0.5, and its logistic scale.
CONFIDENCE_MIDPOINT = 1.5
CONFIDENCE_SCALE = 0.25


#: How answers name this confidence: NOT a calibrated probability. The constants were set by hand
#: after the grey street study on the 17 real panoramas of ``../shared/real_pairs`` (the largest
#: evidence of a wrong fused answer there was 1.47 σ), so on those queries it is in-sample.
CONFIDENCE_MODEL = f"street-evidence-logistic-v0 (uncalibrated; 0.5 at {CONFIDENCE_MIDPOINT:g} sigma)"


def confidence(margin: float) -> float:
    """A [0, 1] confidence from :func:`evidence` (logistic, midpoint :data:`CONFIDENCE_MIDPOINT`)."""
    return float(1.0 / (1.0 + np.exp(-(margin - CONFIDENCE_MIDPOINT) / CONFIDENCE_SCALE)))


#: The signals a street match can rank by: one alone (its raw score) or both fused (z-scores summed).
SIGNALS = ("polar", "bev", "fusion")


@dataclass
class StreetMatch:
    """One photo against ``N`` candidates: the ranking by ``signal``, the raw scores, and the winner's
    evidence and :func:`confidence` (``confidence_model`` names it)."""

    signal: str
    ranking: StreetRanking
    scores: StreetScores
    evidence: float
    confidence: float
    confidence_model: str = CONFIDENCE_MODEL


def match(
    query: QueryProducts,
    reference: ReferenceProducts,
    config: StreetConfig,
    signal: str = "fusion",
    positions_m: np.ndarray | None = None,
    exclusion_m: float = 15.0,
    scores: StreetScores | None = None,
) -> StreetMatch:
    """Score, rank and judge one photo's products against candidates: the one routine the benchmark
    measures and :func:`cvgl.street.locate.locate_street` answers with.

    ``signal``: ``polar`` or ``bev`` alone (raw scores, each candidate at its best hypothesis) or
    ``fusion`` (z-scores over the candidates per hypothesis, summed with equal weights: fixed
    before any real score was seen). ``positions_m`` ``[N, 2]`` groups candidates within
    ``exclusion_m`` of the winner as one place for the evidence (None: every candidate is its own
    place). ``scores``: reuse already computed raw scores (several signals of one photo).
    """
    if signal not in SIGNALS:
        raise ValueError(f"street signal must be one of {SIGNALS}, got '{signal}'")
    scores = scores if scores is not None else score_query(query, reference, config)
    ranked = fuse({"polar": scores.polar, "bev": scores.bev}, {"polar": 1.0, "bev": 1.0}) if signal == "fusion" else getattr(scores, signal)
    ranking = rank(ranked, scores.headings, scores.bev_offset_m)
    margin = evidence(ranking.score, positions_m, exclusion_m)
    return StreetMatch(signal, ranking, scores, margin, confidence(margin))
