"""Benchmark ``confidence``: is an answer's confidence a probability, and is "not in this index" said?

Everything runs the product's own path (:func:`cvgl.locate.answer_photo` after
:func:`cvgl.preprocess.prepare_query`, the encoder and :func:`cvgl.index.search.hypothesis_scores`;
the verification stage in its default mode, ALIKED + LightGlue on the top 10) against a WV3 index of
Longmont with two **holes** cut out of the reference (:func:`cvgl.evaluate.locate_protocol.holed_reference`):

* **fit side** (west half): photos of the six Longmont families outside both holes, plus photos
  centred in the *west* hole as negatives. The two shipped models are fitted here
  (:func:`cvgl.confidence.fit_logistic`): ``retrieval-v1`` on the retrieval answer's evidence
  (z-score, margin, softmax mass), ``refined-v1`` on the answer after verification (those plus
  verified, log inliers, inlier ratio). Label: the answer's error to the true photo centre is at
  most its stated radius, ``answer.uncertainty_m`` (= ``confidence_radius_m``: the tile
  half-diagonal, 79 m, for a retrieval answer; the verified radius for a verified one).
  ``not_found_below``: the largest threshold that calls at most 5 % of the fit side's correct
  answers "not found" (verified answers are never called not found), capped at 0.5.
* **test side** (east half): per family, the photos outside the east hole; out of the index: photos
  centred in the *east* hole (ground cut out of the reference), real photos of other places from
  ``../shared/real_pairs`` (SUES-200 drone, OrthoLoC UAV, University-1652 street), and blank or
  near-content-free images (made by code). Reliability tables, ECE and Brier per family and
  overall; AUROC of in-index vs out-of-index with the confidence as the score (a refused photo
  scores 0).
* **batch independence**: the same photos located by :func:`cvgl.locate.locate_images` alone, in a
  batch of 16 and in a batch of 64 with verification off (the largest difference of any published
  number is printed), and a command with the default verification against the one-photo-at-a-time
  stages (same position, top-k, verification record and evidence).

Time: retrieval costs a few seconds a photo, verification 10-250 s on a loaded 2-core machine. So
every photo gets its retrieval answer, and verification runs fit-side photos first, then the two
sides alternately, until ``--budget-s`` is spent; the section counts the photos left unverified
(they are missing from the ``refined-v1`` rows only). ``--work DIR`` keeps the index, the photos
and every result, so a rerun resumes (and verifies more photos).
* **alignment**: the default (none) against saved ``cvgl align`` alignments (center / CORAL fitted
  on the unlabelled west photos, loaded through :func:`cvgl.alignment.load_query_alignment`) and
  the leaky fit on the east test pairs, on R@1 (top-1 tile centre within 79 m).

``--fit`` writes the two models into the package (``src/cvgl/confidence/*.json``); without it the
shipped models are evaluated and the refit is only compared with them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvgl.bench.common import emit_section, machine_line, markdown_table
from cvgl.confidence import (
    RETRIEVAL_FEATURES,
    VERIFIED_FEATURES,
    ConfidenceModel,
    fit_logistic,
    shipped_model,
)
from cvgl.errors import InputError
from cvgl.evaluate.calibration import (
    auroc,
    brier_score,
    expected_calibration_error,
    reliability_table,
)
from cvgl.evaluate.locate_protocol import (
    LabelledPhoto,
    Rect,
    error_to_centre,
    holed_reference,
    outside_all,
    photo_set,
    scene_rect,
)
from cvgl.evaluate.longmont import RADIUS_M, SPEC, east_west, families
from cvgl.geo import geodesic_distance_m

WEST_HOLE: Rect = (0.08, 0.30, 0.38, 0.70)  # fractions of the scene (x0, y0, x1, y1): negatives for fitting
EAST_HOLE: Rect = (0.62, 0.30, 0.92, 0.70)  # out-of-index test photos
HOLES = [WEST_HOLE, EAST_HOLE]
IN_MARGIN_M = 40.0  # an in-index photo's centre lies at least this far outside every hole
HOLE_MARGIN_M = 50.0  # a hole photo's centre lies at least this far inside its hole
TARGET_FALSE_NOT_FOUND = 0.05  # share of correct fit-side answers the threshold may call not found
MAX_NOT_FOUND_BELOW = 0.5
PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "confidence"
OTHER_PLACE_KINDS = ("east hole", "other place", "blank")


@dataclass(frozen=True)
class Sizes:
    """Photo counts. On a loaded 2-core machine a photo costs 10-40 s through the default
    verification, so the defaults are small and the heading-known families only (a heading-unknown
    photo costs 16 hypotheses and four matcher turns); ``--all-families`` adds the other three."""

    fit_per_family: int = 14
    fit_hole: int = 12
    test_per_family: int = 14
    test_hole: int = 12
    other_per_source: int = 1
    batches: tuple[int, ...] = (1, 16, 64)  # verification off
    verified_batch: int = 2  # default options, one command vs the per-photo stages
    alone: int = 2
    all_families: bool = False

    @classmethod
    def quick(cls) -> Sizes:
        return cls(fit_per_family=4, fit_hole=3, test_per_family=1, test_hole=1, other_per_source=1, batches=(1, 3, 6),
                   verified_batch=2, alone=1)

    def families(self) -> list:
        return [f for f in families() if self.all_families or f.heading_known]


@dataclass
class Case:
    """One photo of the benchmark and what the product answered for it."""

    path: Path
    group: str  # a family name, "west hole", "east hole", "other place" or "blank"
    side: str  # "west" (fit) or "east" (test)
    truth: LabelledPhoto | None  # None: a place not in the scene at all
    plain: dict | None = None  # the retrieval answer (verification off), published form
    refined: dict | None = None  # the answer as locate gives it by default
    plain_evidence: dict = field(default_factory=dict)
    refined_evidence: dict = field(default_factory=dict)
    desc: np.ndarray | None = None  # raw descriptors of its hypotheses (for the alignment table)
    skipped: str | None = None

    @property
    def in_index(self) -> bool:
        return self.group not in ("west hole", *OTHER_PLACE_KINDS)

    def correct(self, which: str) -> bool:
        """Error to the true photo centre within the answer's own stated radius."""
        answer = self.plain if which == "plain" else self.refined
        if answer is None or self.truth is None:
            return False
        return error_to_centre(answer, self.truth) <= float(answer["uncertainty_m"])

    def evidence(self, which: str) -> dict:
        return self.plain_evidence if which == "plain" else self.refined_evidence

    def verified(self, which: str) -> bool:
        return which == "refined" and self.refined is not None and self.refined["position_source"] == "verified"


# ------------------------------------------------------------------------------------------------
# Photos
# ------------------------------------------------------------------------------------------------


def _shrunk(rect: Rect, margin_m: float) -> tuple[tuple[float, float], tuple[float, float]]:
    left, bottom, right, top = scene_rect(rect)
    return (left + margin_m, right - margin_m), (bottom + margin_m, top - margin_m)


def interleaved(cases: list[Case]) -> list[Case]:
    """Round robin over (side, group), so that any prefix of the list is a balanced sample."""
    groups: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.side, case.group), []).append(case)
    out, lists = [], list(groups.values())
    for i in range(max(len(v) for v in lists)):
        out += [v[i] for v in lists if i < len(v)]
    return out


def make_cases(folder: Path, sizes: Sizes, seed: int) -> list[Case]:
    """Every photo of the benchmark, written under ``folder`` (deterministic for ``seed``), interleaved."""
    left, mid, right = east_west()
    cases: list[Case] = []
    keep = lambda p: outside_all(p, HOLES, IN_MARGIN_M)
    for k, family in enumerate(families()):
        if family not in sizes.families():
            continue
        for side, x_range, count, base in (("west", (left, mid), sizes.fit_per_family, 1000), ("east", (mid, right), sizes.test_per_family, 2000)):
            if count:
                for p in photo_set(folder / side, family, count, seed * 10_000 + base + k, x_range=x_range, keep=keep):
                    cases.append(Case(p.path, family.name, side, p))
    for side, rect, count, base in (("west", WEST_HOLE, sizes.fit_hole, 3000), ("east", EAST_HOLE, sizes.test_hole, 4000)):
        x_range, y_range = _shrunk(rect, HOLE_MARGIN_M)
        fams = sizes.families()
        for k, family in enumerate(fams):  # the count shared out over the families
            share = count // len(fams) + (k < count % len(fams))
            if share:
                for p in photo_set(folder / f"{side}-hole", family, share, seed * 10_000 + base + k, x_range=x_range, y_range=y_range):
                    cases.append(Case(p.path, f"{side} hole", side, p))
    cases += [Case(path, "other place", "east", None) for path in other_place_photos(sizes.other_per_source)]
    cases += [Case(path, "blank", "east", None) for path in blank_photos(folder / "blank")]
    return interleaved(cases)


def other_place_photos(per_source: int) -> list[Path]:
    """Real photos of places that are not Longmont, read in place from ``../shared/real_pairs``
    (none when that folder is absent)."""
    from cvgl.bench.real_pairs import resolve_root

    root, _ = resolve_root(None)
    sources = (("sues200_drone_satellite", "drone"), ("ortholoc_uav_orthophoto", "uav_query"), ("u1652_street_satellite", "street_photo"))
    out: list[Path] = []
    for folder, column in sources:
        table = root / folder / "pairs.csv"
        if not table.is_file():
            continue
        import csv

        with table.open(newline="", encoding="utf-8") as f:
            rows = [r[column] for r in csv.DictReader(f) if r.get(column)]
        rows = sorted(set(rows))
        step = max(1, len(rows) // max(per_source, 1))
        out += [root / folder / r for r in rows[::step][:per_source] if (root / folder / r).is_file()]
    return out


def blank_photos(folder: Path) -> list[Path]:
    """Blank and near-content-free images: uniform, black, a 1 px resample (all refused before
    retrieval), and two that pass the content check: a smooth gradient and faint smoothed noise."""
    from PIL import Image, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    h, w = 240, 320
    ramp = np.linspace(40, 200, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    noise = Image.fromarray(np.clip(128 + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(6))
    faint = np.asarray(noise).astype(np.float32)
    faint = 128 + (faint - faint.mean()) * (6.0 / max(float(faint.std()), 1e-6))
    one_px = Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).resize((w, h), Image.NEAREST)
    images = {
        "uniform-grey": np.full((h, w, 3), 128, np.uint8),
        "black": np.zeros((h, w, 3), np.uint8),
        "one-pixel-resample": np.asarray(one_px),
        "smooth-gradient": ramp.astype(np.uint8),
        "faint-smooth-noise": np.clip(faint, 0, 255).astype(np.uint8),
    }
    paths = []
    for name, pixels in images.items():
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# Locating
# ------------------------------------------------------------------------------------------------


def build_holed_index(folder: Path):
    """The WV3 scene with both holes at nodata, indexed as ``cvgl index`` does (default encoder);
    an index already in ``folder`` (a ``--work`` folder of an earlier run) is reused."""
    from cvgl.index.build import build_index
    from cvgl.index.manifest import MANIFEST
    from cvgl.index.store import open_index
    from cvgl.models.factory import create_encoder

    if (folder / "index" / MANIFEST).is_file():
        index = open_index(folder / "index")
    else:
        reference = holed_reference(folder / "wv3-holed.tif", HOLES)
        encoder = create_encoder(weights="embedded", view="reference")
        index = open_index(build_index(reference, folder / "index", encoder, SPEC, progress=False, log=lambda _m: None))
    query_encoder = create_encoder(weights="embedded", view="query", input_size=tuple(index.manifest.encoder.input_size))
    index.check_encoder(query_encoder.identity)
    return index, query_encoder


DEFAULT_BUDGET_S = 1400.0  # seconds of verification per run (keeps `make bench` bounded on 2 cores)
FIRST_FIT_PHOTOS = 12  # verified fit-side photos before test-side ones are verified
CACHED = ("plain", "refined", "plain_evidence", "refined_evidence", "desc", "skipped")


def locate_cases(cases: list[Case], index, encoder, options, progress: bool = True, cache: Path | None = None,
                 budget_s: float | None = None):
    """Each photo through the product's stages one at a time, keeping what the tables need: the
    retrieval answer, the default (verified) answer, their evidence and the raw descriptors.

    Two passes, because verification costs 10-150 s a photo on a loaded 2-core machine and
    retrieval a few: first every photo's retrieval answer, then verification in the (interleaved)
    case order until ``budget_s`` seconds of verification are spent; photos left unverified are
    left out of the ``refined-v1`` rows and counted. ``cache``: a pickle in a ``--work`` folder
    keeping each photo's results (keyed by path and the photo's bytes), so a rerun resumes.
    Returns the (warm) verification stage."""
    import hashlib
    import pickle

    from cvgl.index.search import hypothesis_scores
    from cvgl.io import write_bytes_atomic
    from cvgl.locate import answer_photo, describe, one_line_reason
    from cvgl.preprocess import prepare_query
    from cvgl.verify.refine import Refiner

    kept: dict = pickle.loads(cache.read_bytes()) if cache is not None and cache.is_file() else {}
    keys = {id(c): f"{c.path}:{hashlib.sha256(c.path.read_bytes()).hexdigest()}" for c in cases}
    alignment = index.alignment
    prior = index.prior(None, None)

    def save(case: Case) -> None:
        if cache is not None:
            kept[keys[id(case)]] = {name: getattr(case, name) for name in CACHED}
            write_bytes_atomic(cache, pickle.dumps(kept))

    def retrieval(case: Case):
        query = prepare_query(case.path, options.query, index.manifest.tile_m, index.manifest.gsd_m)
        desc = encoder.encode([h.image for h in query.hypotheses], batch_size=options.batch_size)
        scores, best = hypothesis_scores(index, desc, alignment, prior, options.candidates)
        return query, desc, scores, best

    in_memory: dict[int, tuple] = {}
    started = time.time()
    for i, case in enumerate(cases):
        for name, value in kept.get(keys[id(case)], {}).items():
            setattr(case, name, value)
        if case.plain is not None or case.skipped is not None:
            continue
        began = time.time()
        try:
            query, desc, scores, best = retrieval(case)
            plain = answer_photo(query, scores, best, index, options, describe(alignment), None)
        except Exception as exc:  # noqa: BLE001 - recorded as the product records it
            case.skipped = one_line_reason(case.path, exc)
        else:
            in_memory[id(case)] = (query, scores, best)
            case.desc, case.plain, case.plain_evidence = desc, plain.to_dict(), dict(plain.evidence)
        save(case)
        if progress:
            print(f"  retrieval {i + 1}/{len(cases)} {case.group} ({case.side}): {time.time() - began:.1f} s, "
                  f"total {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    refiner = Refiner(index, options.refine)
    started = time.time()
    # fit-side photos first until the refined model can be fitted (FIRST_FIT_PHOTOS), then alternating
    west, east = [c for c in cases if c.side == "west"], [c for c in cases if c.side == "east"]
    done = sum(1 for c in west if c.refined is not None)
    order = west[: max(FIRST_FIT_PHOTOS - done, 0) + done]
    west = west[len(order):]
    # photos with no pose (real photos of other places, near-blank images) cost the most: four
    # headings x pitch hypotheses x 10 candidates, so they come last
    costly = [c for c in east if c.truth is None]
    east = [c for c in east if c.truth is not None]
    while west or east:
        order += east[:1] + west[:1]
        west, east = west[1:], east[1:]
    order += costly
    for i, case in enumerate(order):
        if case.refined is not None or case.skipped is not None:
            continue
        if budget_s is not None and time.time() - started > budget_s:
            break
        began = time.time()
        if id(case) in in_memory:
            query, scores, best = in_memory.pop(id(case))
        else:  # retrieval came from the cache
            query, _, scores, best = retrieval(case)
        refined = answer_photo(query, scores, best, index, options, describe(alignment), refiner)
        case.refined, case.refined_evidence = refined.to_dict(), dict(refined.evidence)
        save(case)
        if progress:
            print(f"  verification {i + 1}/{len(cases)} {case.group} ({case.side}): {time.time() - began:.1f} s, "
                  f"total {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return refiner


# ------------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------------

MODELS = {"retrieval-v1": ("plain", RETRIEVAL_FEATURES), "refined-v1": ("refined", RETRIEVAL_FEATURES + VERIFIED_FEATURES)}


def not_found_threshold(p: np.ndarray, correct: np.ndarray, verified: np.ndarray, target: float = TARGET_FALSE_NOT_FOUND) -> float:
    """The largest threshold calling at most ``target`` of the correct answers "not found"
    (only unverified answers below it are), capped at :data:`MAX_NOT_FOUND_BELOW`."""
    allowed = math.floor(target * int(correct.sum()))
    exposed = np.sort(p[correct & ~verified])
    if len(exposed) <= allowed:
        return MAX_NOT_FOUND_BELOW
    return float(min(exposed[allowed], MAX_NOT_FOUND_BELOW))


def fit_models(cases: list[Case], seed: int, sizes: Sizes) -> dict[str, ConfidenceModel]:
    models = {}
    for name, (which, features) in MODELS.items():
        fit = [c for c in cases if c.side == "west" and c.plain is not None and (which == "plain" or c.refined is not None)]
        correct = np.array([c.correct(which) for c in fit])
        evidence = [c.evidence(which) for c in fit]
        verified = np.array([c.verified(which) for c in fit])
        try:
            model = fit_logistic(name, features, evidence, correct)
        except ValueError as exc:  # too few photos (a short verification budget): say so, keep the rest
            print(f"confidence: {exc}", file=sys.stderr)
            continue
        p = np.array([model.probability(e) for e in evidence])
        threshold = round(not_found_threshold(p, correct, verified), 4)
        hole = np.array([c.group == "west hole" for c in fit])
        flagged = (p < threshold) & ~verified
        model = ConfidenceModel(
            name, model.features, _r(model.mean), _r(model.scale), _r(model.coef), round(model.intercept, 6),
            {
                "what": "P(error to the true photo centre <= answer.uncertainty_m, i.e. confidence_radius_m)",
                "answer": "retrieval only (verification off)" if which == "plain" else "after verification (locate's default)",
                "data": f"cvgl bench confidence: WV2 synthetic drone photos ({'; '.join(f.name for f in sizes.families())}) against a WV3 index "
                        f"with holes {HOLES} at nodata; fit side = west half photos outside the holes "
                        f"(>= {IN_MARGIN_M:g} m) plus photos centred in the west hole (>= {HOLE_MARGIN_M:g} m inside)",
                "seed": seed,
                "photos": len(fit),
                "in_index_photos": int((~hole).sum()),
                "west_hole_photos": int(hole.sum()),
                "correct": int(correct.sum()),
                "verified": int(verified.sum()),
                "per_family": sizes.fit_per_family,
                "logistic_l2": 1e-2,
                "not_found_below": threshold,
                "not_found_rule": f"largest threshold calling <= {TARGET_FALSE_NOT_FOUND:.0%} of correct fit answers "
                                  f"not found (verified answers never are), capped at {MAX_NOT_FOUND_BELOW}",
                "fit_false_not_found": round(float(flagged[correct].mean()) if correct.any() else 0.0, 4),
                "fit_hole_not_found": round(float(flagged[hole].mean()) if hole.any() else 0.0, 4),
                "fit_ece": round(expected_calibration_error(p, correct), 4),
            },
        )
        models[name] = model
    return models


def _r(values) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


def shipped(name: str) -> ConfidenceModel | None:
    try:
        return shipped_model(name)
    except InputError:
        return None


def model_difference(a: ConfidenceModel, b: ConfidenceModel | None) -> str:
    if b is None:
        return "no shipped model"
    if a.features != b.features:
        return "features differ"
    gap = max(abs(x - y) for x, y in zip(a.coef + (a.intercept,), b.coef + (b.intercept,)))
    return f"max coefficient difference {gap:.2g}"


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def scored(cases: list[Case], model: ConfidenceModel, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, not_found) per case; a refused photo: confidence 0, not found."""
    p, y, nf = [], [], []
    for c in cases:
        if c.plain is None:
            p.append(0.0)
            y.append(False)
            nf.append(True)
            continue
        prob = model.probability(c.evidence(which))
        p.append(prob)
        y.append(c.correct(which))
        nf.append(model.says_not_found(prob, c.verified(which)))
    return np.array(p), np.array(y, bool), np.array(nf, bool)


def compact_reliability(p: np.ndarray, y: np.ndarray, bins: int = 5) -> str:
    return "; ".join(f"{b.low:.1f}–{b.high:.1f}: {b.count}× {b.mean_confidence:.2f}→{b.accuracy:.2f}" for b in reliability_table(p, y, bins))


def calibration_lines(cases: list[Case], model: ConfidenceModel, which: str) -> list[str]:
    test = [c for c in cases if c.side == "east"]
    groups = [f.name for f in families()] + list(OTHER_PLACE_KINDS)
    groups = [g for g in groups if any(c.group == g for c in test)]
    rows = []
    for group in [*groups, "all east in-index", "all east"]:
        if group == "all east":
            members = test
        elif group == "all east in-index":
            members = [c for c in test if c.in_index]
        else:
            members = [c for c in test if c.group == group]
        if not members:
            continue
        p, y, nf = scored(members, model, which)
        rows.append([group, len(members), f"{y.mean():.2f}", f"{p.mean():.2f}", f"{expected_calibration_error(p, y):.3f}",
                     f"{brier_score(p, y):.3f}", f"{nf.mean():.2f}", compact_reliability(p, y)])
    lines = markdown_table(["photos", "n", "correct", "mean conf.", "ECE", "Brier", "not found", "reliability (5 bins: n× conf→correct)"], rows)
    p, y, _ = scored(test, model, which)
    lines += ["", f"Reliability table, all east photos ({len(test)}), `{model.name}`:", ""]
    lines += markdown_table(["confidence", "n", "mean confidence", "share correct"],
                            [[f"{b.low:.1f}–{b.high:.1f}", b.count, f"{b.mean_confidence:.3f}", f"{b.accuracy:.3f}"] for b in reliability_table(p, y, 10)])
    return lines


def auroc_lines(cases: list[Case], models: dict[str, ConfidenceModel]) -> list[str]:
    scores = {}
    if "refined-v1" in models:
        scores["refined-v1 (default answer)"] = lambda c: models["refined-v1"].probability(c.refined_evidence)
    if "retrieval-v1" in models:
        scores["retrieval-v1 (verification off)"] = lambda c: models["retrieval-v1"].probability(c.plain_evidence)
    scores["softmax mass (the old, uncalibrated confidence)"] = lambda c: c.plain_evidence["mass"]
    rows = []
    for name, score in scores.items():
        test = [c for c in with_answer(cases, "refined" if name.startswith("refined") else "plain") if c.side == "east"]
        positives = [c for c in test if c.in_index]
        cells = [name]
        for kinds in [(k,) for k in OTHER_PLACE_KINDS] + [OTHER_PLACE_KINDS]:
            negatives = [c for c in test if c.group in kinds]
            members = positives + negatives
            if not negatives or not positives:
                cells.append("–")
                continue
            s = [0.0 if c.plain is None else score(c) for c in members]
            cells.append(f"{auroc(s, [c.in_index for c in members]):.3f}")
        cells.append(f"{len(positives)} / {len(test) - len(positives)}")
        rows.append(cells)
    heads = ["score", *[f"vs {k}" for k in OTHER_PLACE_KINDS], "vs all out-of-index", "photos in / out"]
    return markdown_table(heads, rows)


def _count(cases: list[Case]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in cases:
        key = f"{c.side} {c.group}" if c.in_index else c.group
        out[key] = out.get(key, 0) + 1
    return out


def with_answer(cases: list[Case], which: str) -> list[Case]:
    """The cases a model's rows are computed on: refused photos, and those that got that answer
    (the refined one is missing for photos the verification budget did not reach)."""
    return [c for c in cases if c.skipped is not None or (c.plain if which == "plain" else c.refined) is not None]


def alignment_lines(cases: list[Case], index, tmp: Path) -> list[str]:
    """R@1 on the east in-index photos with the default (none) and the alternatives."""
    from cvgl.alignment import fit_alignment, load_query_alignment
    from cvgl.index.search import hypothesis_scores

    west = [c.desc for c in cases if c.side == "west" and c.desc is not None]
    test = [c for c in cases if c.side == "east" and c.in_index and c.desc is not None]
    if len(west) < 2 or not test:
        return ["(too few photos for the alignment table)"]
    lat, lon = index.tiles["lat"].to_numpy(), index.tiles["lon"].to_numpy()
    alignments = {"none (default)": index.alignment}
    for kind in ("center", "coral"):
        fitted = fit_alignment(kind, index.raw, queries=np.concatenate(west))
        fitted.fitted_on.update({"fitted_for": index.alignment_key(), "photos": len(west), "index": index.path.name})
        saved = fitted.save_file(tmp / f"{kind}.npz")  # as `cvgl align` saves it, loaded as --query-alignment loads it
        alignments[f"{kind} (`cvgl align` on {len(west)} unlabelled west photos)"] = load_query_alignment(saved, index.alignment_key(), index.manifest.dim)
    nearest = [int(np.argmin(geodesic_distance_m(c.truth.center_lat, c.truth.center_lon, lat, lon))) for c in test]
    anchors = (np.stack([c.desc[0] for c in test]), index.raw[nearest])
    alignments["**LEAKY**: PCA+Procrustes on the east test pairs"] = fit_alignment(
        "procrustes", index.raw, anchors=anchors, leaky=True, pca_dim=min(128, len(test) - 1))
    groups = [f.name for f in families() if any(c.group == f.name for c in test)]
    rows = []
    prior = index.prior(None, None)
    for name, alignment in alignments.items():
        hit = {}
        for c in test:
            scores, _ = hypothesis_scores(index, c.desc, alignment, prior)
            top = int(np.argmax(scores))
            hit.setdefault(c.group, []).append(float(geodesic_distance_m(lat[top], lon[top], c.truth.center_lat, c.truth.center_lon)) <= RADIUS_M)
        per = [np.mean(hit[g]) if g in hit else math.nan for g in groups]
        rows.append([name, *[f"{v:.2f}" for v in per], f"{np.nanmean(per):.3f}"])
    return markdown_table(["alignment", *groups, "mean"], rows)


def batch_lines(cases: list[Case], index, encoder, options, sizes: Sizes, refiner=None) -> list[str]:
    """The same photos located by ``locate_images`` alone and in batches: identical answers?

    Verification off: alone, and in commands of each size in ``sizes.batches``, every published
    number compared. Default options (verification on): one command of ``sizes.verified_batch``
    photos against this benchmark's one-photo-at-a-time stages (position, top-k, verification and
    the evidence the confidence is computed from)."""
    from dataclasses import replace

    from cvgl.answer import Skipped
    from cvgl.locate import locate_images
    from cvgl.verify.refine import RefineOptions

    test = [c for c in cases if c.side == "east"]
    paths = [c.path for c in test] + [c.path for c in cases if c.side == "west"]  # (cases are interleaved)
    largest = min(max(sizes.batches), len(paths))
    plain = replace(options, refine=RefineOptions(mode="off"))
    started = time.time()
    runs: dict[str, list[dict]] = {}
    for n in sizes.batches:
        if n == 1:
            runs["alone"] = [locate_images([p], encoder, index, plain, progress=False)[0][0].to_dict() for p in paths[: sizes.alone]]
        elif n < largest:
            runs[f"batch of {n}"] = [a.to_dict() for a in locate_images(paths[:n], encoder, index, plain, progress=False)[0]]
    reference = [a.to_dict() for a in locate_images(paths[:largest], encoder, index, plain, progress=False)[0]]
    rows = []
    for name, answers in runs.items():
        rows.append([f"verification off: {name} vs batch of {largest}", len(answers), *_differences(answers, reference[: len(answers)])])
    # the benchmark's warm verification stage, as the service keeps one: answers must not depend on its cache
    done = [c.path for c in test if c.refined is not None or c.skipped is not None][: sizes.verified_batch]
    verified, _, _ = locate_images(done, encoder, index, options, progress=False, refiner=refiner)
    by_path = {str(c.path): c for c in cases}
    stages = []
    for answer in verified:
        case = by_path[answer.query]
        stages.append(None if case.refined is None else (case.refined, case.refined_evidence))
    mine = [s[0] if s else Skipped(a.query, by_path[a.query].skipped or "").to_dict() for s, a in zip(stages, verified)]
    theirs = [a.to_dict() for a in verified]
    evidence_same = sum(1 for s, a in zip(stages, verified) if s is None or (hasattr(a, "evidence") and s[1] == a.evidence))
    rows.append([f"default (verification on): batch of {len(verified)} vs one photo at a time", len(verified),
                 *_differences(mine, theirs, ignore=("confidence", "confidence_model", "status", "reason"))[:2],
                 f"{len(verified) - evidence_same} evidence, {_differences(mine, theirs, ignore=('confidence', 'confidence_model', 'status', 'reason'))[2]} answers"])
    seconds = time.time() - started
    return markdown_table(["comparison", "photos", "max position difference (m)", "max confidence difference", "not identical"], rows) + [
        "", (f"({sum(len(v) for v in runs.values()) + len(reference) + len(verified)} photos located for this check in {seconds:.0f} s."
        " `verification.seconds` is a timing and is not compared; in the last row the confidence is not compared because the"
        " per-photo stages ran before the models were fitted; their evidence — what the confidence is a function of — is.)")]


def _differences(answers: list[dict], reference: list[dict], ignore: tuple[str, ...] = ()) -> list:
    diff_m, diff_p, differing = 0.0, 0.0, 0
    for a, b in zip(answers, reference):
        if _published(a, ignore) != _published(b, ignore):
            differing += 1
        if a.get("lat") is not None and b.get("lat") is not None:
            diff_m = max(diff_m, float(geodesic_distance_m(a["lat"], a["lon"], b["lat"], b["lon"])))
            if "confidence" not in ignore:
                diff_p = max(diff_p, abs(float(a["confidence"]) - float(b["confidence"])))
    return [f"{diff_m:.3g}", "–" if "confidence" in ignore else f"{diff_p:.3g}", differing]


def _published(answer: dict, ignore: tuple[str, ...] = ()) -> str:
    a = {k: v for k, v in json.loads(json.dumps(answer)).items() if k not in ignore}
    if a.get("verification"):
        a["verification"].pop("seconds", None)
    return json.dumps(a, sort_keys=True)


# ------------------------------------------------------------------------------------------------


def run(sizes: Sizes, seed: int = 0, fit: bool = False, quick: bool = False, models_dir: Path | None = None,
        work: Path | None = None, batch: bool = True, budget_s: float | None = None) -> str:
    import torch

    from cvgl import answer as answer_module
    from cvgl.locate import LocateOptions

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.time()
    options = LocateOptions()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = Path(work) if work is not None else tmp
        folder.mkdir(parents=True, exist_ok=True)
        index, encoder = build_holed_index(folder)
        cases = make_cases(folder / "photos", sizes, seed)
        print(f"confidence: {len(cases)} photos against {len(index)} tiles", file=sys.stderr, flush=True)
        refiner = locate_cases(cases, index, encoder, options, cache=folder / "located.pkl" if work is not None else None,
                               budget_s=budget_s)
        unverified = [c for c in cases if c.plain is not None and c.refined is None]
        located_s = time.time() - started
        refit = fit_models(cases, seed, sizes)
        if fit:
            target = models_dir or PACKAGE_MODELS
            for model in refit.values():
                model.save(Path(target) / f"{model.name}.json")
            answer_module._model.cache_clear()
        models = dict(refit) if fit else {name: m for name in MODELS if (m := shipped(name)) is not None}
        if not models:
            raise SystemExit("no shipped confidence models: run `cvgl bench confidence --fit` first")
        if models_dir is not None and fit:
            used = "fitted now (written to a test folder)"
        else:
            used = "fitted now and written into the package (`--fit`)" if fit else "shipped in the package"
        calibration = {name: calibration_lines(with_answer(cases, which), models[name], which) for name, (which, _) in MODELS.items() if name in models}
        areas = auroc_lines(cases, models)
        align = alignment_lines(cases, index, tmp)
        batch_table = batch_lines(cases, index, encoder, options, sizes, refiner) if batch else ["(not run: --no-batch)"]
        skipped = [c for c in cases if c.skipped]
        fit_side = [c for c in cases if c.side == "west"]
        test_side = [c for c in cases if c.side == "east"]
        tiles = len(index)
    command = "cvgl bench confidence" + (" --fit" if fit else "") + (" --quick" if quick else "")
    lines = [
        "## Benchmark `confidence` (calibrated confidence, not in this index, batch independence)",
        "",
        f"`{command}` · {machine_line()} · {time.time() - started:.0f} s ({located_s:.0f} s locating).",
        (f"Index: WV3 Longmont, {tiles} tiles (112 m, stride 56 m) after two holes were cut to nodata (fractions of the scene"
        f" x0, y0, x1, y1: west {WEST_HOLE}, east {EAST_HOLE}); photos: WV2 synthetic drone photos, located by the product's"
        " stages with the default options (verification auto = ALIKED+LightGlue on the top 10)."),
        f"Families: {'; '.join(f.name for f in sizes.families())}"
        + ("" if sizes.all_families else " (the heading-unknown families are left out for time; `--all-families` adds them)") + ".",
        f"Fit side (west): {len(fit_side)} photos ({sizes.fit_per_family} per family outside the holes + {sizes.fit_hole} in the west hole);"
        f" test side (east): {len(test_side)} photos ({sizes.test_per_family} per family outside the east hole,"
        f" {sizes.test_hole} in the east hole, {len([c for c in test_side if c.group == 'other place'])} real photos of other places"
        f" from ../shared/real_pairs, {len([c for c in test_side if c.group == 'blank'])} blank / near-blank images)."
        + (f" **Not verified for time** (the verification budget ran out): {len(unverified)} photos"
           f" ({', '.join(f'{g} {n}' for g, n in _count(unverified).items())}), left out of the `refined-v1` rows;"
           " every photo has its retrieval answer." if unverified else "")
        + f" Skipped (refused with a reason): {len(skipped)} ({', '.join(sorted({c.group for c in skipped})) or 'none'}).",
        ("**Confidence** = P(error to the true photo centre ≤ the answer's `uncertainty_m` = `confidence_radius_m`):"
        " 79 m (tile half-diagonal) for a retrieval answer, the verified radius for a verified one. Out-of-index photos"
        " and refused photos count as not correct; a refused photo scores confidence 0."),
        f"Models evaluated: {used}.",
        "",
        "| model | features | not_found_below | fit photos (correct / verified) | fit ECE | fit false not-found | west-hole not found | refit vs shipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in models.items():
        f = model.fitted_on
        lines.append(f"| {name} | {', '.join(model.features)} | {f['not_found_below']} | {f['photos']} ({f['correct']} / {f['verified']}) |"
                     f" {f['fit_ece']} | {f['fit_false_not_found']:.2f} | {f['fit_hole_not_found']:.2f} | {model_difference(refit[name], shipped(name)) if not fit and name in refit else 'refit = shipped' if fit else 'not refitted'} |")
    for name in [n for n in MODELS if n in calibration]:
        label = "after verification (the default answer)" if name == "refined-v1" else "retrieval only (verification off)"
        lines += ["", f"### Calibration on the east half: `{name}`, {label}", "", *calibration[name]]
    lines += ["", "### In the index vs not: AUROC (east in-index photos = positives)", "", *areas,
              "", "### Batch independence (`locate_images`: alone, in batches)", "", *batch_table,
              "", "### Query-view alignment: the default against the alternatives (R@1, top-1 tile within 79 m, east in-index photos)",
              "", *align, "",
              "The leaky row is fitted on the test photos' true tiles and is not a deployable number."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="write the fitted models into the package")
    parser.add_argument("--quick", action="store_true", help="a handful of photos (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-families", action="store_true", help="also the three heading-unknown families (slow)")
    parser.add_argument("--models-dir", type=Path, default=None, help="with --fit: write the models here instead of the package")
    parser.add_argument("--work", type=Path, default=None, help="keep the index, photos and located answers here (resumable)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="stop verifying after this many seconds (retrieval runs for every photo); 0: no limit")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch-independence check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.all_families:
        from dataclasses import replace

        sizes = replace(sizes, all_families=True)
    return emit_section(run(sizes, args.seed, args.fit, args.quick, args.models_dir, args.work, not args.no_batch, args.budget_s or None), args.out)


if __name__ == "__main__":
    sys.exit(main())
