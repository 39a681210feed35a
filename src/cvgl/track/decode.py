"""From per-frame evidence to a trajectory: one entry point over the decoders, one output type.

``decode(states, frames, options, method, causal)`` runs

* ``"independent"`` — every frame alone, by ``cvgl locate``'s own rule (softmax-weighted mean of
  the tiles within the radius of the best one; the baseline a sequence decoder must beat);
* ``"hmm"`` — the exact HMM (:mod:`cvgl.track.hmm`) over tiles, or over (tile, heading) pairs when
  every frame searched the same heading grid (:mod:`cvgl.track.heading`); transitions follow the
  frames' visual odometry where they carry it, else the speed bound. Offline, the Viterbi path
  chooses each frame's state and the forward-backward marginals refine the position and give the
  confidence; ``causal=True`` uses the forward filter only (frame *t* sees frames ``0..t``);
* ``"particle"`` — the continuous particle filter/smoother (:mod:`cvgl.track.particles`); offline
  with odometry, frame 0's prior comes from the rigid-shape search;
* ``"shape"`` — each odometry-chained segment placed where it fits the map best as a rigid shape
  (:mod:`cvgl.track.shape`), re-anchored in windows against drift; ``causal=True`` places frame *t*
  by the best pose of the last 20 chained frames ending at *t*. Frames outside any segment of
  three frames take the HMM's answer (smoother or filter).

Every method answers a :class:`TrackPoint` per frame:

* ``x, y`` — the frame's ground centre (metres, the states' CRS): the posterior-weighted mean of
  the tiles (particles) within ``radius_m`` of the decoded tile (mode); a verified fix replaces it
  when the track agrees with the fix (its outlier share under the posterior is below one half and
  it lies within the radius);
* ``confidence`` — the posterior mass within ``radius_m`` of that position;
* ``status`` — ``"tracked"`` (the frame's own evidence supports the position), ``"coasting"``
  (the posterior says the frame's retrieval is an outlier — a bad frame, a lookalike — or, for the
  continuous decoders, the position lies off the reference tiles: ground not in the index; the
  position then comes from the motion model, the odometry and the neighbours), ``"lost"``
  (confidence below ``lost_below``: the posterior is spread over several places);
* ``heading_deg`` — the camera heading: the winning hypothesis at the decoded tile (or the known
  heading), as ``cvgl locate`` reports it; ``course_deg``/``speed_mps`` — direction and speed of
  travel from the trajectory itself (a central difference over two frames each side; causal: the
  last frames only), None while the track barely moves.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cvgl.track.evidence import (
    EmissionModel,
    FrameEvidence,
    TileStates,
    emission_loglik,
    fix_loglik,
    outlier_share,
)
from cvgl.track.heading import (
    HeadingModel,
    heading_grid,
    heading_kernel,
    odometry_transition,
    product_loglik,
    product_outlier_share,
    product_transition,
)
from cvgl.track.hmm import forward_backward, forward_filter, viterbi
from cvgl.track.motion import MotionModel, Transition, TransitionCache
from cvgl.track.particles import EvidenceField, ParticleOptions, run_particles
from cvgl.track.shape import shape_search, shape_track, shape_track_causal

METHODS = ("independent", "hmm", "particle", "shape")
STATUSES = ("tracked", "coasting", "lost")
LOCATE_TEMPERATURE = 0.02  # cvgl locate's softmax temperature (LocateOptions.temperature)
COURSE_SPAN = 2  # frames each side for the course / speed difference
MIN_COURSE_MOVE_M = 5.0  # below this displacement the course is undefined


@dataclass(frozen=True)
class TrackOptions:
    emission: EmissionModel = field(default_factory=EmissionModel)
    motion: MotionModel = field(default_factory=MotionModel)
    particles: ParticleOptions = field(default_factory=ParticleOptions)
    heading: HeadingModel = field(default_factory=HeadingModel)
    heading_states: bool = True  # HMM over (tile, heading) when every frame searched the same heading grid
    use_odometry: bool = True  # follow the frames' visual odometry where they carry it
    shape_search: bool = True  # offline particles: seed frame 0 from the rigid-shape search (cvgl.track.shape)
    radius_m: float | None = None  # confidence radius; None: the tile half-diagonal (spacing * sqrt 2)
    lost_below: float = 0.3  # confidence under which a frame is "lost"
    coast_above: float = 0.5  # retrieval outlier share above which a frame is "coasting"
    independent_temperature: float = LOCATE_TEMPERATURE

    def radius(self, states: TileStates) -> float:
        return self.radius_m if self.radius_m is not None else states.spacing_m * math.sqrt(2.0) + 1e-6


@dataclass
class TrackPoint:
    time_s: float
    x: float
    y: float
    confidence: float
    status: str
    outlier_prob: float  # posterior share of the frame's retrieval evidence that is an outlier
    tile: int  # the decoded tile (independent: best; HMM: Viterbi / filter argmax; particles: nearest)
    heading_deg: float | None = None
    heading_source: str = ""
    course_deg: float | None = None
    speed_mps: float | None = None
    fix_used: bool = False
    name: str = ""


@dataclass
class Track:
    method: str  # e.g. "hmm", "hmm-causal", "particle", "particle-causal", "independent"
    points: list[TrackPoint]
    decode_s: float  # wall time of the decode itself (evidence not included)
    crs: str | None = None

    @property
    def xy(self) -> np.ndarray:
        return np.array([[p.x, p.y] for p in self.points], dtype=np.float64).reshape(-1, 2)

    def records(self) -> list[dict]:
        return [asdict(p) for p in self.points]

    def geojson(self) -> dict:
        """The trajectory as a GeoJSON Feature (LineString, lon/lat) with per-frame properties."""
        from cvgl.geo import to_latlon

        if self.crs is None:
            raise ValueError("the track's CRS is unknown: build TileStates with crs= to export GeoJSON")
        lat, lon = to_latlon(self.crs, self.xy[:, 0], self.xy[:, 1])
        coords = [[float(a), float(b)] for a, b in zip(np.atleast_1d(lon), np.atleast_1d(lat))]
        return {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": coords},
            "properties": {
                "method": self.method,
                "times_s": [p.time_s for p in self.points],
                "confidence": [p.confidence for p in self.points],
                "status": [p.status for p in self.points],
            },
        }


def decode(states: TileStates, frames: list[FrameEvidence], options: TrackOptions = TrackOptions(),
           method: str = "hmm", causal: bool = False) -> Track:
    """Decode a flight (frames in time order) with ``method`` (module doc)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not frames:
        raise ValueError("no frames to decode")
    times = np.array([f.time_s for f in frames], dtype=np.float64)
    if np.any(np.diff(times) < 0):
        raise ValueError("frames must be in time order")
    started = time.perf_counter()
    if method == "independent":
        points = _independent(states, frames, options)
        name = "independent"
    elif method == "hmm":
        points = _hmm(states, frames, options, causal)
        name = "hmm-causal" if causal else "hmm"
    elif method == "particle":
        points = _particle(states, frames, options, causal)
        name = "particle-causal" if causal else "particle"
    else:
        points = _shape(states, frames, options, causal)
        name = "shape-causal" if causal else "shape"
    if method != "independent":
        _add_course(points, causal)
    return Track(name, points, time.perf_counter() - started, states.crs)


# --------------------------------------------------------------------------- helpers


def _near(states: TileStates, centre: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(states.tree.query_ball_point(centre, radius), dtype=np.int64)


def _region_mean(states: TileStates, weights: np.ndarray, tile: int, radius: float) -> tuple[np.ndarray, float]:
    """(weighted mean of the tile centres within ``radius`` of ``tile``, mass within ``radius`` of it)."""
    near = _near(states, states.xy[tile], radius)
    w = weights[near]
    if not w.sum() > 0:
        position = states.xy[tile]
    else:
        position = (w[:, None] * states.xy[near]).sum(0) / w.sum()
    return position, float(weights[_near(states, position, radius)].sum())


def _status(confidence: float, outlier: float, options: TrackOptions, off_index: bool = False) -> str:
    if confidence < options.lost_below:
        return "lost"
    return "coasting" if off_index or outlier > options.coast_above else "tracked"


def _off_index(states: TileStates, position: np.ndarray) -> bool:
    """The position lies where no reference tile is (farther than the lattice's covering radius)."""
    return bool(states.tree.query(position)[0] > states.spacing_m / math.sqrt(2.0) + 1.0)


def _heading(frame: FrameEvidence, tile: int) -> tuple[float | None, str]:
    value = frame.heading_at(tile)
    return value, (frame.heading_source or "evidence") if value is not None else ""


def _add_course(points: list[TrackPoint], causal: bool) -> None:
    xy = np.array([[p.x, p.y] for p in points])
    times = np.array([p.time_s for p in points])
    last = len(points) - 1
    for t, point in enumerate(points):
        a, b = max(0, t - COURSE_SPAN), (t if causal else min(last, t + COURSE_SPAN))
        move = xy[b] - xy[a]
        span = times[b] - times[a]
        if b > a and span > 0 and math.hypot(*move) >= MIN_COURSE_MOVE_M:
            point.course_deg = math.degrees(math.atan2(move[0], move[1])) % 360.0
            point.speed_mps = float(math.hypot(*move) / span)


def _fix_share(states: TileStates, frame: FrameEvidence, weights: np.ndarray, model: EmissionModel) -> float:
    """Posterior share of the fix's outlier component (1 when there is no fix)."""
    if frame.fix is None:
        return 1.0
    eps = model.fix_outlier_prob
    if eps == 0.0:
        return 0.0
    return float((weights * (eps / np.exp(fix_loglik(states, frame.fix, model)))).sum())


# --------------------------------------------------------------------------- decoders


def _independent(states: TileStates, frames: list[FrameEvidence], options: TrackOptions) -> list[TrackPoint]:
    """``cvgl locate``'s per-photo answer (``locate.answer``) in metric coordinates."""
    radius = options.radius(states)
    points = []
    for frame in frames:
        scores = np.asarray(frame.scores, dtype=np.float64)
        finite = np.isfinite(scores)
        if not finite.any():
            raise ValueError(f"frame {frame.name or frame.time_s}: no tile was scored")
        z = np.where(finite, (scores - scores[finite].max()) / options.independent_temperature, -np.inf)
        weights = np.exp(z)
        weights /= weights.sum()
        best = int(np.argmax(np.where(finite, scores, -np.inf)))
        near = _near(states, states.xy[best], radius)
        w = weights[near]
        position = (w[:, None] * states.xy[near]).sum(0) / w.sum()
        confidence = float(w.sum())
        heading, source = _heading(frame, best)
        points.append(TrackPoint(frame.time_s, float(position[0]), float(position[1]), confidence,
                                 "lost" if confidence < options.lost_below else "tracked", 0.0, best,
                                 heading, source, name=frame.name))
    return points


def _hmm(states: TileStates, frames: list[FrameEvidence], options: TrackOptions, causal: bool) -> list[TrackPoint]:
    radius = options.radius(states)
    times = np.array([f.time_s for f in frames])
    tile_transitions = TransitionCache(states, options.motion).for_intervals(np.diff(times))
    grid = heading_grid(frames) if options.heading_states else None
    dts = np.diff(times)
    if grid is None:
        log_e = np.stack([emission_loglik(states, f, options.emission) for f in frames])
        transitions = list(tile_transitions)
    else:
        # (tile, heading) pairs; a fix constrains the tile whatever the heading.
        log_e = np.stack([product_loglik(f, options.emission) + (
            np.repeat(fix_loglik(states, f.fix, options.emission), len(grid)) if f.fix is not None else 0.0)
            for f in frames])
        products: dict[tuple[int, float], Transition] = {}
        transitions = []
        for tr, dt in zip(tile_transitions, dts):
            key = (id(tr), round(float(dt), 2))
            if key not in products:
                products[key] = product_transition(tr, heading_kernel(grid, float(dt), options.heading))
            transitions.append(products[key])
    if options.use_odometry:
        for t, frame in enumerate(frames[1:]):
            odo = frame.odometry
            if odo is not None and (grid is not None or odo.image_heading_deg is not None):
                transitions[t] = odometry_transition(states, grid, odo, options.motion, float(dts[t]), options.heading)
    if causal:
        joint = forward_filter(log_e, transitions).filtered
        best = joint.argmax(1)
    else:
        best, _ = viterbi(log_e, transitions)
        joint = forward_backward(log_e, transitions).smoothed
    h = 1 if grid is None else len(grid)
    post = joint.reshape(len(frames), len(states), h).sum(2) if h > 1 else joint
    tiles = np.asarray(best) // h
    points = []
    for t, frame in enumerate(frames):
        weights, tile = post[t], int(tiles[t])
        position, confidence = _region_mean(states, weights, tile, radius)
        fix_used = False
        if frame.fix is not None and _fix_share(states, frame, weights, options.emission) < 0.5:
            fix_xy = np.array([frame.fix.x, frame.fix.y])
            if np.hypot(*(fix_xy - position)) <= radius:
                position, fix_used = fix_xy, True
                confidence = float(weights[_near(states, position, radius)].sum())
        if grid is None:
            outlier = outlier_share(np.asarray(frame.scores), weights, options.emission)
            heading, source = _heading(frame, tile)
        else:  # the heading is part of the decoded state
            outlier = product_outlier_share(frame, joint[t], options.emission)
            heading, source = float(grid[int(best[t]) % h]) % 360.0, "sequence"
        points.append(TrackPoint(frame.time_s, float(position[0]), float(position[1]), confidence,
                                 _status(confidence, outlier, options), outlier, tile, heading, source,
                                 fix_used=fix_used, name=frame.name))
    return points


def _particle_mode(pos: np.ndarray, w: np.ndarray, cell: float, radius: float) -> np.ndarray:
    """The centre of the heaviest region of a weighted particle cloud (grid bin + mean shift)."""
    keys = np.floor(pos / cell).astype(np.int64)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    mass = np.bincount(inverse, weights=w)
    heavy = inverse == int(np.argmax(mass))
    centre = (w[heavy, None] * pos[heavy]).sum(0) / w[heavy].sum()
    for _ in range(5):
        inside = np.hypot(*(pos - centre).T) <= radius
        if not w[inside].sum() > 0:
            break
        new = (w[inside, None] * pos[inside]).sum(0) / w[inside].sum()
        if np.hypot(*(new - centre)) < 0.01:
            centre = new
            break
        centre = new
    return centre


def _particle(states: TileStates, frames: list[FrameEvidence], options: TrackOptions, causal: bool) -> list[TrackPoint]:
    radius = options.radius(states)
    poses = None
    if not causal and options.use_odometry and options.shape_search:
        poses = shape_search(states, frames, options.emission)
    run = run_particles(states, frames, options.emission, options.motion.max_speed_mps, options.particles,
                        smooth=not causal, use_odometry=options.use_odometry, init_poses=poses)
    log_w = run.log_w if causal else run.log_w_smooth
    points = []
    for t, frame in enumerate(frames):
        w = np.exp(log_w[t])
        pos = run.pos[t]
        centre = _particle_mode(pos, w, states.spacing_m, radius)
        inside = np.hypot(*(pos - centre).T) <= radius
        confidence = float(w[inside].sum())
        outlier = float((w * np.exp(np.minimum(run.outlier_logw[t], 0.0))).sum())
        tile = int(states.tree.query(centre)[1])
        if run.heading_search:  # the particles carry the camera heading: their circular mean near the mode
            angle = np.radians(run.yaw[t][inside])
            heading = float(np.degrees(np.arctan2((w[inside] * np.sin(angle)).sum(), (w[inside] * np.cos(angle)).sum())) % 360.0)
            source = "sequence"
        else:
            heading, source = _heading(frame, tile)
        fix_used = frame.fix is not None and np.hypot(frame.fix.x - centre[0], frame.fix.y - centre[1]) <= 3 * frame.fix.radius_m
        points.append(TrackPoint(frame.time_s, float(centre[0]), float(centre[1]), confidence,
                                 _status(confidence, outlier, options, _off_index(states, centre)), outlier, tile,
                                 heading, source, fix_used=bool(fix_used), name=frame.name))
    return points


def _shape(states: TileStates, frames: list[FrameEvidence], options: TrackOptions, causal: bool) -> list[TrackPoint]:
    """Rigid-shape decode (:func:`cvgl.track.shape.shape_track`, or its sliding-window online form);
    frames it cannot place (fewer than three odometry-chained frames) take the HMM's answer."""
    radius = options.radius(states)
    placed = (shape_track_causal if causal else shape_track)(states, frames, options.emission, radius)
    fallback = _hmm(states, frames, options, causal=causal) if (placed.segment < 0).any() else None
    points = []
    for t, frame in enumerate(frames):
        if placed.segment[t] < 0:
            points.append(fallback[t])
            continue
        x, y = placed.xy[t]
        tile = int(states.tree.query(placed.xy[t])[1])
        field = EvidenceField(states, frame, options.emission)
        yaw = placed.heading_deg[t] if np.isfinite(placed.heading_deg[t]) else 0.0
        retrieval = float(field.retrieval(placed.xy[t][None], np.array([yaw]))[0])
        outlier = float(np.exp(min(field.floor - retrieval, 0.0))) if np.isfinite(field.floor) else 0.0
        if np.isfinite(placed.heading_deg[t]):
            heading, source = float(placed.heading_deg[t]), "sequence"
        else:
            heading, source = _heading(frame, tile)
        confidence = float(placed.confidence[t])
        points.append(TrackPoint(frame.time_s, float(x), float(y), confidence,
                                 _status(confidence, outlier, options, _off_index(states, placed.xy[t])),
                                 outlier, tile, heading, source, name=frame.name))
    return points
