"""Qdrant backend in qdrant-client's local mode (a real server when CVGL_QDRANT_URL is set),
compared with the exact numpy reference, with and without the geographic prior."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("qdrant_client")

from cvgl.bench.scale import structured_dataset
from cvgl.geo import geodesic_distance_m
from cvgl.index.store import open_index, write_index
from cvgl.models.identity import EncoderIdentity
from cvgl.alignment import fit_alignment

IDENTITY = EncoderIdentity("gem", "dinov2_tiny_test", "random-0", (56, 56), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
N = 400  # local mode ingests point by point in Python: keep it small


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, np.ndarray, pd.DataFrame, np.ndarray]:
    raw, queries, _, _ = structured_dataset(N, queries=30, dim=32, clusters=12)
    side = int(np.ceil(np.sqrt(N)))
    rows, cols = np.divmod(np.arange(N), side)
    tiles = pd.DataFrame({"tile_id": [f"t{i}" for i in range(N)], "lat": 40.13 + rows * 3e-4, "lon": -105.15 + cols * 4e-4})
    path = tmp_path_factory.mktemp("qdrant") / "idx"
    write_index(path, raw, tiles, IDENTITY, fit_alignment("center", raw), index_type="qdrant")
    return path, raw, tiles, queries


def _numpy_top_k(index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    scores = index.alignment.apply(queries, "query") @ index.alignment.apply(index.raw, "reference").T
    if allowed is not None:
        keep = np.full(scores.shape[1], False)
        keep[allowed] = True
        scores = np.where(keep, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_local_mode_folder_is_self_contained(built) -> None:
    path, _, _, _ = built
    index = open_index(path, IDENTITY)
    assert index.index_type == "qdrant" and len(index) == N
    names = {p.name for p in path.iterdir()}
    if not os.environ.get("CVGL_QDRANT_URL"):
        assert "qdrant" in names and index.manifest.backend["server"] is False
    assert "vectors.faiss" not in names
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".idx.")]  # temp folder swapped away


def test_search_against_numpy_reference(built) -> None:
    path, _, _, queries = built
    index = open_index(path)
    scores, rows = index.search(queries, 10)
    want_scores, want_rows = _numpy_top_k(index, queries, 10)
    recall = _recall(rows, want_rows)
    print(f"\nqdrant ({'server' if os.environ.get('CVGL_QDRANT_URL') else 'local mode'}): recall@10 vs numpy = {recall:.3f}")
    assert recall >= 0.99
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)


def test_geo_radius_filter_against_numpy_reference(built) -> None:
    path, _, tiles, queries = built
    index = open_index(path)
    near, radius_km = (40.133, -105.145), 0.15
    distance = geodesic_distance_m(near[0], near[1], tiles["lat"].to_numpy(), tiles["lon"].to_numpy())
    inside = np.flatnonzero(distance <= radius_km * 1000)
    assert 10 < len(inside) < N // 3
    _, rows = index.search(queries, 10, near=near, radius_km=radius_km)
    assert np.isin(rows[rows >= 0], inside).all()
    _, want = _numpy_top_k(index, queries, 10, inside)
    recall = _recall(rows, want)
    print(f"\nqdrant GeoRadius {radius_km} km ({len(inside)} tiles): recall@10 vs numpy = {recall:.3f}")
    assert recall >= 0.99
    _, few = index.search(queries[:1], 10, near=near, radius_km=0.03)
    count = int((geodesic_distance_m(near[0], near[1], tiles["lat"].to_numpy(), tiles["lon"].to_numpy()) <= 30).sum())
    assert (few >= 0).sum() == min(count, 10) and (few[few < 0] == -1).all()


def test_rewriting_the_index_replaces_the_collection(built, tmp_path: Path) -> None:
    _, raw, tiles, queries = built
    raw, tiles, path = raw[:150], tiles[:150], tmp_path / "again"
    write_index(path, raw, tiles, IDENTITY, fit_alignment("none", raw), index_type="qdrant")
    first = open_index(path).search(queries[:3], 5)[1]
    write_index(path, raw[::-1].copy(), tiles, IDENTITY, fit_alignment("none", raw), index_type="qdrant")
    second = open_index(path).search(queries[:3], 5)[1]
    np.testing.assert_array_equal(second, len(raw) - 1 - first)  # rows reversed: the new collection answers
