"""Interactive HTML map of locate results (folium / Leaflet).

One self-contained HTML file per run shows, for every query image:

* the predicted location (marker; popup with name, lat/lon, confidence, heading, error),
* its top-k candidate tiles, coloured by rank (score in the tooltip),
* the ground truth and a dashed error line when the truth is known,
* a similarity heatmap over all tiles, i.e. where the evidence for this query lies.

Each query is one ``FeatureGroup``; the layer control toggles them. With more than
:data:`MAX_VISIBLE` queries only the first is shown when the page opens.

Offline use: the reference orthophoto is embedded as a PNG data URI (``ImageOverlay``), so no
imagery has to be fetched. The OpenStreetMap layer is only a base layer for users who are online;
nothing depends on it. Leaflet itself is loaded from a CDN by folium (it is not bundled with any
installed package). When it cannot be loaded the page swaps the map for a static preview - the
orthophoto with every prediction, truth and top-1 tile drawn on it - and a results table, both
embedded, so the file stays useful with no network at all.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import folium
import numpy as np
import pandas as pd
from folium.plugins import HeatMap
from PIL import Image, ImageDraw, ImageFont

from cvgl.io import write_text_atomic

__all__ = ["write_map_html", "RANK_COLOURS", "MAX_VISIBLE"]

#: Colour of the candidate tile at rank 1, 2, ... (ranks past the list reuse the last colour).
RANK_COLOURS = (
    "#e41a1c",  # 1 red
    "#ff7f00",  # 2 orange
    "#ffd92f",  # 3 yellow
    "#4daf4a",  # 4 green
    "#377eb8",  # 5 blue
    "#984ea3",  # 6 purple
    "#a65628",  # 7 brown
    "#999999",  # 8+ grey
)

#: With more queries than this, only the first query's layer is visible when the map opens.
MAX_VISIBLE = 5

_TRUTH_COLOUR = "#00a651"
_PRED_COLOUR = "#1f4e9e"

# WGS84, for metres -> degrees around a tile centre (radii of curvature; exact enough for tiles).
_A = 6378137.0
_E2 = 6.69437999014e-3


def _esc(text: Any) -> str:
    """HTML-escape user text, also safe inside the JS template literals folium wraps HTML in."""
    return (
        html.escape(str(text), quote=True)
        .replace("`", "&#96;")
        .replace("$", "&#36;")
        .replace("\\", "&#92;")
    )


def _rank_colour(rank: int) -> str:
    return RANK_COLOURS[min(rank, len(RANK_COLOURS)) - 1]


def _half_side_deg(lat: float, half_m: float) -> tuple[float, float]:
    """Half a square's side, ``half_m`` metres, in degrees of latitude and longitude at ``lat``."""
    phi = math.radians(lat)
    w = 1.0 - _E2 * math.sin(phi) ** 2
    meridional = _A * (1.0 - _E2) / w**1.5
    normal = _A / math.sqrt(w)
    dlat = math.degrees(half_m / meridional)
    dlon = math.degrees(half_m / (normal * max(math.cos(phi), 1e-9)))
    return dlat, dlon


def _finite(*values: Any) -> bool:
    try:
        return all(v is not None and math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return f"{float(value):{spec}}{unit}" if _finite(value) else "n/a"


def _png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg_data_uri(image: Image.Image, quality: int = 88) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _as_rgb_image(overview: np.ndarray, max_px: int) -> Image.Image:
    arr = np.asarray(overview)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"overview must be an (H, W, 3) RGB array, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    if max(image.size) > max_px:
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return image


def _check_bounds(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    if bounds is None or len(bounds) != 4 or not _finite(*bounds):
        raise ValueError(f"overview_bounds must be (south, west, north, east) in degrees, got {bounds!r}")
    s, w, n, e = (float(b) for b in bounds)
    if not (s < n and w < e):
        raise ValueError(
            f"overview_bounds must be (south, west, north, east) with south < north and west < east, "
            f"got {bounds!r}"
        )
    return s, w, n, e


def _normalised_heat(scores: np.ndarray) -> np.ndarray:
    """Scores minus their median, clipped at 0, scaled to [0, 1] (all zeros when flat)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    out = np.zeros_like(s)
    ok = np.isfinite(s)
    if not ok.any():
        return out
    v = s[ok] - np.median(s[ok])
    v = np.clip(v, 0.0, None)
    top = v.max()
    if top > 0:
        out[ok] = v / top
    return out


def _fit_zoom(s: float, w: float, n: float, e: float, width_px: int = 1000, height_px: int = 700) -> int:
    """Web-Mercator zoom level at which the bounds fill a ``width_px`` x ``height_px`` viewport."""
    def merc_y(lat: float) -> float:
        lat = max(min(lat, 85.0), -85.0)
        return math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))

    dx = max((e - w) / 360.0, 1e-12)
    dy = max((merc_y(n) - merc_y(s)) / (2 * math.pi), 1e-12)
    z = min(math.log2(width_px / 256.0 / dx), math.log2(height_px / 256.0 / dy))
    return int(max(0, min(20, math.floor(z))))


def _heat_radius_px(tiles: pd.DataFrame, tile_m: float | None, lat: float, zoom: int) -> int:
    """Heat-point radius in screen pixels so neighbouring tiles merge at the initial zoom."""
    spacing_m = tile_m
    if not spacing_m or not math.isfinite(spacing_m):
        pts = tiles[["lat", "lon"]].to_numpy(dtype=np.float64)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) >= 2:
            sample = pts[: min(len(pts), 400)]
            ky = 111_320.0
            kx = 111_320.0 * math.cos(math.radians(lat))
            dy = (sample[:, None, 0] - pts[None, :, 0]) * ky
            dx = (sample[:, None, 1] - pts[None, :, 1]) * kx
            d = np.hypot(dy, dx)
            d[d <= 0] = np.inf
            nearest = d.min(axis=1)
            nearest = nearest[np.isfinite(nearest)]
            spacing_m = float(np.median(nearest)) if len(nearest) else None
    if not spacing_m:
        return 20
    metres_per_px = 40_075_016.686 * math.cos(math.radians(lat)) / (256.0 * 2**zoom)
    return int(max(8, min(45, round(0.9 * spacing_m / metres_per_px))))


def _popup_html(name: str, res: dict) -> str:
    rows = [
        ("query", _esc(name)),
        ("lat, lon", f"{float(res['lat']):.6f}, {float(res['lon']):.6f}"),
        ("confidence", _fmt(res.get("confidence"), ".3f")),
        ("heading", _fmt(res.get("heading_deg"), ".1f", "&deg;")),
    ]
    if _finite(res.get("error_m")):
        rows.append(("error", f"{float(res['error_m']):.1f} m"))
    if _finite(res.get("true_lat"), res.get("true_lon")):
        rows.append(("truth", f"{float(res['true_lat']):.6f}, {float(res['true_lon']):.6f}"))
    top = res.get("top_k") or []
    if top:
        tid, score = _esc(top[0].get("tile_id", "?")), _fmt(top[0].get("score"), ".4f")
        rows.append(("top-1 tile", f"{tid} ({score})"))
    th = "<th style='text-align:left;padding-right:8px'>"
    body = "".join(f"<tr>{th}{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table style='font-size:12px;white-space:nowrap'>{body}</table>"


def _query_name(res: dict, index: int) -> str:
    q = res.get("query")
    return str(q) if q not in (None, "") else f"query {index + 1}"


def _short(name: str, limit: int = 48) -> str:
    base = os.path.basename(name.rstrip("/\\")) or name
    return base if len(base) <= limit else base[: limit - 3] + "..."


def _legend_html(title: str, failed: list[tuple[str, str]], n_ok: int, n_total: int, show_tiles: bool) -> str:
    swatches = "".join(
        f"<span style='display:inline-block;width:12px;height:12px;background:{c};margin:0 2px 0 6px;"
        f"border:1px solid #333;vertical-align:middle'></span>{i + 1}{'+' if i == len(RANK_COLOURS) - 1 else ''}"
        for i, c in enumerate(RANK_COLOURS)
    )
    parts = [
        f"<div style='font-weight:bold;font-size:14px'>{_esc(title)}</div>",
        f"<div>{n_ok} of {n_total} queries located</div>",
    ]
    if show_tiles:
        parts.append(f"<div style='margin-top:4px'>tile rank:{swatches}</div>")
    parts.append(
        f"<div style='margin-top:4px'><span style='color:{_PRED_COLOUR}'>&#9679;</span> prediction &nbsp;"
        f"<span style='color:{_TRUTH_COLOUR}'>&#9679;</span> truth &nbsp; heat = similarity above median</div>"
    )
    if failed:
        items = "".join(
            f"<li><b>{_esc(name)}</b>: {_esc(msg)}</li>" for name, msg in failed
        )
        parts.append(
            f"<div style='margin-top:6px;color:#b00'>failed queries ({len(failed)}):</div>"
            f"<ul class='cvgl-failed' style='margin:2px 0 0 16px;padding:0;max-height:150px;overflow:auto'>{items}</ul>"
        )
    return (
        "<div id='cvgl-legend' style='position:fixed;bottom:24px;left:12px;z-index:9999;background:rgba(255,255,255,0.92);"
        "padding:8px 10px;border:1px solid #888;border-radius:4px;font:12px sans-serif;max-width:420px'>"
        + "".join(parts)
        + "</div>"
    )


def _static_preview(
    ok: list[tuple[int, str, dict]],
    base: Image.Image | None,
    bounds: tuple[float, float, float, float],
    tile_m: float | None,
    max_px: int = 1024,
) -> Image.Image:
    """The orthophoto (or a grey canvas) with predictions, truths and top-1 tiles drawn on it."""
    s, w, n, e = bounds
    if base is not None:
        canvas = base.copy()
        if max(canvas.size) > max_px:
            canvas.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        elif max(canvas.size) < max_px * 3 // 4:  # tiny overview: enlarge so the drawing is legible
            f = max_px / max(canvas.size)
            size = (max(1, round(canvas.width * f)), max(1, round(canvas.height * f)))
            canvas = canvas.resize(size, Image.Resampling.BICUBIC)
    else:
        mid = math.radians((s + n) / 2)
        aspect = (e - w) * math.cos(mid) / max(n - s, 1e-12)
        if aspect >= 1:
            wpx, hpx = max_px, max(64, int(max_px / aspect))
        else:
            wpx, hpx = max(64, int(max_px * aspect)), max_px
        canvas = Image.new("RGB", (wpx, hpx), (225, 225, 225))
    canvas = canvas.convert("RGB")
    W, H = canvas.size
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=max(12, W // 45))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()

    def px(lat: float, lon: float) -> tuple[float, float]:
        return (lon - w) / (e - w) * W, (n - lat) / (n - s) * H

    r = max(5, W // 110)
    lw = max(2, W // 340)
    for _, _, res in ok:
        top = (res.get("top_k") or [None])[0]
        if top and _finite(top.get("lat"), top.get("lon")):
            if tile_m:
                dlat, dlon = _half_side_deg(float(top["lat"]), tile_m / 2)
                x0, y0 = px(float(top["lat"]) + dlat, float(top["lon"]) - dlon)
                x1, y1 = px(float(top["lat"]) - dlat, float(top["lon"]) + dlon)
                draw.rectangle([x0, y0, x1, y1], outline=RANK_COLOURS[0], width=lw)
            else:
                x, y = px(float(top["lat"]), float(top["lon"]))
                draw.ellipse([x - r, y - r, x + r, y + r], outline=RANK_COLOURS[0], width=lw)
    for i, _, res in ok:
        x, y = px(float(res["lat"]), float(res["lon"]))
        if _finite(res.get("true_lat"), res.get("true_lon")):
            tx, ty = px(float(res["true_lat"]), float(res["true_lon"]))
            ex, ey = px(*_error_origin(res))
            draw.line([ex, ey, tx, ty], fill="white", width=lw + 2)
            draw.line([ex, ey, tx, ty], fill=_TRUTH_COLOUR, width=lw)
            if (ex, ey) != (x, y):  # camera estimate of an oblique photo: hollow blue ring
                draw.ellipse([ex - r, ey - r, ex + r, ey + r], outline=_PRED_COLOUR, width=lw + 1)
            draw.ellipse([tx - r, ty - r, tx + r, ty + r], fill=_TRUTH_COLOUR, outline="white")
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_PRED_COLOUR, outline="white", width=2)
        draw.text((x + r + 2, y - r - 2), str(i + 1), fill="white", font=font,
                  stroke_width=max(2, lw), stroke_fill="black")
    return canvas


def _offline_block(
    map_id: str,
    title: str,
    preview_uri: str,
    ok: list[tuple[int, str, dict]],
    failed: list[tuple[str, str]],
) -> str:
    """Hidden static preview + results table, revealed by a script when Leaflet did not load."""
    columns = ("#", "query", "lat", "lon", "confidence", "heading", "error", "top-1 tile")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in columns) + "</tr>"
    body = []
    for i, name, res in ok:
        top = (res.get("top_k") or [{}])[0]
        body.append(
            "<tr>"
            + "".join(
                f"<td>{v}</td>"
                for v in (
                    i + 1,
                    _esc(name),
                    f"{float(res['lat']):.6f}",
                    f"{float(res['lon']):.6f}",
                    _fmt(res.get("confidence"), ".3f"),
                    _fmt(res.get("heading_deg"), ".1f", "&deg;"),
                    _fmt(res.get("error_m"), ".1f", " m"),
                    _esc(str(top.get("tile_id", ""))),
                )
            )
            + "</tr>"
        )
    failed_html = "".join(f"<li><b>{_esc(nm)}</b>: {_esc(msg)}</li>" for nm, msg in failed)
    return f"""
<div id="cvgl-offline" style="display:none;padding:12px;font:13px sans-serif">
  <h2 style="margin:0 0 6px 0">{_esc(title)}</h2>
  <p style="color:#555">The interactive map needs the Leaflet library from the internet, which could not be
  loaded. Below: a static preview (blue = prediction of the ground point the photo shows, numbered as
  in the table; hollow blue ring = camera position estimated for an oblique photo; green = truth
  (EXIF GPS, the camera); red outline = top-1 tile) and the results table.</p>
  <img src="{preview_uri}" alt="static preview of the locate results" style="max-width:100%;border:1px solid #888">
  <table border="1" cellspacing="0" cellpadding="3" style="margin-top:10px;border-collapse:collapse">{head}{''.join(body)}</table>
  {f'<p style="color:#b00">failed queries ({len(failed)}):</p><ul>{failed_html}</ul>' if failed else ''}
</div>
<noscript><style>#cvgl-offline{{display:block !important}} #{map_id}, #cvgl-legend{{display:none}}</style></noscript>
<script>
window.addEventListener("load", function () {{
  if (typeof L === "undefined") {{
    document.getElementById("cvgl-offline").style.display = "block";
    var m = document.getElementById("{map_id}");
    if (m) m.style.display = "none";
    var lg = document.getElementById("cvgl-legend");
    if (lg) lg.style.display = "none";
  }}
}});
</script>
"""


def _error_origin(res: dict) -> tuple[float, float]:
    """Where ``error_m`` was measured from: the camera estimate if any, else the prediction."""
    if _finite(res.get("camera_lat"), res.get("camera_lon")):
        return float(res["camera_lat"]), float(res["camera_lon"])
    return float(res["lat"]), float(res["lon"])


def write_map_html(
    out_path: str | os.PathLike,
    results: list[dict],
    tiles: pd.DataFrame,
    scores: list[np.ndarray | None] | None = None,
    overview: np.ndarray | None = None,
    overview_bounds: tuple | None = None,
    tile_m: float | None = None,
    title: str = "cvgl",
    *,
    overview_max_px: int = 2048,
    heat_max_points: int = 5000,
) -> Path:
    """Write an interactive map of locate results to ``out_path`` (HTML) and return its path.

    Args:
        out_path: the HTML file to write (parent folders are created; written atomically).
        results: one locate result dict per query (``query, lat, lon, confidence, heading_deg,
            top_k`` and, when the truth is known, ``error_m, true_lat, true_lon``). Failed
            queries (``{"query": ..., "error": msg}``) are not drawn, only listed in the legend.
        tiles: reference tiles, columns ``lat, lon`` (``tile_id`` and others are ignored).
        scores: optional, aligned with ``results``: per query an array of similarities to every
            tile (aligned with ``tiles`` rows), or ``None``. Drawn as a heatmap of
            ``clip(score - median, 0) / max`` so it shows where the evidence is.
        overview: optional RGB uint8 (H, W, 3) north-up orthophoto, embedded as a PNG overlay.
        overview_bounds: ``(south, west, north, east)`` of ``overview`` in degrees.
        tile_m: ground side of a tile in metres; top-k tiles are drawn as squares of that size,
            else as circle markers.
        title: page title and legend heading.
        overview_max_px: the overlay is downscaled to at most this many pixels per side (keeps
            the HTML size reasonable; a 2048 px PNG is a few MB).
        heat_max_points: per query, at most this many (strongest) tiles go into the heatmap.

    Raises:
        ValueError: inconsistent inputs (``scores`` length, array sizes, bounds, nothing to show).
    """
    out = Path(out_path)
    results = list(results or [])
    if scores is not None and len(scores) != len(results):
        raise ValueError(
            f"scores has {len(scores)} entries but there are {len(results)} results; "
            "pass one array (or None) per result"
        )
    if overview is not None and overview_bounds is None:
        raise ValueError("overview given without overview_bounds (south, west, north, east)")
    tiles = tiles if tiles is not None else pd.DataFrame(columns=["lat", "lon"])
    if len(tiles) and not {"lat", "lon"} <= set(tiles.columns):
        raise ValueError(f"tiles needs columns 'lat' and 'lon', has {list(tiles.columns)}")
    if tile_m is not None and not (_finite(tile_m) and float(tile_m) > 0):
        tile_m = None
    tile_m = float(tile_m) if tile_m is not None else None

    # Split successful and failed queries.
    ok: list[tuple[int, str, dict]] = []
    failed: list[tuple[str, str]] = []
    for i, res in enumerate(results):
        name = _query_name(res, i)
        if res.get("error") is not None:
            failed.append((name, str(res["error"])))
        elif not _finite(res.get("lat"), res.get("lon")):
            failed.append((name, "no location in result"))
        else:
            ok.append((i, name, res))

    # Bounds: the orthophoto if given, grown to include every drawn point.
    lats: list[float] = []
    lons: list[float] = []
    if overview_bounds is not None:
        s, w, n, e = _check_bounds(overview_bounds)
        lats += [s, n]
        lons += [w, e]
    for _, _, res in ok:
        lats.append(float(res["lat"]))
        lons.append(float(res["lon"]))
        if _finite(res.get("true_lat"), res.get("true_lon")):
            lats.append(float(res["true_lat"]))
            lons.append(float(res["true_lon"]))
        for t in res.get("top_k") or []:
            if _finite(t.get("lat"), t.get("lon")):
                lats.append(float(t["lat"]))
                lons.append(float(t["lon"]))
    if len(tiles):
        tl = tiles["lat"].to_numpy(dtype=np.float64)
        tn = tiles["lon"].to_numpy(dtype=np.float64)
        good = np.isfinite(tl) & np.isfinite(tn)
        if good.any():
            lats += [float(tl[good].min()), float(tl[good].max())]
            lons += [float(tn[good].min()), float(tn[good].max())]
    if not lats:
        raise ValueError("nothing to map: no successful result, no tiles and no overview bounds")
    s, n, w, e = min(lats), max(lats), min(lons), max(lons)
    if n - s < 1e-6:
        s, n = s - 5e-4, n + 5e-4
    if e - w < 1e-6:
        w, e = w - 5e-4, e + 5e-4
    centre_lat = (s + n) / 2
    zoom = _fit_zoom(s, w, n, e)

    m = folium.Map(
        location=[centre_lat, (w + e) / 2],
        zoom_start=zoom,
        tiles=None,
        control_scale=True,
        max_zoom=22,
    )
    m.get_root().title = title
    folium.TileLayer(
        "OpenStreetMap", name="OpenStreetMap (online only)", max_zoom=22, max_native_zoom=19
    ).add_to(m)

    base_image = None
    if overview is not None:
        ob = _check_bounds(overview_bounds)
        base_image = _as_rgb_image(overview, overview_max_px)
        folium.raster_layers.ImageOverlay(
            image=_png_data_uri(base_image),
            bounds=[[ob[0], ob[1]], [ob[2], ob[3]]],
            opacity=0.9,
            name="orthophoto (embedded)",
            pixelated=False,
        ).add_to(m)

    # Heatmap geometry, shared by every query.
    tile_lat = tiles["lat"].to_numpy(dtype=np.float64) if len(tiles) else np.zeros(0)
    tile_lon = tiles["lon"].to_numpy(dtype=np.float64) if len(tiles) else np.zeros(0)
    heat_radius = _heat_radius_px(tiles, tile_m, centre_lat, zoom) if len(tiles) else 20

    many = len(ok) > MAX_VISIBLE
    for order, (i, name, res) in enumerate(ok):
        group = folium.FeatureGroup(name=f"{i + 1}. {_esc(_short(name))}", show=(order == 0) or not many)

        # Heatmap first so tiles and markers draw above it.
        sc = scores[i] if scores is not None else None
        if sc is not None and len(tiles):
            sc = np.asarray(sc, dtype=np.float64).ravel()
            if sc.shape[0] != len(tiles):
                raise ValueError(f"scores[{i}] has {sc.shape[0]} values but tiles has {len(tiles)} rows")
            heat = _normalised_heat(sc)
            keep = np.flatnonzero((heat > 0.01) & np.isfinite(tile_lat) & np.isfinite(tile_lon))
            if len(keep) > heat_max_points:
                keep = keep[np.argsort(-heat[keep], kind="stable")[:heat_max_points]]
            if len(keep):
                data = np.column_stack(
                    [np.round(tile_lat[keep], 7), np.round(tile_lon[keep], 7), np.round(heat[keep], 3)]
                ).tolist()
                HeatMap(data, radius=heat_radius, blur=max(4, int(heat_radius * 0.7)),
                        min_opacity=0.25, max_zoom=zoom, control=False).add_to(group)

        # Top-k candidate tiles, rank 1 drawn last (on top).
        top_k = [t for t in (res.get("top_k") or []) if _finite(t.get("lat"), t.get("lon"))]
        for rank in range(len(top_k), 0, -1):
            t = top_k[rank - 1]
            colour = _rank_colour(rank)
            tip = f"#{rank} tile {_esc(str(t.get('tile_id', '?')))} score {_fmt(t.get('score'), '.4f')}"
            tlat, tlon = float(t["lat"]), float(t["lon"])
            if tile_m:
                dlat, dlon = _half_side_deg(tlat, tile_m / 2)
                folium.Rectangle(
                    bounds=[[tlat - dlat, tlon - dlon], [tlat + dlat, tlon + dlon]],
                    color=colour, weight=3 if rank == 1 else 2, fill=True, fill_color=colour,
                    fill_opacity=0.12, tooltip=tip,
                ).add_to(group)
            else:
                folium.CircleMarker(
                    location=[tlat, tlon], radius=7 if rank == 1 else 5, color=colour, weight=2,
                    fill=True, fill_color=colour, fill_opacity=0.5, tooltip=tip,
                ).add_to(group)

        # Truth and error line. ``error_m`` compares EXIF GPS (the camera) with the camera estimate
        # when locate made one (oblique photos), else with the ground point: draw what was measured.
        plat, plon = float(res["lat"]), float(res["lon"])
        if _finite(res.get("true_lat"), res.get("true_lon")):
            tlat, tlon = float(res["true_lat"]), float(res["true_lon"])
            elat, elon = _error_origin(res)
            err = f"error {_fmt(res.get('error_m'), '.1f', ' m')}"
            if (elat, elon) != (plat, plon):
                folium.CircleMarker(
                    location=[elat, elon], radius=6, color=_PRED_COLOUR, weight=3, fill=False,
                    tooltip=f"camera estimate for {_esc(_short(name))}",
                ).add_to(group)
            folium.PolyLine([[elat, elon], [tlat, tlon]], color=_TRUTH_COLOUR, weight=3,
                            dash_array="6 6", tooltip=err).add_to(group)
            folium.CircleMarker(
                location=[tlat, tlon], radius=7, color="white", weight=2, fill=True,
                fill_color=_TRUTH_COLOUR, fill_opacity=1.0,
                tooltip=f"truth for {_esc(_short(name))}",
                popup=folium.Popup(
                    f"<b>truth</b> {_esc(name)}<br>{tlat:.6f}, {tlon:.6f}<br>{err}", max_width=400
                ),
            ).add_to(group)

        # Prediction marker.
        folium.Marker(
            location=[plat, plon],
            popup=folium.Popup(_popup_html(name, res), max_width=450),
            tooltip=f"{i + 1}. {_esc(_short(name))} (conf {_fmt(res.get('confidence'), '.2f')})",
            icon=folium.Icon(color="blue", icon="camera", prefix="fa"),
        ).add_to(group)
        group.add_to(m)

    folium.LayerControl(collapsed=len(ok) > 8).add_to(m)
    m.fit_bounds([[s, w], [n, e]])

    root = m.get_root()
    root.html.add_child(folium.Element(_legend_html(title, failed, len(ok), len(results), bool(ok))))
    preview_bounds = (s, w, n, e) if base_image is None else _check_bounds(overview_bounds)
    preview = _jpeg_data_uri(_static_preview(ok, base_image, preview_bounds, tile_m))
    root.html.add_child(folium.Element(_offline_block(m.get_name(), title, preview, ok, failed)))

    write_text_atomic(out, root.render())
    return out
