"""The verification stage inside ``cvgl locate`` (cvgl.verify.refine, cvgl.index.windows).

A textured "ground" GeoTIFF made by code is indexed with a tiny random encoder (retrieval is then
near chance, so every tile is handed to verification) and drone photos are cut from it with
EXIF/XMP metadata: the verified answer must come back at metre level with its heading and
footprint, a photo of other ground must not verify, and the answers keep the published schema.
SIFT keeps it weight-free and fast; the learned matchers are exercised in test_verify(_real).
"""

from __future__ import annotations

import math
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from affine import Affine

from conftest import TINY_SIZE, UTM, X0, Y0, textured_ground, write_geotiff
from cvgl.answer import schema
from cvgl.data.raster import read_region
from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
from cvgl.data.tiling import TilingSpec
from cvgl.errors import InputError
from cvgl.geo import geodesic_distance_m
from cvgl.index.build import build_index
from cvgl.index.store import open_index
from cvgl.index.windows import WindowReader
from cvgl.locate import LocateOptions, locate_images
from cvgl.verify.refine import RefineOptions, Refiner, rotate_expand

GSD = 0.5
SIDE_PX = 768  # 384 m of ground
SPEC = TilingSpec(tile_m=96.0, stride_m=48.0, gsd_m=GSD)
SIFT_ALL = RefineOptions(mode="on", matcher="sift", top_k=100)


def ground_tiff(path: Path, seed: int) -> Path:
    data = np.moveaxis(textured_ground(seed, SIDE_PX), 2, 0)
    return write_geotiff(path, data, transform=Affine(GSD, 0.0, X0, 0.0, -GSD, Y0))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory):
    import torch

    from cvgl.models.factory import create_encoder

    folder = tmp_path_factory.mktemp("refine")
    raster = ground_tiff(folder / "ground.tif", seed=0)
    torch.manual_seed(0)
    encoder = create_encoder("gem", weights="random:dinov2_tiny_test", input_size=TINY_SIZE)
    index = open_index(build_index(raster, folder / "index", encoder, SPEC, progress=False))
    return folder, raster, encoder, index


def _photos(raster: Path, folder: Path, family: QueryFamily, count: int, seed: int):
    queries = make_queries(raster, count, family, seed=seed, x_range=(X0 + 60, X0 + 324), y_range=(Y0 - 324, Y0 - 60))
    folder.mkdir(exist_ok=True)
    return queries, [write_query_photo(q, folder) for q in queries]


def _heading_error(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("heading_known", [True, False])
def test_verified_answer_is_metric_with_heading_and_footprint(scene, heading_known: bool) -> None:
    folder, raster, encoder, index = scene
    family = QueryFamily("nadir", heading_known=heading_known, footprint_m=80.0)
    queries, photos = _photos(raster, folder / f"photos-{heading_known}", family, 2, seed=1)
    answers, _, _ = locate_images(photos, encoder, index, LocateOptions(refine=SIFT_ALL), progress=False)
    for query, answer in zip(queries, answers):
        result = answer.to_dict()
        jsonschema.validate(result, schema())
        assert result["verification"]["verified"], result["verification"]
        assert result["position_source"] == "verified" and result["heading_source"] == "verified"
        error = float(geodesic_distance_m(result["lat"], result["lon"], query.center_lat, query.center_lon))
        assert error < 1.5, error
        assert result["truth"]["error_m"] == pytest.approx(error, abs=0.01)  # nadir: truth = EXIF GPS
        assert _heading_error(result["heading_deg"], query.yaw_deg) < 2.0
        assert 0.5 < result["uncertainty_m"] < 10.0  # from the inliers plus the reference floor, not the tile radius
        assert result["confidence_radius_m"] == result["uncertainty_m"]
        # the footprint is the 80 m x 107 m photo on the ground, around the answer
        corners = result["footprint"]
        assert len(corners) == 4
        sides = [float(geodesic_distance_m(corners[i]["lat"], corners[i]["lon"], corners[i - 1]["lat"], corners[i - 1]["lon"])) for i in range(4)]
        assert sorted(sides) == pytest.approx([80.0, 80.0, 80.0 * 4 / 3, 80.0 * 4 / 3], rel=0.05)
        assert result["verification"]["inliers"] >= SIFT_ALL.min_inliers
        assert result["top_k"][0]["tile_id"] == result["verification"]["tile_id"]  # re-ranked by verification


def test_photo_of_other_ground_is_not_verified_and_keeps_the_retrieval_answer(scene) -> None:
    folder, _, encoder, index = scene
    elsewhere = ground_tiff(folder / "elsewhere.tif", seed=7)
    _, photos = _photos(elsewhere, folder / "elsewhere", QueryFamily("nadir", footprint_m=80.0), 2, seed=2)
    with_refine, _, _ = locate_images(photos, encoder, index, LocateOptions(refine=SIFT_ALL), progress=False)
    without, _, _ = locate_images(photos, encoder, index, LocateOptions(refine=RefineOptions(mode="off")), progress=False)
    for refined, plain in zip(with_refine, without):
        result, baseline = refined.to_dict(), plain.to_dict()
        jsonschema.validate(result, schema())
        assert result["verification"]["verified"] is False
        assert result["verification"]["candidates"] == len(index)
        assert result["position_source"] == baseline["position_source"] != "verified"
        assert (result["lat"], result["lon"]) == (baseline["lat"], baseline["lon"])
        assert result["footprint"] is None and baseline.get("verification") is None


def test_reference_windows_are_the_raster_around_the_tile_and_slide_inward_at_the_edge(scene) -> None:
    _, raster, _, index = scene
    margin = 24.0
    reader = WindowReader(index, margin)
    side = SPEC.tile_m + 2 * margin
    tiles = index.tiles
    inner = int(np.argmin(np.hypot(tiles["x"] - (X0 + 192), tiles["y"] - (Y0 - 192))))
    window = reader(inner)
    assert window.image.shape[:2] == (round(side / GSD),) * 2
    centre = window.transform * (window.image.shape[1] / 2, window.image.shape[0] / 2)
    assert centre == pytest.approx((tiles["x"][inner], tiles["y"][inner]), abs=GSD)
    expected = read_region(raster, float(tiles["x"][inner]), float(tiles["y"][inner]), side, GSD,
                           index.tile_source().tiling.bands, index.tile_source().tiling.stretch,
                           stretch_uint8=index.tile_source().tiling.stretch_uint8)
    assert np.array_equal(window.image, expected)
    assert window.crs == UTM
    corner = int(np.argmin(np.hypot(tiles["x"] - X0, tiles["y"] - Y0)))  # the north-west tile
    edge = reader(corner)
    assert edge.image.shape == window.image.shape  # same size, moved inside the raster
    left, top = edge.transform * (0, 0)
    assert left == pytest.approx(X0, abs=GSD) and top == pytest.approx(Y0, abs=GSD)


def test_tile_folder_windows_are_the_tile_images_on_a_local_metric_frame(tmp_path: Path, tiny_encoder) -> None:
    from PIL import Image

    from cvgl.geo import to_latlon

    folder = tmp_path / "tiles"
    folder.mkdir()
    rows = ["id,lat,lon"]
    image = textured_ground(3, 224)
    for i in range(2):
        Image.fromarray(image[:, ::-1] if i else image).save(folder / f"t{i}.png")
        lat, lon = to_latlon(UTM, X0 + 200.0 * i, Y0)
        rows.append(f"t{i}.png,{lat:.7f},{lon:.7f}")
    (folder / "tiles.csv").write_text("\n".join(rows) + "\n")
    index = open_index(build_index(folder, tmp_path / "index", tiny_encoder(), TilingSpec(tile_m=112.0, stride_m=112.0), progress=False))
    window = WindowReader(index, margin_m=56.0)(0)
    assert np.array_equal(window.image, np.asarray(Image.open(folder / "t0.png").convert("RGB")))
    left, top = window.transform * (0, 0)
    right, bottom = window.transform * (window.image.shape[1], window.image.shape[0])
    assert (right - left, top - bottom) == pytest.approx((index.manifest.tile_side_m,) * 2)
    assert "+proj=aeqd" in window.crs


def test_rotate_expand_keeps_every_pixel_and_maps_points() -> None:
    image = np.zeros((60, 100, 3), np.uint8)
    image[10, 80] = 255
    rotated, to_canvas = rotate_expand(image, 90.0)
    assert rotated.shape[:2] == (100, 60)
    x, y = to_canvas @ np.array([80.0, 10.0, 1.0])
    assert rotated[int(round(y)), int(round(x))].max() > 0  # the marked pixel lands where the map says
    assert math.isclose(x, 49.0, abs_tol=1.0) and math.isclose(y, 80.0, abs_tol=1.0)


def test_refine_options_are_checked_and_off_builds_no_matcher(scene) -> None:
    for bad in (dict(mode="maybe"), dict(matcher="orb"), dict(top_k=0), dict(margin_m=-1.0)):
        with pytest.raises(InputError):
            RefineOptions(**bad)
    assert not RefineOptions(mode="off").enabled
    refiner = Refiner(scene[3], RefineOptions(mode="on", matcher="sift"))
    assert refiner.matcher_name == "sift"
