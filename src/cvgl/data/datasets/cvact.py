"""CVACT (Liu & Li 2019, Canberra): street panorama -> satellite, with UTM positions.

Published layout::

    root/ACT_data.mat                                   MATLAB v5 file
        panoIds     N panorama ids (strings)
        utm         N x 2 UTM coordinates (zone 55 south) of each id
        trainSet    struct with trainInd: 1-based indices into panoIds
        valSet      struct with valInd:   1-based indices into panoIds (the CVACT_val benchmark)
    root/ANU_data_small/streetview/{id}_grdView.jpg
    root/ANU_data_small/satview_polish/{id}_satView_polish.jpg

Each id is one place (query = panorama, only positive = its satellite tile, location = row in
the split, 0-based). UTM is converted to lat/lon with pyproj (EPSG:32755). The column order of
``utm`` is read from the magnitudes (a UTM easting lies in 100-900 km; a southern-hemisphere
northing near Canberra is ~6 100 km), so either order is accepted.

A few published ids have no image on disk; by default that is an error naming the first missing
file, and ``skip_missing=True`` drops those ids instead (Sample4Geo drops them silently).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvgl.data.datasets.common import (
    CrossViewSplit,
    FolderListing,
    ViewItem,
    require_dir,
    require_file,
)
from cvgl.errors import InputError
from cvgl.geo import to_latlon

#: UTM zone 55 south (WGS84), the zone of Canberra.
CVACT_CRS = "EPSG:32755"

_SPLIT_KEYS = {"train": ("trainSet", "trainInd"), "val": ("valSet", "valInd")}


def load_cvact(root: str | Path, split: str = "train", skip_missing: bool = False) -> CrossViewSplit:
    """Load the ``train`` or ``val`` split of CVACT from ``ACT_data.mat`` and ``ANU_data_small``."""
    root = Path(root)
    if split not in _SPLIT_KEYS:
        raise InputError(f"cvact: unknown split {split!r}; use train or val")
    require_dir(root, "the CVACT root with ACT_data.mat and ANU_data_small/")
    mat_path = require_file(root / "ACT_data.mat", "CVACT's ACT_data.mat (panoIds, utm, trainSet, valSet)")
    data_dir = require_dir(root / "ANU_data_small", "CVACT's ANU_data_small/ with streetview/ and satview_polish/")
    require_dir(data_dir / "streetview", "CVACT panoramas {id}_grdView.jpg")
    require_dir(data_dir / "satview_polish", "CVACT satellite tiles {id}_satView_polish.jpg")

    ids, utm, indices = _read_mat(mat_path, split)
    lat, lon = _utm_to_latlon(utm, mat_path)
    listing = FolderListing()
    queries: list[ViewItem] = []
    references: list[ViewItem] = []
    missing: list[Path] = []
    for row in indices:
        pano = data_dir / "streetview" / f"{ids[row]}_grdView.jpg"
        sat = data_dir / "satview_polish" / f"{ids[row]}_satView_polish.jpg"
        absent = [p for p in (pano, sat) if not listing.exists(p)]
        if absent:
            missing.extend(absent)
            continue
        location = len(queries)
        queries.append(ViewItem(pano, float(lat[row]), float(lon[row]), location))
        references.append(ViewItem(sat, float(lat[row]), float(lon[row]), location))
    if missing and not skip_missing:
        raise InputError(
            f"{missing[0]}: image not found ({len(missing)} missing in cvact/{split}); restore the "
            "files or load with skip_missing=True to drop those ids"
        )
    if not queries:
        raise InputError(f"{mat_path}: no {split} id has both images under {data_dir}")
    return CrossViewSplit(
        name=f"cvact/{split}",
        query_view="street",
        reference_view="satellite",
        queries=queries,
        references=references,
        positives=[[i] for i in range(len(queries))],
    )


def _read_mat(mat_path: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(pano ids, utm [N, 2], 0-based row indices of the split) from ACT_data.mat."""
    from scipy.io import loadmat  # imported here: only CVACT needs scipy

    try:
        mat = loadmat(mat_path, simplify_cells=True)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise InputError(f"{mat_path}: not a readable MATLAB v5 file ({exc}); re-download it") from None
    set_key, ind_key = _SPLIT_KEYS[split]
    for key in ("panoIds", "utm", set_key):
        if key not in mat:
            raise InputError(f"{mat_path}: no variable {key!r}; is this CVACT's ACT_data.mat?")
    ids = [str(v).strip() for v in np.ravel(mat["panoIds"])]
    utm = np.asarray(mat["utm"], dtype=np.float64).reshape(-1, 2)
    if len(utm) != len(ids):
        raise InputError(f"{mat_path}: {len(ids)} panoIds but {len(utm)} utm rows")
    split_struct = mat[set_key]
    if not isinstance(split_struct, dict) or ind_key not in split_struct:
        raise InputError(f"{mat_path}: {set_key} has no field {ind_key!r}")
    one_based = np.atleast_1d(np.asarray(split_struct[ind_key])).astype(np.int64).ravel()
    if one_based.size and (one_based.min() < 1 or one_based.max() > len(ids)):
        raise InputError(
            f"{mat_path}: {set_key}.{ind_key} holds indices outside 1..{len(ids)} (they are 1-based)"
        )
    return ids, utm, one_based - 1


def _utm_to_latlon(utm: np.ndarray, mat_path: Path) -> tuple[np.ndarray, np.ndarray]:
    if len(utm) == 0:
        return np.zeros(0), np.zeros(0)
    first, second = np.median(utm[:, 0]), np.median(utm[:, 1])
    if 100_000 <= first <= 900_000 and second > 1_000_000:
        easting, northing = utm[:, 0], utm[:, 1]
    elif 100_000 <= second <= 900_000 and first > 1_000_000:
        easting, northing = utm[:, 1], utm[:, 0]
    else:
        raise InputError(
            f"{mat_path}: utm values ({first:.0f}, {second:.0f}) do not look like UTM zone 55S "
            "easting/northing in metres"
        )
    lat, lon = to_latlon(CVACT_CRS, easting, northing)
    return np.asarray(lat), np.asarray(lon)
