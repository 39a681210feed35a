"""cvgl.street descriptors, products and matching: vs plain loops, on a tiny random ViT, and on constructed scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvgl.models.backbone import build_backbone
from cvgl.street.descriptors import (
    TokenExtractor,
    column_descriptors,
    column_scores,
    column_shift_scores,
    normalise_token_map,
    token_map_scores,
)
from cvgl.street.geometry import PanoramaBand, PinholeView, as_tensor
from cvgl.street.matching import (
    HeadingPrior,
    confidence,
    evidence,
    fuse,
    rank,
    score_bev,
    score_query,
    zscore,
)
from cvgl.street.products import (
    QueryProducts,
    ReferenceProducts,
    StreetConfig,
    StreetQuery,
    _canonical_columns,
    aerial_token_windows,
    candidate_grid,
    crop_token_windows,
    polar_columns,
    query_products,
    region_token_map,
    storage_per_km2,
)
from cvgl.street.search import RegionProducts, region_products, search_region
from cvgl.street.synthetic import GroundTexture, render_aerial, render_panorama

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tiny() -> TokenExtractor:
    torch.manual_seed(0)
    return TokenExtractor(build_backbone("dinov2_tiny_test"), MEAN, STD, layer=2)


class PatchMeans:
    """A context-free stand-in for the ViT: each 14×14 patch's mean colour (for stitching checks)."""

    dim = 3

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float(), 14)


# ------------------------------------------------------------------------------------------------
# descriptors vs loops
# ------------------------------------------------------------------------------------------------


def test_column_descriptors_match_loop():
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.normal(size=(2, 5, 3, 4)).astype(np.float32))
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    got = column_descriptors(tokens, p=3.0, valid=valid)
    for b in range(2):
        cols = []
        for j in range(4):
            x = np.clip(tokens[b, :, :, j].numpy(), 1e-6, None)
            cols.append(np.mean(x**3, axis=1) ** (1 / 3))
        cols = np.array(cols)
        keep = valid[b].numpy()
        centred = cols - cols[keep].mean(0)
        ref = centred / np.linalg.norm(centred, axis=1, keepdims=True) * keep[:, None]
        np.testing.assert_allclose(got[b].numpy(), ref, atol=1e-5)


def test_column_scores_and_shift_scores_match_loops():
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.normal(size=(3, 6, 4)).astype(np.float32))
    r = torch.from_numpy(rng.normal(size=(5, 6, 4)).astype(np.float32))
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    qm = q * valid[..., None]
    got = column_scores(qm, r, valid)
    for a in range(3):
        for n in range(5):
            cols = [float(q[a, j] @ r[n, j]) for j in range(6) if valid[a, j]]
            assert float(got[a, n]) == pytest.approx(np.mean(cols), abs=1e-5)
    shifts = column_shift_scores(q[0], r)
    for n in range(5):
        for s in range(6):
            assert float(shifts[n, s]) == pytest.approx(np.mean([float(q[0, j] @ r[n, (j + s) % 6]) for j in range(6)]), abs=1e-5)


def test_token_map_scores_match_loop():
    rng = np.random.default_rng(2)
    bev = torch.from_numpy(rng.normal(size=(2, 4, 3, 3)).astype(np.float32))
    aerial = torch.from_numpy(rng.normal(size=(3, 4, 5, 6)).astype(np.float32))
    got = token_map_scores(bev, aerial, cells=7)
    assert got.shape == (3, 2, 3, 4)
    for n in range(3):
        for k in range(2):
            for dy in range(3):
                for dx in range(4):
                    ref = sum(float(bev[k, :, y, x] @ aerial[n, :, y + dy, x + dx]) for y in range(3) for x in range(3)) / 7
                    assert float(got[n, k, dy, dx]) == pytest.approx(ref, abs=1e-4)


def test_normalise_token_map_centres_on_the_mask_and_zeroes_outside():
    rng = np.random.default_rng(3)
    tokens = torch.from_numpy(rng.normal(size=(1, 4, 3, 3)).astype(np.float32)) + 5.0
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=bool)
    got = normalise_token_map(tokens, mask)[0]
    cells = tokens[0].numpy()[:, mask]
    ref = cells - cells.mean(1, keepdims=True)
    np.testing.assert_allclose(got.numpy()[:, mask], ref / np.linalg.norm(ref, axis=0), atol=1e-5)
    assert float(got[:, ~torch.from_numpy(mask)].abs().sum()) == 0.0


def test_extractor_gives_block_tokens_and_rejects_bad_sizes(tiny):
    images = torch.rand(3, 3, 28, 42) * 255
    tokens = tiny(images)
    assert tokens.shape == (3, tiny.dim, 2, 3)
    x = (images / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = tiny.backbone.forward_layers(x, [2], norm=False)[2].patches
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        tiny(torch.zeros(1, 3, 20, 28))


# ------------------------------------------------------------------------------------------------
# products
# ------------------------------------------------------------------------------------------------


def test_config_geometry_and_validation():
    cfg = StreetConfig()
    assert (cfg.columns, cfg.bev_cells, cfg.search_cells, cfg.window_px) == (32, 12, 3, 252)
    assert cfg.bev_token_m == pytest.approx(3.5) and cfg.bev_gsd_m == pytest.approx(0.25)
    assert len(cfg.headings()) == 64
    np.testing.assert_allclose(cfg.headings(10.0, 25.0), 10.0 + 5.625 * np.arange(-4, 5))
    with pytest.raises(ValueError):
        StreetConfig(bev_search_m=10.0)
    with pytest.raises(ValueError):
        StreetConfig(polar_size=(100, 448))


def test_heading_priors():
    cfg = StreetConfig()
    np.testing.assert_array_equal(HeadingPrior("known", 12.0).hypotheses(cfg), [12.0])
    assert len(HeadingPrior("compass", 0.0, 25.0).hypotheses(cfg)) == 9
    assert len(HeadingPrior("unknown").hypotheses(cfg)) == 64
    with pytest.raises(ValueError):
        HeadingPrior("roughly")


def test_canonical_columns_of_a_rolled_panorama_are_the_same_at_its_heading():
    rng = np.random.default_rng(4)
    pano = rng.uniform(0, 255, (112, 896, 3)).astype(np.float32)
    cfg = StreetConfig()
    rolled = np.roll(pano, 14, axis=1)  # 14 px of 896 = 5.625°: its centre column now looks 5.625° west of north
    a = _canonical_columns(StreetQuery.from_panorama(pano), np.array([0.0]), cfg)
    b = _canonical_columns(StreetQuery.from_panorama(rolled), np.array([-5.625]), cfg)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-4)  # float32 resampling of 0..255 values


def test_region_token_map_stitches_like_one_pass_for_a_context_free_encoder():
    rng = np.random.default_rng(5)
    aerial = rng.uniform(0, 255, (150, 170, 3)).astype(np.float32)  # 0.5 m/px -> 0.25 m/px: 300 x 340 px
    cfg = StreetConfig()
    got = region_token_map(PatchMeans(), aerial, cfg)
    up = F.interpolate(as_tensor(aerial), size=(300, 340), mode="bilinear", align_corners=False, antialias=True)
    ref = PatchMeans()(up[..., : 21 * 14, : 24 * 14])[0]
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
    windows = crop_token_windows(got, np.array([[12, 10]]), cfg)
    torch.testing.assert_close(windows[0], normalise_token_map(got[None, :, 1:19, 3:21])[0])
    with pytest.raises(ValueError):
        crop_token_windows(got, np.array([[2, 10]]), cfg)


def test_aerial_windows_are_centred_on_the_candidate():
    aerial = np.zeros((200, 200, 3), dtype=np.float32)
    aerial[95:105, 120:130] = 255.0  # a bright square 10 m east of the centre (0.5 m/px)
    cfg = StreetConfig()
    win = aerial_token_windows(PatchMeans(), aerial, np.array([[100.0, 100.0]]), cfg)[0]
    energy = win.norm(dim=0)
    brightest = np.unravel_index(int(win[0].argmax()), win.shape[1:])
    assert energy.shape == (18, 18)
    assert brightest[0] in (8, 9) and brightest[1] in (11, 12)  # 10 m east = ~3 cells of 3.5 m right of centre


def test_candidate_grid_and_storage():
    grid = candidate_grid(200, 100, gsd=0.5, stride_m=5.0, margin_m=10.0)
    assert grid.min(0).tolist() == [20.0, 20.0] and grid.max(0).tolist() == [180.0, 80.0]
    sizes = storage_per_km2(StreetConfig(), dim=384, grid_stride_m=5.0)
    assert sizes["centres"] == 40_000
    assert sizes["polar_columns_bytes"] == 40_000 * 32 * 384 * 2
    assert sizes["token_map_bytes"] == pytest.approx((1000 / 3.5) ** 2 * 384 * 2)


def test_perspective_query_marks_only_its_columns(tiny):
    cfg = StreetConfig(layer=2)
    photo = np.full((60, 80, 3), 128.0, dtype=np.float32)
    query = StreetQuery.from_perspective(photo, PinholeView(hfov=90.0, heading=0.0), width=448)
    products = query_products(tiny, query, np.array([0.0, 90.0]), cfg)
    valid = products.column_valid.numpy()
    assert valid[0, 12:20].all() and not valid[0, :8].any() and not valid[0, 24:].any()  # ±45° around north
    assert valid[1].sum() == valid[0].sum() and not valid[1, 12:20].all()  # turned 90°: elsewhere
    assert (products.bev_cells < int(cfg.bev_token_mask().sum())).all()  # only the BEV cells the photo sees


# ------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------


def test_score_bev_reports_the_camera_offset_of_an_exact_crop():
    rng = np.random.default_rng(6)
    cfg = StreetConfig()
    aerial = normalise_token_map(torch.from_numpy(rng.normal(size=(2, 8, 18, 18)).astype(np.float32)))
    mask = torch.from_numpy(cfg.bev_token_mask())
    # camera 2 cells east and 1 cell south of candidate 1's centre: BEV rows 4..15, cols 5..16
    bev = normalise_token_map(aerial[1:2, :, 4:16, 5:17], mask)
    query = QueryProducts(np.array([0.0]), torch.zeros(1, 32, 8), torch.ones(1, 32, dtype=torch.bool), bev, np.array([int(mask.sum())]))
    best, where = score_bev(query, ReferenceProducts(torch.zeros(2, 32, 8), aerial), cfg)
    assert best[0, 1] > best[0, 0]
    assert where[0, 1].tolist() == pytest.approx([7.0, -3.5])


def test_fuse_rank_and_heading():
    polar = np.array([[0.1, 0.5, 0.2, 0.0], [0.3, 0.1, 0.2, 0.0]])
    bev = np.array([[0.0, 0.4, 0.1, 0.1], [0.9, 0.0, 0.1, 0.0]])
    fused = fuse({"polar": polar, "bev": bev}, {"polar": 1.0, "bev": 1.0})
    np.testing.assert_allclose(fused, zscore(polar) + zscore(bev))
    np.testing.assert_allclose(zscore(polar).mean(1), 0.0, atol=1e-12)
    offsets = np.arange(16, dtype=float).reshape(2, 4, 2)
    ranking = rank(fused, np.array([350.0, 20.0]), offsets)
    assert ranking.order[0] == 1 and ranking.heading[0] == 20.0 and ranking.heading[1] == 350.0
    assert ranking.offset_m[0].tolist() == [8.0, 9.0]


def test_evidence_is_the_gap_to_the_best_other_place():
    score = np.array([3.0, 2.9, 1.0, 0.0, -1.0])
    assert evidence(score) == pytest.approx(0.1 / score.std())
    positions = np.array([[0, 0], [5, 0], [100, 0], [200, 0], [300, 0]], dtype=float)
    assert evidence(score, positions, exclusion_m=15.0) == pytest.approx(2.0 / score.std())  # 2.9 is the same place
    assert evidence(np.array([1.0])) == 0.0
    assert confidence(0.0) < 0.01 and confidence(10.0) > 0.99


def test_end_to_end_on_a_flat_world_with_a_tiny_vit(tiny):
    """Shapes and wiring of the whole pipeline on rendered data (a random ViT carries no meaning)."""
    cfg = StreetConfig(layer=2, polar_size=(28, 112), bev_size_px=56, heading_step_deg=22.5)  # small: seconds
    texture = GroundTexture(seed=1)
    pano = render_panorama(texture, (0.0, 0.0), cfg.camera_height_m, (128, 256), PanoramaBand(), heading=30.0)
    aerial = render_aerial(texture, (0.0, 0.0), 240, cfg.work_gsd_m)
    centres = candidate_grid(240, 240, cfg.work_gsd_m, 10.0, 50.0)
    reference = ReferenceProducts(polar_columns(tiny, aerial, centres, cfg), aerial_token_windows(tiny, aerial, centres, cfg))
    assert reference.columns.shape == (len(centres), 8, tiny.dim) and reference.token_maps.shape == (len(centres), tiny.dim, 6, 6)
    query = query_products(tiny, StreetQuery.from_panorama(pano), HeadingPrior("compass", 30.0).hypotheses(cfg), cfg)
    scores = score_query(query, reference, cfg)
    assert scores.polar.shape == scores.bev.shape == (3, len(centres))
    assert np.isfinite(scores.polar).all() and np.isfinite(scores.bev).all()
    ranking = rank(fuse({"polar": scores.polar, "bev": scores.bev}, {"polar": 1, "bev": 1}), scores.headings, scores.bev_offset_m)
    assert sorted(ranking.order.tolist()) == list(range(len(centres)))
    assert np.isfinite(evidence(ranking.score, centres * cfg.work_gsd_m))


def test_search_region_finds_a_planted_place_inside_the_prior_only():
    rng = np.random.default_rng(7)
    cfg = StreetConfig()
    side_cells = 40  # 140 m of token map
    token_map = torch.from_numpy(rng.normal(size=(8, side_cells, side_cells)).astype(np.float32))
    grid = np.arange(35.0, 106.0, 5.0)
    centres = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)  # east, south metres
    columns = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(len(centres), 32, 8)).astype(np.float32)), dim=-1)
    region = RegionProducts(centres, columns, token_map, cfg.bev_token_m)
    planted = int(np.flatnonzero((centres == [70.0, 70.0]).all(1))[0])
    camera_cell = (20 + 2, 20 + 1)  # (col, row): 7 m east, 3.5 m south of the planted centre's cell corner (70 m = 20 cells)
    mask = torch.from_numpy(cfg.bev_token_mask())
    bev = normalise_token_map(token_map[None, :, camera_cell[1] - 6 : camera_cell[1] + 6, camera_cell[0] - 6 : camera_cell[0] + 6], mask)
    query = QueryProducts(np.array([0.0]), columns[planted : planted + 1], torch.ones(1, 32, dtype=torch.bool), bev, np.array([int(mask.sum())]))
    answer = search_region(region, query, cfg, shortlist=64)
    assert answer.candidates[0] == planted
    assert answer.positions_m[0].tolist() == pytest.approx([77.0, 73.5])
    assert answer.evidence > 1.0
    far = search_region(region, query, cfg, prior_m=(40.0, 40.0), radius_m=15.0)
    assert planted not in far.candidates and np.hypot(*(centres[far.candidates] - 40.0).T).max() <= 15.0
    with pytest.raises(ValueError):
        search_region(region, query, cfg, prior_m=(-500.0, 0.0), radius_m=10.0)
    restored = RegionProducts.from_arrays(region.to_arrays())
    assert restored.columns.dtype == torch.float16 and restored.token_map.shape == token_map.shape


def test_region_products_on_a_small_region(tiny):
    cfg = StreetConfig(layer=2)
    aerial = render_aerial(GroundTexture(seed=2), (0.0, 0.0), 260, cfg.work_gsd_m)  # 130 m
    products = region_products(tiny, aerial, cfg, stride_m=10.0)
    margin = max(cfg.polar_r_max_m, cfg.bev_extent_m / 2 + cfg.bev_search_m)  # polar disc and BEV window inside
    assert products.centres_m.min() >= margin and products.centres_m.max() <= 130.0 - margin
    assert products.columns.shape == (len(products.centres_m), 32, tiny.dim)
    assert products.token_map.shape == (tiny.dim, 520 // 14, 520 // 14)
    assert products.nbytes == products.columns.numel() * 2 + products.token_map.numel() * 2
    with pytest.raises(ValueError):
        region_products(tiny, aerial[:120, :120], cfg)  # 60 m: no centre fits


def test_search_region_refines_the_polar_match_at_the_bev_camera_position():
    """Camera 1.5 m off its nearest grid centre: the BEV finds it exactly (planted token crop), and the polar
    columns encoded again there match the query's (taken at the camera) perfectly, so the refined score rises."""
    rng = np.random.default_rng(8)
    cfg = StreetConfig()
    aerial = np.repeat(np.repeat(rng.uniform(0, 255, (75, 75, 3)), 4, axis=0), 4, axis=1).astype(np.float32)  # 150 m
    region = region_products(PatchMeans(), aerial, cfg, stride_m=10.0)
    camera_m = np.array([66.5, 73.5])  # east, south: a token-cell corner (19, 21); nearest centre (65, 75)
    columns = polar_columns(PatchMeans(), aerial, (camera_m / cfg.work_gsd_m)[None], cfg)
    mask = torch.from_numpy(cfg.bev_token_mask())
    c, r = (camera_m / cfg.bev_token_m).round().astype(int)
    bev = normalise_token_map(region.token_map.float()[None, :, r - 6 : r + 6, c - 6 : c + 6], mask)
    query = QueryProducts(np.array([0.0]), columns, torch.ones(1, 32, dtype=torch.bool), bev, np.array([int(mask.sum())]))
    plain = search_region(region, query, cfg)
    refined = search_region(region, query, cfg, refine=(PatchMeans(), aerial), refine_top=5)
    assert refined.positions_m[0].tolist() == pytest.approx(camera_m.tolist())
    assert np.hypot(*(region.centres_m[refined.candidates[0]] - camera_m)).max() <= np.hypot(10.5, 10.5) + 1.75  # any centre whose BEV search reaches the camera
    assert refined.scores[0] > plain.scores[0]
