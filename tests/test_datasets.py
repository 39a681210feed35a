"""Benchmark loaders on tiny fixture trees in each published layout, pair datasets, ortho pairs."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pyproj import Transformer

from cvgl.data.augment import PairedAugment
from cvgl.data.datasets import (
    CrossViewSplit,
    ImageListDataset,
    PairDataset,
    ViewItem,
    cut_ortho_pairs,
    load_cvact,
    load_cvusa,
    load_pairs_csv,
    load_university1652,
    load_vigor,
)
from cvgl.errors import InputError

_spec = importlib.util.spec_from_file_location("make_fixtures", Path(__file__).parent / "data" / "make_fixtures.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture tree, written once per module (tests that break a tree copy it first)."""
    base = tmp_path_factory.mktemp("fixtures")
    return {name: make(base / name) for name, make in fx.MAKERS.items()}


def _copy(tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tree, tmp_path / tree.name))


# ----------------------------------------------------------------------------------------------
# CVUSA
# ----------------------------------------------------------------------------------------------


def test_cvusa_splits_pair_rows_one_to_one(trees):
    root = trees["cvusa"]
    train, val = load_cvusa(root, "train"), load_cvusa(root, "val")
    assert (len(train.queries), len(val.queries)) == (fx.CVUSA_COUNTS["train"], fx.CVUSA_COUNTS["val"])
    assert train.query_view == "street" and train.reference_view == "aerial"
    assert train.pairs() == [(i, i) for i in range(4)]
    assert [q.location for q in train.queries] == [0, 1, 2, 3]  # id 0 is kept
    assert train.queries[0].path == root / "streetview/panos/0000000.jpg"
    assert train.references[0].path == root / "bingmap/19/0000000.jpg"
    assert val.queries[0].path.name == "0000004.jpg"
    assert all(q.lat is None and q.lon is None for q in train.queries)
    assert load_cvusa(root, "test").queries == val.queries


def test_cvusa_side_table_gives_positions(trees, tmp_path):
    table = tmp_path / "gps.csv"
    table.write_text("id,lat,lon\n0000001,40.5,-100.25\n")
    split = load_cvusa(trees["cvusa"], "train", latlon_csv=table)
    assert (split.queries[1].lat, split.queries[1].lon) == (40.5, -100.25)
    assert (split.references[1].lat, split.references[1].lon) == (40.5, -100.25)
    assert split.queries[0].lat is None
    lat, lon = split.pair_latlon()
    assert (lat[1], lon[1]) == (40.5, -100.25) and math.isnan(lat[0]) and math.isnan(lon[0])


def test_cvusa_broken_layouts_name_the_missing_path(trees, tmp_path):
    root = _copy(trees["cvusa"], tmp_path)
    (root / "bingmap/19/0000002.jpg").unlink()
    with pytest.raises(InputError, match="0000002.jpg"):
        load_cvusa(root, "train")
    (root / "splits/val-19zl.csv").unlink()
    with pytest.raises(InputError, match="val-19zl.csv"):
        load_cvusa(root, "val")
    with pytest.raises(InputError, match="split"):
        load_cvusa(root, "everything")


# ----------------------------------------------------------------------------------------------
# CVACT
# ----------------------------------------------------------------------------------------------


def test_cvact_uses_one_based_indices_and_converts_utm(trees):
    train = load_cvact(trees["cvact"], "train")
    val = load_cvact(trees["cvact"], "val")
    expected_ids = [fx.CVACT_IDS[i - 1] for i in fx.CVACT_TRAIN_IND]
    assert [q.path.name for q in train.queries] == [f"{i}_grdView.jpg" for i in expected_ids]
    assert [r.path.name for r in train.references] == [f"{i}_satView_polish.jpg" for i in expected_ids]
    assert [q.path.name for q in val.queries] == [f"{fx.CVACT_IDS[i - 1]}_grdView.jpg" for i in fx.CVACT_VAL_IND]
    assert train.pairs() == [(i, i) for i in range(4)] and [q.location for q in train.queries] == [0, 1, 2, 3]
    to_geo = Transformer.from_crs("EPSG:32755", "EPSG:4326", always_xy=True)
    e0, n0 = fx.CVACT_UTM_ORIGIN
    for q, one_based in zip(train.queries, fx.CVACT_TRAIN_IND):
        row = one_based - 1
        lon, lat = to_geo.transform(e0 + 100.0 * row, n0 + 50.0 * row)
        assert q.lat == pytest.approx(lat, abs=1e-9) and q.lon == pytest.approx(lon, abs=1e-9)
        assert -35.5 < q.lat < -35.1 and 149.0 < q.lon < 149.3  # Canberra


def test_cvact_accepts_utm_columns_in_either_order(trees, tmp_path):
    from scipy.io import loadmat, savemat

    root = _copy(trees["cvact"], tmp_path)
    mat = loadmat(root / "ACT_data.mat", simplify_cells=True)
    mat = {k: v for k, v in mat.items() if not k.startswith("__")}
    mat["utm"] = mat["utm"][:, ::-1].copy()
    savemat(root / "ACT_data.mat", mat)
    swapped, original = load_cvact(root, "train"), load_cvact(trees["cvact"], "train")
    assert [(q.lat, q.lon) for q in swapped.queries] == [(q.lat, q.lon) for q in original.queries]


def test_cvact_missing_files(trees, tmp_path):
    root = _copy(trees["cvact"], tmp_path)
    missing = root / "ANU_data_small/satview_polish" / f"{fx.CVACT_IDS[2]}_satView_polish.jpg"
    missing.unlink()
    with pytest.raises(InputError, match=missing.name):
        load_cvact(root, "train")
    kept = load_cvact(root, "train", skip_missing=True)
    assert len(kept.queries) == 3 and [q.location for q in kept.queries] == [0, 1, 2]
    assert fx.CVACT_IDS[2] not in " ".join(str(q.path) for q in kept.queries)
    (root / "ACT_data.mat").unlink()
    with pytest.raises(InputError, match="ACT_data.mat"):
        load_cvact(root, "val")


# ----------------------------------------------------------------------------------------------
# VIGOR
# ----------------------------------------------------------------------------------------------


def _sat_index(split: CrossViewSplit, city: str, k: int, city_index: int) -> int:
    path = split.references[0].path.parents[2] / city / "satellite" / fx.vigor_sat_name(city_index, k)
    return [r.path for r in split.references].index(path)


def test_vigor_same_area_positives_semi_positives_and_positions(trees):
    root = trees["vigor"]
    for split_name, offset in (("train", 0), ("test", 2)):
        split = load_vigor(root, split_name, "same")
        assert len(split.references) == len(fx.VIGOR_CITIES) * fx.VIGOR_SATS_PER_CITY
        assert len(split.queries) == len(fx.VIGOR_CITIES) * fx.VIGOR_PANOS[split_name]
        for q, item in enumerate(split.queries):
            c = q // fx.VIGOR_PANOS[split_name]
            j = q % fx.VIGOR_PANOS[split_name]
            city = fx.VIGOR_CITIES[c]
            ks = [(j + offset + s) % fx.VIGOR_SATS_PER_CITY for s in range(4)]
            expected = [_sat_index(split, city, k, c) for k in ks]
            assert split.positives[q] == expected[:1]
            assert split.semi_positives[q] == expected[1:]
            assert item.location == expected[0]
            assert split.references[expected[0]].location == expected[0]
            assert item.lat == pytest.approx(41.0 + c + 0.0001 * (j + offset))
            assert item.lon == pytest.approx(-87.0 - c - 0.0001 * (j + offset))
        ref = split.references[0]
        assert (ref.lat, ref.lon) == (41.0, -87.0)


def test_vigor_cross_area_cities_do_not_overlap(trees):
    train = load_vigor(trees["vigor"], "train", "cross")
    test = load_vigor(trees["vigor"], "test", "cross")
    cities = lambda s: {i.path.parents[1].name for i in s.queries + s.references}
    assert cities(train) == {"NewYork", "Seattle"} and cities(test) == {"SanFrancisco", "Chicago"}
    per_city = fx.VIGOR_PANOS["train"] + fx.VIGOR_PANOS["test"]
    assert len(train.queries) == len(test.queries) == 2 * per_city
    assert len(train.references) == 2 * fx.VIGOR_SATS_PER_CITY
    assert all(len(s) == 3 for s in train.semi_positives)


def test_vigor_broken_layouts(trees, tmp_path):
    root = _copy(trees["vigor"], tmp_path)
    label = root / "splits/Seattle/same_area_balanced_test.txt"
    label.write_text(label.read_text().replace("satellite_44.000000", "satellite_99.000000"))
    with pytest.raises(InputError, match="same_area_balanced_test.txt, line 1"):
        load_vigor(root, "test", "same")
    (root / "splits/NewYork/pano_label_balanced.txt").unlink()
    with pytest.raises(InputError, match="pano_label_balanced.txt"):
        load_vigor(root, "train", "cross")
    pano = next((root / "Chicago/panorama").glob("train0*"))
    pano.unlink()
    with pytest.raises(InputError, match="train0_pano"):
        load_vigor(root, "train", "same")


# ----------------------------------------------------------------------------------------------
# University-1652
# ----------------------------------------------------------------------------------------------


def test_university_drone_to_satellite_train_pairs_by_building(trees):
    split = load_university1652(trees["university1652"], "train", "drone", "satellite")
    buildings = fx.UNIVERSITY_BUILDINGS["train"]
    assert len(split.queries) == fx.UNIVERSITY_DRONE_PER_BUILDING * len(buildings)
    assert [r.location for r in split.references] == buildings  # building 0 included
    for q, item in enumerate(split.queries):
        assert item.path.suffix == ".jpeg"
        assert split.positives[q] == [buildings.index(item.location)]
        assert split.references[split.pairs()[q][1]].location == item.location
    assert all(i.lat is None for i in split.queries)


def test_university_test_directions(trees):
    root = trees["university1652"]
    sat_to_drone = load_university1652(root, "test", "satellite", "drone")
    assert len(sat_to_drone.queries) == len(fx.UNIVERSITY_BUILDINGS["test"])
    assert len(sat_to_drone.references) == 3 * fx.UNIVERSITY_DRONE_PER_BUILDING  # incl. distractor
    for q, item in enumerate(sat_to_drone.queries):
        refs = [sat_to_drone.references[r] for r in sat_to_drone.positives[q]]
        assert len(refs) == fx.UNIVERSITY_DRONE_PER_BUILDING
        assert all(r.location == item.location for r in refs)
    drone_to_sat = load_university1652(root, "test", "drone", "satellite")
    assert {r.location for r in drone_to_sat.references} == {3, 5, fx.UNIVERSITY_DISTRACTOR}
    street = load_university1652(root, "train", "street", "satellite")
    assert [q.location for q in street.queries] == [0, 7]  # building 12 has no street image
    with pytest.raises(InputError, match="direction"):
        load_university1652(root, "train", "street", "drone")


def test_university_missing_folder(trees, tmp_path):
    root = _copy(trees["university1652"], tmp_path)
    shutil.rmtree(root / "test/gallery_drone")
    with pytest.raises(InputError, match="gallery_drone"):
        load_university1652(root, "test", "satellite", "drone")
    shutil.rmtree(root / "train/satellite/0007")
    with pytest.raises(InputError, match="0007"):
        load_university1652(root, "train", "drone", "satellite")


# ----------------------------------------------------------------------------------------------
# Pairs CSV
# ----------------------------------------------------------------------------------------------


def test_pairs_csv_shares_references_and_reads_optional_positions(trees):
    csv_path = trees["pairs"]
    split = load_pairs_csv(csv_path)
    assert len(split.queries) == 4 and len(split.references) == 3
    assert split.positives == [[0], [1], [1], [2]]
    assert [q.location for q in split.queries] == [0, 1, 1, 2]
    assert split.queries[0].path == csv_path.parent / "q/a.jpg"
    assert (split.queries[1].lat, split.queries[1].lon) == (40.1002, -105.1002)
    assert split.queries[3].lat is None and split.references[2].lon is None
    assert split.name == "pairs/pairs"


def test_pairs_csv_errors(trees, tmp_path):
    root = _copy(trees["pairs"].parent, tmp_path)
    with pytest.raises(InputError, match="nope.csv"):
        load_pairs_csv(root / "nope.csv")
    (root / "bad.csv").write_text("query,reference,lat\nq/a.jpg,r/r0.png,1\n")
    with pytest.raises(InputError, match="lat and lon"):
        load_pairs_csv(root / "bad.csv")
    (root / "range.csv").write_text("query,reference,lat,lon\nq/a.jpg,r/r0.png,-105,40\n")
    with pytest.raises(InputError, match="line 2"):
        load_pairs_csv(root / "range.csv")
    (root / "r/r2.png").unlink()
    with pytest.raises(InputError, match="r2.png"):
        load_pairs_csv(root / "pairs.csv")


# ----------------------------------------------------------------------------------------------
# The common model and the torch datasets
# ----------------------------------------------------------------------------------------------


def test_split_validates_indices_and_views(tmp_path):
    item = ViewItem(tmp_path / "a.png", None, None, 0)
    with pytest.raises(ValueError, match="outside"):
        CrossViewSplit("x", "drone", "satellite", [item], [item], [[1]])
    with pytest.raises(ValueError, match="no positive"):
        CrossViewSplit("x", "drone", "satellite", [item], [item], [[]])
    with pytest.raises(ValueError, match="query_view"):
        CrossViewSplit("x", "plane", "satellite", [item], [item], [[0]])


def _reference_tensor(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Plain reference: PIL open -> RGB -> bicubic resize -> /255."""
    image = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    return torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255.0


def test_pair_dataset_samples(trees):
    split = load_vigor(trees["vigor"], "train", "same")
    dataset = PairDataset(split, query_size=(16, 40), reference_size=(24, 24))
    assert len(dataset) == len(split.queries)
    sample = dataset[3]
    assert sample["query"].shape == (3, 16, 40) and sample["reference"].shape == (3, 24, 24)
    assert sample["query"].dtype == torch.float32
    assert 0.0 <= float(sample["query"].min()) and float(sample["query"].max()) <= 1.0
    q, r = split.pairs()[3]
    torch.testing.assert_close(sample["query"], _reference_tensor(split.queries[q].path, (16, 40)))
    torch.testing.assert_close(sample["reference"], _reference_tensor(split.references[r].path, (24, 24)))
    assert sample["pair"] == 3 and sample["location"] == split.positives[3][0]
    assert sample["lat"] == pytest.approx(split.queries[3].lat)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["query"].shape == (4, 3, 16, 40) and batch["location"].dtype == torch.int64


def test_pair_dataset_augmentation_is_a_function_of_epoch_and_index(trees):
    split = load_university1652(trees["university1652"], "train", "drone", "satellite")
    augment = PairedAugment("aerial", seed=3)
    dataset = PairDataset(split, (32, 32), (32, 32), augment=augment)
    first = [dataset[i]["query"] for i in range(len(dataset))]
    again = PairDataset(split, (32, 32), (32, 32), augment=PairedAugment("aerial", seed=3))
    torch.testing.assert_close(again[5]["query"], first[5])  # no state carried between samples
    dataset.set_epoch(1)
    assert any(not torch.equal(dataset[i]["query"], first[i]) for i in range(len(dataset)))
    with pytest.raises(ValueError, match="square"):
        PairDataset(split, (32, 48), (32, 32), augment=augment)


def test_pair_dataset_unknown_position_is_nan_and_bad_file_names_it(trees, tmp_path):
    root = _copy(trees["cvusa"], tmp_path)
    split = load_cvusa(root, "train")
    dataset = PairDataset(split, (8, 16), (8, 8))
    assert math.isnan(dataset[0]["lat"]) and math.isnan(dataset[0]["lon"])
    broken = split.queries[2].path
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match=broken.name):
        dataset[2]
    broken.unlink()
    with pytest.raises(InputError, match=broken.name):
        dataset[2]


def test_image_list_dataset(trees):
    split = load_cvact(trees["cvact"], "val")
    images = ImageListDataset(split.references, (20, 20))
    assert len(images) == 2
    sample = images[1]
    assert sample["index"] == 1 and sample["image"].shape == (3, 20, 20)
    torch.testing.assert_close(sample["image"], _reference_tensor(split.references[1].path, (20, 20)))


# ----------------------------------------------------------------------------------------------
# Ortho pairs on the real Longmont rasters
# ----------------------------------------------------------------------------------------------


def test_cut_ortho_pairs_on_longmont(tmp_path):
    from cvgl.data.raster import raster_info
    from cvgl.data.samples import longmont_scene
    from cvgl.data.synthetic import QueryFamily
    from cvgl.geo import from_latlon

    query_raster, reference_raster = longmont_scene("wv2"), longmont_scene("wv3")
    family = QueryFamily("nadir", pitches=(0.0,), scale_jitter=(0.9, 1.1), footprint_m=60.0)
    kwargs = {"count": 3, "seed": 1, "family": family, "tile_m": 56.0, "gsd_m": 1.0, "photo_size": (48, 48)}
    west = cut_ortho_pairs(query_raster, reference_raster, tmp_path / "west", x_range=(0.0, 0.5), **kwargs)
    east = cut_ortho_pairs(query_raster, reference_raster, tmp_path / "east", x_range=(0.5, 1.0), **kwargs)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary folders were renamed away

    q_info, r_info = raster_info(query_raster), raster_info(reference_raster)
    left = max(q_info.bounds[0], r_info.bounds[0])
    right = min(q_info.bounds[2], r_info.bounds[2])
    mid = (left + right) / 2
    for csv_path, (lo, hi) in ((west, (left, mid)), (east, (mid, right))):
        split = load_pairs_csv(csv_path)
        assert len(split.queries) == len(split.references) == 3
        for q, r in split.pairs():
            item = split.queries[q]
            x, _ = from_latlon(q_info.crs, item.lat, item.lon)
            assert lo - 0.01 <= x <= hi + 0.01
            photo = np.asarray(Image.open(item.path))
            tile = np.asarray(Image.open(split.references[r].path))
            assert photo.shape == (48, 48, 3) and tile.shape == (56, 56, 3)
            assert photo.std() > 5 and tile.std() > 5  # real imagery, not blank
            assert split.references[r].lat == item.lat
    # The same parameters reuse the folder; other parameters refuse to overwrite it.
    assert cut_ortho_pairs(query_raster, reference_raster, tmp_path / "west", x_range=(0.0, 0.5), **kwargs) == west
    with pytest.raises(InputError, match="west"):
        cut_ortho_pairs(query_raster, reference_raster, tmp_path / "west", x_range=(0.0, 0.4), **kwargs)
    with pytest.raises(InputError, match="x_range"):
        cut_ortho_pairs(query_raster, reference_raster, tmp_path / "bad", x_range=(0.6, 0.5), **kwargs)
