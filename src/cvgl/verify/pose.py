"""From a photo -> window homography to answers on the ground: centre, footprint, heading, camera.

Frames and conventions:

* photo pixels and window pixels: OpenCV convention, pixel centres at integer coordinates (the
  image centre is ((W-1)/2, (H-1)/2)), x right, y down;
* the window's georeferencing is a rasterio ``Affine`` (GDAL convention: ``transform * (col, row)``
  is the *outer corner* of pixel (col, row)), so window pixel (u, v) is the CRS point
  ``transform * (u + 0.5, v + 0.5)``;
* "metres" are true ground metres in the local east/north frame at a point, measured with
  geodesics (:func:`local_metric`): that also holds for geographic CRSs and removes UTM's grid
  scale factor and grid convergence.

**Heading** of a photo: the azimuth, in degrees clockwise from true north in [0, 360), of the
ground direction that the photo's *up* axis (from its centre towards the middle of its top edge)
points to at the photo centre — the derivative of the photo -> ground map at the centre applied to
(0, -1). For a nadir photo that is the direction the top edge faces; for an oblique photo, whose
top shows the far ground, it is the direction the camera looks (its yaw). It is what
``cvgl.data.geometry.heading_to_north_up`` expects: rotating the photo clockwise by it makes
north up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine

from cvgl.geo import WGS84_GEOD, to_latlon

# sqrt(chi2_2 quantile): a 2D Gaussian's radius holding the probability, along its major axis.
_COVERAGE_K = {0.68: math.sqrt(-2 * math.log(0.32)), 0.95: math.sqrt(-2 * math.log(0.05)), 0.99: math.sqrt(-2 * math.log(0.01))}


def window_transform(centre_x: float, centre_y: float, size_m: float, image_hw: tuple[int, int]) -> Affine:
    """The rasterio ``Affine`` of a north-up square window ``size_m`` wide centred on (x, y) and
    read as ``image_hw`` pixels (what ``read_region`` returns): its pixels are ``size_m / side``
    CRS units, and ``transform * (0, 0)`` is the window's top-left *corner*."""
    height, width = image_hw
    return Affine(size_m / width, 0.0, centre_x - size_m / 2, 0.0, -size_m / height, centre_y + size_m / 2)


def affine_matrix(transform) -> np.ndarray:
    """3x3 matrix of a rasterio ``Affine`` (or anything with a..f): pixel corner coords -> CRS."""
    return np.array([[transform.a, transform.b, transform.c], [transform.d, transform.e, transform.f], [0.0, 0.0, 1.0]])


def window_px_to_crs(transform) -> np.ndarray:
    """3x3 matrix taking window pixel (centre convention) to CRS: ``transform`` after +0.5 px."""
    return affine_matrix(transform) @ np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])


def apply(matrix: np.ndarray, points) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h = pts @ matrix[:, :2].T + matrix[:, 2]
    return h[:, :2] / h[:, 2:3]


def jacobian(matrix: np.ndarray, point) -> np.ndarray:
    """2x2 derivative of the homography ``matrix`` at ``point``."""
    x, y = float(point[0]), float(point[1])
    w = matrix[2, 0] * x + matrix[2, 1] * y + matrix[2, 2]
    u, v = apply(matrix, [(x, y)])[0]
    return np.array([
        [matrix[0, 0] - u * matrix[2, 0], matrix[0, 1] - u * matrix[2, 1]],
        [matrix[1, 0] - v * matrix[2, 0], matrix[1, 1] - v * matrix[2, 1]],
    ]) / w


def local_metric(crs, x: float, y: float, step: float) -> np.ndarray:
    """2x2 ``E`` with ``E @ (dx, dy)`` = (east, north) ground metres of a small CRS step at (x, y).

    Measured with geodesics over a step of ``step`` CRS units (use the window's pixel size)."""
    lat0, lon0 = to_latlon(crs, x, y)
    lats, lons = to_latlon(crs, np.array([x + step, x]), np.array([y, y + step]))
    az, _, dist = WGS84_GEOD.inv(np.full(2, lon0), np.full(2, lat0), lons, lats)
    az = np.radians(np.asarray(az))
    dist = np.asarray(dist)
    return np.stack([dist * np.sin(az), dist * np.cos(az)]) / step  # columns: d/dx, d/dy


def photo_corners(photo_hw: tuple[int, int]) -> np.ndarray:
    """Outer corners of a photo (top-left, top-right, bottom-right, bottom-left), centre convention."""
    h, w = photo_hw
    return np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])


def photo_centre(photo_hw: tuple[int, int]) -> np.ndarray:
    h, w = photo_hw
    return np.array([(w - 1) / 2.0, (h - 1) / 2.0])


@dataclass(frozen=True)
class GroundPose:
    """Where a photo lies on the ground, from its homography to a georeferenced window."""

    x: float  # photo centre's ground point, CRS units
    y: float
    lat: float
    lon: float
    footprint_xy: np.ndarray  # [4, 2] CRS, photo corners TL, TR, BR, BL
    footprint_latlon: np.ndarray  # [4, 2] (lat, lon)
    heading_deg: float  # see the module docstring
    metres_per_px: float  # ground metres per photo pixel at the centre (geometric mean of the axes)
    anisotropy: float  # larger / smaller singular value of the photo -> ground map at the centre
    photo_to_metres: np.ndarray  # 3x3: photo px -> local (east, north) metres from the centre point


def ground_pose(
    photo_to_window: np.ndarray, photo_hw: tuple[int, int], transform, crs,
    centre_px=None, corners_px=None, rotation_deg: float = 0.0,
) -> GroundPose:
    """The ground pose of a photo given its homography to a window georeferenced by ``transform``.

    ``centre_px``/``corners_px`` (default: the photo's own) say which photo pixels are the centre and
    the corners of the scene to report, e.g. where a rectified photo's original corners lie.
    ``rotation_deg`` is the clockwise rotation the photo went through before matching
    (``rotate_image(photo, rotation_deg)``); it is added back so the heading is the original's."""
    to_crs = window_px_to_crs(transform) @ photo_to_window
    centre = photo_centre(photo_hw) if centre_px is None else np.asarray(centre_px, dtype=np.float64)
    corners = photo_corners(photo_hw) if corners_px is None else np.asarray(corners_px, dtype=np.float64)
    cx, cy = apply(to_crs, [centre])[0]
    footprint = apply(to_crs, corners)
    step = math.hypot(transform.a, transform.d) or 1.0
    metric = local_metric(crs, cx, cy, step)
    to_metres = np.eye(3)
    to_metres[:2, :2] = metric
    to_metres[:2, 2] = -metric @ np.array([cx, cy])
    photo_to_metres = to_metres @ to_crs
    jac = metric @ jacobian(to_crs, centre)  # photo px -> metres at the centre
    up = jac @ np.array([0.0, -1.0])
    heading = (math.degrees(math.atan2(up[0], up[1])) + rotation_deg) % 360.0
    singular = np.linalg.svd(jac, compute_uv=False)
    lat, lon = to_latlon(crs, cx, cy)
    f_lat, f_lon = to_latlon(crs, footprint[:, 0], footprint[:, 1])
    return GroundPose(
        x=float(cx), y=float(cy), lat=float(lat), lon=float(lon), footprint_xy=footprint,
        footprint_latlon=np.stack([f_lat, f_lon], 1), heading_deg=float(heading),
        metres_per_px=float(math.sqrt(singular[0] * singular[1])),
        anisotropy=float(singular[0] / max(singular[1], 1e-12)), photo_to_metres=photo_to_metres,
    )


def footprint_problem(photo_to_window: np.ndarray, corners_px) -> str | None:
    """Why the homography cannot be a photo of flat ground seen from above, or None.

    A real view keeps every corner of the photo in front of the camera (positive homogeneous
    depth) and cannot mirror the ground. With positive depths a homography maps the convex corner
    quadrilateral to a convex one, whose orientation is that of ``det(H)`` (the Jacobian's
    determinant is det(H) / depth^3). Chance fits to wrong matches often mirror or reach the
    horizon."""
    corners = np.asarray(corners_px, dtype=np.float64)
    depth = corners @ photo_to_window[2, :2] + photo_to_window[2, 2]
    if np.any(depth <= 0):
        return "footprint crosses the horizon"
    if np.linalg.det(photo_to_window) <= 0:
        return "footprint is mirrored"
    return None


def uncertainty_radius_m(covariance_px: np.ndarray, transform, metric: np.ndarray, coverage: float = 0.95) -> float:
    """Radius (m) holding ``coverage`` of a 2D Gaussian with the window-pixel covariance, taken
    along its major axis (conservative for elongated ellipses)."""
    if not np.all(np.isfinite(covariance_px)):
        return float("inf")
    linear = metric @ affine_matrix(transform)[:2, :2]
    cov_m = linear @ covariance_px @ linear.T
    k = _COVERAGE_K.get(round(coverage, 2), math.sqrt(-2 * math.log(1 - coverage)))
    return float(k * math.sqrt(max(np.linalg.eigvalsh(cov_m).max(), 0.0)))


@dataclass(frozen=True)
class CameraPose:
    east_m: float  # camera position relative to the photo-centre ground point, local metres
    north_m: float
    altitude_m: float  # above the ground plane
    pitch_deg: float  # optical axis from nadir (of the image that was matched)


def camera_from_homography(photo_to_metres: np.ndarray, focal_px: float, principal_px) -> CameraPose | None:
    """The pinhole camera that took the photo, from its homography to flat ground.

    ``photo_to_metres`` maps photo pixels to local ground metres (east, north); the camera has
    square pixels, focal length ``focal_px`` and principal point ``principal_px`` in the same
    photo pixels. Plane-induced homography: ground (e, n, 1) -> pixel is ``K [r1 r2 t]`` up to
    scale, so K^-1 times it gives two rotation columns and the translation; the camera centre is
    ``-R^T t``. Also holds for a photo that was rectified or rotated about its principal point
    before matching (a virtual rotation of the camera about its centre: the centre is unchanged).
    None when the homography is not that of a camera above the ground."""
    k = np.array([[focal_px, 0.0, principal_px[0]], [0.0, focal_px, principal_px[1]], [0.0, 0.0, 1.0]])
    try:
        b = np.linalg.inv(k) @ np.linalg.inv(photo_to_metres)
    except np.linalg.LinAlgError:
        return None
    norms = np.linalg.norm(b[:, 0]), np.linalg.norm(b[:, 1])
    if min(norms) <= 0:
        return None
    # The scale's sign is the one that puts the camera above the ground (the other mirrors it
    # below: same east/north, negated height).
    for lam in (2.0 / (norms[0] + norms[1]), -2.0 / (norms[0] + norms[1])):
        r1, r2, t = lam * b[:, 0], lam * b[:, 1], lam * b[:, 2]
        u, _, vt = np.linalg.svd(np.stack([r1, r2, np.cross(r1, r2)], 1))
        rot = u @ vt
        centre = -rot.T @ t
        if centre[2] > 0:
            break
    else:
        return None
    pitch = math.degrees(math.acos(float(np.clip(-rot[2, 2], -1.0, 1.0))))
    return CameraPose(float(centre[0]), float(centre[1]), float(centre[2]), pitch)
