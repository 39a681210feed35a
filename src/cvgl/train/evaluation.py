"""Evaluation during and after training, for any pair of encoders (query view, reference view).

Two protocols:
- ``split``: a dataset's test split (:class:`cvgl.data.datasets.CrossViewSplit`): R@1/5/10,
  R@1%, mAP, VIGOR hit rate when semi-positives exist, and the top-1 geodesic error in metres
  when both views carry coordinates.
- ``longmont``: the ``longmont`` benchmark's drone protocol (east half of the Longmont scene =
  test, WV2 photos against WV3 tiles; same photos, seeds and correctness radius as
  ``cvgl bench longmont``), so trained and zero-shot encoders are compared on identical inputs.

Both take :class:`cvgl.models.encoder.Encoder` objects, so the zero-shot row of an ablation and a
trained row go through the same code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from cvgl.evaluate import hit_rate, summarize
from cvgl.geo import geodesic_distance_m
from cvgl.models.encoder import Encoder


def encode_paths(encoder: Encoder, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Descriptors ``[N, D]`` of image files, read one batch at a time (evaluation and DSS)."""
    from cvgl.data.images import load_image

    return encoder.encode((load_image(p) for p in paths), batch_size=batch_size)


def _coordinates(items) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of view items in degrees, nan where unknown."""
    lat = np.array([np.nan if item.lat is None else item.lat for item in items], dtype=float)
    lon = np.array([np.nan if item.lon is None else item.lon for item in items], dtype=float)
    return lat, lon


@torch.inference_mode()
def evaluate_split(query_encoder: Encoder, reference_encoder: Encoder, split, batch_size: int = 32) -> dict[str, float]:
    """Retrieval metrics of ``split.queries`` against ``split.references``."""
    query = encode_paths(query_encoder, [q.path for q in split.queries], batch_size)
    reference = encode_paths(reference_encoder, [r.path for r in split.references], batch_size)
    scores = query @ reference.T
    positives = np.zeros(scores.shape, dtype=bool)
    for i, pos in enumerate(split.positives):
        positives[i, pos] = True
    errors = None
    q_lat, q_lon = _coordinates(split.queries)
    r_lat, r_lon = _coordinates(split.references)
    if np.isfinite(q_lat).all() and np.isfinite(r_lat).all():
        top = scores.argmax(1)
        errors = geodesic_distance_m(r_lat[top], r_lon[top], q_lat, q_lon)
    metrics = summarize(scores, positives, errors_m=errors)
    if any(split.semi_positives):
        semi = np.zeros(scores.shape, dtype=bool)
        for i, pos in enumerate(split.semi_positives):
            semi[i, pos] = True
        metrics["hit_rate"] = hit_rate(scores, positives, semi)
    return metrics


def longmont_families(names: list[str] | None = None):
    """The ``longmont`` benchmark's query families (all six, or those named)."""
    from cvgl.bench.longmont import families

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
        from cvgl.bench.longmont import SPEC, east_west, prepare_family
        from cvgl.bench.longmont import families as all_families
        from cvgl.data.samples import longmont_scene
        from cvgl.data.synthetic import make_queries
        from cvgl.data.tiling import iter_tiles
        from cvgl.locate import LocateOptions

        self.tiles = list(iter_tiles(longmont_scene("wv3"), SPEC))
        self.lat = np.array([t.lat for t in self.tiles])
        self.lon = np.array([t.lon for t in self.tiles])
        _, mid, right = east_west()
        wanted = {f.name for f in longmont_families(families)}
        self.families: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            # Same seeds as cvgl.bench.longmont.protocol_b: k indexes the full family list.
            for k, family in enumerate(all_families()):
                if family.name in wanted:
                    queries = make_queries(longmont_scene("wv2"), per_family, family, seed=seed * 100 + k, x_range=(mid, right))
                    self.families[family.name] = prepare_family(queries, Path(tmp), LocateOptions())

    @torch.inference_mode()
    def evaluate(self, query_encoder: Encoder, reference_encoder: Encoder, batch_size: int = 32) -> dict[str, dict[str, float]]:
        """Per family: R@1, R@5, R@10 (a top-k tile centre within the tile half-diagonal) and median metres."""
        from cvgl.bench.longmont import score_family

        reference = reference_encoder.encode([t.image for t in self.tiles], batch_size=batch_size)
        out: dict[str, dict[str, float]] = {}
        for name, family in self.families.items():
            query = query_encoder.encode(family["images"], batch_size=batch_size)
            recall, err = score_family(query, reference, self.lat, self.lon, family)
            out[name] = {"R@1": recall[1], "R@5": recall[5], "R@10": recall[10], "median_error_m": float(np.median(err))}
        out["mean"] = {key: float(np.mean([f[key] for f in out.values()])) for key in ("R@1", "R@5", "R@10", "median_error_m")}
        return out
