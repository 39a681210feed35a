"""HTML map and retrieval-grid PNG on a tiny synthetic case (no network, no model)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvgl.viz import grid_size, write_map_html, write_retrieval_grid
from cvgl.viz.grid import FRAME
from cvgl.viz.maps import _normalised_heat

LAT0, LON0 = 40.16, -105.1


def _tiles() -> pd.DataFrame:
    lats = LAT0 + (np.arange(5) - 2) * 0.0009
    lons = LON0 + (np.arange(4) - 1.5) * 0.0012
    la, lo = np.meshgrid(lats, lons, indexing="ij")
    ids = [f"t{i:03d}" for i in range(20)]
    return pd.DataFrame({"tile_id": ids, "lat": la.ravel(), "lon": lo.ravel(), "crs": "EPSG:32613"})


def _result(tiles: pd.DataFrame, name: str, idx: list[int], truth: bool) -> dict:
    top = [
        {"tile_id": tiles.tile_id[j], "lat": float(tiles.lat[j]), "lon": float(tiles.lon[j]),
         "score": 0.9 - 0.1 * r}
        for r, j in enumerate(idx)
    ]
    res = {"query": name, "lat": top[0]["lat"] + 1e-5, "lon": top[0]["lon"], "confidence": 0.73,
           "heading_deg": 12.5 if truth else None, "top_k": top}
    if truth:
        res.update(error_m=42.25, true_lat=top[0]["lat"] + 3e-4, true_lon=top[0]["lon"] + 2e-4)
    return res


@pytest.fixture()
def case():
    rng = np.random.default_rng(0)
    tiles = _tiles()
    results = [
        _result(tiles, "drone/q_alpha.jpg", [3, 7, 11], truth=True),
        _result(tiles, "drone/q_beta `odd` <name>.jpg", [10, 2, 5], truth=False),
        {"query": "drone/q_broken.jpg", "error": "cannot decode image"},
    ]
    scores = [rng.random(20), rng.random(20), None]
    overview = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    bounds = (LAT0 - 0.0025, LON0 - 0.0025, LAT0 + 0.0025, LON0 + 0.0025)
    return tiles, results, scores, overview, bounds


def test_map_html_contents(tmp_path, case) -> None:
    tiles, results, scores, overview, bounds = case
    out = write_map_html(
        tmp_path / "sub" / "map.html", results, tiles, scores, overview, bounds, tile_m=90.0, title="demo run"
    )
    assert out == tmp_path / "sub" / "map.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["map.html"]  # no temp file left behind

    # Orthophoto embedded as a PNG overlay; OSM only a base layer.
    assert "L.imageOverlay(" in text and re.search(r'L\.imageOverlay\(\s*"data:image/png;base64,', text)
    assert "tile.openstreetmap.org" in text

    # One prediction marker per successful query; failed query listed in the legend, not drawn.
    assert text.count("L.marker(") == 2
    legend = text[text.index("id='cvgl-legend'") : text.index('id="cvgl-offline"')]
    assert "drone/q_broken.jpg" in legend and "cannot decode image" in legend

    # Popup words and values.
    popup_words = ("confidence", "heading", "error", "lat, lon", "q_alpha.jpg", "0.730", "12.5", "42.2 m", "n/a")
    for word in popup_words:
        assert word in text, word
    assert f"{results[0]['lat']:.6f}, {results[0]['lon']:.6f}" in text

    # Top-k squares (3 per query), truth line + marker, heatmap per query with scores, layer control.
    assert text.count("L.rectangle(") == 6
    assert text.count("L.polyline(") == 1
    assert text.count("L.heatLayer(") == 2
    assert "#1 tile t003 score 0.9000" in text
    assert text.count("L.featureGroup(") == 2 and "L.control.layers(" in text
    assert "<title>demo run</title>" in text

    # User text is escaped for HTML and for the JS template literals folium wraps it in.
    assert "`odd`" not in text and "<name>" not in text and "&#96;odd&#96; &lt;name&gt;" in text

    # Offline fallback: static preview + table, shown when Leaflet is missing.
    assert 'id="cvgl-offline"' in text and "data:image/jpeg;base64," in text
    assert 'typeof L === "undefined"' in text


def test_map_without_optional_inputs_uses_circles(tmp_path, case) -> None:
    tiles, results, _, _, _ = case
    out = write_map_html(tmp_path / "m.html", results, tiles)
    text = out.read_text(encoding="utf-8")
    assert "L.imageOverlay(" not in text and "L.heatLayer(" not in text and "L.rectangle(" not in text
    assert text.count("L.marker(") == 2
    assert text.count("L.circleMarker(") == 6 + 1  # 3 top-k per query + 1 truth


def test_map_only_first_group_visible_when_many(tmp_path) -> None:
    tiles = _tiles()
    results = [_result(tiles, f"q{i}.jpg", [i, i + 1, i + 2], truth=False) for i in range(7)]
    text = write_map_html(tmp_path / "m.html", results, tiles).read_text(encoding="utf-8")
    groups = re.findall(r"var (feature_group_\w+) = L\.featureGroup", text)
    assert len(groups) == 7
    shown = [g for g in groups if f"{g}.addTo(map_" in text]
    assert shown == groups[:1]


def test_map_rejects_misaligned_scores(tmp_path, case) -> None:
    tiles, results, _, _, _ = case
    with pytest.raises(ValueError, match="scores"):
        write_map_html(tmp_path / "m.html", results, tiles, scores=[np.zeros(20)])
    with pytest.raises(ValueError, match="20 rows"):
        write_map_html(tmp_path / "m.html", results, tiles, scores=[np.zeros(5), None, None])


def test_heat_normalisation() -> None:
    h = _normalised_heat(np.array([0.1, 0.2, 0.3, 0.5, np.nan]))
    assert h.min() == 0.0 and h.max() == pytest.approx(1.0)
    assert h[3] == pytest.approx(1.0) and h[0] == 0.0 and h[4] == 0.0
    assert not _normalised_heat(np.ones(4)).any()


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
