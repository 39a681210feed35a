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

import math
from dataclasses import dataclass, field

import numpy as np

from cvgl.geo import geodesic_distance_m, offset_latlon
from cvgl.index.search import ranked_tiles
from cvgl.index.store import ReferenceIndex
from cvgl.preprocess import PreparedQuery


@dataclass(frozen=True)
class Candidate:
    """One retrieved tile of the evidence."""

    tile_id: str
    lat: float
    lon: float
    score: float

    def to_dict(self) -> dict:
        return {"tile_id": self.tile_id, "lat": self.lat, "lon": self.lon, "score": self.score}


@dataclass
class Answer:
    query: str
    lat: float
    lon: float
    confidence: float
    heading_deg: float
    heading_source: str  # flag | metadata | search | assumed-north
    pitch_deg: float
    altitude_m: float | None
    # Fraction of the photo's short side taken as the tile footprint (the winning hypothesis when
    # the altitude is unknown; 1.0 when the altitude fixed the scale).
    scale: float
    top_k: list[Candidate]
    alignment: str = "none"
    camera: tuple[float, float] | None = None  # the drone's own position, for oblique photos
    truth: tuple[float, float] | None = None  # EXIF GPS (the camera's position)
    truth_center: tuple[float, float] | None = None  # the ground point the photo centre shows
    error_m: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {
            "query": self.query,
            "lat": self.lat,
            "lon": self.lon,
            "confidence": self.confidence,
            "heading_deg": self.heading_deg,
            "heading_source": self.heading_source,
            "pitch_deg": self.pitch_deg,
            "altitude_m": self.altitude_m,
            "scale": self.scale,
            "top_k": [c.to_dict() for c in self.top_k],
        }
        if self.camera is not None:
            out["camera_lat"], out["camera_lon"] = self.camera
        if self.truth is not None:
            out["true_lat"], out["true_lon"] = self.truth
            if self.truth_center is not None:
                out["true_center_lat"], out["true_center_lon"] = self.truth_center
            out["error_m"] = self.error_m
        out["alignment"] = self.alignment
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Skipped:
    """A photo that could not be located, and why (one line naming the file)."""

    query: str
    error: str

    def to_dict(self) -> dict:
        return {"query": self.query, "error": self.error}


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = (x - x.max()) / temperature
    e = np.exp(z)
    return e / e.sum()


def answer_from_scores(
    query: PreparedQuery, tile_scores: np.ndarray, best_hypothesis: np.ndarray, index: ReferenceIndex,
    top_k: int = 5, temperature: float = 0.02, alignment: str = "none",
) -> Answer:
    """Per-tile scores (``-inf`` = not scored) -> the answer: position, confidence, evidence."""
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
        confidence=float(w.sum()),
        heading_deg=float(hyp.heading_deg % 360.0),
        heading_source=query.heading_source,
        pitch_deg=query.pitch_deg,
        altitude_m=query.altitude_m,
        scale=float(hyp.scale),
        top_k=[Candidate(str(tiles["tile_id"].iloc[i]), float(lat[i]), float(lon[i]), float(tile_scores[i])) for i in order],
        alignment=alignment,
    )
    camera = (est_lat, est_lon)
    if query.pitch_deg > 1.0 and query.altitude_m is not None:
        # The photo centre lies altitude*tan(pitch) ahead of the camera along the heading (known,
        # or the winning hypothesis when searched).
        ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
        back = math.radians(hyp.heading_deg)
        camera = offset_latlon(est_lat, est_lon, -ahead * math.sin(back), -ahead * math.cos(back))
        result.camera = (float(camera[0]), float(camera[1]))
    meta = query.meta
    if meta.gps_lat is not None and meta.gps_lon is not None:
        result.truth = (meta.gps_lat, meta.gps_lon)
        if result.camera is not None and query.heading_source != "search":
            # With a known heading, the ground point the photo centre shows (what tiles match).
            ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
            heading = math.radians(query.hypotheses[0].heading_deg)  # the known heading itself
            centre = offset_latlon(meta.gps_lat, meta.gps_lon, ahead * math.sin(heading), ahead * math.cos(heading))
            result.truth_center = (float(centre[0]), float(centre[1]))
        result.error_m = float(geodesic_distance_m(camera[0], camera[1], meta.gps_lat, meta.gps_lon))
    return result
