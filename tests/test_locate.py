"""locate's geometry bookkeeping: camera offset for oblique photos, and per-photo input checks."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cvgl.answer import answer_from_scores
from cvgl.data.metadata import CameraMetadata, write_camera_metadata
from cvgl.errors import InputError
from cvgl.geo import geodesic_distance_m, offset_latlon, tile_half_diagonal_m
from cvgl.preprocess import Hypothesis, PreparedQuery, QueryOptions, prepare_query


class FakeIndex:
    """Just what ``answer_from_scores`` reads: a tile table and a manifest."""

    def __init__(self, lat: np.ndarray, lon: np.ndarray, tile_m: float) -> None:
        self.tiles = pd.DataFrame({"tile_id": [f"t{i}" for i in range(len(lat))], "lat": lat, "lon": lon})
        self.manifest = SimpleNamespace(tile_m=tile_m, correct_radius_m=tile_half_diagonal_m(tile_m))
        self.crs = None


@pytest.mark.parametrize("heading", [0.0, 90.0, 225.0])
def test_oblique_camera_position_is_behind_the_matched_ground_point(heading: float) -> None:
    """A camera at altitude h pitched p from nadir looks at a point h*tan(p) ahead along its
    heading; locate matches that point, so the camera estimate must lie that far behind it."""
    cam_lat, cam_lon, altitude, pitch = 40.16, -105.10, 100.0, 45.0
    ahead = altitude * math.tan(math.radians(pitch))
    c_lat, c_lon = offset_latlon(cam_lat, cam_lon, ahead * math.sin(math.radians(heading)), ahead * math.cos(math.radians(heading)))
    # a 5 x 5 grid of tiles, 50 m apart, whose centre tile sits exactly on the ground point
    grid = [offset_latlon(c_lat, c_lon, 50.0 * e, 50.0 * n) for n in range(-2, 3) for e in range(-2, 3)]
    lat, lon = np.array([g[0] for g in grid]), np.array([g[1] for g in grid])
    scores = np.full(len(lat), 0.1)
    scores[12] = 0.9
    meta = CameraMetadata(gps_lat=cam_lat, gps_lon=cam_lon)
    query = PreparedQuery("q.jpg", [Hypothesis(np.zeros((4, 4, 3), np.uint8), heading, 1.0)], "metadata", pitch, altitude, meta)
    result = answer_from_scores(query, scores, np.zeros(len(lat), dtype=int), FakeIndex(lat, lon, 50.0), top_k=3).to_dict()
    assert result["top_k"][0]["tile_id"] == "t12"
    assert geodesic_distance_m(result["lat"], result["lon"], c_lat, c_lon) < 1.0
    assert result["truth"]["error_m"] < 1.0  # camera estimate vs EXIF GPS
    assert geodesic_distance_m(result["truth"]["center_lat"], result["truth"]["center_lon"], c_lat, c_lon) < 1e-3
    assert result["confidence"] > 0.99


def _photo(tmp_path: Path, meta: CameraMetadata) -> Path:
    path = tmp_path / "p.jpg"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    write_camera_metadata(image, path, meta)
    return path


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        (CameraMetadata(gimbal_pitch_deg=0.0), "pitch"),  # a level shot: no aerial tile shows it
        (CameraMetadata(gimbal_pitch_deg=-90.0, relative_altitude_m=-5.0), "altitude"),
    ],
)
def test_unusable_camera_pose_is_a_one_line_input_error(tmp_path: Path, meta: CameraMetadata, words: str) -> None:
    path = _photo(tmp_path, meta)
    with pytest.raises(InputError) as info:
        prepare_query(path, QueryOptions(), tile_m=112.0, gsd_m=0.5)
    message = str(info.value)
    assert "p.jpg" in message and words in message and "\n" not in message


def test_portrait_photo_uses_the_long_side_field_of_view(tmp_path: Path) -> None:
    """The 35 mm-equivalent field of view spans the long side: a portrait photo at the same
    altitude covers the same ground along its long side as the landscape one."""
    f35 = 36.0 / (2 * math.tan(math.radians(70.0) / 2))
    sizes = {}
    for name, hw in (("land", (96, 128)), ("port", (128, 96))):
        path = tmp_path / f"{name}.jpg"
        meta = CameraMetadata(gimbal_pitch_deg=-90.0, gimbal_yaw_deg=0.0, relative_altitude_m=40.0, focal_length_35mm=f35)
        texture = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
        write_camera_metadata(Image.fromarray(texture), path, meta)
        query = prepare_query(path, QueryOptions(pad_to_tile=False), tile_m=1000.0, gsd_m=0.5)
        sizes[name] = query.hypotheses[0].image.shape[:2]
    # no padding, no cropping beyond the photo: the scaled short sides must agree
    assert sizes["land"] == sizes["port"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 0.5, 2.0]), min_size=1, max_size=40))
def test_ranked_tiles_equals_the_filtered_full_sort(values):
    """Sorting only the scored tiles gives the full stable sort with the -inf tiles dropped."""
    from cvgl.index.search import ranked_tiles

    scores = np.array(values)
    full = np.argsort(-scores, kind="stable")
    ranked, scored = ranked_tiles(scores)
    np.testing.assert_array_equal(ranked, full[np.isfinite(scores[full])])
    np.testing.assert_array_equal(np.arange(len(scores))[scored], np.flatnonzero(np.isfinite(scores)))


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path)
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: _save(p / "black.png", np.zeros((120, 160, 3), np.uint8)), "uniform"),
        (lambda p: _save(p / "grey.jpg", np.full((120, 160, 3), 128, np.uint8)), "uniform"),
        (lambda p: _save(p / "clear.png", np.zeros((120, 160, 4), np.uint8), "RGBA"), "uniform"),
        (lambda p: _save(p / "one_px.png", np.asarray(Image.new("RGB", (1, 1), (90, 140, 30)).resize((200, 200)))), "uniform"),
        (lambda p: _save(p / "speck.png", np.pad(np.full((2, 2, 3), 255, np.uint8), ((60, 60), (60, 60), (0, 0)))), "one colour"),
    ],
)
def test_content_free_photo_is_refused_with_its_reason(tmp_path: Path, make, words: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        prepare_query(path, QueryOptions(), tile_m=112.0, gsd_m=0.5)
    message = str(info.value)
    assert path.name in message and words in message and "nothing to match" in message and "\n" not in message


def test_textured_photo_passes_the_content_check(tmp_path: Path) -> None:
    from cvgl.preprocess import content_problem

    rng = np.random.default_rng(0)
    assert content_problem(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)) is None
    # a real-looking low-contrast photo (std ~ 6 grey levels) is still a photo
    assert content_problem((120 + 6 * rng.standard_normal((100, 100, 3))).clip(0, 255).astype(np.uint8)) is None
