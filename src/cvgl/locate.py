"""``cvgl locate``: photos -> answers against a reference index, stage by stage.

:mod:`cvgl.preprocess` (photo -> hypotheses in the reference's geometry) -> the encoder ->
:mod:`cvgl.alignment` -> :mod:`cvgl.index.search` (per-tile scores) -> :mod:`cvgl.verify`
(local features + homography on the top candidates) -> :mod:`cvgl.answer` (position, radius,
calibrated confidence). This module only orchestrates: options, the passes, per-photo failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvgl.alignment import Alignment
from cvgl.answer import (
    Answer,
    Candidate,
    Skipped,
    answer_from_scores,
    apply_verification,
    finalise_confidence,
)
from cvgl.confidence import retrieval_evidence, verification_evidence
from cvgl.errors import CvglError, InputError
from cvgl.index.search import hypothesis_scores, ranked_tiles
from cvgl.index.store import RERANK_POOL, ReferenceIndex
from cvgl.models.encoder import Encoder
from cvgl.preprocess import PreparedQuery, QueryOptions, prepare_query
from cvgl.verify.refine import RefineOptions, Refiner


@dataclass(frozen=True)
class LocateOptions:
    """How to locate; a photo's answer depends only on the photo, the index, the model and these."""

    query: QueryOptions = field(default_factory=QueryOptions)
    top_k: int = 5
    temperature: float = 0.02  # softmax temperature on cosine scores, for the retrieval evidence
    batch_size: int = 16
    # A saved query-view alignment (``cvgl align``; load with cvgl.alignment.load_query_alignment),
    # applied to every photo alike; None: the index's stored alignment.
    query_alignment: Alignment | None = None
    near: tuple[float, float] | None = None  # geographic prior: (lat, lon) ...
    radius_km: float | None = None  # ... and only tiles within this radius
    candidates: int = RERANK_POOL  # per hypothesis, when the index is searched instead of scored densely
    refine: RefineOptions = field(default_factory=RefineOptions)  # the geometric verification stage


def locate_images(
    paths: list[Path], encoder: Encoder, index: ReferenceIndex, options: LocateOptions, progress: bool = True,
    refiner: Refiner | None = None, street_reference=None,
) -> tuple[list[Answer | Skipped], list[np.ndarray | None], list[PreparedQuery | None]]:
    """Locate each photo; a bad photo becomes a :class:`Skipped` and the batch goes on.

    Photos are independent: nothing is fitted on the batch (a photo gets the same answer alone
    or among others). ``refiner``: a verification stage to reuse (its window-feature cache
    persists, e.g. in the service); by default one is made when ``options.refine`` is enabled.
    Street photos go to :func:`locate_street_photos` (``street_reference``: its tile products to reuse).
    Returns the answers, each photo's per-tile scores and its hypotheses.
    """
    from tqdm import tqdm

    if options.query.view == "street":
        return locate_street_photos(paths, encoder, index, options, progress, street_reference)

    tile_m = index.manifest.tile_m
    gsd_m = index.manifest.gsd_m
    prepared: list[PreparedQuery | None] = []
    descriptors: list[np.ndarray | None] = []
    errors: dict[int, str] = {}
    for i, path in enumerate(tqdm(paths, desc="encoding photos", unit="photo", disable=not progress)):
        try:
            query = prepare_query(Path(path), options.query, tile_m, gsd_m)
            desc = encoder.encode([h.image for h in query.hypotheses], batch_size=options.batch_size)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one photo's failure never costs the others their answers
            errors[i] = one_line_reason(Path(path), exc)
            prepared.append(None)
            descriptors.append(None)
            continue
        prepared.append(query)
        descriptors.append(desc)

    alignment = options.query_alignment or index.alignment
    prior = index.prior(options.near, options.radius_km)  # once for every photo, not per search
    if options.near is not None:
        allowed = prior[0] if prior[0] is not None else index.allowed_rows(options.near, options.radius_km)
        if len(allowed) == 0:
            raise InputError(f"{index.path}: no tile within {options.radius_km:g} km of {options.near[0]:.6f},{options.near[1]:.6f}")

    if refiner is None and options.refine.enabled and any(p is not None and p.match_view is not None for p in prepared):
        refiner = Refiner(index, options.refine)
    results: list[Answer | Skipped] = []
    all_scores: list[np.ndarray | None] = []
    stage = "scoring + verifying" if refiner is not None else "scoring"
    pairs = tqdm(list(zip(prepared, descriptors)), desc=stage, unit="photo", disable=not progress)
    for i, (query, desc) in enumerate(pairs):
        if query is None or desc is None:
            results.append(Skipped(str(paths[i]), errors[i]))
            all_scores.append(None)
            continue
        try:
            tile_scores, best_hyp = hypothesis_scores(index, desc, alignment, prior, options.candidates)
            results.append(answer_photo(query, tile_scores, best_hyp, index, options, describe(alignment), refiner))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            results.append(Skipped(str(paths[i]), one_line_reason(Path(paths[i]), exc)))
            all_scores.append(None)
            continue
        all_scores.append(tile_scores)
    return results, all_scores, prepared


def locate_street_photos(
    paths: list[Path], encoder: Encoder, index: ReferenceIndex, options: LocateOptions, progress: bool = True,
    reference=None,
) -> tuple[list[Answer | Skipped], list[None], list[None]]:
    """Street photos go to the geometric matcher (:func:`cvgl.street.locate_street`): a global
    descriptor is at chance for a side-on view (``cvgl bench street``)."""
    from tqdm import tqdm

    from cvgl.street import StreetReference, TokenExtractor, locate_street, street_options

    street = street_options(options)
    if reference is None:
        reference = StreetReference(index, TokenExtractor.from_encoder(encoder, street.config.layer), street.config)
    results: list[Answer | Skipped] = []
    for path in tqdm(paths, desc="locating street photos", unit="photo", disable=not progress):
        try:
            results.append(locate_street(Path(path), index, encoder, street, reference))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one photo's failure never costs the others their answers
            results.append(Skipped(str(path), one_line_reason(Path(path), exc)))
    return results, [None] * len(paths), [None] * len(paths)


def answer_photo(
    query: PreparedQuery, tile_scores: np.ndarray, best_hyp: np.ndarray, index: ReferenceIndex, options: LocateOptions,
    alignment: str, refiner: Refiner | None,
) -> Answer:
    """One photo's answer from its per-tile scores: retrieval, then verification of the top
    candidates when a refiner is given, then the calibrated confidence of the evidence."""
    answer = answer_from_scores(query, tile_scores, best_hyp, index, options.top_k, options.temperature, alignment)
    lat, lon = index.tiles["lat"].to_numpy(), index.tiles["lon"].to_numpy()
    evidence = retrieval_evidence(tile_scores, lat, lon, index.manifest.correct_radius_m)
    if refiner is not None and query.match_view is not None:
        ranked, _ = ranked_tiles(tile_scores)
        rows = [int(r) for r in ranked[: refiner.options.top_k]]
        hints = [float(query.hypotheses[int(best_hyp[r])].heading_deg) for r in rows]
        refined = refiner.refine(query.match_view, rows, hints)
        if refined.best is not None and refined.best.extras["row"] not in ranked[: options.top_k]:
            # the verified tile leads the evidence even when retrieval ranked it below the top-k shown
            row = int(refined.best.extras["row"])
            answer.top_k = [Candidate(str(index.tiles["tile_id"].iloc[row]), float(lat[row]), float(lon[row]),
                                      float(tile_scores[row])), *answer.top_k[: options.top_k - 1]]
        apply_verification(answer, refined, query, index.crs)
        strongest = refined.strongest()
        plausible = strongest is not None and strongest.plausible
        evidence.update(verification_evidence(refined.verified, strongest.inliers if plausible else 0,
                                              strongest.inlier_ratio if plausible else 0.0))
    finalise_confidence(answer, evidence)
    return answer


def describe(alignment: Alignment) -> str:
    """How an answer names its alignment: the kind, and the file digest for a saved one."""
    return alignment.kind if alignment.kind == "none" else f"{alignment.kind}:{alignment.digest()[:12]}"


def one_line_reason(path: Path, exc: BaseException) -> str:
    """A photo's failure as one line naming it: our own errors as they are, anything else
    (OpenCV, numpy, Pillow) with its type, so the batch report never needs a traceback."""
    if isinstance(exc, CvglError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = " ".join(str(exc).split())[:160] or "no detail"
    return f"{path}: could not be processed ({type(exc).__name__}: {detail})"
