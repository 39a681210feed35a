"""Training pairs cut from two co-registered orthophotos of one area (no dataset download needed).

A pair is a simulated drone photo taken from the *query* orthophoto (another sensor or date;
oblique or nadir, random yaw, scale jitter, via :mod:`cvgl.data.synthetic`) and the north-up
tile of ``tile_m`` metres read from the *reference* orthophoto around the photo's true ground
centre (:func:`cvgl.data.raster.read_region`, with the raster-wide stretch an index uses). The
tile is centred on the photo rather than taken from the index grid, so the positive is exact;
the grid's offsets are what the trained model must tolerate at locate time anyway.

``x_range`` is a strip of the two rasters' common extent, as fractions of its width from the
west edge: ``(0, 0.5)`` for training and ``(0.5, 1)`` for testing keeps the photo centres of the
two sets on opposite sides of the split line (a steep photo's far field may still look across
it, as in the benchmark's drone protocol).

Output folder (written into a temporary sibling, then renamed, so it is complete or absent)::

    out_dir/pairs.csv        query,reference,lat,lon,yaw_deg,pitch_deg,altitude_m  (load_pairs_csv)
    out_dir/query/*.jpg      photos with EXIF GPS + DJI XMP, as a real drone writes them
    out_dir/reference/*.png  north-up reference tiles
    out_dir/manifest.json    the parameters; a rerun with the same ones reuses the folder
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from cvgl.data.raster import raster_info, read_region
from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
from cvgl.errors import InputError
from cvgl.geo import from_latlon, to_latlon
from cvgl.io import write_json_atomic, write_text_atomic

#: Nadir and oblique photos with the heading known and +-25 % scale: the drone query families.
DEFAULT_FAMILY = QueryFamily(
    "ortho-pairs", pitches=(0.0, 30.0, 45.0), heading_known=True, scale_jitter=(0.8, 1.25)
)
PAIRS_CSV = "pairs.csv"
_MAX_ROUNDS = 20
_FORMAT = 1


def cut_ortho_pairs(
    query_raster: str | Path,
    reference_raster: str | Path,
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    x_range: tuple[float, float] = (0.0, 1.0),
    family: QueryFamily = DEFAULT_FAMILY,
    tile_m: float = 112.0,
    gsd_m: float = 0.5,
    photo_size: tuple[int, int] = (224, 224),
) -> Path:
    """Cut ``count`` pairs into ``out_dir`` and return the path of its ``pairs.csv``.

    Deterministic for a given seed. If ``out_dir`` already holds pairs cut with the same
    parameters it is reused; holding anything else is an error (delete it or pick another).
    """
    out_dir = Path(out_dir)
    lo_frac, hi_frac = float(x_range[0]), float(x_range[1])
    if not 0.0 <= lo_frac < hi_frac <= 1.0:
        raise InputError(f"ortho pairs: x_range {x_range} must satisfy 0 <= start < end <= 1")
    if int(count) < 1:
        raise InputError(f"ortho pairs: count must be at least 1 (got {count})")
    q_info, r_info = raster_info(query_raster), raster_info(reference_raster)
    manifest = {
        "format": _FORMAT,
        "query_raster": _file_key(Path(query_raster)),
        "reference_raster": _file_key(Path(reference_raster)),
        "count": int(count),
        "seed": int(seed),
        "x_range": [lo_frac, hi_frac],
        "family": asdict(family),
        "tile_m": float(tile_m),
        "gsd_m": float(gsd_m),
        "photo_size": [int(photo_size[0]), int(photo_size[1])],
    }
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back from disk
    if out_dir.exists():
        return _reuse(out_dir, manifest)

    west, east = _common_x_extent(q_info, r_info)
    strip = (west + lo_frac * (east - west), west + hi_frac * (east - west))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        rows = _cut(Path(query_raster), Path(reference_raster), q_info, r_info, tmp, int(count),
                    int(seed), strip, family, float(tile_m), float(gsd_m), photo_size)
        write_text_atomic(tmp / PAIRS_CSV, _csv_text(rows))
        write_json_atomic(tmp / "manifest.json", manifest)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs should read like any other folder
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if out_dir.exists():  # another process finished the same job first
                shutil.rmtree(tmp, ignore_errors=True)
                return _reuse(out_dir, manifest)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / PAIRS_CSV


def _cut(
    query_raster: Path,
    reference_raster: Path,
    q_info,
    r_info,
    folder: Path,
    count: int,
    seed: int,
    strip: tuple[float, float],
    family: QueryFamily,
    tile_m: float,
    gsd_m: float,
    photo_size: tuple[int, int],
) -> list[dict]:
    """Photos whose centre is in the strip and whose reference tile fits inside the reference."""
    (folder / "query").mkdir()
    (folder / "reference").mkdir()
    rows: list[dict] = []
    half = tile_m / 2.0
    r_left, r_bottom, r_right, r_top = r_info.bounds
    for attempt in range(_MAX_ROUNDS):
        if len(rows) == count:
            break
        round_seed = int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        for query in make_queries(query_raster, count - len(rows), family, round_seed,
                                  photo_size=tuple(photo_size), x_range=strip):
            qx, _ = from_latlon(q_info.crs, query.center_lat, query.center_lon)
            rx, ry = from_latlon(r_info.crs, query.center_lat, query.center_lon)
            inside_strip = strip[0] <= qx <= strip[1]
            tile_fits = r_left + half <= rx <= r_right - half and r_bottom + half <= ry <= r_top - half
            if not (inside_strip and tile_fits):
                continue
            stem = f"{len(rows):05d}"
            query.name = stem
            photo = write_query_photo(query, folder / "query")
            tile = read_region(reference_raster, rx, ry, size_m=tile_m, gsd_m=gsd_m)
            buffer = io.BytesIO()
            Image.fromarray(tile).save(buffer, format="PNG")
            (folder / "reference" / f"{stem}.png").write_bytes(buffer.getvalue())
            rows.append({
                "query": f"query/{photo.name}",
                "reference": f"reference/{stem}.png",
                "lat": f"{query.center_lat:.8f}",
                "lon": f"{query.center_lon:.8f}",
                "yaw_deg": f"{query.yaw_deg:.3f}",
                "pitch_deg": f"{query.pitch_deg:.3f}",
                "altitude_m": f"{query.altitude_m:.3f}",
            })
    if len(rows) < count:
        raise InputError(
            f"{query_raster}: only {len(rows)} of {count} photos of family {family.name!r} fit in the "
            f"x strip {strip[0]:.1f}..{strip[1]:.1f} with a {tile_m:g} m reference tile; widen "
            "x_range or use a smaller footprint"
        )
    return rows


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _common_x_extent(q_info, r_info) -> tuple[float, float]:
    """West and east edges, in the query raster's CRS, of the area both rasters cover."""
    left, bottom, right, top = r_info.bounds
    corners_x = np.array([left, right, left, right])
    corners_y = np.array([bottom, bottom, top, top])
    lat, lon = to_latlon(r_info.crs, corners_x, corners_y)
    qx, _ = from_latlon(q_info.crs, lat, lon)
    west = max(q_info.bounds[0], float(np.min(qx)))
    east = min(q_info.bounds[2], float(np.max(qx)))
    if not east > west:
        raise InputError(f"{q_info.path}: does not overlap {r_info.path}; give two rasters of one area")
    return west, east


def _file_key(path: Path) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size}


def _reuse(out_dir: Path, manifest: dict) -> Path:
    manifest_path = out_dir / "manifest.json"
    try:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = None
    if existing != manifest or not (out_dir / PAIRS_CSV).is_file():
        raise InputError(
            f"{out_dir}: exists and was not cut with these parameters; delete it or choose another folder"
        )
    return out_dir / PAIRS_CSV
