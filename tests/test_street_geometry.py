"""cvgl.street.geometry: conventions, transforms vs plain per-pixel loops, and a textured flat world rendered by code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.street.descriptors import (
    column_shift_scores,
    normalise_token_map,
    token_map_scores,
)
from cvgl.street.geometry import (
    PanoramaBand,
    PinholeView,
    annulus_mask,
    as_tensor,
    azimuth_to_column,
    column_azimuths,
    panorama_to_bev,
    perspective_azimuth_range,
    perspective_to_panorama,
    polar_grid,
    polar_transform,
    sample_panorama,
    wrap_degrees,
)
from cvgl.street.synthetic import GroundTexture, render_aerial, render_panorama

# ------------------------------------------------------------------------------------------------
# plain per-pixel references
# ------------------------------------------------------------------------------------------------


def bilinear(image: np.ndarray, col: float, row: float, wrap: bool = False) -> np.ndarray:
    """One bilinear sample of ``H×W×C`` at continuous pixel coordinates (pixel j covers [j, j+1)); 0 outside."""
    height, width = image.shape[:2]
    x, y = col - 0.5, row - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    value = np.zeros(image.shape[2])
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        if wrap:
            xi %= width
        if 0 <= xi < width and 0 <= yi < height:
            value += weight * image[yi, xi]
    return value


def polar_loop(image, centre, gsd, r_max, size, r_min=0.0):
    height, width = size
    out = np.zeros((height, width, image.shape[2]))
    for i in range(height):
        r = r_max - (i + 0.5) / height * (r_max - r_min)
        for j in range(width):
            az = math.radians(((j + 0.5) / width - 0.5) * 360.0)
            out[i, j] = bilinear(image, centre[0] + r * math.sin(az) / gsd, centre[1] - r * math.cos(az) / gsd)
    return out


def bev_loop(pano, band, camera_height, extent, size, heading):
    height, width = pano.shape[:2]
    step = extent / size
    out = np.zeros((size, size, pano.shape[2]))
    for i in range(size):
        for j in range(size):
            east, north = (j + 0.5 - size / 2) * step, (size / 2 - i - 0.5) * step
            az = math.degrees(math.atan2(east, north))
            elev = -math.degrees(math.atan2(camera_height, math.hypot(east, north)))
            col = (((az - heading) / 360.0 + 0.5) % 1.0) * width
            row = (band.top - elev) / (band.top - band.bottom) * height
            out[i, j] = bilinear(pano, col, row, wrap=True)
    return out


def perspective_loop(photo, view, width, band, height):
    ph, pw = photo.shape[:2]
    h, p = math.radians(view.heading), math.radians(view.pitch)
    fwd = np.array([math.sin(h) * math.cos(p), math.cos(h) * math.cos(p), math.sin(p)])
    right = np.array([math.cos(h), -math.sin(h), 0.0])
    up = np.cross(right, fwd)
    f = (pw / 2) / math.tan(math.radians(view.hfov) / 2)
    out = np.zeros((height, width, photo.shape[2]))
    mask = np.zeros((height, width), dtype=bool)
    for i in range(height):
        el = math.radians(band.top - (i + 0.5) / height * (band.top - band.bottom))
        for j in range(width):
            az = math.radians(((j + 0.5) / width - 0.5) * 360.0)
            ray = np.array([math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])
            z = ray @ fwd
            if z <= 1e-6:
                continue
            col, row = pw / 2 + f * (ray @ right) / z, ph / 2 - f * (ray @ up) / z
            out[i, j] = bilinear(photo, col, row)
            mask[i, j] = 0 <= col < pw and 0 <= row < ph
    return out, mask


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------
# conventions
# ------------------------------------------------------------------------------------------------


def test_centre_column_is_heading_and_columns_run_clockwise():
    az = column_azimuths(8, heading=0.0)
    assert az[3] == pytest.approx(-22.5) and az[4] == pytest.approx(22.5)  # the centre (x = 4) is north
    assert azimuth_to_column(90.0, 8) == pytest.approx(6.0)  # east is three quarters across
    assert azimuth_to_column(0.0, 8, heading=90.0) == pytest.approx(2.0)  # panorama looking east: north is left


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 2000), st.floats(-720, 720), st.floats(0.0, 0.999))
def test_azimuth_column_round_trip(width, heading, fraction):
    col = fraction * width
    az = heading + (col / width - 0.5) * 360.0
    back = float(azimuth_to_column(az, width, heading))
    assert min(abs(back - col), width - abs(back - col)) < 1e-6 * width


@settings(max_examples=60, deadline=None)
@given(st.floats(-89, 0), st.floats(1, 89), st.integers(8, 500), st.floats(0, 1))
def test_band_rows_and_elevations_are_inverse(bottom, span, height, fraction):
    band = PanoramaBand(min(90.0, bottom + span), bottom)
    row = fraction * height
    assert float(band.row_of(band.elevation_of(row, height), height)) == pytest.approx(row, abs=1e-6)


def test_band_for_image_is_isotropic_and_centred():
    assert PanoramaBand.for_image(256, 512) == PanoramaBand(90.0, -90.0)
    band = PanoramaBand.for_image(224, 1232)  # CVUSA
    assert band.top == pytest.approx(32.727, abs=1e-3) and band.bottom == -band.top
    r0, r1, sub = PanoramaBand().crop(40.0, -60.0, 180)
    assert (r0, r1) == (50, 150) and sub == PanoramaBand(40.0, -60.0)
    with pytest.raises(ValueError):
        PanoramaBand(10.0, 20.0)


@settings(max_examples=40, deadline=None)
@given(st.floats(1, 80), st.floats(0.05, 2), st.floats(-50, 50), st.floats(-50, 50))
def test_polar_grid_puts_each_row_at_its_radius_and_azimuth(r_max, gsd, cx, cy):
    cols, rows = polar_grid(np.array([[cx, cy]]), gsd, r_max, (5, 16))
    east, north = (cols[0] - cx) * gsd, (cy - rows[0]) * gsd
    radius = r_max - (np.arange(5) + 0.5) / 5 * r_max
    np.testing.assert_allclose(np.hypot(east, north), np.broadcast_to(radius[:, None], (5, 16)), atol=1e-6 * max(1, r_max))
    az = np.rad2deg(np.arctan2(east, north))
    np.testing.assert_allclose(wrap_degrees(az - column_azimuths(16)[None, :]), 0.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# transforms vs plain loops
# ------------------------------------------------------------------------------------------------


def test_polar_transform_matches_loop():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (40, 50, 3))
    centres = np.array([[25.0, 20.0], [10.3, 31.7]])  # the second disc leaves the image: zeros there
    got = polar_transform(image, centres, gsd=0.5, r_max=9.0, size=(6, 12), r_min=1.0)
    assert got.shape == (2, 3, 6, 12)
    for k, c in enumerate(centres):
        np.testing.assert_allclose(hwc(got[k]), polar_loop(image, c, 0.5, 9.0, (6, 12), r_min=1.0), atol=1e-3)


def test_panorama_to_bev_matches_loop():
    rng = np.random.default_rng(1)
    pano = rng.uniform(0, 255, (20, 40, 2))
    band = PanoramaBand(30.0, -60.0)
    got = panorama_to_bev(pano, band, camera_height=2.0, extent_m=16.0, size=9, headings=[0.0, 33.0])
    for k, heading in enumerate((0.0, 33.0)):
        np.testing.assert_allclose(hwc(got[k]), bev_loop(pano, band, 2.0, 16.0, 9, heading), atol=1e-3)


def test_perspective_to_panorama_matches_loop():
    rng = np.random.default_rng(2)
    photo = rng.uniform(0, 255, (18, 24, 3))
    view = PinholeView(hfov=70.0, heading=-30.0, pitch=10.0)
    band = PanoramaBand(60.0, -60.0)
    got, mask = perspective_to_panorama(photo, view, 36, band, 12)
    ref, ref_mask = perspective_loop(photo, view, 36, band, 12)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(hwc(got[0]), ref, atol=1e-3)


@pytest.mark.parametrize("view", [PinholeView(60, 0, 0), PinholeView(90, 200, 25), PinholeView(50, -170, -15)])
def test_perspective_azimuth_range_matches_every_pixel(view):
    width, height = 64, 48
    start, span = perspective_azimuth_range(view, width, height)
    h, p = math.radians(view.heading), math.radians(view.pitch)
    fwd = np.array([math.sin(h) * math.cos(p), math.cos(h) * math.cos(p), math.sin(p)])
    right = np.array([math.cos(h), -math.sin(h), 0.0])
    up = np.cross(right, fwd)
    f = (width / 2) / math.tan(math.radians(view.hfov) / 2)
    rel = []
    for row in np.linspace(0, height, 49):
        for col in np.linspace(0, width, 65):
            ray = fwd + (col - width / 2) / f * right + (height / 2 - row) / f * up
            rel.append(wrap_degrees(math.degrees(math.atan2(ray[0], ray[1])) - view.heading))
    assert span == pytest.approx(max(rel) - min(rel), abs=0.05)
    assert float(wrap_degrees(start - (view.heading + min(rel)))) == pytest.approx(0.0, abs=0.05)
    if view.pitch == 0:
        assert span == pytest.approx(view.hfov, abs=1e-6)  # level camera: exactly its field of view


def test_perspective_range_with_the_zenith_is_the_whole_circle():
    assert perspective_azimuth_range(PinholeView(90, 10, 70), 64, 64)[1] == 360.0


def test_perspective_panorama_covers_its_azimuth_range():
    view = PinholeView(hfov=60.0, heading=120.0)
    _, mask = perspective_to_panorama(np.ones((30, 40, 1)), view, 360, PanoramaBand(60, -60), 120)
    covered = column_azimuths(360)[mask.any(0)]
    assert wrap_degrees(covered - 120.0).min() == pytest.approx(-29.5, abs=1.0)
    assert wrap_degrees(covered - 120.0).max() == pytest.approx(29.5, abs=1.0)


def test_annulus_mask():
    mask = annulus_mask(12, 42.0, 5.0, 20.0)
    centre = (np.arange(12) + 0.5 - 6) * 3.5
    d = np.hypot(centre[None], centre[:, None])
    np.testing.assert_array_equal(mask, (d >= 5) & (d <= 20))
    assert not mask[5:7, 5:7].any() and mask[0, 6] and not mask[0, 0]


# ------------------------------------------------------------------------------------------------
# a textured flat world: the views agree, and the known heading and offset come back
# ------------------------------------------------------------------------------------------------

TEXTURE = GroundTexture(seed=3)
HEIGHT = 2.5


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_polar_aerial_equals_panorama_ground_seen_at_each_radius():
    camera, heading = (3.0, -2.0), 37.0
    pano = render_panorama(TEXTURE, camera, HEIGHT, (256, 512), heading=heading)
    aerial = render_aerial(TEXTURE, (0.0, 0.0), 200, 0.25)
    centre = np.array([[100 + camera[0] / 0.25, 100 - camera[1] / 0.25]])
    polar = polar_transform(aerial, centre, 0.25, 20.0, (30, 256), r_min=5.0)[0]
    radius = 20.0 - (np.arange(30) + 0.5) / 30 * 15.0
    rows = PanoramaBand().row_of(-np.rad2deg(np.arctan2(HEIGHT, radius)), 256)
    cols = azimuth_to_column(column_azimuths(256), 512, heading)
    c, r = np.broadcast_arrays(cols[None, :], rows[:, None])
    seen = sample_panorama(as_tensor(pano), torch.from_numpy(c.copy())[None], torch.from_numpy(r.copy())[None])[0]
    assert ncc(seen.numpy(), polar.numpy()) > 0.98


def test_bev_equals_aerial_at_the_right_heading_only():
    camera, heading = (-4.0, 6.0), 250.0
    pano = render_panorama(TEXTURE, camera, HEIGHT, (256, 512), heading=heading)
    truth = render_aerial(TEXTURE, camera, 80, 0.5)
    bev = panorama_to_bev(pano, PanoramaBand(), HEIGHT, 40.0, 80, [heading, heading + 30.0, 0.0])
    ring = annulus_mask(80, 40.0, 5.0, 20.0)
    right, *wrong = [ncc(hwc(b)[ring], truth[ring]) for b in bev]
    assert right > 0.95 and max(wrong) < 0.4


@pytest.mark.parametrize("heading", [37.3, 250.0])
def test_bev_heading_search_recovers_the_heading(heading):
    camera = (1.0, 2.0)
    pano = render_panorama(TEXTURE, camera, HEIGHT, (256, 512), heading=heading)
    truth = render_aerial(TEXTURE, camera, 40, 1.0)
    ring = annulus_mask(40, 40.0, 5.0, 20.0)
    hypotheses = np.arange(0.0, 360.0, 1.0)
    bev = panorama_to_bev(pano, PanoramaBand(), HEIGHT, 40.0, 40, hypotheses)
    scores = [ncc(hwc(b)[ring], truth[ring]) for b in bev]
    assert abs(wrap_degrees(hypotheses[int(np.argmax(scores))] - heading)) <= 1.0


def test_bev_translation_search_recovers_the_camera_offset():
    camera = (4.5, -3.0)  # metres east / north of the aerial tile's centre
    pano = render_panorama(TEXTURE, camera, HEIGHT, (256, 1024))
    gsd, bev_px, search_px = 0.5, 80, 20
    aerial = render_aerial(TEXTURE, (0.0, 0.0), bev_px + 2 * search_px, gsd)
    ring = annulus_mask(bev_px, bev_px * gsd, 5.0, 20.0)
    bev = normalise_token_map(panorama_to_bev(pano, PanoramaBand(), HEIGHT, bev_px * gsd, bev_px), ring)
    scores = token_map_scores(bev, normalise_token_map(as_tensor(aerial)), int(ring.sum()))[0, 0]
    dy, dx = np.unravel_index(int(scores.argmax()), scores.shape)
    assert ((dx - search_px) * gsd, -(dy - search_px) * gsd) == pytest.approx(camera, abs=gsd)


def test_polar_columns_recover_the_heading_by_circular_shift():
    """Panorama → BEV (heading unknown, rendered as if north-aligned) → polar, vs the aerial's polar: the best
    circular column shift is the heading."""
    heading, width = 123.0, 360
    pano = render_panorama(TEXTURE, (0.0, 0.0), HEIGHT, (256, 1024), heading=heading)
    bev = panorama_to_bev(pano, PanoramaBand(), HEIGHT, 40.0, 160, 0.0)[0]
    aerial = render_aerial(TEXTURE, (0.0, 0.0), 160, 0.25)
    centre = np.array([[80.0, 80.0]])
    q = polar_transform(bev.numpy().transpose(1, 2, 0), centre, 0.25, 19.0, (24, width), r_min=6.0)[0]
    r = polar_transform(aerial, centre, 0.25, 19.0, (24, width), r_min=6.0)[0]

    def columns(p: torch.Tensor) -> torch.Tensor:
        flat = p.permute(2, 0, 1).reshape(width, -1)
        return torch.nn.functional.normalize(flat - flat.mean(0), dim=1)

    shifts = column_shift_scores(columns(q), columns(r)[None])[0]
    assert abs(wrap_degrees(int(shifts.argmax()) * 360.0 / width - heading)) <= 1.0
