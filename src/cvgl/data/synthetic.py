"""Drone-style query photos cut from a second orthophoto of the reference region.

No drone dataset is reachable here, so queries are simulated from real imagery of another sensor
and date (WV2 vs the WV3 reference): a camera at a random ground point, random yaw, a pitch
from nadir, an altitude with scale jitter, optional photometric change. Each photo is written as a
JPEG that carries the truth the way a real drone does (EXIF GPS = the camera position, DJI XMP =
gimbal pitch/yaw and relative altitude), so the demo exercises the same metadata path as real use.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvgl.data.geometry import required_patch_side, simulate_drone_view
from cvgl.data.metadata import CameraMetadata, write_camera_metadata
from cvgl.data.raster import raster_info, read_region
from cvgl.errors import InputError
from cvgl.geo import offset_latlon, to_latlon


@dataclass(frozen=True)
class QueryFamily:
    """How a family of queries is made."""

    name: str
    pitches: tuple[float, ...] = (0.0,)
    heading_known: bool = True
    heading_noise_deg: float = 10.0  # a drone compass is good to about this
    scale_jitter: tuple[float, float] = (1.0, 1.0)
    photometric: bool = False
    hfov_deg: float = 70.0  # a narrower lens keeps steep (60 degree) views below the horizon
    footprint_m: float = 112.0  # ground width of the photo's short side at nadir, before jitter


@dataclass
class SyntheticQuery:
    name: str
    image: np.ndarray
    center_lat: float  # ground point at the photo centre (what a tile should match)
    center_lon: float
    camera_lat: float  # the drone (what EXIF GPS records)
    camera_lon: float
    yaw_deg: float
    pitch_deg: float
    altitude_m: float
    family: str
    heading_written: float | None  # what the XMP says (noisy), None when unknown
    hfov_deg: float = 70.0

    def record(self) -> dict:
        d = asdict(self)
        d.pop("image")
        return d


def _photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast and brightness change plus sensor noise: a different day and camera."""
    x = image.astype(np.float32) / 255.0
    x = x ** rng.uniform(0.7, 1.4)
    x = (x - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    x = x + rng.normal(0.0, 0.02, size=x.shape)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def make_queries(
    raster: Path,
    count: int,
    family: QueryFamily,
    seed: int,
    photo_size: tuple[int, int] = (240, 320),
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> list[SyntheticQuery]:
    """``count`` queries of ``family`` centred at random ground points of ``raster``.

    The family sets the lens (``hfov_deg``) and the ground width the photo's short side covers
    at nadir (``footprint_m``, times the scale jitter); ``x_range`` restricts centres to a band of
    eastings (a spatial split), ``y_range`` to a band of northings. For steep views the photo's far field reaches hundreds of metres
    beyond its centre, possibly across the split line: the centre, not the far field, is split.
    """
    rng = np.random.default_rng(seed)
    info = raster_info(raster)
    left, bottom, right, top = info.bounds
    out: list[SyntheticQuery] = []
    hfov_deg, footprint_m = family.hfov_deg, family.footprint_m
    for i in range(count):
        pitch = float(rng.choice(family.pitches))
        yaw = float(rng.uniform(0, 360))
        scale = float(rng.uniform(*family.scale_jitter))
        photo_h, photo_w = photo_size
        photo_gsd = footprint_m * scale / photo_h
        need_px = required_patch_side((photo_h, photo_w), pitch, hfov_deg, yaw) + 4
        half_m = need_px * photo_gsd / 2
        lo_x, hi_x = x_range or (left, right)
        lo_y, hi_y = y_range or (bottom, top)
        x_from, x_to = max(left + half_m, lo_x), min(right - half_m, hi_x)
        y_from, y_to = max(bottom + half_m, lo_y), min(top - half_m, hi_y)
        if x_from > x_to or y_from > y_to:
            raise InputError(
                f"{raster}: a {pitch:g} deg photo of family {family.name!r} needs {2 * half_m:.0f} m of ground around "
                "its centre, which no centre in the requested strip has inside the raster; widen the strip"
            )
        cx = rng.uniform(x_from, x_to)
        cy = rng.uniform(y_from, y_to)
        patch = read_region(raster, cx, cy, size_m=need_px * photo_gsd, gsd_m=photo_gsd)
        image = simulate_drone_view(patch, yaw, pitch, hfov_deg, (photo_h, photo_w))
        if family.photometric:
            image = _photometric(image, rng)
        slant = photo_gsd * photo_w / (2 * math.tan(math.radians(hfov_deg) / 2))
        altitude = slant * math.cos(math.radians(pitch))
        ahead = altitude * math.tan(math.radians(pitch))
        clat, clon = to_latlon(info.crs, cx, cy)
        cam_lat, cam_lon = offset_latlon(clat, clon, -ahead * math.sin(math.radians(yaw)), -ahead * math.cos(math.radians(yaw)))
        written = None
        if family.heading_known:
            written = (yaw + rng.uniform(-family.heading_noise_deg, family.heading_noise_deg)) % 360
        out.append(
            SyntheticQuery(
                name=f"{re.sub(r'[^A-Za-z0-9]+', '-', family.name).strip('-')}_{i:04d}",
                image=image,
                center_lat=float(clat),
                center_lon=float(clon),
                camera_lat=float(cam_lat),
                camera_lon=float(cam_lon),
                yaw_deg=yaw,
                pitch_deg=pitch,
                altitude_m=altitude,
                family=family.name,
                heading_written=written,
                hfov_deg=hfov_deg,
            )
        )
    return out


def write_query_photo(query: SyntheticQuery, folder: Path) -> Path:
    """Write the photo as a JPEG with EXIF GPS (camera) and DJI XMP (pitch, yaw, altitude)."""
    f35 = 36.0 / (2 * math.tan(math.radians(query.hfov_deg) / 2))
    meta = CameraMetadata(
        gps_lat=query.camera_lat,
        gps_lon=query.camera_lon,
        relative_altitude_m=query.altitude_m,
        gimbal_pitch_deg=query.pitch_deg - 90.0,
        gimbal_yaw_deg=query.heading_written,
        focal_length_35mm=f35,
    )
    path = Path(folder) / f"{query.name}.jpg"
    write_camera_metadata(Image.fromarray(query.image), path, meta)
    return path
