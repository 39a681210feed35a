"""What the street matcher computes from a photo (query products) and from aerial imagery (reference products).

Reference products (north-up aerial imagery resampled to ``work_gsd_m`` first, so every source
looks alike to the encoder whatever its native resolution):

* **polar column descriptors** per candidate centre: the aerial disc of radius ``polar_r_max_m``
  around the centre, polar-transformed to ``polar_size`` (north = centre column), encoded, one
  ``C``-dim descriptor per token column (``polar_size[1] / 14`` azimuth columns);
* **aerial token map**: the imagery at ``bev_gsd_m`` (= ``bev_extent_m / bev_size_px``) encoded to
  one token per ``14 * bev_gsd_m`` metres. Around a candidate centre, a window of
  ``bev_extent_m + 2 * bev_search_m`` is what the BEV slides over.

Query products (panorama, or a perspective photo turned into a partial panorama), for each heading
hypothesis ``ψ`` (the azimuth of the panorama's centre column):

* the panorama band ``pano_top_deg..pano_bottom_deg`` resampled north-aligned under ``ψ`` to
  ``polar_size`` and encoded into column descriptors. Every hypothesis is its own encoding of
  rolled pixels, so query and reference columns are always compared at the same position of the
  ViT's token grid (rolling tokens instead mixes different position embeddings);
* the BEV (flat ground ``camera_height_m`` below the camera) rendered north-up under ``ψ``,
  encoded, only the cells in the ``bev_annulus_m`` ring (and covered by the photo) kept.

:func:`storage_per_km2` gives the bytes these products take per km² of reference imagery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cvgl.street.descriptors import (
    TokenExtractor,
    column_descriptors,
    normalise_token_map,
    resize_to,
)
from cvgl.street.geometry import (
    PanoramaBand,
    PinholeView,
    annulus_mask,
    as_tensor,
    azimuth_to_column,
    column_azimuths,
    panorama_to_bev,
    perspective_to_panorama,
    polar_transform,
    sample_image,
    sample_panorama,
)

__all__ = [
    "QueryProducts",
    "ReferenceProducts",
    "StreetConfig",
    "StreetQuery",
    "aerial_token_windows",
    "candidate_grid",
    "crop_token_windows",
    "polar_columns",
    "query_products",
    "region_token_map",
    "resample_to_gsd",
    "storage_per_km2",
]


@dataclass(frozen=True)
class StreetConfig:
    """Every parameter of the geometric street matcher (values fixed before the real-pairs measurement)."""

    layer: int = 8  # DINOv2 block whose tokens (before the final LayerNorm) are used
    gem_p: float = 3.0  # GeM power over the rows of a column
    work_gsd_m: float = 0.5  # reference imagery is resampled to this GSD before any product
    polar_size: tuple[int, int] = (112, 448)  # (rows, columns) of polar images and canonical panoramas
    polar_r_max_m: float = 25.0  # radius of the aerial disc behind the polar columns (CVACT tiles reach 27 m)
    pano_top_deg: float = 40.0  # panorama band encoded for columns (clipped to what the image has)
    pano_bottom_deg: float = -60.0
    camera_height_m: float = 2.5  # street-view camera above flat ground
    bev_extent_m: float = 42.0  # BEV square side, camera at the centre
    bev_size_px: int = 168  # BEV pixels per side (0.25 m/px, 12 tokens of 3.5 m)
    bev_annulus_m: tuple[float, float] = (5.0, 20.0)  # BEV cells scored: this ring around the camera
    bev_search_m: float = 10.5  # BEV translation search, ± metres (whole tokens)
    heading_step_deg: float = 5.625  # heading hypotheses step (half a token column of 448 px)

    def __post_init__(self) -> None:
        if self.polar_size[0] % 14 or self.polar_size[1] % 14 or self.bev_size_px % 14:
            raise ValueError("polar_size and bev_size_px must be multiples of 14")
        if self.search_cells * self.bev_token_m != self.bev_search_m:
            raise ValueError(f"bev_search_m must be whole tokens of {self.bev_token_m:g} m")

    @property
    def columns(self) -> int:
        return self.polar_size[1] // 14

    @property
    def bev_gsd_m(self) -> float:
        return self.bev_extent_m / self.bev_size_px

    @property
    def bev_token_m(self) -> float:
        return 14 * self.bev_gsd_m

    @property
    def bev_cells(self) -> int:
        return self.bev_size_px // 14

    @property
    def search_cells(self) -> int:
        return int(round(self.bev_search_m / self.bev_token_m))

    @property
    def window_px(self) -> int:
        """Side of the aerial window (BEV pixels) the BEV slides over."""
        return self.bev_size_px + 2 * 14 * self.search_cells

    def bev_token_mask(self) -> np.ndarray:
        """``[cells, cells]`` bool: BEV tokens whose centre lies in the annulus."""
        return annulus_mask(self.bev_cells, self.bev_extent_m, *self.bev_annulus_m)

    def headings(self, centre: float = 0.0, tolerance: float | None = None) -> np.ndarray:
        """Heading hypotheses: the whole circle (``tolerance`` None) or ``centre ± tolerance`` on the step grid."""
        if tolerance is None or tolerance >= 180.0:
            return np.arange(0.0, 360.0, self.heading_step_deg) + centre
        k = int(math.floor(tolerance / self.heading_step_deg + 1e-9))
        return centre + self.heading_step_deg * np.arange(-k, k + 1)


# ------------------------------------------------------------------------------------------------
# reference side
# ------------------------------------------------------------------------------------------------


@dataclass
class ReferenceProducts:
    """Reference products of ``N`` candidate centres: ``columns`` ``[N, w, C]``, ``token_maps`` ``[N, C, s, s]``."""

    columns: torch.Tensor
    token_maps: torch.Tensor


def resample_to_gsd(image: np.ndarray, gsd: float, target_gsd: float) -> np.ndarray:
    """An ``H×W×C`` image at ``gsd`` m/px resampled (antialiased) to ``target_gsd`` m/px, as float32."""
    t = as_tensor(image)
    if abs(gsd - target_gsd) < 1e-9:
        return np.asarray(image, dtype=np.float32)
    size = (max(1, round(t.shape[-2] * gsd / target_gsd)), max(1, round(t.shape[-1] * gsd / target_gsd)))
    return resize_to(t, size)[0].permute(1, 2, 0).numpy()


def polar_columns(
    extractor: TokenExtractor, aerial: np.ndarray, centres: np.ndarray, config: StreetConfig, batch: int = 16
) -> torch.Tensor:
    """``[K, w, C]`` polar column descriptors of an ``H×W×3`` aerial image at ``work_gsd_m`` around ``K``
    pixel centres ``[K, 2]`` (continuous ``(col, row)``)."""
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64))
    out = []
    for start in range(0, len(centres), batch):
        polar = polar_transform(aerial, centres[start : start + batch], config.work_gsd_m, config.polar_r_max_m, config.polar_size)
        out.append(column_descriptors(extractor(polar), config.gem_p))
    return torch.cat(out)


def aerial_token_windows(
    extractor: TokenExtractor, aerial: np.ndarray, centres: np.ndarray, config: StreetConfig, batch: int = 8
) -> torch.Tensor:
    """``[K, C, s, s]`` normalised token maps of the aerial window (``window_px`` at ``bev_gsd_m``) around each centre.

    Each window is encoded on its own (the benchmark's case: one candidate per gallery image); for
    a whole region use :func:`region_token_map` and :func:`crop_token_windows`.
    """
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64))
    image = as_tensor(aerial)
    side = config.window_px
    offsets = (np.arange(side) + 0.5 - side / 2.0) * (config.bev_gsd_m / config.work_gsd_m)
    out = []
    for start in range(0, len(centres), batch):
        chunk = centres[start : start + batch]
        cols = chunk[:, 0, None, None] + offsets[None, None, :]
        rows = chunk[:, 1, None, None] + offsets[None, :, None]
        cols, rows = np.broadcast_to(cols, (len(chunk), side, side)), np.broadcast_to(rows, (len(chunk), side, side))
        window = sample_image(
            image, torch.from_numpy(np.ascontiguousarray(cols).reshape(1, -1, side)), torch.from_numpy(np.ascontiguousarray(rows).reshape(1, -1, side))
        )
        window = window.reshape(image.shape[1], len(chunk), side, side).permute(1, 0, 2, 3)
        out.append(normalise_token_map(extractor(window)))
    return torch.cat(out)


def region_token_map(extractor: TokenExtractor, aerial: np.ndarray, config: StreetConfig, margin_cells: int = 3) -> torch.Tensor:
    """Token map ``[C, h, w]`` (NOT normalised) of a whole aerial region at ``work_gsd_m``, one cell per ``bev_token_m``.

    The region is resampled to ``bev_gsd_m`` and encoded in overlapping windows of ``window_px``;
    each window contributes its cells except a ``margin_cells`` border (less context), so every
    cell is encoded with context on all sides except at the region's edge. This is the index's
    BEV reference product; :func:`crop_token_windows` cuts and normalises candidate windows from it.
    """
    up = resample_to_gsd(aerial, config.work_gsd_m, config.bev_gsd_m)
    cells_h, cells_w = up.shape[0] // 14, up.shape[1] // 14
    image = as_tensor(up[: cells_h * 14, : cells_w * 14])
    win = config.window_px // 14
    keep = win - 2 * margin_cells
    if keep <= 0:
        raise ValueError("margin_cells leaves nothing of a window")
    out = torch.zeros(extractor.dim, cells_h, cells_w)
    starts_r = sorted({min(max(0, r - margin_cells), max(0, cells_h - win)) for r in range(0, cells_h, keep)})
    starts_c = sorted({min(max(0, c - margin_cells), max(0, cells_w - win)) for c in range(0, cells_w, keep)})
    filled = torch.zeros(cells_h, cells_w, dtype=torch.bool)
    for r0 in starts_r:
        for c0 in starts_c:
            tile = image[..., r0 * 14 : (r0 + win) * 14, c0 * 14 : (c0 + win) * 14]
            tokens = extractor(tile)[0]
            h, w = tokens.shape[-2:]
            # cells this window owns: its interior, or up to the region's edge
            rr0 = 0 if r0 == 0 else margin_cells
            cc0 = 0 if c0 == 0 else margin_cells
            rr1 = h if r0 + h >= cells_h else h - margin_cells
            cc1 = w if c0 + w >= cells_w else w - margin_cells
            target = (slice(r0 + rr0, r0 + rr1), slice(c0 + cc0, c0 + cc1))
            fresh = ~filled[target]
            out[(slice(None),) + target][:, fresh] = tokens[:, rr0:rr1, cc0:cc1][:, fresh]
            filled[target] = True
    return out


def crop_token_windows(token_map: torch.Tensor, centres_cells: np.ndarray, config: StreetConfig) -> torch.Tensor:
    """Normalised ``[K, C, s, s]`` windows of a :func:`region_token_map` around integer cell centres ``[K, 2]`` (col, row)."""
    half = config.window_px // 28
    side = 2 * half
    out = []
    for c, r in np.atleast_2d(np.asarray(centres_cells, dtype=int)):
        if r - half < 0 or c - half < 0 or r + half > token_map.shape[1] or c + half > token_map.shape[2]:
            raise ValueError(f"candidate cell ({c}, {r}) is closer than {half} cells to the token map's edge")
        out.append(token_map[:, r - half : r - half + side, c - half : c - half + side])
    return normalise_token_map(torch.stack(out))


def candidate_grid(width_px: int, height_px: int, gsd: float, stride_m: float, margin_m: float) -> np.ndarray:
    """``[K, 2]`` pixel centres (col, row) every ``stride_m`` over an aerial image, ``margin_m`` from its edges."""
    step = stride_m / gsd
    margin = margin_m / gsd
    cols = np.arange(margin, width_px - margin + 1e-9, step)
    rows = np.arange(margin, height_px - margin + 1e-9, step)
    cc, rr = np.meshgrid(cols, rows)
    return np.stack((cc.ravel(), rr.ravel()), axis=1)


# ------------------------------------------------------------------------------------------------
# query side
# ------------------------------------------------------------------------------------------------


@dataclass
class StreetQuery:
    """A street photo as a (possibly partial) equirectangular panorama band.

    ``pano`` ``[1, 3, H, W]`` float 0..255; ``band`` its elevations; ``valid`` ``[H, W]`` bool (all
    True for a panorama; the covered cells for a perspective photo). Heading hypotheses are the
    azimuth of ``pano``'s centre column: 0 for a north-aligned panorama, and for a perspective
    photo resampled by :meth:`from_perspective` with its measured heading (compass ± tolerance
    around 0; with no heading at all, resample with ``heading=0`` and search the whole circle).
    """

    pano: torch.Tensor
    band: PanoramaBand
    valid: np.ndarray

    @classmethod
    def from_panorama(cls, image: np.ndarray, band: PanoramaBand | None = None) -> StreetQuery:
        t = as_tensor(image)
        height, width = t.shape[-2:]
        if width < 2 * 14 or width < height:
            raise ValueError(f"a panorama is wider than tall, got {width}×{height}")
        return cls(t, band or PanoramaBand.for_image(height, width), np.ones((height, width), dtype=bool))

    @classmethod
    def from_perspective(
        cls, image: np.ndarray, view: PinholeView, width: int = 1024, band: PanoramaBand = PanoramaBand(60.0, -60.0)
    ) -> StreetQuery:
        """A perspective photo resampled into a north-aligned panorama band (``view.heading`` decides where)."""
        height = int(round(width * (band.top - band.bottom) / 360.0))
        pano, valid = perspective_to_panorama(image, view, width, band, height)
        return cls(pano, band, valid)


@dataclass
class QueryProducts:
    """Query products for ``K`` heading hypotheses: ``columns`` ``[K, w, C]`` with ``column_valid`` ``[K, w]``,
    ``bev`` ``[K, C, s, s]`` normalised and masked, ``bev_cells`` ``[K]`` scored cells each."""

    headings: np.ndarray
    columns: torch.Tensor
    column_valid: torch.Tensor
    bev: torch.Tensor
    bev_cells: np.ndarray


def _canonical_columns(query: StreetQuery, headings: np.ndarray, config: StreetConfig) -> torch.Tensor:
    """The band ``pano_top..pano_bottom`` at ``polar_size``, north-aligned under each heading: ``[K, 4, H, W]``
    (RGB + coverage), resized first (antialiased, across the seam) and then rolled, so whole-pixel rolls are exact."""
    height, width = query.pano.shape[-2:]
    r0, r1, _ = query.band.crop(config.pano_top_deg, config.pano_bottom_deg, height)
    stacked = torch.cat((query.pano, torch.from_numpy(query.valid.astype(np.float32))[None, None]), dim=1)[..., r0:r1, :]
    out_h, out_w = config.polar_size
    # resize three copies side by side and keep the middle one: the seam is filtered circularly
    small = resize_to(stacked.repeat(1, 1, 1, 3), (out_h, 3 * out_w))[..., out_w : 2 * out_w]
    azimuth = column_azimuths(out_w)
    rows = torch.arange(out_h, dtype=torch.float64)[:, None].expand(out_h, out_w) + 0.5
    rolled = []
    for heading in headings:
        # canonical column j looks at azimuth az_j: in the panorama it is the column that looks there under this heading
        cols = torch.from_numpy(azimuth_to_column(azimuth, out_w, float(heading)))[None, :].expand(out_h, out_w)
        rolled.append(sample_panorama(small, cols[None], rows[None]))
    return torch.cat(rolled)


def query_products(extractor: TokenExtractor, query: StreetQuery, headings: np.ndarray, config: StreetConfig) -> QueryProducts:
    """Column descriptors and BEV token maps of a street photo for every heading hypothesis."""
    headings = np.atleast_1d(np.asarray(headings, dtype=np.float64))
    canonical = _canonical_columns(query, headings, config)
    coverage = canonical[:, 3:4]
    tokens = extractor(canonical[:, :3] * (coverage > 0.5))
    column_valid = torch.nn.functional.avg_pool2d(coverage, 14).amax(dim=2)[:, 0] > 0.5  # [K, w]
    columns = column_descriptors(tokens, config.gem_p, column_valid)

    stacked = torch.cat((query.pano, torch.from_numpy(query.valid.astype(np.float32))[None, None]), dim=1)
    bev = panorama_to_bev(stacked, query.band, config.camera_height_m, config.bev_extent_m, config.bev_size_px, headings)
    bev_tokens = extractor(bev[:, :3])
    covered = torch.nn.functional.avg_pool2d(bev[:, 3:4], 14)[:, 0] > 0.5  # [K, s, s]
    mask = torch.from_numpy(config.bev_token_mask())[None] & covered
    maps = torch.stack([normalise_token_map(bev_tokens[k : k + 1], mask[k])[0] for k in range(len(headings))])
    return QueryProducts(headings, columns, column_valid, maps, mask.flatten(1).sum(1).numpy())


# ------------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------------


def storage_per_km2(config: StreetConfig, dim: int = 384, grid_stride_m: float = 5.0, bytes_per_value: int = 2) -> dict[str, float]:
    """Bytes per km² of the reference products: polar columns on a ``grid_stride_m`` grid of centres and
    the aerial token map (one ``dim``-vector per ``bev_token_m`` cell), at ``bytes_per_value`` (2 = float16)."""
    centres = (1000.0 / grid_stride_m) ** 2
    cells = (1000.0 / config.bev_token_m) ** 2
    polar = centres * config.columns * dim * bytes_per_value
    tokens = cells * dim * bytes_per_value
    return {"centres": centres, "polar_columns_bytes": polar, "token_cells": cells, "token_map_bytes": tokens, "total_bytes": polar + tokens}
