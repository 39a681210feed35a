"""Zero-shot retrieval on the real cross-view pairs kept beside the repo (evaluation only).

The pairs live in ``../shared/real_pairs`` (override with ``$CVGL_REAL_PAIRS`` or ``--root``): about
60 real pairs from public repositories' sample folders, research/evaluation-only licences. They are
read in place and never copied into the repo, its tests or its docs; the output names files only.

Two tasks, each with one gallery = every satellite/orthophoto image of the task's folders plus
Longmont WV3 tiles as distractors (the same tiles in both tasks):

* **street→satellite**: CVACT street panoramas, CVUSA panoramas (crossnet), CVUSA and Dayton
  street crops (SelectionGAN ``split/``), University-1652 street photos;
* **drone→satellite**: SUES-200 drone photos, OrthoLoC UAV photos.

Labelling decisions (each folder's ``README.txt`` is the source):

* SUES-200 ``unpaired_other_site/``: drone frames of a site with no satellite image. They stay in
  the query set as *unanswerable* queries: they are part of the unlabelled query batch CORAL is
  fitted on (a deployment sees such photos too), but, as everywhere in :mod:`cvgl.evaluate`, a
  query with no positive is excluded from R@k and from the chance level (no ranking can answer
  it), and the table counts them in their own column.
* OrthoLoC ``urban_residential_xDOP.tif``: the same footprint from another acquisition date, so a
  *second positive* of the ``urban_residential`` query, not a distractor: returning it is right.
* SelectionGAN Dayton: the train and test samples share one panorama id with different crops; the
  aerial crops are the same place rotated to each crop's heading, so both are positives of both.

Methods: raw pixels (32×32 grey), random-init ViT-S/14 and the embedded DINOv2 ViT-S/14 with
several heads, each with no alignment and with CORAL fitted on the task's unlabelled queries
(leak-free), plus, for ``vfmloc-ref``, the **LEAKY** paper protocol (PCA + Procrustes fitted on the
test pairs themselves): an upper bound, never a deployable number. Square and near-square images
are encoded at 224², 4:3 photos at about the same token count with their aspect, and panoramas at
height 154 keeping their aspect (see :class:`Sizes`). The chance level is the expected R@1 (and
R@10) of a uniformly random ranking of the task's gallery.

Every image (queries, gallery, distractors) is encoded as grey RGB by default: the Longmont
distractors are panchromatic, so in colour a colour-sensitive descriptor discards them for free.
``--colour`` keeps the original colours.

    python -m cvgl.bench.real_pairs [--out FILE] [--root DIR] [--colour]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cvgl.alignment import Alignment, fit_alignment
from cvgl.bench.common import SharedTokens, emit_section, raw_pixels
from cvgl.errors import InputError
from cvgl.evaluate import recall_at_k
from cvgl.models.backbone import PATCH
from cvgl.models.factory import load_backbone
from cvgl.models.presets import PRESETS

STREET = "street→satellite"
DRONE = "drone→satellite"
TASKS = (STREET, DRONE)
KS = (1, 5, 10)
ENV_VAR = "CVGL_REAL_PAIRS"
DEFAULT_ROOT_TEXT = "../shared/real_pairs"
#: ``<repo>/../shared/real_pairs``; this file is ``<repo>/src/cvgl/bench/real_pairs.py``.
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / ".." / "shared" / "real_pairs"
#: Longmont WV3 distractor tiles: 112 m at 0.5 m = 224 px native, stride 40 m -> 529 tiles.
DISTRACTOR_TILING = dict(tile_m=112.0, stride_m=40.0, gsd_m=0.5)
LEAKY_PCA_DIM = 256


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One query photo and the gallery ids that show the same place (empty: unanswerable)."""

    id: str  # "<folder>/<path inside the folder>"
    path: Path
    source: str  # folder name
    positives: tuple[str, ...]


@dataclass(frozen=True)
class GalleryItem:
    """A satellite/orthophoto image (``path``) or an in-memory distractor tile (``image``)."""

    id: str
    source: str
    path: Path | None = None
    image: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Task:
    name: str
    queries: list[Query]
    gallery: list[GalleryItem]  # real images only; distractors are added by :func:`run`

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(q.source for q in self.queries))

    @property
    def scored(self) -> list[Query]:
        return [q for q in self.queries if q.positives]


@dataclass(frozen=True)
class _Source:
    """How one real_pairs folder maps onto a task."""

    folder: str
    task: str
    short: str
    query_col: str
    gallery_col: str
    extra_col: str | None = None  # optional second positive: first word of the cell, if a file
    place: Callable[[dict], str] | None = None  # rows with the same place share their positives
    unpaired_dir: str | None = None  # query photos without any positive


def _selectiongan_place(row: dict) -> str:
    """Dayton crops of one panorama id are one place; every CVUSA sample is its own place."""
    name = Path(row.get("original_concat_file", "")).stem  # dayton_test_<panoid>.x832.y508.a-86.a2g
    parts = name.split("_", 2)
    if len(parts) == 3 and parts[0] == "dayton":
        return "dayton:" + parts[2].split(".")[0]
    return name or row["ground_crop(derived)"]


SOURCES: tuple[_Source, ...] = (
    _Source("cvact_streetpano_sat2density", STREET, "CVACT pano", "ground_panorama", "satellite"),
    _Source("cvusa_streetpano_crossnet", STREET, "CVUSA pano", "ground_panorama", "aerial"),
    _Source(
        "cvusa_dayton_selectiongan", STREET, "CVUSA+Dayton crop", "ground_crop(derived)", "aerial_crop(derived)",
        place=_selectiongan_place,
    ),
    _Source("u1652_street_satellite", STREET, "U1652 street", "street_photo", "satellite"),
    _Source("sues200_drone_satellite", DRONE, "SUES-200", "drone", "satellite", unpaired_dir="unpaired_other_site"),
    _Source("ortholoc_uav_orthophoto", DRONE, "OrthoLoC", "uav_query", "orthophoto", extra_col="extra"),
)
SHORT_NAMES = {s.folder: s.short for s in SOURCES}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _read_pairs(folder: Path) -> list[dict]:
    path = folder / "pairs.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing; every real_pairs folder needs its pairs.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _cell(row: dict, column: str, folder: Path) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise InputError(f"{folder / 'pairs.csv'}: column '{column}' is missing or empty in row {row}")
    return value


def _file(folder: Path, relative: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise InputError(f"{path}: listed in {folder / 'pairs.csv'} but missing")
    return path


def _parse_source(folder: Path, spec: _Source) -> tuple[list[Query], list[GalleryItem]]:
    gallery: dict[str, GalleryItem] = {}
    place_gallery: dict[str, list[str]] = defaultdict(list)
    query_place: dict[str, str] = {}
    for index, row in enumerate(_read_pairs(folder)):
        place = spec.place(row) if spec.place else f"row{index}"
        names = [_cell(row, spec.gallery_col, folder)]
        if spec.extra_col:
            words = (row.get(spec.extra_col) or "").split()
            if words and words[0].lower().endswith(IMAGE_SUFFIXES):
                names.append(words[0])
        for name in names:
            gid = f"{folder.name}/{name}"
            gallery.setdefault(gid, GalleryItem(gid, folder.name, _file(folder, name)))
            if gid not in place_gallery[place]:
                place_gallery[place].append(gid)
        query_place.setdefault(_cell(row, spec.query_col, folder), place)
    queries = [
        Query(f"{folder.name}/{name}", _file(folder, name), folder.name, tuple(place_gallery[place]))
        for name, place in query_place.items()
    ]
    if spec.unpaired_dir and (folder / spec.unpaired_dir).is_dir():
        for path in sorted((folder / spec.unpaired_dir).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                rel = path.relative_to(folder).as_posix()
                queries.append(Query(f"{folder.name}/{rel}", path, folder.name, ()))
    return queries, list(gallery.values())


def load_tasks(root: Path) -> list[Task]:
    """Parse every known folder under ``root`` into the two tasks (absent folders are skipped)."""
    root = Path(root)
    found: dict[str, Task] = {name: Task(name, [], []) for name in TASKS}
    for spec in SOURCES:
        folder = root / spec.folder
        if folder.is_dir():
            queries, gallery = _parse_source(folder, spec)
            found[spec.task].queries.extend(queries)
            found[spec.task].gallery.extend(gallery)
    return [task for task in found.values() if task.queries]


# ------------------------------------------------------------------------------------------------
# images and input sizes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Encoder input size (height, width) per image shape; all multiples of 14.

    Near-square images go to ``square``²; panoramas (width/height >= ``pano_aspect``) to height
    ``pano_height`` with their aspect kept (width capped at ``pano_max_width``); anything between
    (4:3 photos) keeps its aspect at about the token count of ``square``².
    """

    square: int = 224
    pano_height: int = 154
    pano_max_width: int = 840
    pano_aspect: float = 1.8
    square_aspect: float = 1.15

    def for_image(self, width: int, height: int) -> tuple[int, int]:
        aspect = width / height
        if max(aspect, 1 / aspect) < self.square_aspect:
            return self.square, self.square
        if aspect >= self.pano_aspect:
            w = max(PATCH, round(self.pano_height * aspect / PATCH) * PATCH)
            return self.pano_height, min(w, self.pano_max_width)
        cells = (self.square / PATCH) ** 2
        rows = max(1, round(math.sqrt(cells / aspect)))
        cols = max(1, round(cells / rows))
        return rows * PATCH, cols * PATCH


def load_pixels(item: Query | GalleryItem, colour: bool = False) -> np.ndarray:
    """HxWx3 uint8 of a query, gallery image or distractor; grey RGB unless ``colour``."""
    from cvgl.data.images import load_image

    if getattr(item, "image", None) is not None:
        image = Image.fromarray(np.asarray(item.image, dtype=np.uint8)).convert("RGB")
    else:
        image = load_image(item.path)
    if not colour:
        image = image.convert("L").convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def longmont_distractors(**tiling) -> list[GalleryItem]:
    """Longmont WV3 tiles (default :data:`DISTRACTOR_TILING`: 529 tiles of 224 px) as gallery items."""
    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec, iter_tiles

    spec = TilingSpec(**{**DISTRACTOR_TILING, **tiling})
    return [
        GalleryItem(f"longmont-wv3/{tile.tile_id}", "longmont-wv3", image=tile.image)
        for tile in iter_tiles(longmont_scene("wv3"), spec)
    ]


# ------------------------------------------------------------------------------------------------
# methods and encoding
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One descriptor: raw pixels (``preset=None``) or a preset's head on a backbone."""

    label: str
    preset: str | None = None
    weights: str = "embedded"  # "embedded", a file, "hub:<arch>" or "random:<arch>"
    seed: int = 0  # torch seed for "random:" weights
    leaky: bool = False  # also report the LEAKY paper protocol (Procrustes on the test pairs)


DEFAULT_METHODS: tuple[Method, ...] = (
    Method("raw pixels (32² grey)"),
    Method("random-init ViT-S/14 · cls", "cls", "random:dinov2_vits14"),
    Method("random-init ViT-S/14 · gem-l8", "gem-l8", "random:dinov2_vits14"),
    Method("DINOv2 ViT-S/14 · cls", "cls"),
    Method("DINOv2 ViT-S/14 · gem", "gem"),
    Method("DINOv2 ViT-S/14 · swrmac", "swrmac"),
    Method("DINOv2 ViT-S/14 · vfmloc-ref", "vfmloc-ref", leaky=True),
    Method("DINOv2 ViT-S/14 · gem-l8", "gem-l8"),
    Method("DINOv2 ViT-S/14 · gem-l8-raw (default)", "gem-l8-raw"),
    Method("DINOv2 ViT-S/14 · hier-l6-l8-l10", "hier-l6-l8-l10"),
)


def encode_methods(
    methods: Sequence[Method],
    images: Sequence[np.ndarray],
    sizes: Sizes = Sizes(),
    log: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """``{method label: [N, D] descriptors}`` of HxWx3 uint8 ``images``, each at its :class:`Sizes` input size.

    Each backbone is built and run once for all its heads (:class:`cvgl.bench.common.SharedTokens`).
    """
    input_sizes = [sizes.for_image(im.shape[1], im.shape[0]) for im in images]
    out: dict[str, np.ndarray] = {}
    raw = [m for m in methods if m.preset is None]
    if raw:
        thumbs = raw_pixels(list(images))
        out.update({m.label: thumbs for m in raw})
    groups: dict[tuple[str, int], list[Method]] = defaultdict(list)
    for m in methods:
        if m.preset is not None:
            groups[(m.weights, m.seed if m.weights.startswith("random:") else 0)].append(m)
    for (weights, seed), members in groups.items():
        started = time.time()
        shared = SharedTokens(load_backbone(weights, seed)[0], {m.label: PRESETS[m.preset].head for m in members}, weights=weights)
        out.update(shared.encode(images, batch=8, sizes=input_sizes))
        if log:
            log(f"real-pairs: encoded {len(images)} images with {weights} ({len(members)} heads) in {time.time() - started:.0f} s")
    return out


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------


def chance_recall(n_positives: np.ndarray, gallery: int, k: int) -> float:
    """Expected R@k of a uniformly random ranking, averaged over queries: 1 - C(G-n, k) / C(G, k)."""
    k = min(k, gallery)  # a cut-off beyond the gallery holds the whole gallery
    values = [1.0 - math.comb(gallery - int(n), k) / math.comb(gallery, k) for n in n_positives]
    return float(np.mean(values))


def _fits(
    method: Method, queries: np.ndarray, reference: np.ndarray, positives: np.ndarray, alignments: Sequence[str]
) -> list[tuple[str, Alignment]]:
    fits = []
    for kind in alignments:
        if kind == "none":
            fits.append((kind, fit_alignment("none", reference)))
        elif len(queries) >= 2:
            fits.append((kind, fit_alignment(kind, reference, queries=queries)))
    if method.leaky:
        q_rows, g_cols = np.nonzero(positives)  # every (query, positive) pair; unpaired queries add none
        fits.append(
            (
                f"LEAKY: PCA-{LEAKY_PCA_DIM} + Procrustes on the test pairs",
                fit_alignment(
                    "procrustes", reference, anchors=(queries[q_rows], reference[g_cols]), leaky=True,
                    pca_dim=LEAKY_PCA_DIM,
                ),
            )
        )
    return fits


def run(
    root: Path,
    methods: Sequence[Method] = DEFAULT_METHODS,
    *,
    sizes: Sizes = Sizes(),
    distractors: Sequence[GalleryItem | np.ndarray] | str = "longmont",
    alignments: Sequence[str] = ("none", "coral"),
    colour: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Evaluate every method and alignment on both tasks; one row per (task, method, alignment).

    ``distractors``: ``"longmont"`` (default, :func:`longmont_distractors`), or gallery items /
    HxWx3 uint8 arrays added to every task's gallery. Alignments other than ``none`` are fitted
    on the task's query descriptors without labels (including unanswerable queries) and the
    task's gallery; the leaky row (``Method.leaky``) uses the labels and says so.

    Every image (queries, gallery, distractors) is encoded as grey RGB unless ``colour``: the
    Longmont distractors are panchromatic, so in colour they are trivially set apart (see
    :data:`GREY_NOTE`). Each row records the mode in ``"colour"``.
    """
    tasks = load_tasks(Path(root))
    if isinstance(distractors, str):
        if distractors != "longmont":
            raise ValueError(f"distractors must be 'longmont' or a sequence, got '{distractors}'")
        distractors = longmont_distractors()
    extra = [
        d if isinstance(d, GalleryItem) else GalleryItem(f"distractor/{i}", "distractor", image=np.asarray(d))
        for i, d in enumerate(distractors)
    ]
    items: dict[str, Query | GalleryItem] = {}
    for task in tasks:
        items.update({q.id: q for q in task.queries})
        items.update({g.id: g for g in task.gallery})
    items.update({d.id: d for d in extra})
    ids = list(items)
    index = {item_id: i for i, item_id in enumerate(ids)}
    if log:
        log(f"real-pairs: {len(ids)} images ({len(extra)} distractors), {len(methods)} methods, {'colour' if colour else 'grey'}")
    descriptors = encode_methods(methods, [load_pixels(items[i], colour) for i in ids], sizes, log)

    rows: list[dict] = []
    for task in tasks:
        gallery_ids = [g.id for g in task.gallery] + [d.id for d in extra]
        positives = np.array([[gid in set(q.positives) for gid in gallery_ids] for q in task.queries], dtype=bool)
        valid = positives.any(axis=1)
        n_pos = positives[valid].sum(axis=1)
        g_size = len(gallery_ids)
        common = {
            "task": task.name,
            "n_queries": int(valid.sum()),
            "n_unpaired": int((~valid).sum()),
            "gallery": g_size,
            "gallery_real": len(task.gallery),
            "gallery_distractors": len(extra),
            "chance_R@1": float(np.mean(n_pos / g_size)) if len(n_pos) else float("nan"),
            "chance_R@10": chance_recall(n_pos, g_size, 10) if len(n_pos) else float("nan"),
            "colour": colour,
        }
        sources = np.array([q.source for q in task.queries])
        q_idx = [index[q.id] for q in task.queries]
        g_idx = [index[g] for g in gallery_ids]
        for method in methods:
            queries, reference = descriptors[method.label][q_idx], descriptors[method.label][g_idx]
            for align_name, alignment in _fits(method, queries, reference, positives, alignments):
                scores = alignment.apply(queries, "query") @ alignment.apply(reference, "reference").T
                recall = recall_at_k(scores, positives, KS) if valid.any() else {k: float("nan") for k in KS}
                per_source = {}
                for source in task.sources:
                    mask = (sources == source) & valid
                    if mask.any():
                        per_source[source] = recall_at_k(scores[mask], positives[mask], (1,))[1]
                rows.append(
                    {
                        **common,
                        "method": method.label,
                        "alignment": align_name,
                        "leaky": alignment.leaky,
                        **{f"R@{k}": recall[k] for k in KS},
                        "per_source_R@1": per_source,
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _f(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"  # NaN -> dash


def render_markdown(rows: list[dict], meta: dict | None = None) -> str:
    """One summary table (queries, gallery, chance per task) and one results table per task."""
    meta = meta or {}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    first = {t: next(r for r in rows if r["task"] == t) for t in tasks}
    lines = ["# Zero-shot retrieval on real cross-view pairs (evaluation only)", ""]
    if meta.get("generated"):
        lines += [meta["generated"], ""]
    lines += [
        "Real image pairs from public repositories' sample folders, read in place from"
        f" `{meta.get('root', DEFAULT_ROOT_TEXT)}` (never copied into this repo). Each task's gallery ="
        " all its satellite/orthophoto images + the distractor tiles; a query is right at k when a"
        " positive is in its top k (pessimistic ties, `cvgl.evaluate`). Chance = expected recall of a"
        " random ranking. With so few queries one query moves R@1 by 0.02 (street) to 0.06 (drone).",
        "",
    ]
    if meta.get("distractors"):
        lines += [f"Distractors: {meta['distractors']}", ""]
    if meta.get("input_sizes"):
        lines += ["Input sizes: " + "; ".join(f"{k}: {v}" for k, v in meta["input_sizes"].items()) + ".", ""]
    lines += [
        "| task | scored queries | unpaired queries | gallery (real + distractors) | chance R@1 | chance R@10 |",
        "|---|---|---|---|---|---|",
    ]
    for t in tasks:
        r = first[t]
        lines.append(
            f"| {t} | {r['n_queries']} | {r['n_unpaired']} | {r['gallery']} ({r['gallery_real']} + "
            f"{r['gallery_distractors']}) | {r['chance_R@1']:.4f} | {r['chance_R@10']:.4f} |"
        )
    for t in tasks:
        task_rows = [r for r in rows if r["task"] == t]
        sources = list(dict.fromkeys(s for r in task_rows for s in r["per_source_R@1"]))
        lines += [
            "",
            f"## {t}",
            "",
            "| method | alignment | R@1 | R@5 | R@10 | " + " | ".join(f"R@1 {SHORT_NAMES.get(s, s)}" for s in sources) + " |",
            "|---|---|---|---|---|" + "---|" * len(sources),
        ]
        for r in task_rows:
            label = f"**{r['alignment']}**" if r["leaky"] else r["alignment"]
            per = [_f(r["per_source_R@1"].get(s, float("nan"))) for s in sources]
            lines.append(
                f"| {r['method']} | {label} | {_f(r['R@1'])} | {_f(r['R@5'])} | {_f(r['R@10'])} | " + " | ".join(per) + " |"
            )
    colour = any(r.get("colour", False) for r in rows)
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in (*NOTES, COLOUR_NOTE if colour else GREY_NOTE)]
    return "\n".join(lines) + "\n"


NOTES = (
    "coral = CORAL fitted on the task's own query photos without labels (the unanswerable SUES-200 frames"
    " included) and on the gallery: transductive but leak-free. With 19 or 58 queries against 384-1152"
    " dimensions the query covariance is rank-deficient and the ridge dominates; treat it as a stress test.",
    "**LEAKY** rows fit PCA + Procrustes on every (query, positive) pair of the test set itself, as the"
    " public VFM-Loc code does: they show what the leak buys, not what a user gets.",
    "SUES-200 `unpaired_other_site/` frames have no satellite image: excluded from R@k and chance (no ranking"
    " can answer them), counted as unpaired queries. OrthoLoC `urban_residential_xDOP.tif` (same footprint,"
    " other date) is a second positive of `urban_residential`. The two Dayton crops of one panorama id share"
    " both aerial crops as positives.",
)
GREY_NOTE = (
    "Images: **grey** (default). Every image (queries, real gallery, distractors) was converted to grey RGB"
    " (PIL `L` then `RGB`) before encoding. The Longmont distractors are panchromatic while the real"
    " galleries are colour, so in colour any colour-sensitive descriptor sets the distractors aside cheaply"
    " (a random-init ViT answered every OrthoLoC query): grey removes that shortcut, so the distractors"
    " count. `--colour` gives the colour numbers."
)
COLOUR_NOTE = (
    "Images: **colour** (`--colour`). The Longmont distractors are panchromatic (grey) while the real"
    " galleries are colour, so a colour-sensitive descriptor can set them aside cheaply: they make the"
    " gallery larger but easier than its size suggests (a random-init ViT answered every OrthoLoC query)."
    " The raw-pixel baseline is grey and gets no such help. The default run converts every image to grey."
)


def resolve_root(root: Path | None = None) -> tuple[Path, str]:
    """The real_pairs folder and how to name it in messages (explicit > $CVGL_REAL_PAIRS > default)."""
    if root is not None:
        return Path(root), str(root)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), os.environ[ENV_VAR]
    return DEFAULT_ROOT, DEFAULT_ROOT_TEXT


def input_size_summary(tasks: list[Task], sizes: Sizes = Sizes()) -> dict[str, str]:
    """``{source: "W×H → w×h, ..."}`` (file size → encoder input size, both width × height) from headers."""
    out: dict[str, str] = {}
    for task in tasks:
        groups: dict[str, list[Query | GalleryItem]] = defaultdict(list)
        for q in task.queries:
            groups[f"{SHORT_NAMES.get(q.source, q.source)} queries"].append(q)
        groups[f"{task.name} gallery"] = list(task.gallery)
        for name, members in groups.items():
            seen = []
            for m in members:
                with Image.open(m.path) as im:
                    w, h = im.size
                hh, ww = sizes.for_image(w, h)
                text = f"{w}×{h} → {ww}×{hh}"
                if text not in seen:
                    seen.append(text)
            out[name] = ", ".join(seen)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cvgl.bench.real_pairs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None, help=f"real_pairs folder (default ${ENV_VAR} or {DEFAULT_ROOT_TEXT})")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here (atomically)")
    parser.add_argument(
        "--colour", action="store_true",
        help="encode images in colour (default: every image as grey RGB, so the grey distractors are no shortcut)",
    )
    args = parser.parse_args(argv)
    root, shown = resolve_root(args.root)
    if not root.is_dir():
        print(f"real-pairs: {shown} not found; skipped")
        return 0
    started = time.time()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        distractors = longmont_distractors()
        distractor_text = (
            f"{len(distractors)} Longmont WV3 tiles ({DISTRACTOR_TILING['tile_m']:g} m, stride"
            f" {DISTRACTOR_TILING['stride_m']:g} m, {DISTRACTOR_TILING['gsd_m']:g} m GSD, 224 px, panchromatic as grey RGB),"
            " the same in both tasks."
        )
    except InputError as exc:
        log(f"real-pairs: no distractors ({exc})")
        distractors, distractor_text = [], f"none ({exc})"
    sizes = Sizes()
    rows = run(root, DEFAULT_METHODS, sizes=sizes, distractors=distractors, colour=args.colour, log=log)
    elapsed = time.time() - started
    meta = {
        "root": shown,
        "distractors": distractor_text,
        "input_sizes": input_size_summary(load_tasks(root), sizes),
        "generated": (
            f"Generated by `python -m cvgl.bench.real_pairs` on {platform.machine()} with"
            f" {torch.get_num_threads()} torch threads (torch {torch.__version__}) in {elapsed:.0f} s."
        ),
    }
    text = render_markdown(rows, meta)
    return emit_section(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
