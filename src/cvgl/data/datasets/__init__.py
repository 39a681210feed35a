"""Cross-view benchmark datasets in their published layouts, as one :class:`CrossViewSplit` model.

Loaders: :func:`load_cvusa`, :func:`load_cvact`, :func:`load_vigor`, :func:`load_university1652`
and :func:`load_pairs_csv` (your own pairs); :func:`cut_ortho_pairs` makes a pairs CSV from two
orthophotos of one area. :class:`PairDataset` feeds training, :class:`ImageListDataset` evaluation.
"""

from __future__ import annotations

from cvgl.data.datasets.common import (
    CrossViewSplit,
    ImageListDataset,
    PairDataset,
    ViewItem,
)
from cvgl.data.datasets.cvact import load_cvact
from cvgl.data.datasets.cvusa import load_cvusa
from cvgl.data.datasets.ortho_pairs import cut_ortho_pairs
from cvgl.data.datasets.pairs_csv import load_pairs_csv
from cvgl.data.datasets.university1652 import load_university1652
from cvgl.data.datasets.vigor import load_vigor

__all__ = [
    "CrossViewSplit",
    "ImageListDataset",
    "PairDataset",
    "ViewItem",
    "cut_ortho_pairs",
    "load_cvact",
    "load_cvusa",
    "load_pairs_csv",
    "load_university1652",
    "load_vigor",
]
