"""Retrieval protocols on benchmark splits (CVUSA, CVACT, VIGOR, University-1652, pair CSVs).

``evaluate_split``: R@1/5/10, R@1%, mAP, VIGOR's hit rate when semi-positives exist, and the
top-1 geodesic error in metres when both views carry coordinates. It takes
:class:`~cvgl.models.encoder.Encoder` objects, so a zero-shot row and a trained row of an
ablation go through the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cvgl.data.images import load_image
from cvgl.evaluate.metrics import hit_rate, summarize
from cvgl.geo import geodesic_distance_m
from cvgl.models.encoder import Encoder


def top_k_per_query(query: np.ndarray, reference: np.ndarray, owner: np.ndarray, n_queries: int, k: int = 10) -> np.ndarray:
    """Top-k reference rows per query, where a query's score for a row is its best hypothesis.

    ``owner[i]`` is the query that hypothesis ``i`` belongs to. Ties keep reference order.
    """
    scores = query @ reference.T
    per_query = np.full((n_queries, len(reference)), -np.inf, dtype=np.float32)
    np.maximum.at(per_query, owner, scores)
    return np.argsort(-per_query, axis=1, kind="stable")[:, :k]


def encode_paths(encoder: Encoder, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Descriptors ``[N, D]`` of image files, read one batch at a time (evaluation and DSS)."""
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
