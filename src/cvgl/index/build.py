"""``cvgl index``: reference source (GeoTIFF or tile folder + CSV) -> encoded, aligned index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cvgl.data.images import load_image
from cvgl.data.raster import TilingSpec, count_tiles, iter_tiles, raster_overview, read_tile_folder
from cvgl.errors import InputError
from cvgl.geo import typical_spacing_m
from cvgl.index.store import check_output_folder, write_index
from cvgl.models.encoder import Encoder
from cvgl.zeroshot.alignment import DEFAULT_KIND, fit_alignment


def _raster_rows(path: Path, spec: TilingSpec, rows: list[dict]) -> Iterator[np.ndarray]:
    """Yield tile images while recording their metadata rows (one pass over the raster)."""
    for tile in iter_tiles(path, spec):
        col_off, row_off, width, height = tile.window
        rows.append(
            dict(
                tile_id=tile.tile_id,
                lat=tile.lat,
                lon=tile.lon,
                x=tile.x,
                y=tile.y,
                crs=tile.crs,
                source=str(path.name),
                col_off=col_off,
                row_off=row_off,
                width=width,
                height=height,
                gsd_m=tile.gsd_m,
            )
        )
        yield tile.image


def encode_source(
    source: Path, encoder: Encoder, spec: TilingSpec, csv: Path | None = None, batch_size: int = 16, progress: bool = True
) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Encode every tile of ``source``; returns (raw descriptors, tile table, manifest extras)."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder; give a GeoTIFF or a folder of tiles with tiles.csv")
    rows: list[dict] = []
    if source.is_dir():
        records = read_tile_folder(source, csv)
        images = (load_image(r.image_path) for r in records)
        total = len(records)
        rows = [dict(tile_id=r.tile_id, lat=r.lat, lon=r.lon, source=str(r.image_path.name)) for r in records]
        extra = {"source": {"kind": "tile-folder", "name": source.name, "path": str(source.resolve()), "count": total}}
    else:
        total = count_tiles(source, spec)
        images = _raster_rows(source, spec, rows)
        extra = {
            # The absolute path lets maps and grids re-read tile pixels later; not needed to search.
            "source": {"kind": "geotiff", "name": source.name, "path": str(source.resolve())},
            "tiling": {"tile_m": spec.tile_m, "stride_m": spec.stride_m, "gsd_m": spec.gsd_m, "bands": spec.bands},
        }
    bar = tqdm(images, total=total, desc="encoding tiles", unit="tile", disable=not progress)
    raw = encoder.encode(bar, batch_size=batch_size)
    if len(raw) == 0:
        raise InputError(f"{source}: no usable tiles (all empty or nodata); check the raster, bands and tiling")
    return raw, pd.DataFrame(rows), extra


def build_index(
    source: Path,
    out: Path,
    encoder: Encoder,
    spec: TilingSpec = TilingSpec(),
    alignment: str = DEFAULT_KIND,
    csv: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Encode ``source`` and write an index folder at ``out`` (atomically).

    Only reference-side alignments can be fitted here (no queries exist yet); query-view
    statistics are fitted at locate time on the batch of photos (``LocateOptions.batch_alignment``).
    """
    check_output_folder(Path(out))  # fail before minutes of encoding, not after
    raw, tiles, extra = encode_source(source, encoder, spec, csv, batch_size, progress)
    fitted = fit_alignment(alignment, raw)
    overview = None
    if Path(source).is_dir():
        # A tile folder does not say how big its tiles are: take the spacing of their centres.
        extra["tile_m"] = typical_spacing_m(tiles["lat"].to_numpy(), tiles["lon"].to_numpy()) if len(tiles) > 1 else None
        extra["tile_m_estimated"] = True
    else:
        overview = raster_overview(source, max_side=1024, bands=spec.bands, stretch=spec.stretch)
        extra["tile_m"] = spec.tile_m
    return write_index(out, raw, tiles, encoder.identity, fitted, extra=extra, overview=overview)
