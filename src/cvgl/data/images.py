"""Load any user image as an upright 8-bit RGB picture.

Every encoder and warp in cvgl expects the same thing: 8-bit RGB, the right way up. Users hand
us phone and drone JPEGs that are stored sideways with an EXIF orientation flag, PNG exports with
alpha, 16-bit or float TIFFs from photogrammetry tools, and the odd CMYK scan. This module turns
all of them into that one format, and turns every way a file can be broken into a one-line
:class:`~cvgl.errors.InputError` instead of a Pillow traceback.

One rule for photos, in ``cvgl locate`` and the service alike (:func:`load_photo`): a photo is
one still picture in :data:`PHOTO_FORMATS` (JPEG, PNG, TIFF, WebP: what cameras and GIS exports
write). An animated image (GIF, APNG, WebP) is refused everywhere (also as a tile) with one line
naming the file: which frame would be "the photo" is a guess, and a wrong guess is a confident
wrong answer. (A multi-page TIFF is read at its first page, as every GIS tool does.) Tiles and
dataset images may also be still GIF or BMP (:data:`IMAGE_FORMATS`).
Decoding is bounded twice: :data:`MAX_PIXELS` refuses bombs from the header, and the memory a
decode will take (pixels x bands x depth, with its working copies) is checked against the memory
budget of :mod:`cvgl.budget` before any pixel is decoded.

Alpha convention: transparent pixels are composited onto BLACK (RGB * alpha). Transparency in
aerial exports marks "no data" (outside the survey area), and the colour stored under it is
undefined - often white, sometimes garbage. Black is also the fill every warp in
:mod:`cvgl.data.geometry` uses for areas outside the view, so "no data" looks the same everywhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from cvgl.budget import check_allocation
from cvgl.errors import InputError

#: Largest image (width * height) we agree to decode. A 200 MP RGB image already needs 600 MB;
#: anything larger is far more likely a decompression bomb or a mis-exported raster than a photo.
MAX_PIXELS = 200_000_000

# Pillow refuses images above 2 * MAX_IMAGE_PIXELS (178 MP by default) with its own exception,
# before we get to look at the size. Align its hard limit with ours so a legitimate 190 MP aerial
# frame is accepted and anything bigger gets OUR message. This only ever relaxes a stricter
# default, never disables the check.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS // 2:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2

#: Pillow formats read as photos (MPO is a JPEG with an embedded preview, as many drones write).
PHOTO_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "WEBP")
#: Pillow formats read as any image (tiles, dataset images).
IMAGE_FORMATS = (*PHOTO_FORMATS, "GIF", "BMP")
#: Formats whose extra frames are an animation (refused), not previews or pages (first one read).
_ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_TAG_BITS_PER_SAMPLE = 258
_TAG_SAMPLE_FORMAT = 339
_TAG_WIDTH = 256
_TAG_HEIGHT = 257


def stretch_to_uint8(
    array: np.ndarray,
    low_pct: float = 2.0,
    high_pct: float = 98.0,
    valid_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Map a high-dynamic-range array to uint8 by a per-channel percentile stretch.

    16-bit and float imagery rarely uses its full range (12-bit sensors, reflectance in 0..0.3),
    so a plain bit shift gives a nearly black picture. Clipping at the ``low_pct`` and
    ``high_pct`` percentiles (QGIS's default "cumulative count cut") spreads the real content over
    0..255 and is robust to a few hot pixels.

    ``array`` is HxW or HxWxC. Each channel is stretched on its own, which also removes per-band
    offsets such as blue haze. ``valid_mask`` (HxW, True = real data) excludes nodata pixels from
    the percentiles; they, and any NaN/inf, come out as 0. A constant channel, or one with no valid
    pixel, becomes all zeros rather than NaN.
    """
    arr = np.asarray(array)
    if arr.ndim not in (2, 3):
        raise ValueError(f"stretch_to_uint8 expects an HxW or HxWxC array, got shape {arr.shape}")
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
    if valid_mask is None:
        mask = np.ones(arr.shape[:2], dtype=bool)
    else:
        mask = np.asarray(valid_mask, dtype=bool)
    if mask.shape != arr.shape[:2]:
        raise ValueError(f"valid_mask shape {mask.shape} does not match image {arr.shape[:2]}")

    channels = arr[..., None] if arr.ndim == 2 else arr
    out = np.zeros(channels.shape, dtype=np.uint8)
    for c in range(channels.shape[2]):
        out[..., c] = _stretch_channel(channels[..., c], mask, low_pct, high_pct)
    return out[..., 0] if arr.ndim == 2 else out


def _stretch_channel(
    band: np.ndarray, mask: np.ndarray, low_pct: float, high_pct: float
) -> np.ndarray:
    """Stretch one HxW band; float64 so 32-bit integers and large floats keep their precision."""
    values = band.astype(np.float64, copy=False)
    valid = mask & np.isfinite(values)
    if not valid.any():
        return np.zeros(band.shape, dtype=np.uint8)
    low, high = np.percentile(values[valid], [low_pct, high_pct])
    if not high > low:
        return np.zeros(band.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    scaled = np.where(valid, scaled, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def open_image(path: str | Path) -> Image.Image:
    """Open an image lazily (header only) after checking it exists, is non-empty and not absurd.

    Shared by :func:`load_image` and the metadata reader so both report the same one-line errors.
    The caller owns the returned image and should close it (use it as a context manager).
    """
    p = Path(path)
    _check_file(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{p}: image is larger than {MAX_PIXELS // 1_000_000} megapixels; "
                         "downsample or tile it before use") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{p}: not a readable image (unknown or unsupported format); "
                         "convert it to JPEG, PNG or TIFF") from exc
    except PermissionError as exc:
        raise InputError(f"{p}: permission denied; make the file readable") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on bad headers
        raise InputError(f"{p}: image header is corrupt ({_reason(exc)}); "
                         "re-export or re-download the file") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise InputError(f"{p}: image has zero width or height; re-export the file")
    if width * height > MAX_PIXELS:
        img.close()
        raise _too_big(p, width, height)
    if img.format not in IMAGE_FORMATS:
        img.close()
        raise InputError(f"{p}: {img.format} images are not read; convert it to JPEG, PNG or TIFF")
    frames = _frame_count(img)
    if img.format in _ANIMATED_FORMATS and frames > 1:
        img.close()
        raise InputError(f"{p}: animated {img.format} ({frames} frames); which frame is the photo is a guess, "
                         "so export the one you mean as a still JPEG or PNG")
    return img


def _frame_count(img: Image.Image) -> int:
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception:  # noqa: BLE001 - a broken frame table: the first frame is still readable
        return 1


def decode_bytes(img: Image.Image) -> float:
    """Memory :func:`load_image` needs for ``img`` (header only): the decoded pixels, the upright
    copy, the RGB result and the caller's array, plus the float work of alpha and deep images."""
    width, height = img.size
    bands = len(img.getbands())
    depth = 4 if img.mode in ("I", "F") else 2 if img.mode.startswith("I;16") else 1
    per_px = 2.0 * bands * depth + 6.0
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        per_px += 18.0  # RGBA copy + uint16 premultiply
    if img.mode in _HIGH_DEPTH_MODES:
        per_px += 24.0  # float64 stretch of one band, with its mask
    return float(width) * float(height) * per_px


def check_decode(p: Path, img: Image.Image) -> None:
    """Refuse, before decoding, an image whose decode alone would exceed the memory budget."""
    width, height = img.size
    check_allocation(f"{p}: decoding this {width}x{height} {img.mode} image", decode_bytes(img),
                     "downsample it (e.g. to 4000 px on the long side) before use")


#: Formats Pillow can decode at a reduced scale (JPEG's DCT scaling: 1/2, 1/4, 1/8).
DRAFT_FORMATS = ("JPEG", "MPO")


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Return the image at ``path`` as 8-bit RGB with its EXIF orientation applied.

    The pixels are fully decoded here (``img.load()``), so truncated or corrupt files fail now
    with an :class:`InputError` naming the file, instead of later inside a model or a worker.
    Pillow's ``LOAD_TRUNCATED_IMAGES`` is left False on purpose: a half-grey image would be
    silently embedded and matched.

    ``min_side``: the smallest short side the caller needs. A JPEG larger than that is decoded in
    Pillow's draft mode, at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at
    least ``min_side``: a 12 MP photo needed at ~450 px decodes in a fraction of the time and
    memory. Other formats, and None, decode at full size; the result is never resized further.
    """
    p = Path(path)
    try:
        img = open_image(p)
    except InputError as exc:
        # Pillow cannot identify float or exotic multi-band TIFFs; OpenCV can.
        if isinstance(exc.__cause__, UnidentifiedImageError) and _is_tiff(p):
            return Image.fromarray(_load_tiff_with_opencv(p))
        raise
    with img:
        if _is_high_depth_multiband_tiff(img):
            return Image.fromarray(_load_tiff_with_opencv(p))
        if min_side is not None and img.format in DRAFT_FORMATS and min(img.size) > min_side:
            img.draft(img.mode, (int(min_side), int(min_side)))  # header-only: sets the DCT scale
        check_decode(p, img)
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ...
            raise InputError(f"{p}: image data is truncated or corrupt ({_reason(exc)}); "
                             "re-export or re-download the file") from exc
        upright = _apply_orientation(img)
    return _to_rgb(upright, p)


def load_photo(path: str | Path, min_side: int | None = None) -> Image.Image:
    """:func:`load_image` for a photo to locate: refuses formats outside :data:`PHOTO_FORMATS`
    first (the same rule as the service's upload check), so a GIF is refused by both."""
    p = Path(path)
    problem = _photo_format_problem(p)
    if problem:
        raise InputError(problem)
    return load_image(p, min_side)


def _photo_format_problem(p: Path) -> str | None:
    try:
        with open_image(p) as img:
            fmt = img.format
    except InputError:
        return None  # load_image reports it (or decodes an exotic TIFF with OpenCV)
    if fmt not in PHOTO_FORMATS:
        return f"{p}: {fmt} is not a photo format cvgl reads (JPEG, PNG, TIFF, WebP); convert it"
    return None


def image_to_tensor(image: Image.Image, size: tuple[int, int]):
    """An RGB PIL image as a float ``[3, H, W]`` tensor in [0, 1] at ``size`` (H, W), bicubic.

    The one resize used for encoding and for training batches, so both see the same pixels.
    """
    import torch

    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _check_file(p: Path) -> None:
    """Catch missing, folder and empty paths before Pillow turns them into vaguer errors."""
    if not p.exists():
        raise InputError(f"{p}: file not found; check the path")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an image file; pass the path of an image")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise InputError(f"{p}: cannot access file ({_reason(exc)}); check permissions") from exc
    if size == 0:
        raise InputError(f"{p}: file is empty (0 bytes); re-export or re-download it")


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip per EXIF Orientation so the pixels are the way the photographer saw them.

    A malformed EXIF block must not make an otherwise good photo unusable, so if Pillow cannot
    parse it we keep the stored orientation.
    """
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF is common in the wild; pixels are still fine
        return img.copy()
    return upright if upright is not None else img.copy()


def _to_rgb(img: Image.Image, p: Path) -> Image.Image:
    """Convert any decoded Pillow mode to 8-bit RGB (see module docstring for alpha)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_DEPTH_MODES:
        gray = stretch_to_uint8(_high_depth_array(img))
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    if mode in _ALPHA_MODES:
        return Image.fromarray(_composite_on_black(np.asarray(img.convert("RGBA"))))
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise InputError(f"{p}: unsupported colour mode {img.mode!r}; "
                         "convert the image to RGB") from exc


def _high_depth_array(img: Image.Image) -> np.ndarray:
    """Pixels of a single-band 16/32-bit or float image as a native-endian numpy array."""
    arr = np.asarray(img)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """Premultiply RGB by alpha (uint8 in, uint8 out); alpha 0 -> black, 255 -> unchanged."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _is_tiff(p: Path) -> bool:
    try:
        with p.open("rb") as fp:
            return fp.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _is_high_depth_multiband_tiff(img: Image.Image) -> bool:
    """True for >8-bit RGB(A) TIFFs, which Pillow opens but truncates to their high byte.

    12-bit content in a 16-bit container then comes out nearly black, so we read those with
    OpenCV at full depth and stretch instead.
    """
    if img.format != "TIFF" or img.mode in _HIGH_DEPTH_MODES:
        return False
    bits = img.tag_v2.get(_TAG_BITS_PER_SAMPLE, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8


def _tiff_size(p: Path) -> tuple[int, int] | None:
    """(width, height) from the first TIFF directory, without decoding any pixels."""
    try:
        with p.open("rb") as fp:
            header = fp.read(8)
            ifd = TiffImagePlugin.ImageFileDirectory_v2(header)
            fp.seek(ifd.next)
            ifd.load(fp)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell", handled by the caller
        return None
    width, height = ifd.get(_TAG_WIDTH), ifd.get(_TAG_HEIGHT)
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    return width, height


def _load_tiff_with_opencv(p: Path) -> np.ndarray:
    """Decode a 16-bit/float multi-band TIFF with OpenCV and stretch it to 8-bit RGB.

    The size is checked from the TIFF header first so a bomb is refused before allocation.
    Alpha (4th band, or 2nd for gray+alpha) marks nodata: excluded from the stretch and
    composited onto black, as for 8-bit images.
    """
    size = _tiff_size(p)
    if size is None:
        raise InputError(f"{p}: TIFF header is corrupt or unsupported; re-export the file "
                         "as an 8- or 16-bit TIFF")
    if size[0] * size[1] > MAX_PIXELS:
        raise _too_big(p, *size)
    # Up to 4 bands of up to 4 bytes, as read and as float64 for the stretch, plus the RGB result.
    check_allocation(f"{p}: decoding this {size[0]}x{size[1]} TIFF", float(size[0]) * size[1] * (16 + 32 + 6) + p.stat().st_size,
                     "downsample it before use")
    try:
        data = np.fromfile(p, dtype=np.uint8)
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error) as exc:
        raise InputError(f"{p}: cannot decode TIFF ({_reason(exc)}); "
                         "re-export it as an 8- or 16-bit TIFF") from exc
    if arr is None:
        raise InputError(f"{p}: TIFF data is truncated, corrupt or in an unsupported layout; "
                         "re-export it as an 8- or 16-bit TIFF")
    return _opencv_to_rgb8(arr, p)


def _opencv_to_rgb8(arr: np.ndarray, p: Path) -> np.ndarray:
    """OpenCV's BGR(A)/gray(+alpha) array at any depth -> HxWx3 uint8 RGB."""
    if arr.ndim == 2:
        arr = arr[..., None]
    bands = arr.shape[2]
    if bands == 1:
        color, alpha = np.repeat(arr, 3, axis=2), None
    elif bands == 2:
        color, alpha = np.repeat(arr[..., :1], 3, axis=2), arr[..., 1]
    elif bands in (3, 4):
        color = arr[..., 2::-1]  # BGR -> RGB
        alpha = arr[..., 3] if bands == 4 else None
    else:
        raise InputError(f"{p}: TIFF has {bands} bands, expected 1-4; "
                         "export an RGB or grayscale image")
    if alpha is None:
        return stretch_to_uint8(color)
    valid = alpha > 0
    rgb = stretch_to_uint8(color, valid_mask=valid).astype(np.float64)
    opaque = float(np.iinfo(alpha.dtype).max) if alpha.dtype.kind in "ui" else 1.0
    weight = np.clip(alpha.astype(np.float64) / opaque, 0.0, 1.0)
    return np.rint(rgb * weight[..., None]).astype(np.uint8)


def _too_big(p: Path, width: int, height: int) -> InputError:
    megapixels = width * height / 1e6
    limit = MAX_PIXELS // 1_000_000
    return InputError(f"{p}: image is {width}x{height} ({megapixels:.0f} megapixels), over the "
                      f"{limit} megapixel limit; downsample or tile it before use")


def _reason(exc: BaseException) -> str:
    """A short, single-line description of a low-level exception for our one-line messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


#: Photo file types ``cvgl locate`` picks out of a folder (by extension, case-insensitive).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")


def photo_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a photo, from its header alone (missing, empty, not an image, an
    unread format, animated, too big to decode), or None. Cheap: no pixel is decoded."""
    p = Path(path)
    try:
        with open_image(p) as img:
            if not _is_high_depth_multiband_tiff(img):
                check_decode(p, img)
    except InputError as exc:
        if isinstance(exc.__cause__, UnidentifiedImageError) and _is_tiff(p) and _tiff_size(p) is not None:
            return None  # a float / exotic TIFF: OpenCV decodes it
        return str(exc)
    return _photo_format_problem(p)


def check_photos(paths: list[Path]) -> None:
    """Check every photo's header before a model is loaded: when none is usable, stop now with
    the first reason (one line). Photos that fail among usable ones are left to the batch, which
    reports each as skipped with the same reason."""
    problems = [problem for problem in map(photo_problem, paths) if problem]
    if paths and len(problems) == len(paths):
        more = f" (and {len(problems) - 1} more photo(s) that cannot be read)" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")


def photo_paths(items: list[Path]) -> list[Path]:
    """Photos named on the command line: files as given, folders expanded to the photos inside
    them (sorted by name, not recursive). A missing path or a folder with no photo is an
    :class:`InputError` naming it, before any model is loaded."""
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
            if not found:
                raise InputError(f"{item}: folder holds no photo ({', '.join(PHOTO_SUFFIXES)})")
            out.extend(found)
        elif item.exists():
            out.append(item)
        else:
            raise InputError(f"{item}: no such photo or folder")
    return out
