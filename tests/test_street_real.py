"""cvgl.street end to end on the real DINOv2 weights and real imagery (Longmont WV2 → WV3)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.real


def test_flat_world_panorama_of_wv2_is_found_in_wv3_with_heading_and_offset():
    """A panorama rendered by code from the WV2 scene (flat ground, 2.5 m camera, heading 70°) is matched
    against 9 WV3 candidate centres 40 m apart under a ±12° compass prior (reading 75°): the right centre wins with a clear
    margin, the BEV heading comes back within a hypothesis step, the fused one within a token column, and the BEV
    offset within a token."""
    import torch

    from cvgl.data.raster import raster_info, read_region
    from cvgl.data.samples import longmont_scene
    from cvgl.models.factory import create_encoder
    from cvgl.street import (
        HeadingPrior,
        ReferenceProducts,
        StreetConfig,
        StreetQuery,
        TokenExtractor,
        aerial_token_windows,
        candidate_grid,
        evidence,
        fuse,
        polar_columns,
        query_products,
        rank,
        score_query,
    )
    from cvgl.street.geometry import wrap_degrees
    from cvgl.street.synthetic import panorama_from_aerial

    torch.set_num_threads(2)
    cfg = StreetConfig()
    wv2, wv3 = longmont_scene("wv2"), longmont_scene("wv3")
    left, bottom, right, top = raster_info(wv3).bounds
    cx, cy = (left + right) / 2, (bottom + top) / 2
    size_m = 220.0
    reference = read_region(wv3, cx, cy, size_m, gsd_m=cfg.work_gsd_m).astype(np.float32)
    source = read_region(wv2, cx, cy, size_m, gsd_m=cfg.work_gsd_m).astype(np.float32)
    centres = candidate_grid(reference.shape[1], reference.shape[0], cfg.work_gsd_m, 40.0, 70.0)
    assert len(centres) == 9
    truth = 4  # the middle centre; the camera stands 3 m east and 2 m north of it
    camera_px = (centres[truth, 0] + 3.0 / cfg.work_gsd_m, centres[truth, 1] - 2.0 / cfg.work_gsd_m)
    pano = panorama_from_aerial(source, cfg.work_gsd_m, camera_px, cfg.camera_height_m, (256, 512), heading=70.0)

    extractor = TokenExtractor.from_encoder(create_encoder("gem-l8-raw", "embedded"))
    products = ReferenceProducts(
        polar_columns(extractor, reference, centres, cfg), aerial_token_windows(extractor, reference, centres, cfg)
    )
    query = query_products(extractor, StreetQuery.from_panorama(pano), HeadingPrior("compass", 75.0, 12.0).hypotheses(cfg), cfg)
    scores = score_query(query, products, cfg)
    ranking = rank(fuse({"polar": scores.polar, "bev": scores.bev}, {"polar": 1.0, "bev": 1.0}), scores.headings, scores.bev_offset_m)

    assert ranking.order[0] == truth
    # The fused heading is within one token column (11.25°): 3.6 m off the centre the polar columns' heading
    # profile is nearly flat (0.21-0.235 over ±20°) and pulls the fused peak one hypothesis away from
    # the BEV's (sharp, 69.4°); the BEV alone must get it within a step.
    assert abs(float(wrap_degrees(ranking.heading[truth] - 70.0))) <= 360.0 / cfg.columns
    bev_heading = scores.headings[int(scores.bev[:, truth].argmax())]
    assert abs(float(wrap_degrees(bev_heading - 70.0))) <= cfg.heading_step_deg
    assert np.hypot(*(ranking.offset_m[truth] - np.array([3.0, 2.0]))) <= cfg.bev_token_m
    assert evidence(ranking.score, centres * cfg.work_gsd_m) > 0.5  # the winner stands clear of the runner-up
    assert int(scores.bev.max(0).argmax()) == truth  # the BEV alone prefers the right centre
    # The polar columns need a centre within ~2.5 m of the camera (they fall to chance 5 m off on real
    # panoramas): encoded AT the camera, the right place beats the eight others (at their centres).
    at_camera = polar_columns(extractor, reference, np.array([camera_px]), cfg)
    k = int(np.argmin(np.abs(wrap_degrees(scores.headings - 70.0))))
    right = float(torch.einsum("wc,wc->", query.columns[k], at_camera[0])) / cfg.columns
    others = np.delete(scores.polar[k], truth)
    assert right > others.max()


def test_locate_street_finds_a_flat_world_panorama_of_wv2_in_a_wv3_index(tmp_path):
    """The entry point end to end on real weights: a 140 m WV3 crop indexed as 9 tiles (60 m every 40 m), a
    panorama rendered from WV2 (another date) 2 m east / 1 m north of the middle tile's centre, heading known:
    the middle tile wins, the camera comes back within a BEV token, the answer is schema-valid."""
    import jsonschema
    import rasterio
    import torch
    from PIL import Image
    from rasterio.transform import from_origin

    from cvgl.answer import schema
    from cvgl.data.raster import raster_info, read_region
    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec
    from cvgl.geo import geodesic_distance_m, offset_latlon
    from cvgl.index.build import build_index
    from cvgl.index.store import open_index
    from cvgl.models.factory import create_encoder
    from cvgl.street import StreetConfig
    from cvgl.street.locate import StreetOptions, locate_street
    from cvgl.street.synthetic import panorama_from_aerial

    torch.set_num_threads(2)
    cfg = StreetConfig()
    wv2, wv3 = longmont_scene("wv2"), longmont_scene("wv3")
    info = raster_info(wv3)
    left, bottom, right, top = info.bounds
    cx, cy, size = (left + right) / 2, (bottom + top) / 2, 140.0
    crop = read_region(wv3, cx, cy, size, gsd_m=0.5)
    tif = tmp_path / "wv3_crop.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=crop.shape[1], height=crop.shape[0], count=3, dtype="uint8",
                       crs=info.crs, transform=from_origin(cx - size / 2, cy + size / 2, 0.5, 0.5)) as ds:
        ds.write(crop.transpose(2, 0, 1))
    encoder = create_encoder("gem-l8-raw", "embedded")
    build_index(tif, tmp_path / "index", encoder, TilingSpec(tile_m=60.0, stride_m=40.0, gsd_m=0.5), progress=False)
    index = open_index(tmp_path / "index")
    assert len(index) == 9
    middle = int(np.argmin(np.hypot(index.tiles["x"] - cx, index.tiles["y"] - cy)))
    tile = index.tiles.iloc[middle]
    source = read_region(wv2, cx, cy, size, gsd_m=cfg.work_gsd_m).astype(np.float32)
    camera_px = ((float(tile["x"]) + 2.0 - (cx - size / 2)) / cfg.work_gsd_m, ((cy + size / 2) - float(tile["y"]) - 1.0) / cfg.work_gsd_m)
    pano = panorama_from_aerial(source, cfg.work_gsd_m, camera_px, cfg.camera_height_m, (256, 512))
    photo = tmp_path / "pano.png"
    Image.fromarray(np.clip(pano, 0, 255).astype(np.uint8)).save(photo)

    answer = locate_street(photo, index, encoder, StreetOptions(heading_deg=0.0))
    jsonschema.validate(answer.to_dict(), schema())
    assert answer.top_k[0].tile_id == str(tile["tile_id"])
    camera = offset_latlon(float(tile["lat"]), float(tile["lon"]), 2.0, 1.0)
    assert geodesic_distance_m(answer.lat, answer.lon, *camera) <= cfg.bev_token_m
