"""Training and test splits from a :class:`~cvgl.train.config.TrainConfig`'s ``data`` section.

Benchmarks are read in their published layouts by :mod:`cvgl.data.datasets`. ``ortho-pairs`` is
how a user trains on their own region: pairs are cut from two or more co-registered orthophotos
(here the embedded Longmont WV2 and WV3 scenes; with ``data.rasters``, in every direction) into
``OUT/pairs/{train,test}`` (or ``data.pairs_dir``) once, then read back as pairs CSVs, plus the
user's own pairs (``data.extra_pairs``); spatial strips keep training and test ground apart.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from cvgl.errors import InputError
from cvgl.train.config import DataConfig, TrainConfig, check_rasters
from cvgl.train.distributed import World, barrier

# The split each benchmark publishes for evaluation (CVUSA and CVACT call theirs "val").
TEST_SPLITS = {"cvusa": "val", "cvact": "val", "vigor": "test", "university1652": "test"}


def resolve_raster(text: str) -> Path:
    """``longmont:wv2`` / ``longmont:wv3`` (the embedded scenes) or a GeoTIFF path."""
    if text.startswith("longmont:"):
        from cvgl.data.samples import longmont_scene

        return Path(longmont_scene(text.split(":", 1)[1]))
    path = Path(text)
    if not path.is_file():
        raise InputError(f"{path}: orthophoto not found (data.query_raster / data.reference_raster)")
    return path


def ortho_directions(data: DataConfig) -> list[tuple[str, str]]:
    """(photo raster, tile raster) of every direction pairs are cut in (see ``DataConfig.rasters``)."""
    if not data.rasters:
        return [(data.query_raster, data.reference_raster)]
    check_rasters(data, "data.rasters")
    return [(q, r) for q in data.rasters for r in data.rasters if q != r]


def _ortho_split(data: DataConfig, out: Path, role: str, world: World | None):
    """Cut (once) and read the pairs of every direction; the training split adds ``extra_pairs``."""
    from cvgl.data.datasets.common import CrossViewSplit
    from cvgl.data.datasets.ortho_pairs import cut_ortho_pairs
    from cvgl.data.datasets.pairs_csv import load_pairs_csv

    root = (Path(data.pairs_dir) if data.pairs_dir else out / "pairs") / role
    directions = ortho_directions(data) if role == "train" else ortho_directions(data)[:1]
    count, x_range, seed = (
        (data.train_pairs, data.train_x_range, 1) if role == "train" else (data.test_pairs, data.test_x_range, 2)
    )
    per_direction = max(1, count // len(directions))
    wrong = data.wrong_headings if role == "train" else 0
    # One direction keeps the folder layout of earlier runs (root itself); several get a folder each.
    folders = [root] if len(directions) == 1 else [root / f"{i}" for i in range(len(directions))]
    parts = []
    for index, ((query_raster, reference_raster), folder) in enumerate(zip(directions, folders)):
        split = None
        if world is None or world.is_main:
            cut_ortho_pairs(  # reuses the folder when it holds pairs cut with the same parameters
                resolve_raster(query_raster), resolve_raster(reference_raster), folder,
                count=per_direction, seed=seed + 10 * index, x_range=x_range,
            )
            split = load_pairs_csv(folder / "pairs.csv", query_view="drone", reference_view="satellite")
            prepare_queries(split, folder / "prepared", tile_m=112.0, gsd_m=0.5, wrong_headings=wrong)
        if world is not None:
            barrier(world)  # the other processes read the pairs once the main one has cut them
        if split is None:
            split = load_pairs_csv(folder / "pairs.csv", query_view="drone", reference_view="satellite")
        parts.append(prepared_split(split, folder / "prepared", wrong))
    if role == "train" and data.extra_pairs:
        parts.append(load_pairs_csv(Path(data.extra_pairs), query_view="drone", reference_view="satellite"))
    return parts[0] if len(parts) == 1 else CrossViewSplit.concat(parts, f"ortho-pairs/{role}")


def _prepared_path(folder: Path, query: Path, turn: int = 0) -> Path:
    """The prepared image of ``query`` at its own heading, or turned by ``turn`` of locate's heading steps."""
    return folder / (query.stem + (f".turn{turn:02d}" if turn else "") + ".png")


def wrong_turns(query: Path, count: int, rotations: int) -> list[int]:
    """``count`` distinct wrong heading steps (1 .. rotations - 1) for one photo, fixed by its file name."""
    if not 0 <= count < rotations:
        raise InputError(f"data.wrong_headings {count}: must be in [0, {rotations - 1}] (locate tries {rotations} headings)")
    rng = np.random.default_rng(zlib.crc32(query.name.encode()))
    return sorted(int(k) for k in rng.choice(np.arange(1, rotations), size=count, replace=False))


def prepare_queries(split, folder: Path, tile_m: float, gsd_m: float, wrong_headings: int = 0) -> None:
    """Turn each drone photo into what ``cvgl locate`` matches (rectified, north-up, tile scale).

    Training on raw oblique photos would teach the model inputs it never sees at locate time;
    :func:`cvgl.preprocess.prepare_query` (EXIF/XMP pitch, heading and altitude) is applied once and
    its image saved, so training and localization see the same geometry.

    ``wrong_headings`` > 0 also saves the photo prepared at that many of the headings a
    heading-unknown ``locate`` tries and that are wrong for it (the true heading turned by whole
    steps of ``360 / rotations``), made by the same function as locate's hypotheses, black corners
    and all: the negatives that teach the model that a wrong hypothesis must not outscore the right one.
    """
    import io

    from PIL import Image

    from cvgl.io import write_bytes_atomic
    from cvgl.preprocess import QueryOptions, prepare_query

    folder.mkdir(parents=True, exist_ok=True)
    options = QueryOptions()
    for item in split.queries:
        turns = [0] + wrong_turns(item.path, wrong_headings, options.rotations)
        targets = {turn: _prepared_path(folder, item.path, turn) for turn in turns}
        if all(target.is_file() for target in targets.values()):
            continue
        prepared = prepare_query(item.path, options, tile_m, gsd_m)
        heading = prepared.match_view.heading_deg if prepared.match_view else None
        if wrong_headings and heading is None:
            raise InputError(f"{item.path}: no heading in the photo's metadata, so its wrong headings are unknown")
        for turn, target in targets.items():
            if target.is_file():
                continue
            if turn:
                turned = QueryOptions(heading_deg=(heading + turn * 360.0 / options.rotations) % 360.0)
                image = prepare_query(item.path, turned, tile_m, gsd_m).hypotheses[0].image
            else:
                image = prepared.hypotheses[0].image
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            write_bytes_atomic(target, buffer.getvalue())


def prepared_split(split, folder: Path, wrong_headings: int = 0):
    """``split`` with each query path replaced by its prepared image (and its wrong-heading images)."""
    from dataclasses import replace

    from cvgl.preprocess import QueryOptions

    rotations = QueryOptions().rotations
    split.queries = [
        replace(
            item,
            path=_prepared_path(folder, item.path),
            wrong_headings=tuple(_prepared_path(folder, item.path, k) for k in wrong_turns(item.path, wrong_headings, rotations)),
        )
        for item in split.queries
    ]
    return split


def _load(data: DataConfig, split: str):
    from cvgl.data.datasets import (
        load_cvact,
        load_cvusa,
        load_pairs_csv,
        load_university1652,
        load_vigor,
    )

    root = Path(data.root)
    if data.kind == "pairs-csv":
        path = root if split == "train" else Path(data.test_root or data.root)
        return load_pairs_csv(path, **data.options)
    loaders = {"cvusa": load_cvusa, "cvact": load_cvact, "vigor": load_vigor, "university1652": load_university1652}
    return loaders[data.kind](root, split=split, **data.options)


def train_split(config: TrainConfig, out: Path, world: World | None = None):
    if config.data.kind == "ortho-pairs":
        return _ortho_split(config.data, Path(out), "train", world)
    return _load(config.data, "train")


def test_split(config: TrainConfig, out: Path):
    if config.data.kind == "ortho-pairs":
        return _ortho_split(config.data, Path(out), "test", None)
    return _load(config.data, TEST_SPLITS.get(config.data.kind, "test"))
