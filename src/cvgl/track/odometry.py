"""Visual odometry between consecutive frames: how far and which way the ground centre moved.

Consecutive frames of a flight overlap by most of their footprint (12 m of motion under a 112 m
footprint is 89% overlap). Registering one to the next gives the relative motion of the camera —
a displacement in metres and a turn in degrees — far more precisely than a speed bound, and
without any map. In a heading-unknown flight the turn ties the heading hypotheses of consecutive
frames together, and the displacement ties their positions: the sequence then has to match the
map as one rigid shape (up to a slow drift), not frame by frame.

Both images must be at the same, known ground resolution and orientation convention; the
natural choice is what :func:`cvgl.locate.prepare_query` already makes — the photo rectified to
nadir and scaled to the index GSD — taking the hypothesis at angle 0 for a heading search (the
raw camera orientation: the image's "up" is the unknown camera heading) or the north-up view
for a known heading (``up`` = north). :class:`Odometry` records which.

Registration: ORB keypoints (OpenCV) on the valid (non-black) pixels, brute-force Hamming
matches with a ratio test, a RANSAC similarity (``cv2.estimateAffinePartial2D``). Too few
inliers, or an implausible scale change, gives None: no odometry for that step, and the decoders
fall back to the speed-bounded motion model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_INLIERS = 15
MAX_SCALE_CHANGE = 0.15  # altitude barely changes between frames; more means a wrong registration
DEFAULT_SIGMA_M = 2.0
DEFAULT_SIGMA_DEG = 2.0


@dataclass(frozen=True)
class Odometry:
    """Motion of the ground centre from the previous frame to this one.

    ``dx_m``/``dy_m``: displacement along the previous image's right and up axes, metres.
    ``turn_deg``: clockwise change of the camera heading. ``image_heading_deg``: the heading the
    previous image's "up" points to (0 for a north-up view), or None when it is the camera's own,
    unknown heading (a heading search: the decoder's heading state supplies it).
    """

    dx_m: float
    dy_m: float
    turn_deg: float
    image_heading_deg: float | None = None
    sigma_m: float = DEFAULT_SIGMA_M
    sigma_deg: float = DEFAULT_SIGMA_DEG
    inliers: int = 0

    def world_displacement(self, heading_deg: np.ndarray | float) -> np.ndarray:
        """(east, north) metres when the previous image's up axis points at ``heading_deg``.

        Uses :attr:`image_heading_deg` when known; otherwise ``heading_deg`` (one value or an
        array, e.g. one per particle) -> ``[..., 2]``.
        """
        axis = np.radians(self.image_heading_deg if self.image_heading_deg is not None else heading_deg)
        east = self.dx_m * np.cos(axis) + self.dy_m * np.sin(axis)
        north = -self.dx_m * np.sin(axis) + self.dy_m * np.cos(axis)
        return np.stack([east, north], axis=-1)


def _gray_and_mask(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    valid = (gray > 0).astype(np.uint8) * 255
    # Keep keypoints off the edge of the valid area: a black border's edge does not move.
    mask = cv2.erode(valid, np.ones((15, 15), np.uint8))
    return gray, mask


def measure_odometry(previous: np.ndarray, current: np.ndarray, gsd_m: float, image_heading_deg: float | None = None,
                     max_features: int = 1500) -> Odometry | None:
    """The motion between two frames at ``gsd_m`` metres per pixel (module doc), or None."""
    import cv2

    g0, m0 = _gray_and_mask(previous)
    g1, m1 = _gray_and_mask(current)
    orb = cv2.ORB_create(nfeatures=max_features, fastThreshold=10)
    k0, d0 = orb.detectAndCompute(g0, m0)
    k1, d1 = orb.detectAndCompute(g1, m1)
    if d0 is None or d1 is None or len(k0) < MIN_INLIERS or len(k1) < MIN_INLIERS:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(d0, d1, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < MIN_INLIERS:
        return None
    p0 = np.float32([k0[m.queryIdx].pt for m in good])
    p1 = np.float32([k1[m.trainIdx].pt for m in good])
    affine, inliers = cv2.estimateAffinePartial2D(p0, p1, method=cv2.RANSAC, ransacReprojThreshold=3.0,
                                                  maxIters=2000, confidence=0.995)
    if affine is None or inliers is None or int(inliers.sum()) < MIN_INLIERS:
        return None
    a, b = float(affine[0, 0]), float(affine[1, 0])
    scale = math.hypot(a, b)
    if abs(scale - 1.0) > MAX_SCALE_CHANGE:
        return None
    # Where the current image's centre lies in the previous image: the new ground centre.
    h1, w1 = g1.shape[:2]
    h0, w0 = g0.shape[:2]
    centre1 = np.array([(w1 - 1) / 2.0, (h1 - 1) / 2.0])
    linear, shift = affine[:, :2], affine[:, 2]
    in_previous = np.linalg.solve(linear, centre1 - shift)
    move_px = in_previous - np.array([(w0 - 1) / 2.0, (h0 - 1) / 2.0])
    # Content rotating clockwise on screen (image y down) means the camera turned anticlockwise.
    turn = -math.degrees(math.atan2(b, a))
    return Odometry(dx_m=float(move_px[0] * gsd_m), dy_m=float(-move_px[1] * gsd_m), turn_deg=turn,
                    image_heading_deg=image_heading_deg, inliers=int(inliers.sum()))
