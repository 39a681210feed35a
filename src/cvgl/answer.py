"""The answer to "where was this photo taken?": a typed result and its published form.

From per-tile scores: the position is the softmax-weighted mean of the tiles near the best one,
and the confidence is the softmax mass within that radius — high when the evidence agrees on one
place, low when similar scores are spread over the map. The reported ``lat``/``lon`` is the
ground point at the photo's centre (what the photo shows). When pitch, heading and altitude are
all known we also give the drone's own position (``camera``), and ``error_m`` (against EXIF GPS,
which records the camera) uses it.

:class:`Answer` and :class:`Skipped` are what :func:`cvgl.locate.locate_images` returns;
``to_dict()`` is the one serialisation the CLI, the service and the demo publish.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from cvgl.confidence import ConfidenceModel, shipped_model
from cvgl.errors import InputError
from cvgl.geo import from_latlon, geodesic_distance_m, offset_latlon
from cvgl.index.search import ranked_tiles
from cvgl.index.store import ReferenceIndex
from cvgl.preprocess import PreparedQuery

SCHEMA = "cvgl.answer/1"
SCHEMA_FILE = "answer-1.schema.json"


@dataclass(frozen=True)
class Candidate:
    """One retrieved tile of the evidence."""

    tile_id: str
    lat: float
    lon: float
    score: float

    def to_dict(self, rank: int) -> dict:
        return {"rank": rank, "tile_id": self.tile_id, "lat": self.lat, "lon": self.lon, "score": self.score}


@dataclass(frozen=True)
class Truth:
    """EXIF GPS (the camera), the ground point the photo centre shows when known, and the error."""

    lat: float
    lon: float
    error_m: float
    center_lat: float | None = None
    center_lon: float | None = None

    def to_dict(self) -> dict:
        out = {"lat": self.lat, "lon": self.lon, "error_m": self.error_m}
        if self.center_lat is not None:
            out["center_lat"], out["center_lon"] = self.center_lat, self.center_lon
        return out


@dataclass
class Answer:
    """Where one photo was taken: the published form is :meth:`to_dict` (``answer-1.schema.json``)."""

    query: str
    lat: float
    lon: float
    uncertainty_m: float  # radius the answer claims (see the schema)
    confidence: float | None
    confidence_model: str | None
    heading_deg: float
    heading_source: str  # flag | metadata | search | verified | assumed-north
    pitch_deg: float
    altitude_m: float | None
    top_k: list[Candidate]
    scale: float = 1.0  # fraction of the photo's short side taken as the tile footprint
    status: str = "located"  # located | not_found
    reason: str | None = None
    position_source: str = "retrieval"  # retrieval | verified
    crs: str | None = None
    x: float | None = None
    y: float | None = None
    alignment: str = "none"
    camera: tuple[float, float] | None = None  # the drone's own position, for oblique photos
    footprint: list[tuple[float, float]] | None = None  # (lat, lon) corners from a verified homography
    verification: dict | None = None
    truth: Truth | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # The numbers the confidence was computed from (cvgl.confidence); not published.
    evidence: dict[str, float] = field(default_factory=dict)

    @property
    def confidence_radius_m(self) -> float:
        """The confidence is the probability of being within the stated uncertainty radius."""
        return self.uncertainty_m

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "query": self.query,
            "status": self.status,
            "reason": self.reason,
            "lat": self.lat,
            "lon": self.lon,
            "crs": self.crs,
            "x": self.x,
            "y": self.y,
            "uncertainty_m": self.uncertainty_m,
            "position_source": self.position_source,
            "confidence": self.confidence,
            "confidence_radius_m": self.confidence_radius_m,
            "confidence_model": self.confidence_model,
            "heading_deg": self.heading_deg % 360.0,
            "heading_source": self.heading_source,
            "pitch_deg": self.pitch_deg,
            "altitude_m": self.altitude_m,
            "scale": self.scale,
            "camera": None if self.camera is None else {"lat": self.camera[0], "lon": self.camera[1]},
            "footprint": None if self.footprint is None else [{"lat": a, "lon": o} for a, o in self.footprint],
            "verification": self.verification,
            "top_k": [c.to_dict(rank) for rank, c in enumerate(self.top_k, start=1)],
            "alignment": self.alignment,
            "truth": None if self.truth is None else self.truth.to_dict(),
            "labels": dict(self.labels),
        }


@dataclass(frozen=True)
class Skipped:
    """A photo that could not be located, and why (one line naming the file)."""

    query: str
    error: str

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "query": self.query, "status": "skipped", "reason": self.error}


def schema() -> dict:
    """The published JSON Schema of :meth:`Answer.to_dict` (shipped in the package)."""
    import json
    from importlib import resources

    return json.loads((resources.files("cvgl.schemas") / SCHEMA_FILE).read_text(encoding="utf-8"))


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = (x - x.max()) / temperature
    e = np.exp(z)
    return e / e.sum()


def answer_from_scores(
    query: PreparedQuery, tile_scores: np.ndarray, best_hypothesis: np.ndarray, index: ReferenceIndex,
    top_k: int = 5, temperature: float = 0.02, alignment: str = "none",
) -> Answer:
    """Per-tile scores (``-inf`` = not scored) -> the retrieval answer: position and evidence.

    The confidence here is the softmax mass near the best tile (uncalibrated); the shipped
    calibration (:mod:`cvgl.confidence`) replaces it with a probability.
    """
    tiles = index.tiles
    lat, lon = tiles["lat"].to_numpy(), tiles["lon"].to_numpy()
    ranked, scored = ranked_tiles(tile_scores)
    order = ranked[:top_k]
    best = int(order[0])
    radius = index.manifest.correct_radius_m
    s_lat, s_lon = lat[scored], lon[scored]  # only scored tiles take part
    weights = softmax(tile_scores[scored], temperature)
    near = geodesic_distance_m(lat[best], lon[best], s_lat, s_lon) <= radius
    w = weights * near
    est_lat = float((w * s_lat).sum() / w.sum())
    est_lon = float((w * s_lon).sum() / w.sum())
    hyp = query.hypotheses[int(best_hypothesis[best])]
    result = Answer(
        query=query.name,
        lat=est_lat,
        lon=est_lon,
        uncertainty_m=radius,
        confidence=float(w.sum()),
        confidence_model="softmax-mass (uncalibrated)",
        heading_deg=float(hyp.heading_deg % 360.0),
        heading_source=query.heading_source,
        pitch_deg=query.pitch_deg,
        altitude_m=query.altitude_m,
        top_k=[Candidate(str(tiles["tile_id"].iloc[i]), float(lat[i]), float(lon[i]), float(tile_scores[i])) for i in order],
        scale=float(hyp.scale),
        alignment=alignment,
    )
    set_position(result, est_lat, est_lon, index.crs)
    camera = (est_lat, est_lon)
    if query.pitch_deg > 1.0 and query.altitude_m is not None:
        # The photo centre lies altitude*tan(pitch) ahead of the camera along the heading (known,
        # or the winning hypothesis when searched).
        ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
        back = math.radians(hyp.heading_deg)
        camera = offset_latlon(est_lat, est_lon, -ahead * math.sin(back), -ahead * math.cos(back))
        result.camera = (float(camera[0]), float(camera[1]))
    result.truth = truth_of(query, camera)
    return result


def apply_verification(result: Answer, refined, query: PreparedQuery, crs: str | None) -> None:
    """Put a verification result (:class:`cvgl.verify.refine.RefineResult`) into the answer.

    Always: the ``verification`` record (what was tried and how strong the best fit was). When a
    candidate verified: its metric position, footprint and continuous heading replace the
    retrieval answer, the top-k evidence is re-ranked (verified tiles first, by inliers), and the
    uncertainty radius is the verified one."""
    strongest = refined.strongest()
    result.verification = {
        "verified": refined.verified,
        "matcher": refined.matcher,
        "tile_id": strongest.extras.get("tile_id") if strongest else None,
        "inliers": int(strongest.inliers) if strongest and strongest.plausible else 0,
        "inlier_ratio": float(strongest.inlier_ratio) if strongest and strongest.plausible else 0.0,
        "reprojection_error_px": strongest.reprojection_error_px if strongest and strongest.plausible else None,
        "candidates": refined.candidates,
    }  # no timing: an answer depends only on the photo, the index, the model and the options
    best = refined.best
    if best is None:
        return
    set_position(result, best.lat, best.lon, crs)
    result.position_source = "verified"
    result.uncertainty_m = float(best.uncertainty_m)
    result.heading_deg = float(best.heading_deg) % 360.0
    result.heading_source = "verified"
    result.footprint = [(float(a), float(o)) for a, o in best.footprint_latlon]
    order = {r.extras.get("tile_id"): i for i, r in enumerate(refined.records)}
    result.top_k = sorted(result.top_k, key=lambda c: order.get(c.tile_id, len(order)))
    pitch = refined.pitch_deg if refined.pitch_deg is not None else query.pitch_deg
    camera = (result.lat, result.lon)
    if pitch > 1.0 and query.altitude_m is not None:
        ahead = query.altitude_m * math.tan(math.radians(pitch))
        back = math.radians(result.heading_deg)
        camera = offset_latlon(result.lat, result.lon, -ahead * math.sin(back), -ahead * math.cos(back))
        result.camera = (float(camera[0]), float(camera[1]))
    else:
        result.camera = None
    truth = truth_of(query, (float(camera[0]), float(camera[1])))
    if truth is not None and result.truth is not None:  # keep a truth centre a caller supplied
        truth = Truth(truth.lat, truth.lon, truth.error_m, result.truth.center_lat, result.truth.center_lon)
    result.truth = truth


RETRIEVAL_MODEL = "retrieval-v1"  # shipped confidence model when verification did not run
REFINED_MODEL = "refined-v1"  # ... and when it ran (verified or not)


@functools.lru_cache(maxsize=None)
def _model(name: str) -> ConfidenceModel | None:
    try:
        return shipped_model(name)
    except InputError:
        return None


def finalise_confidence(result: Answer, evidence: dict[str, float]) -> None:
    """Turn the evidence into the shipped calibrated confidence, and call a photo ``not_found``
    when that confidence is below the model's threshold and nothing verified.

    Without a shipped model (before ``cvgl bench confidence --fit`` has made one) the softmax
    mass stays, named as uncalibrated."""
    result.evidence = dict(evidence)
    model = _model(REFINED_MODEL if "verified" in evidence else RETRIEVAL_MODEL)
    if model is None:
        return
    p = model.probability(evidence)
    result.confidence = p
    result.confidence_model = model.name
    if model.says_not_found(p, result.position_source == "verified"):
        threshold = float(model.fitted_on["not_found_below"])
        result.status = "not_found"
        result.reason = (f"weak evidence (confidence {p:.2f} < {threshold:.2f}): the photo probably shows "
                         "ground that is not in this index; the best guess is given")


def set_position(result: Answer, lat: float, lon: float, crs: str | None) -> None:
    """Set the answer's ground point in lat/lon and, for an index with a CRS, in that CRS."""
    result.lat, result.lon = float(lat), float(lon)
    result.crs = crs
    if crs:
        x, y = from_latlon(crs, lat, lon)
        result.x, result.y = float(x), float(y)


def truth_of(query: PreparedQuery, camera: tuple[float, float]) -> Truth | None:
    """The photo's EXIF GPS as truth, and the error of the ``camera`` estimate against it."""
    meta = query.meta
    if meta.gps_lat is None or meta.gps_lon is None:
        return None
    centre = (None, None)
    oblique = query.pitch_deg > 1.0 and query.altitude_m is not None
    if oblique and query.heading_source not in ("search", "verified"):
        # With a known heading, the ground point the photo centre shows (what tiles match).
        ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
        heading = math.radians(query.hypotheses[0].heading_deg)  # the known heading itself
        c = offset_latlon(meta.gps_lat, meta.gps_lon, ahead * math.sin(heading), ahead * math.cos(heading))
        centre = (float(c[0]), float(c[1]))
    error = float(geodesic_distance_m(camera[0], camera[1], meta.gps_lat, meta.gps_lon))
    return Truth(meta.gps_lat, meta.gps_lon, error, *centre)


# ------------------------------------------------------------------------------------------------
# Published forms besides JSON Lines: GeoJSON, CSV, and the accuracy paragraph
# ------------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "query", "status", "lat", "lon", "crs", "x", "y", "uncertainty_m", "position_source", "confidence",
    "confidence_model", "heading_deg", "heading_source", "pitch_deg", "altitude_m", "verified", "inliers",
    "top1_tile_id", "top1_score", "true_lat", "true_lon", "error_m", "reason",
)


def csv_row(answer: dict) -> dict:
    """One flat CSV row of a published answer (see :data:`CSV_COLUMNS`)."""
    verification = answer.get("verification") or {}
    top = (answer.get("top_k") or [{}])[0]
    truth = answer.get("truth") or {}
    row = {key: answer.get(key) for key in CSV_COLUMNS}
    row.update({
        "verified": verification.get("verified"), "inliers": verification.get("inliers"),
        "top1_tile_id": top.get("tile_id"), "top1_score": top.get("score"),
        "true_lat": truth.get("lat"), "true_lon": truth.get("lon"), "error_m": truth.get("error_m"),
    })
    return row


def csv_text(answers: list[dict]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for answer in answers:
        writer.writerow({k: ("" if v is None else v) for k, v in csv_row(answer).items()})
    return buffer.getvalue()


def tile_square(lat: float, lon: float, side_m: float) -> list[list[float]]:
    """A closed GeoJSON ring ([lon, lat] pairs) of a north-up square of ``side_m`` centred on lat/lon."""
    h = side_m / 2.0
    corners = [(-h, h), (h, h), (h, -h), (-h, -h), (-h, h)]
    ring = [offset_latlon(lat, lon, e, n) for e, n in corners]
    return [[float(o), float(a)] for a, o in ring]


def geojson(answers: list[dict], tile_m: float) -> dict:
    """A FeatureCollection: each located photo's point, its verified footprint, its top-k tiles.

    Every feature's ``properties`` names the photo (``query``) and says what the feature is
    (``kind``: ``position`` | ``footprint`` | ``tile``), so one layer can be styled per kind.
    """
    features = []
    for answer in answers:
        if answer.get("lat") is None:
            continue
        props = {k: answer.get(k) for k in ("query", "status", "confidence", "uncertainty_m", "position_source",
                                             "heading_deg", "heading_source")}
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [answer["lon"], answer["lat"]]},
                         "properties": {"kind": "position", **props}})
        if answer.get("footprint"):
            ring = [[p["lon"], p["lat"]] for p in answer["footprint"]]
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                             "properties": {"kind": "footprint", "query": answer["query"]}})
        for tile in answer.get("top_k") or []:
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [tile_square(tile["lat"], tile["lon"], tile_m)]},
                             "properties": {"kind": "tile", "query": answer["query"], "rank": tile["rank"],
                                            "tile_id": tile["tile_id"], "score": tile["score"]}})
    return {"type": "FeatureCollection", "features": features}


def accuracy_summary(answers: list[dict]) -> str | None:
    """One paragraph on accuracy when photos carry GPS (None when none does)."""
    rated = [a for a in answers if a.get("truth")]
    if not rated:
        return None
    errors = np.array([a["truth"]["error_m"] for a in rated], dtype=float)
    located = len([a for a in answers if a.get("status") != "skipped"])
    within = {r: float((errors <= r).mean()) for r in (5, 20, 50)}
    inside = [a["truth"]["error_m"] <= a["uncertainty_m"] for a in rated if a.get("uncertainty_m") is not None]
    conf = [a["confidence"] for a in rated if a.get("confidence") is not None]
    text = (
        f"accuracy: {len(rated)} of {located} located photos carry GPS; error median {np.median(errors):.1f} m, "
        f"90th percentile {np.percentile(errors, 90):.1f} m; within 5 / 20 / 50 m: "
        f"{within[5]:.0%} / {within[20]:.0%} / {within[50]:.0%}"
    )
    if inside:
        text += f"; inside the stated radius: {np.mean(inside):.0%}"
    if conf:
        text += f" (mean confidence {np.mean(conf):.2f})"
    return text + "."
