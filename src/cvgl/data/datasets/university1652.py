"""University-1652 (Zheng et al. 2020): drone <-> satellite (and street -> satellite) by building.

Published layout::

    root/train/{drone,street,satellite,google}/{building_id}/*.jpg|jpeg|png
    root/test/query_drone/{building_id}/...      root/test/gallery_satellite/{building_id}/...
    root/test/query_satellite/{building_id}/...  root/test/gallery_drone/{building_id}/...
    root/test/query_street/{building_id}/...     root/test/gallery_street/{building_id}/...

The building id (the folder name, an integer; 0 is a valid id) is the location. A query's
positives are every reference image of its building, in folder order; the first is the one it
is paired with for training. The test galleries contain distractor buildings that no query
shows. The dataset publishes no positions: lat/lon are ``None``.

Directions: ``drone -> satellite`` (the standard training direction, one pair per drone image),
``satellite -> drone`` and ``street -> satellite``. In the train split the folders are named by
view; in the test split by role (``query_<view>``, ``gallery_<view>``).
"""

from __future__ import annotations

from pathlib import Path

from cvgl.data.datasets.common import CrossViewSplit, ViewItem, list_images, require_dir
from cvgl.errors import InputError

DIRECTIONS = (("drone", "satellite"), ("satellite", "drone"), ("street", "satellite"))


def load_university1652(
    root: str | Path,
    split: str = "train",
    query_view: str = "drone",
    reference_view: str = "satellite",
) -> CrossViewSplit:
    """Load University-1652's ``train`` or ``test`` split for one direction (see :data:`DIRECTIONS`)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise InputError(f"university1652: unknown split {split!r}; use train or test")
    if (query_view, reference_view) not in DIRECTIONS:
        options = ", ".join(f"{q}->{r}" for q, r in DIRECTIONS)
        raise InputError(f"university1652: unsupported direction {query_view}->{reference_view}; use {options}")
    split_dir = require_dir(root / split, f"University-1652's {split}/ folder")
    if split == "train":
        query_dir, reference_dir = split_dir / query_view, split_dir / reference_view
    else:
        query_dir, reference_dir = split_dir / f"query_{query_view}", split_dir / f"gallery_{reference_view}"
    queries = _read_view(query_dir, f"{query_view} images in <building_id>/ folders")
    references = _read_view(reference_dir, f"{reference_view} images in <building_id>/ folders")

    by_building: dict[int, list[int]] = {}
    for index, item in enumerate(references):
        by_building.setdefault(item.location, []).append(index)
    positives: list[list[int]] = []
    for item in queries:
        found = by_building.get(item.location)
        if not found:
            raise InputError(
                f"{item.path.parent}: building {item.path.parent.name} has no image in {reference_dir}"
            )
        positives.append(list(found))
    return CrossViewSplit(
        name=f"university1652/{split}/{query_view}->{reference_view}",
        query_view=query_view,
        reference_view=reference_view,
        queries=queries,
        references=references,
        positives=positives,
    )


def _read_view(folder: Path, what: str) -> list[ViewItem]:
    require_dir(folder, what)
    items: list[ViewItem] = []
    for building in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            location = int(building.name)
        except ValueError:
            raise InputError(f"{building}: folder name is not a building id (an integer)") from None
        items.extend(ViewItem(path, None, None, location) for path in list_images(building))
    if not items:
        raise InputError(f"{folder}: no images; expected {what}")
    return items
