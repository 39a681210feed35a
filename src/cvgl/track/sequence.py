"""``cvgl track``: the frames of one flight -> one answer per frame and the trajectory.

Orchestration only, stage by stage, reusing what ``cvgl locate`` runs for one photo:

1. **Frames in time order** — stills by EXIF/XMP capture time or natural file name
   (:func:`cvgl.data.frames.order_stills`), or a video sampled at ``fps``
   (:func:`cvgl.data.frames.sample_video`, streamed: one decoded frame in memory at a time).
2. **Per frame, locate's own stages** — :func:`cvgl.preprocess.prepare_query` /
   :func:`~cvgl.preprocess.prepare_image`, the encoder, the index's (or a saved) alignment,
   :func:`cvgl.index.search.hypothesis_score_matrix`, and :func:`cvgl.locate.answer_photo`
   (retrieval answer, verification of the top candidates, calibrated confidence). Nothing is
   fitted on the flight's frames, so a frame's evidence is what ``cvgl locate`` computes for it
   alone. A frame that fails any stage is *skipped* with locate's one-line reason; the others go on.
3. **Evidence for the decoder** (:class:`cvgl.track.FrameEvidence`): the per-tile best score
   and its heading, the score of every heading hypothesis (scales folded by their maximum), a
   verified position as a :class:`~cvgl.track.Fix`, and the visual odometry from the previous
   usable frame (:func:`cvgl.track.measure_odometry` on the hypothesis views at the index GSD).
4. **Joint decode** (:func:`cvgl.track.decode`) with the method asked for — by default ``shape``
   offline and ``particle`` with ``causal`` (the sequence study's recommendation: R@1 1.00 vs
   0.32 for independent answers on heading-unknown simulated flights).
5. **Answers** in the published schema (``answer-1.schema.json``): the frame's own evidence
   (``top_k``, ``verification``, ``truth``) with the track's position (``position_source:
   "track"``), confidence (posterior mass within the index's correct radius, uncalibrated),
   heading (``heading_source: "track"`` when the sequence decided it) and a ``track`` block
   (method, decoder status, time, course, speed). A decoder status ``lost`` is published as
   ``not_found``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cvgl.answer import Answer, Skipped, set_position, truth_of
from cvgl.data.frames import FrameOrder, order_stills, probe_video, sample_video
from cvgl.data.images import photo_paths, photo_problem
from cvgl.data.metadata import CameraMetadata
from cvgl.errors import InputError
from cvgl.geo import from_latlon, offset_latlon, to_latlon
from cvgl.index.search import best_over_hypotheses, hypothesis_score_matrix
from cvgl.index.store import ReferenceIndex
from cvgl.locate import LocateOptions, answer_photo, describe, one_line_reason
from cvgl.models.encoder import Encoder
from cvgl.preprocess import Hypothesis, PreparedQuery, prepare_image, prepare_query
from cvgl.track.decode import METHODS, Track, TrackOptions, TrackPoint, decode
from cvgl.track.evidence import Fix, FrameEvidence, TileStates
from cvgl.track.odometry import measure_odometry

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".ts")
DEFAULT_FPS = 1.0  # video frames per second kept: a drone at 5-15 m/s moves 5-15 m between them
VERIFIED_COVERAGE_SIGMAS = 2.15  # the verified radius covers ~91% (cvgl.verify.refine): ~2.15 sigma in 2-D
POSITION_SOURCE = "track"
HEADING_SOURCE = "track"  # the sequence (heading states, particles, rigid shape) decided the heading
CONFIDENCE_MODEL = "track-posterior (uncalibrated)"


def default_method(causal: bool) -> str:
    """``shape`` offline, ``particle`` in flight (the sequence study, ``cvgl.track.simulate``)."""
    return "particle" if causal else "shape"


@dataclass(frozen=True)
class SequenceOptions:
    locate: LocateOptions = field(default_factory=LocateOptions)
    track: TrackOptions = field(default_factory=TrackOptions)
    method: str | None = None  # None: default_method(causal)
    causal: bool = False
    odometry: bool = True  # measure frame-to-frame visual odometry (the rigid-shape and particle evidence)

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise InputError(f"track method {self.method!r}: choose one of {', '.join(METHODS)}")

    @property
    def decoder(self) -> str:
        return self.method or default_method(self.causal)


@dataclass(frozen=True)
class SequenceFrame:
    """One frame to locate: a still (``path``) or a decoded video frame (``image``)."""

    name: str
    time_s: float
    path: Path | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    problem: str | None = None  # why the file cannot be read (found from its header): the frame is skipped

    def prepare(self, options: LocateOptions, tile_m: float | None, gsd_m: float | None) -> PreparedQuery:
        if self.problem is not None:
            raise InputError(self.problem)
        if self.path is not None:
            return prepare_query(self.path, options.query, tile_m, gsd_m)
        # A video carries no per-frame camera metadata: the command-line flags say what is known.
        return prepare_image(self.image, CameraMetadata(), self.name, options.query, tile_m, gsd_m)


@dataclass
class FrameResult:
    """What one frame's locate stages gave: its answer (or why it was skipped) and its evidence."""

    frame: SequenceFrame
    answer: Answer | Skipped
    evidence: FrameEvidence | None = None
    scores: np.ndarray | None = None  # per-tile best score (for the map's heat layer)
    query: PreparedQuery | None = None  # metadata only (hypothesis pixels dropped)


@dataclass
class SequenceResult:
    frames: list[FrameResult]  # every frame, in time order
    answers: list[dict]  # one published answer per frame (``cvgl.answer/1``), in time order
    track: Track | None  # over the frames that were not skipped; None when none was usable
    order: FrameOrder | None
    states: TileStates
    evidence_s: float  # prepare + encode + score + verify + odometry, all frames
    decode_s: float

    @property
    def independent(self) -> list[dict]:
        """Each frame's answer as ``cvgl locate`` gives it alone (the baseline)."""
        return [f.answer.to_dict() for f in self.frames]

    @property
    def located(self) -> list[dict]:
        return [a for a in self.answers if a["status"] != "skipped"]


# --------------------------------------------------------------------------- frames


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def sequence_source(items: Sequence[Path]) -> tuple[str, list[Path]]:
    """``("video", [file])`` for one video file (by its suffix, :data:`VIDEO_SUFFIXES`), else
    ``("stills", photos)`` (folders expanded). One-line :class:`InputError` for a video mixed with
    photos or more than one video."""
    items = [Path(p) for p in items]
    videos = [p for p in items if is_video(p)]
    if videos:
        if len(items) > 1:
            raise InputError(f"{videos[0]}: give one video, or photos and folders of photos, not both or several videos")
        return "video", videos
    return "stills", photo_paths(items)  # a file that is no photo is skipped with its reason, as by locate


def still_frames(paths: Sequence[Path], assumed_interval_s: float = 1.0) -> tuple[FrameOrder, list[SequenceFrame]]:
    """Stills in capture-time order (file-name order with an assumed interval when times are missing).

    Files that cannot be read (found from their headers) take no part in the ordering: they
    come last, each to be skipped with its reason, so one broken file neither stops the flight
    nor sends the readable frames to file-name order."""
    problems = {Path(p): photo_problem(Path(p)) for p in paths}
    readable = [p for p, problem in problems.items() if problem is None]
    if not readable:
        raise InputError(next(iter(problems.values())) or "no frames given")
    order = order_stills(readable, assumed_interval_s)
    frames = [SequenceFrame(str(f.path), f.time_s, path=f.path) for f in order.frames]
    last = frames[-1].time_s
    frames += [SequenceFrame(str(p), last, path=p, problem=problem) for p, problem in problems.items() if problem is not None]
    return order, frames


def video_frames(path: Path, fps: float, max_frames: int | None = None) -> Iterator[SequenceFrame]:
    """A video's frames sampled at ``fps``, streamed; named ``VIDEO#fNNNNN`` (frame number)."""
    for frame in sample_video(path, fps, max_frames):
        yield SequenceFrame(f"{path}#f{frame.index:05d}", frame.time_s, image=frame.image)


# --------------------------------------------------------------------------- evidence


def tile_states(index: ReferenceIndex) -> TileStates:
    """The decoder's states: the index's tile centres in their UTM zone, spaced by the index stride."""
    tiling = index.manifest.tiling
    spacing = tiling.stride_m if tiling is not None and tiling.stride_m else None
    return TileStates.from_latlon(index.tiles["lat"].to_numpy(), index.tiles["lon"].to_numpy(), spacing)


def fold_scales(matrix: np.ndarray, headings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hypothesis scores ``[H, N]`` -> one row per distinct heading (the best over its scales).

    The heading-aware decoders need one score per heading; with several crop scales (altitude
    unknown) each heading appears once per scale."""
    keys = np.round(np.asarray(headings, dtype=np.float64) % 360.0, 6)
    unique, inverse = np.unique(keys, return_inverse=True)
    if len(unique) == len(keys):
        order = np.argsort(keys, kind="stable")
        return np.asarray(matrix)[order], keys[order]
    out = np.full((len(unique), matrix.shape[1]), -np.inf, dtype=matrix.dtype)
    for row, k in enumerate(inverse.reshape(-1)):
        out[k] = np.maximum(out[k], matrix[row])
    return out, unique


def verified_fix(answer: Answer, states: TileStates) -> Fix | None:
    """A verified answer's metric position as the decoder's :class:`Fix` (one-sigma radius)."""
    if answer.position_source != "verified" or answer.uncertainty_m is None:
        return None
    x, y = from_latlon(states.crs, answer.lat, answer.lon)
    return Fix(float(x), float(y), max(float(answer.uncertainty_m) / VERIFIED_COVERAGE_SIGMAS, 0.5))


def _light(query: PreparedQuery) -> PreparedQuery:
    """The query's metadata without its pixels (kept per frame for the answer's truth)."""
    first = query.hypotheses[0]
    return replace(query, hypotheses=[Hypothesis(np.zeros((1, 1, 3), np.uint8), first.heading_deg, first.scale)],
                   match_view=None)


def locate_frames(
    frames: Iterable[SequenceFrame], encoder: Encoder, index: ReferenceIndex, states: TileStates,
    options: SequenceOptions, progress: bool = True, refiner=None,
) -> list[FrameResult]:
    """Every frame through locate's stages (module doc, step 2-3), one at a time (a video streams)."""
    from tqdm import tqdm

    from cvgl.verify.refine import Refiner

    locate = options.locate
    tile_m, gsd_m = index.manifest.tile_m, index.manifest.gsd_m
    alignment = locate.query_alignment or index.alignment
    named = describe(alignment)
    prior = index.prior(locate.near, locate.radius_km)
    if locate.near is not None:
        allowed = prior[0] if prior[0] is not None else index.allowed_rows(locate.near, locate.radius_km)
        if len(allowed) == 0:
            raise InputError(f"{index.path}: no tile within {locate.radius_km:g} km of {locate.near[0]:.6f},{locate.near[1]:.6f}")
    results: list[FrameResult] = []
    previous: tuple[np.ndarray, float | None] | None = None
    for frame in tqdm(frames, desc="locating frames", unit="frame", disable=not progress):
        where = Path(frame.name)
        try:
            query = frame.prepare(locate, tile_m, gsd_m)
            if refiner is None and locate.refine.enabled and query.match_view is not None:
                refiner = Refiner(index, locate.refine)  # once, on the first frame that can be verified
            desc = encoder.encode([h.image for h in query.hypotheses], batch_size=locate.batch_size)
            matrix = np.asarray(hypothesis_score_matrix(index, desc, alignment, prior, locate.candidates))
            tile_scores, best_hyp = best_over_hypotheses(matrix)
            answer = answer_photo(query, tile_scores, best_hyp, index, locate, named, refiner)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one frame's failure never costs the others their answers
            results.append(FrameResult(frame, Skipped(frame.name, one_line_reason(where, exc))))
            continue
        headings = np.array([h.heading_deg for h in query.hypotheses], dtype=np.float64)
        folded, grid = fold_scales(matrix, headings)
        odometry = None
        view, up = query.hypotheses[0].image, (None if query.heading_source == "search" else 0.0)
        if options.odometry and previous is not None and (previous[1] is None) == (up is None):
            try:
                odometry = measure_odometry(previous[0], view, index.manifest.tile_side_m / min(view.shape[:2]),
                                            image_heading_deg=previous[1])
            except Exception:  # noqa: BLE001 - no odometry for this step: the speed bound applies
                odometry = None
        if options.odometry:
            previous = (view, up)
        evidence = FrameEvidence(
            time_s=frame.time_s,
            scores=np.asarray(tile_scores, dtype=np.float64),
            heading_deg=headings[best_hyp] % 360.0,
            heading_source=query.heading_source,
            fix=verified_fix(answer, states),
            name=frame.name,
            hypothesis_scores=folded.astype(np.float64),
            hypothesis_headings=grid,
            odometry=odometry,
        )
        results.append(FrameResult(frame, answer, evidence, np.asarray(tile_scores), _light(query)))
    return results


# --------------------------------------------------------------------------- answers


def track_answer(result: FrameResult, point: TrackPoint, track: Track, states: TileStates, index: ReferenceIndex,
                 radius_m: float, frame_number: int, time_source: str) -> dict:
    """The frame's published answer with the track's position, confidence and heading (module doc)."""
    answer: Answer = copy.deepcopy(result.answer)
    query = result.query
    lat, lon = to_latlon(states.crs, point.x, point.y)
    set_position(answer, float(lat), float(lon), index.crs)
    answer.position_source = POSITION_SOURCE
    answer.uncertainty_m = float(radius_m)
    answer.confidence = float(min(max(point.confidence, 0.0), 1.0))
    answer.confidence_model = CONFIDENCE_MODEL
    if point.heading_deg is not None:
        answer.heading_deg = float(point.heading_deg) % 360.0
        if point.heading_source == "sequence":
            answer.heading_source = HEADING_SOURCE
    answer.footprint = answer.footprint if point.fix_used else None
    answer.status, answer.reason = "located", None
    if point.status == "lost":
        answer.status = "not_found"
        answer.reason = (f"track lost: the sequence's evidence is spread over several places (confidence "
                         f"{point.confidence:.2f}); the best guess is given")
    camera = (answer.lat, answer.lon)
    answer.camera = None
    if query is not None and query.pitch_deg > 1.0 and query.altitude_m is not None:
        ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
        back = math.radians(answer.heading_deg)
        camera = offset_latlon(answer.lat, answer.lon, -ahead * math.sin(back), -ahead * math.cos(back))
        answer.camera = (float(camera[0]), float(camera[1]))
    if query is not None:
        truth = truth_of(query, (float(camera[0]), float(camera[1])))
        if truth is not None and result.answer.truth is not None:
            truth = replace(truth, center_lat=result.answer.truth.center_lat, center_lon=result.answer.truth.center_lon)
        answer.truth = truth
    out = answer.to_dict()
    out["track"] = {
        "method": track.method,
        "frame": frame_number,
        "time_s": float(point.time_s),
        "time_source": time_source,
        "status": point.status,
        "outlier_prob": float(min(max(point.outlier_prob, 0.0), 1.0)),
        "course_deg": None if point.course_deg is None else float(point.course_deg) % 360.0,
        "speed_mps": None if point.speed_mps is None else float(point.speed_mps),
        "fix_used": bool(point.fix_used),
    }
    return out


def decode_frames(results: list[FrameResult], states: TileStates, index: ReferenceIndex, options: SequenceOptions,
                  time_source: str) -> tuple[list[dict], Track | None]:
    """Decode the usable frames jointly and publish one answer per frame (skipped ones as they are)."""
    usable = [r for r in results if r.evidence is not None]
    if not usable:
        return [r.answer.to_dict() for r in results], None
    radius = index.manifest.correct_radius_m
    track_options = replace(options.track, radius_m=radius)
    try:
        track = decode(states, [r.evidence for r in usable], track_options, options.decoder, options.causal)
    except ValueError as exc:  # the decoders' own checks (e.g. no tile scored): one line
        raise InputError(f"track decode ({options.decoder}): {' '.join(str(exc).split())}") from None
    points = iter(track.points)
    answers = []
    for k, r in enumerate(results):
        if r.evidence is None:
            answers.append(r.answer.to_dict())
            continue
        answers.append(track_answer(r, next(points), track, states, index, radius, k, time_source))
    return answers, track


def locate_sequence(
    frames: Iterable[SequenceFrame], encoder: Encoder, index: ReferenceIndex, options: SequenceOptions = SequenceOptions(),
    order: FrameOrder | None = None, progress: bool = True, refiner=None,
) -> SequenceResult:
    """Frames (in time order) -> answers per frame and the trajectory (module doc)."""
    states = tile_states(index)
    started = time.perf_counter()
    results = locate_frames(frames, encoder, index, states, options, progress, refiner)
    if not results:
        raise InputError("no frames to track")
    if np.any(np.diff([r.frame.time_s for r in results]) < 0):
        raise InputError("frames are not in time order")
    evidence_s = time.perf_counter() - started
    if order is not None and order.time_resolution_s > 0:
        motion = replace(options.track.motion, time_resolution_s=order.time_resolution_s)
        options = replace(options, track=replace(options.track, motion=motion))
    answers, track = decode_frames(results, states, index, options, order.time_source if order else "video")
    return SequenceResult(results, answers, track, order, states, evidence_s, track.decode_s if track else 0.0)


# --------------------------------------------------------------------------- published forms


def _centre(answer: dict) -> tuple[float, float] | None:
    """The truth's ground point at the photo centre (the recorded centre, else the GPS of a nadir photo)."""
    truth = answer.get("truth") or {}
    if truth.get("center_lat") is not None:
        return float(truth["center_lat"]), float(truth["center_lon"])
    if truth.get("lat") is not None and (answer.get("pitch_deg") or 0.0) <= 1.0:
        return float(truth["lat"]), float(truth["lon"])
    return None


def trajectory_geojson(answers: Sequence[dict]) -> dict:
    """A FeatureCollection: the trajectory as one LineString (a vertex per located frame, in time
    order, with per-vertex properties as arrays), then one Point per located frame."""
    located = [a for a in answers if a.get("status") != "skipped" and a.get("lat") is not None]
    coords = [[float(a["lon"]), float(a["lat"])] for a in located]
    method = located[0]["track"]["method"] if located and located[0].get("track") else None
    line = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": coords},
        "properties": {
            "kind": "track", "method": method, "frames": len(coords),
            "queries": [a["query"] for a in located],
            "times_s": [a.get("track", {}).get("time_s") for a in located],
            "status": [a["status"] for a in located],
            "track_status": [a.get("track", {}).get("status") for a in located],
            "confidence": [a.get("confidence") for a in located],
        },
    }
    points = [{
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [float(a["lon"]), float(a["lat"])]},
        "properties": {"kind": "frame", "query": a["query"], "status": a["status"], "confidence": a.get("confidence"),
                       "heading_deg": a.get("heading_deg"), **{k: (a.get("track") or {}).get(k) for k in ("frame", "time_s", "course_deg", "speed_mps")}},
    } for a in located]
    return {"type": "FeatureCollection", "features": [line, *points]}


def map_tracks(result: SequenceResult) -> list[dict]:
    """The map's track layer: the decoded trajectory, the per-frame (locate) answers as a second
    polyline, and the truth when every located frame carries one."""
    located = result.located
    if not located:
        return []
    name = f"track ({located[0]['track']['method']})" if located[0].get("track") else "track"
    truth = [_centre(a) for a in located]
    tracks = [{"name": name, "points": [[a["lat"], a["lon"]] for a in located],
               "truth": [list(t) for t in truth] if all(t is not None for t in truth) else None}]
    alone = [a for a in result.independent if a.get("lat") is not None]
    if alone:
        tracks.append({"name": "frames alone (locate)", "points": [[a["lat"], a["lon"]] for a in alone], "truth": None})
    return tracks


def summary_line(result: SequenceResult) -> str:
    """One line on stderr: frames, what the decoder said, length, timings."""
    located = result.located
    statuses = [a["track"]["status"] for a in located if a.get("track")]
    length = 0.0
    if result.track is not None and len(result.track.points) > 1:
        length = float(np.linalg.norm(np.diff(result.track.xy, axis=0), axis=1).sum())
    n = len(result.frames)
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("tracked", "coasting", "lost") if statuses.count(s))
    method = result.track.method if result.track is not None else "-"
    return (f"track ({method}): {len(located)} of {n} frames located ({counts or 'none'}), {n - len(located)} skipped; "
            f"length {length:.0f} m; {result.evidence_s / max(n, 1):.2f} s/frame evidence, "
            f"{result.decode_s / max(len(located), 1) * 1000:.0f} ms/frame decode")


def estimate_video_frames(path: Path, fps: float) -> int | None:
    """About how many frames sampling ``path`` at ``fps`` keeps (from the container), or None."""
    info = probe_video(path)
    if info.fps and info.frame_count:
        return math.ceil(info.frame_count / info.fps * min(fps, info.fps)) + 1
    return None


def print_skipped(answers: Sequence[dict]) -> int:
    """One ``skipped: REASON`` line on stderr per skipped frame (as ``cvgl locate``); their count."""
    failed = [a for a in answers if a["status"] == "skipped"]
    for a in failed:
        print(f"skipped: {a['reason']}", file=sys.stderr)
    return len(failed)


__all__ = [
    "DEFAULT_FPS", "FrameResult", "SequenceFrame", "SequenceOptions", "SequenceResult", "decode_frames", "default_method",
    "fold_scales", "is_video", "locate_frames", "locate_sequence", "map_tracks", "sequence_source", "still_frames",
    "summary_line", "tile_states", "track_answer", "trajectory_geojson", "verified_fix", "video_frames",
]
