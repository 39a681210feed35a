"""Real-pairs benchmark: parsing of the folder layouts, chance levels, shared encoding, the skip path.

The fixtures here are a tiny fake ``real_pairs`` tree of generated images that only mimics the
real folder layouts; the real pairs themselves are never copied into tests.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvgl.bench import real_pairs as rp
from cvgl.bench.common import SharedTokens, raw_pixels
from cvgl.models.factory import load_backbone
from cvgl.errors import InputError
from cvgl.models.factory import create_encoder
from cvgl.models.presets import PRESETS

TINY = "random:dinov2_tiny_test"
TINY_SIZES = rp.Sizes(square=56, pano_height=28, pano_max_width=112)


def _image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / (3 + seed % 5 + c)) + np.cos(yy / (4 + c)) for c in range(3)], axis=-1)
    base = base + rng.normal(0, 0.3, base.shape)
    pixels = ((base - base.min()) / (np.ptp(base) + 1e-9) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """Four folders shaped like the real ones: panoramas, shared-panoid crops, unpaired queries, an extra positive."""
    root = tmp_path / "real_pairs"
    seed = iter(range(1000))

    cvact = root / "cvact_streetpano_sat2density"
    rows = []
    for pano in ("A1", "_b-2", "c3"):
        _image(cvact / "ground" / f"{pano}_grdView.png", 112, 56, next(seed))
        _image(cvact / "satellite" / f"{pano}_satView_polish.png", 64, 64, next(seed))
        rows.append([pano, f"ground/{pano}_grdView.png", f"satellite/{pano}_satView_polish.png"])
    _csv(cvact / "pairs.csv", ["panoid", "ground_panorama", "satellite"], rows)

    sg = root / "cvusa_dayton_selectiongan"
    names = [
        ("cvusa", "test", "cvusa_test_0000002"),
        ("dayton", "test", "dayton_test_--oXL_kf.x832.y508.a-86.a2g"),
        ("dayton", "train", "dayton_train_--oXL_kf.x1066.y499.a-36.a2g"),
    ]
    rows = []
    for dataset, split, stem in names:
        _image(sg / "split" / f"{stem}_ground.png", 48, 48, next(seed))
        _image(sg / "split" / f"{stem}_aerial.png", 48, 48, next(seed))
        rows.append([dataset, split, f"original/{stem}.png", f"split/{stem}_ground.png", f"split/{stem}_aerial.png"])
    _csv(
        sg / "pairs.csv",
        ["dataset", "orig_split", "original_concat_file", "ground_crop(derived)", "aerial_crop(derived)"],
        rows,
    )

    sues = root / "sues200_drone_satellite"
    _image(sues / "satellite_s0.png", 64, 64, next(seed))
    rows = []
    for name in ("150m_0", "150m_1"):
        _image(sues / "drone" / f"{name}.jpg", 72, 72, next(seed))
        rows.append(["150", f"drone/{name}.jpg", "satellite_s0.png"])
    _csv(sues / "pairs.csv", ["altitude_m", "drone", "satellite"], rows)
    _image(sues / "unpaired_other_site" / "0.jpg", 72, 72, next(seed))

    ortho = root / "ortholoc_uav_orthophoto"
    for name, w, h in (("site_query.jpg", 80, 60), ("site_DOP.png", 64, 64), ("site_xDOP.png", 64, 64),
                       ("L08_query.jpg", 80, 60), ("L08_dop.jpg", 64, 64)):
        _image(ortho / name, w, h, next(seed))
    _csv(
        ortho / "pairs.csv",
        ["sample", "uav_query", "orthophoto", "extra"],
        [["site", "site_query.jpg", "site_DOP.png", "site_xDOP.png (cross-domain DOP, other date)"],
         ["L08", "L08_query.jpg", "L08_dop.jpg", ""]],
    )
    (root / "notes_folder").mkdir()  # unknown folders are ignored
    return root


def _by_id(task: rp.Task) -> dict[str, rp.Query]:
    return {q.id: q for q in task.queries}


def test_load_tasks_finds_queries_gallery_and_positives(fake_root: Path) -> None:
    tasks = {t.name: t for t in rp.load_tasks(fake_root)}
    assert list(tasks) == [rp.STREET, rp.DRONE]

    street = tasks[rp.STREET]
    assert len(street.queries) == 6 and len(street.scored) == 6
    assert len(street.gallery) == 6
    assert street.sources == ["cvact_streetpano_sat2density", "cvusa_dayton_selectiongan"]
    q = _by_id(street)["cvact_streetpano_sat2density/ground/_b-2_grdView.png"]
    assert q.positives == ("cvact_streetpano_sat2density/satellite/_b-2_satView_polish.png",)
    assert q.path.is_file()
    # two Dayton crops of one panorama id: both aerials are positives of both
    day = [q for q in street.queries if "split/dayton_" in q.id]
    assert len(day) == 2 and all(len(q.positives) == 2 for q in day)
    assert day[0].positives == day[1].positives
    cvusa = _by_id(street)["cvusa_dayton_selectiongan/split/cvusa_test_0000002_ground.png"]
    assert cvusa.positives == ("cvusa_dayton_selectiongan/split/cvusa_test_0000002_aerial.png",)

    drone = tasks[rp.DRONE]
    ids = _by_id(drone)
    assert len(drone.queries) == 5 and len(drone.scored) == 4
    assert ids["sues200_drone_satellite/unpaired_other_site/0.jpg"].positives == ()
    assert ids["sues200_drone_satellite/drone/150m_1.jpg"].positives == ("sues200_drone_satellite/satellite_s0.png",)
    assert ids["ortholoc_uav_orthophoto/site_query.jpg"].positives == (
        "ortholoc_uav_orthophoto/site_DOP.png",
        "ortholoc_uav_orthophoto/site_xDOP.png",
    )
    assert ids["ortholoc_uav_orthophoto/L08_query.jpg"].positives == ("ortholoc_uav_orthophoto/L08_dop.jpg",)
    # SUES satellite listed twice in pairs.csv but one gallery item; gallery = 1 + 3 orthophotos
    assert sorted(g.id for g in drone.gallery) == sorted(
        ["sues200_drone_satellite/satellite_s0.png", "ortholoc_uav_orthophoto/site_DOP.png",
         "ortholoc_uav_orthophoto/site_xDOP.png", "ortholoc_uav_orthophoto/L08_dop.jpg"]
    )


def test_load_tasks_reports_missing_files(fake_root: Path) -> None:
    (fake_root / "sues200_drone_satellite" / "drone" / "150m_1.jpg").unlink()
    with pytest.raises(InputError, match="150m_1.jpg"):
        rp.load_tasks(fake_root)


def test_sizes_keep_aspect_in_multiples_of_14() -> None:
    sizes = rp.Sizes()
    assert sizes.for_image(512, 512) == (224, 224)
    assert sizes.for_image(1232, 224) == (154, 840)
    assert sizes.for_image(512, 256) == (154, 308)
    assert sizes.for_image(1024, 768) == (196, 252)
    assert sizes.for_image(768, 1024) == (252, 196)
    for w, h in ((3000, 200), (1000, 900), (640, 480)):
        assert all(v % 14 == 0 and v > 0 for v in sizes.for_image(w, h))


def test_chance_recall_matches_closed_form() -> None:
    assert rp.chance_recall(np.array([1]), 10, 1) == pytest.approx(0.1)
    assert rp.chance_recall(np.array([2]), 10, 1) == pytest.approx(0.2)
    assert rp.chance_recall(np.array([1, 2]), 10, 3) == pytest.approx(((3 / 10) + (1 - math.comb(8, 3) / math.comb(10, 3))) / 2)
    assert rp.chance_recall(np.array([1]), 5, 10) == 1.0  # k beyond the gallery


def test_encode_methods_equals_create_encoder(fake_root: Path) -> None:
    from cvgl.data.images import load_image

    images = [
        np.asarray(load_image(fake_root / "cvact_streetpano_sat2density/ground/A1_grdView.png")),  # panorama
        np.asarray(load_image(fake_root / "ortholoc_uav_orthophoto/site_query.jpg")),  # 4:3
        np.asarray(load_image(fake_root / "sues200_drone_satellite/satellite_s0.png")),  # square
    ]
    methods = [rp.Method("g", "gem", TINY, seed=3), rp.Method("c", "cls", TINY, seed=3), rp.Method("raw")]
    out = rp.encode_methods(methods, images, TINY_SIZES)
    for label, preset in (("g", "gem"), ("c", "cls")):
        for i, image in enumerate(images):
            torch.manual_seed(3)
            encoder = create_encoder(preset, TINY, input_size=TINY_SIZES.for_image(image.shape[1], image.shape[0]))
            np.testing.assert_allclose(out[label][i], encoder.encode([image])[0], atol=1e-5)
    np.testing.assert_array_equal(out["raw"], raw_pixels(images))


def test_shared_tokens_per_image_sizes_restore_order() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 90), (50, 50), (30, 70), (60, 60), (45, 45))]
    sizes = [(28, 56), (42, 42), (28, 56), (42, 42), (56, 56)]  # interleaved groups, one singleton
    heads = {"gem": PRESETS["gem"].head, "cls": PRESETS["cls"].head}
    shared = SharedTokens(load_backbone(TINY, seed=5)[0], heads, size=(42, 42))
    out = shared.encode(images, batch=1, sizes=sizes)
    for name in heads:
        assert out[name].shape[0] == len(images) and out[name].dtype == np.float32
        for i, (image, size) in enumerate(zip(images, sizes)):
            torch.manual_seed(5)
            encoder = create_encoder(name, TINY, input_size=size)
            np.testing.assert_allclose(out[name][i], encoder.encode([image])[0], atol=1e-5)
    # without sizes every image goes to the fixed size, as before
    fixed = shared.encode(images, batch=2)
    torch.manual_seed(5)
    np.testing.assert_allclose(fixed["gem"], create_encoder("gem", TINY, input_size=(42, 42)).encode(images), atol=1e-5)
    with pytest.raises(ValueError):
        shared.encode(images, sizes=sizes[:2])


def test_load_backbone_random_seed_leaves_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b = load_backbone(TINY, seed=7)[0], load_backbone(TINY, seed=7)[0]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_images_are_grey_unless_colour(fake_root: Path, monkeypatch) -> None:
    seen: dict[bool, list[np.ndarray]] = {}

    def fake_encode(methods, images, sizes=None, log=None):
        seen[colour] = list(images)
        rng = np.random.default_rng(0)
        return {m.label: rng.normal(size=(len(images), 8)).astype(np.float32) for m in methods}

    monkeypatch.setattr(rp, "encode_methods", fake_encode)
    distractors = [np.full((40, 40, 3), v, dtype=np.uint8) for v in (10, 90)]
    for colour in (False, True):
        rows = rp.run(fake_root, [rp.Method("raw")], sizes=TINY_SIZES, distractors=distractors, alignments=("none",), colour=colour)
        assert {r["colour"] for r in rows} == {colour}
        text = rp.render_markdown(rows)
        assert ("Images: **colour**" in text) == colour and ("Images: **grey**" in text) != colour
    grey, coloured = seen[False], seen[True]
    assert len(grey) == len(coloured) and all(g.ndim == 3 and g.shape[2] == 3 and g.dtype == np.uint8 for g in grey)
    assert all((g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all() for g in grey)
    assert any((c[..., 0] != c[..., 1]).any() for c in coloured)  # the fixtures are colour
    for g, c in zip(grey, coloured):
        np.testing.assert_array_equal(g[..., 0], np.asarray(Image.fromarray(c).convert("L")))


def test_run_rows_and_chance_levels(fake_root: Path) -> None:
    distractors = [np.full((40, 40, 3), v, dtype=np.uint8) for v in (10, 90, 170)]
    methods = [
        rp.Method("raw", None),
        rp.Method("tiny gem", "gem", TINY),
        rp.Method("tiny cls", "cls", TINY, leaky=True),
    ]
    rows = rp.run(fake_root, methods, sizes=TINY_SIZES, distractors=distractors)
    # 2 tasks x (3 methods x {none, coral} + 1 leaky row)
    assert len(rows) == 2 * (3 * 2 + 1)
    street = [r for r in rows if r["task"] == rp.STREET]
    drone = [r for r in rows if r["task"] == rp.DRONE]

    # street: 6 scored queries, G = 6 real + 3 distractors; 4 queries with 1 positive, 2 with 2
    assert {(r["n_queries"], r["n_unpaired"], r["gallery"], r["gallery_real"], r["gallery_distractors"]) for r in street} == {(6, 0, 9, 6, 3)}
    assert street[0]["chance_R@1"] == pytest.approx((4 * 1 / 9 + 2 * 2 / 9) / 6)
    assert street[0]["chance_R@10"] == pytest.approx(1.0)
    # drone: 4 scored + 1 unpaired, G = 4 + 3; the OrthoLoC site query has 2 positives
    assert {(r["n_queries"], r["n_unpaired"], r["gallery"]) for r in drone} == {(4, 1, 7)}
    assert drone[0]["chance_R@1"] == pytest.approx((3 * 1 / 7 + 2 / 7) / 4)

    for r in rows:
        assert all(0.0 <= r[f"R@{k}"] <= 1.0 for k in (1, 5, 10))
        assert r["R@1"] <= r["R@5"] <= r["R@10"]
    assert {(r["method"], r["alignment"]) for r in street if not r["leaky"]} == {
        (m, a) for m in ("raw", "tiny gem", "tiny cls") for a in ("none", "coral")
    }
    leaky = [r for r in rows if r["leaky"]]
    assert len(leaky) == 2 and all(r["method"] == "tiny cls" and "LEAKY" in r["alignment"] for r in leaky)
    assert set(drone[0]["per_source_R@1"]) == {"sues200_drone_satellite", "ortholoc_uav_orthophoto"}

    text = rp.render_markdown(rows, {"root": "fake"})
    assert f"## {rp.STREET}" in text and f"## {rp.DRONE}" in text
    assert "**LEAKY" in text and "R@1 SUES-200" in text
    assert f"{street[0]['chance_R@1']:.4f}" in text


def test_main_skips_when_folder_absent(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv(rp.ENV_VAR, raising=False)
    monkeypatch.setattr(rp, "DEFAULT_ROOT", tmp_path / "absent")
    assert rp.main([]) == 0
    assert capsys.readouterr().out.strip() == "real-pairs: ../shared/real_pairs not found; skipped"
    monkeypatch.setenv(rp.ENV_VAR, str(tmp_path / "elsewhere"))
    assert rp.main([]) == 0
    assert "not found; skipped" in capsys.readouterr().out


def test_real_folder_parses_with_readme_counts() -> None:
    root, _ = rp.resolve_root()
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    tasks = {t.name: t for t in rp.load_tasks(root)}
    street, drone = tasks[rp.STREET], tasks[rp.DRONE]

    def per_source(task: rp.Task) -> dict[str, int]:
        return {s: sum(q.source == s for q in task.queries) for s in task.sources}

    # README: CVACT 12, CVUSA crossnet 5, CVUSA + Dayton 8 + 8, University-1652 25 photos / 6 satellites
    assert per_source(street) == {
        "cvact_streetpano_sat2density": 12,
        "cvusa_streetpano_crossnet": 5,
        "cvusa_dayton_selectiongan": 16,
        "u1652_street_satellite": 25,
    }
    assert len(street.scored) == 58
    assert len(street.gallery) == 12 + 5 + 16 + 6
    # README: SUES-200 12 drone + 3 unpaired / 1 satellite; OrthoLoC 4 + one extra orthophoto
    assert per_source(drone) == {"sues200_drone_satellite": 15, "ortholoc_uav_orthophoto": 4}
    assert len(drone.scored) == 16
    assert len(drone.gallery) == 1 + 4 + 1
    assert sum(len(q.positives) == 2 for q in street.queries) == 2  # the shared Dayton panorama id
    assert sum(len(q.positives) == 2 for q in drone.queries) == 1  # OrthoLoC DOP + xDOP
