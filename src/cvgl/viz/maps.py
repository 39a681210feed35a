"""The interactive map of answers: ONE self-contained HTML file that works opened from disk, offline.

Everything is inside the file: Leaflet (vendored from npm, :mod:`cvgl.viz.assets`), its CSS with
its icons as ``data:`` URIs, our renderer (``static/cvgl_layers.js``, ``cvgl_style.js``), the
basemap imagery (JPEG ``data:`` URIs) and the layers as JSON. A Content-Security-Policy in the
file forbids the page every network request (``default-src 'none'``; images only from
``data:``; scripts only the inlined ones, by hash), so it cannot depend on the internet even by
accident.

The parts, each doing one thing:

* :func:`map_data`: answers + basemap + scores + tracks -> the JSON the page draws
  (layers from :mod:`cvgl.viz.layers`, :func:`legend`, :func:`map_bounds`);
* :func:`render_html`: that JSON + the inlined assets -> the HTML text;
* :func:`write_map_html`: both, written atomically.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cvgl.io import write_text_atomic
from cvgl.viz.assets import leaflet_css_inline, leaflet_js, static_text
from cvgl.viz.layers import (
    HEAT_TILES,
    LAYER_ORDER,
    answer_layers,
    display_name,
    feature_collection,
    heat_layer,
    is_drawn,
    track_layer,
)

__all__ = ["legend", "map_bounds", "map_data", "render_html", "write_map_html"]

SCRIPTS = ("cvgl_style.js", "cvgl_layers.js", "map_file.js")  # ours, inlined after Leaflet
MIN_EXTENT_DEG = 1e-3  # a map of a single point still shows ~100 m around it


def legend(answers: Sequence[dict], title: str, tile_m: float | None, tile_m_estimated: bool, note: str | None) -> dict:
    """What the legend says besides the layer keys: counts by status, skipped photos and why,
    the tile size ("≈" when estimated from tile spacing) and a note about the basemap."""
    counts = {"located": 0, "not_found": 0, "skipped": 0}
    skipped = []
    for i, answer in enumerate(answers):
        if is_drawn(answer):
            counts[answer["status"]] += 1
        else:
            counts["skipped"] += 1
            skipped.append({"name": display_name(answer, i), "reason": str(answer.get("reason") or "no position in the answer")})
    return {"title": title, "counts": counts, "skipped": skipped, "tile_m": tile_m,
            "tile_m_estimated": bool(tile_m_estimated), "note": note}


def _coordinates(geometry: dict) -> list[list[float]]:
    coords = geometry["coordinates"]
    kind = geometry["type"]
    if kind == "Point":
        return [coords]
    if kind == "LineString":
        return list(coords)
    return [c for ring in coords for c in ring]  # Polygon


def map_bounds(layers: dict[str, dict], basemap: dict | None) -> list[float]:
    """``[south, west, north, east]`` around the basemap and every feature (raises when empty)."""
    points = [c for fc in layers.values() for f in fc["features"] for c in _coordinates(f["geometry"])]
    if basemap is not None and basemap["kind"] == "image":
        (s, w), (n, e) = basemap["bounds"]
        points += [[w, s], [e, n]]
    elif basemap is not None:
        points += [c for f in basemap["tiles"]["features"] for c in _coordinates(f["geometry"])]
    if not points:
        raise ValueError("nothing to map: no answer with a position, no basemap and no track")
    lon, lat = np.asarray(points, dtype=np.float64).T
    s, n, w, e = lat.min(), lat.max(), lon.min(), lon.max()
    pad_lat, pad_lon = max(0.0, MIN_EXTENT_DEG - (n - s)) / 2, max(0.0, MIN_EXTENT_DEG - (e - w)) / 2
    return [float(s - pad_lat), float(w - pad_lon), float(n + pad_lat), float(e + pad_lon)]


def map_data(
    answers: Sequence[dict],
    *,
    tile_m: float | None = None,
    tile_m_estimated: bool = False,
    basemap: dict | None = None,
    scores: Sequence[np.ndarray | None] | None = None,
    tiles: pd.DataFrame | None = None,
    tile_spacing_m: float | None = None,
    tracks: Sequence[dict] | None = None,
    title: str = "cvgl",
    heat_tiles: int = HEAT_TILES,
) -> dict:
    """The JSON the map page draws: ``{title, layers: {name: FeatureCollection}, basemap, legend, bounds}``.

    ``scores`` (optional, one array or None per answer, aligned with ``tiles`` rows) add the
    ``heat`` layer: each photo's ``heat_tiles`` best tiles by score, as squares of
    ``tile_spacing_m`` (the tiling stride; default ``tile_m``)."""
    answers = list(answers)
    layers = answer_layers(answers, tile_m)
    if scores is not None:
        if tiles is None:
            raise ValueError("scores need the index's tiles (lat, lon, tile_id) to be drawn")
        layers["heat"] = heat_layer(answers, scores, tiles, tile_spacing_m or tile_m, heat_tiles)
    layers["tracks"] = track_layer(tracks or [])
    layers = {name: layers.get(name, feature_collection([])) for name in LAYER_ORDER}
    note = basemap.get("note") if basemap else None
    return {
        "title": title,
        "layers": layers,
        "basemap": basemap,
        "legend": legend(answers, title, tile_m, tile_m_estimated, note),
        "bounds": map_bounds(layers, basemap),
    }


def _json_for_script(data: dict) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>``, no ``<!--``)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp(scripts: Sequence[str]) -> str:
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode('utf-8')).digest()).decode()}'" for s in scripts)
    return f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data:"


def render_html(data: dict) -> str:
    """The map page: Leaflet, our renderer and ``data``, all inline; no network allowed (CSP)."""
    scripts = [leaflet_js(), *(static_text(name) for name in SCRIPTS)]
    for script in scripts:
        if "</script" in script.lower():
            raise RuntimeError("an inlined script contains '</script'")  # would end the tag early
    styles = leaflet_css_inline() + "\n" + static_text("map.css")
    body_scripts = "\n".join(f"<script>{s}</script>" for s in scripts)
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_csp(scripts)}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(str(data['title']))}</title>\n<style>{styles}</style>\n</head>\n"
        "<body class=\"cvgl-map-file\">\n<div id=\"map\"></div>\n"
        f"<script id=\"cvgl-data\" type=\"application/json\">{_json_for_script(data)}</script>\n"
        f"{body_scripts}\n</body>\n</html>\n"
    )


def write_map_html(
    out_path: str | os.PathLike,
    answers: Sequence[dict],
    *,
    tile_m: float | None = None,
    tile_m_estimated: bool = False,
    basemap: dict | None = None,
    scores: Sequence[np.ndarray | None] | None = None,
    tiles: pd.DataFrame | None = None,
    tile_spacing_m: float | None = None,
    tracks: Sequence[dict] | None = None,
    title: str = "cvgl",
) -> Path:
    """Write the offline map of ``answers`` (``cvgl.answer/1`` dicts) to ``out_path``; returns it.

    Args:
        answers: one answer per photo; skipped ones are listed in the legend, not drawn.
        tile_m: the index tile side (top-k tiles are squares of it); ``tile_m_estimated`` when it
            was estimated from tile spacing (a tile folder), shown as "≈".
        basemap: from :mod:`cvgl.viz.basemap` (the index overview, or a tile mosaic), or None.
        scores, tiles: per-answer tile scores aligned with ``tiles`` rows, for the heat layer
            (cells of ``tile_spacing_m``, the tiling stride, default ``tile_m``).
        tracks: trajectories ``[{"name", "points": [[lat, lon], ...], "truth": [[lat, lon], ...] or None}]``.
        title: page title and legend heading.

    Raises:
        ValueError: nothing to map, or inconsistent inputs (scores vs answers or tiles, tracks).
    """
    data = map_data(answers, tile_m=tile_m, tile_m_estimated=tile_m_estimated, basemap=basemap,
                    scores=scores, tiles=tiles, tile_spacing_m=tile_spacing_m, tracks=tracks, title=title)
    return write_text_atomic(Path(out_path), render_html(data))
