"""The written map file in real headless Chromium, opened from disk: what is drawn, and nothing fetched.

Loads the rich case of ``test_viz`` (every layer) and a tile-folder mosaic, and asserts what is on
the page: markers, circles, squares, polygons and lines by their ``cvgl-*`` classes, the legend
entries, colours on the absolute score scale, no console error (a blocked request would be one:
the file's Content-Security-Policy forbids them) and no request to any http(s) address.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them as root); the
helpers here are shared with ``test_service_browser``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from test_viz import TILE_M, answer, grid_tiles, write_rich_map

from cvgl.errors import InputError
from cvgl.viz import write_map_html
from cvgl.viz.basemap import embedded_mosaic

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
)
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def require_browser() -> None:
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("browser tests need selenium (make install)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} missing: apt-get install -y chromium chromium-driver (make browser does this as root)")


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator:
    """A headless Chromium that records console messages and network requests."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_problems(driver) -> list[str]:
    """Console errors and warnings since the last call (CSP violations are errors)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def outside_requests(driver) -> list[str]:
    """Web requests since the last call to anywhere but this machine (browser-internal pages aside)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    web = [u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")]
    return [u for u in web if urlparse(u).hostname not in LOCAL_HOSTS]


def wait_ready(driver, timeout_s: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def count(driver, css: str) -> int:
    return len(driver.find_elements("css selector", css))


def rgb(colour: str) -> tuple[int, ...]:
    """An SVG fill ("#1a9850" or "rgb(1, 2, 3)") as a tuple of ints."""
    if colour.startswith("#"):
        return tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))
    return tuple(int(v) for v in re.findall(r"\d+", colour)[:3])


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    require_browser()
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def test_rich_map_shows_every_layer_offline(browser, tmp_path: Path) -> None:
    path = write_rich_map(tmp_path / "map.html")
    browser.get(path.as_uri())
    wait_ready(browser)
    expected = {
        ".cvgl-prediction": 4, ".cvgl-status-not_found": 1, ".cvgl-uncertainty": 4, ".cvgl-candidate": 12,
        ".cvgl-footprint": 1, ".cvgl-camera": 1, ".cvgl-sight": 1, ".cvgl-truth": 3, ".cvgl-truth-centre": 1,
        ".cvgl-error": 3, ".cvgl-track": 2, ".cvgl-track-truth": 1, ".cvgl-heat": 20, "img.cvgl-orthophoto": 1,
    }
    assert {css: count(browser, css) for css in expected} == expected
    assert browser.execute_script("const i = document.querySelector('img.cvgl-orthophoto'); return i.complete && i.naturalWidth") == 80

    legend = browser.find_element("id", "cvgl-legend")
    keys = {e.get_attribute("data-key") for e in legend.find_elements("css selector", ".cvgl-legend-entry")}
    assert keys == {"predictions", "uncertainty", "top_k", "heat", "footprints", "truth", "errors", "cameras", "tracks"}
    text = legend.text
    for words in ("rich case", "5 photos: 3 located, 1 not in this index, 1 skipped", "broken.jpg", "cannot decode image",
                  "0.80", "1.00 (cosine, fixed scale)", "tiles 100 m"):
        assert words in text, words

    # Colours: by confidence bin, grey when not in the index.
    fills = browser.execute_script(
        "const out = {}; cvglMap.layers.predictions.eachLayer(l => { out[l.feature.properties.query] = l.getElement().getAttribute('fill'); }); return out;")
    assert fills == {"0": "#1a9850", "1": "#f4a300", "2": "#1f4e9e", "3": "#7f7f7f"}

    # Clicking photo 2 shows its heat and its facts. Its scores are near-equal (0.960-0.963), and on
    # the absolute scale they look near-equal, not stretched into a hotspot.
    browser.execute_script("cvglMap.layers.predictions.eachLayer(l => { if (l.feature.properties.query === 1) l.fire('click'); });")
    heat = [rgb(e.get_attribute("fill")) for e in browser.find_elements("css selector", ".cvgl-heat")]
    assert len(heat) == 20
    spread = np.ptp(np.array(heat), axis=0)
    assert spread.max() <= 12, spread
    popup = browser.find_element("css selector", ".leaflet-popup-content").text
    assert "drone/nadir_2.jpg" in popup and "0.450 (within 71 m)" in popup and "error vs GPS" in popup

    assert console_problems(browser) == []
    assert outside_requests(browser) == []


def test_tile_folder_map_shows_its_tiles_or_their_outlines(browser, tmp_path: Path) -> None:
    tiles = grid_tiles()
    answers = [answer(tiles, "p.jpg", [5, 6, 9])]

    def read_tile(row: int) -> np.ndarray:
        return np.full((120, 120, 3), 12 * row, np.uint8)

    mosaic = embedded_mosaic(tiles, read_tile, TILE_M)
    path = write_map_html(tmp_path / "folder.html", answers, tile_m=TILE_M, tile_m_estimated=True, basemap=mosaic)
    browser.get(path.as_uri())
    wait_ready(browser)
    assert count(browser, "img.cvgl-tile") == 20 and count(browser, ".cvgl-tile-outline") == 0
    assert browser.execute_script("return [...document.querySelectorAll('img.cvgl-tile')].every(i => i.complete && i.naturalWidth > 0)")
    assert "tiles \u2248100 m (estimated from tile spacing)" in browser.find_element("id", "cvgl-legend").text

    def gone(row: int) -> np.ndarray:
        raise InputError("tiles/: the index's source tile-folder is missing (moved or deleted)")

    path = write_map_html(tmp_path / "gone.html", answers, tile_m=TILE_M, basemap=embedded_mosaic(tiles, gone, TILE_M))
    browser.get(path.as_uri())
    wait_ready(browser)
    assert count(browser, "img.cvgl-tile") == 0 and count(browser, ".cvgl-tile-outline") == 20
    assert "tile pixels unavailable: tiles/: the index's source tile-folder is missing" in browser.find_element("id", "cvgl-legend").text
    assert console_problems(browser) == []
    assert outside_requests(browser) == []
