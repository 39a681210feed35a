"""Cutting a raster into overlapping, geo-tagged tiles: the grid (where tiles are) and the tiles.

The grid is computed from the raster's ground geometry alone (torchgeo's "sampler" side); only
the nodata filter and the tiles themselves read pixels, through :mod:`cvgl.data.raster`.

* **Ground units, not pixels.** A tiling is specified in metres (``tile_m``, ``stride_m``) and a
  target ground sample distance (``gsd_m``), so every raster yields tiles that cover the same
  ground at the same scale. Windows are kept in *fractional* source pixels and read with GDAL
  resampling to exactly ``round(tile_m / gsd_m)`` pixels, so no rounding drift accumulates.
* **The grid is centred**: ``n = floor((extent - tile) / stride) + 1`` tiles per axis and the
  leftover strip (< one stride) is split evenly between both edges.
* Tiles with more than ``max_empty_fraction`` nodata are dropped; remaining nodata pixels are 0.
* **Bounded before it is built.** The grid's cell count is known from the raster's size alone, so
  a tiling that would need more memory than :mod:`cvgl.budget` allows (a 0.001 m stride over a
  1 km scene is 10^12 cells) is refused before any cell is made (:data:`GRID_CELL_BYTES` each).

:class:`TileSource` says where one index's tile pixels come from (a GeoTIFF + tiling + stretch,
or a folder of tile images) and reads them back by tile-table row: the one place that turns a
row of ``tiles.parquet`` into pixels (index building, maps, grids, the service, verification).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.io import DatasetReader
from rasterio.windows import Window

from cvgl.budget import check_items, count_text
from cvgl.data.images import load_image
from cvgl.data.raster import (
    MAX_TILE_PX,
    MIN_TILE_PX,
    BandStretch,
    PathLike,
    RasterGeometry,
    all_valid,
    check_band_tuple,
    check_percentiles,
    check_positive,
    combine_valid,
    compute_stretch,
    gdal_errors,
    open_validated,
    parse_crs,
    pixel_to_xy,
    read_bands,
    read_region,
    read_valid_mask,
    resolve_bands,
    unique_bands,
)
from cvgl.errors import InputError
from cvgl.geo import crs_key, to_latlon

__all__ = ["TilingSpec", "Tile", "GridCell", "TileSource", "tile_grid", "grid_size", "kept_cells", "count_tiles", "iter_tiles"]

#: Memory one planned grid cell costs until the index is written: the GridCell, its row of the
#: tile table and its share of the shard plan (measured with tracemalloc on a 40 000-cell grid:
#: 0.5 KiB held, 0.64 KiB at the peak of building the table; rounded up for the plan's copies).
GRID_CELL_BYTES = 1024


@dataclass(frozen=True)
class TilingSpec:
    """How to cut a raster into tiles; every size is in ground metres.

    Attributes:
        tile_m: ground length of a tile side. 112 m at 0.5 m GSD gives the 224 px a ViT expects.
        stride_m: distance between neighbouring tile origins; half a tile means every ground
            point lies in up to four tiles, so a query is never only at a tile's edge.
        gsd_m: target ground sample distance of the output tiles; ``None`` keeps the raster's
            native resolution (the finer axis for non-square pixels).
        bands: 1-based band indexes, either one band (replicated to grey RGB) or three (R, G, B).
            ``None`` = auto: a 1- or 2-band raster (grey, grey + alpha) uses band 1 three times;
            3+ bands use the bands GDAL labels red/green/blue, else bands 1, 2, 3. For a
            DigitalGlobe/Maxar 8-band MUL product (coastal, blue, green, yellow, red, red-edge,
            NIR1, NIR2) that would be coastal/blue/green, so pass ``bands=(5, 3, 2)`` for true
            colour (4-band MUL: blue, green, red, NIR → ``bands=(3, 2, 1)``).
        stretch: (low, high) percentiles mapped to 0 and 255, computed once over the whole raster
            with nodata excluded. ``None`` = no clipping (linear min → max). Not applied to
            uint8 rasters unless ``stretch_uint8`` is true.
        stretch_uint8: also stretch uint8 rasters (useful for hazy or low-contrast 8-bit scenes).
        max_empty_fraction: tiles with a larger fraction of nodata pixels are skipped.
        crs: replaces the raster's own CRS (a wrong or missing tag; ``cvgl index --crs``), as
            ``"EPSG:<code>"``, for the grid and for every later read of the tiles.
    """

    tile_m: float = 112.0
    stride_m: float = 56.0
    gsd_m: float | None = 0.5
    bands: tuple[int, ...] | None = None
    stretch: tuple[float, float] | None = (2.0, 98.0)
    stretch_uint8: bool = False
    max_empty_fraction: float = 0.5
    crs: str | None = None

    def __post_init__(self) -> None:
        check_positive("tile_m", self.tile_m)
        check_positive("stride_m", self.stride_m)
        if self.gsd_m is not None:
            check_positive("gsd_m", self.gsd_m)
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
            check_band_tuple(self.bands)
        if self.stretch is not None:
            object.__setattr__(self, "stretch", check_percentiles(self.stretch))
        if not (0.0 <= float(self.max_empty_fraction) <= 1.0):
            raise InputError(
                f"tiling: max_empty_fraction must be between 0 and 1 (got {self.max_empty_fraction})"
            )
        if self.crs is not None:
            parse_crs(self.crs)  # a one-line error now, not at the first read
            object.__setattr__(self, "crs", crs_key(self.crs))


@dataclass
class Tile:
    """One reference tile: pixels plus where it is.

    ``lat``/``lon`` (EPSG:4326) and ``x``/``y`` (in ``crs``, the source CRS) are the tile centre;
    ``window`` is ``(col_off, row_off, width, height)`` in fractional source pixels; ``gsd_m`` is
    the ground sample distance actually delivered (``tile_m / image side``); ``crs`` is the source
    CRS as ``"EPSG:<code>"`` (or WKT); ``valid_fraction`` is the share of non-nodata pixels.
    """

    tile_id: str
    image: np.ndarray
    lat: float
    lon: float
    x: float
    y: float
    window: tuple[float, float, float, float]
    gsd_m: float
    crs: str
    valid_fraction: float = 1.0


@dataclass(frozen=True)
class GridCell:
    """A tile position in the grid, known without reading any pixel."""

    tile_id: str
    row: int
    col: int
    window: tuple[float, float, float, float]
    x: float
    y: float
    lat: float
    lon: float


def _tile_px(geom: RasterGeometry, spec: TilingSpec, name: str) -> int:
    gsd = spec.gsd_m if spec.gsd_m is not None else min(geom.px_m_x, geom.px_m_y)
    px = round(spec.tile_m / gsd)
    if not (MIN_TILE_PX <= px <= MAX_TILE_PX):
        raise InputError(
            f"{name}: tile_m {spec.tile_m} m at {gsd:.3g} m/px gives {px} px tiles; choose "
            f"tile_m and gsd_m so tiles are {MIN_TILE_PX}–{MAX_TILE_PX} px (e.g. 112 m at 0.5 m)"
        )
    return px


def _axis_count(n_px: int, px_m: float, spec: TilingSpec) -> int:
    """Tile positions along one axis of ``n_px`` pixels (0 when the axis is shorter than a tile)."""
    extent = n_px * px_m
    if extent < spec.tile_m * (1 - 1e-9):
        return 0
    return int(math.floor((extent - spec.tile_m) / spec.stride_m + 1e-9)) + 1


def _grid_shape(geom: RasterGeometry, spec: TilingSpec) -> tuple[int, int]:
    """(rows, cols) of the grid, from the raster's size alone."""
    return _axis_count(geom.height, geom.px_m_y, spec), _axis_count(geom.width, geom.px_m_x, spec)


def _check_grid(geom: RasterGeometry, spec: TilingSpec, name: str) -> None:
    rows, cols = _grid_shape(geom, spec)
    check_items(
        f"{name}: a {spec.tile_m:g} m tile every {spec.stride_m:g} m gives a grid of {count_text(rows)} x {count_text(cols)} "
        f"= {count_text(float(rows) * cols)} cells, which",
        float(rows) * cols, GRID_CELL_BYTES,
        "use a larger --stride-m (half the tile side is the default) or cut the raster",
    )


def grid_size(path: PathLike, spec: TilingSpec = TilingSpec()) -> int:
    """How many grid cells ``path`` has under ``spec`` (before the nodata filter), reading no pixel;
    also the cheap check of a source before a model is loaded (CRS, tile size, grid memory)."""
    ds, geom = open_validated(path, spec.crs)
    with ds:
        _tile_px(geom, spec, str(path))
        _check_grid(geom, spec, str(path))
        rows, cols = _grid_shape(geom, spec)
        return rows * cols


def _axis_offsets(n_px: int, px_m: float, spec: TilingSpec) -> np.ndarray:
    """Tile origins (fractional source pixels) along one axis of ``n_px`` pixels, grid centred."""
    extent = n_px * px_m
    n = _axis_count(n_px, px_m, spec)
    margin = (extent - ((n - 1) * spec.stride_m + spec.tile_m)) / 2.0
    offsets = (margin + np.arange(n) * spec.stride_m) / px_m
    size_px = spec.tile_m / px_m
    return np.clip(offsets, 0.0, max(0.0, n_px - size_px))


def _grid(geom: RasterGeometry, spec: TilingSpec, name: str) -> list[GridCell]:
    for n_px, px_m, axis in ((geom.width, geom.px_m_x, "wide"), (geom.height, geom.px_m_y, "tall")):
        if n_px * px_m < spec.tile_m * (1 - 1e-9):
            raise InputError(
                f"{name}: raster is {n_px * px_m:.1f} m {axis}, smaller than one {spec.tile_m:g} m "
                "tile; use a larger raster or a smaller tile_m"
            )
    _check_grid(geom, spec, name)
    w_px, h_px = spec.tile_m / geom.px_m_x, spec.tile_m / geom.px_m_y
    col_offs = _axis_offsets(geom.width, geom.px_m_x, spec)
    row_offs = _axis_offsets(geom.height, geom.px_m_y, spec)
    rr, cc = np.meshgrid(np.arange(len(row_offs)), np.arange(len(col_offs)), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    ccol = col_offs[cc] + w_px / 2.0
    crow = row_offs[rr] + h_px / 2.0
    xs, ys = pixel_to_xy(geom.transform, ccol, crow)
    lat, lon = to_latlon(geom.crs, xs, ys)
    lat, lon = np.atleast_1d(lat), np.atleast_1d(lon)
    return [
        GridCell(
            tile_id=f"r{int(r):04d}_c{int(c):04d}",
            row=int(r),
            col=int(c),
            window=(float(col_offs[c]), float(row_offs[r]), float(w_px), float(h_px)),
            x=float(xs[i]),
            y=float(ys[i]),
            lat=float(lat[i]),
            lon=float(lon[i]),
        )
        for i, (r, c) in enumerate(zip(rr, cc))
    ]


def tile_grid(path: PathLike, spec: TilingSpec = TilingSpec()) -> list[GridCell]:
    """Every grid position of ``path`` under ``spec``, row-major, without reading pixels.

    Per axis there are ``floor((extent_m - tile_m) / stride_m) + 1`` positions, centred on the
    raster. Cells are not filtered for nodata (see :func:`count_tiles` for the kept count).
    """
    ds, geom = open_validated(path, spec.crs)
    with ds:
        _tile_px(geom, spec, str(path))
        return _grid(geom, spec, str(path))


def _mask_fraction_ok(valid: np.ndarray | None, spec: TilingSpec) -> tuple[bool, float]:
    """Whether a tile's nodata fraction is acceptable, and its valid fraction."""
    if valid is None:
        return True, 1.0
    frac = float(valid.mean())
    return (1.0 - frac) <= spec.max_empty_fraction + 1e-12, frac


def _needs_data_for_mask(ds: DatasetReader) -> bool:
    """Float rasters without a nodata value can still mark holes with NaN, visible only in data."""
    return ds.dtypes[0] == "float32" and ds.nodata is None


def _scan(
    path: PathLike, spec: TilingSpec, with_pixels: bool
) -> Iterator[tuple[GridCell, np.ndarray | None, float, np.ndarray | None, RasterGeometry, int]]:
    """Walk the grid, applying the nodata filter; read pixels only when needed.

    Yields ``(cell, data 3-channel-ordered or None, valid_fraction, valid mask, geometry, px)``
    for kept cells. The GDAL mask is checked first so that empty tiles cost no pixel read.
    """
    name = str(path)
    ds, geom = open_validated(path, spec.crs)
    with ds:
        out_px = _tile_px(geom, spec, name)
        cells = _grid(geom, spec, name)
        bands = resolve_bands(ds, spec.bands, name)
        uniq, pos = unique_bands(bands)
        every_valid = all_valid(ds, uniq)
        nan_check = _needs_data_for_mask(ds)
        for cell in cells:
            window = Window(*cell.window)
            valid = None
            if not every_valid:
                with gdal_errors(name, "reading the nodata mask"):
                    valid = read_valid_mask(ds, uniq, window, out_px, out_px)
                if not _mask_fraction_ok(valid, spec)[0]:
                    continue
            data = None
            if with_pixels or nan_check:
                data = read_bands(ds, name, uniq, window, out_px)
                valid = combine_valid(valid, data)
            keep, frac = _mask_fraction_ok(valid, spec)
            if not keep:
                continue
            yield cell, (None if data is None else data[pos]), frac, valid, geom, out_px


def kept_cells(path: PathLike, spec: TilingSpec = TilingSpec()) -> list[GridCell]:
    """The grid cells :func:`iter_tiles` yields tiles for, in the same order.

    Reads only nodata masks (nothing at all for rasters without nodata), so it is much cheaper
    than tiling; float rasters without a nodata value are read to find NaN holes.
    """
    return [cell for cell, *_ in _scan(path, spec, with_pixels=False)]


def count_tiles(path: PathLike, spec: TilingSpec = TilingSpec()) -> int:
    """Exactly how many tiles :func:`iter_tiles` will yield (for progress bars)."""
    return len(kept_cells(path, spec))


def iter_tiles(path: PathLike, spec: TilingSpec = TilingSpec()) -> Iterator[Tile]:
    """Yield the tiles of ``path`` row by row, skipping those with too much nodata.

    Each tile is ``round(tile_m / gsd_m)`` pixels square, resampled from the source window with
    area averaging when downsampling and bilinear interpolation when upsampling, and mapped to
    uint8 with the raster-wide :class:`BandStretch` (see :func:`compute_stretch`).
    """
    stretch = compute_stretch(path, spec.bands, spec.stretch, spec.stretch_uint8, crs=spec.crs)
    for cell, data, frac, valid, geom, out_px in _scan(path, spec, with_pixels=True):
        assert data is not None  # with_pixels=True always reads
        yield Tile(
            tile_id=cell.tile_id,
            image=stretch.apply(data, valid),
            lat=cell.lat,
            lon=cell.lon,
            x=cell.x,
            y=cell.y,
            window=cell.window,
            gsd_m=spec.tile_m / out_px,
            crs=geom.crs,
            valid_fraction=frac,
        )


@dataclass(frozen=True)
class TileSource:
    """Where an index's tile pixels are: small and picklable (shipped to index-building workers).

    ``stretch`` is the raster-wide radiometric scale, computed once when planning so every worker
    maps 16-bit values to uint8 identically without re-reading the raster statistics; ``None``
    when reading tiles back later, where it is recomputed (cached per file) from ``tiling``.
    """

    path: str
    kind: str  # "geotiff" | "tile-folder"
    tiling: TilingSpec | None = None
    stretch: BandStretch | None = None

    def read(self, x: float | None = None, y: float | None = None, path_in_folder: str | None = None) -> np.ndarray:
        """One tile's ``H×W×3`` uint8 pixels: the ground square centred on (x, y) in the
        raster's CRS, or the image ``path_in_folder`` of a tile folder."""
        if self.kind == "tile-folder":
            if path_in_folder is None:
                raise InputError(f"{self.path}: a tile-folder tile needs its path inside the folder")
            return np.asarray(load_image(Path(self.path) / path_in_folder))
        spec = self.tiling
        if spec is None or x is None or y is None:
            raise InputError(f"{self.path}: a GeoTIFF tile needs the tiling and its centre")
        stretch = self.stretch if self.stretch is not None else spec.stretch
        return read_region(self.path, float(x), float(y), spec.tile_m, spec.gsd_m, spec.bands, stretch,
                           stretch_uint8=spec.stretch_uint8, crs=spec.crs)

    def with_stretch(self) -> TileSource:
        """The same source with its raster-wide stretch computed (what every worker should share)."""
        if self.kind != "geotiff" or self.stretch is not None or self.tiling is None:
            return self
        spec = self.tiling
        stretch = compute_stretch(self.path, spec.bands, spec.stretch, spec.stretch_uint8, crs=spec.crs)
        return TileSource(self.path, self.kind, spec, stretch)
