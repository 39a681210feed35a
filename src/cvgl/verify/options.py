"""What ``--refine``, ``--matcher`` and ``--refine-k`` ask of the verification stage.

Kept apart from :mod:`cvgl.verify.refine` (which reads the index, hence torch) so that the CLI
can build its parser, and check its options, without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cvgl.errors import InputError
from cvgl.verify.features import MATCHERS

REFINE_MODES = ("auto", "on", "off")
DEFAULT_MATCHER = "aliked-lightglue"
FALLBACK_MATCHER = "sift"  # no weights, always installed


@dataclass(frozen=True)
class RefineOptions:
    """``mode``: auto (on when a matcher is available; the fallback matcher otherwise), on
    (the named matcher or a one-line error), off (retrieval only)."""

    mode: str = "auto"
    matcher: str = DEFAULT_MATCHER
    top_k: int = 10  # retrieved tiles verified per photo
    margin_m: float = 56.0  # window = tile + this on every side (a footprint may straddle tiles)
    max_keypoints: int | None = None  # None: the matcher's default (ALIKED 512, XFeat/SIFT 1024)
    min_inliers: int = 25
    stop_at_inliers: int | None = 50  # stop matching once a candidate verifies this strongly
    pitch_search: bool = True

    def __post_init__(self) -> None:
        if self.mode not in REFINE_MODES:
            raise InputError(f"refine mode {self.mode!r}: choose one of {', '.join(REFINE_MODES)}")
        if self.matcher not in MATCHERS:
            raise InputError(f"matcher {self.matcher!r}: choose one of {', '.join(MATCHERS)}")
        if not 1 <= int(self.top_k) <= 100:
            raise InputError(f"refine top-k {self.top_k}: verify between 1 and 100 candidates")
        if not (math.isfinite(self.margin_m) and 0 <= self.margin_m <= 1000):
            raise InputError(f"refine margin {self.margin_m} m: give 0-1000 m")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


__all__ = ["DEFAULT_MATCHER", "FALLBACK_MATCHER", "MATCHERS", "REFINE_MODES", "RefineOptions"]
