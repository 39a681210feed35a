"""A folder of tile images geo-tagged by a CSV (``id,lat,lon``): the other kind of reference."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import NamedTuple

from cvgl.data.raster import PathLike, one_line
from cvgl.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "TileRecord", "read_tile_folder"]

#: File extensions recognised when a CSV id is given without one.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")


class TileRecord(NamedTuple):
    """One row of a tile-folder CSV, resolved to an existing image file."""

    tile_id: str
    image_path: Path
    lat: float
    lon: float


def read_tile_folder(folder: PathLike, csv_path: PathLike | None = None) -> list[TileRecord]:
    """Read a folder of image tiles and the CSV that geo-tags them (header ``id,lat,lon``).

    ``id`` is the tile's file name with or without extension (relative paths inside the folder
    work too); ``lat``/``lon`` are the tile centre in degrees (EPSG:4326). Extra columns are
    ignored, column order is free, header case is ignored. The default CSV is
    ``<folder>/tiles.csv``. Any bad row raises a one-line :class:`InputError` with its line number.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of image tiles with a tiles.csv")
    csv_file = Path(csv_path) if csv_path is not None else root / "tiles.csv"
    if not csv_file.is_file():
        raise InputError(
            f"{csv_file}: CSV not found; write one with header id,lat,lon (id = tile file name)"
        )
    by_name, by_stem = _folder_index(root)
    records: list[TileRecord] = []
    seen: dict[str, int] = {}
    used_files: dict[Path, int] = {}
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{csv_file}: empty CSV; the first line must be the header id,lat,lon")
            cols = [h.strip().lower() for h in header]
            missing = [c for c in ("id", "lat", "lon") if c not in cols]
            if missing:
                raise InputError(
                    f"{csv_file}: missing column(s) {', '.join(missing)}; the header must contain "
                    f"id,lat,lon (found: {','.join(h.strip() for h in header)})"
                )
            i_id, i_lat, i_lon = cols.index("id"), cols.index("lat"), cols.index("lon")
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                where = f"{csv_file}, line {line}"
                if len(row) <= max(i_id, i_lat, i_lon):
                    raise InputError(f"{where}: {len(row)} field(s), expected at least {len(cols)}")
                tile_id = row[i_id].strip()
                if not tile_id:
                    raise InputError(f"{where}: empty id; give the tile's file name")
                lat = _parse_coord(row[i_lat], "lat", 90.0, where)
                lon = _parse_coord(row[i_lon], "lon", 180.0, where)
                if tile_id in seen:
                    raise InputError(f"{where}: id '{tile_id}' already used on line {seen[tile_id]}")
                seen[tile_id] = line
                image = _resolve_tile_file(root, tile_id, by_name, by_stem, where)
                if image in used_files:
                    raise InputError(
                        f"{where}: id '{tile_id}' names {image.name}, already listed on line "
                        f"{used_files[image]}"
                    )
                used_files[image] = line
                records.append(TileRecord(tile_id, image, lat, lon))
    except UnicodeDecodeError:
        raise InputError(f"{csv_file}: not a UTF-8 text CSV; save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise InputError(f"{csv_file}: malformed CSV ({one_line(exc)})") from None
    if not records:
        raise InputError(f"{csv_file}: no tiles listed; add rows of id,lat,lon")
    return records


def _parse_coord(text: str, what: str, limit: float, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise InputError(f"{where}: {what} '{text.strip()}' is not a number") from None
    if not math.isfinite(value) or not (-limit <= value <= limit):
        raise InputError(
            f"{where}: {what} {text.strip()} is out of range [-{limit:g}, {limit:g}] "
            "(are lat and lon swapped, or not in degrees?)"
        )
    return value


def _folder_index(root: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    by_name: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_file():
            continue
        by_name[entry.name] = entry
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(entry.stem, []).append(entry)
    return by_name, by_stem


def _resolve_tile_file(
    root: Path, tile_id: str, by_name: dict[str, Path], by_stem: dict[str, list[Path]], where: str
) -> Path:
    if tile_id in by_name:
        return by_name[tile_id]
    candidates = by_stem.get(tile_id, [])
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise InputError(f"{where}: id '{tile_id}' matches several files ({names}); use the full file name")
    nested = root / tile_id
    if os.sep in tile_id or "/" in tile_id:
        if nested.is_file():
            return nested
        for ext in IMAGE_EXTENSIONS:
            if nested.with_name(nested.name + ext).is_file():
                return nested.with_name(nested.name + ext)
    raise InputError(
        f"{where}: no file for id '{tile_id}' in {root}; ids are tile file names with or "
        "without extension"
    )
