"""One street photo against a reference index: the geometric street matcher as ``cvgl locate --view street`` runs it.

Why a path of its own: a side-on photo shares almost no appearance with a top-down tile, so the
global descriptor the drone path retrieves with is at chance for street photos (``cvgl bench
street``). This path compares what the two views share, geometry: every candidate tile's centre
gets polar column descriptors and an aerial token window (:class:`StreetReference`, computed from
the index's own tile pixels on demand and kept), the photo gets its column descriptors and
bird's-eye view per heading hypothesis, and :func:`cvgl.street.matching.match` ranks the tiles
exactly as the benchmark measures it.

What the answer claims, honestly:

* ``lat``/``lon``: the winning tile's centre moved by the BEV's camera offset (the camera, not a
  ground point ahead of it); ``uncertainty_m``: the index's tile half-diagonal (what "right" means
  in the benchmark: the right tile);
* ``confidence``: :func:`cvgl.street.matching.confidence` of the winner's evidence, named by
  ``confidence_model`` — a hand-set logistic, NOT a calibrated probability; below 0.5 the answer is
  ``not_found`` ("several places fit as well"; the best guess is still given);
* ``heading_deg``: the best hypothesis (``heading_source`` ``search`` unless the heading was given
  exactly);
* ``labels["street_expectation"]``: what the benchmark measured for this heading prior, so an answer
  made without a compass says how often such answers are right.

The candidates are the index's tiles within ``near``/``radius_km``; without a prior every tile is
scored, refused above ``max_candidates`` (each new tile costs about a second of CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cvgl.answer import Answer, Candidate, Truth, set_position
from cvgl.data.images import load_photo
from cvgl.data.metadata import CameraMetadata, read_camera_metadata
from cvgl.errors import InputError
from cvgl.geo import geodesic_distance_m, offset_latlon
from cvgl.index.store import ReferenceIndex
from cvgl.street.descriptors import TokenExtractor
from cvgl.street.geometry import PanoramaBand, PinholeView
from cvgl.street.matching import CONFIDENCE_MODEL, HeadingPrior, StreetMatch, match
from cvgl.street.products import (
    ReferenceProducts,
    StreetConfig,
    StreetQuery,
    aerial_token_windows,
    polar_columns,
    query_products,
    resample_to_gsd,
)

__all__ = ["DEFAULT_HFOV_DEG", "EXPECTATION", "StreetOptions", "StreetReference", "heading_prior", "locate_street", "street_options"]

#: Horizontal field of view assumed for a perspective photo with no flag and no EXIF 35 mm focal length.
DEFAULT_HFOV_DEG = 60.0
#: Width/height from which a photo is read as an equirectangular panorama (the real-pairs rule).
PANORAMA_ASPECT = 1.8
#: What ``cvgl bench street`` measured (fusion; 17 real CVACT/CVUSA panoramas against 568 candidates,
#: chance R@1 0.18%; grey / colour), copied into every street answer. There each candidate is centred
#: on the camera; an index tile's centre is usually 10-20 m from it (40 m stride), where the same
#: benchmark measured 26% (10 m) and 5% (20 m) with the heading known: the tile rows are the honest ones.
_CENTRING = "with the camera at the candidate centre; 5 / 10 / 20 m off it (heading known) 38% / 26% / 5%"
EXPECTATION = {
    "known": f"benchmark: right tile first for 53% (grey) / 59% (colour) of 17 real panoramas, heading known, {_CENTRING}",
    "compass": f"benchmark: right tile first for 47% (grey) / 53% (colour) of 17 real panoramas, compass ±25°, {_CENTRING}",
    "unknown": f"benchmark: right tile first for 29% (grey) / 41% (colour) of 17 real panoramas, heading unknown, {_CENTRING}",
    "perspective": "perspective photos were not benchmarked (no real perspective street photo with a known field of view "
    "and a north-up reference); expect less than a panorama",
}


@dataclass(frozen=True)
class StreetOptions:
    """What is known about a street photo and how widely to search.

    ``heading_deg``: azimuth (clockwise from north) of a panorama's centre column, or of a
    perspective photo's optical axis; None: read from the photo's metadata, else searched over the
    whole circle. ``heading_tolerance_deg``: 0 = the heading is exact, > 0 = search ± this (a phone
    compass: 25). A heading read from metadata is never taken as exact (at least
    ``METADATA_TOLERANCE_DEG``). ``panorama``: None = by aspect (>= 1.8:1). ``pano_band``: the
    panorama's (top, bottom) elevations, None = a full sphere scaled to the image's aspect.
    ``weak_as_not_found``: an answer under 0.5 confidence is ``not_found`` (its best guess still given).
    """

    heading_deg: float | None = None
    heading_tolerance_deg: float = 0.0
    hfov_deg: float | None = None
    panorama: bool | None = None
    pano_band: tuple[float, float] | None = None
    near: tuple[float, float] | None = None
    radius_km: float | None = None
    top_k: int = 5
    max_candidates: int = 600
    signal: str = "fusion"
    weak_as_not_found: bool = True
    config: StreetConfig = field(default_factory=StreetConfig)

    METADATA_TOLERANCE_DEG = 25.0

    def __post_init__(self) -> None:
        if (self.near is None) != (self.radius_km is None):
            raise InputError("a street search prior needs both near=(lat, lon) and radius_km")
        if self.heading_tolerance_deg < 0:
            raise InputError(f"heading tolerance must be >= 0 degrees, got {self.heading_tolerance_deg}")
        if self.hfov_deg is not None and not 0.0 < self.hfov_deg < 180.0:
            raise InputError(f"horizontal field of view must be in (0, 180) degrees, got {self.hfov_deg}")
        if self.top_k < 1 or self.max_candidates < 2:
            raise InputError("top_k must be >= 1 and max_candidates >= 2")


def street_options(locate_options, **changes) -> StreetOptions:
    """:class:`StreetOptions` from a :class:`cvgl.locate.LocateOptions` (duck-typed: no import cycle):
    its query's heading, heading tolerance and field of view, its prior and its top-k."""
    query = locate_options.query
    return StreetOptions(
        heading_deg=query.heading_deg,
        heading_tolerance_deg=query.heading_tolerance_deg,
        hfov_deg=query.hfov_deg,
        near=locate_options.near,
        radius_km=locate_options.radius_km,
        top_k=locate_options.top_k,
        **changes,
    )


def heading_prior(options: StreetOptions, meta: CameraMetadata) -> tuple[HeadingPrior, str]:
    """The heading prior and the answer's ``heading_source`` when nothing is searched."""
    if options.heading_deg is not None:
        tol = options.heading_tolerance_deg
        return (HeadingPrior("known", options.heading_deg) if tol == 0 else HeadingPrior("compass", options.heading_deg, tol)), "flag"
    if meta.heading_deg is not None:
        tol = max(options.heading_tolerance_deg, StreetOptions.METADATA_TOLERANCE_DEG)
        return HeadingPrior("compass", meta.heading_deg, tol), "metadata"
    return HeadingPrior("unknown"), "search"


def _hfov(options: StreetOptions, meta: CameraMetadata) -> tuple[float, str]:
    if options.hfov_deg is not None:
        return options.hfov_deg, "flag"
    if meta.focal_length_35mm:
        return math.degrees(2.0 * math.atan(36.0 / (2.0 * float(meta.focal_length_35mm)))), "metadata"
    return DEFAULT_HFOV_DEG, "assumed"


class StreetReference:
    """Street products (polar columns and the aerial token window around each tile centre) of an index's
    tiles, computed from the index's own tile pixels when first needed and kept (float16).

    Hold one per index (the service): a tile costs about a second of CPU the first time, nothing after.
    """

    def __init__(self, index: ReferenceIndex, extractor: TokenExtractor, config: StreetConfig = StreetConfig()) -> None:
        self.index = index
        self.extractor = extractor
        self.config = config
        self._columns: dict[int, torch.Tensor] = {}
        self._maps: dict[int, torch.Tensor] = {}

    def _tile_gsd(self, row: int, width: int) -> float:
        tiles = self.index.tiles
        if "gsd" in tiles.columns and np.isfinite(float(tiles["gsd"].iloc[row])) and float(tiles["gsd"].iloc[row]) > 0:
            return float(tiles["gsd"].iloc[row])
        return float(self.index.manifest.tile_side_m) / width

    def products(self, rows: np.ndarray) -> ReferenceProducts:
        """``ReferenceProducts`` of tiles ``rows`` (centre of each tile = the candidate camera position)."""
        for row in (int(r) for r in rows):
            if row in self._columns:
                continue
            pixels = np.asarray(self.index.tile_image(row), dtype=np.float32)
            if pixels.ndim == 2:
                pixels = np.repeat(pixels[:, :, None], 3, axis=2)
            image = resample_to_gsd(pixels[:, :, :3], self._tile_gsd(row, pixels.shape[1]), self.config.work_gsd_m)
            centre = np.array([[image.shape[1] / 2.0, image.shape[0] / 2.0]])
            self._columns[row] = polar_columns(self.extractor, image, centre, self.config)[0].to(torch.float16)
            self._maps[row] = aerial_token_windows(self.extractor, image, centre, self.config)[0].to(torch.float16)
        rows = [int(r) for r in rows]
        return ReferenceProducts(
            torch.stack([self._columns[r] for r in rows]).float(), torch.stack([self._maps[r] for r in rows]).float()
        )


def _candidates(index: ReferenceIndex, options: StreetOptions) -> np.ndarray:
    if options.near is not None:
        rows = index.allowed_rows(options.near, options.radius_km)
        if len(rows) == 0:
            raise InputError(f"{index.path}: no tile within {options.radius_km:g} km of {options.near[0]:.6f},{options.near[1]:.6f}")
    else:
        rows = np.arange(len(index), dtype=np.int64)
    if len(rows) > options.max_candidates:
        where = "within the prior" if options.near is not None else "in the index (no --near/--radius-km given)"
        raise InputError(
            f"{index.path}: {len(rows)} tiles {where}; a street search scores every candidate tile (about a second each "
            f"the first time) and stops at {options.max_candidates}: give a smaller --near/--radius-km"
        )
    if len(rows) < 2:
        raise InputError(f"{index.path}: a street search needs at least 2 candidate tiles, got {len(rows)}")
    return np.asarray(rows, dtype=np.int64)


def _street_query(pixels: np.ndarray, options: StreetOptions, prior: HeadingPrior, meta: CameraMetadata, name: str
                  ) -> tuple[StreetQuery, HeadingPrior, float, dict[str, str]]:
    """The photo as a (partial) panorama, the hypotheses' prior in its frame, the azimuth its
    hypothesis 0 stands for (added back to the estimate), and labels saying what was assumed."""
    height, width = pixels.shape[:2]
    panorama = options.panorama if options.panorama is not None else width >= PANORAMA_ASPECT * height
    if panorama:
        band = PanoramaBand(*options.pano_band) if options.pano_band else PanoramaBand.for_image(height, width)
        try:
            return StreetQuery.from_panorama(pixels, band), prior, 0.0, {"street_photo": f"panorama, band {band.top:g}..{band.bottom:g}°"}
        except ValueError as exc:
            raise InputError(f"{name}: {exc}") from None
    hfov, hfov_source = _hfov(options, meta)
    axis = prior.heading if prior.kind != "unknown" else 0.0
    query = StreetQuery.from_perspective(pixels, PinholeView(hfov, heading=axis))
    # the photo was placed at ``axis``; hypotheses are the error of that placement (0 = right)
    shifted = HeadingPrior(prior.kind, 0.0, prior.tolerance)
    return query, shifted, axis, {"street_photo": f"perspective, hfov {hfov:.1f}° ({hfov_source})"}


def locate_street(
    photo: str | Path,
    index: ReferenceIndex,
    encoder,
    options: StreetOptions = StreetOptions(),
    reference: StreetReference | None = None,
) -> Answer:
    """Locate one street photo (panorama or perspective) among ``index``'s tiles by geometry.

    ``encoder``: the index's :class:`~cvgl.models.encoder.Encoder` (its DINOv2 backbone and input
    normalisation make the street products); ``reference``: a :class:`StreetReference` to reuse
    (the service keeps one per index), made here when None. Raises :class:`InputError` (one line
    naming the file) for an unreadable photo or an impossible search.
    """
    path = Path(photo)
    config = options.config
    if reference is None:
        reference = StreetReference(index, TokenExtractor.from_encoder(encoder, config.layer), config)
    pixels = np.asarray(load_photo(path).convert("RGB"), dtype=np.float32)
    meta = read_camera_metadata(path)
    prior, source = heading_prior(options, meta)
    query, frame_prior, axis, labels = _street_query(pixels, options, prior, meta, str(path))
    if not query.pano.shape[-1] or not query.valid.any():
        raise InputError(f"{path}: the photo covers no part of the panorama band the street matcher reads")
    rows = _candidates(index, options)
    products = reference.products(rows)
    qp = query_products(reference.extractor, query, frame_prior.hypotheses(config), config)
    tiles = index.tiles
    lat, lon = tiles["lat"].to_numpy(np.float64)[rows], tiles["lon"].to_numpy(np.float64)[rows]
    east, north = _local_metres(lat, lon)
    result = match(qp, products, config, options.signal, np.stack((east, north), axis=1))
    return _answer(str(path), result, rows, index, options, prior, source, axis, meta, labels)


def _local_metres(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """East/north metres of points from their first one (equirectangular: candidates lie within a few km)."""
    north = (lat - lat[0]) * 111_320.0
    east = (lon - lon[0]) * 111_320.0 * np.cos(np.radians(lat[0]))
    return east, north


def _answer(
    name: str, result: StreetMatch, rows: np.ndarray, index: ReferenceIndex, options: StreetOptions, prior: HeadingPrior,
    source: str, axis: float, meta: CameraMetadata, labels: dict[str, str],
) -> Answer:
    tiles = index.tiles
    ranking = result.ranking
    order = ranking.order[: options.top_k]
    best = int(order[0])
    row = int(rows[best])
    t_lat, t_lon = float(tiles["lat"].iloc[row]), float(tiles["lon"].iloc[row])
    offset = ranking.offset_m[best]
    cam_lat, cam_lon = offset_latlon(t_lat, t_lon, float(offset[0]), float(offset[1])) if np.isfinite(offset).all() else (t_lat, t_lon)
    searched = prior.kind != "known"
    kind = "perspective" if "perspective" in labels["street_photo"] else prior.kind
    answer = Answer(
        query=name,
        lat=float(cam_lat),
        lon=float(cam_lon),
        uncertainty_m=float(index.manifest.correct_radius_m),
        confidence=result.confidence,
        confidence_model=result.confidence_model,
        heading_deg=float((axis + ranking.heading[best]) % 360.0),
        heading_source="search" if searched else source,
        pitch_deg=0.0,
        altitude_m=None,
        top_k=[
            Candidate(str(tiles["tile_id"].iloc[int(rows[i])]), float(tiles["lat"].iloc[int(rows[i])]),
                      float(tiles["lon"].iloc[int(rows[i])]), float(ranking.score[i]))
            for i in order
        ],
        labels={
            **labels,
            "street_method": f"geometry: polar columns + bird's-eye view ({result.signal}), {len(rows)} candidate tiles",
            "street_heading_prior": prior.kind if prior.kind != "compass" else f"compass ±{prior.tolerance:g}°",
            "street_expectation": EXPECTATION[kind],
        },
        evidence={"street_evidence": float(result.evidence)},
    )
    set_position(answer, answer.lat, answer.lon, index.crs)
    if options.weak_as_not_found and result.confidence < 0.5:
        answer.status = "not_found"
        answer.reason = (f"weak street evidence (confidence {result.confidence:.2f} < 0.50, {CONFIDENCE_MODEL.split(' ')[0]}): "
                         "other places fit almost as well; the best guess is given")
    if meta.gps_lat is not None and meta.gps_lon is not None:
        error = float(geodesic_distance_m(answer.lat, answer.lon, meta.gps_lat, meta.gps_lon))
        answer.truth = Truth(meta.gps_lat, meta.gps_lon, error)
    return answer
