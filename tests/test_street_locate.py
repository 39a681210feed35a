"""cvgl.street.locate: one street photo against a real index built by code (a flat textured world as a GeoTIFF)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import X0, Y0, write_geotiff
from PIL import Image

from cvgl.answer import schema
from cvgl.data.metadata import CameraMetadata
from cvgl.data.tiling import TilingSpec
from cvgl.errors import InputError
from cvgl.geo import geodesic_distance_m, offset_latlon
from cvgl.index.build import build_index
from cvgl.index.store import open_index
from cvgl.street import StreetConfig
from cvgl.street.locate import (
    EXPECTATION,
    StreetOptions,
    StreetReference,
    heading_prior,
    locate_street,
)
from cvgl.street.matching import CONFIDENCE_MODEL
from cvgl.street.synthetic import GroundTexture, render_aerial, render_panorama

SIDE_M = 200  # the world: 200 m at 1 m/px, texture east/north metres from its centre
CFG = StreetConfig(layer=2)  # the default geometry (the stand-in extractor below ignores the layer)
SMALL = StreetConfig(layer=2, polar_size=(28, 112), bev_size_px=56, heading_step_deg=22.5)  # for wiring only


class PatchMeans:
    """A context-free stand-in for the ViT (each 14×14 patch's mean colour): the geometry decides alone."""

    dim = 3

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float(), 14)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A GeoTIFF of a textured flat world, its index (60 m tiles every 40 m) and the texture."""
    tmp = tmp_path_factory.mktemp("street_world")
    texture = GroundTexture(seed=3)
    aerial = render_aerial(texture, (0.0, 0.0), SIDE_M, 1.0)
    tif = write_geotiff(tmp / "world.tif", np.clip(aerial, 0, 255).astype(np.uint8).transpose(2, 0, 1))
    torch.manual_seed(0)
    from cvgl.models.factory import create_encoder

    encoder = create_encoder("gem", weights="random:dinov2_tiny_test", input_size=(56, 56))
    build_index(tif, tmp / "index", encoder, TilingSpec(tile_m=60.0, stride_m=40.0, gsd_m=0.5), progress=False)
    return open_index(tmp / "index"), encoder, texture, tmp


def _texture_metres(x: float, y: float) -> tuple[float, float]:
    """East/north metres in the texture of a UTM point of the GeoTIFF (top-left corner X0, Y0, 1 m pixels)."""
    return x - X0 - SIDE_M / 2, y - Y0 + SIDE_M / 2


def _panorama(world, row: int, heading: float, shift_m=(0.0, 0.0)) -> tuple[Path, tuple[float, float]]:
    index, _, texture, tmp = world
    tile = index.tiles.iloc[row]
    east, north = _texture_metres(float(tile["x"]), float(tile["y"]))
    pano = render_panorama(texture, (east + shift_m[0], north + shift_m[1]), 2.5, (128, 256), heading=heading)
    path = tmp / f"pano_{row}_{heading:g}.png"
    Image.fromarray(np.clip(pano, 0, 255).astype(np.uint8)).save(path)
    return path, (float(tile["lat"]), float(tile["lon"]))


def test_a_panorama_at_a_tile_is_found_with_its_camera_position_and_a_valid_answer(world):
    index, encoder, _, _ = world
    assert len(index) == 16
    row = 5
    path, (lat, lon) = _panorama(world, row, 0.0, shift_m=(2.0, -1.5))  # camera 2.5 m off the tile centre
    reference = StreetReference(index, PatchMeans(), CFG)
    answer = locate_street(path, index, encoder, StreetOptions(heading_deg=0.0, config=CFG), reference)
    result = answer.to_dict()
    jsonschema.validate(result, schema())
    assert answer.top_k[0].tile_id == str(index.tiles["tile_id"].iloc[row])
    camera = offset_latlon(lat, lon, 2.0, -1.5)
    assert geodesic_distance_m(answer.lat, answer.lon, *camera) <= CFG.bev_token_m  # the BEV's camera offset, within a token
    assert answer.heading_source == "flag" and answer.heading_deg == 0.0
    assert answer.confidence_model == CONFIDENCE_MODEL and 0.0 <= answer.confidence <= 1.0
    assert (answer.status == "located") == (answer.confidence >= 0.5)
    assert answer.uncertainty_m == pytest.approx(index.manifest.correct_radius_m)
    assert answer.labels["street_expectation"] == EXPECTATION["known"] and "16 candidate tiles" in answer.labels["street_method"]
    assert len(answer.top_k) == 5 and len({c.tile_id for c in answer.top_k}) == 5
    assert answer.x is not None and answer.crs

    # the reference products were kept: a second photo costs no tile encoding
    kept = dict(reference._columns)
    locate_street(path, index, encoder, StreetOptions(heading_deg=0.0, config=CFG), reference)
    assert all(reference._columns[r] is kept[r] for r in kept)


def test_a_compass_heading_is_searched_and_the_prior_restricts_the_candidates(world):
    index, encoder, _, _ = world
    row = 9
    path, (lat, lon) = _panorama(world, row, 45.0)
    options = StreetOptions(heading_deg=60.0, heading_tolerance_deg=25.0, near=(lat, lon), radius_km=0.045, config=CFG)
    answer = locate_street(path, index, encoder, options, StreetReference(index, PatchMeans(), CFG))
    assert answer.heading_source == "search" and answer.labels["street_heading_prior"] == "compass ±25°"
    assert answer.top_k[0].tile_id == str(index.tiles["tile_id"].iloc[row])
    assert abs((answer.heading_deg - 45.0 + 180.0) % 360.0 - 180.0) <= CFG.heading_step_deg
    assert all(geodesic_distance_m(lat, lon, c.lat, c.lon) <= 45.0 for c in answer.top_k)


def test_a_perspective_photo_says_what_it_assumed(world, tmp_path):
    index, encoder, texture, _ = world
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.clip(render_aerial(texture, (0.0, 0.0), 96, 0.5), 0, 255).astype(np.uint8)[:72]).save(photo)  # 4:3
    answer = locate_street(photo, index, encoder, StreetOptions(config=SMALL), StreetReference(index, PatchMeans(), SMALL))
    jsonschema.validate(answer.to_dict(), schema())
    assert answer.labels["street_photo"] == "perspective, hfov 60.0° (assumed)"
    assert answer.labels["street_expectation"] == EXPECTATION["perspective"] and answer.heading_source == "search"


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    index, encoder, _, _ = world
    path, (lat, lon) = _panorama(world, 0, 0.0)
    reference = StreetReference(index, PatchMeans(), SMALL)
    with pytest.raises(InputError, match="no tile within"):
        locate_street(path, index, encoder, StreetOptions(near=(lat + 1.0, lon), radius_km=0.1, config=SMALL), reference)
    with pytest.raises(InputError, match="stops at 10"):
        locate_street(path, index, encoder, StreetOptions(max_candidates=10, config=SMALL), reference)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png"):
        locate_street(tmp_path / "broken.png", index, encoder, StreetOptions(config=SMALL), reference)
    with pytest.raises(InputError):
        StreetOptions(near=(lat, lon))


def test_heading_priors_from_flags_and_metadata():
    assert heading_prior(StreetOptions(heading_deg=10.0), CameraMetadata())[0].kind == "known"
    prior, source = heading_prior(StreetOptions(heading_deg=10.0, heading_tolerance_deg=5.0), CameraMetadata())
    assert (prior.kind, prior.tolerance, source) == ("compass", 5.0, "flag")
    prior, source = heading_prior(StreetOptions(), CameraMetadata(gimbal_yaw_deg=100.0))
    assert (prior.kind, prior.heading, prior.tolerance, source) == ("compass", 100.0, 25.0, "metadata")  # a recorded yaw is never exact
    assert heading_prior(StreetOptions(), CameraMetadata())[0].kind == "unknown"


def test_street_options_follow_the_locate_options():
    from cvgl.locate import LocateOptions
    from cvgl.preprocess import QueryOptions
    from cvgl.street.locate import street_options

    options = LocateOptions(query=QueryOptions(view="street", heading_deg=30.0, heading_tolerance_deg=20.0, hfov_deg=70.0),
                            top_k=3, near=(40.0, -105.0), radius_km=0.5)
    street = street_options(options, max_candidates=50)
    assert (street.heading_deg, street.heading_tolerance_deg, street.hfov_deg, street.near, street.radius_km, street.top_k,
            street.max_candidates) == (30.0, 20.0, 70.0, (40.0, -105.0), 0.5, 3, 50)


def test_locate_images_sends_street_photos_to_the_street_matcher(world, tmp_path):
    """``cvgl locate --view street`` (and the service) reach locate_street, with its reference reused;
    a broken photo in the batch is skipped, the others answered."""
    from cvgl.locate import LocateOptions, locate_images
    from cvgl.preprocess import QueryOptions

    index, encoder, _, _ = world
    path, _ = _panorama(world, 5, 0.0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    reference = StreetReference(index, PatchMeans(), CFG)
    options = LocateOptions(query=QueryOptions(view="street", heading_deg=0.0))
    answers, scores, prepared = locate_images([path, broken], encoder, index, options, progress=False, street_reference=reference)
    direct = locate_street(path, index, encoder, StreetOptions(heading_deg=0.0, config=CFG), reference)
    assert answers[0].to_dict() == direct.to_dict()
    assert answers[1].to_dict()["status"] == "skipped" and "broken.jpg" in answers[1].to_dict()["reason"]
    assert scores == [None, None] and prepared == [None, None]
