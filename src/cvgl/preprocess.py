"""Query preprocessing: a photo made to look like a reference tile (or hypotheses of one).

Per photo: load it (EXIF orientation applied) and read what the camera knows (EXIF GPS, DJI
XMP); rectify a known pitch to nadir, rotate a known heading to north-up, scale by altitude +
field of view to the index's ground sample distance, crop the tile footprint. Command-line
values override metadata. For what is unknown, hypotheses: headings every ``360/rotations``
degrees (and a few crop scales when the altitude is unknown), each encoded and scored later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvgl.budget import check_allocation, image_bytes
from cvgl.data.geometry import (
    DEFAULT_HFOV_DEG,
    center_crop,
    hfov_from_focal_35mm,
    rectify_tilt,
    rotate_image,
    scale_image,
    tilt_homography,
)
from cvgl.data.images import load_photo, open_image
from cvgl.data.metadata import CameraMetadata, read_camera_metadata
from cvgl.data.views import VIEWS
from cvgl.errors import InputError

MAX_PITCH_DEG = 80.0  # steeper than this, a rectified view is mostly sky or smeared horizon
MIN_SIDE_PX = 28  # two patches: anything smaller carries no usable evidence
# Bounds of the hypothesis search (what a user may ask for; memory is checked on top, per photo).
MAX_ROTATIONS = 360  # 1 degree apart: finer than a ViT patch descriptor can tell apart
MAX_SCALES = 16
MAX_HEADING_TOLERANCE_DEG = 180.0  # +-180 already covers every heading
#: With ``QueryOptions.model_size``, the photo is decoded and downscaled so its hypotheses are this
#: many times the encoder's input side (not the photo's 3000+ px), before any warp or rotation: the
#: encoder's own antialiased resize then sees nearly the pixels a full-resolution warp would give
#: (hypothesis descriptor cosine 0.99998 on a real 12 MP photo at 3x, 0.998 at 2x: `cvgl bench throughput`).
HYPOTHESIS_OVERSAMPLE = 3.0
#: The longest side of the photo handed to local-feature matching when its ground scale is unknown.
MATCH_MAX_SIDE = 1024


@dataclass(frozen=True)
class QueryOptions:
    """What the user knows (or wants searched) about the photos; flags override metadata."""

    view: str = "drone"  # one of cvgl.data.views.VIEWS
    heading_deg: float | None = None  # overrides metadata; clockwise from north
    pitch_deg: float | None = None  # from nadir; overrides metadata
    altitude_m: float | None = None  # above ground; overrides metadata
    hfov_deg: float | None = None  # overrides the value derived from EXIF focal length
    rotations: int = 16  # heading hypotheses when the heading is unknown (16 beat 8 on Longmont)
    heading_tolerance_deg: float = 0.0  # > 0: also try heading +- this when the heading is known
    pad_to_tile: bool = True  # photo smaller than a tile: pad (keep scale) rather than zoom
    scales: tuple[float, ...] = (1.0,)  # crop-size hypotheses when the altitude is unknown
    # The encoder's input (height, width): decode and warp at the size the hypotheses need
    # (HYPOTHESIS_OVERSAMPLE x this), not at the photo's own; None: at full resolution.
    model_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}")
        self.check()

    def check(self) -> None:
        """Refuse values that would search nothing meaningful or without bound (one line each)."""
        def finite(name: str, value: float | None, low: float, high: float) -> None:
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                raise InputError(f"{name} {value!r}: expected a finite number in [{low:g}, {high:g}]")

        finite("heading", self.heading_deg, -360.0, 720.0)
        finite("pitch", self.pitch_deg, 0.0, MAX_PITCH_DEG)
        finite("altitude", self.altitude_m, 1e-3, 1e6)
        finite("hfov", self.hfov_deg, 1.0, 170.0)
        finite("heading tolerance", self.heading_tolerance_deg, 0.0, MAX_HEADING_TOLERANCE_DEG)
        if isinstance(self.rotations, bool) or not isinstance(self.rotations, int) or not 1 <= self.rotations <= MAX_ROTATIONS:
            raise InputError(f"rotations {self.rotations!r}: expected a whole number in [1, {MAX_ROTATIONS}]")
        if not self.scales or len(self.scales) > MAX_SCALES:
            raise InputError(f"scales {list(self.scales)}: give 1 to {MAX_SCALES} values")
        for scale in self.scales:
            if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0.0 < scale <= 1.0):
                raise InputError(f"scale {scale!r}: a footprint is a fraction of the photo's short side, in (0, 1]")


@dataclass
class Hypothesis:
    image: np.ndarray
    heading_deg: float
    scale: float


@dataclass
class PreparedQuery:
    """What we know about one photo before matching, and the views to encode."""

    name: str
    hypotheses: list[Hypothesis]
    heading_source: str  # flag | metadata | search | assumed-north
    pitch_deg: float
    altitude_m: float | None
    meta: CameraMetadata
    # The whole photo as the verification stage matches it (None for street/aerial views).
    match_view: MatchView | None = None


@dataclass(frozen=True)
class MatchView:
    """The prepared photo for local-feature matching: rectified to nadir when the pitch is known,
    at the index's ground sample distance when the altitude is known — but not cropped to a tile
    and not rotated, so it keeps every pixel (a footprint may straddle tiles)."""

    image: np.ndarray
    at_index_gsd: bool
    rectified_pitch_deg: float  # the pitch undone by rectification (0: nadir or unknown)
    pitch_known: bool  # False: the photo may be oblique although it was not rectified
    heading_deg: float | None  # known heading (flag/metadata), None when searched
    hfov_deg: float  # horizontal field of view of the original photo's width
    corners_px: np.ndarray | None = None  # the original photo's corners (TL, TR, BR, BL) in ``image``


def _known(flag: float | None, meta_value: float | None) -> tuple[float | None, str]:
    if flag is not None:
        return flag, "flag"
    if meta_value is not None:
        return meta_value, "metadata"
    return None, ""


MIN_CONTRAST = 2.0  # grey levels (std): below this a photo is blank for any matcher
MAX_FLAT_SHARE = 0.98  # share of the photo in one grey level above which it is blank


def content_problem(image: np.ndarray) -> str | None:
    """Why ``image`` carries no evidence (uniform, fully transparent composited to black, a 1-px
    resample, almost all one colour), or None. Measured on a small grey thumbnail, so cheap."""
    pixels = np.asarray(image)
    step = max(1, min(pixels.shape[:2]) // 128)
    grey = pixels[::step, ::step].astype(np.float32)  # subsample first: never a float copy of a big photo
    if grey.ndim == 3:
        grey = grey[..., :3].mean(-1)
    thumb = np.rint(grey)
    if float(thumb.std()) < MIN_CONTRAST:
        return f"the photo is a single uniform colour (grey std {thumb.std():.2f})"
    _, counts = np.unique(thumb, return_counts=True)
    share = counts.max() / thumb.size
    if share > MAX_FLAT_SHARE:
        return f"{share:.0%} of the photo is one colour (blank or fully transparent)"
    return None


def prepare_query(
    path: Path, options: QueryOptions, tile_m: float | None, gsd_m: float | None
) -> PreparedQuery:
    """Load a photo and turn it into the reference's geometry (or hypotheses of it).

    With ``options.model_size`` a large JPEG is decoded at a reduced DCT scale, no smaller than
    :func:`hypothesis_side` needs (from the header and the camera metadata)."""
    meta, min_side = None, None
    if options.model_size is not None:
        size = _header_size(path)  # None: unreadable header; load_photo says why
        if size is not None:
            meta = read_camera_metadata(path)
            min_side = hypothesis_side((size[1], size[0]), options, meta, tile_m, gsd_m)
    image = np.asarray(load_photo(path, min_side))  # the photo rules (formats, animation) the service applies too
    return prepare_image(image, meta if meta is not None else read_camera_metadata(path), path, options, tile_m, gsd_m)


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with open_image(path) as img:
            return img.size
    except InputError:
        return None


def hypothesis_side(
    shape_hw: tuple[int, int], options: QueryOptions, meta: CameraMetadata, tile_m: float | None, gsd_m: float | None
) -> int | None:
    """The short side (px) a photo of ``shape_hw`` needs for hypotheses at ``options.model_size``,
    or None when it needs all it has (or no model size is given).

    Without altitude, a crop of ``scale`` x the short side is resized to the model input, so the
    short side needs ``HYPOTHESIS_OVERSAMPLE x model side / min(scales)``. With altitude, the photo
    is scaled to the index GSD: it needs ``HYPOTHESIS_OVERSAMPLE x`` that canvas (the ground the
    long side covers, ``2 slant tan(hfov_long / 2)``, does not depend on the orientation). Street
    and aerial photos are resized whole, so their short side needs ``HYPOTHESIS_OVERSAMPLE x`` the
    model's longer side (either orientation)."""
    if options.model_size is None:
        return None
    short, long = min(shape_hw), max(shape_hw)
    model_side = max(options.model_size)
    need = HYPOTHESIS_OVERSAMPLE * model_side / min(min(options.scales), 1.0)
    altitude, _ = _known(options.altitude_m, meta.relative_altitude_m)
    if options.view != "drone":
        need = HYPOTHESIS_OVERSAMPLE * model_side
    elif altitude is not None and altitude > 0 and tile_m and gsd_m:
        pitch = float(_known(options.pitch_deg, meta.pitch_from_nadir_deg)[0] or 0.0)
        if not 0.0 <= pitch <= MAX_PITCH_DEG:
            return None  # refused by prepare_image, with its reason
        hfov_long = options.hfov_deg or hfov_from_focal_35mm(meta.focal_length_35mm, DEFAULT_HFOV_DEG)
        ground_long_m = altitude / math.cos(math.radians(pitch)) * 2.0 * math.tan(math.radians(hfov_long) / 2.0)
        need = HYPOTHESIS_OVERSAMPLE * short * ground_long_m / (long * gsd_m)
    need = max(MIN_SIDE_PX, math.ceil(need))
    return need if need < short else None


def prepare_image(
    image: np.ndarray, meta: CameraMetadata, path: Path | str, options: QueryOptions, tile_m: float | None,
    gsd_m: float | None,
) -> PreparedQuery:
    """:func:`prepare_query` for pixels already in memory (a video frame): ``meta`` is what the
    camera recorded (empty for a video), ``path`` names the frame in messages and answers."""
    if min(image.shape[:2]) < MIN_SIDE_PX:
        raise InputError(f"{path}: image is {image.shape[1]}x{image.shape[0]} px, too small to locate (min {MIN_SIDE_PX})")
    problem = content_problem(image)
    if problem:
        raise InputError(f"{path}: {problem}; nothing to match")
    need = hypothesis_side(image.shape[:2], options, meta, tile_m, gsd_m)
    if need is not None:  # downscale once, before any warp or rotation
        image = scale_image(image, need / min(image.shape[:2]))
    if options.view != "drone":
        # Street and aerial photos are used as they are; aerial ones are assumed north-up
        # unless a heading is given.
        heading, source = _known(options.heading_deg, None)
        heading = heading if heading is not None else 0.0
        rotated = rotate_image(image, heading) if heading else image
        return PreparedQuery(str(path), [Hypothesis(rotated, heading, 1.0)], source or "assumed-north", 0.0, None, meta)

    height, width = image.shape[:2]
    # The 35 mm-equivalent field of view spans the long side; our camera model takes the width's.
    hfov_long = options.hfov_deg or hfov_from_focal_35mm(meta.focal_length_35mm, DEFAULT_HFOV_DEG)
    hfov = math.degrees(2 * math.atan(math.tan(math.radians(hfov_long) / 2) * width / max(width, height)))
    pitch, pitch_source = _known(options.pitch_deg, meta.pitch_from_nadir_deg)
    pitch = float(pitch or 0.0)
    if not 0.0 <= pitch <= MAX_PITCH_DEG:
        raise InputError(
            f"{path}: camera pitch {pitch:.0f} degrees from nadir (gimbal {pitch - 90:.0f}); only views between "
            f"nadir and {MAX_PITCH_DEG:.0f} degrees can be matched to aerial tiles; use --view street for level shots"
        )
    # The original photo's corners, followed through rectification and scaling: the footprint a
    # verified homography reports is the photo's, not the (black-cornered) canvas's.
    corners = np.array([[0.0, 0.0], [width - 1.0, 0.0], [width - 1.0, height - 1.0], [0.0, height - 1.0]])
    if pitch > 1.0:
        image = rectify_tilt(image, pitch, hfov)
        back = np.linalg.inv(tilt_homography(width, height, pitch, hfov))
        mapped = np.c_[corners, np.ones(4)] @ back.T
        corners = mapped[:, :2] / mapped[:, 2:3]
    altitude, _ = _known(options.altitude_m, meta.relative_altitude_m)
    if altitude is not None and not altitude > 0:
        raise InputError(f"{path}: altitude {altitude:g} m above ground is not positive; pass --altitude")
    heading, heading_source = _known(options.heading_deg, meta.heading_deg)
    n_angles = (3 if options.heading_tolerance_deg > 0 else 1) if heading is not None else options.rotations

    # Each view is (canvas, crop side, scale): hypotheses rotate the whole canvas and then cut
    # the central crop, so a photo with margin around the tile footprint rotates without
    # black corners.
    views: list[tuple[np.ndarray, int, float]] = []
    if altitude is not None and tile_m and gsd_m:
        # Rectification keeps the photo-centre resolution, set by the slant range to the centre.
        slant = altitude / math.cos(math.radians(pitch))
        photo_gsd = slant * 2.0 * math.tan(math.radians(hfov) / 2.0) / width
        tile_px = int(round(tile_m / gsd_m))
        _check_rescale(path, image, altitude, photo_gsd, gsd_m, tile_px, n_angles)
        scaled = scale_image(image, photo_gsd / gsd_m)
        photo, at_gsd = scaled, True
        fx, fy = scaled.shape[1] / image.shape[1], scaled.shape[0] / image.shape[0]
        corners = (corners + 0.5) * np.array([fx, fy]) - 0.5
        if options.pad_to_tile:
            # A photo covering less ground than a tile is padded, not zoomed: scale is evidence.
            views.append((pad_to(scaled, tile_px), tile_px, 1.0))
        else:
            views.append((scaled, min(tile_px, *scaled.shape[:2]), 1.0))
    else:
        # Unknown ground scale: match at most MATCH_MAX_SIDE px on the long side (a 12 MP photo at
        # full size costs a learned matcher gigabytes; the windows it meets are ~450 px).
        shrink = min(1.0, MATCH_MAX_SIDE / max(image.shape[:2]))
        photo, at_gsd = (scale_image(image, shrink) if shrink < 1.0 else image), False
        fx, fy = photo.shape[1] / image.shape[1], photo.shape[0] / image.shape[0]
        corners = (corners + 0.5) * np.array([fx, fy]) - 0.5
        side = min(height, width)
        check_allocation(
            f"{path}: {n_angles} heading x {len(options.scales)} scale hypotheses of this {width}x{height} px photo",
            n_angles * len(options.scales) * image_bytes(height, width, image.shape[2] if image.ndim == 3 else 1),
            "pass --heading (or fewer --rotations / --scales), or downsample the photo",
        )
        views += [(image, max(MIN_SIDE_PX, int(round(side * min(s, 1.0)))), s) for s in options.scales]

    if heading is not None:
        # A compass is good to about +-10 degrees: optionally also try the heading +- tolerance.
        tol = options.heading_tolerance_deg
        angles = [float(heading)] + ([float(heading) - tol, float(heading) + tol] if tol > 0 else [])
    else:
        heading_source = "search"
        angles = [i * 360.0 / options.rotations for i in range(options.rotations)]
    hypotheses = [
        Hypothesis(center_crop(rotate_image(canvas, angle) if angle else canvas, crop), angle, scale)
        for canvas, crop, scale in views
        for angle in angles
    ]
    known = None if heading_source == "search" else float(heading)
    return PreparedQuery(str(path), hypotheses, heading_source, pitch, altitude, meta,
                         MatchView(photo, at_gsd, pitch, bool(pitch_source), known, hfov, corners))


def _check_rescale(path: Path, image: np.ndarray, altitude: float, photo_gsd: float, gsd_m: float,
                   tile_px: int, n_angles: int) -> None:
    """Before scaling a photo to the index's ground resolution: refuse a footprint too small to
    carry evidence (an altitude of centimetres) and a canvas too big for the memory budget (an
    altitude of 100 km), naming the altitude and the sizes."""
    height, width = image.shape[:2]
    factor = photo_gsd / gsd_m
    out_h, out_w = height * factor, width * factor
    if not min(out_h, out_w) >= MIN_SIDE_PX:
        raise InputError(
            f"{path}: at {altitude:g} m above ground the photo covers {min(out_h, out_w) * gsd_m:.3g} m, "
            f"{min(out_h, out_w):.1f} px at the index's {gsd_m:g} m/px (min {MIN_SIDE_PX}); "
            "check the altitude (--altitude, or the photo's XMP RelativeAltitude)"
        )
    canvas = image_bytes(max(out_h, tile_px), max(out_w, tile_px), image.shape[2] if image.ndim == 3 else 1)
    check_allocation(
        f"{path}: altitude {altitude:g} m scales this {width}x{height} px photo by {factor:.3g} to "
        f"{out_w:.0f}x{out_h:.0f} px, which with {n_angles} heading hypotheses",
        (2 + n_angles) * canvas,
        "check the altitude (--altitude, or the photo's XMP RelativeAltitude) and the camera's field of view",
    )


def pad_to(image: np.ndarray, side: int) -> np.ndarray:
    """Centre ``image`` on a black canvas at least ``side`` pixels in each dimension."""
    height, width = image.shape[:2]
    out_h, out_w = max(height, side), max(width, side)
    if (out_h, out_w) == (height, width):
        return image
    canvas = np.zeros((out_h, out_w) + image.shape[2:], dtype=image.dtype)
    top, left = (out_h - height) // 2, (out_w - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas
