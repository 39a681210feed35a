"""Drone camera warps: intrinsics, tilt homography, heading rotation, simulate/undo round trip."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from cvgl.data.geometry import (
    DEFAULT_HFOV_DEG,
    camera_matrix,
    center_crop,
    heading_to_north_up,
    hfov_from_focal_35mm,
    rectify_tilt,
    required_patch_side,
    rotate_image,
    scale_image,
    simulate_drone_view,
    tilt_homography,
    tilt_image,
    undo_drone_view,
)


def _texture(size: int, seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """Blurred RGB noise: textured everywhere, yet smooth enough to survive two resamplings."""
    noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigma)
    return cv2.normalize(blurred, None, 1, 255, cv2.NORM_MINMAX)  # no pure black pixel


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def _arrow_north_up(size: int = 61) -> np.ndarray:
    """A white arrow pointing up (north) on black."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    c = size // 2
    cv2.fillConvexPoly(img, np.array([[c, 5], [c - 12, 25], [c + 12, 25]], np.int32),
                       (255, 255, 255))
    cv2.rectangle(img, (c - 4, 25), (c + 4, size - 6), (255, 255, 255), -1)
    return img


def _tip_direction(img: np.ndarray) -> str:
    """Which side of the image has the most white: where the arrow's head (the bulk) is."""
    gray = img[..., 0].astype(np.float64)
    h, w = gray.shape
    ys, xs = np.nonzero(gray > 128)
    # The head is wider than the shaft, so the column/row with most white is near the head.
    dy, dx = ys.mean() - (h - 1) / 2, xs.mean() - (w - 1) / 2
    if abs(dy) > abs(dx):
        return "up" if dy < 0 else "down"
    return "left" if dx < 0 else "right"


def _marker_position(img: np.ndarray, channel: int) -> tuple[float, float]:
    """(x, y) centroid of the pixels bright in ``channel`` and dark in the others."""
    others = [c for c in range(3) if c != channel]
    mask = (img[..., channel] > 150) & np.all(img[..., others] < 100, axis=2)
    ys, xs = np.nonzero(mask)
    assert len(xs), "marker not visible"
    return float(xs.mean()), float(ys.mean())


# --------------------------------------------------------------------------- camera


def test_camera_matrix() -> None:
    k = camera_matrix(640, 480, 90.0)
    assert k[0, 0] == pytest.approx(320.0) and k[1, 1] == pytest.approx(320.0)
    assert (k[0, 2], k[1, 2]) == (319.5, 239.5)
    with pytest.raises(ValueError):
        camera_matrix(640, 480, 180.0)


def test_hfov_from_focal_35mm() -> None:
    assert hfov_from_focal_35mm(18.0) == pytest.approx(90.0)
    assert hfov_from_focal_35mm(24.0) == pytest.approx(2 * math.degrees(math.atan(0.75)))
    assert hfov_from_focal_35mm(None) == DEFAULT_HFOV_DEG
    assert hfov_from_focal_35mm(0.0) == DEFAULT_HFOV_DEG


# --------------------------------------------------------------------------- tilt


def test_tilt_zero_is_identity() -> None:
    assert np.allclose(tilt_homography(320, 240, 0.0, 70.0), np.eye(3))


@pytest.mark.parametrize("pitch", [-20.0, 15.0, 45.0, 80.0])
@pytest.mark.parametrize(("width", "height"), [(320, 240), (101, 77)])
def test_tilt_keeps_centre(pitch: float, width: int, height: int) -> None:
    h = tilt_homography(width, height, pitch, 70.0)
    centre = np.array([(width - 1) / 2, (height - 1) / 2, 1.0])
    mapped = h @ centre
    assert np.allclose(mapped[:2] / mapped[2], centre[:2])


def test_tilt_foreshortens_with_the_far_side_smaller() -> None:
    # Ground 50 px north (top) and 50 px south of the target, seen pitched forward by 45 degrees.
    h = tilt_homography(201, 201, 45.0, 70.0)
    far, near = h @ [100.0, 50.0, 1.0], h @ [100.0, 150.0, 1.0]
    far_y, near_y = far[1] / far[2], near[1] / near[2]
    assert far_y < 100 < near_y  # north stays up, south stays down
    assert 100 - far_y < near_y - 100 < 50  # foreshortened, and more so on the far side


def test_tilt_rejects_impossible_pitch() -> None:
    with pytest.raises(ValueError):
        tilt_homography(10, 10, 90.0)


def test_rectify_undoes_tilt_in_the_centre() -> None:
    nadir = _texture(241)
    recovered = rectify_tilt(tilt_image(nadir, 35.0), 35.0)
    assert _corr(center_crop(recovered, 120), center_crop(nadir, 120)) > 0.95


def test_rectification_blacks_out_ground_behind_the_camera() -> None:
    # A tall photo at 80 degrees: the bottom of the rectified canvas lies behind the camera.
    # A plain cv2.warpPerspective would fill it with a mirrored copy of the photo.
    photo = np.full((300, 80, 3), 200, np.uint8)
    rectified = rectify_tilt(photo, 80.0, 70.0)
    assert rectified[150, 40].tolist() == [200, 200, 200]
    assert rectified[-60:].max() == 0
    raw = cv2.warpPerspective(photo, np.linalg.inv(tilt_homography(80, 300, 80.0)), (80, 300))
    assert raw[-60:].max() > 0


# ------------------------------------------------------------------- rotation / scale / crop


def test_rotate_clockwise_matches_rot90() -> None:
    img = np.random.default_rng(3).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    assert np.array_equal(rotate_image(img, 90, cv2.INTER_NEAREST), np.rot90(img, -1))
    assert np.array_equal(rotate_image(img, -90, cv2.INTER_NEAREST), np.rot90(img, 1))
    assert np.array_equal(rotate_image(img, 180, cv2.INTER_NEAREST), np.rot90(img, 2))


def test_rotate_keeps_size_and_grayscale() -> None:
    img = np.ones((20, 30), dtype=np.uint8)
    out = rotate_image(img, 33.0)
    assert out.shape == (20, 30)
    assert out[0, 0] == 0 and out[10, 15] == 1  # black corner, content at centre


@pytest.mark.parametrize(("heading", "k"), [(90.0, 1), (270.0, -1), (-90.0, -1), (180.0, 2)])
def test_heading_to_north_up(heading: float, k: int) -> None:
    north_up = _arrow_north_up()
    # Facing east (90), the north-pointing arrow appears pointing LEFT in the photo: the
    # photo is the world rotated counter-clockwise by the heading (np.rot90 k=1 is CCW).
    photo = np.ascontiguousarray(np.rot90(north_up, k))
    expected = {1: "left", -1: "right", 2: "down"}[k]
    assert _tip_direction(photo) == expected
    fixed = heading_to_north_up(photo, heading)
    assert _tip_direction(fixed) == "up"
    assert _corr(fixed, north_up) > 0.95


def test_scale_image() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    assert scale_image(img, 0.5).shape == (20, 30, 3)
    assert scale_image(img, 1.5).shape == (60, 90, 3)
    assert scale_image(img, 0.001).shape == (1, 1, 3)
    with pytest.raises(ValueError):
        scale_image(img, 0.0)


def test_center_crop() -> None:
    img = np.arange(100).reshape(10, 10)
    assert center_crop(img, 4).tolist() == img[3:7, 3:7].tolist()
    assert center_crop(img, (2, 6)).shape == (2, 6)
    with pytest.raises(ValueError):
        center_crop(img, 11)


# --------------------------------------------------------------------------- simulate / undo


def test_simulate_nadir_north_is_a_centre_crop() -> None:
    patch = _texture(300)
    view = simulate_drone_view(patch, 0.0, 0.0, 70.0, (120, 160))
    assert np.array_equal(view, center_crop(patch, (120, 160)))


def test_simulate_yaw_puts_the_faced_direction_on_top() -> None:
    patch = np.full((401, 401, 3), 60, np.uint8)
    cv2.circle(patch, (200 + 60, 200), 8, (255, 0, 0), -1)  # red: east of the target
    cv2.circle(patch, (200, 200 - 60), 8, (0, 255, 0), -1)  # green: north of the target
    view = simulate_drone_view(patch, 90.0, 0.0, 70.0, 201)  # facing east, nadir
    red_x, red_y = _marker_position(view, 0)
    green_x, green_y = _marker_position(view, 1)
    assert red_y < 80 and abs(red_x - 100) < 3  # east is straight ahead: top of the photo
    assert green_x < 80 and abs(green_y - 100) < 3  # north is on the left


def test_simulate_pitch_shrinks_the_far_side() -> None:
    patch = np.full((1201, 1201, 3), 60, np.uint8)
    cv2.circle(patch, (600, 600 - 40), 5, (255, 0, 0), -1)  # red: 40 px ahead (north)
    cv2.circle(patch, (600, 600 + 40), 5, (0, 0, 255), -1)  # blue: 40 px behind (south)
    view = simulate_drone_view(patch, 0.0, 40.0, 70.0, (150, 200))
    _, far_y = _marker_position(view, 0)
    _, near_y = _marker_position(view, 2)
    assert far_y < 74.5 < near_y
    assert 74.5 - far_y < near_y - 74.5 < 40


@pytest.mark.parametrize(("yaw", "pitch"), [(0.0, 0.0), (37.0, 20.0), (200.0, 35.0),
                                            (-75.0, 45.0), (130.0, 50.0)])
def test_undo_inverts_simulate(yaw: float, pitch: float) -> None:
    out = (96, 128)
    patch = _texture(required_patch_side(out, pitch, 70.0) + 4, seed=int(yaw) % 7)
    view = simulate_drone_view(patch, yaw, pitch, 70.0, out)
    assert view.shape == (96, 128, 3)
    assert view.min() > 0  # no black border: the patch covers everything the camera sees
    restored = undo_drone_view(view, yaw, pitch, 70.0)
    assert restored.shape == view.shape
    assert _corr(center_crop(restored, 48), center_crop(center_crop(patch, out), 48)) > 0.9


def test_undo_with_larger_canvas() -> None:
    patch = _texture(400)
    view = simulate_drone_view(patch, 10.0, 30.0, 70.0, 100)
    restored = undo_drone_view(view, 10.0, 30.0, 70.0, out_size=(200, 200))
    assert restored.shape == (200, 200, 3)
    assert _corr(center_crop(restored, 50), center_crop(patch, 50)) > 0.9


def test_simulate_refuses_small_patch_and_says_how_big() -> None:
    patch = _texture(200)
    need = required_patch_side(128, 40.0, 70.0, yaw_deg=45.0)
    with pytest.raises(ValueError, match=f">= {need}"):
        simulate_drone_view(patch, 45.0, 40.0, 70.0, 128)
    assert need > 128 * math.sqrt(2)
    ok = simulate_drone_view(_texture(need), 45.0, 40.0, 70.0, 128)
    assert ok.min() > 0


def test_simulate_refuses_horizon() -> None:
    with pytest.raises(ValueError, match="horizon"):
        simulate_drone_view(_texture(300), 0.0, 60.0, 70.0, 64)


def test_simulate_default_size_is_the_largest_that_fits() -> None:
    patch = _texture(500)
    view = simulate_drone_view(patch, 25.0, 30.0)
    side = view.shape[0]
    assert view.shape == (side, side, 3) and view.min() > 0
    assert required_patch_side(side, 30.0, DEFAULT_HFOV_DEG, yaw_deg=25.0) <= 500 + 1
    with pytest.raises(ValueError):
        simulate_drone_view(patch, 25.0, 30.0, DEFAULT_HFOV_DEG, side + 20)


def test_required_patch_side_grows_with_pitch() -> None:
    sides = [required_patch_side(100, pitch) for pitch in (0, 20, 30, 40, 45, 50)]
    assert sides == sorted(sides)
    assert sides[0] == pytest.approx(100 * math.sqrt(2), abs=2)
    assert required_patch_side(100, 0, yaw_deg=0.0) <= 101
