"""Georeferenced reference windows around an index's tiles: what the verification stage matches.

A photo's footprint may straddle tiles, so the window around a retrieved tile is the tile plus a
margin on every side, read from the index's source at the index's ground sample distance; near
the raster's edge the window slides inward (same size) instead of leaving the raster. Each window
carries its pixel -> CRS ``Affine`` and the CRS, so a homography onto it is a ground pose.

A tile-folder index has no raster: the window is the tile image itself, placed north-up on a
local metric frame (azimuthal equidistant around the tile centre) with the index's tile size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.transform import Affine, from_origin

from cvgl.data.raster import raster_info, read_region
from cvgl.index.store import ReferenceIndex


@dataclass(frozen=True)
class Window:
    """One reference window: pixels, their georeferencing and the tile it surrounds."""

    window_id: str  # unique per (index, tile, size): the key of cached local features
    tile_id: str
    row: int
    image: np.ndarray
    transform: Affine  # pixel corner (col, row) -> (x, y) in ``crs``
    crs: str


def local_crs(lat: float, lon: float) -> str:
    """A metric frame centred on lat/lon (for tiles that have no CRS of their own)."""
    return f"+proj=aeqd +lat_0={lat:.9f} +lon_0={lon:.9f} +datum=WGS84 +units=m +no_defs"


class WindowReader:
    """Reads (and remembers the last few) windows of ``margin_m`` around tiles of ``index``."""

    def __init__(self, index: ReferenceIndex, margin_m: float, cache_size: int = 64) -> None:
        self.index = index
        self.margin_m = float(margin_m)
        self.source = index.tile_source()
        self.kind = self.source.kind
        self.side_m = index.manifest.tile_side_m + 2.0 * self.margin_m
        self._cache: dict[int, Window] = {}
        self._cache_size = cache_size
        self._bounds = raster_info(self.source.path).bounds if self.kind == "geotiff" else None

    def __call__(self, row: int) -> Window:
        row = int(row)
        if row not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[row] = self._read(row)
        return self._cache[row]

    def _read(self, row: int) -> Window:
        tile = self.index.tiles.iloc[row]
        tile_id = str(tile["tile_id"])
        if self.kind == "tile-folder":
            image = self.index.tile_image(row)
            side = self.index.manifest.tile_side_m
            h, w = image.shape[:2]
            transform = from_origin(-side / 2.0, side / 2.0, side / w, side / h)
            return Window(f"{self.index.path.name}:{tile_id}", tile_id, row, image, transform,
                          local_crs(float(tile["lat"]), float(tile["lon"])))
        left, bottom, right, top = self._bounds
        half = min(self.side_m, right - left, top - bottom) / 2.0
        cx = min(max(float(tile["x"]), left + half), right - half)
        cy = min(max(float(tile["y"]), bottom + half), top - half)
        spec = self.source.tiling
        image = read_region(self.source.path, cx, cy, 2.0 * half, spec.gsd_m, spec.bands, spec.stretch,
                            stretch_uint8=spec.stretch_uint8)
        px = 2.0 * half / image.shape[1]
        transform = from_origin(cx - half, cy + half, px, 2.0 * half / image.shape[0])
        return Window(f"{self.index.path.name}:{tile_id}:{2 * half:g}", tile_id, row, image, transform, self.index.crs or "")
