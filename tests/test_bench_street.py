"""The street benchmark section: its evaluation against a plain recomputation, the product cache, the report.

A tiny fake ``real_pairs`` tree (generated images shaped like the real folders; the panoramas are
flat-world renders of their own satellite image) and a 2-block random ViT: the numbers carry no
meaning, the bookkeeping does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvgl.bench import street as bs
from cvgl.bench.real_pairs import GalleryItem, Method, Sizes, load_pixels, load_tasks
from cvgl.street import StreetConfig
from cvgl.street.matching import match
from cvgl.street.synthetic import GroundTexture, panorama_from_aerial, render_aerial

TINY = "random:dinov2_tiny_test"
TINY_SIZES = Sizes(square=56, pano_height=28, pano_max_width=112)
CONFIG = StreetConfig(layer=2, polar_size=(28, 112), bev_size_px=56, heading_step_deg=22.5)  # small: seconds
BASELINE = Method("tiny gem", "gem", TINY)


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_pairs")
    specs = (("cvact_streetpano_sat2density", "satellite", 0.21, (64, 128)), ("cvusa_streetpano_crossnet", "aerial", 0.20, (40, 220)))
    for seed, (folder, gallery_col, gsd, pano_size) in enumerate(specs):
        rows = []
        for k in range(2):
            aerial = render_aerial(GroundTexture(seed=10 * seed + k), (0.0, 0.0), 160, gsd)
            pano = panorama_from_aerial(aerial, gsd, (80.0, 80.0), 2.5, pano_size)
            _save(root / folder / "ground" / f"g{k}.png", pano)
            _save(root / folder / gallery_col / f"s{k}.png", aerial)
            rows.append([f"ground/g{k}.png", f"{gallery_col}/s{k}.png"])
        _csv(root / folder / "pairs.csv", ["ground_panorama", gallery_col], rows)
    u = root / "u1652_street_satellite"
    _save(u / "7" / "street_1.jpg", render_aerial(GroundTexture(seed=40), (0.0, 0.0), 48, 1.0))
    _save(u / "7" / "satellite_7.jpg", render_aerial(GroundTexture(seed=41), (0.0, 0.0), 64, 1.0))
    _csv(u / "pairs.csv", ["building_id", "street_photo", "satellite"], [["7", "7/street_1.jpg", "7/satellite_7.jpg"]])
    return root


def _distractors() -> list[GalleryItem]:
    return [GalleryItem(f"longmont-wv3/d{i}", "longmont-wv3", image=render_aerial(GroundTexture(seed=90 + i), (0.0, 0.0), 96, 0.5))
            for i in range(3)]


def _run(root: Path, cache: bs.ProductCache | None = None, **kwargs) -> list[bs.Study]:
    torch.manual_seed(0)  # the random ViT's weights
    return bs.evaluate(root, config=CONFIG, weights=TINY, encoder_preset="gem", baseline=BASELINE, sizes=TINY_SIZES,
                       distractors=_distractors(), colours=(False,), cache=cache, **kwargs)


def test_setups_are_seeded_per_panorama_and_unknown_truth_follows_the_roll():
    from cvgl.bench.real_pairs import Query

    qs = [Query(f"q{i}", Path(f"q{i}"), "s", ("g",)) for i in range(3)]
    a, b = bs.query_setups(qs, [512, 512, 1232]), bs.query_setups(qs, [512, 512, 1232])
    assert a == b and all(abs(s.compass_error) <= bs.COMPASS_TOLERANCE_DEG and 0 <= s.roll_px < s.width for s in a.values())
    setup = bs.QuerySetup(10.0, 128, 512)  # rolled a quarter turn right: the centre column now shows azimuth -90
    assert setup.unknown_truth == 270.0
    headings, roll, truth = bs.mode_headings("unknown", setup, CONFIG)
    assert roll == 128 and truth in headings and len(headings) == 16
    headings, roll, truth = bs.mode_headings("compass", setup, CONFIG)
    assert roll == 0 and truth == 0.0 and headings.min() <= 0.0 <= headings.max() and np.all(np.abs(headings - 10.0) <= 25.0)


def test_rank_of_is_pessimistic_about_ties():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert [bs.rank_of(scores, i) for i in range(4)] == [3, 1, 3, 4]


def test_evaluation_matches_a_plain_recomputation_and_the_report_states_chance(fake_root, tmp_path):
    study = _run(fake_root, modes=("known", "unknown"), offsets=True)[0]
    gallery = 2 + 2 + 1 + 3  # both panorama sources' images, the U1652 satellite, three distractors
    assert study.gallery == gallery and study.panoramas == 4
    rows = {(r.method, r.mode): r for r in study.rows}
    for signal in ("polar", "bev", "fusion"):
        for mode in ("known", "unknown"):
            row = rows[(signal, mode)]
            assert len(row.ranks) == 4 and all(1 <= k <= gallery for k in row.ranks)
            assert row.chance_r1 == pytest.approx(1 / gallery) and 0 <= min(row.confidences) and max(row.confidences) <= 1
    baseline = [r for r in study.rows if r.mode == "any"]
    assert [r.queries for r in baseline] == [5, 4]  # every street query, then the panoramas

    # plain recomputation of one row: products made directly, no cache, the same match
    torch.manual_seed(0)
    from cvgl.models.factory import create_encoder
    from cvgl.street import (
        ReferenceProducts,
        StreetQuery,
        TokenExtractor,
        aerial_token_windows,
        polar_columns,
        query_products,
    )
    from cvgl.street.geometry import PanoramaBand
    from cvgl.street.products import resample_to_gsd

    extractor = TokenExtractor.from_encoder(create_encoder("gem", TINY), CONFIG.layer)
    task = next(t for t in load_tasks(fake_root) if t.name.startswith("street"))
    items = list(task.gallery) + _distractors()
    cols, maps = [], []
    for item in items:
        image = resample_to_gsd(load_pixels(item), bs.GSD_M.get(item.source, 0.5), CONFIG.work_gsd_m)
        c = np.array([[image.shape[1] / 2, image.shape[0] / 2]])
        cols.append(polar_columns(extractor, image, c, CONFIG)[0])
        maps.append(aerial_token_windows(extractor, image, c, CONFIG)[0])
    reference = ReferenceProducts(torch.stack(cols), torch.stack(maps))
    expected = []
    for q in [q for q in task.queries if q.source in bs.PANO_SOURCES]:
        band = bs.BANDS.get(q.source)
        qp = query_products(extractor, StreetQuery.from_panorama(load_pixels(q), PanoramaBand(*band) if band else None), np.array([0.0]), CONFIG)
        score = match(qp, reference, CONFIG, "fusion").ranking.score
        expected.append(bs.rank_of(score, [g.id for g in items].index(q.positives[0])))
    assert rows[("fusion", "known")].ranks == expected

    assert [o["offset_m"] for o in study.offsets] == [0.0, 2.5, 5.0, 10.0, 20.0]
    assert study.offsets[0]["instances"] == 4 and study.offsets[-1]["instances"] == 2 * 4  # 20 m: CVUSA only, four directions
    assert study.offsets[0]["fusion"] == pytest.approx(np.mean(np.asarray(rows[("fusion", "known")].ranks) == 1))

    text = bs.render_markdown([study], {"root": "../shared/real_pairs"})
    assert f"chance R@1 = {1 / gallery:.4f}" in text and "street · fusion" in text and "Camera offset" in text
    assert "uncalibrated" in text and "in-sample" in text


def test_cache_round_trip_and_a_stale_cache_is_recomputed(fake_root, tmp_path):
    tag = bs.cache_tag(CONFIG, TINY, BASELINE)
    first = _run(fake_root, bs.ProductCache(tmp_path, tag), modes=("known",), offsets=False)[0]
    assert {p.name for p in tmp_path.iterdir()} == {"reference.pt", "query.pt", "global.pt"}
    cache = bs.ProductCache(tmp_path, tag)
    again = _run(fake_root, cache, modes=("known",), offsets=False)[0]
    assert [r.ranks for r in again.rows] == [r.ranks for r in first.rows]
    assert all(v.startswith("verified") for v in cache.checked.values()) and cache.misses == {"reference": 1, "query": 1, "global": 1}

    stored = torch.load(tmp_path / "reference.pt", weights_only=False)
    for entry in stored["entries"].values():
        entry["columns"] = entry["columns"] + 0.5  # what an older version of the code might have left
    torch.save(stored, tmp_path / "reference.pt")
    cache = bs.ProductCache(tmp_path, tag)
    healed = _run(fake_root, cache, modes=("known",), offsets=False)[0]
    assert cache.checked["reference"].startswith("stale") and [r.ranks for r in healed.rows] == [r.ranks for r in first.rows]

    other = bs.ProductCache(tmp_path, bs.cache_tag(StreetConfig(layer=1), TINY, BASELINE))  # other settings: the files are ignored
    assert other._load("reference") == {}


def test_main_skips_without_the_real_pairs(tmp_path, capsys):
    assert bs.main(["--root", str(tmp_path / "absent"), "--no-cache"]) == 0
    assert "not found; skipped" in capsys.readouterr().out


def test_moved_positive_scores_equal_scoring_the_modified_gallery():
    from cvgl.street import QueryProducts, ReferenceProducts
    from cvgl.street.matching import score_query

    rng = np.random.default_rng(3)
    t = lambda *shape: torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    side = CONFIG.window_px // 14
    qp = QueryProducts(np.array([0.0, 22.5]), t(2, CONFIG.columns, 8), torch.ones(2, CONFIG.columns, dtype=torch.bool),
                       t(2, 8, CONFIG.bev_cells, CONFIG.bev_cells), np.array([10, 12]))
    gallery = ReferenceProducts(t(5, CONFIG.columns, 8), t(5, 8, side, side))
    entry = {"columns": t(CONFIG.columns, 8), "maps": t(8, side, side)}
    spliced = bs.moved_positive_scores(qp, score_query(qp, gallery, CONFIG), 3, entry, CONFIG)
    gallery.columns[3], gallery.token_maps[3] = entry["columns"], entry["maps"]
    full = score_query(qp, gallery, CONFIG)
    for name in ("polar", "bev", "bev_offset_m"):
        np.testing.assert_allclose(getattr(spliced, name), getattr(full, name), rtol=1e-5, atol=1e-6)
