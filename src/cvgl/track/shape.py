"""Rigid-shape search: where on the map does the whole dead-reckoned path fit best?

Visual odometry (:mod:`cvgl.track.odometry`) chained from the first frame gives the path's
shape — every frame's ground centre ``P_t`` and heading change ``Psi_t`` relative to frame 0 —
up to a slow drift. What is unknown is one pose: frame 0's position ``x0`` and (for a heading
search) heading ``theta0``. Scoring a pose sums the frames' robust emission fields along the
placed path,

    S(x0, theta0) = sum_t field_t(x0 + R(theta0) P_t, heading bin of theta0 + Psi_t),

a log-likelihood ratio of the whole segment against uninformative frames. Evaluated
exhaustively on a grid (``grid_m`` metres, every ``heading_step_deg`` degrees) it is a global
search no sampler can miss: for a fixed ``theta0`` the path offsets are the same for every ``x0``,
so ``S`` is a sum of shifted rasters (one array addition per frame and heading).

The best few poses seed the particle smoother (:mod:`cvgl.track.particles`), which then follows
drift, breaks in the odometry and the evidence at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cvgl.track.evidence import (
    EmissionModel,
    FrameEvidence,
    TileStates,
    retrieval_loglik,
)
from cvgl.track.heading import MIN_BINS, product_loglik


@dataclass(frozen=True)
class Pose:
    x: float
    y: float
    heading_deg: float  # frame 0's camera heading (the odometry's image heading when it is known)
    score: float  # S: log-likelihood ratio of the segment at this pose


@dataclass(frozen=True)
class Segment:
    """Frames ``0..len-1`` chained by odometry: shape relative to the first frame's image axes."""

    frames: int
    offsets: np.ndarray  # [T, 2] ground-centre displacement from frame 0 in frame 0's image axes (right, up)
    turns_deg: np.ndarray  # [T] heading change from frame 0 (clockwise)
    image_heading_deg: float | None  # frame 0's image up axis when known (north-up views: 0)


def chain_odometry(frames: list[FrameEvidence], start: int = 0) -> Segment:
    """Dead-reckon from frame ``start`` while consecutive frames carry odometry (to the first gap)."""
    offsets, turns = [np.zeros(2)], [0.0]
    first = frames[start + 1].odometry if start + 1 < len(frames) else None
    image_heading = first.image_heading_deg if first is not None else None
    for frame in frames[start + 1:]:
        odo = frame.odometry
        if odo is None or (odo.image_heading_deg is None) != (image_heading is None):
            break
        # The previous frame's image axes are the first frame's rotated by the accumulated turn
        # (camera frame) or fixed (north-up views).
        a = math.radians(turns[-1] if image_heading is None else 0.0)
        step = np.array([odo.dx_m * math.cos(a) + odo.dy_m * math.sin(a), -odo.dx_m * math.sin(a) + odo.dy_m * math.cos(a)])
        offsets.append(offsets[-1] + step)
        turns.append(turns[-1] + odo.turn_deg)
    return Segment(len(offsets), np.array(offsets), np.array(turns), image_heading)


def place(segment: Segment, x: float, y: float, heading_deg: float) -> np.ndarray:
    """The segment's ground centres ``[T, 2]`` when its first frame is at (x, y) facing ``heading_deg``."""
    dx, dy = segment.offsets[:, 0], segment.offsets[:, 1]
    if segment.image_heading_deg is not None:  # north-up odometry: offsets are east/north already
        return np.stack([x + dx, y + dy], axis=1)
    a = math.radians(heading_deg)
    return np.stack([x + dx * math.cos(a) + dy * math.sin(a), y - dx * math.sin(a) + dy * math.cos(a)], axis=1)


class FieldRaster:
    """Every frame's robust emission field sampled on a regular grid, per heading bin.

    The field at a point is the log of the kernel-weighted mean likelihood ratio of the tiles
    within 1.5 spacings (Gaussian, sigma = spacing / 2) — the particle filter's interpolation —
    computed for all grid points at once as one sparse matrix product.
    """

    def __init__(self, states: TileStates, grid_m: float, margin_m: float) -> None:
        import scipy.sparse as sp

        lo = states.xy.min(0) - margin_m
        hi = states.xy.max(0) + margin_m
        self.grid_m, self.origin = grid_m, lo
        self.shape = (math.ceil((hi[1] - lo[1]) / grid_m) + 1, math.ceil((hi[0] - lo[0]) / grid_m) + 1)  # rows = y
        ys, xs = np.mgrid[0:self.shape[0], 0:self.shape[1]]
        points = np.stack([lo[0] + xs.ravel() * grid_m, lo[1] + ys.ravel() * grid_m], axis=1)
        spacing = states.spacing_m
        k = min(12, len(states))
        dist, idx = states.tree.query(points, k=k, distance_upper_bound=1.5 * spacing)
        dist, idx = dist.reshape(len(points), k), idx.reshape(len(points), k)
        valid = np.isfinite(dist)
        kernel = np.where(valid, np.exp(-0.5 * (np.where(valid, dist, 0.0) / (0.5 * spacing)) ** 2), 0.0)
        norm = kernel.sum(1, keepdims=True)
        self.covered = norm[:, 0] > 0
        weights = np.where(self.covered[:, None], kernel / np.maximum(norm, 1e-300), 0.0)
        rows = np.repeat(np.arange(len(points)), k)
        self.weights = sp.csr_matrix((weights.ravel(), (rows, np.minimum(idx, len(states) - 1).ravel())),
                                     shape=(len(points), len(states)))

    def field(self, table: np.ndarray, floor: float) -> np.ndarray:
        """``[bins, rows, cols]`` interpolated field of a ``[N, bins]`` emission table (log ratios)."""
        mean = self.weights @ np.exp(table)  # [G, bins]
        with np.errstate(divide="ignore"):
            out = np.where(self.covered[:, None], np.log(np.maximum(mean, 1e-300)), floor)
        return out.T.reshape(table.shape[1], *self.shape)


def _table(states: TileStates, frame: FrameEvidence, model: EmissionModel) -> tuple[np.ndarray, np.ndarray | None]:
    grid = None if frame.hypothesis_headings is None else np.asarray(frame.hypothesis_headings, dtype=np.float64)
    if frame.hypothesis_scores is not None and grid is not None and len(grid) >= MIN_BINS:
        return product_loglik(frame, model).reshape(len(states), len(grid)), grid
    return retrieval_loglik(np.asarray(frame.scores), model)[:, None], None


class FieldCache:
    """Frames' fields on a raster (float32), the most recent ``size`` kept: windows share frames."""

    def __init__(self, states: TileStates, raster: FieldRaster, model: EmissionModel, size: int = 32) -> None:
        self.states, self.raster, self.model, self.size = states, raster, model, size
        self.floor = math.log(model.outlier_prob) if model.outlier_prob > 0 else -50.0
        self._store: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def get(self, frame: FrameEvidence) -> tuple[np.ndarray, np.ndarray | None]:
        key = id(frame)
        if key in self._store:
            value = self._store.pop(key)
        else:
            table, grid = _table(self.states, frame, self.model)
            value = (self.raster.field(table, self.floor).astype(np.float32), grid)
        self._store[key] = value  # most recent last
        while len(self._store) > self.size:
            self._store.pop(next(iter(self._store)))
        return value


def _score(states: TileStates, frames: list[FrameEvidence], segment: Segment, model: EmissionModel,
           raster: FieldRaster, thetas: np.ndarray, cache: FieldCache | None = None) -> np.ndarray:
    """``S`` over ``[thetas, grid rows, grid cols]`` for a segment starting at ``frames[0]``."""
    cache = cache or FieldCache(states, raster, model)
    rows, cols = raster.shape
    grid_m = raster.grid_m
    pad = math.ceil((float(np.linalg.norm(segment.offsets, axis=1).max()) + states.spacing_m) / grid_m) + 1
    search_heading = segment.image_heading_deg is None
    total = np.zeros((len(thetas), rows, cols))
    for t in range(segment.frames):
        field, grid = cache.get(frames[t])
        if search_heading and grid is None:
            raise ValueError("odometry in the camera frame needs heading-search evidence (hypothesis scores)")
        padded = np.full((field.shape[0], rows + 2 * pad, cols + 2 * pad), cache.floor, dtype=np.float32)
        padded[:, pad:pad + rows, pad:pad + cols] = field
        for k, theta in enumerate(thetas):
            east, north = place(Segment(1, segment.offsets[t:t + 1], segment.turns_deg[t:t + 1],
                                        segment.image_heading_deg), 0.0, 0.0, float(theta))[0]
            sx, sy = round(east / grid_m), round(north / grid_m)
            b = 0 if grid is None else round(((theta + segment.turns_deg[t] - grid[0]) % 360.0) / (360.0 / len(grid))) % len(grid)
            total[k] += padded[b, pad + sy:pad + sy + rows, pad + sx:pad + sx + cols]
    return total


def _thetas(segment: Segment, step_deg: float) -> np.ndarray:
    return np.arange(0.0, 360.0, step_deg) if segment.image_heading_deg is None else np.array([segment.image_heading_deg])


def shape_search(states: TileStates, frames: list[FrameEvidence], model: EmissionModel, grid_m: float = 5.0,
                 heading_step_deg: float = 5.0, top: int = 5, start: int = 0) -> list[Pose]:
    """The best ``top`` poses of frame ``start`` for the odometry-chained segment from there (module doc).

    Poses are local maxima at least two tile spacings (or 30 degrees) apart. Returns [] when the
    segment is shorter than three frames (nothing rigid to match).
    """
    segment = chain_odometry(frames, start)
    if segment.frames < 3 or not _usable(segment, frames[start:]):
        return []
    raster = FieldRaster(states, grid_m, margin_m=states.spacing_m)
    thetas = _thetas(segment, heading_step_deg)
    total = _score(states, frames[start:], segment, model, raster, thetas)
    return _peaks(total, thetas, raster, states.spacing_m, top)


@dataclass
class ShapeTrack:
    """Per-frame result of :func:`shape_track`; frames outside any segment of >= 3 frames are NaN."""

    xy: np.ndarray  # [T, 2]
    heading_deg: np.ndarray  # [T] camera heading (NaN for north-up odometry: the frames' own heading)
    confidence: np.ndarray  # [T] posterior mass of poses within the radius of the best (flat pose prior)
    segment: np.ndarray  # [T] segment number, -1 when not decoded


def shape_track(states: TileStates, frames: list[FrameEvidence], model: EmissionModel, radius_m: float,
                window: int = 16, grid_m: float = 5.0, heading_step_deg: float = 5.0,
                local_m: float = 40.0, local_deg: float = 10.0) -> ShapeTrack:
    """Decode a flight by rigid-shape search: every odometry segment placed where it fits best.

    Per segment: the global search gives the best pose of its first frame; windows of ``window``
    frames (half overlapping) are then re-anchored by a local search (+-``local_m``,
    +-``local_deg``) around where the global pose puts them, which absorbs the odometry's drift;
    a frame's position is the mean over the windows that hold it. The confidence is the share of
    the pose posterior within ``radius_m`` and 15 degrees of the best pose — one number per
    segment — with ``S`` tempered by the number of frames per footprint (a tile, ``2 * spacing``,
    over the median step): overlapping frames are one observation seen several times, not many.
    """
    t_len = len(frames)
    out = ShapeTrack(np.full((t_len, 2), np.nan), np.full(t_len, np.nan), np.zeros(t_len), np.full(t_len, -1))
    raster = FieldRaster(states, grid_m, margin_m=states.spacing_m)
    cache = FieldCache(states, raster, model)
    start, number = 0, 0
    while start < t_len:
        segment = chain_odometry(frames, start)
        if segment.frames >= 3 and _usable(segment, frames[start:]):
            thetas = _thetas(segment, heading_step_deg)
            total = _score(states, frames[start:], segment, model, raster, thetas, cache)
            best = _peaks(total, thetas, raster, states.spacing_m, 1)[0]
            conf = _pose_mass(total / _overlap(segment, states), thetas, raster, best, radius_m)
            placed = place(segment, best.x, best.y, best.heading_deg)
            sums, counts = np.zeros((segment.frames, 2)), np.zeros(segment.frames)
            for w0 in range(0, max(segment.frames - window // 2, 1), max(window // 2, 1)):
                sub = chain_odometry(frames, start + w0)
                sub = Segment(min(window, segment.frames - w0), sub.offsets[:window], sub.turns_deg[:window], sub.image_heading_deg)
                theta0 = best.heading_deg + segment.turns_deg[w0]
                local = _thetas(sub, heading_step_deg / 2) if sub.image_heading_deg is not None else \
                    theta0 + np.arange(-local_deg, local_deg + 1e-9, heading_step_deg / 2)
                scores = _score(states, frames[start + w0:], sub, model, raster, local, cache)
                near = np.hypot(*_grid_points(raster, placed[w0]))
                scores[:, near > local_m] = -np.inf
                k, r, c = np.unravel_index(int(np.argmax(scores)), scores.shape)
                pose = (raster.origin[0] + c * grid_m, raster.origin[1] + r * grid_m, float(local[k]))
                sums[w0:w0 + sub.frames] += place(sub, *pose)
                counts[w0:w0 + sub.frames] += 1
            rows = slice(start, start + segment.frames)
            out.xy[rows] = sums / counts[:, None]
            if segment.image_heading_deg is None:
                out.heading_deg[rows] = (best.heading_deg + segment.turns_deg) % 360.0
            out.confidence[rows] = conf
            out.segment[rows] = number
            number += 1
        start += segment.frames
    return out


def shape_track_causal(states: TileStates, frames: list[FrameEvidence], model: EmissionModel, radius_m: float,
                       memory: float = 20.0, grid_m: float = 5.0, heading_step_deg: float = 5.0) -> ShapeTrack:
    """Online rigid-shape search: frame *t* is placed using frames up to *t* only.

    Within an odometry segment the score of the segment's first-frame pose is accumulated frame by
    frame, ``S_t = lambda S_(t-1) + field_t(placed)``, with ``lambda = exp(-1 / memory)``: one shifted
    field per heading per frame (no window is re-scored), and the forgetting lets the anchor pose
    follow the odometry's drift. Frames with fewer than three chained frames behind them are left
    undecoded (segment -1).
    """
    t_len = len(frames)
    out = ShapeTrack(np.full((t_len, 2), np.nan), np.full(t_len, np.nan), np.zeros(t_len), np.full(t_len, -1))
    raster = FieldRaster(states, grid_m, margin_m=states.spacing_m)
    cache = FieldCache(states, raster, model, size=2)
    keep = math.exp(-1.0 / memory)
    start, number, total = 0, 0, None
    for t in range(t_len):
        if t > 0 and frames[t].odometry is None:
            start, number, total = t, number + 1, None
        segment = chain_odometry(frames[: t + 1], start)
        if segment.frames < len(frames[start:t + 1]):  # the chain broke (an incompatible odometry)
            start, number, total = t, number + 1, None
            segment = chain_odometry(frames[: t + 1], start)
        if segment.frames < 2 or not _usable(segment, frames[start:t + 1]):
            # A lone first frame: the odometry convention (camera or north-up axes) comes with the
            # next frame, so its field is added then.
            total = None
            continue
        thetas = _thetas(segment, heading_step_deg)
        for k in range(start, t + 1) if total is None else (t,):
            offset = Segment(1, segment.offsets[k - start:k - start + 1], segment.turns_deg[k - start:k - start + 1],
                             segment.image_heading_deg)
            step = _score_shifted(states, frames[k], offset, raster, thetas, cache)
            total = step if total is None else keep * total + step
        if segment.frames < 3:
            continue
        best = _peaks(total, thetas, raster, states.spacing_m, 1)[0]
        out.xy[t] = place(segment, best.x, best.y, best.heading_deg)[-1]
        if segment.image_heading_deg is None:
            out.heading_deg[t] = (best.heading_deg + segment.turns_deg[-1]) % 360.0
        # The forgetting already bounds how many frames S holds (about ``memory``), so only the
        # part of it beyond one footprint's worth of frames is tempered away.
        held = min(float(segment.frames), memory)
        out.confidence[t] = _pose_mass(total / max(1.0, _overlap(segment, states) * held / memory), thetas, raster,
                                       best, radius_m)
        out.segment[t] = number
    return out


def _score_shifted(states: TileStates, frame: FrameEvidence, offset: Segment, raster: FieldRaster, thetas: np.ndarray,
                   cache: FieldCache) -> np.ndarray:
    """One frame's field shifted by its offset from the segment's first frame, for every heading."""
    return _score(states, [frame], Segment(1, offset.offsets, offset.turns_deg, offset.image_heading_deg), cache.model,
                  raster, thetas, cache)


def _usable(segment: Segment, frames: list[FrameEvidence]) -> bool:
    """Camera-frame odometry needs every frame's heading-search evidence to place it; north-up works with any."""
    return segment.image_heading_deg is not None or all(_table_grid(f) is not None for f in frames[:segment.frames])


def _table_grid(frame: FrameEvidence) -> np.ndarray | None:
    grid = None if frame.hypothesis_headings is None else np.asarray(frame.hypothesis_headings)
    return grid if frame.hypothesis_scores is not None and grid is not None and len(grid) >= MIN_BINS else None


def _overlap(segment: Segment, states: TileStates) -> float:
    """Frames per footprint: consecutive frames see mostly the same ground, so their evidence is
    not independent; ``S`` is tempered by this before its softmax is read as a confidence."""
    steps = np.linalg.norm(np.diff(segment.offsets, axis=0), axis=1)
    return max(1.0, 2.0 * states.spacing_m / max(float(np.median(steps)), 1e-3))


def _grid_points(raster: FieldRaster, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy) of every grid point from ``centre``, as two ``[rows, cols]`` arrays."""
    rows, cols = raster.shape
    xs = raster.origin[0] + np.arange(cols) * raster.grid_m - centre[0]
    ys = raster.origin[1] + np.arange(rows) * raster.grid_m - centre[1]
    return np.broadcast_to(xs[None, :], (rows, cols)), np.broadcast_to(ys[:, None], (rows, cols))


def _pose_mass(total: np.ndarray, thetas: np.ndarray, raster: FieldRaster, best: Pose, radius_m: float) -> float:
    weights = np.exp(total - total.max())
    dtheta = np.abs((thetas - best.heading_deg + 180.0) % 360.0 - 180.0) <= 15.0
    near = np.hypot(*_grid_points(raster, np.array([best.x, best.y]))) <= radius_m
    return float(weights[dtheta][:, near].sum() / weights.sum())


def _peaks(total: np.ndarray, thetas: np.ndarray, raster: FieldRaster, spacing: float, top: int) -> list[Pose]:
    flat_total = total.ravel()
    count = min(200 * top, flat_total.size)
    candidates = np.argpartition(flat_total, flat_total.size - count)[flat_total.size - count:]
    poses: list[Pose] = []
    for flat in candidates[np.argsort(flat_total[candidates])[::-1]]:
        k, r, c = np.unravel_index(flat, total.shape)
        x, y = raster.origin[0] + c * raster.grid_m, raster.origin[1] + r * raster.grid_m
        theta = float(thetas[k])
        if any(math.hypot(x - p.x, y - p.y) < 2 * spacing and abs((theta - p.heading_deg + 180) % 360 - 180) < 30 for p in poses):
            continue
        poses.append(Pose(float(x), float(y), theta, float(total[k, r, c])))
        if len(poses) == top:
            break
    return poses
