"""The verification stage as ``cvgl locate`` runs it: retrieved tiles -> windows -> verified pose.

For one prepared photo (its :class:`cvgl.preprocess.MatchView`) and its top-K retrieved tiles,
read an orthophoto window around each tile (:mod:`cvgl.index.windows`; window features cached
across photos), match, and keep the best verified fit (:func:`cvgl.verify.stage.verify_candidates`).

How the photo is presented follows what is known about it (defaults measured by the study behind
:mod:`cvgl.verify`, see ``docs/benchmarks.md``):

* heading known: rotated north-up onto an expanded canvas (every pixel kept), checked against
  the compass; unknown: matched at four 90° turns (LightGlue is not rotation invariant);
* pitch known: rectified to nadir (by preprocessing); unknown: the photo as it is first, then —
  only when that does not verify — rectified at a few pitch hypotheses;
* altitude known: at the index's ground sample distance (scale checked); unknown: any scale.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

from cvgl.data.geometry import rectify_tilt, tilt_homography
from cvgl.index.store import ReferenceIndex
from cvgl.index.windows import WindowReader
from cvgl.preprocess import MatchView
from cvgl.verify.features import (
    Matcher,
    MatcherUnavailableError,
    create_matcher,
)
from cvgl.verify.options import FALLBACK_MATCHER, RefineOptions
from cvgl.verify.stage import (
    Candidate,
    PhotoGeometry,
    Verification,
    VerifyConfig,
    verify_candidates,
)

PITCH_HYPOTHESES = (25.0, 40.0, 55.0)  # tried, in order, when the pitch is unknown and nadir failed
FEATURE_CACHE = 512  # windows whose features are kept across photos
# Two sensors of one place disagree by about a metre (WV2 vs WV3 measured ~1.25 m + ~1 m locally):
# no inlier statistic sees it, so the radius holds (2 x statistical)^2 + floor^2 (91 % coverage
# on the Longmont study; see cvgl.verify).
UNCERTAINTY_SCALE = 2.0
REFERENCE_ERROR_M = 2.5


@dataclass
class RefineResult:
    """What verification found for one photo."""

    matcher: str
    best: Verification | None  # the verified candidate (None: nothing verified)
    records: list[Verification]  # every candidate tried, best first
    seconds: float
    candidates: int
    pitch_deg: float | None = None  # the pitch hypothesis that verified (unknown pitch only)
    evidence: dict = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return self.best is not None

    def strongest(self) -> Verification | None:
        """The best record, verified or not (the evidence even a failed verification gives)."""
        return self.records[0] if self.records else None


def rotate_expand(image: np.ndarray, angle_cw: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate clockwise about the centre onto a canvas that keeps every pixel (black corners);
    also returns the 2x3 map from the input's pixels to the canvas's."""
    h, w = image.shape[:2]
    a = math.radians(angle_cw)
    # rounded first: cos(90 deg) is 6e-17, not 0, and would add a column
    bw = int(math.ceil(round(abs(w * math.cos(a)) + abs(h * math.sin(a)), 6)))
    bh = int(math.ceil(round(abs(w * math.sin(a)) + abs(h * math.cos(a)), 6)))
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -angle_cw, 1.0)
    m[:, 2] += ((bw - 1) / 2 - (w - 1) / 2, (bh - 1) / 2 - (h - 1) / 2)
    return cv2.warpAffine(image, m, (bw, bh), flags=cv2.INTER_LINEAR, borderValue=0), m


class Refiner:
    """Holds the matcher, the window reader and the window-feature cache of one index."""

    def __init__(self, index: ReferenceIndex, options: RefineOptions = RefineOptions()) -> None:
        self.index = index
        self.options = options
        self.matcher = self._matcher(options)
        self.windows = WindowReader(index, options.margin_m)
        self.cache: OrderedDict = _BoundedCache(FEATURE_CACHE)
        self.config = VerifyConfig(min_inliers=options.min_inliers, stop_at_inliers=options.stop_at_inliers,
                                   uncertainty_scale=UNCERTAINTY_SCALE, reference_error_m=REFERENCE_ERROR_M)

    @staticmethod
    def _matcher(options: RefineOptions) -> Matcher:
        try:
            return create_matcher(options.matcher, options.max_keypoints)
        except MatcherUnavailableError as exc:
            if options.mode == "on":
                raise
            print(f"warning: {exc}; verifying with {FALLBACK_MATCHER} instead", file=sys.stderr)
            return create_matcher(FALLBACK_MATCHER)

    @property
    def matcher_name(self) -> str:
        return getattr(self.matcher, "name", self.options.matcher)

    def candidates(self, rows: list[int], heading_hints: list[float] | None = None) -> list[Candidate]:
        out = []
        for i, row in enumerate(rows):
            window = self.windows(row)
            hint = None if heading_hints is None else float(heading_hints[i])
            out.append(Candidate(window.window_id, window.image, window.transform, window.crs, hint))
        return out

    def refine(self, view: MatchView, rows: list[int], heading_hints: list[float] | None = None) -> RefineResult:
        """Verify the photo against the windows of tile ``rows`` (retrieval order).

        ``heading_hints`` (a photo of unknown heading): per row, the heading hypothesis retrieval
        scored best for that tile; the photo's 90-degree turn nearest it is matched first
        (:func:`cvgl.verify.stage.turn_order`). Ignored when the heading is known."""
        started = time.perf_counter()
        hints = heading_hints[: self.options.top_k] if heading_hints is not None and view.heading_deg is None else None
        candidates = self.candidates(rows[: self.options.top_k], hints)
        row_of = {c.candidate_id: int(r) for c, r in zip(candidates, rows)}
        records = self._verify(view, candidates, view.rectified_pitch_deg > 1.0 or view.pitch_known)
        pitch = None
        if not any(r.verified for r in records) and not view.pitch_known and self.options.pitch_search:
            for hypothesis in PITCH_HYPOTHESES:
                tilted = MatchView(rectify_tilt(view.image, hypothesis, view.hfov_deg), False, hypothesis, True,
                                   view.heading_deg, view.hfov_deg, _rectified_corners(view, hypothesis))
                tried = self._verify(tilted, candidates, nadir=True)
                if any(r.verified for r in tried):
                    records, pitch = tried, hypothesis
                    break
        for record in records:
            row = row_of.get(record.candidate_id)
            record.extras["row"] = row
            record.extras["tile_id"] = None if row is None else str(self.index.tiles["tile_id"].iloc[row])
        best = records[0] if records and records[0].verified else None
        return RefineResult(self.matcher_name, best, records, time.perf_counter() - started, len(candidates), pitch)

    def _verify(self, view: MatchView, candidates: list[Candidate], nadir: bool) -> list[Verification]:
        image = view.image
        rotation = 0.0
        corners = view.corners_px
        if view.heading_deg is not None:
            rotation = float(view.heading_deg)
            image, to_canvas = rotate_expand(image, rotation)
            if corners is not None:
                corners = np.c_[corners, np.ones(len(corners))] @ to_canvas.T
        # A scale from the altitude holds only for a nadir (or rectified) view: unknown pitch, any scale.
        at_gsd = view.at_index_gsd and (view.pitch_known or view.rectified_pitch_deg > 1.0)
        geometry = PhotoGeometry(north_up=view.heading_deg is not None, at_index_gsd=at_gsd, nadir=nadir,
                                 rotation_deg=rotation, corners_px=corners)
        return verify_candidates(np.ascontiguousarray(image), candidates, self.matcher, geometry, self.config, self.cache)


def _rectified_corners(view: MatchView, pitch_deg: float) -> np.ndarray:
    """The view's photo corners after rectifying it at ``pitch_deg`` (same-size warp)."""
    h, w = view.image.shape[:2]
    corners = view.corners_px if view.corners_px is not None else np.array([[0.0, 0.0], [w - 1.0, 0.0], [w - 1.0, h - 1.0], [0.0, h - 1.0]])
    mapped = np.c_[corners, np.ones(len(corners))] @ np.linalg.inv(tilt_homography(w, h, pitch_deg, view.hfov_deg)).T
    return mapped[:, :2] / mapped[:, 2:3]


class _BoundedCache(OrderedDict):
    """A mapping that forgets the least recently stored entries beyond ``size`` (window features)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
