"""The motion model over tiles: how far the drone can get between two frames.

Between frames ``dt`` seconds apart a drone flying at most ``v_max`` moves at most ``v_max * dt``;
its frame centre then lies in a tile whose centre is at most ``v_max * dt + spacing`` away (the
extra ``spacing`` is the quantisation of a position to the nearest tile centres on both ends),
plus the time resolution of the clock (``v_max * resolution``). That distance is the *reach*, a
hard cut. Inside it the transition weight is a Gaussian of the centre distance,
``exp(-d^2 / (2 sigma^2))`` with ``sigma = sigma_fraction * reach`` (default half the reach:
nearly flat for the slow moves, still favouring staying near), normalised over each tile's
reachable tiles.

A small *teleport* probability ``rho`` spreads uniformly over all tiles (``rho / N`` per pair):
it is what lets a decoder that locked onto the wrong place relocalise when the evidence says so
(a "kidnapped" drone), at a price of ``-log(rho / N)`` nats. It is a rank-one term, applied in
``O(N)`` without storing an ``N x N`` matrix. Intervals whose reach exceeds ``max_reach_m`` (long
gaps in a video, a battery swap between stills) become a pure reset: uniform over all tiles.

The reachable pairs come from a KD-tree (``scipy.spatial.cKDTree.query_pairs``) and are stored as
edge lists sorted by destination (CSR over incoming edges, what max-product needs) plus a scipy
sparse matrix (what sum-product needs): memory is ``O(N * k)`` with ``k`` the number of tiles
within the reach (about ``pi (reach / spacing)^2``), never ``O(N^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cvgl.track.evidence import TileStates

DEFAULT_MAX_SPEED_MPS = 20.0  # a fast multirotor; the benchmark flies 5-15 m/s
DEFAULT_TELEPORT_PROB = 1e-4


@dataclass(frozen=True)
class MotionModel:
    max_speed_mps: float = DEFAULT_MAX_SPEED_MPS
    sigma_fraction: float = 0.5  # Gaussian sigma as a fraction of the reach (inf: flat kernel)
    teleport_prob: float = DEFAULT_TELEPORT_PROB  # per frame, jump anywhere (relocalisation)
    max_reach_m: float = 2000.0  # beyond this an interval resets the position prior to uniform
    time_resolution_s: float = 0.0  # clock resolution added to every interval (FrameOrder's)
    extra_m: float = 0.0  # added to the reach, e.g. a fix's uncertainty

    def __post_init__(self) -> None:
        if not self.max_speed_mps > 0:
            raise ValueError(f"max speed must be positive, got {self.max_speed_mps}")
        if not self.sigma_fraction > 0:
            raise ValueError(f"sigma_fraction must be positive, got {self.sigma_fraction}")
        if not 0.0 <= self.teleport_prob < 1.0:
            raise ValueError(f"teleport_prob must be in [0, 1), got {self.teleport_prob}")

    def reach_m(self, dt_s: float, spacing_m: float) -> float:
        """The farthest tile-centre distance reachable in ``dt_s`` seconds."""
        if not dt_s >= 0:
            raise ValueError(f"frames must be in time order: interval {dt_s} s")
        return self.max_speed_mps * (dt_s + self.time_resolution_s) + spacing_m + self.extra_m


@dataclass(frozen=True)
class Transition:
    """One interval's transition ``A[i, j] = P(state j at t+1 | state i at t)``, sparse + rank one.

    ``A = (1 - rho) K + rho / N``, with ``K`` row-stochastic over reachable pairs. ``src``,
    ``log_k`` are the edges sorted by destination, ``dst_ptr`` the CSR offsets over destinations
    (every tile reaches itself, so no destination is empty). ``k_t`` is ``K`` transposed as a CSR
    matrix (rows = destinations) for sum-product. A reset interval has no edges and ``rho = 1``.
    """

    n: int
    src: np.ndarray  # [E] int32
    dst_ptr: np.ndarray  # [N + 1] int64
    log_k: np.ndarray  # [E] float64, log K[src, dst] (without the (1 - rho) factor)
    k_t: sp.csr_matrix | None  # K^T, [N, N]; None for a reset
    rho: float
    reach_m: float

    @property
    def is_reset(self) -> bool:
        return self.k_t is None

    @property
    def log_keep(self) -> float:
        return math.log1p(-self.rho) if self.rho < 1.0 else -math.inf

    @property
    def log_jump(self) -> float:
        """log(rho / N): the rank-one part per (i, j) pair."""
        return math.log(self.rho / self.n) if self.rho > 0 else -math.inf

    def propagate(self, p: np.ndarray) -> np.ndarray:
        """``A^T p`` for a probability vector (the forward step), in O(E + N)."""
        out = np.full(self.n, self.rho * p.sum() / self.n)
        if self.k_t is not None:
            out += (1.0 - self.rho) * (self.k_t @ p)
        return out

    def pull_back(self, q: np.ndarray) -> np.ndarray:
        """``A q`` (the backward step), in O(E + N)."""
        out = np.full(self.n, self.rho * q.sum() / self.n)
        if self.k_t is not None:
            out += (1.0 - self.rho) * (self.k_t.T @ q)
        return out

    def dense(self) -> np.ndarray:
        """The full ``[N, N]`` matrix — for tests and tiny problems only."""
        a = np.full((self.n, self.n), self.rho / self.n)
        if self.k_t is not None:
            a += (1.0 - self.rho) * self.k_t.toarray().T
        return a


@dataclass(frozen=True)
class Neighbours:
    """Every tile pair within ``radius_m`` (both directions and self-pairs), sorted by destination."""

    src: np.ndarray  # [E] int32
    dst: np.ndarray  # [E] int32
    dist: np.ndarray  # [E] float64
    dst_ptr: np.ndarray  # [N + 1]
    radius_m: float


def neighbours(states: TileStates, radius_m: float) -> Neighbours:
    """Pairs within ``radius_m`` from the KD-tree, as destination-sorted edge lists."""
    n = len(states)
    pairs = states.tree.query_pairs(r=radius_m, output_type="ndarray").astype(np.int32)
    self_pairs = np.arange(n, dtype=np.int32)
    src = np.concatenate([self_pairs, pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([self_pairs, pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((src, dst))
    src, dst = src[order], dst[order]
    dist = np.linalg.norm(states.xy[src] - states.xy[dst], axis=1)
    dst_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=n), out=dst_ptr[1:])
    return Neighbours(src, dst, dist, dst_ptr, radius_m)


def build_transition(states: TileStates, motion: MotionModel, dt_s: float, pairs: Neighbours | None = None) -> Transition:
    """The transition for one interval of ``dt_s`` seconds (module doc).

    ``pairs``: precomputed neighbours with a radius at least this interval's reach (reused across
    intervals by :class:`TransitionCache`); computed here when None.
    """
    n = len(states)
    reach = motion.reach_m(dt_s, states.spacing_m)
    if reach > motion.max_reach_m:
        empty = np.zeros(0, dtype=np.int32)
        return Transition(n, empty, np.zeros(n + 1, dtype=np.int64), np.zeros(0), None, 1.0, reach)
    if pairs is None or pairs.radius_m < reach:
        pairs = neighbours(states, reach)
    keep = pairs.dist <= reach
    src, dst, dist = pairs.src[keep], pairs.dst[keep], pairs.dist[keep]
    sigma = motion.sigma_fraction * reach
    log_w = -0.5 * (dist / sigma) ** 2 if math.isfinite(sigma) else np.zeros_like(dist)
    # Row-normalise over each source's outgoing edges (log-sum-exp per source).
    row_max = np.full(n, -np.inf)
    np.maximum.at(row_max, src, log_w)
    row_sum = np.bincount(src, weights=np.exp(log_w - row_max[src]), minlength=n)
    log_k = log_w - (row_max[src] + np.log(row_sum[src]))
    dst_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=n), out=dst_ptr[1:])
    k_t = sp.csr_matrix((np.exp(log_k), src, dst_ptr), shape=(n, n))
    return Transition(n, src, dst_ptr, log_k, k_t, motion.teleport_prob, reach)


class TransitionCache:
    """Transitions per interval, built once per distinct interval (to ``step_s`` seconds).

    Frames of a video or a timed burst share a few intervals; the neighbour search runs once at
    the largest reach needed and every interval's edges are a subset of it.
    """

    def __init__(self, states: TileStates, motion: MotionModel, step_s: float = 0.05) -> None:
        self.states, self.motion, self.step_s = states, motion, step_s
        self._pairs: Neighbours | None = None
        self._cache: dict[int, Transition] = {}

    def for_intervals(self, dts: np.ndarray) -> list[Transition]:
        keys = [math.ceil(dt / self.step_s - 1e-9) for dt in np.asarray(dts, dtype=np.float64)]
        if any(k < 0 for k in keys):
            raise ValueError("frames must be in time order (a negative interval)")
        reaches = [self.motion.reach_m(k * self.step_s, self.states.spacing_m) for k in set(keys)]
        needed = max([r for r in reaches if r <= self.motion.max_reach_m], default=0.0)
        if needed and (self._pairs is None or self._pairs.radius_m < needed):
            self._pairs = neighbours(self.states, needed)
        for k in set(keys) - set(self._cache):
            self._cache[k] = build_transition(self.states, self.motion, k * self.step_s, self._pairs)
        return [self._cache[k] for k in keys]
