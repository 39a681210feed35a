"""Street-view ↔ aerial geometry: azimuth conventions, polar transform, bird's-eye view, perspective coverage.

A side-on street photo and a top-down tile share almost no appearance, but they share geometry:
what the camera sees at azimuth θ lies along the ray θ from the camera's position on the map, and
the ground it sees at depression α lies ``h / tan α`` metres away. Every transform here is one
sampling grid (``torch.nn.functional.grid_sample``), so it applies equally to pixels and to token
maps, in batches, and is checked in the tests against a plain per-pixel loop.

Conventions (all angles in degrees):

* **Azimuth** is clockwise from north (east = +90).
* **Equirectangular panorama** of width ``W``: continuous column ``x`` in ``[0, W)`` (pixel ``j``
  covers ``[j, j + 1)``, its centre is ``j + 0.5``) looks at azimuth ``heading + (x / W - 0.5) * 360``.
  ``heading`` is the azimuth of the centre column; a north-aligned panorama (CVUSA, CVACT) has
  ``heading = 0``. Rows: continuous ``y`` in ``[0, H)`` at elevation
  ``band.top - (y / H) * (band.top - band.bottom)`` (:class:`PanoramaBand`).
* **Aerial image**: north-up at ``gsd`` metres per pixel; continuous pixel coordinates ``(col, row)``
  with the same pixel-covers-``[j, j+1)`` rule. A ground point ``east``/``north`` metres from a
  centre ``(cx, cy)`` is at ``col = cx + east / gsd``, ``row = cy - north / gsd``.
* **Polar image** of an aerial around a centre: column ``j`` is azimuth ``((j + 0.5) / W - 0.5) * 360``
  (centre column = north, as in a north-aligned panorama), row ``i`` is radius
  ``r_max - (i + 0.5) / H * (r_max - r_min)`` (far at the top, near at the bottom, like a panorama).
* **Bird's-eye view (BEV)** of a panorama: a north-up square of ``extent_m`` centred on the camera,
  ``extent_m / size`` metres per pixel, the panorama's ground pixels projected onto a flat ground
  ``camera_height`` metres below the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PanoramaBand",
    "PinholeView",
    "annulus_mask",
    "as_tensor",
    "azimuth_to_column",
    "bev_grid",
    "column_azimuths",
    "panorama_to_bev",
    "perspective_azimuth_range",
    "perspective_to_panorama",
    "polar_grid",
    "polar_transform",
    "sample_image",
    "sample_panorama",
    "wrap_degrees",
]


def wrap_degrees(angle: np.ndarray | float) -> np.ndarray | float:
    """Angle(s) wrapped to ``[-180, 180)``."""
    return np.mod(np.asarray(angle, dtype=np.float64) + 180.0, 360.0) - 180.0


@dataclass(frozen=True)
class PanoramaBand:
    """The elevations (degrees) of a panorama's top and bottom edges.

    A full equirectangular sphere is ``(90, -90)``. :meth:`for_image` assumes square angular pixels
    and the horizon in the middle, which is right for a 2:1 full sphere (CVACT) but NOT for CVUSA's
    1232×224 bands: those span ±45° (``PanoramaBand(45, -45)``, the geometry Sat2Density renders
    CVUSA with; with ±32.7° straight roads bend in the bird's-eye view). Pass the band explicitly
    whenever the source is known.
    """

    top: float = 90.0
    bottom: float = -90.0

    def __post_init__(self) -> None:
        if not (-90.0 <= self.bottom < self.top <= 90.0):
            raise ValueError(f"panorama band needs -90 <= bottom < top <= 90, got top={self.top}, bottom={self.bottom}")

    @classmethod
    def for_image(cls, height: int, width: int) -> PanoramaBand:
        half = min(90.0, 180.0 * height / width)
        return cls(half, -half)

    def row_of(self, elevation: np.ndarray | float, height: int) -> np.ndarray | float:
        """Continuous row coordinate of an elevation (outside ``[0, height)`` when outside the band)."""
        return (self.top - np.asarray(elevation)) / (self.top - self.bottom) * height

    def elevation_of(self, row: np.ndarray | float, height: int) -> np.ndarray | float:
        return self.top - np.asarray(row) / height * (self.top - self.bottom)

    def crop(self, top: float, bottom: float, height: int) -> tuple[int, int, PanoramaBand]:
        """Whole rows ``[r0, r1)`` of a ``height``-row image covering ``[bottom, top]`` ∩ this band, and their band."""
        r0 = max(0, int(math.floor(float(self.row_of(min(top, self.top), height)) + 1e-9)))
        r1 = min(height, int(math.ceil(float(self.row_of(max(bottom, self.bottom), height)) - 1e-9)))
        if r1 <= r0:
            raise ValueError(f"elevations [{bottom}, {top}] are outside the panorama band [{self.bottom}, {self.top}]")
        return r0, r1, PanoramaBand(float(self.elevation_of(r0, height)), float(self.elevation_of(r1, height)))


def column_azimuths(width: int, heading: float = 0.0) -> np.ndarray:
    """Azimuth of each pixel column's centre of a ``width``-column panorama (or polar image)."""
    return wrap_degrees(heading + ((np.arange(width) + 0.5) / width - 0.5) * 360.0)


def azimuth_to_column(azimuth: np.ndarray | float, width: int, heading: float = 0.0) -> np.ndarray:
    """Continuous column coordinate in ``[0, width)`` that looks at ``azimuth``."""
    return ((np.asarray(azimuth, dtype=np.float64) - heading) / 360.0 + 0.5) % 1.0 * width


def as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` float tensor from an ``H×W``, ``H×W×C`` array or a ``[C, H, W]``/``[B, C, H, W]`` tensor."""
    if isinstance(image, torch.Tensor):
        t = image.float()
        return t[None] if t.ndim == 3 else (t[None, None] if t.ndim == 2 else t)
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


def sample_image(image: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` ``[B, C, H, W]`` at continuous pixel coordinates ``cols``/``rows`` ``[B, h, w]``.

    Coordinates follow the pixel-covers-``[j, j + 1)`` rule (``align_corners=False``); outside the
    image the result is 0. Returns ``[B, C, h, w]``.
    """
    height, width = image.shape[-2:]
    grid = torch.stack((2.0 * cols / width - 1.0, 2.0 * rows / height - 1.0), dim=-1).to(image.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def sample_panorama(pano: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """:func:`sample_image` for a 360° panorama: columns wrap around (the seam interpolates across)."""
    width = pano.shape[-1]
    padded = torch.cat((pano[..., -1:], pano, pano[..., :1]), dim=-1)  # one wrapped column each side
    return sample_image(padded, torch.remainder(cols, width) + 1.0, rows, mode)


def polar_grid(
    centres: np.ndarray, gsd: float, r_max: float, size: tuple[int, int], r_min: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Aerial pixel coordinates ``(cols, rows)``, each ``[K, H, W]``, of the polar image around each centre.

    ``centres``: ``[K, 2]`` continuous ``(col, row)`` pixel coordinates in the aerial image; ``gsd``
    metres per aerial pixel; radii ``r_min``..``r_max`` metres; ``size`` = (H, W) of the polar image.
    """
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64))
    height, width = size
    radius = r_max - (np.arange(height) + 0.5) / height * (r_max - r_min)
    azimuth = np.deg2rad(column_azimuths(width))
    east = radius[:, None] * np.sin(azimuth)[None, :] / gsd
    north = radius[:, None] * np.cos(azimuth)[None, :] / gsd
    return centres[:, 0, None, None] + east[None], centres[:, 1, None, None] - north[None]


def polar_transform(
    aerial: np.ndarray | torch.Tensor,
    centres: np.ndarray,
    gsd: float,
    r_max: float,
    size: tuple[int, int],
    r_min: float = 0.0,
) -> torch.Tensor:
    """Polar images ``[K, C, H, W]`` of one aerial image (``H×W×C`` array or ``[1, C, H, W]`` tensor, pixels
    or a token map at ``gsd`` metres per cell) around ``K`` centres, all in one ``grid_sample`` call."""
    image = as_tensor(aerial)
    if image.shape[0] != 1:
        raise ValueError(f"polar_transform takes one aerial image, got a batch of {image.shape[0]}")
    cols, rows = polar_grid(centres, gsd, r_max, size, r_min)
    k, h, w = cols.shape
    out = sample_image(
        image, torch.from_numpy(cols.reshape(1, k * h, w)), torch.from_numpy(rows.reshape(1, k * h, w))
    )  # [1, C, K*H, W]: every centre's rows stacked in one sampling grid
    return out.reshape(image.shape[1], k, h, w).permute(1, 0, 2, 3)


def bev_grid(
    band: PanoramaBand,
    pano_size: tuple[int, int],
    camera_height: float,
    extent_m: float,
    size: int,
    heading: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Panorama pixel coordinates ``(cols, rows)`` ``[size, size]`` of each BEV pixel, and the BEV pixels'
    ground distance from the camera (metres).

    The BEV is north-up; ``heading`` is the azimuth of the panorama's centre column. Ground points
    whose depression falls outside ``band`` get rows outside the image (sampled as 0).
    """
    height, width = pano_size
    step = extent_m / size
    centre = (np.arange(size) + 0.5 - size / 2.0) * step
    east, north = np.meshgrid(centre, -centre)  # row 0 is the northern edge
    distance = np.hypot(east, north)
    azimuth = np.rad2deg(np.arctan2(east, north))
    elevation = -np.rad2deg(np.arctan2(camera_height, np.maximum(distance, 1e-9)))
    return azimuth_to_column(azimuth, width, heading), band.row_of(elevation, height), distance


def panorama_to_bev(
    pano: np.ndarray | torch.Tensor,
    band: PanoramaBand,
    camera_height: float,
    extent_m: float,
    size: int,
    headings: np.ndarray | float = 0.0,
) -> torch.Tensor:
    """BEV images ``[K, C, size, size]`` of one panorama (pixels or token map) for ``K`` heading hypotheses.

    Each hypothesis is its own exact resampling of the panorama (no rotation of a rendered BEV).
    """
    image = as_tensor(pano)
    if image.shape[0] != 1:
        raise ValueError(f"panorama_to_bev takes one panorama, got a batch of {image.shape[0]}")
    heads = np.atleast_1d(np.asarray(headings, dtype=np.float64))
    grids = [bev_grid(band, image.shape[-2:], camera_height, extent_m, size, float(h))[:2] for h in heads]
    cols = torch.from_numpy(np.concatenate([g[0] for g in grids]).reshape(1, len(heads) * size, size))
    rows = torch.from_numpy(np.concatenate([g[1] for g in grids]).reshape(1, len(heads) * size, size))
    out = sample_panorama(image, cols, rows)  # [1, C, K*size, size]
    return out.reshape(image.shape[1], len(heads), size, size).permute(1, 0, 2, 3)


def annulus_mask(size: int, extent_m: float, r_min: float, r_max: float) -> np.ndarray:
    """``[size, size]`` bool: cells of a camera-centred square of ``extent_m`` whose centre is ``r_min``..``r_max`` m away."""
    centre = (np.arange(size) + 0.5 - size / 2.0) * (extent_m / size)
    distance = np.hypot(centre[None, :], centre[:, None])
    return (distance >= r_min) & (distance <= r_max)


# ------------------------------------------------------------------------------------------------
# perspective photos
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinholeView:
    """A perspective photo's camera: horizontal field of view, heading (azimuth of the optical axis)
    and pitch (up positive), in degrees; no roll, principal point at the image centre."""

    hfov: float
    heading: float = 0.0
    pitch: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.hfov < 180.0:
            raise ValueError(f"horizontal field of view must be in (0, 180) degrees, got {self.hfov}")
        if not -90.0 < self.pitch < 90.0:
            raise ValueError(f"pitch must be in (-90, 90) degrees, got {self.pitch}")

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Forward, right and up unit vectors in (east, north, up)."""
        h, p = math.radians(self.heading), math.radians(self.pitch)
        forward = np.array([math.sin(h) * math.cos(p), math.cos(h) * math.cos(p), math.sin(p)])
        right = np.array([math.cos(h), -math.sin(h), 0.0])
        return forward, right, np.cross(right, forward)

    def focal(self, width: int) -> float:
        return (width / 2.0) / math.tan(math.radians(self.hfov) / 2.0)


def _pixel_rays(view: PinholeView, width: int, height: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    forward, right, up = view.axes()
    f = view.focal(width)
    x = (np.asarray(cols, dtype=np.float64) - width / 2.0) / f
    y = (height / 2.0 - np.asarray(rows, dtype=np.float64)) / f
    return forward + x[..., None] * right + y[..., None] * up


def perspective_azimuth_range(view: PinholeView, width: int, height: int) -> tuple[float, float]:
    """``(start, span)`` in degrees: the photo covers azimuths ``start`` .. ``start + span`` clockwise.

    Computed from the rays of the image border (pitch makes the edge columns lean, so the widest
    azimuths are at the top or bottom corners); a photo that contains the zenith or the nadir covers
    every azimuth: ``(heading - 180, 360)``.
    """
    forward, _, up = view.axes()
    vfov_half = math.atan((height / 2.0) / view.focal(width))
    if abs(view.pitch) + math.degrees(vfov_half) >= 90.0:
        return float(wrap_degrees(view.heading - 180.0)), 360.0
    t = np.linspace(0.0, 1.0, 257)
    border_c = np.concatenate([t * width, np.full_like(t, width), t[::-1] * width, np.zeros_like(t)])
    border_r = np.concatenate([np.zeros_like(t), t * height, np.full_like(t, height), t[::-1] * height])
    rays = _pixel_rays(view, width, height, border_c, border_r)
    rel = wrap_degrees(np.rad2deg(np.arctan2(rays[:, 0], rays[:, 1])) - view.heading)
    lo, hi = float(rel.min()), float(rel.max())
    return float(wrap_degrees(view.heading + lo)), hi - lo


def perspective_to_panorama(
    photo: np.ndarray | torch.Tensor, view: PinholeView, width: int, band: PanoramaBand, height: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Resample a perspective photo into a ``height × width`` north-aligned (heading 0) panorama band.

    Returns ``([1, C, height, width]`` image, ``[height, width]`` bool mask of the cells the photo
    covers): a photo becomes a partial panorama, so the column descriptors and the BEV treat it
    like one, over the azimuths it covers.
    """
    image = as_tensor(photo)
    ph, pw = image.shape[-2:]
    azimuth = np.deg2rad(column_azimuths(width))
    elevation = np.deg2rad(band.elevation_of(np.arange(height) + 0.5, height))
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    rays = np.stack((np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)), axis=-1)
    forward, right, up = view.axes()
    z, x, y = rays @ forward, rays @ right, rays @ up
    f = view.focal(pw)
    ahead = z > 1e-6
    safe = np.where(ahead, z, 1.0)
    cols = np.where(ahead, pw / 2.0 + f * x / safe, -1.0)
    rows = np.where(ahead, ph / 2.0 - f * y / safe, -1.0)
    inside = ahead & (cols >= 0) & (cols < pw) & (rows >= 0) & (rows < ph)
    out = sample_image(image, torch.from_numpy(cols)[None], torch.from_numpy(rows)[None])
    return out, inside
