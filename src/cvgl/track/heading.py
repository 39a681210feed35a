"""Heading-aware states for frames whose heading is unknown: the HMM over (tile, heading) pairs.

When the compass heading is unknown ``cvgl locate`` tries every heading hypothesis (16 by
default) and keeps, per tile, the best one. Over a flight that throws away a strong constraint:
the camera's heading changes slowly, so a tile that matches frame after frame *at a consistent
heading* is far likelier than an impostor that needs a different rotation in every frame. The
states are then ``(tile, heading bin)`` pairs (``N * H`` of them, index ``tile * H + bin``), the
emission is ``cvgl.track.evidence``'s robust ratio over all pairs,

    e_(i,h) = log((1 - eps) * N H * softmax_(i,h)(score_(h,i) / T) + eps),

and the transition is the tile transition times a heading transition (a Kronecker product): the
heading moves at most ``max_yaw_rate * dt`` plus one bin, with the same Gaussian-within-reach
kernel as the tiles. The exact decoders of :mod:`cvgl.track.hmm` run unchanged on the product
space; the price is ``H`` times the states and about ``H * k_h`` times the edges (``k_h`` bins
within the heading reach), so a location window matters sooner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from cvgl.track.evidence import (
    EmissionModel,
    FrameEvidence,
    TileStates,
    retrieval_inlier_ratio,
)
from cvgl.track.motion import MotionModel, Transition
from cvgl.track.odometry import Odometry

DEFAULT_MAX_YAW_RATE_DPS = 30.0  # a multirotor turning on a survey or around a corner
MIN_BINS = 4


@dataclass(frozen=True)
class HeadingModel:
    max_yaw_rate_dps: float = DEFAULT_MAX_YAW_RATE_DPS
    sigma_fraction: float = 0.5  # Gaussian sigma as a fraction of the heading reach

    def __post_init__(self) -> None:
        if not self.max_yaw_rate_dps >= 0:
            raise ValueError(f"max yaw rate must be >= 0, got {self.max_yaw_rate_dps}")


def heading_grid(frames: Sequence[FrameEvidence]) -> np.ndarray | None:
    """The common heading hypotheses of every frame (degrees, ``[H]``), or None.

    Heading states apply when every frame carries per-hypothesis scores on the same equally
    spaced grid of at least :data:`MIN_BINS` headings (a heading search); otherwise (a known
    compass heading, mixed grids) the tile-only model is the right one.
    """
    grids = [None if f.hypothesis_headings is None else np.asarray(f.hypothesis_headings, dtype=np.float64) for f in frames]
    first = grids[0]
    if first is None or len(first) < MIN_BINS or any(g is None or g.shape != first.shape or not np.allclose(g, first) for g in grids):
        return None
    step = 360.0 / len(first)
    offsets = (first - first[0]) % 360.0
    if not np.allclose(np.sort(offsets), np.arange(len(first)) * step, atol=1e-6):
        return None
    return first


def _bin_distance(headings: np.ndarray) -> np.ndarray:
    diff = headings[:, None] - headings[None, :]
    return np.abs((diff + 180.0) % 360.0 - 180.0)


def heading_kernel(headings: np.ndarray, dt_s: float, model: HeadingModel) -> np.ndarray:
    """Row-stochastic ``[H, H]`` heading transition for an interval of ``dt_s`` seconds."""
    step = 360.0 / len(headings)
    reach = model.max_yaw_rate_dps * dt_s + step + 1e-9
    d = _bin_distance(headings)
    sigma = model.sigma_fraction * reach
    g = np.where(d <= reach, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    return g / g.sum(1, keepdims=True)


def product_transition(tile: Transition, kernel: np.ndarray) -> Transition:
    """The transition over ``(tile, heading)`` pairs: ``K (x) G`` plus the teleport (rank one)."""
    h = len(kernel)
    n = tile.n * h
    if tile.is_reset:
        empty = np.zeros(0, dtype=np.int32)
        return Transition(n, empty, np.zeros(n + 1, dtype=np.int64), np.zeros(0), None, 1.0, tile.reach_m)
    k_t = sp.kron(tile.k_t, sp.csr_matrix(kernel.T), format="csr")  # (K (x) G)^T = K^T (x) G^T
    k_t.sort_indices()
    return Transition(n, k_t.indices.astype(np.int32), k_t.indptr.astype(np.int64), np.log(k_t.data), k_t,
                      tile.rho, tile.reach_m)


def product_loglik(frame: FrameEvidence, model: EmissionModel) -> np.ndarray:
    """Robust emission log-likelihood ratio ``[N * H]`` over (tile, heading) pairs (module doc)."""
    scores = np.asarray(frame.hypothesis_scores, dtype=np.float64)  # [H, N]
    eps = model.outlier_prob
    ratio = retrieval_inlier_ratio(scores.T.reshape(-1), model.temperature)
    with np.errstate(divide="ignore"):
        return np.log((1.0 - eps) * ratio + eps)


def product_outlier_share(frame: FrameEvidence, posterior: np.ndarray, model: EmissionModel) -> float:
    """:func:`cvgl.track.evidence.outlier_share` over (tile, heading) pairs."""
    eps = model.outlier_prob
    if eps == 0.0:
        return 0.0
    ratio = retrieval_inlier_ratio(np.asarray(frame.hypothesis_scores, dtype=np.float64).T.reshape(-1), model.temperature)
    return float((posterior * (eps / ((1.0 - eps) * ratio + eps))).sum())



def odometry_transition(states: TileStates, grid: np.ndarray | None, odometry: Odometry, motion: MotionModel,
                        dt_s: float, heading: HeadingModel) -> Transition:
    """A transition that follows measured visual odometry, over tiles or (tile, heading) pairs.

    From tile ``i`` facing bin ``h`` the next tile centre is expected at ``c_i + R(h) d`` (``d`` the
    odometry displacement; ``R(h)`` the rotation of the previous image's axes, the bin's heading for a
    heading search or the odometry's own ``image_heading_deg``), with a Gaussian spread of the
    odometry error plus the quantisation of both ends to tile centres (``spacing^2 / 6`` per axis),
    cut at 3 sigma and at the speed bound's reach; the next heading bin is expected at
    ``h + turn`` with the odometry's angular error plus half a bin. ``grid`` None: tiles only (the
    odometry must then carry ``image_heading_deg``).
    """
    n = len(states)
    bins = 1 if grid is None else len(grid)
    if grid is None and odometry.image_heading_deg is None:
        raise ValueError("odometry in the camera frame needs heading states (a heading grid)")
    sigma = math.sqrt(odometry.sigma_m**2 + states.spacing_m**2 / 6.0)
    reach = motion.reach_m(dt_s, states.spacing_m)
    cut = min(3.0 * sigma, reach)
    srcs, dsts, logs = [], [], []
    if grid is not None:
        step = 360.0 / bins
        sigma_h = math.sqrt(odometry.sigma_deg**2 + step**2 / 12.0)
        turn_to = grid[None, :] - (grid[:, None] + odometry.turn_deg)  # [h, h']
        turn_to = (turn_to + 180.0) % 360.0 - 180.0
        head_log = np.where(np.abs(turn_to) <= 3.0 * sigma_h + step / 2, -0.5 * (turn_to / sigma_h) ** 2, -np.inf)
        head_log -= np.log(np.exp(head_log).sum(1, keepdims=True))
    for h in range(bins):
        axis = grid[h] if grid is not None else 0.0
        shift = odometry.world_displacement(axis)
        pairs = cKDTree(states.xy + shift).sparse_distance_matrix(states.tree, cut, output_type="ndarray")
        i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
        d = pairs["v"]
        keep = np.linalg.norm(states.xy[j] - states.xy[i], axis=1) <= reach
        i, j, d = i[keep], j[keep], d[keep]
        log_pos = -0.5 * (d / sigma) ** 2
        if grid is None:
            srcs.append(i), dsts.append(j), logs.append(log_pos)
            continue
        for h2 in np.flatnonzero(np.isfinite(head_log[h])):
            srcs.append(i * bins + h), dsts.append(j * bins + h2), logs.append(log_pos + head_log[h, h2])
    src, dst, log_w = np.concatenate(srcs), np.concatenate(dsts), np.concatenate(logs)
    size = n * bins
    # A source with no edge at all (the odometry leads off the tiles) keeps itself: no information.
    orphan = np.setdiff1d(np.arange(size), src)
    src, dst, log_w = np.concatenate([src, orphan]), np.concatenate([dst, orphan]), np.concatenate([log_w, np.zeros(len(orphan))])
    row_max = np.full(size, -np.inf)
    np.maximum.at(row_max, src, log_w)
    row_sum = np.bincount(src, weights=np.exp(log_w - row_max[src]), minlength=size)
    log_k = log_w - row_max[src] - np.log(row_sum[src])
    k_t = sp.csr_matrix((np.exp(log_k), (dst, src)), shape=(size, size))
    k_t.sort_indices()
    # Every destination needs an incoming edge for max-product; one that has none gets a
    # vanishing self-edge (its probability is then the teleport's alone).
    empty = np.flatnonzero(np.diff(k_t.indptr) == 0)
    if len(empty):
        k_t = (k_t + sp.csr_matrix((np.full(len(empty), 1e-300), (empty, empty)), shape=(size, size))).tocsr()
        k_t.sort_indices()
    return Transition(size, k_t.indices.astype(np.int32), k_t.indptr.astype(np.int64), np.log(k_t.data), k_t,
                      motion.teleport_prob, reach)
