"""The HTTP service (FastAPI TestClient): same answers as ``locate_images``, and clear 4xx errors.

A tiny random ViT and a 200 m synthetic GeoTIFF make the index in a second; the photo is a crop
of that raster written as a JPEG with EXIF GPS + DJI XMP, so the answer carries every field.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SIZE, textured_rgb, write_geotiff
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cvgl.data.metadata import CameraMetadata, write_camera_metadata
from cvgl.data.tiling import TilingSpec
from cvgl.index.build import build_index
from cvgl.index.store import open_index
from cvgl.locate import LocateOptions, locate_images
from cvgl.preprocess import QueryOptions
from cvgl.report import tile_image
from cvgl.service import create_app, detect_image_type, safe_name


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(index, encoder, photo path) for one tiny index, shared by the module's tests."""
    import torch

    from cvgl.models.factory import create_encoder

    folder = tmp_path_factory.mktemp("service")
    raster = write_geotiff(folder / "ortho.tif", textured_rgb(200, 200, seed=3))
    torch.manual_seed(0)
    encoder = create_encoder("gem", weights="random:dinov2_tiny_test", input_size=TINY_SIZE)
    index = open_index(build_index(raster, folder / "idx", encoder, TilingSpec(56, 28, 1.0), progress=False))
    crop = np.moveaxis(textured_rgb(200, 200, seed=3), 0, -1)[40:120, 60:140]
    photo = folder / "drone shot.jpg"
    meta = CameraMetadata(gps_lat=40.15, gps_lon=-105.15, gimbal_pitch_deg=-90.0, gimbal_yaw_deg=0.0, relative_altitude_m=50.0)
    write_camera_metadata(Image.fromarray(np.ascontiguousarray(crop)), photo, meta)
    return index, encoder, photo


@pytest.fixture(scope="module")
def client(served) -> TestClient:
    index, encoder, _ = served
    return TestClient(create_app(index, encoder, max_upload_mb=1.0))


def _post(client: TestClient, data: bytes, name: str = "p.jpg", fields: dict | None = None, query: str = ""):
    return client.post(f"/locate{query}", files={"image": (name, data, "application/octet-stream")}, data=fields or {})


def _encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_health_and_meta(client: TestClient, served) -> None:
    index, _, _ = served
    assert client.get("/health").json() == {"status": "ok", "index": "idx", "tiles": len(index), "encoder": "gem"}
    meta = client.get("/meta").json()
    assert meta["bounds"] == pytest.approx(index.manifest.overview_bounds)
    assert meta["overview"] is True and meta["tiles"] == len(index) and meta["tile_m"] == 56
    text = json.dumps(meta) + json.dumps(client.get("/health").json())
    assert str(index.path.parent) not in text and index.manifest.source.path not in text  # no server paths


@pytest.mark.parametrize(
    ("fields", "options"),
    [
        ({}, LocateOptions()),
        ({"heading": "30", "top_k": "3", "view": "drone"}, LocateOptions(QueryOptions(heading_deg=30.0), top_k=3)),
        ({"altitude": "", "pitch": "0", "hfov": "60", "top_k": "7"}, LocateOptions(QueryOptions(pitch_deg=0.0, hfov_deg=60.0), top_k=7)),
    ],
)
def test_locate_equals_locate_images(client: TestClient, served, fields: dict, options: LocateOptions) -> None:
    """The default answer is exactly ``cvgl locate``'s JSON object, with the upload's basename."""
    index, encoder, photo = served
    (answered,), _, _ = locate_images([photo], encoder, index, options, progress=False)
    expected = answered.to_dict()
    expected["query"] = photo.name
    response = _post(client, photo.read_bytes(), photo.name, fields)
    assert response.status_code == 200, response.text
    assert response.json() == json.loads(json.dumps(expected))
    assert list(response.json()) == list(expected)  # same keys, same order as the CLI prints


def test_heatmap_extra_is_the_score_ranking(client: TestClient, served) -> None:
    index, encoder, photo = served
    _, (scores,), _ = locate_images([photo], encoder, index, LocateOptions(), progress=False)
    body = _post(client, photo.read_bytes(), photo.name, query=f"?heatmap={len(index)}").json()
    heat = body["heatmap"]
    assert len(heat) == len(index)
    assert [h["score"] for h in heat] == pytest.approx(sorted(scores.tolist(), reverse=True))
    assert all(h["score"] == pytest.approx(float(scores[h["row"]])) for h in heat)
    assert body["top_k_rows"] == [h["row"] for h in heat[: len(body["top_k"])]]
    ids = index.tiles["tile_id"].tolist()
    assert [ids[r] for r in body["top_k_rows"]] == [t["tile_id"] for t in body["top_k"]]
    assert len(_post(client, photo.read_bytes(), query="?heatmap=4").json()["heatmap"]) == 4
    assert _post(client, photo.read_bytes(), query="?heatmap=-1").status_code == 422


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_other_image_types_are_located(client: TestClient, fmt: str) -> None:
    response = _post(client, _encoded(fmt), f"x.{fmt.lower()}")
    assert response.status_code == 200, response.text
    assert response.json()["query"] == f"x.{fmt.lower()}"


def test_upload_over_the_cap_is_413(served) -> None:
    index, encoder, _ = served
    small = TestClient(create_app(index, encoder, max_upload_mb=0.05))  # 52 kB
    big = _encoded("PNG", (400, 400)) + b"\0" * 60_000
    assert len(big) > 0.05 * 1024 * 1024
    response = _post(small, big, "big.png")
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    # No Content-Length (chunked): the stream is cut at the cap rather than read to the end.
    boundary = "cvglboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'.encode()

    def body():
        yield head
        for _ in range(100):  # 100 x 64 kB = 6.4 MB offered, far past the cap
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = small.post("/locate", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"hello, not an image at all", None),
        (b"GIF89a" + b"\0" * 100, None),
        (b"", None),
        (b"BM" + b"\0" * 100, None),
        (b"\xff\xd8\xff\xe0", "application/octet-stream"),  # not multipart at all
    ],
)
def test_wrong_type_is_415(client: TestClient, data: bytes, content_type: str | None) -> None:
    if content_type:
        response = client.post("/locate", content=data, headers={"Content-Type": content_type})
    else:
        response = _post(client, data, "thing.jpg")
    assert response.status_code == 415
    assert "\n" not in response.json()["detail"]


def test_undecodable_image_is_422_naming_only_the_upload(client: TestClient, served) -> None:
    _, _, photo = served
    truncated = photo.read_bytes()[:400]  # JPEG magic, then nothing decodable
    response = _post(client, truncated, "broken.jpg")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("broken.jpg: ") and "\n" not in detail
    assert "/" not in detail.split(":", 1)[0] and "cvgl-serve-" not in detail and "upload." not in detail


def test_tiny_image_is_422(client: TestClient) -> None:
    response = _post(client, _encoded("PNG", (10, 10)), "tiny.png")
    assert response.status_code == 422 and "too small" in response.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"pitch": "95"}, "pitch"),
        ({"pitch": "nan"}, "pitch"),
        ({"altitude": "0"}, "altitude"),
        ({"heading": "north"}, "heading"),
        ({"top_k": "0"}, "top_k"),
        ({"top_k": "2.5"}, "top_k"),
        ({"view": "satellite"}, "view"),
    ],
)
def test_bad_fields_are_422(client: TestClient, served, fields: dict, word: str) -> None:
    _, _, photo = served
    response = _post(client, photo.read_bytes(), "p.jpg", fields)
    assert response.status_code == 422 and response.json()["detail"].startswith(word)


def test_missing_file_field_is_422(client: TestClient) -> None:
    response = client.post("/locate", data={"heading": "3"}, files={"other": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")})
    assert response.status_code == 422 and "image" in response.json()["detail"]


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("../../../../etc/passwd.jpg", "passwd.jpg"),
        ("/tmp/absolute.jpg", "absolute.jpg"),
        ("C:\\Users\\me\\..\\photo.jpg", "photo.jpg"),
        ("..", "upload"),
        ("a/b/..", "upload"),
        ("..\\..\\win.jpg", "win.jpg"),
    ],
)
def test_client_paths_never_reach_the_filesystem(client: TestClient, served, tmp_path: Path, monkeypatch, name: str, shown: str) -> None:
    _, _, photo = served
    monkeypatch.chdir(tmp_path)
    response = _post(client, photo.read_bytes(), name)
    assert response.status_code == 200, response.text
    assert response.json()["query"] == shown
    assert list(tmp_path.iterdir()) == []  # nothing was written relative to the working folder


@given(st.text(max_size=300))
def test_safe_name_is_a_plain_basename(name: str) -> None:
    shown = safe_name(name)
    assert shown and len(shown) <= 120 and shown not in (".", "..")
    assert "/" not in shown and "\\" not in shown
    assert not any(ord(c) < 32 or ord(c) == 127 for c in shown)


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("JPEG", ".jpg"), ("PNG", ".png"), ("TIFF", ".tif"), ("WEBP", ".webp"), ("GIF", None), ("BMP", None)]
)
def test_detect_image_type_by_magic_bytes(fmt: str, suffix: str | None) -> None:
    assert detect_image_type(_encoded(fmt)[:16]) == suffix


def test_tiles_endpoint(client: TestClient, served) -> None:
    index, _, _ = served
    last = len(index) - 1
    for row in (0, last):
        response = client.get(f"/tiles/{row}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        served_pixels = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        assert np.array_equal(served_pixels, np.asarray(tile_image(index, row)))
    assert client.get(f"/tiles/{last + 1}.png").status_code == 404
    assert client.get("/tiles/-1.png").status_code == 404
    assert client.get("/tiles/abc.png").status_code == 422
    assert client.get("/tiles/..%2F..%2Fetc%2Fpasswd.png").status_code in (404, 422)


def test_page_and_overview(client: TestClient, served) -> None:
    index, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and 'id="map"' in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    overview = client.get("/overview.png")
    assert overview.status_code == 200
    assert overview.content == (index.path / "overview.png").read_bytes()


def test_benchmark_upload_body_is_what_a_browser_sends(client: TestClient, served) -> None:
    """``cvgl bench service`` builds its multipart body by hand: it must be answered like httpx's."""
    from cvgl.bench.service import multipart_body

    _, _, photo = served
    body, content_type = multipart_body("image", photo.name, photo.read_bytes())
    by_hand = client.post("/locate", content=body, headers={"Content-Type": content_type})
    assert by_hand.status_code == 200, by_hand.text
    assert by_hand.json() == _post(client, photo.read_bytes(), photo.name).json()


def test_heatmap_of_a_searched_index_is_finite_json(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A searched index scores only its candidates; the rest (-inf) stay out of the heatmap (and JSON)."""
    import math

    import cvgl.index.search

    index, encoder, photo = served
    monkeypatch.setattr(cvgl.index.search, "DENSE_MAX", 0)  # search it like a large index
    searched = TestClient(create_app(index, encoder, max_upload_mb=1.0, options=LocateOptions(candidates=5)))
    response = _post(searched, photo.read_bytes(), photo.name, query=f"?heatmap={len(index)}")
    assert response.status_code == 200, response.text
    body = response.json()
    heat = body["heatmap"]
    assert 0 < len(heat) < len(index) and all(math.isfinite(h["score"]) for h in heat)
    assert [h["score"] for h in heat] == sorted((h["score"] for h in heat), reverse=True)
    assert body["top_k_rows"] == [h["row"] for h in heat[: len(body["top_k"])]]
