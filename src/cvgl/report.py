"""What people look at after ``locate``: the offline HTML map and the PNG retrieval grid."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvgl.errors import CvglError
from cvgl.geo import geodesic_distance_m
from cvgl.index.store import ReferenceIndex
from cvgl.viz import write_map_html, write_retrieval_grid
from cvgl.viz.basemap import embedded_mosaic, overview_basemap
from cvgl.viz.layers import is_drawn

GRID_TILES = 5  # top-k tiles per row of the retrieval grid


def tile_image(index: ReferenceIndex, row: int) -> np.ndarray:
    """A tile's pixels for the grid; a grey placeholder (and one warning) when its source is gone."""
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


def _rows_of(index: ReferenceIndex, answers: Sequence[dict]) -> list[int]:
    """Index rows of the answers' top-k tiles (shown first when a mosaic cannot show every tile)."""
    row_of = {tid: i for i, tid in enumerate(index.tiles["tile_id"].astype(str))}
    return [row_of[t["tile_id"]] for a in answers for t in a.get("top_k") or [] if t.get("tile_id") in row_of]


def index_basemap(index: ReferenceIndex, answers: Sequence[dict]) -> dict:
    """The index's orthophoto overview; for a tile folder (no overview) its tiles at their coordinates."""
    overview = index.overview()
    if overview is not None:
        return overview_basemap(*overview)

    def read_tile(row: int) -> np.ndarray:
        try:
            return index.tile_image(row)
        except CvglError as exc:
            _warn_once(str(exc))
            raise

    return embedded_mosaic(index.tiles, read_tile, index.manifest.tile_side_m, prefer=_rows_of(index, answers))


def write_visuals(
    results: list[dict],
    scores: list[np.ndarray | None],
    index: ReferenceIndex,
    query_images: list[np.ndarray | None] | None = None,
    map_path: Path | None = None,
    grid_path: Path | None = None,
    tracks: Sequence[dict] | None = None,
) -> None:
    """Write the map and/or the retrieval grid of ``results`` (``cvgl.answer/1`` dicts), where asked."""
    if map_path is not None:
        manifest = index.manifest
        write_map_html(
            map_path, results, tile_m=manifest.tile_side_m, tile_m_estimated=manifest.tile_m_estimated,
            basemap=index_basemap(index, results), scores=scores, tiles=index.tiles,
            tile_spacing_m=manifest.tiling.stride_m if manifest.tiling else None, tracks=tracks,
            title=f"cvgl: {len(results)} photos on {index.path.name}",
        )
    if grid_path is not None:
        write_retrieval_grid(grid_path, grid_rows(results, index, query_images))


def _centre_truth(answer: dict) -> tuple[float, float] | None:
    """The ground point the photo centre shows, which the tiles should show: the recorded centre,
    else the GPS for a nadir photo (for an oblique one the GPS is the camera, not the centre)."""
    truth = answer.get("truth") or {}
    if truth.get("center_lat") is not None and truth.get("center_lon") is not None:
        return float(truth["center_lat"]), float(truth["center_lon"])
    if truth.get("lat") is not None and (answer.get("pitch_deg") or 0.0) <= 1.0:
        return float(truth["lat"]), float(truth["lon"])
    return None


def grid_rows(results: list[dict], index: ReferenceIndex, query_images: list[np.ndarray | None] | None) -> list[dict]:
    """One retrieval-grid row per drawn answer with its photo: the top tiles, scores and correctness."""
    rows = []
    row_of = {tid: i for i, tid in enumerate(index.tiles["tile_id"].astype(str))}
    radius = index.manifest.correct_radius_m
    for i, result in enumerate(results):
        if not is_drawn(result) or query_images is None or query_images[i] is None:
            continue
        top = result["top_k"][:GRID_TILES]
        centre = _centre_truth(result)
        correct = [None] * len(top) if centre is None else [
            bool(geodesic_distance_m(t["lat"], t["lon"], centre[0], centre[1]) <= radius) for t in top
        ]
        rows.append({"query_image": query_images[i], "query_name": Path(result["query"]).name,
                     "tiles": [tile_image(index, row_of[t["tile_id"]]) for t in top],
                     "scores": [t["score"] for t in top], "correct": correct})
    return rows
