"""What a map is drawn on: the index's orthophoto, or its tiles laid out at their coordinates.

A basemap is a plain dict the map renderer (``static/cvgl_layers.js``) draws, shared by the offline
map file (images as ``data:`` URIs) and the service page (images as URLs it serves):

``{"kind": "image", "url", "bounds": [[south, west], [north, east]]}``
    a north-up orthophoto (the index's ``overview.png``) as an image overlay;
``{"kind": "mosaic", "tiles": FeatureCollection, "note"}``
    a tile-folder index (no overview raster): each tile a square of the index tile size at its
    centre, with its own small image (``url``), or an outline when its pixels cannot be read
    (``note`` says why) -- never an empty grey box.

JPEG, not PNG: a 256 px JPEG of aerial imagery is ~15 kB where the full-size PNG is ~2 MB.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from PIL import Image

from cvgl.errors import CvglError
from cvgl.viz.layers import feature_collection, square_feature

OVERVIEW_MAX_PX = 2048  # an embedded orthophoto is downscaled to this many pixels per side
MOSAIC_MAX_TILES = 400  # a tile-folder map shows at most this many tile images
MOSAIC_PX = 96  # side of an embedded mosaic tile
THUMBNAIL_PX = 256  # side of a served tile thumbnail
JPEG_QUALITY = 85


def rgb_image(pixels: np.ndarray, max_px: int) -> Image.Image:
    """An (H, W), (H, W, 3) or (H, W, 4) array as an RGB image at most ``max_px`` per side."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), mode="RGB")
    if max(image.size) > max_px:
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return image


def jpeg_bytes(pixels: np.ndarray, max_px: int = THUMBNAIL_PX, quality: int = JPEG_QUALITY) -> bytes:
    """``pixels`` as a JPEG at most ``max_px`` per side."""
    buffer = io.BytesIO()
    rgb_image(pixels, max_px).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_data_uri(pixels: np.ndarray, max_px: int, quality: int = JPEG_QUALITY) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(pixels, max_px, quality)).decode("ascii")


def check_bounds(bounds: Iterable[float]) -> tuple[float, float, float, float]:
    """``(south, west, north, east)`` in degrees, with south < north and west < east."""
    values = tuple(float(b) for b in bounds)
    if len(values) != 4 or not np.isfinite(values).all():
        raise ValueError(f"bounds must be (south, west, north, east) in degrees, got {values!r}")
    s, w, n, e = values
    if not (-90 <= s < n <= 90 and -180 <= w < e <= 180):
        raise ValueError(f"bounds must be (south, west, north, east) with south < north and west < east, got {values!r}")
    return s, w, n, e


def image_basemap(url: str, bounds: Iterable[float]) -> dict:
    """An orthophoto at ``url`` covering ``bounds`` = (south, west, north, east)."""
    s, w, n, e = check_bounds(bounds)
    return {"kind": "image", "url": url, "bounds": [[s, w], [n, e]]}


def overview_basemap(image: np.ndarray, bounds: Iterable[float], max_px: int = OVERVIEW_MAX_PX) -> dict:
    """The index overview embedded in the map file (a JPEG ``data:`` URI)."""
    return image_basemap(jpeg_data_uri(image, max_px), bounds)


def mosaic_rows(count: int, limit: int = MOSAIC_MAX_TILES, prefer: Iterable[int] = ()) -> np.ndarray:
    """Which of ``count`` tiles a mosaic shows: all when few, else ``prefer`` (e.g. the answers'
    top-k tiles) and then an even spread over the rest, ``limit`` in all, in row order."""
    if count <= limit:
        return np.arange(count)
    chosen = list(dict.fromkeys(int(r) for r in prefer if 0 <= int(r) < count))[:limit]
    rest = np.setdiff1d(np.arange(count), chosen)
    spread = rest[np.linspace(0, len(rest) - 1, limit - len(chosen)).round().astype(int)] if limit > len(chosen) else []
    return np.unique(np.concatenate([np.asarray(chosen, dtype=int), np.asarray(spread, dtype=int)]))


def mosaic_basemap(
    tiles: pd.DataFrame, rows: Iterable[int], tile_m: float, url_of: Callable[[int], str | None], note: str | None = None,
) -> dict:
    """Tiles ``rows`` as squares of ``tile_m`` at their centres, each with the image ``url_of(row)``."""
    lat, lon, ids = tiles["lat"].to_numpy(np.float64), tiles["lon"].to_numpy(np.float64), tiles["tile_id"].astype(str)
    features = [
        square_feature(lat[r], lon[r], tile_m, kind="tile", row=int(r), tile_id=ids.iloc[r], url=url_of(int(r)))
        for r in rows
    ]
    return {"kind": "mosaic", "tiles": feature_collection(features), "note": note}


def embedded_mosaic(
    tiles: pd.DataFrame, read_tile: Callable[[int], np.ndarray], tile_m: float, prefer: Iterable[int] = (),
    limit: int = MOSAIC_MAX_TILES, px: int = MOSAIC_PX,
) -> dict:
    """A mosaic whose tile images are read now (``read_tile(row)``) and embedded as ``data:`` URIs.

    When the pixels cannot be read (:class:`CvglError`: the source was moved or is unreadable),
    the tiles are still drawn at their coordinates, as outlines, and ``note`` says why."""
    rows = mosaic_rows(len(tiles), limit, prefer)
    problem: list[str] = []

    def url_of(row: int) -> str | None:
        if problem:
            return None  # the source is gone: do not try every tile again
        try:
            return jpeg_data_uri(read_tile(row), px)
        except CvglError as exc:
            problem.append(str(exc))
            return None

    basemap = mosaic_basemap(tiles, rows, tile_m, url_of)
    if problem:
        basemap["note"] = f"tile pixels unavailable: {problem[0]}"
    elif len(rows) < len(tiles):
        basemap["note"] = f"{len(rows)} of {len(tiles)} tiles shown"
    return basemap
