"""Geodesy helpers: distances, CRS conversion and metric offsets on the WGS84 ellipsoid.

cvgl stores every location as lat/lon (EPSG:4326) and keeps the source CRS next to it. Distances
are always geodesic (``pyproj.Geod(ellps="WGS84")``): Euclidean distance on degrees is wrong by a
factor of ``cos(lat)`` in longitude, which at 50° N already misranks candidates by ~35 %.

Every function here is vectorised with numpy broadcasting and returns plain ``float`` values when
all inputs are scalars, so the same call serves a single query and a whole evaluation table.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Union

import numpy as np
from pyproj import CRS, Geod, Transformer

__all__ = [
    "WGS84_GEOD",
    "geodesic_distance_m",
    "to_latlon",
    "from_latlon",
    "utm_crs_for",
    "offset_latlon",
    "crs_key",
    "tile_half_diagonal_m",
]

#: The one ellipsoid model used for every distance and offset in cvgl.
WGS84_GEOD = Geod(ellps="WGS84")

ArrayLike = Union[float, int, np.ndarray, list, tuple]
FloatOrArray = Union[float, np.ndarray]


def _is_scalar(*values: Any) -> bool:
    return all(np.ndim(v) == 0 for v in values)


def _broadcast(*values: ArrayLike) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Broadcast inputs and flatten them to contiguous float64 (pyproj wants equal-length buffers)."""
    arrays = np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in values])
    shape = arrays[0].shape
    return shape, [np.ascontiguousarray(a).ravel().copy() for a in arrays]


def _shape_out(scalar: bool, shape: tuple[int, ...], *flat: np.ndarray) -> tuple[FloatOrArray, ...]:
    if scalar:
        return tuple(float(a[0]) for a in flat)
    return tuple(np.asarray(a).reshape(shape) for a in flat)


def geodesic_distance_m(
    lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike
) -> FloatOrArray:
    """Geodesic distance in metres between points given in degrees (WGS84 ellipsoid).

    Inputs broadcast against each other (e.g. one query against N tile centres). Returns a float
    when every input is a scalar, otherwise an array of the broadcast shape.
    """
    scalar = _is_scalar(lat1, lon1, lat2, lon2)
    shape, (a_lat, a_lon, b_lat, b_lon) = _broadcast(lat1, lon1, lat2, lon2)
    if a_lat.size == 0:
        return np.zeros(shape, dtype=np.float64)
    _, _, dist = WGS84_GEOD.inv(a_lon, a_lat, b_lon, b_lat)
    return _shape_out(scalar, shape, np.asarray(dist, dtype=np.float64))[0]


def crs_key(crs: Any) -> str:
    """A hashable, canonical text for a CRS given as EPSG int, string, pyproj or rasterio CRS.

    Used as the cache key for transformers and as the CRS string stored next to coordinates.
    EPSG-identifiable CRSs become ``"EPSG:<code>"``; anything else is kept as WKT.
    """
    if isinstance(crs, (int, np.integer)):
        return f"EPSG:{int(crs)}"
    if isinstance(crs, str):
        return _canonical_from_text(crs)
    to_wkt = getattr(crs, "to_wkt", None)
    if to_wkt is None:
        raise TypeError(f"not a CRS: {crs!r} (give an EPSG code, a CRS string or a CRS object)")
    return _canonical_from_text(to_wkt())


@functools.lru_cache(maxsize=64)
def _canonical_from_text(text: str) -> str:
    crs = CRS.from_user_input(text)
    epsg = crs.to_epsg(min_confidence=100)
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


@functools.lru_cache(maxsize=64)
def _transformers(key: str) -> tuple[Transformer, Transformer]:
    """(to lat/lon, from lat/lon) transformers for one CRS; building them costs ~ms, so cache."""
    src = CRS.from_user_input(key)
    to_geo = Transformer.from_crs(src, "EPSG:4326", always_xy=True)
    from_geo = Transformer.from_crs("EPSG:4326", src, always_xy=True)
    return to_geo, from_geo


def to_latlon(crs: Any, x: ArrayLike, y: ArrayLike) -> tuple[FloatOrArray, FloatOrArray]:
    """Convert easting/northing (or lon/lat for geographic CRSs) in ``crs`` to ``(lat, lon)``.

    Axis order is always x = east, y = north (``always_xy=True``), whatever the CRS's official
    axis order, so EPSG:4326 input is ``x=lon, y=lat``.
    """
    scalar = _is_scalar(x, y)
    shape, (fx, fy) = _broadcast(x, y)
    lon, lat = _transformers(crs_key(crs))[0].transform(fx, fy)
    return _shape_out(scalar, shape, np.asarray(lat), np.asarray(lon))  # type: ignore[return-value]


def from_latlon(crs: Any, lat: ArrayLike, lon: ArrayLike) -> tuple[FloatOrArray, FloatOrArray]:
    """Convert ``(lat, lon)`` in degrees to ``(x, y)`` in ``crs`` (x = east, y = north)."""
    scalar = _is_scalar(lat, lon)
    shape, (flat, flon) = _broadcast(lat, lon)
    x, y = _transformers(crs_key(crs))[1].transform(flon, flat)
    return _shape_out(scalar, shape, np.asarray(x), np.asarray(y))  # type: ignore[return-value]


def utm_crs_for(lat: float, lon: float) -> int:
    """EPSG code of the WGS84 UTM zone containing ``(lat, lon)`` (326zz north, 327zz south).

    Handy when metric offsets or areas are needed around a point without a projected source CRS.
    Follows the standard zone exceptions for south-west Norway (32V) and Svalbard (31X–37X) so
    the result agrees with what GIS software picks for the same point.
    """
    if not (-90.0 <= lat <= 90.0) or not (-180.0 <= lon <= 180.0):
        raise ValueError(f"lat/lon out of range: ({lat}, {lon})")
    lon_n = float(lon)
    zone = min(int(math.floor((lon_n + 180.0) / 6.0)) + 1, 60)  # lon = 180 belongs to zone 60
    if 56.0 <= lat < 64.0 and 3.0 <= lon_n < 12.0:
        zone = 32
    elif 72.0 <= lat <= 84.0 and lon_n >= 0.0:
        if lon_n < 9.0:
            zone = 31
        elif lon_n < 21.0:
            zone = 33
        elif lon_n < 33.0:
            zone = 35
        elif lon_n < 42.0:
            zone = 37
    return (32600 if lat >= 0.0 else 32700) + zone


def offset_latlon(
    lat: ArrayLike, lon: ArrayLike, east_m: ArrayLike, north_m: ArrayLike
) -> tuple[FloatOrArray, FloatOrArray]:
    """The point ``east_m`` metres east and ``north_m`` metres north of ``(lat, lon)``.

    Walks the geodesic with azimuth ``atan2(east, north)`` and length ``hypot(east, north)``, so
    ``geodesic_distance_m`` between input and output equals ``hypot(east, north)`` exactly; this is
    what the synthetic-query generators and error bars need. Returns ``(lat, lon)``.
    """
    scalar = _is_scalar(lat, lon, east_m, north_m)
    shape, (flat, flon, fe, fn) = _broadcast(lat, lon, east_m, north_m)
    if flat.size == 0:
        empty = np.zeros(shape, dtype=np.float64)
        return empty, empty.copy()
    azimuth = np.degrees(np.arctan2(fe, fn))
    dist = np.hypot(fe, fn)
    lon2, lat2, _ = WGS84_GEOD.fwd(flon, flat, azimuth, dist)
    return _shape_out(scalar, shape, np.asarray(lat2), np.asarray(lon2))  # type: ignore[return-value]


def typical_spacing_m(lat: np.ndarray, lon: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Median distance from a tile to its nearest neighbour (metres), from a sample of tiles.

    Used where a tile set does not say its tile size (a folder of tiles + CSV). Distances use a
    local equirectangular projection around the set's centre — fine for neighbour spacing, which
    is metres to kilometres — and at most ``sample`` x N pairs, so a million tiles stay cheap.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if len(lat) < 2:
        raise ValueError("need at least two tiles to estimate their spacing")
    lat0 = np.radians(lat.mean())
    metres_per_deg = 111_320.0
    xy = np.stack([lon * metres_per_deg * np.cos(lat0), lat * metres_per_deg], axis=1)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(xy), size=min(sample, len(xy)), replace=False)
    nearest = np.empty(len(picks))
    for start in range(0, len(picks), 32):
        chunk = picks[start : start + 32]
        d2 = ((xy[chunk, None, :] - xy[None, :, :]) ** 2).sum(-1)
        d2[np.arange(len(chunk)), chunk] = np.inf
        nearest[start : start + len(chunk)] = np.sqrt(d2.min(1))
    return float(np.median(nearest))


def tile_half_diagonal_m(tile_m: float) -> float:
    """Half the diagonal of a square tile of side ``tile_m``: the correctness radius of an answer.

    A point within this distance of a tile's centre can lie inside that tile, so an answer (or a
    top-k tile) this close to the truth counts as "the right tile" in every metric we report.
    """
    return float(tile_m) / math.sqrt(2.0)
