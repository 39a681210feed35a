"""Shared fixtures: a session-wide weights cache, tiny random-weight encoders, GeoTIFF writers."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

UTM = "EPSG:32613"
X0, Y0 = 487_000.0, 4_443_000.0  # Longmont, Colorado, in UTM 13N


@pytest.fixture(scope="session", autouse=True)
def _session_weights_cache(tmp_path_factory: pytest.TempPathFactory):
    """One fresh weights cache per test session.

    The embedded weights are converted and verified at most once per session (only if a `real`
    test asks for them), and a test run never reads nor writes the user's ~/.cache/cvgl: the real
    tests check a cache file written by the code under test, not one left by an older version.
    """
    previous = os.environ.get("CVGL_CACHE")
    os.environ["CVGL_CACHE"] = str(tmp_path_factory.mktemp("cvgl_cache"))
    yield
    if previous is None:
        os.environ.pop("CVGL_CACHE", None)
    else:
        os.environ["CVGL_CACHE"] = previous


TINY_SIZE = (56, 56)


@pytest.fixture
def tiny_encoder():
    """``tiny_encoder(preset="gem", seed=0)``: a 2-block random ViT/14 at 56x56 px.

    Random weights come from torch's global generator, so the seed fixes them: two encoders made
    with the same seed are the same model (same identity hash).
    """
    import torch

    from cvgl.models.factory import create_encoder

    def make(preset: str = "gem", seed: int = 0):
        torch.manual_seed(seed)
        return create_encoder(preset, weights="random:dinov2_tiny_test", input_size=TINY_SIZE)

    return make


def write_geotiff(
    path: Path,
    data: np.ndarray,
    crs: str | None = UTM,
    transform: Affine | None = None,
) -> Path:
    """Write a ``C x H x W`` array as a GeoTIFF (a plain TIFF when ``crs`` is None)."""
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name)
    if crs is not None:
        profile["crs"] = crs
        profile["transform"] = transform or Affine(1.0, 0.0, X0, 0.0, -1.0, Y0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
    return path


def textured_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB ``3 x H x W`` array with structure at several scales (not just noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            np.sin(xx / 7.0 + c) * np.cos(yy / 11.0 - c) + 0.5 * np.sin((xx + yy) / 23.0 * (c + 1))
            for c in range(3)
        ]
    )
    base += rng.normal(0.0, 0.2, base.shape)
    base = (base - base.min()) / (base.max() - base.min())
    return (base * 255).astype(np.uint8)


@pytest.fixture
def utm_geotiff(tmp_path: Path) -> Path:
    """A 200 x 200 px, 1 m, 8-bit RGB GeoTIFF in UTM 13N."""
    return write_geotiff(tmp_path / "ortho.tif", textured_rgb(200, 200))


@pytest.fixture
def plain_tiff(tmp_path: Path) -> Path:
    """An RGB TIFF without any CRS or geotransform."""
    return write_geotiff(tmp_path / "plain.tif", textured_rgb(120, 120, seed=1), crs=None)


@pytest.fixture
def one_faiss_thread():
    """OpenMP threads spin-wait: on a busy CI machine one faiss thread keeps index tests fast."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def textured_ground(seed: int, size: int = 384) -> np.ndarray:
    """An aerial-looking uint8 RGB image: smooth albedo, rectangles (roofs), lines (roads)."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.uniform(60, 190, (size // 16, size // 16)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = base + rng.normal(0, 6, (size, size)).astype(np.float32)
    for _ in range(size // 3):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(4, 22, 2)
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), float(rng.uniform(0, 255)), -1)
    for _ in range(size // 40):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), float(rng.uniform(0, 255)), int(rng.integers(2, 6)))
    img = cv2.GaussianBlur(np.clip(img, 0, 255), (3, 3), 0.8).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)
