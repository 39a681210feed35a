"""VIGOR (Zhu et al. 2021): street panoramas -> satellite tiles, beyond one-to-one retrieval.

Published layout::

    root/{city}/panorama/{pano_id},{lat},{lon},.jpg
    root/{city}/satellite/satellite_{lat}_{lon}.png
    root/splits/{city}/same_area_balanced_train.txt    same-area protocol, training panoramas
    root/splits/{city}/same_area_balanced_test.txt     same-area protocol, test panoramas
    root/splits/{city}/pano_label_balanced.txt         cross-area protocol, all panoramas of a city

A label line is ``pano sat1 dy dx sat2 dy dx sat3 dy dx sat4 dy dx``: ``sat1`` is the positive
(the panorama lies in its central quarter), ``sat2..sat4`` are semi-positives (the panorama lies
in them, off-centre). They are exposed as ``positives[q] = [sat1]`` and
``semi_positives[q] = [sat2, sat3, sat4]`` for the hit-rate metric; the pixel offsets are not
used here.

Protocols: same-area uses all four cities for both splits (label files ``same_area_balanced_*``);
cross-area trains on NewYork + Seattle and tests on SanFrancisco + Chicago (``pano_label_balanced``).
References are every satellite image of the split's cities, listed from the ``satellite``
folders in name order (the gallery includes tiles that are nobody's positive). A query's location
is the index of its positive reference, so two panoramas of one tile share a location.
Positions come from the file names.
"""

from __future__ import annotations

import re
from pathlib import Path

from cvgl.data.datasets.common import (
    CrossViewSplit,
    FolderListing,
    ViewItem,
    require_dir,
    require_file,
)
from cvgl.errors import InputError

CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
CROSS_AREA_CITIES = {"train": ("NewYork", "Seattle"), "test": ("SanFrancisco", "Chicago")}

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SAT_NAME = re.compile(rf"^satellite_{_NUMBER}_{_NUMBER}\.(?:png|jpg|jpeg)$", re.IGNORECASE)
_PANO_NAME = re.compile(rf"^[^,]+,{_NUMBER},{_NUMBER},")


def load_vigor(root: str | Path, split: str = "train", area: str = "same") -> CrossViewSplit:
    """Load VIGOR's ``train`` or ``test`` split under the ``same`` or ``cross`` area protocol."""
    root = Path(root)
    if split not in ("train", "test"):
        raise InputError(f"vigor: unknown split {split!r}; use train or test")
    if area not in ("same", "cross"):
        raise InputError(f"vigor: unknown area {area!r}; use same or cross")
    require_dir(root, "the VIGOR root with {city}/ folders and splits/")
    cities = CITIES if area == "same" else CROSS_AREA_CITIES[split]
    label_name = f"same_area_balanced_{split}.txt" if area == "same" else "pano_label_balanced.txt"

    references: list[ViewItem] = []
    ref_index: dict[tuple[str, str], int] = {}
    for city in cities:
        sat_dir = require_dir(root / city / "satellite", f"VIGOR {city} tiles satellite_<lat>_<lon>.png")
        for path in sorted(sat_dir.iterdir()):
            match = _SAT_NAME.match(path.name)
            if match is None:
                continue
            ref_index[(city, path.name)] = len(references)
            references.append(
                ViewItem(path, float(match.group(1)), float(match.group(2)), len(references))
            )
    if not references:
        raise InputError(f"{root}: no satellite_<lat>_<lon>.png tiles in {', '.join(cities)}")

    listing = FolderListing()
    queries: list[ViewItem] = []
    positives: list[list[int]] = []
    semi_positives: list[list[int]] = []
    for city in cities:
        label_path = require_file(
            root / "splits" / city / label_name, f"VIGOR's {city} label file (pano sat1 dy dx ... sat4 dy dx)"
        )
        pano_dir = require_dir(root / city / "panorama", f"VIGOR {city} panoramas <id>,<lat>,<lon>,.jpg")
        for line_no, fields in _read_labels(label_path):
            where = f"{label_path}, line {line_no}"
            pano = listing.require(pano_dir / fields[0], f"the panorama named on {where}")
            match = _PANO_NAME.match(fields[0])
            if match is None:
                raise InputError(f"{where}: panorama name {fields[0]!r} is not <id>,<lat>,<lon>,.jpg")
            sats = []
            for name in fields[1:13:3]:
                index = ref_index.get((city, name))
                if index is None:
                    raise InputError(f"{where}: {city}/satellite/{name} is not in the satellite folder")
                sats.append(index)
            queries.append(ViewItem(pano, float(match.group(1)), float(match.group(2)), sats[0]))
            positives.append(sats[:1])
            semi_positives.append(sats[1:])
    if not queries:
        raise InputError(f"{root}: the {label_name} files list no panoramas")
    return CrossViewSplit(
        name=f"vigor/{area}-area/{split}",
        query_view="street",
        reference_view="satellite",
        queries=queries,
        references=references,
        positives=positives,
        semi_positives=semi_positives,
    )


def _read_labels(path: Path) -> list[tuple[int, list[str]]]:
    rows: list[tuple[int, list[str]]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 13:
                raise InputError(
                    f"{path}, line {line_no}: {len(fields)} fields; expected "
                    "pano sat1 dy dx sat2 dy dx sat3 dy dx sat4 dy dx"
                )
            rows.append((line_no, fields))
    return rows
