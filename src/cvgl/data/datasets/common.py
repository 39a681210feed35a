"""One model for every cross-view benchmark: a split of queries, references and positives.

CVUSA, CVACT, VIGOR, University-1652 and user pair CSVs are stored in very different layouts,
but training and evaluation only need the same few facts about each: which images are queries,
which are references, which references are correct for each query, and where each image is.
Every loader in this package turns its layout into a :class:`CrossViewSplit`; the trainer reads
it through :class:`PairDataset` and evaluation through :class:`ImageListDataset`.

Conventions:

* ``location`` is an integer shared by a query and its paired reference (and by every image of
  one place). The pair sampler uses it to keep false negatives out of a batch, so two queries
  that share a positive reference (VIGOR) or a building (University-1652) share a location.
  Location 0 is an ordinary id.
* ``lat``/``lon`` are degrees (EPSG:4326) or ``None`` when the layout carries no position. In
  samples, an unknown position is ``nan`` so the default collate function can batch it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cvgl.data.images import image_to_tensor, load_image
from cvgl.data.views import canonical_view
from cvgl.errors import InputError

__all__ = [
    "CrossViewSplit",
    "FolderListing",
    "ImageListDataset",
    "PairDataset",
    "ViewItem",
    "list_images",
    "load_resized",
    "require_dir",
    "require_file",
]

#: Extensions counted as images when a loader lists a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ViewItem:
    """One image on disk and the place it shows."""

    path: Path
    lat: float | None
    lon: float | None
    location: int
    # Training only: the same photo prepared at headings it was not taken at (what a heading-unknown
    # locate also tries); PairDataset(wrong_headings=True) scores one of them as a negative.
    wrong_headings: tuple[Path, ...] = ()


@dataclass
class CrossViewSplit:
    """Queries of one view, references of another, and which references are correct.

    ``positives[q]`` lists the reference indices that are correct for query ``q``; the first one
    is the paired reference used for training. ``semi_positives[q]`` lists VIGOR's
    semi-positive references (the same place seen off-centre) and is an empty list per query
    for every other dataset; an empty ``semi_positives`` is normalised to that on creation, so
    ``split.semi_positives[q]`` is always valid.
    """

    name: str
    query_view: str
    reference_view: str
    queries: list[ViewItem]
    references: list[ViewItem]
    positives: list[list[int]]
    semi_positives: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.query_view = canonical_view(self.query_view, f"{self.name}: query_view")
        self.reference_view = canonical_view(self.reference_view, f"{self.name}: reference_view")
        if not self.semi_positives:
            self.semi_positives = [[] for _ in self.queries]
        n_q, n_r = len(self.queries), len(self.references)
        if len(self.positives) != n_q or len(self.semi_positives) != n_q:
            raise ValueError(
                f"{self.name}: {n_q} queries but {len(self.positives)} positive lists and "
                f"{len(self.semi_positives)} semi-positive lists"
            )
        for q, (pos, semi) in enumerate(zip(self.positives, self.semi_positives)):
            if not pos:
                raise ValueError(f"{self.name}: query {q} ({self.queries[q].path}) has no positive")
            if any(not 0 <= r < n_r for r in (*pos, *semi)):
                raise ValueError(f"{self.name}: query {q} names a reference outside 0..{n_r - 1}")

    def pairs(self) -> list[tuple[int, int]]:
        """Training pairs ``(query index, paired reference index)``, one per query."""
        return [(q, pos[0]) for q, pos in enumerate(self.positives)]

    def pair_locations(self) -> np.ndarray:
        """Location id of each training pair (int64), for unique-location batching."""
        return np.array([item.location for item in self.queries], dtype=np.int64)

    def pair_latlon(self) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of each pair in degrees: the query's, else its reference's; nan if unknown."""
        lat = np.full(len(self.queries), np.nan)
        lon = np.full(len(self.queries), np.nan)
        for i, (q, r) in enumerate(self.pairs()):
            for item in (self.queries[q], self.references[r]):
                if item.lat is not None and item.lon is not None:
                    lat[i], lon[i] = item.lat, item.lon
                    break
        return lat, lon

    @classmethod
    def concat(cls, splits: list[CrossViewSplit], name: str) -> CrossViewSplit:
        """One split of several (e.g. both directions of a date pair, plus a user's own pairs).

        Reference indices and location ids are offset so that nothing from one part is taken for
        the same image or place as something from another; all parts must share their views.
        """
        views = {(s.query_view, s.reference_view) for s in splits}
        if len(views) != 1:
            raise ValueError(f"{name}: cannot join splits of different views {sorted(views)}")
        queries, references, positives, semi = [], [], [], []
        location = 0
        for split in splits:
            ref_offset = len(references)
            ids = [item.location for item in (*split.queries, *split.references)]
            loc_offset = location - min(ids)
            queries += [replace(item, location=item.location + loc_offset) for item in split.queries]
            references += [replace(item, location=item.location + loc_offset) for item in split.references]
            positives += [[r + ref_offset for r in pos] for pos in split.positives]
            semi += [[r + ref_offset for r in pos] for pos in split.semi_positives]
            location = loc_offset + max(ids) + 1
        query_view, reference_view = views.pop()
        return cls(name, query_view, reference_view, queries, references, positives, semi)

    def __repr__(self) -> str:
        return (
            f"CrossViewSplit({self.name!r}, {self.query_view}->{self.reference_view}, "
            f"{len(self.queries)} queries, {len(self.references)} references)"
        )


def load_resized(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """An image as a float tensor ``[3, H, W]`` in [0, 1], resized with PIL bicubic to ``size`` (H, W).

    Loading goes through :func:`cvgl.data.images.load_image`, so a missing or corrupt file raises
    a one-line :class:`InputError` naming it (inside a DataLoader worker too).
    """
    return image_to_tensor(load_image(path), size)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


class PairDataset(Dataset):
    """Training pairs of a split as dict samples, optionally with a paired augmentation.

    Sample ``i`` is pair ``split.pairs()[i]``: ``{"query": [3, Hq, Wq], "reference": [3, Hr, Wr]``
    (float in [0, 1]), ``"pair": i, "location": int, "lat": float, "lon": float}`` (nan when the
    position is unknown). With ``wrong_headings=True`` it also holds ``"query_wrong"``: the query
    photo prepared at one of its wrong headings (epoch ``e`` takes the ``e``-th, cycling), augmented
    exactly as the query. The augmentation is drawn from ``(seed, epoch, i)`` only, so it does
    not depend on worker count or order and a resumed run sees the same pixels: call
    :meth:`set_epoch` before each epoch (DataLoader workers copy the dataset when they start, so
    keep ``persistent_workers=False``, the default, for the new epoch to reach them).
    """

    def __init__(
        self,
        split: CrossViewSplit,
        query_size: tuple[int, int],
        reference_size: tuple[int, int],
        augment: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        wrong_headings: bool = False,
    ) -> None:
        self.split = split
        self.wrong_headings = bool(wrong_headings)
        if self.wrong_headings:
            bare = [item.path for item in split.queries if not item.wrong_headings]
            if bare:
                raise ValueError(f"{split.name}: {len(bare)} queries (e.g. {bare[0]}) have no wrong-heading images")
        self.query_size = (int(query_size[0]), int(query_size[1]))
        self.reference_size = (int(reference_size[0]), int(reference_size[1]))
        self.augment = augment
        self.epoch = 0
        self._pairs = split.pairs()
        self._lat, self._lon = split.pair_latlon()
        check = getattr(augment, "check_sizes", None)
        if check is not None:
            check(self.query_size, self.reference_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        q, r = self._pairs[index]
        query = load_resized(self.split.queries[q].path, self.query_size)
        reference = load_resized(self.split.references[r].path, self.reference_size)
        wrong = None
        if self.wrong_headings:
            paths = self.split.queries[q].wrong_headings
            wrong = load_resized(paths[self.epoch % len(paths)], self.query_size)
        if self.augment is not None:
            if wrong is not None:  # the same draw (a pure function of epoch and index) as the query's
                wrong, _ = self.augment(wrong, reference, epoch=self.epoch, index=int(index))
            query, reference = self.augment(query, reference, epoch=self.epoch, index=int(index))
        sample = {
            "query": query,
            "reference": reference,
            "pair": int(index),
            "location": int(self.split.queries[q].location),
            "lat": float(self._lat[index]),
            "lon": float(self._lon[index]),
        }
        if wrong is not None:
            sample["query_wrong"] = wrong
        return sample


class ImageListDataset(Dataset):
    """Images of one view for evaluation encoding: ``{"image": [3, H, W], "index": i}``."""

    def __init__(self, items: Sequence[ViewItem], size: tuple[int, int]) -> None:
        self.items = list(items)
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"image": load_resized(self.items[index].path, self.size), "index": int(index)}


# ----------------------------------------------------------------------------------------------
# Layout checks shared by the loaders
# ----------------------------------------------------------------------------------------------


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else an InputError that names it and says what it should hold."""
    if not path.is_dir():
        raise InputError(f"{path}: folder not found; expected {what}")
    return path


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else an InputError that names it and says what it should be."""
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected {what}")
    return path


class FolderListing:
    """Existence checks for many files through one ``os.listdir`` per folder.

    Benchmarks list 10^4-10^5 images; checking each with ``stat`` on a network disk takes
    minutes, a listing per folder takes a second.
    """

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def exists(self, path: Path) -> bool:
        folder = path.parent
        names = self._names.get(folder)
        if names is None:
            try:
                names = frozenset(os.listdir(folder))
            except OSError:
                names = frozenset()
            self._names[folder] = names
        return path.name in names

    def require(self, path: Path, what: str) -> Path:
        if not self.exists(path):
            raise InputError(f"{path}: image not found; expected {what}")
        return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (jpg/jpeg/png, any case), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
