"""End-to-end protocols on Longmont: real `cvgl locate` runs on labelled photos.

Where :mod:`cvgl.evaluate.longmont` scores descriptors, these protocols run the product itself —
an index built by :func:`cvgl.index.build.build_index`, photos written as JPEGs with EXIF/XMP and
located by :func:`cvgl.locate.locate_images` with the options under test — so what is measured is
what a user gets (preprocessing, retrieval, verification, the answer and its confidence).

``holes``: rectangles of the reference (fractions of the scene, ``(x0, y0, x1, y1)`` west→east,
south→north) blanked to nodata before indexing, so photos of them show ground that is *not in
the index* — tiles there are dropped by the nodata filter and verification windows see black.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

from cvgl.data.raster import raster_info
from cvgl.data.samples import longmont_scene
from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
from cvgl.evaluate.longmont import SPEC
from cvgl.geo import geodesic_distance_m

Rect = tuple[float, float, float, float]


@dataclass(frozen=True)
class LabelledPhoto:
    path: Path
    family: str
    center_lat: float  # the ground point at the photo centre (what the answer's lat/lon claims)
    center_lon: float
    x: float  # the same point in the scene's CRS
    y: float


def scene_rect(rect: Rect, scene: str = "wv2") -> tuple[float, float, float, float]:
    """A fractional rectangle of the scene in its CRS: (left, bottom, right, top)."""
    left, bottom, right, top = raster_info(longmont_scene(scene)).bounds
    x0, y0, x1, y1 = rect
    return left + x0 * (right - left), bottom + y0 * (top - bottom), left + x1 * (right - left), bottom + y1 * (top - bottom)


def holed_reference(out: Path, holes: list[Rect]) -> Path:
    """A copy of the WV3 scene with ``holes`` set to nodata (0): ground cut out of the reference."""
    source = longmont_scene("wv3")
    with rasterio.open(source) as ds:
        data = ds.read()
        profile = ds.profile.copy()
        inverse = ~ds.transform
        for rect in holes:
            left, bottom, right, top = scene_rect(rect)
            c0, r0 = inverse * (left, top)
            c1, r1 = inverse * (right, bottom)
            data[:, max(int(r0), 0) : max(int(math.ceil(r1)), 0), max(int(c0), 0) : max(int(math.ceil(c1)), 0)] = 0
    profile.update(nodata=0, compress="deflate")
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def photo_set(folder: Path, family: QueryFamily, count: int, seed: int, x_range: tuple[float, float] | None = None,
              y_range: tuple[float, float] | None = None,
              keep: Callable[[LabelledPhoto], bool] | None = None) -> list[LabelledPhoto]:
    """``count`` WV2 photos of ``family`` (centres in the given CRS ranges), written as JPEGs.

    ``keep``: only photos it accepts (e.g. :func:`outside_all` of the holes), drawn from a larger
    deterministic sample; a ``ValueError`` if that sample holds fewer than ``count``."""
    from cvgl.geo import from_latlon

    crs = raster_info(longmont_scene("wv2")).crs
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = []
    drawn = count if keep is None else 4 * count + 8
    for q in make_queries(longmont_scene("wv2"), drawn, family, seed=seed, x_range=x_range, y_range=y_range):
        x, y = from_latlon(crs, q.center_lat, q.center_lon)
        where = LabelledPhoto(folder / f"{q.name}.jpg", family.name, q.center_lat, q.center_lon, float(x), float(y))
        if keep is not None and not keep(where):
            continue
        out.append(LabelledPhoto(write_query_photo(q, folder), family.name, q.center_lat, q.center_lon, float(x), float(y)))
        if len(out) == count:
            return out
    if len(out) < count:
        raise ValueError(f"only {len(out)} of {drawn} {family.name} photos were kept; {count} wanted")
    return out


def inside_any(photo: LabelledPhoto, holes: list[Rect], margin_m: float = 0.0) -> bool:
    """Whether the photo centre lies inside a hole, at least ``margin_m`` from its edges."""
    for rect in holes:
        left, bottom, right, top = scene_rect(rect)
        if left + margin_m <= photo.x <= right - margin_m and bottom + margin_m <= photo.y <= top - margin_m:
            return True
    return False


def outside_all(photo: LabelledPhoto, holes: list[Rect], margin_m: float = 0.0) -> bool:
    """Whether the photo centre lies outside every hole by at least ``margin_m``."""
    for rect in holes:
        left, bottom, right, top = scene_rect(rect)
        if left - margin_m <= photo.x <= right + margin_m and bottom - margin_m <= photo.y <= top + margin_m:
            return False
    return True


def error_to_centre(answer: dict, photo: LabelledPhoto) -> float:
    """Metres from the answer's ground point to the photo's true centre (inf when skipped)."""
    if answer.get("lat") is None:
        return math.inf
    return float(geodesic_distance_m(answer["lat"], answer["lon"], photo.center_lat, photo.center_lon))


def radius_m() -> float:
    return SPEC.tile_m / math.sqrt(2.0)


def summarise_errors(errors: np.ndarray) -> dict[str, float]:
    finite = errors[np.isfinite(errors)]
    return {
        "R@1(50m)": float((errors <= 50).mean()) if errors.size else math.nan,
        "R@1(20m)": float((errors <= 20).mean()) if errors.size else math.nan,
        "R@1(5m)": float((errors <= 5).mean()) if errors.size else math.nan,
        "median_m": float(np.median(finite)) if finite.size else math.nan,
        "p90_m": float(np.percentile(finite, 90)) if finite.size else math.nan,
    }
