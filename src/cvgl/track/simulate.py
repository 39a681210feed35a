"""Simulated flights over Longmont: the sequence benchmark's data, evidence and scoring.

A flight (:class:`FlightSpec`) is a ground track — straight line, one turn, a loop, or a survey
lawnmower — flown at a speed of 5–15 m/s with a frame every 1–2 s. Each frame is cut from the
**WV2** scene (June 2014) along the track exactly like :func:`cvgl.data.synthetic.make_queries`
cuts a drone photo (one perspective warp of an ortho patch; nadir or oblique), with per-frame
noise (exposure, contrast, sensor noise, a little blur, the camera yawing a few degrees about the
course), written as a JPEG with the EXIF/XMP a drone writes (pitch, altitude, and the compass
heading ±10° when the flight's heading is "known"), and read back through
:func:`cvgl.preprocess.prepare_query` — the product's own path to heading hypotheses. The reference
is the **WV3** scene (October 2014) tiled like the ``longmont`` benchmark (112 m tiles, 56 m
stride, 0.5 m GSD).

"Ground not in the index": a flight may name a few consecutive frames whose surroundings are cut
out of the reference (every tile centre within :attr:`FlightSpec.hole_m` of them is dropped). A
frame counts as *outside* when no kept tile centre lies within the lattice's covering radius
(``stride / sqrt 2``); per-frame R@1 is scored over the inside frames, and the outside frames'
errors are reported apart.

Evidence per frame is computed as ``cvgl locate`` computes it for a batch: encode every
hypothesis, centre the query view on the flight's own (unlabelled) descriptors
(:func:`cvgl.alignment.fit_alignment` ``"center"``, locate's batch default), score all
kept tiles, keep each tile's best hypothesis (its heading goes into the evidence).
Hypothesis descriptors are the costly part (16 encodes per heading-unknown frame) and are cached
per flight in ``cache`` (an ``.npz`` per flight, keyed by its spec).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cvgl.track.decode import Track
from cvgl.track.evidence import Fix, FrameEvidence, TileStates

TILE_M, STRIDE_M, GSD_M = 112.0, 56.0, 0.5  # the longmont benchmark's tiling
PHOTO_HW = (240, 320)
COVER_M = STRIDE_M / math.sqrt(2.0) + 1.0  # a point of the full lattice is within this of a tile centre
R_AT_1_M = 50.0  # per-frame R@1: the answer within this many metres of the true ground centre
SHAPES = ("line", "turn", "loop", "survey")


@dataclass(frozen=True)
class FlightSpec:
    name: str
    shape: str = "line"
    speed_mps: float = 10.0
    interval_s: float = 1.5
    frames: int = 30
    pitch_deg: float = 0.0
    heading_known: bool = False
    heading_noise_deg: float = 10.0  # compass error when known
    yaw_jitter_deg: float = 5.0  # the camera yawing about the course, per frame
    hfov_deg: float = 70.0
    footprint_m: float = 112.0  # ground width of the photo's short side at nadir
    outside_frames: int = 0  # consecutive frames over ground cut out of the index
    hole_m: float = 70.0
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.name.replace(' ', '_')}-{hashlib.sha1(blob).hexdigest()[:10]}"


@dataclass
class Flight:
    """The truth of a simulated flight (ground centres of the frames, in the scene's CRS)."""

    spec: FlightSpec
    times_s: np.ndarray  # [T]
    xy: np.ndarray  # [T, 2] ground centre of each frame
    yaw_deg: np.ndarray  # [T] camera heading
    outside_block: np.ndarray  # [T] bool: frames whose surroundings were cut out of the index


@dataclass
class FlightEvidence:
    flight: Flight
    frames: list[FrameEvidence]
    states: TileStates  # the kept tiles
    inside: np.ndarray  # [T] bool: the frame's ground is covered by the kept tiles
    evidence_s_per_frame: float  # prepare + encode + score, per frame (cached: as measured then)


def suite(seed: int = 0) -> list[FlightSpec]:
    """The benchmark's flights: every shape, 5-15 m/s, 1-2 s, nadir and oblique, heading known
    and unknown, three of them crossing ground that is not in the index."""
    s = seed * 1000
    return [
        FlightSpec("line nadir known", "line", 10.0, 1.5, 36, heading_known=True, seed=s + 1),
        FlightSpec("line nadir unknown", "line", 12.0, 1.0, 40, seed=s + 2),
        FlightSpec("turn nadir unknown", "turn", 8.0, 2.0, 36, seed=s + 3),
        FlightSpec("loop nadir unknown", "loop", 6.0, 1.5, 44, seed=s + 4),
        FlightSpec("survey nadir unknown, gap", "survey", 10.0, 1.0, 60, outside_frames=5, seed=s + 5),
        FlightSpec("line nadir unknown, gap", "line", 15.0, 2.0, 24, outside_frames=3, seed=s + 6),
        FlightSpec("turn oblique known", "turn", 10.0, 1.5, 36, pitch_deg=30.0, heading_known=True,
                   hfov_deg=50.0, footprint_m=80.0, seed=s + 7),
        FlightSpec("loop oblique unknown", "loop", 12.0, 1.5, 40, pitch_deg=30.0, hfov_deg=50.0, footprint_m=80.0,
                   seed=s + 8),
        FlightSpec("survey oblique known, gap", "survey", 8.0, 1.5, 44, pitch_deg=45.0, heading_known=True,
                   hfov_deg=50.0, footprint_m=80.0, outside_frames=4, seed=s + 9),
        FlightSpec("turn nadir unknown, fast", "turn", 15.0, 1.0, 40, seed=s + 10),
    ]


# --------------------------------------------------------------------------- ground tracks


def _curvature(shape: str, length: float, rng: np.random.Generator):
    """Curvature (1/m, positive = left) as a function of arc length for a ``shape``."""
    side = rng.choice([-1.0, 1.0])
    if shape == "line":
        return lambda s: np.zeros_like(s)
    if shape == "turn":
        radius, angle = rng.uniform(50.0, 90.0), math.radians(rng.uniform(70.0, 120.0))
        start = length * rng.uniform(0.3, 0.5)
        end = start + radius * angle
        return lambda s: np.where((s >= start) & (s < end), side / radius, 0.0)
    if shape == "loop":
        radius = float(np.clip(length / (2 * math.pi) * rng.uniform(0.8, 1.0), 60.0, 220.0))
        return lambda s: np.full_like(s, side / radius)
    if shape == "survey":
        leg, turn_r = rng.uniform(220.0, 320.0), rng.uniform(35.0, 50.0)
        half = math.pi * turn_r
        period = leg + half

        def kappa(s: np.ndarray) -> np.ndarray:
            k = np.floor(s / period)
            in_turn = (s - k * period) >= leg
            return np.where(in_turn, side * np.where(k % 2 == 0, 1.0, -1.0) / turn_r, 0.0)

        return kappa
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _track(shape: str, length: float, rng: np.random.Generator, step_m: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(arc lengths, [S, 2] points) of a ground track starting at the origin heading north."""
    s = np.arange(0.0, length + step_m, step_m)
    heading = np.concatenate([[0.0], np.cumsum(_curvature(shape, length, rng)(s[:-1]) * step_m)])
    # heading is counter-clockwise from north; east = -sin, north = cos
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(np.stack([-np.sin(heading[:-1]), np.cos(heading[:-1])], 1) * step_m, 0)])
    return s, xy


def make_flight(spec: FlightSpec, bounds: tuple[float, float, float, float], margin_m: float) -> Flight:
    """Lay a flight's ground track inside ``bounds`` (minus ``margin_m``) at a random rotation."""
    rng = np.random.default_rng(spec.seed)
    left, bottom, right, top = bounds
    box = np.array([[left + margin_m, bottom + margin_m], [right - margin_m, top - margin_m]])
    frames = spec.frames
    while frames >= 2:
        # Speed varies a little along the flight (a few %), smoothly.
        dts = np.full(frames - 1, spec.interval_s)
        speeds = spec.speed_mps * (1.0 + 0.05 * np.sin(np.linspace(0, rng.uniform(1, 4), frames - 1) + rng.uniform(0, 6)))
        arc = np.concatenate([[0.0], np.cumsum(speeds * dts)])
        s, pts = _track(spec.shape, float(arc[-1]), rng)
        xy0 = np.stack([np.interp(arc, s, pts[:, 0]), np.interp(arc, s, pts[:, 1])], 1)
        for _ in range(300):
            angle = rng.uniform(0, 2 * math.pi)
            rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            xy = xy0 @ rot.T
            lo, hi = xy.min(0), xy.max(0)
            slack = (box[1] - box[0]) - (hi - lo)
            if np.all(slack >= 0):
                xy = xy - lo + box[0] + rng.random(2) * slack
                course = np.degrees(np.arctan2(*np.gradient(xy, axis=0).T)) % 360.0
                yaw = (course + rng.uniform(-spec.yaw_jitter_deg, spec.yaw_jitter_deg, frames)) % 360.0
                times = np.concatenate([[0.0], np.cumsum(dts)])
                block = np.zeros(frames, dtype=bool)
                if spec.outside_frames:
                    start = int(rng.integers(frames // 3, max(frames // 3 + 1, 2 * frames // 3 - spec.outside_frames)))
                    block[start:start + spec.outside_frames] = True
                return Flight(spec, times, xy, yaw, block)
        frames = int(frames * 0.9)
    raise ValueError(f"flight {spec.name!r} does not fit in the scene")


# --------------------------------------------------------------------------- frames and evidence


def _frame_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-frame camera noise: exposure and contrast drift, sensor noise, slight blur."""
    import cv2

    x = image.astype(np.float32) / 255.0
    blur = rng.uniform(0.0, 1.2)
    if blur > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), blur)
    x = x ** rng.uniform(0.85, 1.15)
    x = (x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05)
    x = x + rng.normal(0.0, 0.02, size=x.shape)
    return (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def render_frames(flight: Flight, raster: Path, folder: Path) -> list[Path]:
    """Cut every frame from ``raster`` (WV2) and write it as a drone JPEG; returns the paths."""
    from cvgl.data.geometry import required_patch_side, simulate_drone_view
    from cvgl.data.raster import raster_info, read_region
    from cvgl.data.synthetic import SyntheticQuery, write_query_photo
    from cvgl.geo import offset_latlon, to_latlon

    spec = flight.spec
    rng = np.random.default_rng(spec.seed + 7_000_000)
    crs = raster_info(raster).crs
    scale = rng.uniform(0.9, 1.1)  # the flight's altitude relative to the nominal footprint
    paths = []
    photo_h, photo_w = PHOTO_HW
    for i, ((cx, cy), yaw) in enumerate(zip(flight.xy, flight.yaw_deg)):
        photo_gsd = spec.footprint_m * scale * rng.uniform(0.97, 1.03) / photo_h
        need_px = required_patch_side(PHOTO_HW, spec.pitch_deg, spec.hfov_deg, float(yaw)) + 4
        patch = read_region(raster, float(cx), float(cy), size_m=need_px * photo_gsd, gsd_m=photo_gsd)
        image = _frame_noise(simulate_drone_view(patch, float(yaw), spec.pitch_deg, spec.hfov_deg, PHOTO_HW), rng)
        slant = photo_gsd * photo_w / (2 * math.tan(math.radians(spec.hfov_deg) / 2))
        altitude = slant * math.cos(math.radians(spec.pitch_deg))
        ahead = altitude * math.tan(math.radians(spec.pitch_deg))
        clat, clon = to_latlon(crs, float(cx), float(cy))
        cam_lat, cam_lon = offset_latlon(clat, clon, -ahead * math.sin(math.radians(yaw)), -ahead * math.cos(math.radians(yaw)))
        written = None
        if spec.heading_known:
            written = float((yaw + rng.uniform(-spec.heading_noise_deg, spec.heading_noise_deg)) % 360.0)
        query = SyntheticQuery(
            name=f"frame_{i:04d}", image=image, center_lat=float(clat), center_lon=float(clon),
            camera_lat=float(cam_lat), camera_lon=float(cam_lon), yaw_deg=float(yaw), pitch_deg=spec.pitch_deg,
            altitude_m=altitude, family=spec.name, heading_written=written, hfov_deg=spec.hfov_deg,
        )
        paths.append(write_query_photo(query, folder))
    return paths


@dataclass
class Reference:
    """The WV3 reference tiles: centres (metres, the scene's CRS) and descriptors."""

    xy: np.ndarray  # [N, 2]
    desc: np.ndarray  # [N, D]
    crs: str
    bounds: tuple[float, float, float, float]

    @classmethod
    def build(cls, encoder, cache: Path | None = None) -> Reference:
        from cvgl.data.raster import raster_info
        from cvgl.data.samples import longmont_scene
        from cvgl.data.tiling import TilingSpec, iter_tiles

        scene = longmont_scene("wv3")
        path = Path(cache) / f"reference-{_encoder_tag(encoder)}.npz" if cache else None
        info = raster_info(longmont_scene("wv2"))
        if path is not None and path.is_file():
            data = np.load(path)
            return cls(data["xy"], data["desc"], str(info.crs), tuple(info.bounds))
        tiles = list(iter_tiles(scene, TilingSpec(TILE_M, STRIDE_M, GSD_M)))
        xy = np.array([[t.x, t.y] for t in tiles])
        desc = encoder.encode([t.image for t in tiles])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, xy=xy, desc=desc)
        return cls(xy, desc, str(info.crs), tuple(info.bounds))


def _encoder_tag(encoder) -> str:
    identity = getattr(encoder, "identity", {}) or {}
    blob = json.dumps(identity if isinstance(identity, dict) else str(identity), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def margin(spec: FlightSpec) -> float:
    from cvgl.data.geometry import required_patch_side

    gsd = spec.footprint_m * 1.1 * 1.03 / PHOTO_HW[0]
    return (required_patch_side(PHOTO_HW, spec.pitch_deg, spec.hfov_deg, None) + 6) * gsd / 2


def encode_flight(flight: Flight, encoder, cache: Path | None = None) -> dict:
    """Every frame's hypothesis descriptors and headings, as ``cvgl locate`` prepares them (cached)."""
    from cvgl.data.samples import longmont_scene
    from cvgl.preprocess import QueryOptions, prepare_query

    path = Path(cache) / f"flight-{flight.spec.key()}-{_encoder_tag(encoder)}.npz" if cache else None
    if path is not None and path.is_file():
        data = np.load(path)
        return {k: data[k] for k in data.files}
    started = time.perf_counter()
    descs, headings, owner, known = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, photo in enumerate(render_frames(flight, longmont_scene("wv2"), Path(tmp))):
            query = prepare_query(photo, QueryOptions(), TILE_M, GSD_M)
            descs.append(encoder.encode([h.image for h in query.hypotheses]))
            headings += [h.heading_deg for h in query.hypotheses]
            owner += [i] * len(query.hypotheses)
            known.append(query.heading_source != "search")
    out = {
        "desc": np.concatenate(descs).astype(np.float32),
        "heading": np.array(headings, dtype=np.float64),
        "owner": np.array(owner, dtype=np.int64),
        "known": np.array(known, dtype=bool),
        "seconds": np.array(time.perf_counter() - started),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


def flight_odometry(flight: Flight, cache: Path | None = None) -> dict:
    """Visual odometry between consecutive frames as ``cvgl locate`` prepares them (cached).

    Registered images: the hypothesis at angle 0 of a heading search (camera orientation), or
    the north-up view of a known heading — both at the index GSD. Arrays over frames (frame 0
    has none): ``dx``, ``dy``, ``turn``, ``inliers``, ``ok``, ``north_up``.
    """
    from cvgl.data.samples import longmont_scene
    from cvgl.preprocess import QueryOptions, prepare_query
    from cvgl.track.odometry import measure_odometry

    path = Path(cache) / f"odometry-{flight.spec.key()}.npz" if cache else None
    if path is not None and path.is_file():
        data = np.load(path)
        return {k: data[k] for k in data.files}
    count = len(flight.times_s)
    out = {"dx": np.zeros(count), "dy": np.zeros(count), "turn": np.zeros(count), "inliers": np.zeros(count, dtype=np.int64),
           "ok": np.zeros(count, dtype=bool), "north_up": np.zeros(count, dtype=bool), "seconds": np.zeros(count)}
    previous = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, photo in enumerate(render_frames(flight, longmont_scene("wv2"), Path(tmp))):
            query = prepare_query(photo, QueryOptions(), TILE_M, GSD_M)
            image = query.hypotheses[0].image
            out["north_up"][i] = query.heading_source != "search"
            if previous is not None:
                started = time.perf_counter()
                odo = measure_odometry(previous, image, GSD_M)
                out["seconds"][i] = time.perf_counter() - started
                if odo is not None:
                    out["dx"][i], out["dy"][i], out["turn"][i] = odo.dx_m, odo.dy_m, odo.turn_deg
                    out["inliers"][i], out["ok"][i] = odo.inliers, True
            previous = image
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


def flight_evidence(flight: Flight, encoded: dict, reference: Reference,
                    fix_rate: float = 0.0, fix_sigma_m: float = 3.0, wrong_fix_rate: float = 0.0,
                    odometry: dict | None = None) -> FlightEvidence:
    """Per-frame evidence over the kept tiles (the hole removed), as ``cvgl locate`` scores a batch.

    ``odometry``: :func:`flight_odometry`'s arrays, attached to the frames they end at.
    ``fix_rate`` > 0 adds *simulated* verified fixes (truth + Gaussian noise of ``fix_sigma_m``) to
    that fraction of the inside frames, ``wrong_fix_rate`` of them placed 100-300 m off: a stand-in
    for a geometric stage, to exercise the decoders' fix path — not a measurement of one.
    """
    from cvgl.alignment import fit_alignment

    keep = np.ones(len(reference.xy), dtype=bool)
    if flight.outside_block.any():
        d = np.linalg.norm(reference.xy[:, None, :] - flight.xy[flight.outside_block][None], axis=2)
        keep = d.min(1) > flight.spec.hole_m
    states = TileStates(reference.xy[keep], STRIDE_M, reference.crs)
    ref = reference.desc[keep]
    started = time.perf_counter()
    alignment = fit_alignment("center", ref, queries=encoded["desc"])
    sims = alignment.apply(encoded["desc"], "query") @ alignment.apply(ref, "reference").T  # [H_total, N]
    owner = encoded["owner"]
    nearest = states.tree.query(flight.xy)[0]
    inside = nearest <= COVER_M
    rng = np.random.default_rng(flight.spec.seed + 9_000_000)
    frames = []
    for t in range(len(flight.times_s)):
        rows = np.flatnonzero(owner == t)
        block = sims[rows]
        best = block.argmax(0)
        fix = None
        if fix_rate > 0 and inside[t] and rng.random() < fix_rate:
            if rng.random() < wrong_fix_rate:
                angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(100.0, 300.0)
                fx, fy = flight.xy[t] + dist * np.array([math.sin(angle), math.cos(angle)])
            else:
                fx, fy = flight.xy[t] + rng.normal(0.0, fix_sigma_m, 2)
            fix = Fix(float(fx), float(fy), fix_sigma_m)
        frames.append(FrameEvidence(
            time_s=float(flight.times_s[t]),
            scores=block.max(0).astype(np.float64),
            heading_deg=encoded["heading"][rows][best],
            heading_source="metadata" if encoded["known"][t] else "search",
            fix=fix,
            name=f"frame_{t:04d}",
            hypothesis_scores=block.astype(np.float64),
            hypothesis_headings=encoded["heading"][rows],
            odometry=_odometry_at(odometry, t),
        ))
    score_s = time.perf_counter() - started
    per_frame = (float(encoded["seconds"]) + score_s) / len(frames)
    return FlightEvidence(flight, frames, states, inside, per_frame)


def _odometry_at(odometry: dict | None, t: int):
    from cvgl.track.odometry import Odometry

    if odometry is None or t == 0 or not odometry["ok"][t]:
        return None
    north_up = bool(odometry["north_up"][t - 1])
    return Odometry(float(odometry["dx"][t]), float(odometry["dy"][t]), float(odometry["turn"][t]),
                    image_heading_deg=0.0 if north_up else None, inliers=int(odometry["inliers"][t]))


def prepare_flights(specs: list[FlightSpec], encoder, cache: Path | None = None, log=print) -> tuple[Reference, list[tuple[Flight, dict]]]:
    """The reference and every flight's encoded frames (from the cache when there)."""
    reference = Reference.build(encoder, cache)
    out = []
    for spec in specs:
        flight = make_flight(spec, reference.bounds, margin(spec))
        started = time.perf_counter()
        encoded = encode_flight(flight, encoder, cache)
        log(f"{spec.name}: {len(flight.times_s)} frames, {time.perf_counter() - started:.0f} s")
        out.append((flight, encoded))
    return reference, out


# --------------------------------------------------------------------------- scoring


@dataclass
class TrackScore:
    method: str
    flight: str
    frames: int
    inside: int
    r_at_1: float  # share of inside frames within R_AT_1_M
    median_m: float  # over inside frames
    outside_median_m: float | None  # over outside frames (None when the flight has none)
    heading_ok: float | None  # share of inside frames with the camera heading within 22.5 degrees
    length_ratio: float  # estimated track length / true track length
    tracked_inside: float  # share of inside frames with status "tracked"
    flagged_outside: float | None  # share of outside frames not "tracked" (coasting or lost)
    decode_s_per_frame: float
    extra: dict = field(default_factory=dict)


def _angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((a - b + 180.0) % 360.0 - 180.0)


def score_track(track: Track, evidence: FlightEvidence) -> TrackScore:
    flight = evidence.flight
    err = np.linalg.norm(track.xy - flight.xy, axis=1)
    inside = evidence.inside
    out = ~inside
    headings = np.array([np.nan if p.heading_deg is None else p.heading_deg for p in track.points])
    ok = _angle_diff(headings, flight.yaw_deg) <= 22.5
    length = lambda xy: float(np.linalg.norm(np.diff(xy, axis=0), axis=1).sum())
    status = np.array([p.status for p in track.points])
    return TrackScore(
        method=track.method,
        flight=flight.spec.name,
        frames=len(err),
        inside=int(inside.sum()),
        r_at_1=float((err[inside] <= R_AT_1_M).mean()) if inside.any() else float("nan"),
        median_m=float(np.median(err[inside])) if inside.any() else float("nan"),
        outside_median_m=float(np.median(err[out])) if out.any() else None,
        heading_ok=float(ok[inside].mean()) if np.isfinite(headings).any() else None,
        length_ratio=length(track.xy) / max(length(flight.xy), 1e-9),
        tracked_inside=float((status[inside] == "tracked").mean()) if inside.any() else float("nan"),
        flagged_outside=float((status[out] != "tracked").mean()) if out.any() else None,
        decode_s_per_frame=track.decode_s / len(err),
    )
