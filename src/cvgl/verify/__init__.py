"""Geometric verification: the second stage after retrieval (retrieve -> match -> pose).

Retrieval ranks tiles by global descriptors and answers with a tile centre. This stage matches
the prepared photo against orthophoto windows around the top-K tiles with local features,
fits a robust homography per window, and turns the best one into a metric answer: the photo
centre's ground point, its footprint, a continuous heading, the camera position when the focal
length is known, and an uncertainty radius from the inliers. A candidate is *verified* only when
the fit is geometrically plausible and has enough inliers; otherwise the retrieval answer stands.

* :mod:`cvgl.verify.features`: matchers (``aliked-lightglue``, ``xfeat-lighterglue``, ``sift``);
* :mod:`cvgl.verify.homography`: robust fit and the photo centre's covariance;
* :mod:`cvgl.verify.pose`: ground pose, heading, footprint checks, camera from a homography;
* :mod:`cvgl.verify.stage`: :func:`verify_candidates` over a photo's candidates.

Typical use::

    matcher = create_matcher("aliked-lightglue")
    windows = [Candidate(tile_id, image, window_transform(x, y, size_m, image.shape[:2]), crs), ...]
    records = verify_candidates(prepared_photo, windows, matcher, PhotoGeometry(rotation_deg=heading), cache=tile_cache)
    best = records[0]  # best.verified, best.lat, best.lon, best.heading_deg, best.uncertainty_m, ...
"""

from cvgl.verify.features import (
    MATCHERS,
    Features,
    Matcher,
    MatcherUnavailableError,
    create_matcher,
)
from cvgl.verify.homography import (
    HomographyFit,
    block_jackknife_covariance,
    fit_homography,
    point_covariance,
)
from cvgl.verify.pose import (
    CameraPose,
    GroundPose,
    camera_from_homography,
    ground_pose,
    window_transform,
)
from cvgl.verify.stage import (
    Candidate,
    PhotoGeometry,
    Verification,
    VerifyConfig,
    best_fit,
    candidate_features,
    evaluate_fit,
    photo_views,
    rank_verifications,
    verify_candidates,
)

__all__ = [
    "MATCHERS",
    "CameraPose",
    "Candidate",
    "Features",
    "GroundPose",
    "HomographyFit",
    "Matcher",
    "MatcherUnavailableError",
    "PhotoGeometry",
    "Verification",
    "VerifyConfig",
    "best_fit",
    "block_jackknife_covariance",
    "camera_from_homography",
    "candidate_features",
    "create_matcher",
    "evaluate_fit",
    "fit_homography",
    "ground_pose",
    "photo_views",
    "point_covariance",
    "rank_verifications",
    "verify_candidates",
    "window_transform",
]
