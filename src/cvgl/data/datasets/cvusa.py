"""CVUSA (Zhai et al. subset, as used by CVM-Net, SAFA, Sample4Geo): street panorama -> satellite.

Published layout::

    root/splits/train-19zl.csv    rows: bingmap/19/0000001.jpg,streetview/panos/0000001.jpg,<annotation>
    root/splits/val-19zl.csv      the evaluation split (also called "test" in papers)
    root/bingmap/19/*.jpg         north-up satellite tiles
    root/streetview/panos/*.jpg   panoramas, north at the centre column

Every row is one place: the panorama is the query, its satellite tile the only positive, and
the row number (0-based) the location id. The split CSVs carry no GPS, so lat/lon are ``None``
unless ``latlon_csv`` is given: a CSV with header ``id,lat,lon`` whose ``id`` is the file stem
shared by a row's panorama and tile (``0000001``); rows it does not list keep ``None``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cvgl.data.datasets.common import (
    CrossViewSplit,
    FolderListing,
    ViewItem,
    require_dir,
    require_file,
)
from cvgl.errors import InputError

SPLIT_FILES = {"train": "train-19zl.csv", "val": "val-19zl.csv", "test": "val-19zl.csv"}


def load_cvusa(root: str | Path, split: str = "train", latlon_csv: str | Path | None = None) -> CrossViewSplit:
    """Load the ``train`` or ``val`` (= ``test``) split of CVUSA from its published layout."""
    root = Path(root)
    if split not in SPLIT_FILES:
        raise InputError(f"cvusa: unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}")
    require_dir(root, "the CVUSA root with splits/, bingmap/ and streetview/")
    csv_path = require_file(
        root / "splits" / SPLIT_FILES[split], "CVUSA's split CSV (bingmap/19/x.jpg,streetview/panos/x.jpg,...)"
    )
    positions = _read_latlon(Path(latlon_csv)) if latlon_csv is not None else {}
    listing = FolderListing()
    queries: list[ViewItem] = []
    references: list[ViewItem] = []
    for line, sat_rel, pano_rel in _read_rows(csv_path):
        location = len(queries)
        sat = listing.require(root / sat_rel, f"the satellite tile named on {csv_path}, line {line}")
        pano = listing.require(root / pano_rel, f"the panorama named on {csv_path}, line {line}")
        lat, lon = positions.get(pano.stem, (None, None))
        queries.append(ViewItem(pano, lat, lon, location))
        references.append(ViewItem(sat, lat, lon, location))
    if not queries:
        raise InputError(f"{csv_path}: no rows; expected bingmap/...,streetview/... pairs")
    return CrossViewSplit(
        name=f"cvusa/{split}",
        query_view="street",
        reference_view="satellite",
        queries=queries,
        references=references,
        positives=[[i] for i in range(len(queries))],
    )


def _read_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < 2:
                raise InputError(
                    f"{csv_path}, line {reader.line_num}: expected satellite,panorama[,annotation]"
                )
            rows.append((reader.line_num, row[0].strip(), row[1].strip()))
    return rows


def _read_latlon(path: Path) -> dict[str, tuple[float, float]]:
    """The optional side table ``id,lat,lon`` (id = the file stem of a row's images)."""
    require_file(path, "a CSV with header id,lat,lon")
    out: dict[str, tuple[float, float]] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if not {"id", "lat", "lon"} <= set(fields):
            raise InputError(f"{path}: header must contain id,lat,lon (found {','.join(fields)})")
        reader.fieldnames = fields
        for row in reader:
            try:
                lat, lon = float(row["lat"]), float(row["lon"])
            except (TypeError, ValueError):
                raise InputError(f"{path}, line {reader.line_num}: lat/lon are not numbers") from None
            if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
                raise InputError(f"{path}, line {reader.line_num}: lat/lon out of range (degrees?)")
            out[row["id"].strip()] = (lat, lon)
    return out
