"""Verify a photo's top-K retrieved candidates by local matching; re-rank by verified inliers.

For each candidate window (an orthophoto crop around a retrieved tile, with its georeferencing):
match the prepared photo to it, fit a robust homography, turn that into a ground pose
(:mod:`cvgl.verify.pose`), check that the pose is one a real photo could have, and call the
candidate *verified* when enough independent evidence supports it. Candidates are then ordered by
the inliers of their plausible fits (retrieval order breaks ties).

Evidence and plausibility (:class:`VerifyConfig`), chosen from measurements on real imagery
(see the report of the study that set the defaults):

* at least ``min_inliers`` homography inliers — wrong windows rarely produce a consistent
  homography with many inliers, right ones usually give hundreds;
* the footprint is a convex, unmirrored quadrilateral in front of the camera, the photo centre
  falls inside the window, and the scale, anisotropy and heading agree with what the preparation
  promised (:class:`PhotoGeometry`): a photo scaled to the index GSD must come out at about that
  scale, a north-up photo about north-up. Each rejected fit says why (``reason``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from cvgl.geo import to_latlon
from cvgl.verify.features import Features, Matcher
from cvgl.verify.homography import (
    HomographyFit,
    block_jackknife_covariance,
    fit_homography,
    point_covariance,
    project,
)
from cvgl.verify.pose import (
    affine_matrix,
    camera_from_homography,
    footprint_problem,
    ground_pose,
    local_metric,
    photo_centre,
    photo_corners,
    uncertainty_radius_m,
)


@dataclass(frozen=True)
class Candidate:
    """One reference window to verify against: ``image`` (H x W x 3 uint8) georeferenced by a
    rasterio ``Affine`` ``transform`` (pixel corner -> CRS) in ``crs``; ``candidate_id`` names it
    (and keys the feature cache, so one id must always mean the same pixels)."""

    candidate_id: str
    image: np.ndarray
    transform: object
    crs: object
    # A photo of unknown heading: the heading retrieval scored best for this tile (the photo turned
    # clockwise by it is north-up). The photo's 90-degree turn nearest it is matched first, the
    # other turns only when no candidate verifies at its hinted turn (:func:`verify_candidates`).
    # None: every turn, in order.
    heading_hint_deg: float | None = None


@dataclass(frozen=True)
class PhotoGeometry:
    """What the preparation did to the photo, hence what a right homography must look like."""

    north_up: bool = True  # rotated so north is up with a known heading (compass error allowed)
    at_index_gsd: bool = True  # scaled to the windows' ground sample distance
    nadir: bool = True  # nadir, or rectified to nadir: the map to the ground is near a similarity
    rotation_deg: float = 0.0  # the clockwise rotate_image angle applied; added back to the heading
    # Focal length in prepared-photo pixels (principal point at the photo centre): gives the
    # camera's own position from the homography. None: not reported.
    focal_px: float | None = None
    # Where the scene to report lies in the prepared photo: its centre and corner pixels (e.g. the
    # trapezoid of a rectified oblique photo). None: the prepared photo's own.
    centre_px: tuple[float, float] | None = None
    corners_px: np.ndarray | None = None


@dataclass(frozen=True)
class VerifyConfig:
    # Evidence threshold. Wrong Longmont windows gave at most 15 plausible inliers with
    # ALIKED/XFeat + LightGlue (none with SIFT, for which 12 is safe); right windows a median of
    # 80-200 (nadir) and 35-80 (oblique).
    min_inliers: int = 25
    threshold_px: float = 3.0  # homography inlier threshold, window pixels
    estimator: str = "magsac"
    max_heading_error_deg: float = 30.0  # north-up photos: compass error (+-10) plus margin
    max_scale_ratio: float = 1.6  # at-GSD photos: ground scale within [1/x, x] of the window's
    max_scale_ratio_free: float = 8.0  # photos of unknown scale
    max_anisotropy: float = 1.5  # nadir/rectified photos
    max_anisotropy_oblique: float = 4.0  # raw oblique photos: the homography carries the tilt
    # In-plane rotations of the photo to try when it is not north-up: None = 4 (every 90 degrees)
    # for matchers that are not rotation invariant, else 1.
    photo_rotations: int | None = None
    # Stop matching (in retrieval order) once a candidate verifies with this many inliers: wrong
    # windows never came close (at most 15 plausible inliers in ~2,600 wrong Longmont pairs), so
    # later candidates could only be overlapping views of the same place, and matching is the
    # costly step (LightGlue ~0.3-0.9 s a pair on one CPU thread). None: match every candidate.
    stop_at_inliers: int | None = 50
    # Uncertainty radius (m) = hypot(uncertainty_scale x statistical, reference_error_m), where the
    # statistical part is the ``coverage`` radius of the larger of the analytic and the block-
    # jackknife covariance of the photo centre (homography module): it grows with few, noisy or
    # bunched inliers. Both constants are calibrated on Longmont (WV2 photos, WV3 windows): the
    # jackknife radius is about half the error left after removing the scenes' mean offset
    # (x2), and the two orthophotos disagree by 1.25 m on average plus ~1 m locally, which no
    # inlier statistic can see (2.5 m). Together they held 91 % of the errors of 45 verified
    # photos. Set reference_error_m for other references (0 when the photo and the reference
    # share their georeferencing, e.g. a drone orthophoto made from the same flight).
    coverage: float = 0.95
    uncertainty: str = "max"  # "analytic" | "jackknife" | "max" of both
    uncertainty_scale: float = 2.0
    reference_error_m: float = 2.5


@dataclass
class Verification:
    """The verification record of one candidate (JSON-ready through :meth:`to_dict`)."""

    candidate_id: str
    retrieval_rank: int
    verified: bool
    reason: str | None  # why not verified (None when verified)
    matches: int
    inliers: int
    inlier_ratio: float
    reprojection_error_px: float | None = None
    x: float | None = None  # photo-centre ground point in the candidate's CRS
    y: float | None = None
    crs: str | None = None
    lat: float | None = None
    lon: float | None = None
    heading_deg: float | None = None
    uncertainty_m: float | None = None
    scale_ratio: float | None = None  # ground metres per photo px / per window px
    anisotropy: float | None = None
    inlier_spread: float | None = None  # inliers' convex hull area / photo area
    footprint_xy: list | None = None
    footprint_latlon: list | None = None
    camera: dict | None = None  # camera position (CRS, lat/lon), altitude and pitch, when focal_px is known
    homography: list | None = None  # 3x3, photo px -> window px
    photo_rotation_deg: float = 0.0  # counter-clockwise 90-degree turn of the photo the best fit matched
    plausible: bool = False  # passed the geometric checks (verified = plausible + enough inliers)
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "extras"}
        out.update(self.extras)
        return out


def candidate_features(matcher: Matcher, candidates: Sequence[Candidate], cache: MutableMapping[str, Features] | None = None) -> list[Features]:
    """Features of every candidate window; those missing from ``cache`` are extracted in one
    batched call and stored there (keyed by ``candidate_id``)."""
    cache = {} if cache is None else cache
    missing = [c for c in candidates if c.candidate_id not in cache]
    seen: dict[str, Candidate] = {c.candidate_id: c for c in missing}
    if seen:
        for cid, feats in zip(seen, matcher.extract([c.image for c in seen.values()])):
            cache[cid] = feats
    return [cache[c.candidate_id] for c in candidates]


def _rot90(photo_hw: tuple[int, int], k: int) -> np.ndarray:
    """3x3 map from photo pixels to pixels of ``np.rot90(photo, k)`` (counter-clockwise turns)."""
    h, w = photo_hw
    m = np.eye(3)
    for _ in range(k % 4):
        m = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0], [0.0, 0.0, 1.0]]) @ m
        h, w = w, h
    return m


def photo_views(photo: np.ndarray, geometry: PhotoGeometry, matcher: Matcher, config: VerifyConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, photo px -> image px) for each in-plane turn of the photo to match."""
    turns = config.photo_rotations
    if turns is None:
        turns = 1 if geometry.north_up or matcher.rotation_invariant else 4
    if turns not in (1, 2, 4):
        raise ValueError("photo_rotations must be 1, 2 or 4 (multiples of 90 degrees)")
    return [(np.ascontiguousarray(np.rot90(photo, k)), _rot90(photo.shape[:2], k)) for k in range(0, 4, 4 // turns)]


def turn_order(views: int, heading_hint_deg: float | None) -> list[int]:
    """The order to match the photo's ``views`` (view k = ``np.rot90(photo, k * 4 // views)``,
    i.e. turned clockwise by ``-k * 360 / views`` degrees): by angular distance from the turn
    that makes the photo north-up at ``heading_hint_deg`` (clockwise), nearest first; in view
    order without a hint."""
    if heading_hint_deg is None or views == 1:
        return list(range(views))
    step = 360.0 / views
    distance = [abs(_wrap180(-k * step - heading_hint_deg)) for k in range(views)]
    return sorted(range(views), key=lambda k: (distance[k], k))


def _hull_fraction(points: np.ndarray, photo_hw: tuple[int, int]) -> float:
    if len(points) < 3:
        return 0.0
    hull = cv2.convexHull(points.astype(np.float32))
    return float(cv2.contourArea(hull) / (photo_hw[0] * photo_hw[1]))


def _wrap180(angle: float) -> float:
    return (angle + 180.0) % 360.0 - 180.0


def evaluate_fit(
    fit: HomographyFit | None, n_matches: int, photo_hw: tuple[int, int], candidate: Candidate, rank: int,
    geometry: PhotoGeometry, config: VerifyConfig, photo_rotation_deg: float = 0.0,
) -> Verification:
    """The verification record of one fit (None: no homography could be fitted)."""
    if fit is None:
        return Verification(candidate.candidate_id, rank, False, "no homography from the matches", n_matches, 0, 0.0)
    record = Verification(
        candidate.candidate_id, rank, False, None, n_matches, fit.n_inliers, fit.inlier_ratio,
        reprojection_error_px=fit.reprojection_error_px, homography=fit.matrix.tolist(), photo_rotation_deg=photo_rotation_deg,
    )
    corners = photo_corners(photo_hw) if geometry.corners_px is None else np.asarray(geometry.corners_px, dtype=np.float64)
    centre = photo_centre(photo_hw) if geometry.centre_px is None else np.asarray(geometry.centre_px, dtype=np.float64)
    problem = footprint_problem(fit.matrix, corners)
    if problem is not None:
        record.reason = problem
        return record
    pose = ground_pose(fit.matrix, photo_hw, candidate.transform, candidate.crs, centre, corners, geometry.rotation_deg)
    metric = local_metric(candidate.crs, pose.x, pose.y, math.hypot(candidate.transform.a, candidate.transform.d) or 1.0)
    window_metres = math.sqrt(abs(np.linalg.det(metric @ affine_matrix(candidate.transform)[:2, :2])))  # per window px
    scale_ratio = pose.metres_per_px / window_metres
    analytic = uncertainty_radius_m(point_covariance(fit, tuple(centre)), candidate.transform, metric, config.coverage)
    jackknife = uncertainty_radius_m(block_jackknife_covariance(fit, tuple(centre)), candidate.transform, metric, config.coverage)
    statistical = {"analytic": analytic, "jackknife": jackknife, "max": max(analytic, jackknife)}[config.uncertainty]
    record.extras.update(radius_analytic_m=analytic, radius_jackknife_m=jackknife)
    record.x, record.y, record.crs = pose.x, pose.y, str(candidate.crs)
    record.lat, record.lon, record.heading_deg = pose.lat, pose.lon, pose.heading_deg
    record.uncertainty_m = math.hypot(statistical * config.uncertainty_scale, config.reference_error_m)
    record.scale_ratio, record.anisotropy = scale_ratio, pose.anisotropy
    record.inlier_spread = _hull_fraction(fit.query_xy, photo_hw)
    record.footprint_xy = pose.footprint_xy.tolist()
    record.footprint_latlon = pose.footprint_latlon.tolist()
    if geometry.focal_px is not None:
        camera = camera_from_homography(pose.photo_to_metres, geometry.focal_px, photo_centre(photo_hw))
        if camera is not None:
            inv = np.linalg.inv(metric)
            cam_x, cam_y = np.array([pose.x, pose.y]) + inv @ np.array([camera.east_m, camera.north_m])
            cam_lat, cam_lon = to_latlon(candidate.crs, cam_x, cam_y)
            record.camera = {"x": float(cam_x), "y": float(cam_y), "lat": float(cam_lat), "lon": float(cam_lon),
                             "altitude_m": camera.altitude_m, "pitch_deg": camera.pitch_deg}

    h, w = candidate.image.shape[:2]
    u, v = project(fit.matrix, centre[None])[0]
    max_scale = config.max_scale_ratio if geometry.at_index_gsd else config.max_scale_ratio_free
    max_aniso = config.max_anisotropy if geometry.nadir else config.max_anisotropy_oblique
    heading_error = _wrap180(pose.heading_deg - geometry.rotation_deg)
    if not (-0.5 <= u <= w - 0.5 and -0.5 <= v <= h - 0.5):
        record.reason = "photo centre falls outside the window"
    elif not 1.0 / max_scale <= scale_ratio <= max_scale:
        record.reason = f"ground scale {scale_ratio:.2f}x the window's (allowed 1/{max_scale:g}-{max_scale:g})"
    elif pose.anisotropy > max_aniso:
        record.reason = f"anisotropy {pose.anisotropy:.2f} (allowed {max_aniso:g})"
    elif geometry.north_up and abs(heading_error) > config.max_heading_error_deg:
        record.reason = f"heading {heading_error:+.0f} deg off the prepared heading (allowed {config.max_heading_error_deg:g})"
    else:
        record.plausible = True
        if fit.n_inliers < config.min_inliers:
            record.reason = f"{fit.n_inliers} inliers < {config.min_inliers}"
        else:
            record.verified = True
    return record


def best_fit(
    views: list[tuple[np.ndarray, np.ndarray]], photo_feats: Callable[[int], Features], reference: Features,
    matcher: Matcher, config: VerifyConfig, order: Sequence[int] | None = None,
) -> tuple[HomographyFit | None, int, float]:
    """(fit with the most inliers over the photo's views, its match count, the view's turn in
    degrees); the fit maps the *unturned* photo's pixels to the window.

    ``photo_feats(k)``: the features of view k (extracted on first use). Views are matched in
    ``order`` (default: view order); once one fit has ``config.stop_at_inliers`` inliers the rest
    are not matched (nor extracted): a wrong turn of a photo never came close."""
    best: tuple[int, HomographyFit | None, int, float] = (-1, None, 0, 0.0)
    for k in range(len(views)) if order is None else order:
        to_view, feats = views[k][1], photo_feats(k)
        pairs = matcher.match(feats, reference)
        fit = None
        if len(pairs):
            fit = fit_homography(feats.keypoints[pairs[:, 0]], reference.keypoints[pairs[:, 1]], config.threshold_px, config.estimator)
        if fit is not None and k > 0:  # back to the unturned photo's pixels
            matrix = fit.matrix @ to_view
            fit = HomographyFit(matrix / matrix[2, 2], fit.inliers, fit.reprojection_error_px, fit.residual_sigma_px,
                                project(np.linalg.inv(to_view), fit.query_xy), fit.reference_xy)
        score = fit.n_inliers if fit is not None else 0
        if score > best[0]:
            best = (score, fit, len(pairs), k * 360.0 / len(views))
        if config.stop_at_inliers is not None and score >= config.stop_at_inliers:
            break
    return best[1], best[2], best[3]


def verify_candidates(
    photo: np.ndarray, candidates: Sequence[Candidate], matcher: Matcher, geometry: PhotoGeometry = PhotoGeometry(),
    config: VerifyConfig = VerifyConfig(), cache: MutableMapping[str, Features] | None = None,
) -> list[Verification]:
    """Verification records of ``candidates`` (in retrieval order) for ``photo``, best first.

    The photo's features are extracted once per 90-degree turn (see :func:`photo_views`) that is
    matched, the windows' features once per ``candidate_id`` through ``cache`` (pass the same
    mapping across photos so a window shared by several photos is extracted once). With
    ``config.stop_at_inliers`` the candidates after a decisive one are neither extracted nor
    matched (their records say so), so windows are extracted one at a time as needed, and so are
    the photo's turns; without it all missing windows and every turn are extracted in one batch.

    Candidates with a ``heading_hint_deg`` (a photo of unknown heading, matched at four turns)
    are matched in two passes: first each at the one turn its hint points to; only when none of
    them verifies, at the other three. On the Longmont nadir heading-unknown photos the hinted
    turn was the verifying one in 6 of 7 fits with 25+ inliers, so most photos pay a quarter of
    the matching; a photo the first pass cannot verify pays what it did without hints."""
    views = photo_views(photo, geometry, matcher, config)
    turned: dict[int, Features] = {}
    if config.stop_at_inliers is None:
        turned.update(enumerate(matcher.extract([im for im, _ in views])))

    def photo_feats(k: int) -> Features:
        if k not in turned:
            (turned[k],) = matcher.extract([views[k][0]])
        return turned[k]

    cache = {} if cache is None else cache
    if config.stop_at_inliers is None:
        candidate_features(matcher, candidates, cache)  # every window is needed: one batch
    orders = [turn_order(len(views), c.heading_hint_deg) for c in candidates]
    two_pass = len(views) > 1 and any(c.heading_hint_deg is not None for c in candidates)
    passes = [[o[:1] for o in orders], [o[1:] for o in orders]] if two_pass else [orders]
    fits: dict[int, tuple[HomographyFit | None, int, float]] = {}
    for turns in passes:
        records: list[Verification] = []
        decisive: Verification | None = None
        for rank, candidate in enumerate(candidates):
            if decisive is not None and rank not in fits:
                records.append(Verification(candidate.candidate_id, rank, False, f"not matched: {decisive.candidate_id} verified "
                                            f"first with {decisive.inliers} inliers", 0, 0, 0.0))
                continue
            if decisive is None:  # else: what the first pass found for it stands
                (reference,) = candidate_features(matcher, [candidate], cache)  # cached, or extracted now
                found = best_fit(views, photo_feats, reference, matcher, config, turns[rank])
                earlier = fits.get(rank)
                if earlier is None or _inliers(found[0]) > _inliers(earlier[0]):
                    fits[rank] = found
            fit, n_matches, turn = fits[rank]
            record = evaluate_fit(fit, n_matches, photo.shape[:2], candidate, rank, geometry, config, turn)
            if config.stop_at_inliers is not None and record.verified and record.inliers >= config.stop_at_inliers:
                decisive = record
            records.append(record)
        if any(r.verified for r in records):
            break
    return rank_verifications(records)


def _inliers(fit: HomographyFit | None) -> int:
    return -1 if fit is None else fit.n_inliers


def rank_verifications(records: list[Verification]) -> list[Verification]:
    """Verified first, then by the inliers of plausible fits; retrieval order breaks ties."""
    return sorted(records, key=lambda r: (not r.verified, -(r.inliers if r.plausible else 0), r.retrieval_rank))
