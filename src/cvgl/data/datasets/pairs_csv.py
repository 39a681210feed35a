"""Bring your own pairs: a CSV of ``query,reference[,lat,lon]`` rows.

This is the documented way to train or evaluate on your own data::

    query,reference,lat,lon
    drone/0001.jpg,tiles/0001.png,40.1672,-105.1019
    drone/0002.jpg,tiles/0002.png,40.1675,-105.0990

Paths are relative to the CSV's folder (absolute paths work too). ``lat``/``lon`` are optional
columns in degrees; an empty cell means unknown. Extra columns are ignored, header case too.
Each row is one query; a reference file named on several rows is one reference (and one
location) shared by those queries, so they never sit in one batch as each other's negatives.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cvgl.data.datasets.common import (
    CrossViewSplit,
    FolderListing,
    ViewItem,
    require_file,
)
from cvgl.data.views import canonical_view
from cvgl.errors import InputError


def load_pairs_csv(
    csv_path: str | Path,
    query_view: str = "drone",
    reference_view: str = "satellite",
    name: str | None = None,
) -> CrossViewSplit:
    """Load the pairs listed in ``csv_path`` (see the module docstring for the format)."""
    csv_path = Path(csv_path)
    for role, view in (("query_view", query_view), ("reference_view", reference_view)):
        try:
            canonical_view(view, f"pairs csv: {role}")
        except ValueError as exc:
            raise InputError(str(exc)) from None
    require_file(csv_path, "a CSV with header query,reference[,lat,lon]")
    folder = csv_path.parent
    listing = FolderListing()
    queries: list[ViewItem] = []
    references: list[ViewItem] = []
    ref_index: dict[Path, int] = {}
    positives: list[list[int]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in ("query", "reference") if c not in header]
            if missing:
                raise InputError(f"{csv_path}: header lacks {', '.join(missing)}; expected query,reference[,lat,lon]")
            if ("lat" in header) != ("lon" in header):
                raise InputError(f"{csv_path}: give both lat and lon columns, or neither")
            i_q, i_r = header.index("query"), header.index("reference")
            i_lat = header.index("lat") if "lat" in header else None
            i_lon = header.index("lon") if "lon" in header else None
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                where = f"{csv_path}, line {reader.line_num}"
                if len(row) < len(header):
                    raise InputError(f"{where}: {len(row)} fields, expected {len(header)}")
                query = listing.require(folder / row[i_q].strip(), f"the query image named on {where}")
                reference = listing.require(folder / row[i_r].strip(), f"the reference image named on {where}")
                lat, lon = _position(row, i_lat, i_lon, where)
                if reference not in ref_index:
                    ref_index[reference] = len(references)
                    references.append(ViewItem(reference, lat, lon, len(references)))
                r = ref_index[reference]
                queries.append(ViewItem(query, lat, lon, r))
                positives.append([r])
    except UnicodeDecodeError:
        raise InputError(f"{csv_path}: not UTF-8 text; save it as a UTF-8 CSV") from None
    except csv.Error as exc:
        raise InputError(f"{csv_path}: malformed CSV ({exc})") from None
    if not queries:
        raise InputError(f"{csv_path}: no rows; add query,reference pairs")
    return CrossViewSplit(
        name=name or f"pairs/{csv_path.stem}",
        query_view=query_view,
        reference_view=reference_view,
        queries=queries,
        references=references,
        positives=positives,
    )


def _position(row: list[str], i_lat: int | None, i_lon: int | None, where: str) -> tuple[float | None, float | None]:
    if i_lat is None or i_lon is None:
        return None, None
    lat_text, lon_text = row[i_lat].strip(), row[i_lon].strip()
    if not lat_text and not lon_text:
        return None, None
    try:
        lat, lon = float(lat_text), float(lon_text)
    except ValueError:
        raise InputError(f"{where}: lat/lon {lat_text!r}, {lon_text!r} are not numbers") from None
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
        raise InputError(f"{where}: lat/lon {lat_text}, {lon_text} out of range (degrees, lat first?)")
    return lat, lon
