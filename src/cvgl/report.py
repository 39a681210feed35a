"""What people look at after ``locate``: the HTML map and the PNG retrieval grid."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cvgl.errors import CvglError
from cvgl.geo import geodesic_distance_m
from cvgl.index.store import ReferenceIndex
from cvgl.viz import write_map_html, write_retrieval_grid


def tile_image(index: ReferenceIndex, row: int) -> np.ndarray:
    """A tile's pixels for a picture; a grey placeholder (and one warning) when its source is gone."""
    try:
        return index.tile_image(row)
    except CvglError as exc:
        _warn_once(str(exc))
        return np.full((64, 64, 3), 96, dtype=np.uint8)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def write_visuals(
    results: list[dict],
    scores: list[np.ndarray | None],
    index: ReferenceIndex,
    query_images: list[np.ndarray | None] | None = None,
    map_path: Path | None = None,
    grid_path: Path | None = None,
) -> None:
    """Write the map (prediction, top-k tiles, heatmap) and/or the retrieval grid, where asked."""
    if map_path is not None:
        overview = index.overview()
        write_map_html(
            map_path, results, index.tiles, scores,
            overview=overview[0] if overview else None,
            overview_bounds=overview[1] if overview else None,
            tile_m=index.manifest.tile_m,
        )
    if grid_path is None:
        return
    rows = []
    row_of = {tid: i for i, tid in enumerate(index.tiles["tile_id"])}
    radius = index.manifest.correct_radius_m
    for i, result in enumerate(results):
        if "error" in result or query_images is None or query_images[i] is None:
            continue
        top = result["top_k"][:5]
        # The tiles should show the photo-centre ground point; the camera's own GPS is only that
        # point for a nadir photo.
        truth = (result.get("true_center_lat", result.get("true_lat")), result.get("true_center_lon", result.get("true_lon")))
        correct = [None] * len(top)
        if truth[0] is not None and (result.get("pitch_deg", 0.0) <= 1.0 or "true_center_lat" in result):
            correct = [bool(geodesic_distance_m(t["lat"], t["lon"], truth[0], truth[1]) <= radius) for t in top]
        tiles = [tile_image(index, row_of[t["tile_id"]]) for t in top]
        rows.append({"query_image": query_images[i], "query_name": Path(result["query"]).name,
                     "tiles": tiles, "scores": [t["score"] for t in top], "correct": correct})
    write_retrieval_grid(grid_path, rows)
