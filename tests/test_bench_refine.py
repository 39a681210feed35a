"""The ``refine`` benchmark's scoring, summary, targets and real-photo gallery (no model runs).

Answers are written in the published schema by hand, so each metric is checked against numbers
worked out here; the real-photo gallery is built from a small fake ``real_pairs`` tree of
generated images shaped like the real one (the real pairs are never copied into tests).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

from cvgl.bench import refine as rb
from cvgl.geo import geodesic_distance_m, offset_latlon

LAT, LON = 40.0, -105.0


def _answer(east_m: float, north_m: float = 0.0, verified: bool = False, tile: str = "t0", heading: float = 0.0,
            status: str = "located") -> dict:
    lat, lon = offset_latlon(LAT, LON, east_m, north_m)
    return {
        "status": status, "lat": float(lat), "lon": float(lon), "heading_deg": heading,
        "verification": {"verified": verified, "tile_id": tile, "seconds": 0.5},
        "top_k": [{"tile_id": "retrieved", "rank": 1}],
    }


def test_metric_answers_are_scored_in_metres_and_headings_wrap() -> None:
    truth = rb.Truth("nadir", LAT, LON, heading_deg=355.0)
    near = rb.score_answer(_answer(3.0, 4.0, verified=True, heading=5.0), truth, ceiling=True)
    assert near.error_m == pytest.approx(5.0, abs=0.01)
    assert near.heading_error_deg == pytest.approx(10.0)  # 355 -> 5 is 10 degrees, not 350
    assert near.correct and near.verified and near.ceiling and near.seconds == 0.5
    far = rb.score_answer(_answer(60.0, verified=True), truth)
    assert far.verified and not far.correct  # a false verification
    skipped = rb.score_answer({"status": "skipped", "reason": "x"}, truth)
    assert math.isinf(skipped.error_m) and not skipped.verified and not skipped.correct


def test_image_truth_uses_the_verified_tile_else_retrievals_top1() -> None:
    truth = rb.Truth("sues", positives=("s0",))
    assert rb.score_answer(_answer(500.0, verified=True, tile="s0"), truth).correct  # no metric truth: metres ignored
    assert not rb.score_answer(_answer(0.0, verified=True, tile="other"), truth).correct
    assert not rb.score_answer(_answer(0.0, verified=False, tile="s0"), truth).correct  # unverified: top-1 = "retrieved"
    assert math.isnan(rb.score_answer(_answer(0.0), truth).error_m)
    elsewhere = rb.Truth("not in index", positives=())
    assert not rb.score_answer(_answer(0.0, verified=True, tile="s0"), elsewhere).correct  # nothing is right
    both = rb.Truth("ortholoc", LAT, LON, positives=("dop",))
    assert not rb.score_answer(_answer(80.0, verified=True, tile="dop"), both).correct  # right image, 80 m off


def test_summary_counts_recalls_false_verifications_and_ignores_photos_without_metric_truth() -> None:
    truth = rb.Truth("f", LAT, LON, heading_deg=0.0)
    outcomes = [rb.score_answer(_answer(e, verified=v, heading=h), truth, ceiling=c)
                for e, v, h, c in ((1.0, True, 2.0, True), (10.0, True, 4.0, True), (30.0, False, 20.0, True), (200.0, True, 90.0, False))]
    outcomes.append(rb.score_answer(_answer(0.0, verified=False), rb.Truth("f", positives=("x",))))
    s = rb.summarise(outcomes)
    assert s["photos"] == 5 and s["metric_photos"] == 4
    assert (s["R@1(50m)"], s["R@1(20m)"], s["R@1(5m)"]) == (0.75, 0.5, 0.25)
    assert s["median_m"] == pytest.approx(20.0, abs=0.01)
    assert s["p90_m"] == pytest.approx(float(np.percentile([1, 10, 30, 200], 90)), abs=0.05)
    assert s["heading_median_deg"] == pytest.approx(12.0)  # median of 2, 4, 20, 90: the photo without a heading truth is left out
    assert s["verified"] == pytest.approx(0.6) and s["false_count"] == 1 and s["false_verified"] == pytest.approx(0.2)
    assert s["ceiling"] == pytest.approx(0.6)
    rows = rb.family_rows({"f": {"on": s}})
    assert rows[0][:6] == ["f", "on", "5", "0.75 / 0.50 / 0.25", "20.0", f"{s['p90_m']:.0f}"]
    assert rows[0][8] == "0.20 (1)"


def _summary(median: float, r50: float, verified: float = 1.0, false: int = 0, photos: int = 10) -> dict:
    return {"median_m": median, "R@1(50m)": r50, "verified": verified, "ceiling": 1.0, "false_count": float(false),
            "photos": float(photos)}


def test_targets_say_met_or_missed_and_by_how_much() -> None:
    longmont = {
        "nadir, heading known": {"on": _summary(1.9, 1.0)},
        "nadir, heading unknown": {"on": _summary(2.5, 0.90, false=1)},
    }
    real = {"OrthoLoC urban_residential (hand truth)": {"on": _summary(7.5, 1.0, photos=1)}}
    targets = {t.name: t for t in rb.evaluate_targets(longmont, real, {("aliked-lightglue", 10): 0.8}, 10, "aliked-lightglue")}
    assert targets["Longmont nadir, heading known"].met
    gap = targets["nadir: heading unknown vs known"]
    assert gap.met is False and gap.value == pytest.approx(0.10) and "+0.10" in gap.margin
    ortho = targets["OrthoLoC urban_residential"]
    assert ortho.met is False and "+2.5 m" in ortho.margin
    assert targets["verification time, K=10, aliked-lightglue"].met
    false = targets["false verifications (all photos, refine on)"]
    assert false.met is False and "1 of 21" in false.margin  # 1/21 = 4.8 % > 1 %
    missing = {t.name: t for t in rb.evaluate_targets({}, {}, {}, 10, "aliked-lightglue", "not run")}
    assert missing["OrthoLoC urban_residential"].met is None and missing["OrthoLoC urban_residential"].why == "not run"
    assert all(row[3] in ("**met**", "**missed**", "not measured") for row in rb.target_rows(list(targets.values())))


def _jpg(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _local_dop(path: Path, left: float, top: float, gsd: float, side_px: int) -> None:
    """A GeoTIFF in local metres tagged WGS84, like OrthoLoC's."""
    data = np.random.default_rng(0).integers(0, 255, (3, side_px, side_px), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=side_px, height=side_px, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=Affine(gsd, 0, left, 0, -gsd, top)) as dst:
        dst.write(data)


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_real_gallery_places_the_hand_truth_in_the_dop_frame_and_groups_the_photos(tmp_path: Path) -> None:
    root = tmp_path / "real_pairs"
    ortho = root / "ortholoc_uav_orthophoto"
    ortho.mkdir(parents=True)
    _local_dop(ortho / "urban_residential_DOP.tif", -90.0, 94.0, 0.5, 64)  # centre (-74, 78), 32 m side
    _local_dop(ortho / "urban_residential_xDOP.tif", -90.0, 94.0, 0.5, 64)
    _jpg(ortho / "urban_residential_query.jpg", (64, 48), 1)
    for k in range(3):
        _jpg(ortho / f"L08_{k}_query.jpg", (64, 48), 2 + k)
        _jpg(ortho / f"L08_{k}_dop.jpg", (64, 64), 5 + k)
    _csv(ortho / "pairs.csv", ["sample", "uav_query", "orthophoto", "extra"], [
        ["urban_residential", "urban_residential_query.jpg", "urban_residential_DOP.tif", "urban_residential_xDOP.tif (other date)"],
        *[[f"L08_{k}", f"L08_{k}_query.jpg", f"L08_{k}_dop.jpg", ""] for k in range(3)],
    ])
    sues = root / "sues200_drone_satellite"
    _jpg(sues / "satellite_s0.png", (64, 64), 4)
    rows = []
    for alt in (150, 200):
        for k in range(3):
            _jpg(sues / "drone" / f"{alt}m_{k}.jpg", (48, 48), alt + k)
            rows.append([str(alt), f"drone/{alt}m_{k}.jpg", "satellite_s0.png"])
    _csv(sues / "pairs.csv", ["altitude_m", "drone", "satellite"], rows)
    _jpg(sues / "unpaired_other_site" / "0.jpg", (48, 48), 9)

    folder, spec, groups, n_real = rb.real_gallery(root, tmp_path / "tiles", distractors=0, seed=0, sues=3)
    assert n_real == 6 and spec.tile_m == pytest.approx(32.0)  # the DOP's ground width
    tiles = {r["id"]: r for r in csv.DictReader((folder / "tiles.csv").open())}
    assert len(tiles) == 6 and all((folder / name).resolve().is_file() for name in tiles)
    assert [p.name for p in groups["SUES-200 (s0)"][0]] == ["150m_0.jpg", "150m_2.jpg", "200m_2.jpg"]  # lowest to highest
    assert groups["SUES-200 other site (not in the index)"][1][0].positives == ()
    (truth,) = groups["OrthoLoC urban_residential (hand truth)"][1]
    dop = next(name for name in tiles if name.endswith(".tif"))
    assert set(truth.positives) == {n for n in tiles if n.endswith(".tif")}
    # the truth sits at the hand-picked local point: (-17.84, -11.06) vs the DOP centre (-74, 78)
    east, north = rb.ORTHOLOC_HAND_TRUTH["east_m"] + 74.0, rb.ORTHOLOC_HAND_TRUTH["north_m"] - 78.0
    lat, lon = float(tiles[dop]["lat"]), float(tiles[dop]["lon"])
    assert float(geodesic_distance_m(truth.lat, truth.lon, lat, lon)) == pytest.approx(math.hypot(east, north), abs=0.05)
    assert truth.heading_deg == rb.ORTHOLOC_HAND_TRUTH["heading_deg"]
    # the index estimates a tile folder's tile side from the centres' spacing: it must be the DOP's width
    from cvgl.geo import typical_spacing_m

    lats, lons = (np.array([float(r[k]) for r in tiles.values()]) for k in ("lat", "lon"))
    assert typical_spacing_m(lats, lons) == pytest.approx(spec.tile_m, rel=0.01)
    _csv(ortho / "pairs.csv", ["sample", "uav_query", "orthophoto", "extra"],
         [["urban_residential", "urban_residential_query.jpg", "urban_residential_DOP.tif", "urban_residential_xDOP.tif"]])
    with pytest.raises(ValueError, match="tile spacing"):  # DOP + xDOP at one place, s0 alone on the grid: median ~0 m
        rb.real_gallery(root, tmp_path / "few", distractors=0, seed=0)
    l08 = groups["OrthoLoC L08 (own DOP)"][1][0]
    assert len(groups["OrthoLoC L08 (own DOP)"][1]) == 3 and l08.lat is None and len(l08.positives) == 1 and tiles[l08.positives[0]]  # judged by its own image


def test_real_section_renders_the_table_and_only_the_measured_targets() -> None:
    ortho = {"off": {**_summary(21.0, 1.0, verified=0.0, photos=1), "R@1(20m)": 0.0, "R@1(5m)": 0.0, "p90_m": 21.0,
                     "metric_photos": 1.0, "heading_median_deg": 5.7, "right": 1.0, "false_verified": 0.0, "seconds": 0.0},
             "on": {**_summary(1.2, 1.0, photos=1), "R@1(20m)": 1.0, "R@1(5m)": 1.0, "p90_m": 1.2, "metric_photos": 1.0,
                    "heading_median_deg": 0.5, "right": 1.0, "false_verified": 0.0, "seconds": 30.0}}
    text = rb.real_section({"OrthoLoC urban_residential (hand truth)": ortho}, "note", 12.0)
    assert "| OrthoLoC urban_residential (hand truth) | on | 1 | 1.00 | 1.2 |" in text
    assert "| OrthoLoC urban_residential | error ≤ 5 m | 1.2 | **met** | -3.8 m vs 5 m |" in text
    assert "Longmont" not in text and "verification time" not in text  # not measured there: not claimed


def test_record_seconds_notes_each_verification_and_keeps_its_result() -> None:
    from types import SimpleNamespace

    class Stage:  # Refiner.refine's signature
        def refine(self, view, rows, heading_hints=None):
            return SimpleNamespace(seconds=0.25 * len(rows), rows=rows, hints=heading_hints)

    stage = Stage()
    seconds = rb.record_seconds(stage)
    assert stage.refine("view", [1, 2]).rows == [1, 2] and stage.refine("view", [1, 2, 3, 4], [0.0] * 4).seconds == 1.0
    assert stage.refine("view", [5], [90.0]).hints == [90.0]  # what locate passes reaches the stage
    seconds.pop()
    assert seconds == [0.5, 1.0]
    again = rb.record_seconds(stage)  # wraps the class's method, not the previous wrapper
    stage.refine("view", [1])
    assert again == [0.25] and seconds == [0.5, 1.0]
