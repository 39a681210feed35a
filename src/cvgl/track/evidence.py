"""Per-frame evidence of a flight, and how it becomes emission log-likelihoods over tiles.

The states are the reference tile centres, in metres of a local metric CRS
(:class:`TileStates`). A frame's evidence (:class:`FrameEvidence`) is what ``cvgl locate``
already computes for one photo — the cosine score of every tile (best over the heading
hypotheses; ``-inf`` for tiles not scored) and the heading of the winning hypothesis per tile —
plus, when a geometric stage verified the frame, a metric :class:`Fix`.

**Scores to likelihoods.** Cosine scores are not probabilities. We read ``softmax(scores / T)``
over tiles as the posterior a single frame gives under a flat prior, so the emission of tile *i*
is proportional to ``exp(score_i / T)``; ``T`` (:attr:`EmissionModel.temperature`) is the
calibration, measured in the sequence study (see :data:`DEFAULT_TEMPERATURE`). The emission is
expressed as a log-*ratio* against an uninformative frame, ``log(N * softmax_i)``, so that it can
be mixed with an outlier component on the same scale:

    e_i = log((1 - eps) * N * softmax_i(scores / T) + eps)

``eps`` (:attr:`EmissionModel.outlier_prob`) is the prior probability that a frame's retrieval
says nothing about where it is (ground not in the index, a blurred frame, a lookalike field).
It floors every tile's emission at ``log eps`` relative to the best, so one misleading frame can
cost the true track at most ``log((1 - eps) N / eps)`` nats — a robust likelihood; the posterior
share of the ``eps`` term is the frame's outlier probability (an "outside the index" state that
keeps the position). Unscored tiles (``-inf``) get the floor: no evidence, not evidence against.

A fix adds ``log((1 - eps_f) * A * Normal(c_i; fix, r^2 + s^2/6) + eps_f)`` with ``A`` the
area one tile stands for (``spacing^2``) times N — again a ratio against "uninformative" — and
``s^2/6`` the variance of a point spread uniformly over a tile cell, so a fix between tile centres
still supports both neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from cvgl.track.odometry import Odometry

# Measured on simulated Longmont flights (gem-l8-raw, batch centring; the sequence study's
# calibration seed): the mean NLL of the true tile under softmax(cos / T) is lowest at T = 0.05
# (3.77 nats; 5.52 at locate's 0.02, 9.91 at 0.01), and every sequence decoder is as good or better
# at 0.05 than at 0.02-0.03. The single-photo answer's 0.02 is too sharp to multiply over frames.
DEFAULT_TEMPERATURE = 0.05
DEFAULT_OUTLIER_PROB = 0.2  # 0.1-0.4 measured within noise of each other; 0.2 floors a frame at -1.6 nats
DEFAULT_FIX_OUTLIER_PROB = 0.05


@dataclass(frozen=True)
class Fix:
    """A verified metric position of a frame's ground centre (e.g. from matching + pose)."""

    x: float
    y: float
    radius_m: float  # one-sigma uncertainty of the position, metres


@dataclass
class FrameEvidence:
    """What one frame says about where it is.

    ``scores``: cosine score per tile ``[N]`` (``-inf`` = not scored). ``heading_deg``: the heading
    of the best hypothesis per tile ``[N]``, or one known heading for all tiles (a float), or None.
    ``time_s``: capture time (seconds, any origin; only differences are used).
    ``hypothesis_scores`` ``[H, N]`` with ``hypothesis_headings`` ``[H]``: the score of every
    heading hypothesis (``scores`` is their maximum), for the heading-aware decoder
    (:mod:`cvgl.track.heading`); None when only the per-tile best is known. ``odometry``: the
    measured motion from the previous frame to this one (:mod:`cvgl.track.odometry`), if any.
    """

    time_s: float
    scores: np.ndarray
    heading_deg: np.ndarray | float | None = None
    heading_source: str = ""  # "search" | "metadata" | "flag" ...: where heading_deg came from
    fix: Fix | None = None
    name: str = ""
    hypothesis_scores: np.ndarray | None = None
    hypothesis_headings: np.ndarray | None = None
    odometry: Odometry | None = None

    def subset(self, rows: np.ndarray) -> FrameEvidence:
        """This frame's evidence over ``rows`` of the tiles only."""
        rows = np.asarray(rows)
        heading = self.heading_deg
        if heading is not None and np.ndim(heading) > 0:
            heading = np.asarray(heading)[rows]
        hyp = None if self.hypothesis_scores is None else np.asarray(self.hypothesis_scores)[:, rows]
        return FrameEvidence(self.time_s, np.asarray(self.scores)[rows], heading, self.heading_source, self.fix,
                             self.name, hyp, self.hypothesis_headings, self.odometry)

    def heading_at(self, state: int) -> float | None:
        if self.heading_deg is None:
            return None
        if np.ndim(self.heading_deg) == 0:
            return float(self.heading_deg) % 360.0
        return float(np.asarray(self.heading_deg)[state]) % 360.0


@dataclass(frozen=True)
class TileStates:
    """The reference tile centres the decoders move between, in metres (a local metric CRS)."""

    xy: np.ndarray  # [N, 2] float64: easting, northing
    spacing_m: float  # distance between neighbouring tile centres (the index stride)
    crs: str | None = None  # CRS of ``xy`` when known, to turn positions back into lat/lon
    _tree: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
            raise ValueError(f"tile centres must be a non-empty [N, 2] array, got shape {xy.shape}")
        if not np.isfinite(xy).all():
            raise ValueError("tile centres must be finite")
        if not self.spacing_m > 0:
            raise ValueError(f"tile spacing must be positive, got {self.spacing_m}")
        object.__setattr__(self, "xy", xy)

    def __len__(self) -> int:
        return len(self.xy)

    @property
    def tree(self):
        """A KD-tree over the centres (built once, on first use)."""
        if self._tree is None:
            from scipy.spatial import cKDTree

            object.__setattr__(self, "_tree", cKDTree(self.xy))
        return self._tree

    @property
    def cell_area_m2(self) -> float:
        return self.spacing_m**2

    def window(self, centre_xy: tuple[float, float], radius_m: float) -> np.ndarray:
        """Rows of the tiles within ``radius_m`` of a point: a location prior that bounds N."""
        return np.sort(np.asarray(self.tree.query_ball_point(centre_xy, radius_m), dtype=np.int64))

    def subset(self, rows: np.ndarray) -> TileStates:
        """The states of ``rows`` only (pair with :meth:`FrameEvidence.subset` on the same rows)."""
        return TileStates(self.xy[np.asarray(rows)], self.spacing_m, self.crs)

    @classmethod
    def from_latlon(cls, lat: np.ndarray, lon: np.ndarray, spacing_m: float | None = None) -> TileStates:
        """States from tile lat/lon (an index's tiles table), projected to their UTM zone."""
        from cvgl.geo import from_latlon, typical_spacing_m, utm_crs_for

        lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
        epsg = utm_crs_for(float(np.mean(lat)), float(np.mean(lon)))
        x, y = from_latlon(f"EPSG:{epsg}", lat, lon)
        spacing = spacing_m if spacing_m is not None else typical_spacing_m(lat, lon)
        return cls(np.stack([np.asarray(x), np.asarray(y)], axis=1), float(spacing), f"EPSG:{epsg}")


@dataclass(frozen=True)
class EmissionModel:
    temperature: float = DEFAULT_TEMPERATURE  # cosine units per nat (see module doc)
    outlier_prob: float = DEFAULT_OUTLIER_PROB  # prior that a frame's retrieval is uninformative
    fix_outlier_prob: float = DEFAULT_FIX_OUTLIER_PROB  # prior that a verified fix is wrong

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        for name in ("outlier_prob", "fix_outlier_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")


def retrieval_inlier_ratio(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``N * softmax(scores / T)`` over tiles: the inlier likelihood ratio per tile (0 if unscored).

    A frame with no finite score gives all ones (no information).
    """
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        return np.ones_like(s)
    z = np.where(finite, s / temperature, -np.inf)
    return np.exp(z - logsumexp(z[finite]) + math.log(len(s)))


def retrieval_loglik(scores: np.ndarray, model: EmissionModel) -> np.ndarray:
    """Robust emission log-likelihood ratio per tile from cosine scores (module doc)."""
    eps = model.outlier_prob
    ratio = retrieval_inlier_ratio(scores, model.temperature)
    with np.errstate(divide="ignore"):
        return np.log((1.0 - eps) * ratio + eps)


def fix_loglik(states: TileStates, fix: Fix, model: EmissionModel) -> np.ndarray:
    """Robust log-likelihood ratio per tile of a verified metric fix (module doc)."""
    var = fix.radius_m**2 + states.spacing_m**2 / 6.0
    d2 = ((states.xy - (fix.x, fix.y)) ** 2).sum(1)
    density = np.exp(-0.5 * d2 / var) / (2.0 * math.pi * var)
    area = len(states) * states.cell_area_m2
    eps = model.fix_outlier_prob
    with np.errstate(divide="ignore"):
        return np.log((1.0 - eps) * area * density + eps)


def emission_loglik(states: TileStates, frame: FrameEvidence, model: EmissionModel) -> np.ndarray:
    """Total emission log-likelihood ratio ``[N]`` of one frame: retrieval plus fix (if any)."""
    scores = np.asarray(frame.scores)
    if scores.shape != (len(states),):
        raise ValueError(f"frame {frame.name or frame.time_s}: {scores.shape} scores for {len(states)} tiles")
    e = retrieval_loglik(scores, model)
    if frame.fix is not None:
        e = e + fix_loglik(states, frame.fix, model)
    return e


def outlier_share(scores: np.ndarray, posterior: np.ndarray, model: EmissionModel) -> float:
    """Posterior probability that a frame's retrieval evidence was the outlier component.

    ``sum_i posterior_i * eps / ((1 - eps) ratio_i + eps)``: near 1 when the frame's scores do not
    support where the track puts it (ground not in the index), near 0 when they do.
    """
    eps = model.outlier_prob
    if eps == 0.0:
        return 0.0
    ratio = retrieval_inlier_ratio(scores, model.temperature)
    return float((posterior * (eps / ((1.0 - eps) * ratio + eps))).sum())
