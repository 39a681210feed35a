"""The Longmont protocols: WV2 drone-style photos against WV3 tiles of the same 1 km².

Reference: WV3 (2014-10, 0.3 m) tiles of 112 m at 0.5 m GSD, stride 56 m (256 tiles). Queries:
WV2 (2014-06, 0.5 m, another sensor) — a real appearance gap — in six families (nadir, oblique
30/45/60 with a 50° lens, oblique + photometric change; heading known and unknown), at random
off-grid centres. **Spatial split** (:func:`east_west`): the east half is the test side; only
west-half photos may be used for fitting. Photos are written as JPEGs with EXIF/XMP and read back
through the product's :func:`cvgl.preprocess.prepare_query`. Correct at k = a top-k tile centre
within the tile half-diagonal (79 m) of the true photo centre.

Used by ``cvgl bench longmont`` and by training's evaluation (``eval.protocol: longmont``), so
trained and zero-shot encoders are compared on identical inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from cvgl.data.raster import raster_info
from cvgl.data.samples import longmont_scene
from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
from cvgl.data.tiling import TilingSpec, iter_tiles
from cvgl.evaluate.metrics import recall_at_k_by_distance
from cvgl.evaluate.retrieval import top_k_per_query
from cvgl.geo import geodesic_distance_m, tile_half_diagonal_m
from cvgl.models.encoder import Encoder
from cvgl.preprocess import QueryOptions, prepare_query

SPEC = TilingSpec(tile_m=112.0, stride_m=56.0, gsd_m=0.5)
JITTER = (0.8, 1.25)
RADIUS_M = tile_half_diagonal_m(SPEC.tile_m)  # correct at k: a top-k tile centre within the tile half-diagonal


def families() -> list[QueryFamily]:
    out = []
    for known in (True, False):
        tag = "heading known" if known else "heading unknown"
        out += [
            QueryFamily(f"nadir, {tag}", pitches=(0.0,), heading_known=known, scale_jitter=JITTER),
            QueryFamily(
                f"oblique 30/45/60, {tag}", pitches=(30.0, 45.0, 60.0), heading_known=known,
                scale_jitter=JITTER, hfov_deg=50.0, footprint_m=80.0,
            ),
            QueryFamily(
                f"oblique + photometric, {tag}", pitches=(30.0, 45.0, 60.0), heading_known=known,
                scale_jitter=JITTER, hfov_deg=50.0, footprint_m=80.0, photometric=True,
            ),
        ]
    return out


def east_west() -> tuple[float, float, float]:
    """(west edge, mid easting, east edge) of the query scene: the spatial split of protocol B."""
    left, _, right, _ = raster_info(longmont_scene("wv2")).bounds
    return left, (left + right) / 2, right


def prepare_family(queries, folder: Path, options: QueryOptions) -> dict:
    """Photos as ``cvgl locate`` prepares them: every hypothesis image, the photo it belongs to
    (``owner``), and each photo's true centre."""
    prepared = [prepare_query(write_query_photo(q, folder), options, SPEC.tile_m, SPEC.gsd_m) for q in queries]
    return dict(
        images=[h.image for p in prepared for h in p.hypotheses],
        owner=np.concatenate([[i] * len(p.hypotheses) for i, p in enumerate(prepared)]),
        lat=np.array([q.center_lat for q in queries]),
        lon=np.array([q.center_lon for q in queries]),
    )


def score_family(query: np.ndarray, reference: np.ndarray, ref_lat: np.ndarray, ref_lon: np.ndarray,
                 family: dict) -> tuple[dict[int, float], np.ndarray]:
    """({k: R@k}, top-1 error in metres per photo): a photo scores its best hypothesis per tile."""
    top = top_k_per_query(query, reference, family["owner"], len(family["lat"]))
    recall = recall_at_k_by_distance(ref_lat[top], ref_lon[top], family["lat"], family["lon"], RADIUS_M)
    error = geodesic_distance_m(ref_lat[top[:, 0]], ref_lon[top[:, 0]], family["lat"], family["lon"])
    return recall, error


def longmont_families(names: list[str] | None = None):
    """The ``longmont`` benchmark's query families (all six, or those named)."""
    every = families()
    if not names:
        return every
    unknown = sorted(set(names) - {f.name for f in every})
    if unknown:
        raise ValueError(f"unknown longmont families {unknown}; choose from {[f.name for f in every]}")
    return [f for f in every if f.name in names]


class LongmontProtocol:
    """East-half drone protocol of ``cvgl bench longmont``; photos are made once and reused.

    Built from that benchmark's own pieces (families, seeds, split, photo preparation and
    scoring), so trained and zero-shot rows see exactly its photos and correctness radius.
    """

    def __init__(self, per_family: int = 50, families: list[str] | None = None, seed: int = 0) -> None:
        self.tiles = list(iter_tiles(longmont_scene("wv3"), SPEC))
        self.lat = np.array([t.lat for t in self.tiles])
        self.lon = np.array([t.lon for t in self.tiles])
        _, mid, right = east_west()
        wanted = {f.name for f in longmont_families(families)}
        self.families: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            # Same seeds as the benchmark's protocol B: k indexes the full family list.
            for k, family in enumerate(longmont_families()):
                if family.name in wanted:
                    queries = make_queries(longmont_scene("wv2"), per_family, family, seed=seed * 100 + k, x_range=(mid, right))
                    self.families[family.name] = prepare_family(queries, Path(tmp), QueryOptions())

    @torch.inference_mode()
    def evaluate(self, query_encoder: Encoder, reference_encoder: Encoder, batch_size: int = 32) -> dict[str, dict[str, float]]:
        """Per family: R@1, R@5, R@10 (a top-k tile centre within the tile half-diagonal) and median metres."""
        reference = reference_encoder.encode([t.image for t in self.tiles], batch_size=batch_size)
        out: dict[str, dict[str, float]] = {}
        for name, family in self.families.items():
            query = query_encoder.encode(family["images"], batch_size=batch_size)
            recall, err = score_family(query, reference, self.lat, self.lon, family)
            out[name] = {"R@1": recall[1], "R@5": recall[5], "R@10": recall[10], "median_error_m": float(np.median(err))}
        out["mean"] = {key: float(np.mean([f[key] for f in out.values()])) for key in ("R@1", "R@5", "R@10", "median_error_m")}
        return out
