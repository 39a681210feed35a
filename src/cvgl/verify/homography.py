"""Robust photo -> reference homography from point matches, and how well it pins a point down.

A drone photo of (locally) flat ground and an orthophoto window are related by a plane-induced
homography; buildings and trees break the plane, and wrong matches break everything, so the fit
is robust: OpenCV's USAC with MAGSAC++ scoring by default, or PoseLib's LO-RANSAC when asked.

The uncertainty of any mapped point (the photo centre above all) comes from the inliers
themselves: the inlier residuals give the noise level, the inliers' layout gives how much that
noise moves the homography (Gauss-Newton covariance of its 8 parameters), and the covariance is
propagated to the point. Few inliers, or inliers bunched in one corner of the photo far from its
centre, give a large uncertainty; many well-spread inliers a small one. That is first-order
error propagation for independent residuals; the residuals MAGSAC lets through are truncated
at the threshold, so the radius is calibrated against measured errors by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ESTIMATORS = ("magsac", "poselib")
MIN_MATCHES = 8  # 4 determine a homography; ask for twice that before trusting a robust fit


@dataclass(frozen=True)
class HomographyFit:
    """``matrix`` maps query (photo) pixels to reference (window) pixels, ``matrix[2, 2] == 1``.

    ``inliers`` flags the matches consistent with it; ``reprojection_error_px`` is the RMS forward
    transfer error over the inliers, in reference pixels; ``residual_sigma_px`` the per-coordinate
    noise estimate sqrt(sum r^2 / (2n - 8))."""

    matrix: np.ndarray
    inliers: np.ndarray
    reprojection_error_px: float
    residual_sigma_px: float
    query_xy: np.ndarray  # the inlier points, kept for error propagation
    reference_xy: np.ndarray

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def inlier_ratio(self) -> float:
        return float(self.inliers.mean()) if len(self.inliers) else 0.0


def project(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 homography to ``[N, 2]`` points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h = pts @ matrix[:, :2].T + matrix[:, 2]
    return h[:, :2] / h[:, 2:3]


def fit_homography(
    query_xy: np.ndarray, reference_xy: np.ndarray, threshold_px: float = 3.0, estimator: str = "magsac",
    confidence: float = 0.9999, max_iterations: int = 10_000,
) -> HomographyFit | None:
    """Robust homography query -> reference from matched points, or None when there is none.

    ``threshold_px`` is the inlier threshold in reference pixels (for MAGSAC++ the upper bound of
    its marginalised noise scale). Deterministic: OpenCV's USAC starts from a fixed seed."""
    src = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(reference_xy, dtype=np.float64).reshape(-1, 2)
    if len(src) < MIN_MATCHES:
        return None
    if estimator == "magsac":
        matrix, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, threshold_px, maxIters=max_iterations, confidence=confidence)
        if matrix is None or mask is None:
            return None
        inliers = mask.ravel().astype(bool)
    elif estimator == "poselib":
        import poselib

        matrix, info = poselib.estimate_homography(
            src, dst, {"max_reproj_error": threshold_px, "max_iterations": max_iterations, "success_prob": confidence}, {}
        )
        inliers = np.asarray(info.get("inliers", []), dtype=bool)
        if matrix is None or len(inliers) != len(src):
            return None
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not np.all(np.isfinite(matrix)) or abs(matrix[2, 2]) < 1e-12:
        return None
    matrix = matrix / matrix[2, 2]
    # Inliers by the final model (estimators may report those of an earlier one).
    residual = np.linalg.norm(project(matrix, src) - dst, axis=1)
    inliers &= residual <= threshold_px
    n = int(inliers.sum())
    if n < MIN_MATCHES:
        return None
    r = residual[inliers]
    sigma = float(np.sqrt((r**2).sum() / max(2 * n - 8, 1)))
    return HomographyFit(matrix, inliers, float(np.sqrt((r**2).mean())), sigma, src[inliers], dst[inliers])


def _normaliser(points: np.ndarray) -> np.ndarray:
    """Hartley normalisation: centroid to the origin, mean distance sqrt(2)."""
    centre = points.mean(0)
    spread = np.sqrt(((points - centre) ** 2).sum(1)).mean()
    s = np.sqrt(2.0) / max(spread, 1e-12)
    return np.array([[s, 0.0, -s * centre[0]], [0.0, s, -s * centre[1]], [0.0, 0.0, 1.0]])


def _jacobian(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """d project(H, p) / d(h11..h32) for H normalised to h33 = 1: ``[N, 2, 8]``."""
    x, y = points[:, 0], points[:, 1]
    w = h[2, 0] * x + h[2, 1] * y + 1.0
    u = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w
    v = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w
    zero, one = np.zeros_like(x), np.ones_like(x)
    du = np.stack([x, y, one, zero, zero, zero, -u * x, -u * y], 1) / w[:, None]
    dv = np.stack([zero, zero, zero, x, y, one, -v * x, -v * y], 1) / w[:, None]
    return np.stack([du, dv], 1)


def point_covariance(fit: HomographyFit, query_point: tuple[float, float]) -> np.ndarray:
    """2x2 covariance (reference px^2) of where ``query_point`` maps, from the inlier residuals.

    Cov(h) = sigma^2 (J^T J)^-1 over the inliers, propagated with the point's own Jacobian, in
    Hartley-normalised coordinates (the result does not depend on the normalisation, its
    conditioning does)."""
    t_q, t_r = _normaliser(fit.query_xy), _normaliser(fit.reference_xy)
    h = t_r @ fit.matrix @ np.linalg.inv(t_q)
    h = h / h[2, 2]
    q = project(t_q, fit.query_xy)
    jac = _jacobian(h, q).reshape(-1, 8)
    info = jac.T @ jac
    g = _jacobian(h, project(t_q, np.asarray(query_point, dtype=np.float64)[None]))[0]  # [2, 8]
    try:
        cov_h = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        return np.full((2, 2), np.inf)
    scale = t_r[0, 0]  # reference px -> normalised units
    cov_n = (fit.residual_sigma_px * scale) ** 2 * (g @ cov_h @ g.T)
    return cov_n / scale**2


def block_jackknife_covariance(fit: HomographyFit, query_point: tuple[float, float], blocks: int = 3) -> np.ndarray:
    """2x2 covariance (reference px^2) of where ``query_point`` maps, by a spatial block jackknife.

    Residuals of neighbouring matches are correlated (a building leaning the same way, a local
    misregistration), which :func:`point_covariance`'s independence assumption ignores. Here the
    inliers are split into a ``blocks`` x ``blocks`` grid over their extent in the photo; the
    homography is refitted (least squares) without each occupied block in turn, and the spread of
    the mapped point over those fits, scaled by (B - 1) / B, is the jackknife covariance. Fewer than
    three occupied blocks (all inliers in one area) cannot tell and give infinity."""
    q, r = fit.query_xy, fit.reference_xy
    lo, hi = q.min(0), q.max(0)
    cell = np.minimum(((q - lo) / np.maximum(hi - lo, 1e-9) * blocks).astype(int), blocks - 1)
    label = cell[:, 1] * blocks + cell[:, 0]
    occupied = np.unique(label)
    if len(occupied) < 3:
        return np.full((2, 2), np.inf)
    point = np.asarray(query_point, dtype=np.float64)[None]
    mapped = []
    for b in occupied:
        keep = label != b
        if keep.sum() < MIN_MATCHES:
            continue
        matrix, _ = cv2.findHomography(q[keep], r[keep], 0)
        if matrix is not None and np.all(np.isfinite(matrix)):
            mapped.append(project(matrix, point)[0])
    if len(mapped) < 3:
        return np.full((2, 2), np.inf)
    mapped = np.array(mapped)
    dev = mapped - mapped.mean(0)
    return (len(mapped) - 1) / len(mapped) * dev.T @ dev
