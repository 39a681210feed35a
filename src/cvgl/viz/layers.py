"""Answers (``cvgl.answer/1`` dicts) -> GeoJSON layers, one FeatureCollection per kind of thing.

Python decides *what* is on a map; ``static/cvgl_layers.js`` decides how it looks (colours and
scales live in ``static/cvgl_style.js``). Coordinates are GeoJSON's ``[lon, lat]`` (WGS84),
rounded to 1e-7 degrees (~1 cm). Every feature says its ``kind`` and, when it belongs to a
photo, ``query``: the photo's position in the answer list, so the map can pick one photo.

Layers (drawn bottom to top, :data:`LAYER_ORDER`):

``heat``         per photo, its best-scoring tiles filled by score (absolute scale), as centres
``top_k``        the answer's candidate tiles: squares of the index tile size, by rank
``footprints``   the verified footprint polygon (photo corners on the ground), when present
``uncertainty``  the radius the answer claims around its position
``errors``       a line from the answer to the photo's GPS (what ``truth.error_m`` measures)
``truth``        the photo's GPS and, when known and different, the ground point its centre shows
``cameras``      the camera's own ground position for oblique photos, with a line to the answer
``predictions``  the answer: photo-centre ground point, coloured by status and confidence
``tracks``       trajectories: a polyline of estimated positions and, when known, of the truth
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from cvgl.geo import offset_latlon

LAYER_ORDER = ("heat", "top_k", "footprints", "uncertainty", "errors", "truth", "cameras", "predictions", "tracks")
DRAWN_STATUSES = ("located", "not_found")
HEAT_TILES = 50  # per photo, its best tiles in the heat layer (the top-k are a few of these)
_DIGITS = 7


def _ll(lat: float, lon: float) -> list[float]:
    return [round(float(lon), _DIGITS), round(float(lat), _DIGITS)]


def feature(geometry: dict, **properties: object) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def feature_collection(features: Iterable[dict]) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def point_feature(lat: float, lon: float, **properties: object) -> dict:
    return feature({"type": "Point", "coordinates": _ll(lat, lon)}, **properties)


def line_feature(points: Sequence[tuple[float, float]], **properties: object) -> dict:
    """A LineString through ``points`` = [(lat, lon), ...]."""
    return feature({"type": "LineString", "coordinates": [_ll(a, o) for a, o in points]}, **properties)


def polygon_feature(points: Sequence[tuple[float, float]], **properties: object) -> dict:
    """A Polygon with corners ``points`` = [(lat, lon), ...] (the ring is closed here)."""
    ring = [_ll(a, o) for a, o in points]
    return feature({"type": "Polygon", "coordinates": [ring + ring[:1]]}, **properties)


def square_corners(lat: float, lon: float, side_m: float) -> list[tuple[float, float]]:
    """Corners (NW, NE, SE, SW) of a north-up square of ``side_m`` metres centred on (lat, lon)."""
    h = side_m / 2.0
    lats, lons = offset_latlon(np.full(4, lat), np.full(4, lon), np.array([-h, h, h, -h]), np.array([h, h, -h, -h]))
    return list(zip(np.asarray(lats).tolist(), np.asarray(lons).tolist()))


def square_feature(lat: float, lon: float, side_m: float | None, **properties: object) -> dict:
    """A tile: the square of the index tile size, or its centre point when the size is unknown."""
    if side_m is None:
        return point_feature(lat, lon, **properties)
    return polygon_feature(square_corners(lat, lon, side_m), **properties)


def _finite(*values: object) -> bool:
    try:
        return all(v is not None and math.isfinite(float(v)) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def is_drawn(answer: dict) -> bool:
    """An answer with a position (located, or a best guess judged not in the index)."""
    return answer.get("status") in DRAWN_STATUSES and _finite(answer.get("lat"), answer.get("lon"))


def display_name(answer: dict, i: int) -> str:
    query = str(answer.get("query") or "")
    return os.path.basename(query.rstrip("/\\")) or query or f"photo {i + 1}"


def _latlon(point: object) -> tuple[float, float] | None:
    if isinstance(point, dict) and _finite(point.get("lat"), point.get("lon")):
        return float(point["lat"]), float(point["lon"])
    return None


def prediction_feature(i: int, answer: dict) -> dict:
    truth = answer.get("truth") or {}
    top = (answer.get("top_k") or [{}])[0]
    return point_feature(
        answer["lat"], answer["lon"], kind="prediction", query=i, name=display_name(answer, i),
        path=str(answer.get("query", "")), status=answer["status"], reason=answer.get("reason"),
        confidence=answer.get("confidence"), confidence_radius_m=answer.get("confidence_radius_m"),
        uncertainty_m=answer.get("uncertainty_m"), position_source=answer.get("position_source"),
        heading_deg=answer.get("heading_deg"), heading_source=answer.get("heading_source"),
        error_m=truth.get("error_m"), tile_id=top.get("tile_id"), score=top.get("score"),
        labels=answer.get("labels") or {},
    )


def uncertainty_features(i: int, answer: dict) -> list[dict]:
    radius = answer.get("uncertainty_m")
    if not (_finite(radius) and float(radius) > 0):
        return []
    return [point_feature(answer["lat"], answer["lon"], kind="uncertainty", query=i, radius_m=float(radius),
                          status=answer["status"], confidence=answer.get("confidence"))]


def top_k_features(i: int, answer: dict, tile_m: float | None) -> list[dict]:
    return [
        square_feature(t["lat"], t["lon"], tile_m, kind="candidate", query=i, rank=int(t.get("rank", r + 1)),
                       tile_id=str(t.get("tile_id", "")), score=t.get("score"))
        for r, t in enumerate(answer.get("top_k") or []) if _finite(t.get("lat"), t.get("lon"))
    ]


def footprint_features(i: int, answer: dict) -> list[dict]:
    corners = [_latlon(c) for c in answer.get("footprint") or []]
    if len(corners) < 3 or any(c is None for c in corners):
        return []
    verification = answer.get("verification") or {}
    return [polygon_feature(corners, kind="footprint", query=i, tile_id=verification.get("tile_id"),  # type: ignore[arg-type]
                            inliers=verification.get("inliers"), matcher=verification.get("matcher"))]


def camera_features(i: int, answer: dict) -> list[dict]:
    camera = _latlon(answer.get("camera"))
    if camera is None:
        return []
    return [point_feature(*camera, kind="camera", query=i, name=display_name(answer, i)),
            line_feature([camera, (answer["lat"], answer["lon"])], kind="sight", query=i)]


def truth_features(i: int, answer: dict) -> list[dict]:
    truth = answer.get("truth") or {}
    gps = _latlon(truth)
    if gps is None:
        return []
    out = [point_feature(*gps, kind="gps", query=i, name=display_name(answer, i), error_m=truth.get("error_m"))]
    if _finite(truth.get("center_lat"), truth.get("center_lon")):
        centre = (float(truth["center_lat"]), float(truth["center_lon"]))
        if centre != gps:
            out.append(point_feature(*centre, kind="centre", query=i, name=display_name(answer, i)))
    return out


def error_features(i: int, answer: dict) -> list[dict]:
    """The line ``truth.error_m`` measures: from the camera estimate (oblique photos) or the
    answer's position to the photo's GPS."""
    truth = answer.get("truth") or {}
    gps = _latlon(truth)
    if gps is None:
        return []
    origin = _latlon(answer.get("camera")) or (float(answer["lat"]), float(answer["lon"]))
    return [line_feature([origin, gps], kind="error", query=i, error_m=truth.get("error_m"))]


def answer_layers(answers: Sequence[dict], tile_m: float | None) -> dict[str, dict]:
    """Every per-photo layer for the drawable answers (skipped ones have no position)."""
    per_answer = {
        "top_k": lambda i, a: top_k_features(i, a, tile_m),
        "footprints": footprint_features,
        "uncertainty": uncertainty_features,
        "errors": error_features,
        "truth": truth_features,
        "cameras": camera_features,
        "predictions": lambda i, a: [prediction_feature(i, a)],
    }
    drawn = [(i, a) for i, a in enumerate(answers) if is_drawn(a)]
    return {name: feature_collection(f for i, a in drawn for f in make(i, a)) for name, make in per_answer.items()}


def heat_layer(
    answers: Sequence[dict], scores: Sequence[np.ndarray | None], tiles: pd.DataFrame, cell_m: float | None,
    per_query: int = HEAT_TILES,
) -> dict:
    """Per drawn answer, its ``per_query`` best-scoring tiles (``scores[i]`` aligned with ``tiles``).

    Tile centres with ``cell_m``, drawn as squares of that side (the tile spacing, so overlapping
    tiles do not pile up): a point is a third of a polygon's bytes, and a map of many photos
    carries many of these."""
    if len(scores) != len(answers):
        raise ValueError(f"scores has {len(scores)} entries for {len(answers)} answers; pass one array (or None) per answer")
    lat, lon = tiles["lat"].to_numpy(np.float64), tiles["lon"].to_numpy(np.float64)
    ids = tiles["tile_id"].astype(str).to_numpy()
    features = []
    for i, (answer, s) in enumerate(zip(answers, scores)):
        if s is None or not is_drawn(answer):
            continue
        s = np.asarray(s, dtype=np.float64).ravel()
        if s.shape[0] != len(tiles):
            raise ValueError(f"scores[{i}] has {s.shape[0]} values but the index has {len(tiles)} tiles")
        finite = np.flatnonzero(np.isfinite(s))
        best = finite[np.argsort(-s[finite], kind="stable")[:per_query]]
        features += [point_feature(lat[r], lon[r], kind="heat", query=i, tile_id=ids[r], score=round(float(s[r]), 5), cell_m=cell_m)
                     for r in best[::-1]]  # weakest first: the strongest are drawn on top
    return feature_collection(features)


def track_layer(tracks: Sequence[dict]) -> dict:
    """``[{"name", "points": [[lat, lon], ...], "truth": [[lat, lon], ...] or None}]`` -> polylines."""
    features = []
    for k, track in enumerate(tracks):
        name = str(track.get("name") or f"track {k + 1}")
        for kind, key in (("track", "points"), ("track-truth", "truth")):
            points = track.get(key)
            if points is None:
                continue
            points = [(float(p[0]), float(p[1])) for p in points]
            if not all(_finite(*p) and -90 <= p[0] <= 90 and -180 <= p[1] <= 180 for p in points):
                raise ValueError(f"track '{name}': {key} must be [[lat, lon], ...] in degrees")
            if points:
                features.append(line_feature(points, kind=kind, track=k, name=name, frames=len(points)))
    return feature_collection(features)
