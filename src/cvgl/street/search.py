"""Street-photo search over a region: dense candidate centres under a location prior, polar shortlist, BEV re-rank.

The reference side of a region (:class:`RegionProducts`, what an index stores for a street search):

* ``centres_m`` ``[N, 2]``: candidate camera positions on a ``stride_m`` grid (east, south metres from
  the region's top-left corner; the polar match needs the camera within ~2.5–5 m of a centre, so
  the stride is 5 m by default);
* ``columns`` ``[N, w, C]`` float16: the polar column descriptors of each centre;
* ``token_map`` ``[C, h, w]`` float16: the region's aerial token map, one cell per ``bev_token_m``
  (cell ``(i, j)`` covers ``[j, j + 1) × [i, i + 1)`` cells from the top-left corner); candidate
  windows for the BEV are cut from it.

The search: candidates within ``radius_m`` of the prior (all without one) are scored by the polar
columns at every heading hypothesis; the best ``shortlist`` of them are re-scored by the BEV (slid
±``bev_search_m`` around the centre) and the two z-scored signals summed (z over the shortlist for
both, so they weigh alike). The answer is the best centre, the camera position (centre + BEV offset),
the heading, and the evidence (winner vs best candidate more than ``exclusion_m`` away).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvgl.street.descriptors import TokenExtractor
from cvgl.street.matching import evidence, fuse, rank, score_bev, score_polar, zscore
from cvgl.street.products import (
    QueryProducts,
    ReferenceProducts,
    StreetConfig,
    candidate_grid,
    crop_token_windows,
    polar_columns,
    region_token_map,
)

__all__ = ["RegionProducts", "StreetAnswer", "region_products", "search_region"]


@dataclass
class RegionProducts:
    """Reference products of one north-up region (see module doc); ``centres_m`` east/south of the top-left corner."""

    centres_m: np.ndarray
    columns: torch.Tensor
    token_map: torch.Tensor
    token_m: float

    @property
    def nbytes(self) -> int:
        return int(self.columns.numel() * self.columns.element_size() + self.token_map.numel() * self.token_map.element_size())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (float16 products) for storage next to an index."""
        return {
            "centres_m": self.centres_m.astype(np.float32),
            "columns": self.columns.to(torch.float16).numpy(),
            "token_map": self.token_map.to(torch.float16).numpy(),
            "token_m": np.array(self.token_m, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RegionProducts:
        return cls(
            np.asarray(arrays["centres_m"], dtype=np.float64),
            torch.from_numpy(np.asarray(arrays["columns"])),
            torch.from_numpy(np.asarray(arrays["token_map"])),
            float(arrays["token_m"]),
        )


def region_products(
    extractor: TokenExtractor, aerial: np.ndarray, config: StreetConfig, stride_m: float = 5.0, batch: int = 16
) -> RegionProducts:
    """Products of an ``H×W×3`` north-up region at ``config.work_gsd_m``: polar columns on a ``stride_m`` grid
    (centres far enough from the edges for their polar disc and BEV window) and the region's token map."""
    margin = max(config.polar_r_max_m, config.bev_extent_m / 2 + config.bev_search_m) + config.bev_token_m
    centres_px = candidate_grid(aerial.shape[1], aerial.shape[0], config.work_gsd_m, stride_m, margin)
    if len(centres_px) == 0:
        raise ValueError(f"a street region needs at least {2 * margin:.0f} m on each side")
    columns = polar_columns(extractor, aerial, centres_px, config, batch).to(torch.float16)
    token_map = region_token_map(extractor, aerial, config).to(torch.float16)
    return RegionProducts(centres_px * config.work_gsd_m, columns, token_map, config.bev_token_m)


@dataclass
class StreetAnswer:
    """Best first: candidate indices into the region's centres, their fused scores, the camera position
    (east, south metres from the region's top-left, BEV-refined), heading, and the winner's evidence."""

    candidates: np.ndarray
    scores: np.ndarray
    positions_m: np.ndarray
    headings: np.ndarray
    evidence: float


def search_region(
    products: RegionProducts,
    query: QueryProducts,
    config: StreetConfig,
    prior_m: tuple[float, float] | None = None,
    radius_m: float | None = None,
    shortlist: int = 256,
    weights: dict[str, float] | None = None,
    exclusion_m: float = 15.0,
    refine: tuple[TokenExtractor, np.ndarray] | None = None,
    refine_top: int = 10,
) -> StreetAnswer:
    """Rank a region's candidate centres for one street photo (see module doc).

    ``refine`` = (extractor, the region's imagery at ``work_gsd_m``): the ``refine_top`` best candidates
    get their polar columns encoded again at the BEV-refined camera position (the polar match loses
    most of its power 2.5 m off the camera, the BEV does not), z-scored against the shortlist's
    polar scores at the grid centres: their score becomes z(BEV) + z(refined polar).
    """
    centres = products.centres_m
    inside = np.ones(len(centres), dtype=bool)
    if prior_m is not None and radius_m is not None:
        inside = np.hypot(*(centres - np.asarray(prior_m, dtype=np.float64)).T) <= radius_m
    pool = np.flatnonzero(inside)
    if len(pool) == 0:
        raise ValueError("no candidate centre within the prior's radius")
    polar_all = score_polar(query, ReferenceProducts(products.columns[pool].float(), torch.empty(0)))
    keep = pool[np.argsort(-zscore(polar_all).max(0), kind="stable")[:shortlist]]
    order_in_pool = {c: i for i, c in enumerate(pool)}
    polar = polar_all[:, [order_in_pool[c] for c in keep]]
    cells = np.rint(centres[keep] / products.token_m).astype(int)  # window centre: the cell corner nearest the centre
    windows = crop_token_windows(products.token_map.float(), cells, config)
    bev, offsets = score_bev(query, ReferenceProducts(torch.empty(0), windows), config)
    w = weights or {"polar": 1.0, "bev": 1.0}
    fused = fuse({"polar": polar, "bev": bev}, w)
    ranking = rank(fused, query.headings, offsets)
    # camera = window centre + BEV offset (east, north) -> east, south from the top-left
    camera = cells * products.token_m + ranking.offset_m * np.array([1.0, -1.0])
    score = ranking.score.copy()
    if refine is not None:
        extractor, aerial = refine
        top = ranking.order[:refine_top]
        best = fused.argmax(0)[top]  # each candidate at its own best heading hypothesis
        again = polar_columns(extractor, aerial, camera[top] / config.work_gsd_m, config)
        refined = np.array(
            [float(torch.einsum("wc,wc->", query.columns[k], again[i]) / query.column_valid[k].float().sum().clamp(min=1)) for i, k in enumerate(best)]
        )
        z_polar = (refined - polar.mean()) / max(float(polar.std()), 1e-12)  # against the shortlist's grid-centre scores
        score[top] = w.get("bev", 1.0) * zscore(bev)[best, top] + w.get("polar", 1.0) * z_polar
    order = np.argsort(-score, kind="stable")
    return StreetAnswer(
        keep[order],
        score[order],
        camera[order],
        ranking.heading[order],
        evidence(score, centres[keep], exclusion_m),
    )
