"""Sharded, resumable index builds (in process): plan, shard files, resume after a crash, merge.

Every sharded result is compared with the plain reference: ``iter_tiles`` (or the tile folder)
encoded in one pass, as ``build_index`` did before shards existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from conftest import textured_rgb, write_geotiff
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cvgl.data.images import load_image
from cvgl.data.tiling import TilingSpec, iter_tiles
from cvgl.errors import InputError
from cvgl.index import shards
from cvgl.index.build import build_index
from cvgl.index.shards import (
    PLAN_FILE,
    open_shard_folder,
    plan_source,
    read_shard,
    read_shard_file,
    shard_folder,
    shard_path,
    write_shard,
)
from cvgl.index.store import FILES, open_index

SPEC = TilingSpec(tile_m=56, stride_m=28, gsd_m=1.0)  # 6 x 6 = 36 tiles of the 200 px fixture


@pytest.fixture(autouse=True)
def _one_thread():
    """Bitwise comparisons need the same kernels on every run: one torch thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_rows(path: Path, spec: TilingSpec) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Tiles and table rows exactly as the pre-shard ``build_index`` made them (one iter_tiles pass)."""
    images, rows = [], []
    for tile in iter_tiles(path, spec):
        col_off, row_off, width, height = tile.window
        rows.append({"tile_id": tile.tile_id, "lat": tile.lat, "lon": tile.lon, "x": tile.x, "y": tile.y, "crs": tile.crs,
                         "source": path.name, "col_off": col_off, "row_off": row_off, "width": width, "height": height,
                         "gsd_m": tile.gsd_m})
        images.append(tile.image)
    return images, pd.DataFrame(rows)


class CountingEncoder:
    """Wraps an encoder and counts the images it embeds (to prove what a resume re-does)."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.identity = encoder.identity
        self.dim = encoder.dim  # build_index checks the index's memory before encoding
        self.precision, self.runtime = encoder.precision, encoder.runtime  # recorded in the manifest
        self.images = 0

    def encode(self, images, batch_size: int = 16) -> np.ndarray:
        images = list(images)
        self.images += len(images)
        return self.encoder.encode(images, batch_size=batch_size)


# ------------------------------------------------------------------------------ plan and read


def test_plan_and_read_equal_iter_tiles(utm_geotiff: Path, tiny_encoder) -> None:
    plan = plan_source(utm_geotiff, SPEC, tiny_encoder().identity, shard_size=5)
    images, expected = reference_rows(utm_geotiff, SPEC)
    assert plan.num_shards == 8 and len(plan.tiles) == 36
    got_images, got_tables = [], []
    for shard in range(plan.num_shards):
        shard_images, table = read_shard(plan.source, plan.rows(shard))
        assert len(shard_images) == len(table) == (5 if shard < 7 else 1)
        got_images += shard_images
        got_tables.append(table)
    pd.testing.assert_frame_equal(pd.concat(got_tables, ignore_index=True), expected)
    for got, want in zip(got_images, images):
        np.testing.assert_array_equal(got, want)


def test_plan_drops_nodata_tiles_like_iter_tiles(tmp_path: Path, tiny_encoder) -> None:
    data = textured_rgb(200, 200, seed=3)
    data[:, :120, :90] = 0  # top-left corner is nodata
    path = tmp_path / "holes.tif"
    write_geotiff(path, data)
    with rasterio.open(path, "r+") as ds:
        ds.nodata = 0
    plan = plan_source(path, SPEC, tiny_encoder().identity, shard_size=4)
    kept = [t.tile_id for t in iter_tiles(path, SPEC)]
    assert 0 < len(kept) < 36
    assert plan.tiles["tile_id"].tolist() == kept


def test_plan_digest_depends_on_what_shards_contain(utm_geotiff: Path, tiny_encoder) -> None:
    identity = tiny_encoder().identity
    base = plan_source(utm_geotiff, SPEC, identity, shard_size=5)
    assert plan_source(utm_geotiff, SPEC, identity, shard_size=5).digest == base.digest
    assert plan_source(utm_geotiff, SPEC, identity, shard_size=6).digest != base.digest
    assert plan_source(utm_geotiff, TilingSpec(56, 56, 1.0), identity, shard_size=5).digest != base.digest
    assert plan_source(utm_geotiff, SPEC, tiny_encoder(seed=1).identity, shard_size=5).digest != base.digest


def test_bad_shard_size_and_missing_source(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    with pytest.raises(InputError, match="shard size"):
        plan_source(utm_geotiff, SPEC, tiny_encoder().identity, shard_size=0)
    with pytest.raises(InputError, match="nowhere.tif"):
        plan_source(tmp_path / "nowhere.tif", SPEC, tiny_encoder().identity)


# ------------------------------------------------------------------------------ shard files


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    dim=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_shard_file_round_trip_is_exact(tmp_path_factory: pytest.TempPathFactory, n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[0, 0] = np.float32(1e-38)  # subnormal-adjacent values survive too
    table = pd.DataFrame({"tile_id": [f"t{i}" for i in range(n)], "lat": rng.uniform(-90, 90, n), "width": np.arange(n) * 1.5})
    folder = tmp_path_factory.mktemp("shards")
    path = write_shard(folder, 3, table, vectors, "abc")
    assert path == shard_path(folder, 3) and path.name == "shard-00003.parquet"
    got_table, got_vectors, digest = read_shard_file(path)
    assert digest == "abc"
    assert got_vectors.dtype == np.float32
    np.testing.assert_array_equal(got_vectors, vectors)
    pd.testing.assert_frame_equal(got_table, table)
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temp file left


def test_write_shard_refuses_mismatched_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vectors for 2 tiles"):
        write_shard(tmp_path, 0, pd.DataFrame({"tile_id": ["a", "b"]}), np.zeros((3, 4)), "d")


# ------------------------------------------------------------------------------ builds


def test_sharded_build_equals_one_pass_reference(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    encoder = tiny_encoder()
    out = build_index(utm_geotiff, tmp_path / "idx", encoder, SPEC, progress=False, shard_size=7)
    index = open_index(out, encoder.identity)
    images, expected = reference_rows(utm_geotiff, SPEC)
    pd.testing.assert_frame_equal(index.tiles, expected)
    # batches are cut at shard edges, so the floating-point sums may differ in the last bits
    np.testing.assert_allclose(index.raw, encoder.encode(images), rtol=0, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "overview.png"])
    assert not shard_folder(out).exists()  # merged and removed


def test_shard_size_does_not_change_the_index_beyond_rounding(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    encoder = tiny_encoder()
    a = open_index(build_index(utm_geotiff, tmp_path / "a", encoder, SPEC, progress=False, shard_size=16, batch_size=16))
    b = open_index(build_index(utm_geotiff, tmp_path / "b", encoder, SPEC, progress=False, shard_size=36, batch_size=16))
    pd.testing.assert_frame_equal(a.tiles, b.tiles)
    np.testing.assert_array_equal(a.raw[:32], b.raw[:32])  # the same batches: 2 x 16 in both
    np.testing.assert_allclose(a.raw, b.raw, rtol=0, atol=1e-6)


def test_tile_folder_build_equals_reference(tmp_path: Path, tiny_encoder) -> None:
    folder = tmp_path / "tiles"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["id,lat,lon"]
    names = []
    for i in range(7):
        name = f"sub/t{i}.png" if i % 3 == 0 else f"t{i}.png"
        size = (40 + 7 * i, 50)  # different sizes: each is resized by the encoder
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"{name},{40.13 + i * 1e-3},{-105.14 + i * 1e-3}")
        names.append(name)
    (folder / "tiles.csv").write_text("\n".join(rows) + "\n")
    encoder = tiny_encoder()
    index = open_index(build_index(folder, tmp_path / "idx", encoder, progress=False, shard_size=3))
    assert index.tiles["tile_id"].tolist() == names
    assert index.tiles["source"].tolist() == [Path(n).name for n in names]
    # The tile's path inside the folder is kept, so nested tiles can be shown again (maps, service).
    assert index.tiles["path_in_folder"].tolist() == names
    for row, name in enumerate(names):
        np.testing.assert_array_equal(index.tile_image(row), np.asarray(load_image(folder / name)))
    expected = np.concatenate([encoder.encode([load_image(folder / n) for n in names[s : s + 3]]) for s in range(0, 7, 3)])
    np.testing.assert_array_equal(index.raw, expected)
    assert index.manifest.source.kind == "tile-folder" and index.manifest.tile_m_estimated


# ------------------------------------------------------------------------------ resume


def test_resume_after_crash_embeds_only_the_rest(tmp_path: Path, utm_geotiff: Path, tiny_encoder, monkeypatch) -> None:
    encoder = tiny_encoder()
    reference = open_index(build_index(utm_geotiff, tmp_path / "ref", encoder, SPEC, progress=False, shard_size=5))

    written = []
    original = shards.write_shard

    def crash_after_three(folder, shard, *args, **kwargs):
        if len(written) == 3:
            raise RuntimeError("simulated crash")
        written.append(shard)
        return original(folder, shard, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", crash_after_three)
    first = CountingEncoder(encoder)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(utm_geotiff, tmp_path / "idx", first, SPEC, progress=False, shard_size=5)
    monkeypatch.setattr(shards, "write_shard", original)
    folder = shard_folder(tmp_path / "idx")
    assert sorted(p.name for p in folder.glob("shard-*")) == [f"shard-{k:05d}.parquet" for k in range(3)]
    assert not (tmp_path / "idx").exists()

    messages: list[str] = []
    second = CountingEncoder(encoder)
    out = build_index(utm_geotiff, tmp_path / "idx", second, SPEC, progress=False, shard_size=5, log=messages.append)
    assert second.images == 36 - 3 * 5  # only shards 3..7 were embedded again
    assert any("resuming, 3 of 8 shards" in m for m in messages)
    index = open_index(out)
    pd.testing.assert_frame_equal(index.tiles, reference.tiles)
    np.testing.assert_array_equal(index.raw, reference.raw)
    assert not folder.exists()


def test_damaged_shard_is_embedded_again(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    encoder = tiny_encoder()
    plan = plan_source(utm_geotiff, SPEC, encoder.identity, shard_size=10)
    folder = shard_folder(tmp_path / "idx")
    open_shard_folder(folder, plan)
    shards.embed_in_process(plan, folder, encoder, range(plan.num_shards))
    path = shard_path(folder, 1)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a crash during a non-atomic copy
    messages: list[str] = []
    assert open_shard_folder(folder, plan, messages.append) == {0, 2, 3}
    assert not path.exists() and "shard-00001.parquet" in messages[0]


def test_shards_of_another_plan_start_over(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    encoder = tiny_encoder()
    folder = shard_folder(tmp_path / "idx")
    old = plan_source(utm_geotiff, SPEC, encoder.identity, shard_size=10)
    assert open_shard_folder(folder, old) == set()
    shards.embed_in_process(old, folder, encoder, [0, 1])
    assert open_shard_folder(folder, old) == {0, 1}
    assert json.loads((folder / PLAN_FILE).read_text())["digest"] == old.digest

    other = tiny_encoder(seed=1)
    new = plan_source(utm_geotiff, SPEC, other.identity, shard_size=10)
    messages: list[str] = []
    assert open_shard_folder(folder, new, messages.append) == set()
    assert len(messages) == 1 and "another build" in messages[0] and "encoder" in messages[0]
    assert not list(folder.glob("shard-*"))
    assert json.loads((folder / PLAN_FILE).read_text())["digest"] == new.digest


def test_foreign_folder_at_shard_path_is_refused(tmp_path: Path, utm_geotiff: Path, tiny_encoder) -> None:
    folder = shard_folder(tmp_path / "idx")
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a cvgl shard folder"):
        build_index(utm_geotiff, tmp_path / "idx", tiny_encoder(), SPEC, progress=False)
    assert (folder / "notes.txt").read_text() == "mine"
