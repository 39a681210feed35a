"""Image warps that model a drone camera looking at flat ground.

A drone photo differs from the orthophoto tile it must be matched against in three ways: it is
rotated (the camera faces some heading, the tile is north-up), it is tilted (the gimbal looks
forward instead of straight down) and it is scaled. Undoing the first two at query time with the
recorded heading and gimbal pitch (see :mod:`cvgl.data.metadata`) makes the photo look like the
tiles; doing them forward on an orthophoto makes realistic synthetic drone photos for the demo and
for tests.

Conventions (all angles in degrees):

* Images are numpy arrays, HxW or HxWxC (uint8 RGB everywhere else in cvgl), processed with
  OpenCV. Pixel centres are at integer coordinates, so the image centre is ((W-1)/2, (H-1)/2)
  and rotations by multiples of 90 degrees are exact.
* Headings/yaws are clockwise from north. A photo "taken facing heading h" has the direction h at
  the top of the frame. ``heading_to_north_up(photo, h)`` rotates the photo CLOCKWISE by h: facing
  east (90), north is at the photo's left, and a 90 degree clockwise turn brings it to the top.
* Pitch is measured from nadir: 0 = looking straight down, 45 = oblique, 90 = horizon. The camera
  pitches FORWARD, i.e. towards the top of the frame, so the far ground is at the top.
* Pinhole camera with square pixels, principal point at the image centre and horizontal field of
  view ``hfov_deg``; 70 degrees is typical of DJI cameras when nothing better is known.
* Areas outside the source image, or beyond the horizon, are filled with black (0).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

DEFAULT_HFOV_DEG = 70.0

#: Output pixels whose homogeneous depth is below this are treated as "beyond the horizon".
_MIN_DEPTH = 1e-6


def hfov_from_focal_35mm(
    focal_length_35mm: float | None, default: float = DEFAULT_HFOV_DEG
) -> float:
    """Horizontal field of view from the 35 mm-equivalent focal length: 2*atan(36 / (2 f35)).

    The 35 mm equivalent is what EXIF records for phones and drones regardless of sensor size,
    and a full-frame sensor is 36 mm wide. Missing or non-positive values give ``default``.
    """
    if focal_length_35mm is None or not focal_length_35mm > 0:
        return default
    return math.degrees(2.0 * math.atan(36.0 / (2.0 * focal_length_35mm)))


def camera_matrix(width: int, height: int, hfov_deg: float = DEFAULT_HFOV_DEG) -> np.ndarray:
    """Intrinsics K (3x3) of a centred pinhole camera with the given horizontal field of view.

    The image spans ``width`` pixels edge to edge, so fx = (width / 2) / tan(hfov / 2); the
    principal point is the centre of the middle pixel, ((W-1)/2, (H-1)/2), matching OpenCV's
    integer pixel-centre coordinates.
    """
    _check_size(width, height)
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"hfov_deg must be in (0, 180), got {hfov_deg}")
    focal = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    return np.array(
        [[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]]
    )


def tilt_homography(
    width: int, height: int, pitch_from_nadir_deg: float, hfov_deg: float = DEFAULT_HFOV_DEG
) -> np.ndarray:
    """Homography (3x3) from a nadir image to the view of a camera pitched forward by the angle.

    Direction: ``H @ [x_nadir, y_nadir, 1]`` gives the pixel in the OBLIQUE image; both images are
    ``width`` x ``height`` with the same intrinsics :func:`camera_matrix`. ``rectify_tilt`` applies
    the inverse.

    Model: the camera orbits the target on the ground at the image centre, rotating about its own
    x-axis by the pitch, at a slant range equal to the nadir altitude. That is the exact
    plane-induced homography H = K [r1 r2 e3] K^-1, where r1, r2 are the first two columns of the
    pitch rotation R. It equals K R K^-1 (turning the camera in place) followed by the correction
    that brings the target back to the principal point - so the image centre maps to the image
    centre exactly and the ground scale across the centre is preserved. Turning in place and then
    shifting the picture would not be a physical camera, and its perspective would be wrong.

    In normalised coordinates H = [[1, 0, 0], [0, cos p, 0], [0, -sin p, 1]]: rows are
    foreshortened by cos p at the centre, ground ahead (top, y < 0) is farther away (depth
    1 + sin(p)|y|) and shrinks more, ground behind (bottom) is nearer and shrinks less.
    """
    _check_pitch(pitch_from_nadir_deg)
    k = camera_matrix(width, height, hfov_deg)
    pitch = math.radians(pitch_from_nadir_deg)
    tilt = np.array(
        [[1.0, 0.0, 0.0], [0.0, math.cos(pitch), 0.0], [0.0, -math.sin(pitch), 1.0]]
    )
    return k @ tilt @ np.linalg.inv(k)


def tilt_image(
    img: np.ndarray, pitch_from_nadir_deg: float, hfov_deg: float = DEFAULT_HFOV_DEG
) -> np.ndarray:
    """What a camera pitched forward by the angle would see of a nadir image (same size).

    Ground beyond the nadir image's edges comes out black; use :func:`simulate_drone_view` with a
    larger orthophoto patch for a view without borders.
    """
    height, width = _image_hw(img)
    h = tilt_homography(width, height, pitch_from_nadir_deg, hfov_deg)
    return _warp(img, h, (height, width))


def rectify_tilt(
    img: np.ndarray, pitch_from_nadir_deg: float, hfov_deg: float = DEFAULT_HFOV_DEG
) -> np.ndarray:
    """Undo a forward camera pitch: map an oblique photo back to a nadir view (same size).

    The inverse of :func:`tilt_homography`. Nadir pixels the photo never saw (the near corners,
    and everything if the tilt was extreme) are black.
    """
    height, width = _image_hw(img)
    h = tilt_homography(width, height, pitch_from_nadir_deg, hfov_deg)
    return _warp(img, np.linalg.inv(h), (height, width))


def rotate_image(
    img: np.ndarray, angle_deg_clockwise: float, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Rotate about the image centre, clockwise as seen on screen, keeping the size.

    Corners that rotate out are lost; corners that rotate in are black. OpenCV's own angle is
    counter-clockwise, hence the sign flip here.
    """
    height, width = _image_hw(img)
    return _warp(img, _rotation_about(_centre(width, height), angle_deg_clockwise),
                 (height, width), interpolation)


def heading_to_north_up(img: np.ndarray, heading_deg: float) -> np.ndarray:
    """Rotate a photo taken facing ``heading_deg`` (clockwise from north) so north is up.

    The photo's top shows the heading direction, so north sits ``heading_deg`` counter-clockwise
    from the top; rotating the photo clockwise by ``heading_deg`` brings it up. Example: facing
    east (90), north is on the left and a quarter turn clockwise puts it on top.
    """
    return rotate_image(img, heading_deg)


def scale_image(img: np.ndarray, factor: float) -> np.ndarray:
    """Resize by ``factor`` (size rounded, at least 1 px); area averaging when shrinking.

    INTER_AREA avoids the aliasing a linear filter causes when downsampling, e.g. when matching a
    high-resolution drone photo to coarser satellite tiles.
    """
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"scale factor must be a positive number, got {factor}")
    height, width = _image_hw(img)
    new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(img, new_size, interpolation=interpolation)


def center_crop(img: np.ndarray, size_hw: int | tuple[int, int]) -> np.ndarray:
    """The central ``size_hw`` (an int for a square) region; a view, not a copy."""
    out_h, out_w = _size_hw(size_hw)
    height, width = _image_hw(img)
    if out_h > height or out_w > width:
        raise ValueError(f"cannot crop {out_h}x{out_w} from a {height}x{width} image")
    top, left = (height - out_h) // 2, (width - out_w) // 2
    return img[top:top + out_h, left:left + out_w]


def simulate_drone_view(
    ortho_patch: np.ndarray,
    yaw_deg: float,
    pitch_from_nadir_deg: float,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    out_size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """The photo a drone camera facing ``yaw_deg`` and pitched from nadir would take.

    ``ortho_patch`` is a north-up orthophoto patch centred on the target; the centre of the photo
    is the centre of the patch and, at the centre, the photo has the patch's ground resolution
    (the camera's slant range equals the altitude of a nadir photo at that resolution). The
    rotation, tilt and crop are composed into ONE perspective warp, so the pixels are resampled
    only once.

    The patch must contain every ground point the camera sees, otherwise a ValueError says how
    big it must be (:func:`required_patch_side`). The far edge of an oblique view reaches far
    away, so the needed size grows quickly with pitch. With the default 70 degree field of view
    and any yaw, a square patch needs a side of at least this multiple of the view's width:

    ========  ====  ====  ====  ====  ====  ====
    pitch       0    20    30    40    45    50
    square    1.42  1.96  2.56  3.98  5.76  11.1
    4:3 land  1.25  1.58  1.90  2.50  3.06  4.09
    ========  ====  ====  ====  ====  ====  ====

    At 55 degrees the top of a square 70 degree view reaches the horizon and is refused.
    ``out_size`` (an int for a square, or (h, w)) defaults to the largest view the patch supports.
    """
    patch_h, patch_w = _image_hw(ortho_patch)
    if out_size is None:
        ratio = _required_side_ratio((1.0, 1.0), pitch_from_nadir_deg, hfov_deg, yaw_deg)
        side = int(min((patch_h - 1) / ratio, (patch_w - 1) / ratio))
        if side < 1:
            raise ValueError(f"a {patch_h}x{patch_w} patch is too small for any view at pitch "
                             f"{pitch_from_nadir_deg} and hfov {hfov_deg}")
        out_size = side
    out_h, out_w = _size_hw(out_size)
    h = _ortho_to_photo(patch_w, patch_h, out_w, out_h, yaw_deg, pitch_from_nadir_deg, hfov_deg)

    corners = _corners(out_w, out_h)
    source = _apply(np.linalg.inv(h), corners)
    if np.any(source[:, 2] <= _MIN_DEPTH):
        raise ValueError(_horizon_message(out_h, out_w, pitch_from_nadir_deg, hfov_deg))
    xy = source[:, :2] / source[:, 2:]
    tolerance = 1e-6
    if (xy.min() < -tolerance or np.any(xy[:, 0] > patch_w - 1 + tolerance)
            or np.any(xy[:, 1] > patch_h - 1 + tolerance)):
        need = required_patch_side((out_h, out_w), pitch_from_nadir_deg, hfov_deg, yaw_deg)
        raise ValueError(
            f"ortho patch {patch_h}x{patch_w} is too small for a {out_h}x{out_w} view at yaw "
            f"{yaw_deg}, pitch {pitch_from_nadir_deg}, hfov {hfov_deg}: the view would have black "
            f"borders; use a square patch of side >= {need} centred on the target")
    return _warp(ortho_patch, h, (out_h, out_w))


def undo_drone_view(
    photo: np.ndarray,
    heading_deg: float,
    pitch_from_nadir_deg: float,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    out_size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Turn a drone photo into a north-up, nadir-like view: rectify the tilt, then rotate.

    The inverse of :func:`simulate_drone_view`, used at query time with the heading and pitch
    from the photo's metadata. The result is centred on the photo's centre and has its ground
    resolution there; ``out_size`` (default: the photo's size) sets the canvas. Ground the photo
    did not see is black.
    """
    height, width = _image_hw(photo)
    out_h, out_w = _size_hw(out_size) if out_size is not None else (height, width)
    to_nadir = np.linalg.inv(tilt_homography(width, height, pitch_from_nadir_deg, hfov_deg))
    recentre = _translation(_centre(out_w, out_h) - _centre(width, height))
    north_up = _rotation_about(_centre(out_w, out_h), heading_deg)
    return _warp(photo, north_up @ recentre @ to_nadir, (out_h, out_w))


def required_patch_side(
    out_size: int | tuple[int, int],
    pitch_from_nadir_deg: float,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    yaw_deg: float | None = None,
) -> int:
    """Smallest square ortho patch side for which :func:`simulate_drone_view` has no borders.

    With ``yaw_deg`` None the answer holds for every yaw (the footprint may point anywhere), which
    is what a data generator that picks random headings needs.
    """
    out_h, out_w = _size_hw(out_size)
    ratio = _required_side_ratio((out_h, out_w), pitch_from_nadir_deg, hfov_deg, yaw_deg)
    return int(math.ceil(ratio - 1e-9)) + 1


# --------------------------------------------------------------------------- internals


def _ortho_to_photo(
    patch_w: int, patch_h: int, out_w: int, out_h: int,
    yaw_deg: float, pitch_from_nadir_deg: float, hfov_deg: float,
) -> np.ndarray:
    """Homography from ortho patch pixels to photo pixels: centre, turn heading-up, tilt."""
    heading_up = _rotation_about(_centre(out_w, out_h), -yaw_deg)
    recentre = _translation(_centre(out_w, out_h) - _centre(patch_w, patch_h))
    tilt = tilt_homography(out_w, out_h, pitch_from_nadir_deg, hfov_deg)
    return tilt @ heading_up @ recentre


def _required_side_ratio(
    out_hw: tuple[float, float], pitch_from_nadir_deg: float, hfov_deg: float,
    yaw_deg: float | None,
) -> float:
    """Twice the largest extent, from the centre, of the ground footprint of the view's corners.

    Works in continuous units so callers can scale it: pass (1, 1) for "per unit of square side".
    The view's pixel-centre corners are used, matching the check in simulate_drone_view.
    """
    out_h, out_w = out_hw
    scale = 1000.0 / max(out_h, out_w)  # evaluate on a large grid so the -1 pixel terms vanish
    width, height = max(2, round(out_w * scale)), max(2, round(out_h * scale))
    h = tilt_homography(width, height, pitch_from_nadir_deg, hfov_deg)
    source = _apply(np.linalg.inv(h), _corners(width, height))
    if np.any(source[:, 2] <= _MIN_DEPTH):
        raise ValueError(_horizon_message(out_h, out_w, pitch_from_nadir_deg, hfov_deg))
    offsets = source[:, :2] / source[:, 2:] - _centre(width, height)
    if yaw_deg is None:
        extent = float(np.max(np.hypot(offsets[:, 0], offsets[:, 1])))
    else:
        turn = _rotation_about(np.zeros(2), yaw_deg)[:2, :2]  # heading-up -> north-up
        extent = float(np.max(np.abs(offsets @ turn.T)))
    return 2.0 * extent / scale


def _horizon_message(out_h: float, out_w: float, pitch: float, hfov: float) -> str:
    half_vfov = math.degrees(math.atan((out_h / out_w) * math.tan(math.radians(hfov) / 2.0)))
    return (f"a {out_h:g}x{out_w:g} view at pitch {pitch} with hfov {hfov} reaches the horizon "
            f"(pitch + half vertical fov {half_vfov:.1f} >= 90); lower the pitch, narrow the "
            "field of view or use a wider-than-tall view")


def _warp(
    img: np.ndarray, h: np.ndarray, out_hw: tuple[int, int], interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Perspective-warp ``img`` by source->destination ``h``, black outside and beyond the horizon.

    cv2.warpPerspective divides by the homogeneous coordinate without looking at its sign, so
    destination pixels whose source lies behind the camera would sample mirrored garbage; they
    are zeroed explicitly. Every homography here is built so that w > 0 means "in front".
    """
    out_h, out_w = out_hw
    contiguous = np.ascontiguousarray(img)
    warped = cv2.warpPerspective(contiguous, h, (out_w, out_h), flags=interpolation,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if warped.ndim < contiguous.ndim:  # OpenCV drops a trailing singleton channel
        warped = warped[..., None]
    inverse = np.linalg.inv(h)
    if not (inverse[2, 0] == 0.0 and inverse[2, 1] == 0.0):  # affine maps never cross the horizon
        ys, xs = np.mgrid[0:out_h, 0:out_w]
        depth = inverse[2, 0] * xs + inverse[2, 1] * ys + inverse[2, 2]
        warped[depth <= _MIN_DEPTH] = 0
    return warped


def _rotation_about(centre: np.ndarray, angle_deg_clockwise: float) -> np.ndarray:
    """3x3 rotation about ``centre``, clockwise on screen (image y axis points down)."""
    pivot = (float(centre[0]), float(centre[1]))
    affine = cv2.getRotationMatrix2D(pivot, -angle_deg_clockwise, 1.0)
    return np.vstack([affine, [0.0, 0.0, 1.0]])


def _translation(offset: np.ndarray) -> np.ndarray:
    return np.array([[1.0, 0.0, offset[0]], [0.0, 1.0, offset[1]], [0.0, 0.0, 1.0]])


def _centre(width: float, height: float) -> np.ndarray:
    return np.array([(width - 1) / 2.0, (height - 1) / 2.0])


def _corners(width: float, height: float) -> np.ndarray:
    """Homogeneous pixel-centre corners of a width x height image, one per row."""
    return np.array([[0.0, 0.0, 1.0], [width - 1, 0.0, 1.0],
                     [0.0, height - 1, 1.0], [width - 1, height - 1, 1.0]])


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homography to homogeneous row vectors, keeping w (its sign matters)."""
    return points @ h.T


def _image_hw(img: np.ndarray) -> tuple[int, int]:
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ValueError("expected a non-empty HxW or HxWxC numpy image, got "
                         f"{type(img).__name__} with shape {getattr(img, 'shape', None)}")
    return int(img.shape[0]), int(img.shape[1])


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else size
    out_h, out_w = int(out_h), int(out_w)
    _check_size(out_w, out_h)
    return out_h, out_w


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def _check_pitch(pitch_from_nadir_deg: float) -> None:
    if not -90.0 < pitch_from_nadir_deg < 90.0:
        raise ValueError(
            f"pitch from nadir must be in (-90, 90) degrees, got {pitch_from_nadir_deg}")
