"""Reading GeoTIFF orthophotos: validation, ground geometry, radiometric stretch, regions, previews.

Cutting a raster into tiles is :mod:`cvgl.data.tiling`; a folder of tile images is
:mod:`cvgl.data.tile_folder`. Design choices, and why:

* **Ground size per pixel.** For a projected CRS (UTM, national grids; any linear unit) the pixel
  size in the CRS unit converted to metres is used as-is, so at native GSD a tile is an exact
  pixel crop. For a geographic (EPSG:4326) raster there is no such unit: the local metres per
  degree at the raster centre (different in x and y) is measured geodesically, from two points a
  few pixels apart converted to lat/lon. The same geodesic measurement is used for projections
  whose scale at the centre is off by more than 1 % (Web Mercator's "metres" are stretched by
  1/cos(lat)). The scale is taken once, at the centre: over the 1–20 km regions cvgl targets it
  varies by about 0.1 % or less towards the edges, i.e. centimetres per tile.
* **One radiometric scale per raster.** 16-bit and float imagery is mapped to uint8 with per-band
  percentiles (default 2–98 %) computed ONCE from a decimated read of the whole raster with nodata
  excluded. Per-tile stretching would make a dark field and a bright roof look alike and would
  give neighbouring overlapping tiles different colours. uint8 imagery is already display-scaled
  and is passed through unchanged (set ``stretch_uint8=True`` to stretch it as well).
* **Nodata** comes from GDAL's mask (``read_masks``: nodata value, alpha band or internal mask) plus
  non-finite floats; nodata pixels are set to 0.
* Every rasterio/GDAL failure is turned into a one-line :class:`~cvgl.errors.InputError` that names
  the file; no GDAL traceback reaches the user.
* **Georeferencing sanity.** A CRS tag can lie: an orthophoto in local metres tagged WGS84 (the
  OrthoLoC sample) has "latitudes" of -93..93 and 20 km "pixels", and tiling it would plan a
  1 TiB grid. A raster is refused, with what is wrong, when its bounds are not degrees although
  its CRS is geographic, when its centre lies outside its CRS's area of use (pyproj, widened by
  :data:`AREA_OF_USE_MARGIN_DEG`), or when one pixel is not a plausible ground size
  (:data:`MIN_GROUND_PIXEL_M`..:data:`MAX_GROUND_PIXEL_M`). ``crs=`` (``cvgl index --crs``)
  replaces a wrong or missing CRS everywhere a raster is read; the index records it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import rasterio
from pyproj import CRS as ProjCRS
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from cvgl.budget import check_image
from cvgl.errors import InputError
from cvgl.geo import WGS84_GEOD, crs_key, to_latlon

__all__ = [
    "SUPPORTED_DTYPES",
    "BandStretch",
    "RasterInfo",
    "RasterGeometry",
    "open_raster",
    "raster_info",
    "compute_stretch",
    "read_region",
    "raster_overview",
]

PathLike = Union[str, os.PathLike]

#: Pixel types accepted for reference rasters (8/16-bit and float orthophotos and satellite scenes).
SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")

# Decimated read size for the whole-raster percentile statistics: 1024² samples pin the 2nd/98th
# percentiles to well under one grey level while reading a 3340² scene in a fraction of a second.
_STATS_MAX_SIDE = 1024
# A projected CRS whose scale at the raster centre is within 1 % of true (UTM: <= 0.1 %, national
# grids alike) is taken at face value: projected metres = ground metres. That keeps native-GSD tiles
# exact pixel crops instead of resampling everything by a 0.9996 scale factor for 4 cm per tile.
_NOMINAL_SCALE_TOLERANCE = 0.01
# Output tile sizes outside this range are almost certainly a unit mistake (cm vs m, px vs m).
MIN_TILE_PX, MAX_TILE_PX = 8, 4096
_EPS = 1e-9
# Plausible ground size of one orthophoto pixel: from close-range drone mosaics (mm) to coarse
# satellite products (1 km). Outside this, the CRS or the geotransform is wrong.
MIN_GROUND_PIXEL_M, MAX_GROUND_PIXEL_M = 1e-3, 1000.0
# A raster's centre may lie this far outside its CRS's published area of use (UTM zones are
# routinely used a degree or two past their edges) before the CRS is called wrong.
AREA_OF_USE_MARGIN_DEG = 2.0


# ----------------------------------------------------------------------------------------------
# Public data types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandStretch:
    """Per-channel linear map ``low → 0, high → 255`` (R, G, B order), shared by all tiles."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def apply(self, data: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Map a ``3×H×W`` array to an ``H×W×3`` uint8 image; invalid pixels become 0."""
        lo = np.asarray(self.low, dtype=np.float32)[:, None, None]
        span = np.asarray(self.high, dtype=np.float32)[:, None, None] - lo
        scale = np.where(span > 0, 255.0 / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
        out = (data.astype(np.float32) - lo) * scale
        np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(out, 0.0, 255.0, out=out)
        img = np.rint(out).astype(np.uint8).transpose(1, 2, 0)
        if valid is not None:
            img[~valid] = 0
        return np.ascontiguousarray(img)


@dataclass(frozen=True)
class RasterInfo:
    """What cvgl needs to know about a validated raster (no pixels read)."""

    path: str
    crs: str
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    pixel_size_m: tuple[float, float]
    bounds: tuple[float, float, float, float]  # left, bottom, right, top in the source CRS
    bounds_latlon: tuple[float, float, float, float]  # south, west, north, east
    center_latlon: tuple[float, float]
    is_geographic: bool


# ----------------------------------------------------------------------------------------------
# Opening and validation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RasterGeometry:
    """Ground geometry of a north-up raster, measured once at its centre."""

    width: int
    height: int
    px_m_x: float
    px_m_y: float
    crs: str
    is_geographic: bool
    transform: rasterio.Affine = field(repr=False)


def open_raster(path: PathLike, crs: str | None = None) -> DatasetReader:
    """Open ``path`` with rasterio after checking it can be tiled; the caller closes it.

    Checks, each failing with a one-line :class:`InputError` naming the file: it exists and is a
    file; GDAL can read it; it has a CRS and a non-identity, north-up geotransform; the CRS converts
    to lat/lon (projected, any linear unit, or geographic); the pixel type is one of
    :data:`SUPPORTED_DTYPES`; its georeferencing is plausible (see the module docstring).
    ``crs`` replaces the file's CRS (a wrong or missing tag).
    """
    ds, _ = open_validated(path, crs)
    return ds


def raster_info(path: PathLike, crs: str | None = None) -> RasterInfo:
    """Validate ``path`` and describe it: CRS, size, pixel size in metres, lat/lon bounds.
    ``crs`` replaces the file's CRS (a wrong or missing tag)."""
    ds, geom = open_validated(path, crs)
    with ds:
        b = ds.bounds
        south, west, north, east = _bounds_latlon(geom)
        clat, clon = pixel_to_latlon(geom, np.array([geom.width / 2]), np.array([geom.height / 2]))
        return RasterInfo(
            path=str(path),
            crs=geom.crs,
            width=geom.width,
            height=geom.height,
            count=ds.count,
            dtype=ds.dtypes[0],
            nodata=None if ds.nodata is None else float(ds.nodata),
            pixel_size_m=(geom.px_m_x, geom.px_m_y),
            bounds=(b.left, b.bottom, b.right, b.top),
            bounds_latlon=(south, west, north, east),
            center_latlon=(float(clat[0]), float(clon[0])),
            is_geographic=geom.is_geographic,
        )


def parse_crs(text: str, what: str = "--crs") -> CRS:
    """A CRS given by the user (``EPSG:25832``, a PROJ string or WKT), or a one-line InputError."""
    try:  # pyproj first: it says what is wrong without GDAL printing its own error lines
        return CRS.from_wkt(ProjCRS.from_user_input(text).to_wkt())
    except Exception as exc:  # noqa: BLE001 - pyproj and rasterio raise CRSError, ValueError, TypeError
        raise InputError(f"{what} '{str(text)[:80]}': not a CRS ({one_line(exc)}); give e.g. EPSG:32632") from None


def open_validated(path: PathLike, crs: str | None = None) -> tuple[DatasetReader, RasterGeometry]:
    """Open and validate ``path`` (see :func:`open_raster`); ``crs`` replaces the file's CRS."""
    name = str(path)
    p = Path(path)
    override = None if crs is None else parse_crs(crs)
    if not p.exists():
        raise InputError(f"{name}: file not found; check the path")
    if p.is_dir():
        raise InputError(
            f"{name}: is a folder, not a raster; give a GeoTIFF file, or a folder of tiles + CSV"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(p)
    except (RasterioError, CPLE_BaseError) as exc:
        raise InputError(
            f"{name}: not a readable raster ({one_line(exc)}); give a GeoTIFF or another "
            "GDAL-readable image"
        ) from None
    try:
        geom = _validate(ds, name, override)
    except CRSError as exc:
        ds.close()
        raise InputError(
            f"{name}: CRS cannot be interpreted ({one_line(exc)}); reproject to a UTM or "
            "EPSG:4326 CRS with gdalwarp -t_srs"
        ) from None
    except BaseException:
        ds.close()
        raise
    return ds, geom


def _validate(ds: DatasetReader, name: str, override: CRS | None = None) -> RasterGeometry:
    t = ds.transform
    crs = override if override is not None else ds.crs
    if t.is_identity:
        raise InputError(
            f"{name}: not georeferenced (no CRS/geotransform); give a GeoTIFF with a CRS, "
            "or use a folder of tiles + CSV"
        )
    if crs is None:
        raise InputError(f"{name}: not georeferenced (a geotransform but no CRS); name its CRS with --crs EPSG:<code>")
    if abs(t.b) > _EPS * abs(t.a) or abs(t.d) > _EPS * abs(t.e):
        raise InputError(
            f"{name}: rotated or sheared geotransform is not supported; make it north-up first "
            "(e.g. gdalwarp in.tif out.tif)"
        )
    if t.a <= 0 or t.e >= 0:
        raise InputError(
            f"{name}: flipped geotransform (pixel size {t.a}, {t.e}) is not supported; make it "
            "north-up first (e.g. gdalwarp in.tif out.tif)"
        )
    dtype = ds.dtypes[0]
    if dtype not in SUPPORTED_DTYPES or len(set(ds.dtypes)) != 1:
        raise InputError(
            f"{name}: pixel type {dtype} is not supported; convert to one of "
            f"{', '.join(SUPPORTED_DTYPES)} (e.g. gdal_translate -ot UInt16)"
        )
    if ds.count < 1:
        raise InputError(f"{name}: raster has no bands")
    try:
        key = crs_key(crs)
    except Exception as exc:  # pyproj raises several types for exotic/local CRSs
        raise InputError(
            f"{name}: CRS cannot be interpreted ({one_line(exc)}); reproject to a UTM or "
            "EPSG:4326 CRS with gdalwarp -t_srs"
        ) from None
    geom = RasterGeometry(
        width=ds.width,
        height=ds.height,
        px_m_x=1.0,
        px_m_y=1.0,
        crs=key,
        is_geographic=bool(crs.is_geographic),
        transform=t,
    )
    if geom.is_geographic:
        _check_degrees(ds, key, name)
    px_m_x, px_m_y = _ground_pixel_size(geom, name)
    _check_georeferencing(geom, px_m_x, px_m_y, name)
    nominal = _nominal_pixel_size(crs, t)
    if nominal is not None and all(
        abs(g / n - 1.0) < _NOMINAL_SCALE_TOLERANCE for g, n in zip((px_m_x, px_m_y), nominal)
    ):
        px_m_x, px_m_y = nominal
    return RasterGeometry(
        width=geom.width,
        height=geom.height,
        px_m_x=px_m_x,
        px_m_y=px_m_y,
        crs=key,
        is_geographic=geom.is_geographic,
        transform=t,
    )


_CRS_ADVICE = "give the right CRS with --crs EPSG:<code> (or fix the file: gdal_edit.py -a_srs EPSG:<code>)"


def _check_degrees(ds: DatasetReader, key: str, name: str) -> None:
    """A geographic CRS must come with bounds that are longitudes and latitudes."""
    b = ds.bounds
    if not (-90.0 - _EPS <= b.bottom <= b.top <= 90.0 + _EPS and -180.0 - _EPS <= b.left <= b.right <= 360.0 + _EPS):
        raise InputError(
            f"{name}: its CRS {key} is in degrees but its bounds (x {b.left:.6g}..{b.right:.6g}, y {b.bottom:.6g}.."
            f"{b.top:.6g}) are not longitudes/latitudes, so the coordinates are probably metres; {_CRS_ADVICE}"
        )


@functools.lru_cache(maxsize=64)
def _area_of_use(key: str) -> tuple[str, float, float, float, float] | None:
    try:
        area = ProjCRS.from_user_input(key).area_of_use
    except Exception:  # noqa: BLE001 - a CRS pyproj cannot describe has no area to check against
        return None
    return None if area is None else (area.name, area.west, area.south, area.east, area.north)


def _check_georeferencing(geom: RasterGeometry, px_m_x: float, px_m_y: float, name: str) -> None:
    """Refuse a raster whose centre lies outside its CRS's area of use or whose pixels are not a
    plausible ground size: either means the CRS (or the geotransform) is wrong."""
    if not (MIN_GROUND_PIXEL_M <= min(px_m_x, px_m_y) and max(px_m_x, px_m_y) <= MAX_GROUND_PIXEL_M):
        raise InputError(
            f"{name}: one pixel is {px_m_x:.3g} x {px_m_y:.3g} m on the ground in its CRS {geom.crs}, not a plausible "
            f"orthophoto resolution ({MIN_GROUND_PIXEL_M:g}-{MAX_GROUND_PIXEL_M:g} m); the CRS or the geotransform "
            f"is probably wrong; {_CRS_ADVICE}"
        )
    area = _area_of_use(geom.crs)
    if area is None:
        return
    label, west, south, east, north = area
    label = label.split(":")[0].strip().rstrip(".")[:60]
    lat, lon = pixel_to_latlon(geom, np.array([geom.width / 2.0]), np.array([geom.height / 2.0]))
    lat, lon, m = float(lat[0]), float(lon[0]), AREA_OF_USE_MARGIN_DEG
    in_lat = south - m <= lat <= north + m
    if west <= east:
        in_lon = west - m <= lon <= east + m or east - west >= 360.0 - 2 * m
    else:  # the area crosses the antimeridian
        in_lon = lon >= west - m or lon <= east + m
    if not (in_lat and in_lon):
        raise InputError(
            f"{name}: its centre ({lat:.4f}, {lon:.4f}) lies outside the area where its CRS {geom.crs} is valid "
            f"({label}: lon {west:g}..{east:g}, lat {south:g}..{north:g}), so the CRS is probably wrong; {_CRS_ADVICE}"
        )


def _nominal_pixel_size(crs: CRS, t: rasterio.Affine) -> tuple[float, float] | None:
    """Pixel size in the projected CRS's own linear unit converted to metres (None if geographic)."""
    if crs.is_geographic:
        return None
    try:
        _, factor = crs.linear_units_factor
    except Exception:  # rasterio raises CRSError for CRSs without a linear unit
        return None
    return abs(t.a) * float(factor), abs(t.e) * float(factor)


def _ground_pixel_size(geom: RasterGeometry, name: str) -> tuple[float, float]:
    """Metres per source pixel along x and y, measured geodesically at the raster centre.

    Works for any CRS that converts to lat/lon: metres per degree for geographic rasters, true
    ground size for Web Mercator (whose "metres" are stretched by 1/cos(lat)). Doubles as the check
    that the CRS converts to lat/lon at all. ``span`` pixels either side of the centre keep the
    measurement far above float noise.
    """
    cx, cy = geom.width / 2.0, geom.height / 2.0
    span = 5.0
    cols = np.array([cx - span, cx + span, cx, cx])
    rows = np.array([cy, cy, cy - span, cy + span])
    try:
        lat, lon = pixel_to_latlon(geom, cols, rows)
        dx = WGS84_GEOD.inv(lon[0], lat[0], lon[1], lat[1])[2]
        dy = WGS84_GEOD.inv(lon[2], lat[2], lon[3], lat[3])[2]
    except Exception as exc:  # pyproj: ProjError / CRSError for CRSs without a path to WGS84
        raise InputError(
            f"{name}: its CRS cannot be converted to lat/lon ({one_line(exc)}); reproject to a "
            "UTM or EPSG:4326 CRS with gdalwarp -t_srs"
        ) from None
    px_x, px_y = dx / (2 * span), dy / (2 * span)
    if not (math.isfinite(px_x) and math.isfinite(px_y)) or px_x <= 0 or px_y <= 0:
        raise InputError(
            f"{name}: cannot measure its ground pixel size (does the raster lie inside its "
            "CRS's valid area?); reproject to a UTM or EPSG:4326 CRS with gdalwarp -t_srs"
        )
    return float(px_x), float(px_y)


def pixel_to_latlon(geom: RasterGeometry, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = pixel_to_xy(geom.transform, cols, rows)
    lat, lon = to_latlon(geom.crs, xs, ys)
    return np.asarray(lat), np.asarray(lon)


def pixel_to_xy(t: rasterio.Affine, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cols = np.asarray(cols, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def _bounds_latlon(geom: RasterGeometry) -> tuple[float, float, float, float]:
    """(south, west, north, east) of the raster, from points along all four edges.

    Sampling the edges (not just corners) catches the bulge of projected edges in lat/lon.
    """
    n = 21
    s = np.linspace(0.0, 1.0, n)
    cols = np.concatenate([s * geom.width, s * geom.width, np.zeros(n), np.full(n, geom.width)])
    rows = np.concatenate([np.zeros(n), np.full(n, geom.height), s * geom.height, s * geom.height])
    lat, lon = pixel_to_latlon(geom, cols, rows)
    return float(lat.min()), float(lon.min()), float(lat.max()), float(lon.max())


@contextlib.contextmanager
def gdal_errors(name: str, what: str) -> Iterator[None]:
    """Turn rasterio/GDAL exceptions raised while reading into a one-line InputError."""
    try:
        yield
    except (RasterioError, CPLE_BaseError) as exc:
        raise InputError(
            f"{name}: {what} failed ({one_line(exc)}); the file may be truncated or corrupt"
        ) from None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def check_positive(what: str, value: object) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value))
    if not ok or float(value) <= 0:  # type: ignore[arg-type]
        raise InputError(f"tiling: {what} must be a positive number of metres (got {value!r})")


def check_band_tuple(bands: tuple[int, ...]) -> None:
    if len(bands) not in (1, 3) or any(b < 1 for b in bands):
        raise InputError(
            f"bands {bands}: give one band (grey) or three 1-based bands in R,G,B order, "
            "e.g. 5,3,2 for an 8-band WorldView MUL image"
        )


def check_percentiles(pct: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pct)
    except (TypeError, ValueError):
        raise InputError(f"stretch percentiles {pct!r}: give two numbers low,high, e.g. 2,98") from None
    if not (0.0 <= lo < hi <= 100.0):
        raise InputError(f"stretch percentiles {tuple(pct)}: need 0 <= low < high <= 100, e.g. 2,98")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Bands, masks and stretch
# ----------------------------------------------------------------------------------------------


def resolve_bands(ds: DatasetReader, bands: Sequence[int] | None, name: str) -> tuple[int, int, int]:
    """The three 1-based band indexes to read as R, G, B."""
    if bands is None:
        if ds.count < 3:
            return (1, 1, 1)
        interp = list(ds.colorinterp)
        wanted = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        if all(c in interp for c in wanted):
            r, g, b = (interp.index(c) + 1 for c in wanted)
            return (r, g, b)
        return (1, 2, 3)
    chosen = tuple(int(b) for b in bands)
    check_band_tuple(chosen)
    too_big = [b for b in chosen if b > ds.count]
    if too_big:
        raise InputError(
            f"{name}: has {ds.count} band(s) but band {too_big[0]} was requested; "
            f"pick bands between 1 and {ds.count}"
        )
    if len(chosen) == 1:
        return (chosen[0],) * 3
    return chosen  # type: ignore[return-value]


def unique_bands(bands: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Distinct bands to read and, for each RGB channel, its position among them."""
    uniq = sorted(set(bands))
    return uniq, [uniq.index(b) for b in bands]


def all_valid(ds: DatasetReader, uniq: list[int]) -> bool:
    return all(MaskFlags.all_valid in ds.mask_flag_enums[b - 1] for b in uniq)


def read_valid_mask(
    ds: DatasetReader, uniq: list[int], window: Window, out_h: int, out_w: int
) -> np.ndarray | None:
    """GDAL validity mask (True = data) at the output size, or None if every pixel is valid."""
    if all_valid(ds, uniq):
        return None
    masks = ds.read_masks(
        uniq, window=window, out_shape=(len(uniq), out_h, out_w), resampling=Resampling.nearest
    )
    return np.all(masks > 0, axis=0)


def combine_valid(valid: np.ndarray | None, data: np.ndarray) -> np.ndarray | None:
    if data.dtype.kind == "f":
        finite = np.all(np.isfinite(data), axis=0)
        if not finite.all():
            return finite if valid is None else (valid & finite)
    return valid


# Raster-wide stretches by (file key, bands, percentiles, stretch_uint8); a few files at most are
# in use at once (the reference raster and a query orthophoto), so a tiny FIFO is plenty.
_STRETCH_CACHE: dict[tuple[object, ...], BandStretch] = {}
_STRETCH_CACHE_SIZE = 32


def cached_stretch(
    ds: DatasetReader,
    path: PathLike,
    bands: tuple[int, int, int],
    pct: tuple[float, float] | None,
    stretch_uint8: bool,
) -> BandStretch:
    """:func:`_compute_stretch` on the open ``ds``, cached per file version and arguments."""
    key = (_file_key(path), bands, pct, bool(stretch_uint8))
    hit = _STRETCH_CACHE.get(key)
    if hit is None:
        hit = _compute_stretch(ds, str(path), bands, pct, bool(stretch_uint8))
        if len(_STRETCH_CACHE) >= _STRETCH_CACHE_SIZE:
            _STRETCH_CACHE.pop(next(iter(_STRETCH_CACHE)))
        _STRETCH_CACHE[key] = hit
    return hit


def _file_key(path: PathLike) -> tuple[str, int, int]:
    """Cache key that changes when the file is rewritten (absolute path, mtime, size)."""
    st = os.stat(path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def compute_stretch(
    path: PathLike,
    bands: Sequence[int] | None = None,
    percentiles: tuple[float, float] | None = (2.0, 98.0),
    stretch_uint8: bool = False,
    crs: str | None = None,
) -> BandStretch:
    """The raster-wide uint8 mapping used for every tile and region of ``path``.

    Percentiles are per band (R, G, B), over valid pixels of a decimated (≤ 1024 px a side) read of
    the whole raster. Cached per file (path, mtime, size) and arguments, so cutting many query crops
    from one orthophoto reads the statistics once. uint8 rasters get the identity map unless
    ``stretch_uint8`` is true; ``percentiles=None`` maps the valid min → 0 and max → 255.
    """
    pct = None if percentiles is None else check_percentiles(percentiles)
    ds, _ = open_validated(path, crs)
    with ds:
        chosen = resolve_bands(ds, bands, str(path))
        return cached_stretch(ds, path, chosen, pct, stretch_uint8)


def _compute_stretch(
    ds: DatasetReader,
    name: str,
    bands: tuple[int, int, int],
    pct: tuple[float, float] | None,
    stretch_uint8: bool,
) -> BandStretch:
    if ds.dtypes[0] == "uint8" and not stretch_uint8:
        return BandStretch((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
    uniq, pos = unique_bands(bands)
    scale = min(1.0, _STATS_MAX_SIDE / max(ds.width, ds.height))
    out_h, out_w = max(1, round(ds.height * scale)), max(1, round(ds.width * scale))
    with gdal_errors(name, "reading the raster statistics"):
        data = ds.read(uniq, out_shape=(len(uniq), out_h, out_w), resampling=Resampling.nearest)
        valid = read_valid_mask(ds, uniq, Window(0, 0, ds.width, ds.height), out_h, out_w)
    valid = combine_valid(valid, data)
    lo_pct, hi_pct = pct if pct is not None else (0.0, 100.0)
    lows, highs = [], []
    for i in range(len(uniq)):
        values = data[i] if valid is None else data[i][valid]
        if values.size == 0:
            raise InputError(f"{name}: every pixel is nodata; check the nodata value or the mask")
        lo, hi = np.percentile(values, [lo_pct, hi_pct])
        lows.append(float(lo))
        highs.append(float(hi))
    return BandStretch(
        (lows[pos[0]], lows[pos[1]], lows[pos[2]]), (highs[pos[0]], highs[pos[1]], highs[pos[2]])
    )


def read_bands(
    ds: DatasetReader, name: str, uniq: list[int], window: Window, out_px: int
) -> np.ndarray:
    """Read ``window`` of the given bands resampled to ``out_px``² (area down, bilinear up)."""
    downsampling = window.width > out_px * (1 + 1e-6) or window.height > out_px * (1 + 1e-6)
    resampling = Resampling.average if downsampling else Resampling.bilinear
    with gdal_errors(name, f"reading window {format_window(window)}"):
        return ds.read(uniq, window=window, out_shape=(len(uniq), out_px, out_px), resampling=resampling)


def format_window(w: Window) -> str:
    return f"(col {w.col_off:.1f}, row {w.row_off:.1f}, {w.width:.1f}×{w.height:.1f} px)"


# ----------------------------------------------------------------------------------------------
# Off-grid regions and previews
# ----------------------------------------------------------------------------------------------


def read_region(
    path: PathLike,
    center_x: float,
    center_y: float,
    size_m: float,
    gsd_m: float | None = 0.5,
    bands: Sequence[int] | None = None,
    stretch: tuple[float, float] | BandStretch | None = (2.0, 98.0),
    stretch_uint8: bool = False,
    crs: str | None = None,
) -> np.ndarray:
    """An ``H×W×3`` uint8 crop of the square ground region ``size_m`` wide centred on (x, y).

    ``center_x``/``center_y`` are in the raster's CRS (use :func:`cvgl.geo.from_latlon` with
    :func:`raster_info` ``.crs`` for lat/lon). The output is ``round(size_m / gsd_m)`` pixels a
    side (native resolution if ``gsd_m`` is None). ``stretch`` is percentiles evaluated over the
    whole raster, exactly as for tiles, or a ready :class:`BandStretch` (e.g. to give crops of a
    second orthophoto the scale of the first). Raises :class:`InputError` if the region is not
    entirely inside the raster; nodata pixels inside it are 0. ``crs`` replaces the file's CRS
    (then ``center_x``/``center_y`` are in that CRS).
    """
    name = str(path)
    check_positive("size_m", size_m)
    if gsd_m is not None:
        check_positive("gsd_m", gsd_m)
    ds, geom = open_validated(path, crs)
    with ds:
        chosen = resolve_bands(ds, bands, name)
        gsd = gsd_m if gsd_m is not None else min(geom.px_m_x, geom.px_m_y)
        out_px = round(size_m / gsd)
        if not (1 <= out_px <= 4 * MAX_TILE_PX):
            raise InputError(
                f"{name}: region of {size_m:g} m at {gsd:.3g} m/px would be {out_px} px; "
                "choose size_m and gsd_m for 1–16384 px"
            )
        # Read bands (native depth), their float32 stretch, the uint8 result and the mask.
        check_image(f"{name}: a {size_m:g} m region at {gsd:.3g} m/px", out_px, out_px,
                    channels=len(set(chosen)) * np.dtype(ds.dtypes[0]).itemsize + 3 * 4 + 3 + 1,
                    advice="ask for a smaller region or a coarser gsd_m")
        inv = ~geom.transform
        ccol, crow = inv @ (float(center_x), float(center_y))
        w_px, h_px = size_m / geom.px_m_x, size_m / geom.px_m_y
        col_off, row_off = ccol - w_px / 2.0, crow - h_px / 2.0
        tol = 1e-6
        if (
            not (math.isfinite(col_off) and math.isfinite(row_off))
            or col_off < -tol
            or row_off < -tol
            or col_off + w_px > geom.width + tol
            or row_off + h_px > geom.height + tol
        ):
            raise InputError(
                f"{name}: the {size_m:g} m region centred at ({center_x:.2f}, {center_y:.2f}) "
                f"[{geom.crs}] is not entirely inside the raster; pick a centre at least "
                f"{size_m / 2:g} m from its edges"
            )
        col_off = min(max(col_off, 0.0), max(0.0, geom.width - w_px))
        row_off = min(max(row_off, 0.0), max(0.0, geom.height - h_px))
        window = Window(col_off, row_off, w_px, h_px)
        if isinstance(stretch, BandStretch):
            band_stretch = stretch
        else:
            pct = None if stretch is None else check_percentiles(stretch)
            band_stretch = cached_stretch(ds, path, chosen, pct, stretch_uint8)
        uniq, pos = unique_bands(chosen)
        with gdal_errors(name, "reading the nodata mask"):
            valid = read_valid_mask(ds, uniq, window, out_px, out_px)
        data = read_bands(ds, name, uniq, window, out_px)
        return band_stretch.apply(data[pos], combine_valid(valid, data))


def raster_overview(
    path: PathLike,
    max_side: int = 1024,
    bands: Sequence[int] | None = None,
    stretch: tuple[float, float] | None = (2.0, 98.0),
    stretch_uint8: bool = False,
    crs: str | None = None,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A small north-up RGB preview of the whole raster and its ``(south, west, north, east)``.

    The preview keeps the raster's own grid (for a projected CRS it is in that CRS, not
    reprojected); the bounds are the lat/lon extremes of its edges. Drawn as a lat/lon image
    overlay this misplaces pixels by well under a pixel of the preview for 1–20 km regions, which
    is accurate enough for the map page – not for measurement. The longer side is ``max_side``
    pixels at most (never upsampled); nodata is black.
    """
    name = str(path)
    if int(max_side) < 1:
        raise InputError(f"overview: max_side must be a positive number of pixels (got {max_side})")
    ds, geom = open_validated(path, crs)
    with ds:
        chosen = resolve_bands(ds, bands, name)
        pct = None if stretch is None else check_percentiles(stretch)
        band_stretch = cached_stretch(ds, path, chosen, pct, stretch_uint8)
        scale = min(1.0, int(max_side) / max(ds.width, ds.height))
        out_h, out_w = max(1, round(ds.height * scale)), max(1, round(ds.width * scale))
        uniq, pos = unique_bands(chosen)
        full = Window(0, 0, ds.width, ds.height)
        resampling = Resampling.average if scale < 1.0 else Resampling.nearest
        with gdal_errors(name, "reading the overview"):
            data = ds.read(uniq, out_shape=(len(uniq), out_h, out_w), resampling=resampling)
            valid = read_valid_mask(ds, uniq, full, out_h, out_w)
        valid = combine_valid(valid, data)
        return band_stretch.apply(data[pos], valid), _bounds_latlon(geom)
