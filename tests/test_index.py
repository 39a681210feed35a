"""Reference index: round trip, search against brute force, encoder checks, atomic writes, building."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import rasterio

from cvgl.alignment import DEFAULT_KIND, fit_alignment
from cvgl.data.tiling import TilingSpec
from cvgl.errors import IndexFormatError, IndexMismatchError, InputError
from cvgl.index.build import build_index
from cvgl.index.store import FILES, open_index, write_index
from cvgl.models.identity import EncoderIdentity

IDENTITY_DICT = {
    "preset": "gem",
    "arch": "dinov2_tiny_test",
    "weights_sha256": "random-0123456789abcdef",
    "input_size": [56, 56],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "head": {"pools": [{"kind": "gem", "layer": -1}], "final_norm": True},
}
IDENTITY = EncoderIdentity.from_dict(IDENTITY_DICT)


def _data(n: int = 60, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    raw = (rng.normal(size=(n, dim)) + rng.normal(size=dim)).astype(np.float32)
    tiles = pd.DataFrame(
        {
            "tile_id": [f"r{i // 10:02d}_c{i % 10:02d}" for i in range(n)],
            "lat": 40.13 + rng.uniform(0, 0.01, n),
            "lon": -105.14 + rng.uniform(0, 0.01, n),
        }
    )
    return raw, tiles


def _write(path: Path, seed: int = 0, kind: str = "center", **kwargs) -> tuple[Path, np.ndarray, pd.DataFrame]:
    raw, tiles = _data(seed=seed)
    write_index(path, raw, tiles, IDENTITY, fit_alignment(kind, raw), **kwargs)
    return path, raw, tiles


def brute_force_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# ------------------------------------------------------------------------------ store


@pytest.mark.parametrize("kind", ["none", "center", "pca-whiten"])
def test_round_trip(tmp_path: Path, kind: str) -> None:
    path, raw, tiles = _write(tmp_path / "idx", kind=kind, extra={"tile_m": 56.0})
    index = open_index(path, IDENTITY)
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    assert len(index) == 60
    np.testing.assert_array_equal(index.raw, raw)
    pd.testing.assert_frame_equal(index.tiles, tiles)
    assert index.manifest.encoder == IDENTITY
    assert index.manifest.count == 60
    assert index.manifest.dim == 24
    assert index.manifest.tile_m == 56.0
    assert index.manifest.alignment["kind"] == kind
    assert index.alignment.kind == kind
    np.testing.assert_allclose(index.reference, index.alignment.apply(raw, "reference"), rtol=1e-6, atol=1e-6)
    assert index.overview() is None


def test_overview_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    bounds = (40.13, -105.15, 40.14, -105.13)
    path, _, _ = _write(tmp_path / "idx", overview=(image, bounds))
    got = open_index(path).overview()
    assert got is not None
    np.testing.assert_array_equal(got[0], image)
    assert got[1] == pytest.approx(bounds)


@pytest.mark.parametrize("kind", ["none", "center", "pca-whiten"])
@pytest.mark.parametrize("k", [1, 5, 60, 100])
def test_search_equals_brute_force(tmp_path: Path, kind: str, k: int) -> None:
    path, raw, _ = _write(tmp_path / "idx", kind=kind)
    index = open_index(path)
    queries = np.random.default_rng(1).normal(size=(9, 24)).astype(np.float32) + raw.mean(0)
    scores, rows = index.search(queries, k)

    aligned_q = index.alignment.apply(queries, "query")
    aligned_r = index.alignment.apply(raw, "reference")
    expected_scores, expected_rows = brute_force_top_k(aligned_q @ aligned_r.T, min(k, 60))
    assert rows.shape == (9, min(k, 60))
    np.testing.assert_array_equal(rows, expected_rows)  # continuous random data: no ties
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_scores_equal_aligned_products(tmp_path: Path) -> None:
    path, raw, _ = _write(tmp_path / "idx", kind="pca-whiten")
    index = open_index(path)
    queries = np.random.default_rng(2).normal(size=(5, 24)).astype(np.float32)
    expected = index.alignment.apply(queries, "query") @ index.alignment.apply(raw, "reference").T
    got = index.exact_scores(queries)
    assert got.shape == (5, 60)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # consistent with search: the best score is the top-1 hit
    top_scores, top_rows = index.search(queries, 1)
    np.testing.assert_array_equal(top_rows[:, 0], got.argmax(1))
    np.testing.assert_allclose(top_scores[:, 0], got.max(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["weights_sha256", "arch", "input_size", "head", "mean"])
def test_check_encoder_refuses_other_identity(tmp_path: Path, key: str) -> None:
    path, _, _ = _write(tmp_path / "my_index")
    other = json.loads(json.dumps(IDENTITY_DICT))
    other[key] = {"weights_sha256": "random-ffff", "arch": "dinov2_vits14", "input_size": [224, 224],
                  "head": {"pools": [{"kind": "cls", "layer": -1}], "final_norm": True}, "mean": [0.5, 0.5, 0.5]}[key]
    with pytest.raises(IndexMismatchError) as info:
        open_index(path, EncoderIdentity.from_dict(other))
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert "\n" not in message
    index = open_index(path)
    with pytest.raises(IndexMismatchError, match="my_index"):
        index.check_encoder(EncoderIdentity.from_dict(other))
    index.check_encoder(EncoderIdentity.from_dict(json.loads(json.dumps(IDENTITY_DICT))))  # the same identity passes


def test_check_encoder_ignores_preset_name(tmp_path: Path) -> None:
    """Only what changes the vectors counts: a renamed preset with the same recipe is accepted."""
    path, _, _ = _write(tmp_path / "idx")
    open_index(path, EncoderIdentity.from_dict({**IDENTITY_DICT, "preset": "my-gem"}))


@pytest.mark.parametrize("missing", FILES)
def test_incomplete_folder(tmp_path: Path, missing: str) -> None:
    path, _, _ = _write(tmp_path / "idx")
    (path / missing).unlink()
    with pytest.raises(IndexFormatError) as info:
        open_index(path)
    assert missing in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("corrupt", [name for name in FILES if name != "manifest.json"])
def test_corrupt_file_is_index_format_error(tmp_path: Path, corrupt: str) -> None:
    """A damaged index is reported as one (naming the folder), not as a reader library's exception."""
    path, _, _ = _write(tmp_path / "idx")
    (path / corrupt).write_bytes(b"garbage, not what the file should hold")
    with pytest.raises(IndexFormatError) as info:
        open_index(path)
    assert str(path) in str(info.value)


def test_not_a_folder_and_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="no such index folder"):
        open_index(tmp_path / "nothing")
    path, _, _ = _write(tmp_path / "idx")
    (path / "manifest.json").write_text("{ not json")
    with pytest.raises(IndexFormatError, match="unreadable"):
        open_index(path)
    (path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(IndexFormatError, match="format 99"):
        open_index(path)


def test_write_refuses_mismatched_or_empty(tmp_path: Path) -> None:
    raw, tiles = _data()
    with pytest.raises(ValueError):
        write_index(tmp_path / "a", raw[:10], tiles, IDENTITY, fit_alignment("none", raw))
    with pytest.raises(ValueError):
        write_index(tmp_path / "b", raw[:0], tiles[:0], IDENTITY, fit_alignment("none", raw))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ atomic writes


def test_overwrite_replaces_index(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path / "idx", seed=0)
    _, raw_b, _ = _write(path, seed=1)
    np.testing.assert_array_equal(open_index(path).raw, raw_b)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp or .old folder left


def test_crash_while_writing_keeps_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, raw_a, _ = _write(tmp_path / "idx", seed=0)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(*_args, **_kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(faiss, "write_index", crash)
    raw_b, tiles_b = _data(seed=1)
    with pytest.raises(OSError, match="simulated"):
        write_index(path, raw_b, tiles_b, IDENTITY, fit_alignment("center", raw_b))
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp folder remains
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    index = open_index(path, IDENTITY)
    np.testing.assert_array_equal(index.raw, raw_a)


def test_crash_during_swap_keeps_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If moving the new folder into place fails, the previous index must be back where it was."""
    path, raw_a, _ = _write(tmp_path / "idx", seed=0)
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def flaky_replace(src, dst, *args, **kwargs):
        calls.append((str(src), str(dst)))
        if Path(src).name.endswith(".tmp") and Path(dst) == path:
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", flaky_replace)
    raw_b, tiles_b = _data(seed=1)
    with pytest.raises(OSError, match="simulated"):
        write_index(path, raw_b, tiles_b, IDENTITY, fit_alignment("center", raw_b))
    monkeypatch.undo()
    assert any(dst == str(path) for _, dst in calls)  # the failure really hit the final rename

    np.testing.assert_array_equal(open_index(path).raw, raw_a)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"precious")
    raw, tiles = _data()
    with pytest.raises(IndexFormatError) as info:
        write_index(target, raw, tiles, IDENTITY, fit_alignment("none", raw))
    assert "not a cvgl index" in str(info.value)
    assert str(target) in str(info.value)
    assert [p.name for p in target.iterdir()] == ["holiday.jpg"]
    assert (target / "holiday.jpg").read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_refuses_folder_with_foreign_manifest(tmp_path: Path) -> None:
    """A folder that merely holds *a* manifest.json (a web app, another tool) is not a cvgl index."""
    target = tmp_path / "webapp"
    target.mkdir()
    (target / "manifest.json").write_text(json.dumps({"name": "my app", "start_url": "/"}))
    (target / "index.html").write_text("<html>precious</html>")
    raw, tiles = _data()
    with pytest.raises(IndexFormatError, match="not a cvgl index"):
        write_index(target, raw, tiles, IDENTITY, fit_alignment("none", raw))
    assert (target / "index.html").read_text() == "<html>precious</html>"


def test_refuses_to_replace_a_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("[]")
    raw, tiles = _data()
    with pytest.raises(IndexFormatError) as info:
        write_index(target, raw, tiles, IDENTITY, fit_alignment("none", raw))
    assert str(target) in str(info.value)
    assert target.read_text() == "[]"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_writes_into_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "idx").mkdir()
    path, raw, _ = _write(tmp_path / "idx")
    np.testing.assert_array_equal(open_index(path).raw, raw)


# ------------------------------------------------------------------------------ building from a GeoTIFF


def test_build_index_from_geotiff(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    encoder = tiny_encoder("gem")
    spec = TilingSpec(tile_m=56, stride_m=28, gsd_m=1.0)
    out = build_index(utm_geotiff, tmp_path / "idx", encoder, spec, progress=False)
    index = open_index(out, encoder.identity)

    per_axis = (200 - 56) // 28 + 1
    assert len(index) == per_axis**2
    tiles = index.tiles
    assert {"tile_id", "lat", "lon", "x", "y", "crs", "source"} <= set(tiles.columns)
    assert tiles["tile_id"].is_unique
    assert (tiles["crs"] == "EPSG:32613").all()
    assert (tiles["source"] == utm_geotiff.name).all()
    assert (tiles["width"] == 56).all() and (tiles["height"] == 56).all()
    with rasterio.open(utm_geotiff) as ds:
        left, bottom, right, top = ds.bounds
    assert tiles["x"].between(left + 28, right - 28).all()
    assert tiles["y"].between(bottom + 28, top - 28).all()
    assert tiles["lat"].between(40.1, 40.2).all() and tiles["lon"].between(-105.2, -105.1).all()
    assert tiles["lat"].nunique() >= per_axis and tiles["lon"].nunique() >= per_axis

    manifest = index.manifest
    assert manifest.encoder == encoder.identity
    assert manifest.encoder.preset == "gem"
    assert manifest.encoder.arch == "dinov2_tiny_test"
    assert manifest.tile_m == 56
    assert manifest.to_dict()["tiling"] == {"tile_m": 56, "stride_m": 28, "gsd_m": 1.0, "bands": None, "crs": None}
    assert manifest.source.kind == "geotiff"
    assert manifest.alignment["kind"] == DEFAULT_KIND
    assert manifest.computed_with.precision == encoder.precision == "fp32"  # recorded, not part of the identity
    assert manifest.to_dict()["computed_with"] == {"precision": "fp32", "runtime": "torch"}
    assert index.overview() is not None

    # the stored raw vectors are the encoder's descriptors of the tiles
    from cvgl.data.tiling import iter_tiles

    first = next(iter(iter_tiles(utm_geotiff, spec)))
    assert first.tile_id == tiles["tile_id"].iloc[0]
    np.testing.assert_allclose(index.raw[0], encoder.encode([first.image])[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(index.raw, axis=1), 1.0, rtol=1e-5)

    # another encoder is refused
    with pytest.raises(IndexMismatchError):
        index.check_encoder(tiny_encoder("gem", seed=1).identity)


def test_build_index_non_georeferenced(tmp_path: Path, plain_tiff: Path, tiny_encoder) -> None:
    with pytest.raises(InputError) as info:
        build_index(plain_tiff, tmp_path / "idx", tiny_encoder("gem"), TilingSpec(56, 28, 1.0), progress=False)
    assert plain_tiff.name in str(info.value)
    assert "georeferenced" in str(info.value)
    assert not (tmp_path / "idx").exists()


def test_build_index_missing_source(tmp_path: Path, tiny_encoder) -> None:
    with pytest.raises(InputError, match="nowhere.tif"):
        build_index(tmp_path / "nowhere.tif", tmp_path / "idx", tiny_encoder("gem"), progress=False)


# ------------------------------------------------------------------------------ index types


def _structured(n: int = 3000, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Clustered descriptors on a 1-km grid of tiles around Longmont, and queries near items."""
    from cvgl.bench.scale import structured_dataset

    raw, queries, _, _ = structured_dataset(n, queries=40, dim=dim, clusters=30, seed=seed)
    side = int(np.ceil(np.sqrt(n)))
    rows, cols = np.divmod(np.arange(n), side)
    tiles = pd.DataFrame({"tile_id": [f"t{i}" for i in range(n)], "lat": 40.13 + rows * 2e-4, "lon": -105.15 + cols * 2.6e-4})
    return raw, tiles, queries


def _numpy_top_k(index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    scores = index.alignment.apply(queries, "query") @ index.alignment.apply(np.asarray(index.raw), "reference").T
    if allowed is not None:
        masked = np.full_like(scores, -np.inf)
        masked[:, allowed] = scores[:, allowed]
        scores = masked
    return brute_force_top_k(scores, k)[1]


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for f, e in zip(found, exact)]))


@pytest.mark.parametrize("index_type", ["flat", "sq8", "ivfpq"])
def test_index_types_round_trip_and_search_like_numpy(tmp_path: Path, index_type: str) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    raw, tiles, queries = _structured()
    params = {"nlist": 24, "m": 8, "nbits": 6, "nprobe": 8} if index_type == "ivfpq" else None
    write_index(tmp_path / "idx", raw, tiles, IDENTITY, fit_alignment("center", raw), index_type=index_type,
                backend_params=params)
    index = open_index(tmp_path / "idx", IDENTITY)
    assert index.index_type == index.manifest.index_type == index.manifest.backend["type"] == index_type
    _, rows = index.search(queries, 10)
    recall = _recall(rows, _numpy_top_k(index, queries, 10))
    print(f"\n{index_type} via write_index/open_index: recall@10 vs numpy = {recall:.3f}")
    assert recall >= (1.0 if index_type == "flat" else 0.95)
    mapped = open_index(tmp_path / "idx", mmap=True)
    assert isinstance(mapped.raw, np.memmap)
    for a, b in zip(index.search(queries, 10), mapped.search(queries, 10)):
        np.testing.assert_array_equal(a, b)  # memory-mapped answers identically


def test_auto_type_and_unknown_type(tmp_path: Path, monkeypatch) -> None:
    from cvgl.index import backends

    raw, tiles, _ = _structured(400)
    write_index(tmp_path / "a", raw, tiles, IDENTITY, fit_alignment("none", raw))
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["index_type"] == "flat"
    monkeypatch.setattr(backends, "FLAT_MAX", 100)
    write_index(tmp_path / "b", raw, tiles, IDENTITY, fit_alignment("none", raw))
    assert open_index(tmp_path / "b").index_type == "sq8"
    with pytest.raises(ValueError, match="index_type"):
        write_index(tmp_path / "c", raw, tiles, IDENTITY, fit_alignment("none", raw), index_type="annoy")


def test_format_1_flat_index_without_backend_entry_still_opens(tmp_path: Path) -> None:
    """Indexes written before backends existed said "flat-ip" and had no "backend" entry."""
    path, raw, _ = _write(tmp_path / "idx")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["index_type"] = "flat-ip"
    del manifest["backend"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    index = open_index(path)
    assert index.index_type == "flat"
    queries = raw[:3] + 0.01
    np.testing.assert_array_equal(index.search(queries, 5)[1], _numpy_top_k(index, queries, 5))


def test_auto_mmap_follows_available_ram(tmp_path: Path, monkeypatch) -> None:
    from cvgl.index import store

    path, _, _ = _write(tmp_path / "idx")
    assert not isinstance(open_index(path).raw, np.memmap)
    monkeypatch.setattr(store, "_available_ram", lambda: 1000)  # pretend the index is larger than RAM
    assert store.should_mmap(path)
    assert isinstance(open_index(path).raw, np.memmap)


@pytest.mark.parametrize("index_type", ["flat", "sq8", "ivfpq"])
def test_geographic_prior_matches_numpy_reference(tmp_path: Path, index_type: str) -> None:
    from cvgl.geo import geodesic_distance_m

    raw, tiles, queries = _structured()
    params = {"nlist": 24, "m": 8, "nbits": 6, "nprobe": 8} if index_type == "ivfpq" else None
    write_index(tmp_path / "idx", raw, tiles, IDENTITY, fit_alignment("none", raw), index_type=index_type,
                backend_params=params)
    index = open_index(tmp_path / "idx")
    near, radius_km = (40.135, -105.143), 0.2
    distance = geodesic_distance_m(near[0], near[1], tiles["lat"].to_numpy(), tiles["lon"].to_numpy())
    inside = np.flatnonzero(distance <= radius_km * 1000)
    assert 0 < len(inside) < len(tiles) // 4
    np.testing.assert_array_equal(index.allowed_rows(near, radius_km), inside)
    _, rows = index.search(queries, 10, near=near, radius_km=radius_km)
    assert np.isin(rows, inside).all()
    np.testing.assert_array_equal(rows, _numpy_top_k(index, queries, 10, inside))  # small subset: exact
    with pytest.raises(InputError):
        index.search(queries, 10, near=near)
    _, few = index.search(queries[:1], 10, near=near, radius_km=0.02)  # fewer tiles than k: -1 padding
    assert (few >= 0).sum() == len(index.allowed_rows(near, 0.02)) and (few[few < 0] == -1).all()


def test_search_with_another_alignment_reranks_exactly(tmp_path: Path) -> None:
    """A locate-time (batch) alignment re-scores the backend's candidates against raw.npy."""
    raw, tiles, queries = _structured(600)
    write_index(tmp_path / "idx", raw, tiles, IDENTITY, fit_alignment("none", raw), index_type="sq8")
    index = open_index(tmp_path / "idx")
    batch = fit_alignment("center", raw, queries=queries)
    scores, rows = index.search(queries, 5, alignment=batch)
    expected = batch.apply(queries, "query") @ batch.apply(raw, "reference").T
    np.testing.assert_array_equal(rows, brute_force_top_k(expected, 5)[1])  # 256-pool covers the top 5
    np.testing.assert_allclose(scores, brute_force_top_k(expected, 5)[0], atol=1e-5)


@pytest.mark.parametrize("prior", [False, True])
def test_locate_searched_scores_equal_dense_scores(tmp_path: Path, monkeypatch, prior: bool) -> None:
    """locate's search path (large / non-flat indexes) against its dense path on the same index."""
    from cvgl.index import search

    raw, tiles, queries = _structured(500)
    write_index(tmp_path / "idx", raw, tiles, IDENTITY, fit_alignment("none", raw), index_type="flat")
    index = open_index(tmp_path / "idx")
    hypotheses = queries[:4]  # one photo's heading hypotheses
    batch = fit_alignment("center", raw, queries=queries)
    near = ((40.132, -105.147), 0.1) if prior else (None, None)
    geo_prior = index.prior(*near)
    dense_scores, dense_hyp = search.hypothesis_scores(index, hypotheses, batch, geo_prior, candidates=500)
    monkeypatch.setattr(search, "DENSE_MAX", 0)
    full_scores, full_hyp = search.hypothesis_scores(index, hypotheses, batch, geo_prior, candidates=500)
    np.testing.assert_allclose(full_scores, dense_scores, atol=1e-5)  # pool = every tile: identical
    finite = np.isfinite(dense_scores)
    np.testing.assert_array_equal(full_hyp[finite], dense_hyp[finite])
    part_scores, _ = search.hypothesis_scores(index, hypotheses, batch, geo_prior, candidates=8)
    scored = np.isfinite(part_scores)
    assert 8 <= scored.sum() <= 4 * 8
    np.testing.assert_allclose(part_scores[scored], dense_scores[scored], atol=1e-5)
    assert np.argmax(part_scores) == np.argmax(dense_scores)
