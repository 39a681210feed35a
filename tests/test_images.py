"""load_image / stretch_to_uint8: every input becomes upright 8-bit RGB or a one-line InputError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from cvgl.data.images import MAX_PIXELS, load_image, open_image, stretch_to_uint8
from cvgl.errors import InputError


def _assert_input_error(path: Path, *fragments: str) -> None:
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    assert ";" in message  # "<path>: <problem>; <what to do>"
    for fragment in fragments:
        assert fragment in message


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares a huge size but holds no pixels: a decompression-bomb stand-in."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path: Path) -> None:
    _assert_input_error(tmp_path / "nowhere.jpg", "not found")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    _assert_input_error(folder, "folder")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_input_error(path, "0 bytes")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("lat,lon\n1,2\n")
    _assert_input_error(path, "not a readable image")


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(_noise((128, 128, 3))).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    _assert_input_error(path, "truncated")


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(_noise((64, 64, 3))).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_input_error(path, "truncated")


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "stub.jpg"
    Image.new("RGB", (16, 16)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    _assert_input_error(path)


def test_truncated_images_flag_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(path)
    load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("size", [(20000, 20000), (15000, 14000)])
def test_absurd_size_is_refused(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "bomb.png"
    _png_header_only(path, *size)
    _assert_input_error(path, "megapixels")


def test_large_but_allowed_size_opens(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    _png_header_only(path, 14000, 14000)  # 196 MP: above Pillow's default, below our limit
    assert 14000 * 14000 <= MAX_PIXELS
    with open_image(path) as img:
        assert img.size == (14000, 14000)


# --------------------------------------------------------------------------- modes


def _load_array(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def test_rgb_jpeg_unchanged_mode(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (12, 8), (200, 100, 50)).save(path, quality=100)
    arr = _load_array(path)
    assert arr.shape == (8, 12, 3)
    assert np.abs(arr.astype(int) - [200, 100, 50]).max() <= 2


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[0, 255, 128], [0, 255, 128]]
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    arr = _load_array(path)
    assert arr[0, 0].tolist() == [0, 0, 0]
    assert arr[0, 1].tolist() == [200, 100, 50]
    assert arr[0, 2].tolist() == [100, 50, 25]


def test_la_and_palette_transparency(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert _load_array(tmp_path / "la.png")[0].tolist() == [[0, 0, 0], [90, 90, 90]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    pal.putdata([0, 1])
    pal.save(tmp_path / "pal.png", transparency=0)
    assert _load_array(tmp_path / "pal.png")[0].tolist() == [[0, 0, 0], [10, 200, 30]]


def test_palette_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (1, 1))
    pal.putpalette([10, 200, 30] + [0] * 765)
    pal.save(tmp_path / "pal.gif")
    assert _load_array(tmp_path / "pal.gif")[0, 0].tolist() == [10, 200, 30]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_becomes_rgb(tmp_path: Path, mode: str) -> None:
    gray = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    img = Image.fromarray(gray).convert(mode)
    img.save(tmp_path / "gray.png")
    arr = _load_array(tmp_path / "gray.png")
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    if mode == "L":
        assert np.array_equal(arr[..., 0], gray)


def _ramp16(height: int = 32, width: int = 32) -> np.ndarray:
    # 12-bit content in a 16-bit container, as many sensors produce.
    return (np.arange(height * width).reshape(height, width) * 4).astype(np.uint16)


def _assert_stretched_ramp(arr: np.ndarray) -> None:
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    flat = arr[..., 0].ravel()
    assert flat.min() == 0 and flat.max() == 255
    assert np.all(np.diff(flat.astype(int)) >= 0)  # monotone: order of values is kept


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_is_stretched(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(_ramp16()).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    _assert_stretched_ramp(_load_array(path))


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = tmp_path / "gray16b.tif"
    Image.frombytes("I;16B", (32, 32), _ramp16().astype(">u2").tobytes()).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16B"
    _assert_stretched_ramp(_load_array(path))


def test_32bit_integer_tiff(tmp_path: Path) -> None:
    path = tmp_path / "gray32.tif"
    Image.fromarray(_ramp16().astype(np.int32) * 1000).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I"
    _assert_stretched_ramp(_load_array(path))


def test_float_tiff_with_nan(tmp_path: Path) -> None:
    values = np.linspace(0.0, 0.3, 32 * 32, dtype=np.float32).reshape(32, 32)
    values[0, 0] = np.nan
    path = tmp_path / "reflectance.tif"
    Image.fromarray(values).save(path)
    arr = _load_array(path)
    assert arr[0, 0].tolist() == [0, 0, 0]
    assert arr.max() == 255


def test_16bit_rgb_tiff_keeps_full_depth(tmp_path: Path) -> None:
    rgb = np.stack([_ramp16(), _ramp16()[::-1], _ramp16().T], axis=2)
    path = tmp_path / "rgb16.tif"
    assert cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    arr = _load_array(path)
    # Pillow alone would keep only the high byte of the 12-bit data (max 15).
    assert arr.max() == 255
    assert arr[0, 0, 0] == 0 and arr[0, 0, 1] > 240 and arr[0, 0, 2] == 0


def test_float_rgb_tiff_pillow_cannot_open(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).random((6, 10, 3)).astype(np.float32)
    path = tmp_path / "rgbf.tif"
    assert cv2.imwrite(str(path), rgb)
    arr = _load_array(path)
    assert arr.shape == (6, 10, 3)
    assert arr.max() == 255


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.tif"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path)
    assert _load_array(path)[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_6_rotates_clockwise(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "sideways.jpg"
    img.save(path, exif=exif, quality=95)
    arr = _load_array(path)
    assert arr.shape == (40, 20, 3)  # portrait after rotation
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 50  # left went to the top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 50


# --------------------------------------------------------------------------- stretch


def test_stretch_constant_is_zero_not_nan() -> None:
    out = stretch_to_uint8(np.full((5, 5), 1234.0))
    assert out.dtype == np.uint8 and not out.any()


def test_stretch_ramp_percentiles() -> None:
    ramp = np.arange(1000, dtype=np.float64).reshape(10, 100)
    out = stretch_to_uint8(ramp)
    low, high = np.percentile(ramp, [2, 98])
    assert out[ramp <= low].max() == 0
    assert out[ramp >= high].min() == 255


def test_stretch_ignores_masked_pixels() -> None:
    values = np.tile(np.arange(100, dtype=np.uint16), (10, 1))
    values[:3] = 65535  # 30 % nodata: unmasked, it would own the 98th percentile
    mask = values != 65535
    masked = stretch_to_uint8(values, valid_mask=mask)
    assert not masked[:3].any()
    assert masked[3:].max() == 255
    only_valid = stretch_to_uint8(values[mask].reshape(1, -1))
    assert np.array_equal(masked[mask], only_valid[0])


def test_stretch_per_channel_and_shape() -> None:
    rng = np.random.default_rng(2)
    bands = np.stack([rng.normal(100, 5, (16, 16)), rng.normal(5000, 300, (16, 16)),
                      np.full((16, 16), 7.0)], axis=2)
    out = stretch_to_uint8(bands)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[..., 0].max() == 255 and out[..., 1].max() == 255
    assert not out[..., 2].any()


def test_stretch_all_masked_or_nan() -> None:
    assert not stretch_to_uint8(np.full((3, 3), np.nan)).any()
    assert not stretch_to_uint8(np.ones((3, 3)), valid_mask=np.zeros((3, 3), bool)).any()


def test_stretch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        stretch_to_uint8(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError):
        stretch_to_uint8(np.zeros((2, 2)), low_pct=50, high_pct=10)
    with pytest.raises(ValueError):
        stretch_to_uint8(np.zeros((2, 2)), valid_mask=np.ones((3, 3), bool))


# --------------------------------------------------------------------------- draft (reduced-scale) JPEG decode


def _smooth_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo-like content (smooth texture, not per-pixel noise, which no downscale preserves)."""
    small = _noise((height // 16 + 1, width // 16 + 1, 3), seed)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize(("min_side", "expected_hw"), [
    (300, (300, 400)),  # 1/4 keeps 300 px: the smallest scale that does
    (301, (600, 800)),  # 1/4 would give 300 < 301: 1/2
    (150, (150, 200)),  # 1/8 is the smallest DCT scale
    (10, (150, 200)),
])
def test_draft_decode_picks_the_smallest_scale_that_keeps_min_side(tmp_path: Path, min_side: int,
                                                                   expected_hw: tuple[int, int]) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_smooth_photo(1200, 1600)).save(path, quality=92)
    assert np.asarray(load_image(path, min_side)).shape == (*expected_hw, 3)


def test_draft_decode_is_close_to_a_full_decode_downscaled(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_smooth_photo(1200, 1600, seed=1)).save(path, quality=92)
    full = np.asarray(load_image(path))
    draft = np.asarray(load_image(path, 300))
    area = cv2.resize(full, (draft.shape[1], draft.shape[0]), interpolation=cv2.INTER_AREA)
    difference = np.abs(draft.astype(np.int16) - area.astype(np.int16))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 8  # grey levels


def test_no_draft_when_not_asked_or_not_smaller_or_not_jpeg(tmp_path: Path) -> None:
    """Bit-identical to the full decode whenever the draft cannot or need not reduce."""
    photo = _smooth_photo(600, 800, seed=2)
    jpeg, png = tmp_path / "a.jpg", tmp_path / "a.png"
    Image.fromarray(photo).save(jpeg, quality=92)
    Image.fromarray(photo).save(png)
    full = np.asarray(load_image(jpeg))
    for min_side in (None, 600, 1000):
        assert np.array_equal(np.asarray(load_image(jpeg, min_side)), full)
    assert np.array_equal(np.asarray(load_image(png, 100)), photo)


def test_draft_decode_refuses_nothing_new_and_accepts_nothing_broken(tmp_path: Path) -> None:
    """Every JPEG kind decoded at full size is decoded in draft mode too, with the same upright
    orientation, mode handling and (at least) the asked size; a truncated one is still refused."""
    rgb = _smooth_photo(640, 960, seed=3)
    cases = {
        "baseline.jpg": (Image.fromarray(rgb), {"quality": 90}),
        "progressive.jpg": (Image.fromarray(rgb), {"quality": 90, "progressive": True}),
        "grey.jpg": (Image.fromarray(rgb[..., 0]), {"quality": 90}),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), {"quality": 90}),
        "subsampled.jpg": (Image.fromarray(rgb), {"quality": 80, "subsampling": 2}),
        "small.jpg": (Image.fromarray(rgb[:100, :120]), {"quality": 90}),
    }
    for name, (img, options) in cases.items():
        path = tmp_path / name
        img.save(path, **options)
        full = np.asarray(load_image(path))
        draft = np.asarray(load_image(path, 150))
        assert draft.dtype == np.uint8 and draft.shape[2] == 3, name
        assert min(draft.shape[:2]) >= min(150, min(full.shape[:2])), name
        assert draft.shape[0] * full.shape[1] == draft.shape[1] * full.shape[0], name  # same aspect
        area = cv2.resize(full, (draft.shape[1], draft.shape[0]), interpolation=cv2.INTER_AREA)
        assert np.abs(draft.astype(np.int16) - area.astype(np.int16)).mean() < 3, name
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "sideways.jpg", exif=exif, quality=90)
    assert np.asarray(load_image(tmp_path / "sideways.jpg", 150)).shape == (240, 160, 3)  # portrait, 1/4
    cut = tmp_path / "cut.jpg"
    Image.fromarray(rgb).save(cut, quality=95)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(InputError, match="truncated"):
        load_image(cut, 150)
