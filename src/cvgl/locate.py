"""``cvgl locate``: photo -> (lat, lon, confidence, evidence) against a reference index.

Per photo:

1. load it (EXIF orientation applied) and read what the camera knows (EXIF GPS, DJI XMP);
2. make it look like a reference tile: rectify a known pitch to nadir, rotate a known heading to
   north-up, scale by altitude + field of view to the index's ground sample distance, crop the
   tile footprint. Command-line values override metadata;
3. for what is unknown, search: headings every ``360/rotations`` degrees (and a few crop scales
   when the altitude is unknown). Each hypothesis is encoded, aligned and scored against every
   tile; a tile's score is its best hypothesis, and the winning hypothesis is reported;
4. answer: the position is the softmax-weighted mean of the tiles near the best one, and the
   confidence is the softmax mass within that radius — high when the evidence agrees on one
   place, low when similar scores are spread over the map.

Scoring every tile (``ReferenceIndex.scores``, dense ``[H, N]``) is exact and is what a small
flat index uses (at most ``DENSE_MAX`` tiles). Larger or non-flat indexes (SQ8, IVF-PQ,
Qdrant) are searched instead: each hypothesis asks the backend for its ``options.candidates``
best tiles under the *stored* alignment, and the union of candidates is re-scored exactly
against raw.npy — with the locate-time batch alignment when there is one, so for these indexes
the batch alignment applies to re-ranking the top candidates only (tiles the stored alignment
ranks below the candidate pool are never seen). Tiles outside the pool get score ``-inf``: the
softmax confidence is then taken over the pool, which at temperature 0.02 misses mass only
from tiles far below the best. A geographic prior (``near`` + ``radius_km``) keeps only tiles
within the radius, in both paths.

The reported ``lat``/``lon`` is the ground point at the photo's centre (what the photo shows).
When pitch, heading and altitude are all known we also give ``camera_lat``/``camera_lon``, the
drone's own position, and ``error_m`` (against EXIF GPS, which records the camera) uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvgl.data.geometry import (
    DEFAULT_HFOV_DEG,
    center_crop,
    hfov_from_focal_35mm,
    rectify_tilt,
    rotate_image,
    scale_image,
)
from cvgl.data.images import load_image
from cvgl.data.metadata import CameraMetadata, read_camera_metadata
from cvgl.errors import CvglError, InputError
from cvgl.geo import geodesic_distance_m, offset_latlon
from cvgl.index.backends import FLAT_MAX
from cvgl.index.store import ReferenceIndex
from cvgl.models.encoder import Encoder
from cvgl.zeroshot.alignment import fit_alignment

VIEWS = ("drone", "street", "aerial")
MAX_PITCH_DEG = 80.0  # steeper than this, a rectified view is mostly sky or smeared horizon
MIN_SIDE_PX = 28  # two patches: anything smaller carries no usable evidence
MIN_BATCH_ALIGNMENT = 16  # photos needed before a batch's own statistics are trusted
DENSE_MAX = FLAT_MAX  # flat indexes up to this many tiles are scored densely (exact, as before)


@dataclass(frozen=True)
class LocateOptions:
    view: str = "drone"
    top_k: int = 5
    heading_deg: float | None = None  # overrides metadata; clockwise from north
    pitch_deg: float | None = None  # from nadir; overrides metadata
    altitude_m: float | None = None  # above ground; overrides metadata
    hfov_deg: float | None = None  # overrides the value derived from EXIF focal length
    rotations: int = 16  # heading hypotheses when the heading is unknown (16 beat 8 on Longmont)
    heading_tolerance_deg: float = 0.0  # > 0: also try heading +- this when the heading is known
    pad_to_tile: bool = True  # photo smaller than a tile: pad (keep scale) rather than zoom
    scales: tuple[float, ...] = (1.0,)  # crop-size hypotheses when the altitude is unknown
    temperature: float = 0.02  # softmax temperature on cosine scores, for confidence
    batch_size: int = 16
    # Fit a query-view alignment on this batch's own photos (no labels) when there are at least
    # MIN_BATCH_ALIGNMENT of them: "center" measured best leak-free on Longmont. None = index's.
    batch_alignment: str | None = "center"
    near: tuple[float, float] | None = None  # geographic prior: (lat, lon) ...
    radius_km: float | None = None  # ... and only tiles within this radius
    candidates: int = 256  # per hypothesis, when the index is searched instead of scored densely


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


def _known(flag: float | None, meta_value: float | None) -> tuple[float | None, str]:
    if flag is not None:
        return flag, "flag"
    if meta_value is not None:
        return meta_value, "metadata"
    return None, ""


def prepare_query(
    path: Path, options: LocateOptions, tile_m: float | None, gsd_m: float | None
) -> PreparedQuery:
    """Load a photo and turn it into the reference's geometry (or hypotheses of it)."""
    image = np.asarray(load_image(path))
    if min(image.shape[:2]) < MIN_SIDE_PX:
        raise InputError(f"{path}: image is {image.shape[1]}x{image.shape[0]} px, too small to locate (min {MIN_SIDE_PX})")
    meta = read_camera_metadata(path)
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
    pitch, _ = _known(options.pitch_deg, meta.pitch_from_nadir_deg)
    pitch = float(pitch or 0.0)
    if not 0.0 <= pitch <= MAX_PITCH_DEG:
        raise InputError(
            f"{path}: camera pitch {pitch:.0f} degrees from nadir (gimbal {pitch - 90:.0f}); only views between "
            f"nadir and {MAX_PITCH_DEG:.0f} degrees can be matched to aerial tiles; use --view street for level shots"
        )
    if pitch > 1.0:
        image = rectify_tilt(image, pitch, hfov)
    altitude, _ = _known(options.altitude_m, meta.relative_altitude_m)
    if altitude is not None and not altitude > 0:
        raise InputError(f"{path}: altitude {altitude:g} m above ground is not positive; pass --altitude")
    heading, heading_source = _known(options.heading_deg, meta.heading_deg)

    # Each view is (canvas, crop side, scale): hypotheses rotate the whole canvas and then cut
    # the central crop, so a photo with margin around the tile footprint rotates without
    # black corners.
    views: list[tuple[np.ndarray, int, float]] = []
    if altitude is not None and tile_m and gsd_m:
        # Rectification keeps the photo-centre resolution, set by the slant range to the centre.
        slant = altitude / math.cos(math.radians(pitch))
        photo_gsd = slant * 2.0 * math.tan(math.radians(hfov) / 2.0) / width
        scaled = scale_image(image, photo_gsd / gsd_m)
        tile_px = int(round(tile_m / gsd_m))
        if options.pad_to_tile:
            # A photo covering less ground than a tile is padded, not zoomed: scale is evidence.
            views.append((pad_to(scaled, tile_px), tile_px, 1.0))
        else:
            views.append((scaled, min(tile_px, *scaled.shape[:2]), 1.0))
    else:
        side = min(height, width)
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
    return PreparedQuery(str(path), hypotheses, heading_source, pitch, altitude, meta)


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


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = (x - x.max()) / temperature
    e = np.exp(z)
    return e / e.sum()


def ranked_tiles(tile_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray | slice]:
    """(scored tiles best first, which tiles are scored) for per-tile scores.

    A searched index or a geographic prior leaves unscored tiles at -inf: they are never ranked,
    and only the finite scores are sorted (ties keep tile order), not all N tiles. The second
    value indexes the scored tiles (``slice(None)`` when every tile is scored).
    """
    finite = np.isfinite(tile_scores)
    scored = slice(None) if finite.all() else np.flatnonzero(finite)
    rows = np.arange(len(tile_scores))[scored]
    return rows[np.argsort(-tile_scores[scored], kind="stable")], scored


def answer(
    query: PreparedQuery, tile_scores: np.ndarray, best_hypothesis: np.ndarray, index: ReferenceIndex, options: LocateOptions
) -> dict:
    """Turn per-tile scores into the JSON answer (position, confidence, evidence)."""
    tiles = index.tiles
    lat, lon = tiles["lat"].to_numpy(), tiles["lon"].to_numpy()
    ranked, scored = ranked_tiles(tile_scores)
    order = ranked[: options.top_k]
    best = int(order[0])
    radius = index.manifest.correct_radius_m
    s_lat, s_lon = lat[scored], lon[scored]  # only scored tiles take part (see module doc)
    weights = softmax(tile_scores[scored], options.temperature)
    near = geodesic_distance_m(lat[best], lon[best], s_lat, s_lon) <= radius
    w = weights * near
    est_lat = float((w * s_lat).sum() / w.sum())
    est_lon = float((w * s_lon).sum() / w.sum())
    hyp = query.hypotheses[int(best_hypothesis[best])]
    result: dict = {
        "query": query.name,
        "lat": est_lat,
        "lon": est_lon,
        "confidence": float(w.sum()),
        "heading_deg": float(hyp.heading_deg % 360.0),
        "heading_source": query.heading_source,
        "pitch_deg": query.pitch_deg,
        "altitude_m": query.altitude_m,
        # Fraction of the photo's short side taken as the tile footprint (the winning hypothesis
        # when the altitude is unknown; 1.0 when the altitude fixed the scale).
        "scale": float(hyp.scale),
        "top_k": [
            {"tile_id": str(tiles["tile_id"].iloc[i]), "lat": float(lat[i]), "lon": float(lon[i]), "score": float(tile_scores[i])}
            for i in order
        ],
    }
    camera = (est_lat, est_lon)
    if query.pitch_deg > 1.0 and query.altitude_m is not None:
        # The photo centre lies altitude*tan(pitch) ahead of the camera along the heading (known,
        # or the winning hypothesis when searched).
        ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
        back = math.radians(hyp.heading_deg)
        camera = offset_latlon(est_lat, est_lon, -ahead * math.sin(back), -ahead * math.cos(back))
        result["camera_lat"], result["camera_lon"] = float(camera[0]), float(camera[1])
    if query.meta.gps_lat is not None and query.meta.gps_lon is not None:
        result["true_lat"], result["true_lon"] = query.meta.gps_lat, query.meta.gps_lon
        if "camera_lat" in result and query.heading_source != "search":
            # With a known heading, the ground point the photo centre shows (what tiles match).
            ahead = query.altitude_m * math.tan(math.radians(query.pitch_deg))
            heading = math.radians(query.hypotheses[0].heading_deg)  # the known heading itself
            centre = offset_latlon(query.meta.gps_lat, query.meta.gps_lon, ahead * math.sin(heading), ahead * math.cos(heading))
            result["true_center_lat"], result["true_center_lon"] = float(centre[0]), float(centre[1])
        result["error_m"] = float(geodesic_distance_m(camera[0], camera[1], query.meta.gps_lat, query.meta.gps_lon))
    return result


def best_over_hypotheses(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile best score over hypotheses ``[H, N]``, and which hypothesis gave it."""
    return scores.max(0), scores.argmax(0)


def dense_scoring(index: ReferenceIndex) -> bool:
    """Score every tile (exact, as for the demo) or search the backend (see module doc)."""
    return index.index_type == "flat" and len(index) <= DENSE_MAX


def hypothesis_scores(
    index: ReferenceIndex, desc: np.ndarray, alignment, options: LocateOptions, allowed: np.ndarray | None,
    prior: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile best score over a photo's hypotheses ``[N]`` (``-inf`` = not scored) and which
    hypothesis gave it: dense for small flat indexes, else backend candidates re-scored exactly.

    ``allowed``: rows inside the geographic prior (None: no prior); ``prior``: that prior in the
    backend's terms (:meth:`ReferenceIndex.prior`), passed by callers that score many photos."""
    if dense_scoring(index):
        scores = index.exact_scores(desc, None, alignment)
        if allowed is not None:
            masked = np.full_like(scores, -np.inf)
            masked[:, allowed] = scores[:, allowed]
            scores = masked
        return best_over_hypotheses(scores)
    if prior is None:
        prior = index.prior(options.near, options.radius_km) if allowed is not None else (None, None)
    _, rows = index.candidates(desc, options.candidates, prior)
    pool = np.unique(rows[rows >= 0])
    exact = index.exact_scores(desc, pool, alignment)  # [H, pool]
    tile_scores = np.full(len(index), -np.inf, dtype=np.float32)
    best_hyp = np.zeros(len(index), dtype=np.int64)
    tile_scores[pool], best_hyp[pool] = exact.max(0), exact.argmax(0)
    return tile_scores, best_hyp


def locate_images(
    paths: list[Path], encoder: Encoder, index: ReferenceIndex, options: LocateOptions, progress: bool = True
) -> tuple[list[dict], list[np.ndarray | None], list[PreparedQuery | None]]:
    """Locate each photo; a bad photo becomes ``{"query", "error"}`` and the batch goes on.

    Two passes: encode every photo's hypotheses, then score. Between them, with
    ``options.batch_alignment`` set and at least ``MIN_BATCH_ALIGNMENT`` photos, a query-view
    alignment is fitted on this batch's own descriptors (no labels: transductive) against the
    index's reference descriptors, replacing the index's stored alignment for this run.
    """
    from tqdm import tqdm

    if options.view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    tile_m = index.manifest.tile_m
    gsd_m = index.manifest.gsd_m
    prepared: list[PreparedQuery | None] = []
    descriptors: list[np.ndarray | None] = []
    errors: dict[int, str] = {}
    for i, path in enumerate(tqdm(paths, desc="encoding photos", unit="photo", disable=not progress)):
        try:
            query = prepare_query(Path(path), options, tile_m, gsd_m)
        except CvglError as exc:
            errors[i] = str(exc)
            prepared.append(None)
            descriptors.append(None)
            continue
        prepared.append(query)
        descriptors.append(encoder.encode([h.image for h in query.hypotheses], batch_size=options.batch_size))

    alignment = index.alignment
    good = [d for d in descriptors if d is not None]
    if options.batch_alignment and len(good) >= MIN_BATCH_ALIGNMENT:
        alignment = fit_alignment(options.batch_alignment, index.raw, queries=np.concatenate(good))
    prior = index.prior(options.near, options.radius_km)  # once for every photo, not per search
    allowed = None
    if options.near is not None:
        allowed = prior[0] if prior[0] is not None else index.allowed_rows(options.near, options.radius_km)
        if len(allowed) == 0:
            raise InputError(f"{index.path}: no tile within {options.radius_km:g} km of {options.near[0]:.6f},{options.near[1]:.6f}")

    results: list[dict] = []
    all_scores: list[np.ndarray | None] = []
    for i, (query, desc) in enumerate(zip(prepared, descriptors)):
        if query is None or desc is None:
            results.append({"query": str(paths[i]), "error": errors[i]})
            all_scores.append(None)
            continue
        tile_scores, best_hyp = hypothesis_scores(index, desc, alignment, options, allowed, prior)
        result = answer(query, tile_scores, best_hyp, index, options)
        result["alignment"] = alignment.kind
        results.append(result)
        all_scores.append(tile_scores)
    return results, all_scores, prepared
