"""GeoTIFF tiling, off-grid regions, overviews and tile folders, on small rasters made in code."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning

from cvgl.data.raster import (
    BandStretch,
    compute_stretch,
    open_raster,
    raster_info,
    raster_overview,
    read_region,
)
from cvgl.data.tile_folder import read_tile_folder
from cvgl.data.tiling import TilingSpec, count_tiles, iter_tiles, tile_grid
from cvgl.errors import InputError
from cvgl.geo import WGS84_GEOD

UTM = "EPSG:32613"
X0, Y0 = 487_000.0, 4_443_000.0  # Longmont, Colorado, in UTM 13N


def write_tif(
    path: Path,
    data: np.ndarray,
    crs: str | None = UTM,
    transform: rasterio.Affine | None = None,
    nodata: float | None = None,
) -> Path:
    """Write a ``C×H×W`` array as a GeoTIFF (or a plain TIFF when crs/transform are None)."""
    count, height, width = data.shape
    profile = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name
    )
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
    return path


def from_origin(west: float, north: float, xres: float, yres: float) -> Affine:
    """North-up geotransform (rasterio's helper of the same name warns about ``*`` on Affine)."""
    return Affine(xres, 0.0, west, 0.0, -yres, north)


def expected_count(extent_m: float, tile_m: float, stride_m: float) -> int:
    return math.floor((extent_m - tile_m) / stride_m) + 1


@pytest.fixture
def rgb_utm(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """600×400 px RGB uint8 at 0.5 m: 300 m × 200 m."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, 400, 600), dtype=np.uint8)
    return write_tif(tmp_path / "rgb_utm.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5)), data


# ------------------------------------------------------------------------------- projected RGB


def test_utm_rgb_tiles_count_shape_and_passthrough(rgb_utm: tuple[Path, np.ndarray]) -> None:
    path, data = rgb_utm
    spec = TilingSpec()
    tiles = list(iter_tiles(path, spec))
    n = expected_count(300, 112, 56) * expected_count(200, 112, 56)
    assert n == 8
    assert len(tiles) == count_tiles(path, spec) == len(tile_grid(path, spec)) == n
    assert len({t.tile_id for t in tiles}) == n
    assert tiles[0].tile_id == "r0000_c0000" and tiles[-1].tile_id == "r0001_c0003"
    for t in tiles:
        assert t.image.shape == (224, 224, 3) and t.image.dtype == np.uint8
        assert t.gsd_m == pytest.approx(0.5)
        assert t.crs == UTM
        # Native GSD, whole-pixel grid (centred: 10 m margins) → uint8 pixels pass through as-is.
        col, row, w, h = (round(v) for v in t.window)
        assert t.window == pytest.approx((col, row, w, h), abs=1e-9)
        assert np.array_equal(t.image, data[:, row : row + 224, col : col + 224].transpose(1, 2, 0))
    assert tiles[0].window[:2] == pytest.approx((20.0, 32.0), abs=1e-9)  # (300-280)/2, (200-168)/2 m


def test_tile_centres_match_pyproj(rgb_utm: tuple[Path, np.ndarray]) -> None:
    path, _ = rgb_utm
    ref = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    with rasterio.open(path) as ds:
        transform = ds.transform
    tiles = list(iter_tiles(path, TilingSpec()))
    for t in tiles:
        col, row, w, h = t.window
        x, y = transform @ (col + w / 2, row + h / 2)
        assert (t.x, t.y) == pytest.approx((x, y), abs=1e-6)
        lon, lat = ref.transform(x, y)
        assert t.lat == pytest.approx(lat, abs=1e-9)
        assert t.lon == pytest.approx(lon, abs=1e-9)
    # Neighbours are one stride (56 m on the ground) apart.
    d = WGS84_GEOD.inv(tiles[0].lon, tiles[0].lat, tiles[1].lon, tiles[1].lat)[2]
    assert d == pytest.approx(56.0, rel=1e-3)


def test_downsampled_tiles_and_grid_formula(rgb_utm: tuple[Path, np.ndarray]) -> None:
    path, _ = rgb_utm
    spec = TilingSpec(tile_m=100.0, stride_m=30.0, gsd_m=1.0)
    cells = tile_grid(path, spec)
    assert len(cells) == expected_count(300, 100, 30) * expected_count(200, 100, 30)
    for c in cells:
        col, row, w, h = c.window
        assert w == pytest.approx(200.0, rel=1e-3) and h == pytest.approx(200.0, rel=1e-3)
        assert 0 <= col and col + w <= 600 + 1e-6 and 0 <= row and row + h <= 400 + 1e-6
    tiles = list(iter_tiles(path, spec))
    assert len(tiles) == len(cells)
    assert tiles[0].image.shape == (100, 100, 3)


def test_raster_smaller_than_a_tile(rgb_utm: tuple[Path, np.ndarray]) -> None:
    path, _ = rgb_utm
    with pytest.raises(InputError, match="smaller than one 250 m tile"):
        tile_grid(path, TilingSpec(tile_m=250.0))


def test_bad_spec_values() -> None:
    with pytest.raises(InputError, match="stride_m"):
        TilingSpec(stride_m=-1.0)
    with pytest.raises(InputError, match="bands"):
        TilingSpec(bands=(1, 2))
    with pytest.raises(InputError, match="percentiles"):
        TilingSpec(stretch=(98.0, 2.0))
    with pytest.raises(InputError, match="max_empty_fraction"):
        TilingSpec(max_empty_fraction=1.5)


# ------------------------------------------------------------------------------- 16-bit, bands


def test_uint16_single_band_shares_one_stretch(tmp_path: Path) -> None:
    # Left half dark (1000), right half bright (3000): one raster-wide scale maps them to 0 and
    # 255; a per-tile stretch would have made the all-dark tiles mid-grey.
    data = np.full((1, 300, 600), 1000, dtype=np.uint16)
    data[:, :, 300:] = 3000
    path = write_tif(tmp_path / "pan16.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5))
    stretch = compute_stretch(path)
    assert stretch.low == (1000.0,) * 3 and stretch.high == (3000.0,) * 3
    tiles = list(iter_tiles(path, TilingSpec(gsd_m=1.0)))
    assert len(tiles) == expected_count(300, 112, 56) * expected_count(150, 112, 56)
    left, right = tiles[0].image, tiles[expected_count(300, 112, 56) - 1].image
    assert left.shape == (112, 112, 3)
    assert np.all(left == 0) and np.all(right == 255)
    for t in tiles:
        assert np.array_equal(t.image[..., 0], t.image[..., 1])
        assert np.array_equal(t.image[..., 0], t.image[..., 2])


def test_percentile_stretch_on_ramp(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(1000, dtype=np.uint16) * 4, (250, 1))[None]  # 0..3996 along x
    path = write_tif(tmp_path / "ramp.tif", ramp, transform=from_origin(X0, Y0, 0.3, 0.3))
    stretch = compute_stretch(path, percentiles=(2.0, 98.0))
    assert stretch.low[0] == pytest.approx(0.02 * 3996, abs=12)
    assert stretch.high[0] == pytest.approx(0.98 * 3996, abs=12)
    img, _ = raster_overview(path, max_side=200)
    assert img.shape == (50, 200, 3)
    assert img[0, 0, 0] == 0 and img[0, -1, 0] == 255
    assert np.all(np.diff(img[0, :, 0].astype(int)) >= 0)


def test_band_selection_for_8_band_mul(tmp_path: Path) -> None:
    data = np.stack([np.full((240, 240), 10 * b, dtype=np.uint8) for b in range(1, 9)])
    path = write_tif(tmp_path / "mul8.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5))
    t_auto = next(iter_tiles(path, TilingSpec()))
    assert tuple(t_auto.image[0, 0]) == (10, 20, 30)
    t_rgb = next(iter_tiles(path, TilingSpec(bands=(5, 3, 2))))
    assert tuple(t_rgb.image[0, 0]) == (50, 30, 20)
    t_grey = next(iter_tiles(path, TilingSpec(bands=(7,))))
    assert tuple(t_grey.image[0, 0]) == (70, 70, 70)
    with pytest.raises(InputError, match="has 8 band"):
        next(iter_tiles(path, TilingSpec(bands=(9, 3, 2))))


# ------------------------------------------------------------------------------- nodata


def test_nodata_half_drops_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(100, 4000, size=(1, 400, 600), dtype=np.uint16)
    data[:, :, :300] = 0  # west half is nodata
    path = write_tif(tmp_path / "half.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5), nodata=0)
    spec = TilingSpec()
    grid = tile_grid(path, spec)
    tiles = list(iter_tiles(path, spec))
    assert len(tiles) == count_tiles(path, spec)
    assert 0 < len(tiles) < len(grid)
    for t in tiles:
        assert t.valid_fraction >= 0.5
        col, _, w, _ = t.window
        assert col + w / 2 >= 300 - 1e-6  # kept tiles are centred in the valid half
    # A tile straddling the edge keeps its nodata pixels at 0.
    straddling = [t for t in tiles if t.window[0] < 300]
    assert straddling
    t = straddling[0]
    n_bad = round((300 - t.window[0]) * 224 / t.window[2])
    assert np.all(t.image[:, : n_bad - 1] == 0)
    assert np.any(t.image[:, n_bad + 1 :] > 0)
    assert len(list(iter_tiles(path, TilingSpec(max_empty_fraction=1.0)))) == len(grid)


def test_float_nan_holes_drop_tiles(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random((1, 400, 600), dtype=np.float32)
    data[:, :, :300] = np.nan
    path = write_tif(tmp_path / "nan.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5))
    tiles = list(iter_tiles(path, TilingSpec()))
    assert 0 < len(tiles) == count_tiles(path, TilingSpec()) < len(tile_grid(path, TilingSpec()))


# ------------------------------------------------------------------------------- geographic


def test_geographic_raster_uses_local_metre_scale(tmp_path: Path) -> None:
    res = 5e-6  # degrees: ~0.56 m north-south, ~0.43 m east-west at 40° N
    lon0, lat0 = -105.15, 40.14
    data = np.random.default_rng(3).integers(0, 255, size=(3, 600, 800), dtype=np.uint8)
    path = write_tif(tmp_path / "geo.tif", data, crs="EPSG:4326", transform=from_origin(lon0, lat0, res, res))
    info = raster_info(path)
    assert info.is_geographic
    clat = lat0 - 300 * res
    m_x = WGS84_GEOD.inv(lon0, clat, lon0 + res, clat)[2]
    m_y = WGS84_GEOD.inv(lon0, clat - res / 2, lon0, clat + res / 2)[2]
    assert info.pixel_size_m == pytest.approx((m_x, m_y), rel=1e-4)
    spec = TilingSpec()
    tiles = list(iter_tiles(path, spec))
    n = expected_count(800 * m_x, 112, 56) * expected_count(600 * m_y, 112, 56)
    assert len(tiles) == n == count_tiles(path, spec)
    for t in tiles:
        col, row, w, h = t.window
        assert t.image.shape == (224, 224, 3)
        assert t.lon == pytest.approx(lon0 + (col + w / 2) * res, abs=1e-12)
        assert t.lat == pytest.approx(lat0 - (row + h / 2) * res, abs=1e-12)
        # The window is 112 m on the ground in both directions.
        west, east = lon0 + col * res, lon0 + (col + w) * res
        assert WGS84_GEOD.inv(west, t.lat, east, t.lat)[2] == pytest.approx(112.0, rel=2e-3)
        north, south = lat0 - row * res, lat0 - (row + h) * res
        assert WGS84_GEOD.inv(t.lon, south, t.lon, north)[2] == pytest.approx(112.0, rel=2e-3)


def test_web_mercator_uses_true_ground_size(tmp_path: Path) -> None:
    # Web Mercator "metres" are stretched by 1/cos(lat): at 60° N a 1 m pixel is 0.5 m on the ground.
    x0, y0 = 1_000_000.0, 8_399_738.0  # ~ (60.0° N, 9.0° E)
    data = np.zeros((1, 500, 500), dtype=np.uint8)
    path = write_tif(tmp_path / "merc.tif", data, crs="EPSG:3857", transform=from_origin(x0, y0, 1.0, 1.0))
    info = raster_info(path)
    assert info.pixel_size_m == pytest.approx((0.5, 0.5), rel=3e-3)
    cells = tile_grid(path, TilingSpec())
    assert len(cells) == expected_count(500 * info.pixel_size_m[0], 112, 56) ** 2
    assert cells[0].window[2] == pytest.approx(224.0, rel=3e-3)


# ------------------------------------------------------------------------------- bad inputs


def test_non_georeferenced_tiff(tmp_path: Path) -> None:
    data = np.zeros((3, 64, 64), dtype=np.uint8)
    path = write_tif(tmp_path / "plain_photo.tif", data, crs=None, transform=None)
    with pytest.raises(InputError, match="not georeferenced") as err:
        list(iter_tiles(path, TilingSpec()))
    assert "plain_photo.tif" in str(err.value) and "\n" not in str(err.value)
    for call in (open_raster, raster_info, raster_overview):
        with pytest.raises(InputError, match="plain_photo.tif"):
            call(path)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff at all")
    with pytest.raises(InputError, match=r"junk\.tif: not a readable raster") as err:
        open_raster(junk)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"nope\.tif: file not found"):
        count_tiles(tmp_path / "nope.tif", TilingSpec())
    with pytest.raises(InputError, match="is a folder"):
        open_raster(tmp_path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    data = np.zeros((1, 64, 64), dtype=np.int32)
    path = write_tif(tmp_path / "int32.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5))
    with pytest.raises(InputError, match="int32.tif: pixel type int32 is not supported"):
        open_raster(path)


# ------------------------------------------------------------------------------- read_region


@pytest.fixture
def pattern(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """256×200 px uint8 at 0.5 m: band 1 = column, band 2 = row, band 3 = 77."""
    cols, rows = np.meshgrid(np.arange(256), np.arange(200))
    data = np.stack([cols, rows, np.full_like(cols, 77)]).astype(np.uint8)
    return write_tif(tmp_path / "pattern.tif", data, transform=from_origin(X0, Y0, 0.5, 0.5)), data


def test_read_region_native_is_exact(pattern: tuple[Path, np.ndarray]) -> None:
    path, data = pattern
    # 20 m square centred on the corner shared by pixels (col 99/100, row 59/60).
    cx, cy = X0 + 100 * 0.5, Y0 - 60 * 0.5
    img = read_region(path, cx, cy, size_m=20.0, gsd_m=0.5)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    assert np.array_equal(img, data[:, 40:80, 80:120].transpose(1, 2, 0))


def test_read_region_downsampled_averages(pattern: tuple[Path, np.ndarray]) -> None:
    path, _ = pattern
    img = read_region(path, X0 + 100 * 0.5, Y0 - 60 * 0.5, size_m=20.0, gsd_m=1.0)
    assert img.shape == (20, 20, 3)
    # Each output pixel averages two source columns (80+81 → 80.5, rounds to 80 or 81).
    assert np.all(np.abs(img[0, :, 0].astype(float) - (80.5 + 2 * np.arange(20))) <= 0.5)
    assert np.all(np.abs(img[:, 0, 1].astype(float) - (40.5 + 2 * np.arange(20))) <= 0.5)
    assert np.all(img[..., 2] == 77)


def test_read_region_with_explicit_stretch(pattern: tuple[Path, np.ndarray]) -> None:
    path, _ = pattern
    stretch = BandStretch((80.0, 0.0, 0.0), (120.0, 255.0, 255.0))
    img = read_region(path, X0 + 50.0, Y0 - 30.0, 20.0, 0.5, stretch=stretch)
    assert img[0, 0, 0] == 0 and img[0, -1, 0] == round(39 * 255 / 40)


def test_read_region_outside_raster(pattern: tuple[Path, np.ndarray]) -> None:
    path, _ = pattern
    with pytest.raises(InputError, match="pattern.tif: the 20 m region .* not entirely inside"):
        read_region(path, X0 + 5.0, Y0 - 30.0, size_m=20.0, gsd_m=0.5)
    with pytest.raises(InputError, match="not entirely inside"):
        read_region(path, X0 - 1000.0, Y0, size_m=20.0, gsd_m=0.5)


def test_raster_overview_bounds(pattern: tuple[Path, np.ndarray]) -> None:
    path, _ = pattern
    img, (south, west, north, east) = raster_overview(path, max_side=64)
    assert img.shape == (50, 64, 3) and img.dtype == np.uint8
    ref = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lons, lats = ref.transform([X0, X0 + 128, X0, X0 + 128], [Y0, Y0, Y0 - 100, Y0 - 100])
    assert (south, north) == pytest.approx((min(lats), max(lats)), abs=1e-9)
    assert (west, east) == pytest.approx((min(lons), max(lons)), abs=1e-9)


# ------------------------------------------------------------------------------- tile folders


def make_folder(tmp_path: Path, csv_text: str, names: tuple[str, ...] = ("a.png", "b.jpg")) -> Path:
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"not decoded here")
    (folder / "tiles.csv").write_text(csv_text)
    return folder


def test_read_tile_folder_ok(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, "ID, lat ,lon,note\na.png,40.1,-105.1,x\nb,40.2,-105.2,y\n\n")
    recs = read_tile_folder(folder)
    assert [r.tile_id for r in recs] == ["a.png", "b"]
    assert recs[1].image_path == folder / "b.jpg"
    tile_id, image_path, lat, lon = recs[0]
    assert (lat, lon) == (40.1, -105.1) and image_path == folder / "a.png"


@pytest.mark.parametrize(
    ("csv_text", "pattern"),
    [
        ("id,latitude,lon\na,1,2\n", r"missing column\(s\) lat"),
        ("id,lat,lon\na,40.1,-105.1\nb,north,-105.2\n", r"line 3: lat 'north' is not a number"),
        ("id,lat,lon\na,40.1,-205.1\n", r"line 2: lon -205.1 is out of range"),
        ("id,lat,lon\na,95,10\n", r"line 2: lat 95 is out of range"),
        ("id,lat,lon\na,40.1,-105.1\nc,40.2,-105.2\n", r"line 3: no file for id 'c'"),
        ("id,lat,lon\na,40.1,-105.1\na,40.2,-105.2\n", r"line 3: id 'a' already used on line 2"),
        ("id,lat,lon\na,40.1,-105.1\na.png,40.2,-105.2\n", r"line 3: id 'a.png' names a.png, already"),
        ("id,lat,lon\n", r"no tiles listed"),
        ("", r"empty CSV"),
    ],
)
def test_read_tile_folder_errors(tmp_path: Path, csv_text: str, pattern: str) -> None:
    folder = make_folder(tmp_path, csv_text)
    with pytest.raises(InputError, match=pattern) as err:
        read_tile_folder(folder)
    assert "tiles.csv" in str(err.value) and "\n" not in str(err.value)


def test_read_tile_folder_missing_csv_and_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, "id,lat,lon\na,1,2\n")
    with pytest.raises(InputError, match=r"other\.csv: CSV not found"):
        read_tile_folder(folder, folder / "other.csv")
    with pytest.raises(InputError, match="not a folder"):
        read_tile_folder(tmp_path / "absent")


def test_read_tile_folder_ambiguous_stem(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, "id,lat,lon\na,1,2\n", names=("a.png", "a.jpg"))
    with pytest.raises(InputError, match="matches several files"):
        read_tile_folder(folder)
