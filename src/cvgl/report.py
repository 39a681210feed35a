"""What people look at after ``locate``: the HTML map and the PNG retrieval grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvgl.data.raster import read_region
from cvgl.errors import CvglError
from cvgl.geo import geodesic_distance_m
from cvgl.index.store import ReferenceIndex
from cvgl.viz import write_map_html, write_retrieval_grid


def tile_image(index: ReferenceIndex, row: int, source_raster: Path | None) -> np.ndarray:
    """Re-read a tile's pixels from its source raster (indexes keep vectors, not pixels)."""
    tile = index.tiles.iloc[row]
    if source_raster is None or not source_raster.is_file() or index.manifest.get("tile_m") is None:
        return np.zeros((64, 64, 3), dtype=np.uint8)
    tiling = index.manifest.get("tiling") or {}
    bands = tiling.get("bands")
    return read_region(source_raster, float(tile["x"]), float(tile["y"]), index.manifest["tile_m"],
                       tiling.get("gsd_m"), tuple(bands) if bands else None)


def write_visuals(
    out: Path,
    results: list[dict],
    scores: list[np.ndarray | None],
    index: ReferenceIndex,
    query_images: list[np.ndarray] | None = None,
    source_raster: Path | None = None,
    map_name: str = "map.html",
    grid_name: str = "grid.png",
) -> tuple[Path, Path]:
    """Write the map (prediction, top-k tiles, heatmap) and the retrieval grid."""
    out = Path(out)
    overview = index.overview()
    map_path = write_map_html(
        out / map_name, results, index.tiles, scores,
        overview=overview[0] if overview else None,
        overview_bounds=overview[1] if overview else None,
        tile_m=index.manifest.get("tile_m"),
    )
    if source_raster is None and (index.manifest.get("source") or {}).get("path"):
        source_raster = Path(index.manifest["source"]["path"])
    rows = []
    row_of = {tid: i for i, tid in enumerate(index.tiles["tile_id"])}
    for i, result in enumerate(results):
        if "error" in result or query_images is None:
            continue
        top = result["top_k"][:5]
        truth = (result.get("true_center_lat", result.get("true_lat")), result.get("true_center_lon", result.get("true_lon")))
        correct = [None] * len(top)
        if truth[0] is not None:
            radius = (index.manifest.get("tile_m") or 100.0) / np.sqrt(2)
            correct = [bool(geodesic_distance_m(t["lat"], t["lon"], truth[0], truth[1]) <= radius) for t in top]
        try:
            tiles = [tile_image(index, row_of[t["tile_id"]], source_raster) for t in top]
        except CvglError:
            tiles = [np.zeros((64, 64, 3), dtype=np.uint8) for _ in top]
        rows.append({"query_image": query_images[i], "query_name": Path(result["query"]).name,
                     "tiles": tiles, "scores": [t["score"] for t in top], "correct": correct})
    grid_path = write_retrieval_grid(out / grid_name, rows)
    return map_path, grid_path

