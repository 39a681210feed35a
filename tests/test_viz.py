"""The offline HTML map (layers, basemaps, offline-ness) and the retrieval-grid PNG, on small
cases made in code: answers that validate against the published answer schema, a tile-folder
index built with a tiny random ViT. The same map in a real browser: tests/test_map_browser.py."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvgl.errors import InputError
from cvgl.geo import geodesic_distance_m, offset_latlon
from cvgl.viz import grid_size, write_map_html, write_retrieval_grid
from cvgl.viz.assets import LEAFLET, leaflet_version
from cvgl.viz.basemap import MOSAIC_PX, embedded_mosaic, mosaic_rows, overview_basemap
from cvgl.viz.grid import FRAME
from cvgl.viz.layers import LAYER_ORDER, track_layer
from cvgl.viz.maps import map_data

LAT0, LON0 = 40.16, -105.1
TILE_M = 100.0
SCHEMA = json.loads((resources.files("cvgl.schemas") / "answer-1.schema.json").read_text(encoding="utf-8"))


def grid_tiles() -> pd.DataFrame:
    """A 5 x 4 grid of tile centres 100 m apart around Longmont."""
    north, east = np.meshgrid((np.arange(5) - 2) * TILE_M, (np.arange(4) - 1.5) * TILE_M, indexing="ij")
    lat, lon = offset_latlon(LAT0, LON0, east.ravel(), north.ravel())
    return pd.DataFrame({"tile_id": [f"t{i:03d}" for i in range(20)], "lat": lat, "lon": lon})


def answer(tiles: pd.DataFrame, name: str, rows: list[int], **fields) -> dict:
    """A located answer on ``tiles`` (top-k = ``rows``), with ``fields`` overriding any key."""
    top = [{"rank": r + 1, "tile_id": tiles.tile_id[j], "lat": float(tiles.lat[j]), "lon": float(tiles.lon[j]),
            "score": 0.95 - 0.01 * r} for r, j in enumerate(rows)]
    out = {
        "schema": "cvgl.answer/1", "query": name, "status": "located", "reason": None,
        "lat": top[0]["lat"] + 1e-4, "lon": top[0]["lon"], "crs": "EPSG:32613", "x": 487000.0, "y": 4443000.0,
        "uncertainty_m": TILE_M / 2**0.5, "position_source": "retrieval", "confidence": 0.45,
        "confidence_radius_m": TILE_M / 2**0.5, "confidence_model": "test", "heading_deg": 12.5,
        "heading_source": "metadata", "pitch_deg": 0.0, "altitude_m": 100.0, "camera": None, "footprint": None,
        "verification": None, "top_k": top, "alignment": "none", "truth": None, "labels": {},
    }
    out.update(fields)
    return out


def rich_case() -> dict:
    """Every kind of answer and every layer: verified oblique (footprint, camera, truth with its
    centre), retrieval with GPS, no confidence, not in the index, skipped; scores; two tracks."""
    tiles = grid_tiles()
    t = tiles.iloc
    footprint = [{"lat": float(t[5].lat) + dy, "lon": float(t[5].lon) + dx}
                 for dy, dx in ((4e-4, -5e-4), (4e-4, 5e-4), (-4e-4, 5e-4), (-4e-4, -5e-4))]
    answers = [
        answer(tiles, "drone/oblique_1.jpg", [5, 6, 9], confidence=0.91, position_source="verified", uncertainty_m=8.0,
               confidence_radius_m=8.0, heading_source="verified", pitch_deg=40.0, footprint=footprint,
               camera={"lat": float(t[1].lat), "lon": float(t[1].lon)},
               verification={"verified": True, "matcher": "test", "tile_id": "t005", "inliers": 143, "inlier_ratio": 0.6,
                             "reprojection_error_px": 1.2, "candidates": 3},
               truth={"lat": float(t[1].lat) + 2e-4, "lon": float(t[1].lon), "center_lat": float(t[5].lat) + 1e-4,
                      "center_lon": float(t[5].lon), "error_m": 22.2}, labels={"family": "oblique-heading"}),
        answer(tiles, "drone/nadir_2.jpg", [12, 13, 16], truth={"lat": float(t[13].lat), "lon": float(t[13].lon), "error_m": 100.0}),
        answer(tiles, "drone/no_conf </script><script>alert(1)</script> <!--.jpg", [3, 2, 7], confidence=None,
               confidence_radius_m=None),
        answer(tiles, "elsewhere.jpg", [18, 0, 19], status="not_found", confidence=0.02,
               reason="scores are no better than for photos of other places",
               truth={"lat": LAT0 + 0.01, "lon": LON0, "error_m": 1100.0}),
        {"schema": "cvgl.answer/1", "query": "broken.jpg", "status": "skipped", "reason": "broken.jpg: cannot decode image"},
    ]
    for a in answers:
        jsonschema.validate(a, SCHEMA)
    rng = np.random.default_rng(0)
    scores = [0.80 + 0.15 * rng.random(20), 0.960 + 0.003 * rng.random(20), 0.9 * rng.random(20), rng.random(20) - 0.5, None]
    tracks = [
        {"name": "flight A", "points": [[a["lat"], a["lon"]] for a in answers[:3]],
         "truth": [[float(t[j].lat), float(t[j].lon)] for j in (5, 13, 3)]},
        {"name": "flight B", "points": [[float(t[j].lat), float(t[j].lon)] for j in (0, 4, 8, 12)], "truth": None},
    ]
    bounds = (float(tiles.lat.min()) - 1e-3, float(tiles.lon.min()) - 1e-3, float(tiles.lat.max()) + 1e-3, float(tiles.lon.max()) + 1e-3)
    overview = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    return {"tiles": tiles, "answers": answers, "scores": scores, "tracks": tracks,
            "basemap": overview_basemap(overview, bounds), "bounds": bounds}


def write_rich_map(path: Path) -> Path:
    case = rich_case()
    return write_map_html(path, case["answers"], tile_m=TILE_M, basemap=case["basemap"], scores=case["scores"],
                          tiles=case["tiles"], tracks=case["tracks"], title="rich case")


def data_block(text: str) -> dict:
    """The JSON the page draws, read back from the written file."""
    match = re.search(r'<script id="cvgl-data" type="application/json">(.*?)</script>', text, re.DOTALL)
    return json.loads(match.group(1))


def _kinds(layer: dict) -> list[str]:
    return [f["properties"]["kind"] for f in layer["features"]]


def test_every_layer_of_a_rich_answer_set() -> None:
    case = rich_case()
    data = map_data(case["answers"], tile_m=TILE_M, basemap=case["basemap"], scores=case["scores"],
                    tiles=case["tiles"], tracks=case["tracks"], title="rich case", heat_tiles=7)
    layers = data["layers"]
    assert list(layers) == list(LAYER_ORDER)
    predictions = layers["predictions"]["features"]
    assert [p["properties"]["query"] for p in predictions] == [0, 1, 2, 3]  # the skipped photo is not drawn
    assert [p["properties"]["status"] for p in predictions] == ["located"] * 3 + ["not_found"]
    assert predictions[0]["properties"]["confidence"] == 0.91 and predictions[2]["properties"]["confidence"] is None
    assert predictions[0]["geometry"]["coordinates"] == [round(case["answers"][0]["lon"], 7), round(case["answers"][0]["lat"], 7)]
    assert [f["properties"]["radius_m"] for f in layers["uncertainty"]["features"]] == [8.0] + [TILE_M / 2**0.5] * 3

    # Top-k: squares of the tile size at the tile centres, by rank.
    top = layers["top_k"]["features"]
    assert len(top) == 12 and [f["properties"]["rank"] for f in top[:3]] == [1, 2, 3]
    ring = top[0]["geometry"]["coordinates"][0]
    assert len(ring) == 5 and ring[0] == ring[-1]
    (lon_nw, lat_nw), (lon_ne, lat_ne), (lon_se, lat_se) = ring[:3]
    assert geodesic_distance_m(lat_nw, lon_nw, lat_ne, lon_ne) == pytest.approx(TILE_M, rel=1e-3)
    assert geodesic_distance_m(lat_ne, lon_ne, lat_se, lon_se) == pytest.approx(TILE_M, rel=1e-3)
    centre = np.mean(ring[:4], axis=0)
    assert centre == pytest.approx([case["tiles"].lon[5], case["tiles"].lat[5]], abs=1e-7)

    footprint = layers["footprints"]["features"]
    assert len(footprint) == 1 and footprint[0]["properties"]["inliers"] == 143
    assert footprint[0]["geometry"]["coordinates"][0][:4] == [[round(c["lon"], 7), round(c["lat"], 7)] for c in case["answers"][0]["footprint"]]
    assert _kinds(layers["cameras"]) == ["camera", "sight"]
    assert _kinds(layers["truth"]) == ["gps", "centre", "gps", "gps"]
    errors = layers["errors"]["features"]
    assert [f["properties"]["query"] for f in errors] == [0, 1, 3]
    camera = case["answers"][0]["camera"]
    assert errors[0]["geometry"]["coordinates"][0] == [round(camera["lon"], 7), round(camera["lat"], 7)]  # measured from the camera

    # Heat: each drawn photo's best tiles with their own (absolute) scores, weakest first.
    heat = layers["heat"]["features"]
    assert sorted({f["properties"]["query"] for f in heat}) == [0, 1, 2, 3]
    first = [f["properties"]["score"] for f in heat if f["properties"]["query"] == 1]
    assert len(first) == 7 and first == sorted(first)
    assert first[-1] == pytest.approx(case["scores"][1].max(), abs=1e-5)  # not stretched to [0, 1]

    assert _kinds(layers["tracks"]) == ["track", "track-truth", "track"]
    legend = data["legend"]
    assert legend["counts"] == {"located": 3, "not_found": 1, "skipped": 1}
    assert legend["skipped"] == [{"name": "broken.jpg", "reason": "broken.jpg: cannot decode image"}]
    s, w, n, e = data["bounds"]
    south, west, _, east = case["bounds"]
    assert (s, w, n, e) == pytest.approx((south, west, LAT0 + 0.01, east))  # orthophoto + the far-away GPS


def test_written_map_is_one_offline_file(tmp_path: Path) -> None:
    out = write_rich_map(tmp_path / "sub" / "map.html")
    assert [p.name for p in out.parent.iterdir()] == ["map.html"]  # written atomically: no temp file left
    text = out.read_text(encoding="utf-8")
    assert "<title>rich case</title>" in text
    # Nothing is loaded from anywhere: no external script, stylesheet, image or import...
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=", text, re.IGNORECASE) and "<link" not in text.lower()
    assert "@import" not in text and not re.search(r"url\(\s*['\"]?(https?:|//)", text)
    # ...the only web addresses (besides bug links in Leaflet's CSS comments) are the SVG namespace
    # and Leaflet's attribution link, which is not fetched...
    uncommented = re.sub(r"/\*.*?\*/", "", text.split("</style>")[0], flags=re.DOTALL) + text.split("</style>")[1]
    assert set(re.findall(r"https?://[^\s\"'<>)\\]+", uncommented)) <= {"http://www.w3.org/2000/svg", "https://leafletjs.com"}
    # ...and the page's Content-Security-Policy forbids every request: scripts only by hash.
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text).group(1)
    assert "default-src 'none'" in csp and "img-src data:" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    scripts = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
    assert len(scripts) == 4 and "L.version" not in scripts[1]  # Leaflet, then style, layers, page
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert f't.version="{leaflet_version()}"' in scripts[0] and "sourceMappingURL" not in scripts[0]  # VERSION says which
    # Leaflet's icons are data: URIs; the orthophoto is an embedded JPEG.
    assert "url(images/" not in text and "url(data:image/png;base64," in text
    data = data_block(text)
    assert data["basemap"]["kind"] == "image" and data["basemap"]["url"].startswith("data:image/jpeg;base64,")
    # A file name that tries to close the data block stays inside it, as text.
    assert data["layers"]["predictions"]["features"][2]["properties"]["path"] == rich_case()["answers"][2]["query"]
    assert text.count("<script") == 5


def test_leaflet_is_vendored_with_its_licence() -> None:
    assert leaflet_version() == "1.9.4"
    assert (LEAFLET / "LICENSE").read_text().startswith("BSD 2-Clause License")
    digest = hashlib.sha256((LEAFLET / "leaflet.js").read_bytes()).hexdigest()
    assert digest in (LEAFLET / "VERSION").read_text()  # the file is the release, unchanged


def test_written_map_size_is_small(tmp_path: Path) -> None:
    out = write_rich_map(tmp_path / "map.html")
    assert out.stat().st_size < 400_000  # Leaflet (~150 kB) + a small orthophoto + the layers


def test_map_without_basemap_or_tile_size_still_draws(tmp_path: Path) -> None:
    case = rich_case()
    data = map_data(case["answers"][1:2])
    assert data["basemap"] is None and data["layers"]["heat"]["features"] == []
    assert {f["geometry"]["type"] for f in data["layers"]["top_k"]["features"]} == {"Point"}  # no size: centres
    s, w, n, e = data["bounds"]
    assert n - s >= 1e-3 - 1e-12 and e - w >= 1e-3 - 1e-12
    with pytest.raises(ValueError, match="nothing to map"):
        map_data([case["answers"][-1]])  # only a skipped photo


def test_map_rejects_inconsistent_inputs() -> None:
    case = rich_case()
    with pytest.raises(ValueError, match="scores has 1 entries"):
        map_data(case["answers"], scores=[np.zeros(20)], tiles=case["tiles"])
    with pytest.raises(ValueError, match="20 tiles"):
        map_data(case["answers"][:1], scores=[np.zeros(5)], tiles=case["tiles"])
    with pytest.raises(ValueError, match="need the index's tiles"):
        map_data(case["answers"][:1], scores=[np.zeros(20)])
    with pytest.raises(ValueError, match="track 'bad'"):
        track_layer([{"name": "bad", "points": [[95.0, 0.0]]}])


def test_mosaic_rows_prefers_the_answers_tiles() -> None:
    assert mosaic_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    rows = mosaic_rows(1000, 20, prefer=[999, 500, 500])
    assert len(rows) == 20 and {999, 500} <= set(rows.tolist()) and rows.tolist() == sorted(rows.tolist())


def test_mosaic_embeds_tiles_or_says_why_not() -> None:
    tiles = grid_tiles()
    read = []

    def read_tile(row: int) -> np.ndarray:
        read.append(row)
        return np.full((300, 200, 3), row * 10, np.uint8)

    mosaic = embedded_mosaic(tiles, read_tile, TILE_M)
    features = mosaic["tiles"]["features"]
    assert mosaic["kind"] == "mosaic" and mosaic["note"] is None and len(features) == 20 and read == list(range(20))
    image = Image.open(io.BytesIO(base64.b64decode(features[3]["properties"]["url"].split(",", 1)[1])))
    assert image.format == "JPEG" and max(image.size) == MOSAIC_PX and np.asarray(image).mean() == pytest.approx(30, abs=2)

    def gone(row: int) -> np.ndarray:
        read.append(row)
        raise InputError("/data/tiles: the index's source tile-folder is missing (moved or deleted); tiles cannot be shown")

    read.clear()
    mosaic = embedded_mosaic(tiles, gone, TILE_M)
    assert read == [0]  # tried once, not once per tile
    assert all(f["properties"]["url"] is None for f in mosaic["tiles"]["features"]) and len(mosaic["tiles"]["features"]) == 20
    assert mosaic["note"].startswith("tile pixels unavailable: /data/tiles: the index's source tile-folder is missing")


@pytest.fixture
def folder_index(tmp_path: Path, tiny_encoder):
    """A tile-folder index of 6 tiles 60 m apart (no overview raster; tile size estimated)."""
    from cvgl.index.build import build_index
    from cvgl.index.store import open_index

    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(1)
    rows = ["id,lat,lon"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
        lat, lon = offset_latlon(LAT0, LON0, 60.0 * (i % 3), 60.0 * (i // 3))
        rows.append(f"t{i}.png,{lat},{lon}")
    (folder / "tiles.csv").write_text("\n".join(rows) + "\n")
    return folder, open_index(build_index(folder, tmp_path / "idx", tiny_encoder(), progress=False))


def test_tile_folder_map_shows_its_tiles(tmp_path: Path, folder_index, capsys) -> None:
    from cvgl.report import write_visuals

    folder, index = folder_index
    assert index.overview() is None and index.manifest.tile_m_estimated
    answers = [answer(index.tiles, "p.jpg", [4, 1, 0])]
    jsonschema.validate(answers[0], SCHEMA)
    out = tmp_path / "map.html"
    write_visuals(answers, [np.linspace(0.5, 0.9, 6)], index, map_path=out)
    data = data_block(out.read_text(encoding="utf-8"))
    tiles = data["basemap"]["tiles"]["features"]
    assert data["basemap"]["kind"] == "mosaic" and len(tiles) == 6
    assert all(t["properties"]["url"].startswith("data:image/jpeg;base64,") for t in tiles)
    assert data["legend"]["tile_m_estimated"] is True and data["legend"]["tile_m"] == pytest.approx(60, rel=0.05)
    assert len(data["layers"]["heat"]["features"]) == 6

    shutil.rmtree(folder)  # the source is gone: tiles are outlines at their coordinates, and we say why
    write_visuals(answers, [None], index, map_path=out)
    data = data_block(out.read_text(encoding="utf-8"))
    assert all(t["properties"]["url"] is None for t in data["basemap"]["tiles"]["features"])
    assert "missing" in data["legend"]["note"] and "missing" in capsys.readouterr().err


def test_retrieval_grid_from_answers(tmp_path: Path, folder_index) -> None:
    from cvgl.report import grid_rows

    _, index = folder_index
    t = index.tiles
    answers = [
        answer(t, "a.jpg", [4, 1], truth={"lat": float(t.lat[4]), "lon": float(t.lon[4]), "error_m": 3.0}),
        answer(t, "b.jpg", [2, 3], pitch_deg=40.0, truth={"lat": float(t.lat[2]), "lon": float(t.lon[2]), "error_m": 3.0}),
        {"schema": "cvgl.answer/1", "query": "c.jpg", "status": "skipped", "reason": "c.jpg: unreadable"},
    ]
    photo = np.zeros((32, 32, 3), np.uint8)
    rows = grid_rows(answers, index, [photo, photo, None])
    assert [r["query_name"] for r in rows] == ["a.jpg", "b.jpg"]
    assert rows[0]["correct"] == [True, False]
    assert rows[1]["correct"] == [None, None]  # oblique: its GPS is the camera, not what the tiles show
    np.testing.assert_array_equal(rows[0]["tiles"][0], index.tile_image(4))


def _img(colour, shape=(96, 128)) -> np.ndarray:
    a = np.zeros((*shape, 3), np.uint8)
    a[...] = colour
    return a


def test_retrieval_grid_png(tmp_path) -> None:
    rows = [
        {"query_image": _img((200, 50, 50)), "query_name": "q_alpha.jpg",
         "tiles": [_img((0, 0, 0)), _img((0, 0, 0)), _img((0, 0, 0))],
         "scores": [0.91, 0.85, 0.5], "correct": [True, False, None]},
        {"query_image": _img((50, 50, 200), (200, 100)), "query_name": "q_beta.jpg",
         "tiles": [_img((90, 90, 90), (64, 64))] * 3, "scores": [0.7, 0.6, 0.55],
         "correct": [None, None, None]},
    ]
    cell = 100
    out = write_retrieval_grid(tmp_path / "g" / "grid.png", rows, cell=cell)
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["grid.png"]
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == grid_size(2, 3, cell) == (8 + 4 * (cell + 8), 30 + 2 * (cell + 22 + 8) + 8)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    from cvgl.viz.grid import PAD, TITLE_H

    def frame_pixel(k: int) -> np.ndarray:  # middle of the left frame edge of tile k in row 0
        x = PAD + (k + 1) * (cell + PAD) + FRAME // 2
        return rgb[TITLE_H + cell // 2, x]

    green, red, none = frame_pixel(0), frame_pixel(1), frame_pixel(2)
    assert green[1] > 120 and green[0] < 60
    assert red[0] > 180 and red[1] < 60
    assert none.max() < 60  # black tile shows through: no frame when correctness is unknown


def test_retrieval_grid_caps_rows(tmp_path) -> None:
    row = {"query_image": _img((10, 10, 10)), "query_name": "q.jpg", "tiles": [_img((1, 2, 3))] * 2,
           "scores": [0.5, 0.4], "correct": [None, True]}
    out = write_retrieval_grid(tmp_path / "g.png", [row] * 5, max_rows=3, cell=64)
    with Image.open(out) as im:
        assert im.size == grid_size(3, 2, 64)
